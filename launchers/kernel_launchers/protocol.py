"""The wire protocol between a kernel launcher and the operator. Pure functions, no I/O.

Launch response (launcher -> operator), one frame per launch:

    frame   = length(4, big endian) || message
    message = MAGIC(4) || launch_id(36, ASCII) || ephemeral_public(32) || nonce(12) || sealed

The launch id names one launch of one kernel: the operator gives the RemoteKernel's uid (a
UUID), so two kernels that share a kernel id can never answer for each other; a launcher
started without one uses its kernel id, as gateway_provisioners' did.

``sealed`` is ChaCha20-Poly1305 over a JSON payload, keyed by HKDF-SHA256 of the X25519
agreement between the launcher's ephemeral key and the operator's static key. The associated
data covers the magic, the kernel id and the ephemeral key, so a payload cannot be moved to
another kernel, and any change to a byte is detected. The payload carries the single-use
launch token the operator minted for this kernel; the operator keeps only its hash.

Control requests (operator -> launcher): JSON objects signed with HMAC-SHA256 under a key the
launcher generated and sent inside its sealed payload, with a timestamp and nonce so a
captured request cannot be replayed.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from typing import Any, TypedDict

# cryptography, hashlib, hmac and uuid are imported where they are used: a launcher starts its
# kernel first and loads them meanwhile (preload_crypto), which takes ~30 ms (OpenSSL's libcrypto
# for hashlib alone ~5-20 ms) off every launch's critical path.

MAGIC = b"RKO1"
EXIT_MAGIC = b"RKOX"  # an exit notice: "look at kernel <id> now"; carries no authority
KERNEL_ID_LEN = 36
KEY_LEN = 32
NONCE_LEN = 12
HEADER_LEN = len(MAGIC) + KERNEL_ID_LEN + KEY_LEN + NONCE_LEN
MAX_FRAME = 64 * 1024
CONTROL_MAX_AGE = 60.0  # seconds a signed control request stays valid
_INFO = b"remote-kernel-operator launch v1"


class ProtocolError(ValueError):
    """A message was malformed, forged, tampered with, or for another kernel."""


class ConnectionInfo(TypedDict, total=False):
    """The kernel's connection info as jupyter_client writes it in a connection file."""

    ip: str
    transport: str
    signature_scheme: str
    key: str
    kernel_name: str
    shell_port: int
    iopub_port: int
    stdin_port: int
    control_port: int
    hb_port: int
    curve_publickey: str
    curve_secretkey: str  # jupyter_client's clients use the server's key pair (see its connect.py)


class _LaunchPayloadBase(TypedDict):
    """What a launcher sends home once its kernel listens."""

    kernel_id: str
    token: str
    connection: ConnectionInfo
    pid: int
    pgid: int
    hostname: str
    control_port: int
    control_key: str
    sent_at: float


class LaunchPayload(_LaunchPayloadBase, total=False):
    kernel_pid: int  # lets a backend signal the kernel when its launcher is gone (optional: older launchers)
    launch_id: str  # the launch this answers (the frame header's); the kernel id when absent


def launch_id_of(payload: LaunchPayload) -> str:
    """The launch a payload answers: its launch id, else (older launchers) its kernel id."""
    return payload.get("launch_id") or payload["kernel_id"]


# -- keys and tokens ------------------------------------------------------------------------


def preload_crypto() -> None:
    """Import the cryptography this module uses (call it from a thread to overlap the cost)."""
    import hashlib  # noqa: F401
    import hmac  # noqa: F401

    from cryptography.exceptions import InvalidTag  # noqa: F401
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: F401
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: F401
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305  # noqa: F401
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: F401


