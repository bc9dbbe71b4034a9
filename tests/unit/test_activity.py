"""Reading a kernel's iopub for activity: signatures, busy/idle, and the culling rule."""

from __future__ import annotations

import hashlib
import hmac
import json

from kernel_operator.activity import DELIMITER, is_idle, parse_iopub


def frames(msg_type: str, content: dict, key: bytes = b"k", sign_with: bytes | None = None) -> list[bytes]:  # type: ignore[type-arg]
    header = json.dumps({"msg_type": msg_type, "msg_id": "1"}).encode()
    parts = [header, b"{}", b"{}", json.dumps(content).encode()]
    mac = hmac.new(sign_with if sign_with is not None else key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return [b"topic", DELIMITER, mac.hexdigest().encode(), *parts]


def test_signed_status_messages_give_the_execution_state() -> None:
    msg = parse_iopub(frames("status", {"execution_state": "busy"}), b"k")
    assert msg is not None and msg.msg_type == "status" and msg.execution_state == "busy"
    stream = parse_iopub(frames("stream", {"name": "stdout", "text": "hi"}), b"k")
    assert stream is not None and stream.execution_state is None


def test_forged_and_malformed_messages_are_ignored() -> None:
    assert parse_iopub(frames("status", {"execution_state": "idle"}, sign_with=b"other"), b"k") is None
    assert parse_iopub([b"no delimiter"], b"k") is None
    assert parse_iopub([DELIMITER, b"sig", b"{}"], b"k") is None  # too few frames
    broken = frames("status", {})
    broken[3] = b"not json"
    assert parse_iopub(broken, b"") is None  # unsigned session, but no header


def test_a_kernel_is_idle_only_when_silent_not_busy_and_heard() -> None:
    assert is_idle(now=100, last_activity=80, busy=False, connected_since=10, idle_timeout=20)
    assert not is_idle(now=100, last_activity=81, busy=False, connected_since=10, idle_timeout=20)
    assert not is_idle(now=100, last_activity=0, busy=True, connected_since=10, idle_timeout=20)
    assert not is_idle(now=100, last_activity=0, busy=False, connected_since=None, idle_timeout=20)
    # Silence is counted from when we could hear it.
    assert not is_idle(now=100, last_activity=0, busy=False, connected_since=90, idle_timeout=20)
    assert not is_idle(now=100, last_activity=0, busy=False, connected_since=10, idle_timeout=0)
