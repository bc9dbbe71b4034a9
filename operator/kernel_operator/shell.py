"""A silent execute on a kernel's shell channel, from the operator (late binding of a claimed
pooled kernel). The only place the operator speaks Jupyter's request protocol; an I/O edge.

It signs with the kernel's key (and uses its CurveZMQ keys when it has them), sends one
``execute_request`` with ``silent`` and no history, and waits for the matching reply.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import uuid
from typing import Any

import zmq
import zmq.asyncio

from .errors import BackendError

DELIMITER = b"<IDS|MSG>"
_context: zmq.asyncio.Context | None = None


class ExecuteFailed(BackendError):
    """The kernel did not run the cell, or said it failed."""


def _ctx() -> zmq.asyncio.Context:
    global _context
    if _context is None:
        _context = zmq.asyncio.Context()
    return _context


def _sign(key: bytes, parts: list[bytes]) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.hexdigest().encode()


def execute_frames(key: bytes, session: str, msg_id: str, code: str) -> list[bytes]:
    """The frames of a signed, silent ``execute_request``. Pure."""
    header = {
        "msg_id": msg_id,
        "session": session,
        "username": "kernel-operator",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "msg_type": "execute_request",
        "version": "5.3",
    }
    content = {
        "code": code,
        "silent": True,
        "store_history": False,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": False,
    }
    parts = [json.dumps(p).encode() for p in (header, {}, {}, content)]
    return [DELIMITER, _sign(key, parts), *parts]


def parse_reply(frames: list[bytes], key: bytes, msg_id: str) -> dict[str, Any] | None:
    """The content of the reply to ``msg_id`` if ``frames`` is it, correctly signed. Pure."""
    try:
        at = frames.index(DELIMITER)
    except ValueError:
        return None
    parts = frames[at + 1 : at + 6]
    if len(parts) < 5 or not hmac.compare_digest(_sign(key, parts[1:5]), parts[0]):
        return None
    try:
        parent = json.loads(parts[2])
        content = json.loads(parts[4])
    except ValueError:
        return None
    if not isinstance(parent, dict) or parent.get("msg_id") != msg_id or not isinstance(content, dict):
        return None
    return content


async def execute_silently(
    ip: str,
    port: int,
    key: bytes,
    code: str,
    timeout: float,
    curve_public: bytes | None = None,
    curve_secret: bytes | None = None,
) -> dict[str, Any]:
    """Run ``code`` silently in the kernel at ``ip:port``; its ``execute_reply`` content."""
    sock = _ctx().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve_public and curve_secret:
        # The client side of CurveZMQ with the kernel's own pair, as jupyter_client does.
        sock.curve_serverkey = curve_public
        sock.curve_publickey = curve_public
        sock.curve_secretkey = curve_secret
    msg_id = uuid.uuid4().hex
    try:
        sock.connect(f"tcp://{ip}:{port}")
        await sock.send_multipart(execute_frames(key, uuid.uuid4().hex, msg_id, code))
        async with asyncio.timeout(timeout):
            while True:
                content = parse_reply(list(await sock.recv_multipart()), key, msg_id)
                if content is not None:
                    break
    except TimeoutError as err:
        raise ExecuteFailed(f"The kernel at {ip}:{port} did not answer within {timeout:g} s.") from err
    except zmq.ZMQError as err:
        raise ExecuteFailed(f"The kernel at {ip}:{port} could not be reached: {err}") from err
    finally:
        sock.close(0)
    if content.get("status") != "ok":
        raise ExecuteFailed(
            f"The kernel refused the binding cell: {content.get('ename', '')} {content.get('evalue', '')}".strip()
        )
    return content