def new_private_key() -> bytes:
    """A new X25519 private key, as its 32 raw bytes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_key_of(private_key: bytes) -> bytes:
    """The 32 raw bytes of the public key for a raw X25519 private key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return (
        X25519PrivateKey.from_private_bytes(private_key)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def encode_key(raw: bytes) -> str:
    """URL-safe base64 text for a raw key (how keys travel on command lines)."""
    return base64.urlsafe_b64encode(raw).decode("ascii")


def decode_key(text: str) -> bytes:
    """The raw bytes of a key in ``encode_key`` form; ProtocolError if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as err:
        raise ProtocolError("The key is not URL-safe base64 text.") from err
    if len(raw) != KEY_LEN:
        raise ProtocolError(f"The key must be {KEY_LEN} bytes, not {len(raw)}.")
    return raw


def new_token() -> str:
    """A single-use launch token: 256 random bits as URL-safe text."""
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")  # as secrets.token_urlsafe


def token_hash(token: str) -> str:
    """The hash under which the operator remembers a token (never the token itself)."""
    import hashlib

    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def canonical_kernel_id(kernel_id: str) -> str:
    """The 36-character lower-case form of a kernel id; ProtocolError if it is no UUID."""
    # The forms uuid.UUID accepts (braces, a urn:uuid: prefix, any hyphens, either case), without
    # importing uuid (and platform) before a launcher has started its kernel.
    text = (
        kernel_id.replace("urn:", "").replace("uuid:", "").strip("{}").replace("-", "")
        if isinstance(kernel_id, str)
        else ""
    )
    if len(text) != 32 or text.strip(_HEX):
        raise ProtocolError(f"{kernel_id!r} is not a kernel id (a UUID).")
    h = text.lower()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_HEX = "0123456789abcdefABCDEF"


# -- launch responses -----------------------------------------------------------------------


def _aead_key(shared: bytes, ephemeral_public: bytes, operator_public: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=ephemeral_public + operator_public,
        info=_INFO,
    ).derive(shared)


def seal_launch_payload(payload: LaunchPayload, operator_public_key: bytes) -> bytes:
    """Encrypt and frame a launch payload for the operator whose public key is given."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    kernel_id = canonical_kernel_id(launch_id_of(payload)).encode("ascii")
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(operator_public_key))
    key = _aead_key(shared, ephemeral_public, operator_public_key)
    nonce = os.urandom(NONCE_LEN)
    header = MAGIC + kernel_id + ephemeral_public + nonce
    sealed = ChaCha20Poly1305(key).encrypt(nonce, json.dumps(payload).encode("utf-8"), header)
    message = header + sealed
    return struct.pack(">I", len(message)) + message


def peek_kernel_id(message: bytes) -> str:
    """The kernel id a message claims to be for (not yet authenticated)."""
    if len(message) < HEADER_LEN or not message.startswith(MAGIC):
        raise ProtocolError("The message is too short or does not start with the protocol magic.")
    try:
        claimed = message[len(MAGIC) : len(MAGIC) + KERNEL_ID_LEN].decode("ascii")
    except UnicodeDecodeError as err:
        raise ProtocolError("The kernel id in the header is not ASCII.") from err
    if canonical_kernel_id(claimed) != claimed:
        raise ProtocolError("The kernel id in the header is not in canonical form.")
    return claimed


