"""The launcher <-> operator wire protocol: sealing, opening, and every way a message can be bad."""

from __future__ import annotations

import json
import struct
import uuid

import pytest

from kernel_launchers import protocol
from kernel_launchers.protocol import LaunchPayload, ProtocolError


def payload(kernel_id: str | None = None, token: str = "tok") -> LaunchPayload:
    return {
        "kernel_id": kernel_id or str(uuid.uuid4()),
        "token": token,
        "connection": {
            "ip": "127.0.0.1",
            "transport": "tcp",
            "signature_scheme": "hmac-sha256",
            "key": "secret-hmac-key",
            "kernel_name": "",
            "shell_port": 5001,
            "iopub_port": 5002,
            "stdin_port": 5003,
            "control_port": 5004,
            "hb_port": 5005,
        },
        "pid": 123,
        "pgid": 123,
        "hostname": "h",
        "control_port": 5006,
        "control_key": "ck",
        "sent_at": 1.0,
    }


@pytest.fixture
def keys() -> tuple[bytes, bytes]:
    private = protocol.new_private_key()
    return private, protocol.public_key_of(private)


def unframe(frame: bytes) -> bytes:
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    return frame[4:]


def test_a_sealed_payload_opens_with_the_operator_key(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    sent = payload()
    message = unframe(protocol.seal_launch_payload(sent, public))
    assert protocol.peek_kernel_id(message) == sent["kernel_id"]
    assert protocol.open_launch_payload(message, private) == sent
    # The HMAC key never travels in clear text.
    assert b"secret-hmac-key" not in message


def test_every_flipped_byte_is_detected(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    message = unframe(protocol.seal_launch_payload(payload(), public))
    for index in range(len(protocol.MAGIC) + protocol.KERNEL_ID_LEN, len(message), 7):
        altered = bytearray(message)
        altered[index] ^= 0x01
        with pytest.raises(ProtocolError):
            protocol.open_launch_payload(bytes(altered), private)


def test_a_payload_moved_to_another_kernel_is_rejected(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    message = unframe(protocol.seal_launch_payload(payload(), public))
    other = str(uuid.uuid4()).encode()
    moved = message[:4] + other + message[4 + 36 :]
    with pytest.raises(ProtocolError, match="authentication"):
        protocol.open_launch_payload(moved, private)


def test_a_payload_for_another_operator_is_rejected(keys: tuple[bytes, bytes]) -> None:
    _, public = keys
    message = unframe(protocol.seal_launch_payload(payload(), public))
    with pytest.raises(ProtocolError, match="authentication"):
        protocol.open_launch_payload(message, protocol.new_private_key())


@pytest.mark.parametrize(
    "garbage",
    [b"", b"RKO1", b"GET / HTTP/1.1\r\n\r\n", b"RKO1" + b"x" * 200, bytes(range(256))],
)
def test_garbage_and_truncated_messages_are_rejected(keys: tuple[bytes, bytes], garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.open_launch_payload(garbage, keys[0])


def test_a_truncated_message_is_rejected(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    message = unframe(protocol.seal_launch_payload(payload(), public))
    for cut in (10, protocol.HEADER_LEN, len(message) - 1):
        with pytest.raises(ProtocolError):
            protocol.open_launch_payload(message[:cut], private)


def test_a_kernel_id_that_is_no_uuid_cannot_be_sealed(keys: tuple[bytes, bytes]) -> None:
    with pytest.raises(ProtocolError, match="not a kernel id"):
        protocol.seal_launch_payload(payload(kernel_id="../../etc"), keys[1])


def test_keys_encode_and_decode() -> None:
    raw = protocol.new_private_key()
    assert protocol.decode_key(protocol.encode_key(raw)) == raw
    with pytest.raises(ProtocolError, match="32 bytes"):
        protocol.decode_key(protocol.encode_key(b"short"))
    with pytest.raises(ProtocolError):
        protocol.decode_key("not base64 at all!!")


def test_tokens_are_random_and_only_their_hash_is_kept() -> None:
    first, second = protocol.new_token(), protocol.new_token()
    assert first != second and len(first) >= 43
    assert protocol.token_hash(first) != first
    assert protocol.token_hash(first) == protocol.token_hash(first)


def test_signed_control_requests_verify_once() -> None:
    key, seen = b"k" * 32, dict[str, float]()
    line = protocol.sign_control({"request": "signal", "signum": 2}, key, now=1000.0)
    body = protocol.verify_control(line, key, seen, now=1001.0)
    assert body["request"] == "signal" and body["signum"] == 2
    with pytest.raises(ProtocolError, match="replayed"):
        protocol.verify_control(line, key, seen, now=1001.0)


def test_control_requests_with_bad_signature_or_age_are_rejected() -> None:
    key = b"k" * 32
    line = protocol.sign_control({"request": "shutdown"}, key, now=1000.0)
    with pytest.raises(ProtocolError, match="signature"):
        protocol.verify_control(line, b"x" * 32, {}, now=1000.0)
    with pytest.raises(ProtocolError, match="too old"):
        protocol.verify_control(line, key, {}, now=1000.0 + 3600)
    tampered = json.loads(line)
    tampered["body"]["request"] = "signal"
    with pytest.raises(ProtocolError, match="signature"):
        protocol.verify_control(json.dumps(tampered).encode(), key, {}, now=1000.0)
    with pytest.raises(ProtocolError, match="not a signed"):
        protocol.verify_control(b"{not json", key, {})


def test_the_replay_memory_forgets_nonces_once_their_requests_expire() -> None:
    key, seen = b"k" * 32, dict[str, float]()
    protocol.verify_control(protocol.sign_control({"request": "a"}, key, now=1000.0), key, seen, now=1000.0)
    protocol.verify_control(protocol.sign_control({"request": "b"}, key, now=1100.0), key, seen, now=1100.0)
    assert len(seen) == 1


def test_the_frame_carries_the_launch_id_and_a_payload_cannot_claim_another(
    keys: tuple[bytes, bytes],
) -> None:
    private, public = keys
    launch_id = str(uuid.uuid4())
    sealed = protocol.seal_launch_payload({**payload(), "launch_id": launch_id}, public)
    message = sealed[4:]
    assert protocol.peek_kernel_id(message) == launch_id  # the header names the launch
    assert protocol.open_launch_payload(message, private)["launch_id"] == launch_id
    # A header naming another launch than the sealed payload is refused (authenticated data).
    other = str(uuid.uuid4()).encode()
    moved = message[:4] + other + message[4 + 36 :]
    with pytest.raises(protocol.ProtocolError):
        protocol.open_launch_payload(moved, private)
    # Without a launch id (an older launcher) the kernel id is the launch id.
    plain = payload()
    assert protocol.peek_kernel_id(protocol.seal_launch_payload(plain, public)[4:]) == plain["kernel_id"]


KERNEL_ID = "3F2504E0-4F89-41D3-9A0C-0305E82C3301"


@pytest.mark.parametrize(
    "text",
    [
        KERNEL_ID,
        KERNEL_ID.lower(),
        KERNEL_ID.replace("-", ""),
        "{" + KERNEL_ID + "}",
        "urn:uuid:" + KERNEL_ID,
        "3f25-04e0-4f89-41d3-9a0c-0305-e82c-3301",
    ],
)
def test_a_kernel_id_in_any_form_uuid_accepts_has_uuids_canonical_form(text: str) -> None:
    """The launcher checks ids without importing uuid (it starts its kernel first): same answers."""
    assert protocol.canonical_kernel_id(text) == str(uuid.UUID(text))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not-a-uuid",
        KERNEL_ID[:-1],
        KERNEL_ID + "0",
        KERNEL_ID.replace("3301", "33g1"),
        KERNEL_ID.replace("-", "_"),
        "../" + KERNEL_ID[3:],
        KERNEL_ID.replace("-", " "),
    ],
)
def test_a_kernel_id_that_is_no_uuid_is_refused_with_a_clear_error(text: str) -> None:
    with pytest.raises(ProtocolError, match="is not a kernel id"):
        protocol.canonical_kernel_id(text)


def test_a_kernel_id_of_another_type_is_refused() -> None:
    with pytest.raises(ProtocolError, match="is not a kernel id"):
        protocol.canonical_kernel_id(12345)  # type: ignore[arg-type]


def test_a_control_request_with_a_mac_that_is_not_ascii_is_refused_not_a_crash() -> None:
    key = b"k" * 32
    line = json.dumps({"body": {"request": "signal", "signum": 0}, "mac": "é" * 64}).encode() + b"\n"
    with pytest.raises(ProtocolError, match="signature does not match"):
        protocol.verify_control(line, key, {})
