"""A kernel's connection secrets sealed to the public key of the client that asked for it.

The provisioner names an X25519 public key of its own process in ``spec.clientPublicKey``; when
the kernel turns Running, the operator puts the kernel's Secret data (the HMAC key, and the
Curve keys with CurveZMQ) in ``status.connection.sealed``, sealed to that key. The process that
holds the private key opens it and needs no read of the Secret on its launch's path; anyone
else who can read the RemoteKernel sees ciphertext. The Secret stays the record (a restarted
Jupyter server, another client, the operator itself read it).

    sealed = base64(ephemeral_public(32) || nonce(12) || ChaCha20-Poly1305(JSON data))
    key    = HKDF-SHA256(X25519(ephemeral, client), salt=ephemeral_public || client_public, INFO)
    aad    = INFO || RemoteKernel uid

The associated data binds it to one RemoteKernel: copied into another object's status, it does
not open. Here, in the package both the operator and the provisioner install. Pure, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping

KEY_LEN = 32
NONCE_LEN = 12
INFO = b"remote-kernel-operator connection v1"
# What a client needs of a kernel's Secret; never the operator's sealed control key.
FIELDS = ("key", "curve-publickey", "curve-secretkey")
MAX_SEALED = 4096  # characters: the fields above, sealed, are a few hundred


class SealError(ValueError):
    """A client key or a sealed connection that cannot be used; the message says which."""


def parse_public_key(text: object) -> bytes:
    """The raw bytes of ``spec.clientPublicKey`` (standard base64 of 32 bytes), refusing a key
    no agreement can be made with (a low-order point gives an all-zero secret)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    if not isinstance(text, str):
        raise SealError("spec.clientPublicKey must be a string (base64 of a 32-byte X25519 public key).")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as err:
        raise SealError("spec.clientPublicKey is not base64 text.") from err
    if len(raw) != KEY_LEN:
        raise SealError(f"spec.clientPublicKey must be {KEY_LEN} bytes (base64), not {len(raw)}.")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError as err:
        raise SealError(
            "spec.clientPublicKey is not a usable X25519 public key (a low-order point)."
        ) from err
    return raw


def encode_public_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _aead_key(shared: bytes, ephemeral_public: bytes, client_public: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=ephemeral_public + client_public, info=INFO
    ).derive(shared)


def seal(data: Mapping[str, bytes], client_public: bytes, uid: str) -> str:
    """Seal the client's fields of a kernel's Secret data to ``client_public``, for RemoteKernel
    ``uid``. Raises SealError for a key no agreement can be made with."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    plain = {name: base64.b64encode(data[name]).decode("ascii") for name in FIELDS if name in data}
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(client_public))
    except ValueError as err:
        raise SealError("The client's public key is not a usable X25519 public key.") from err
    nonce = os.urandom(NONCE_LEN)
    sealed = ChaCha20Poly1305(_aead_key(shared, ephemeral_public, client_public)).encrypt(
        nonce, json.dumps(plain).encode("utf-8"), INFO + uid.encode("utf-8")
    )
    return base64.b64encode(ephemeral_public + nonce + sealed).decode("ascii")


def open_sealed(sealed: str, client_private: bytes, uid: str) -> dict[str, str]:
    """The sealed fields for RemoteKernel ``uid``, base64-encoded as a Secret's data is read
    from the API. Raises SealError if it is malformed, altered, or for another key or object."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    if not isinstance(sealed, str) or len(sealed) > MAX_SEALED:
        raise SealError("status.connection.sealed is not a sealed connection.")
    try:
        blob = base64.b64decode(sealed.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as err:
        raise SealError("status.connection.sealed is not base64 text.") from err
    if len(blob) < KEY_LEN + NONCE_LEN + 16:
        raise SealError("status.connection.sealed is too short.")
    ephemeral_public, nonce, body = (
        blob[:KEY_LEN],
        blob[KEY_LEN : KEY_LEN + NONCE_LEN],
        blob[KEY_LEN + NONCE_LEN :],
    )
    private = X25519PrivateKey.from_private_bytes(client_private)
    client_public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
        plain = ChaCha20Poly1305(_aead_key(shared, ephemeral_public, client_public)).decrypt(
            nonce, body, INFO + uid.encode("utf-8")
        )
        data = json.loads(plain)
    except (InvalidTag, ValueError) as err:
        raise SealError(
            "status.connection.sealed does not open with this client's key for this RemoteKernel."
        ) from err
    if not isinstance(data, dict) or "key" not in data or not set(data) <= set(FIELDS):
        raise SealError("status.connection.sealed holds no connection key.")
    if not all(isinstance(value, str) for value in data.values()):
        raise SealError("status.connection.sealed holds a value that is not text.")
    return dict(data)