def open_launch_payload(message: bytes, operator_private_key: bytes) -> LaunchPayload:
    """Decrypt and check a launch message (without its length prefix).

    Raises ProtocolError for anything malformed, forged or altered. The token is not checked
    here: that needs the operator's record of the launch.
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    kernel_id = peek_kernel_id(message)
    offset = len(MAGIC) + KERNEL_ID_LEN
    ephemeral_public = message[offset : offset + KEY_LEN]
    header = message[:HEADER_LEN]
    nonce = message[HEADER_LEN - NONCE_LEN : HEADER_LEN]
    operator_public = public_key_of(operator_private_key)
    try:
        shared = X25519PrivateKey.from_private_bytes(operator_private_key).exchange(
            X25519PublicKey.from_public_bytes(ephemeral_public)
        )
    except ValueError as err:  # an all-zero agreement from a low-order point
        raise ProtocolError("The ephemeral key is invalid.") from err
    key = _aead_key(shared, ephemeral_public, operator_public)
    try:
        plain = ChaCha20Poly1305(key).decrypt(nonce, message[HEADER_LEN:], header)
    except InvalidTag as err:
        raise ProtocolError("The message failed authentication (forged or altered).") from err
    try:
        payload = json.loads(plain)
    except ValueError as err:
        raise ProtocolError("The sealed payload is not JSON.") from err
    _check_payload_shape(payload)
    if launch_id_of(payload) != kernel_id:
        raise ProtocolError("The sealed launch id differs from the header's.")
    return payload  # type: ignore[no-any-return]


def _check_payload_shape(payload: Any) -> None:
    expected: dict[str, type | tuple[type, ...]] = {
        "kernel_id": str,
        "token": str,
        "connection": dict,
        "pid": int,
        "pgid": int,
        "hostname": str,
        "control_port": int,
        "control_key": str,
        "sent_at": (int, float),
    }
    if not isinstance(payload, dict):
        raise ProtocolError("The sealed payload is not a JSON object.")
    for name, kind in expected.items():
        if not isinstance(payload.get(name), kind):
            raise ProtocolError(f"The sealed payload lacks a valid {name!r}.")
    if "kernel_pid" in payload and not isinstance(payload["kernel_pid"], int):
        raise ProtocolError("The sealed payload's 'kernel_pid' is not a number.")
    if "launch_id" in payload and not isinstance(payload["launch_id"], str):
        raise ProtocolError("The sealed payload's 'launch_id' is not text.")
    connection = payload["connection"]
    for port in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
        value = connection.get(port)
        if not isinstance(value, int) or not 0 < value < 65536:
            raise ProtocolError(f"The connection info lacks a valid {port!r}.")
    for text in ("ip", "transport", "signature_scheme", "key"):
        if not isinstance(connection.get(text), str):
            raise ProtocolError(f"The connection info lacks a valid {text!r}.")


# -- exit notices ---------------------------------------------------------------------------

EXIT_MAC_LEN = 32
EXIT_LEN = len(EXIT_MAGIC) + KERNEL_ID_LEN + 8 + EXIT_MAC_LEN


def _hmac_sha256(key: bytes, blob: bytes) -> bytes:
    import hashlib
    import hmac

    return hmac.new(key, blob, hashlib.sha256).digest()


def _same(a: bytes, b: bytes) -> bool:
    import hmac

    return hmac.compare_digest(a, b)


def _exit_mac(kernel_id: bytes, stamp: bytes, key: bytes) -> bytes:
    return _hmac_sha256(key, EXIT_MAGIC + kernel_id + stamp)


def exit_notice(kernel_id: str, key: bytes, now: float | None = None) -> bytes:
    """A framed notice that a kernel's process exited, signed with the launcher's control key.

    It only makes the operator check the backend at once instead of at its next poll; the
    signature (and its time, within CONTROL_MAX_AGE) keeps anyone else from making it do so.
    """
    kid = canonical_kernel_id(kernel_id).encode("ascii")
    stamp = struct.pack(">d", time.time() if now is None else now)
    message = EXIT_MAGIC + kid + stamp + _exit_mac(kid, stamp, key)
    return struct.pack(">I", len(message)) + message


def read_exit_notice(message: bytes) -> str | None:
    """The kernel id an exit notice claims (not yet verified), or None if it is not one."""
    if not message.startswith(EXIT_MAGIC) or len(message) != EXIT_LEN:
        return None
    try:
        claimed = message[len(EXIT_MAGIC) : len(EXIT_MAGIC) + KERNEL_ID_LEN].decode("ascii")
        return claimed if canonical_kernel_id(claimed) == claimed else None
    except (UnicodeDecodeError, ProtocolError):
        return None


def verify_exit_notice(message: bytes, key: bytes, now: float | None = None) -> None:
    """Check an exit notice's signature and age; ProtocolError if it is forged or stale."""
    offset = len(EXIT_MAGIC) + KERNEL_ID_LEN
    kid, stamp, mac = message[len(EXIT_MAGIC) : offset], message[offset : offset + 8], message[offset + 8 :]
    if not _same(_exit_mac(kid, stamp, key), mac):
        raise ProtocolError("The exit notice's signature does not match.")
    (sent,) = struct.unpack(">d", stamp)
    if abs((time.time() if now is None else now) - sent) > CONTROL_MAX_AGE:
        raise ProtocolError("The exit notice is too old or from the future.")


# -- control requests -----------------------------------------------------------------------


def sign_control(request: dict[str, Any], key: bytes, now: float | None = None) -> bytes:
    """A signed control request (one JSON line) for a launcher's control port."""
    body = dict(request, ts=time.time() if now is None else now, nonce=os.urandom(16).hex())
    blob = json.dumps(body, sort_keys=True).encode("utf-8")
    mac = _hmac_sha256(key, blob).hex()
    return json.dumps({"body": body, "mac": mac}).encode("utf-8") + b"\n"


def verify_control(
    line: bytes, key: bytes, seen_nonces: dict[str, float], now: float | None = None
) -> dict[str, Any]:
    """Check a signed control request and return its body; ProtocolError if it is not valid.

    ``seen_nonces`` maps nonces already accepted to their timestamps (replay protection); ones
    older than CONTROL_MAX_AGE are dropped, since their requests are refused as too old anyway.
    """
    try:
        outer = json.loads(line)
        body, mac = outer["body"], outer["mac"]
    except (ValueError, KeyError, TypeError) as err:
        raise ProtocolError("The control request is not a signed JSON object.") from err
    if not isinstance(body, dict) or not isinstance(mac, str):
        raise ProtocolError("The control request is not a signed JSON object.")
    blob = json.dumps(body, sort_keys=True).encode("utf-8")
    if not _same(_hmac_sha256(key, blob).hex().encode(), mac.encode("utf-8", "replace")):
        raise ProtocolError("The control request's signature does not match.")
    ts, nonce = body.get("ts"), body.get("nonce")
    current = time.time() if now is None else now
    if not isinstance(ts, (int, float)) or abs(current - ts) > CONTROL_MAX_AGE:
        raise ProtocolError("The control request is too old or from the future.")
    if not isinstance(nonce, str) or nonce in seen_nonces:
        raise ProtocolError("The control request was replayed.")
    for old in [n for n, seen in seen_nonces.items() if abs(current - seen) > CONTROL_MAX_AGE]:
        del seen_nonces[old]
    seen_nonces[nonce] = float(ts)
    return body
