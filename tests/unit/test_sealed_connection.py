"""A kernel's connection sealed to its client's key: opens for that key and that RemoteKernel only."""

from __future__ import annotations

import base64
import json

import pytest

from kernel_launchers import protocol
from kernel_launchers.sealed_connection import (
    FIELDS,
    SealError,
    encode_public_key,
    open_sealed,
    parse_public_key,
    seal,
)

DATA = {
    "key": b"the-hmac-key",
    "curve-publickey": b"p" * 40,
    "curve-secretkey": b"s" * 40,
    "control-key.sealed": b"the operator's own",
}


def pair() -> tuple[bytes, str]:
    private = protocol.new_private_key()
    return private, encode_public_key(protocol.public_key_of(private))


def test_a_sealed_connection_opens_with_its_clients_key_for_its_remote_kernel_only() -> None:
    private, public = pair()
    sealed = seal(DATA, parse_public_key(public), "uid-1")
    opened = open_sealed(sealed, private, "uid-1")
    # What a Secret's data looks like from the API (base64), the client's fields only.
    assert opened == {name: base64.b64encode(DATA[name]).decode() for name in FIELDS}
    assert b"the-hmac-key" not in base64.b64decode(sealed) and "control-key.sealed" not in opened
    with pytest.raises(SealError, match="does not open"):
        open_sealed(sealed, private, "uid-2")  # copied into another RemoteKernel's status
    with pytest.raises(SealError, match="does not open"):
        open_sealed(sealed, pair()[0], "uid-1")  # anyone else's key
    assert seal(DATA, parse_public_key(public), "uid-1") != sealed  # a fresh agreement each time


def test_a_tampered_or_malformed_sealed_connection_does_not_open() -> None:
    private, public = pair()
    blob = bytearray(base64.b64decode(seal(DATA, parse_public_key(public), "uid-1")))
    blob[-1] ^= 1
    with pytest.raises(SealError, match="does not open"):
        open_sealed(base64.b64encode(bytes(blob)).decode(), private, "uid-1")
    with pytest.raises(SealError, match="too short"):
        open_sealed(base64.b64encode(bytes(blob[:40])).decode(), private, "uid-1")
    with pytest.raises(SealError, match="not base64"):
        open_sealed("%%%", private, "uid-1")
    with pytest.raises(SealError, match="not a sealed connection"):
        open_sealed("A" * 5000, private, "uid-1")
    with pytest.raises(SealError, match="not a sealed connection"):
        open_sealed(json.loads("123"), private, "uid-1")  # type: ignore[arg-type]
    with pytest.raises(SealError, match="no connection key"):
        open_sealed(seal({}, parse_public_key(public), "uid-1"), private, "uid-1")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (None, "must be a string"),
        ("", "must be 32 bytes"),
        ("not base64!", "not base64"),
        ("é" * 44, "not base64"),
        (base64.b64encode(b"x" * 31).decode(), r"must be 32 bytes \(base64\), not 31"),
        (base64.b64encode(bytes(32)).decode(), "low-order point"),
        # 1 is a point of order 4 on Curve25519: every agreement with it is all zeros.
        (base64.b64encode((1).to_bytes(32, "little")).decode(), "low-order point"),
    ],
)
def test_a_client_key_no_agreement_can_be_made_with_is_refused(text: object, words: str) -> None:
    with pytest.raises(SealError, match=words):
        parse_public_key(text)
