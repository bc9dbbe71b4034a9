"""The operator's X25519 key pair, kept in a Secret so restarts and replicas share it.

Also seals small secrets (a launcher's control key) so that only this operator can use them,
even where others can read the Secret they are stored in.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kernel_launchers import protocol

from .errors import OperatorError
from .kube import Kube

PRIVATE_KEY = "private-key"
LABELS = {"app.kubernetes.io/name": "remote-kernel-operator", "app.kubernetes.io/component": "keys"}


class KeyError_(OperatorError):
    """The operator's key Secret is unusable."""


async def load_or_create(kube: Kube, namespace: str, name: str) -> bytes:
    """The private key from Secret ``namespace/name``, creating it on first start.

    Two replicas starting at once both try to create it; the loser reads the winner's key.
    """
    for _ in range(3):
        data = await kube.read_secret(namespace, name)
        if data is not None:
            key = data.get(PRIVATE_KEY, b"")
            if len(key) != protocol.KEY_LEN:
                raise KeyError_(
                    f"Secret {namespace}/{name} has no valid {PRIVATE_KEY!r} (32 bytes); delete it "
                    "to have a new key made (launches in flight will then fail)."
                )
            return key
        if await kube.create_secret(namespace, name, {PRIVATE_KEY: protocol.new_private_key()}, LABELS):
            continue  # read back what was stored, so every replica uses the same bytes
    raise KeyError_(f"Could not create or read the key Secret {namespace}/{name}.")


def fingerprint(public_key: bytes) -> str:
    """A short, loggable identifier of a public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def _seal_key(private_key: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"remote-kernel-operator seal v1"
    ).derive(private_key)


def seal(private_key: bytes, bound_to: str, data: bytes) -> bytes:
    """Encrypt ``data`` for this operator only, bound to ``bound_to`` (a RemoteKernel's uid):
    it opens only for that same value."""
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(_seal_key(private_key)).encrypt(nonce, data, bound_to.encode())


def unseal(private_key: bytes, bound_to: str, sealed: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(_seal_key(private_key)).decrypt(sealed[:12], sealed[12:], bound_to.encode())
    except (InvalidTag, ValueError) as err:
        raise KeyError_(f"A sealed value for {bound_to} does not open with this operator's key.") from err
