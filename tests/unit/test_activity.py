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


def test_one_hub_follows_eleven_hundred_kernels() -> None:
    """ZeroMQ's default of 1,023 sockets per context stopped activity tracking at the 342nd
    kernel ("Too many open files") and culling with it; one hub thread follows them all."""
    import time

    import zmq

    from kernel_operator.activity import ActivityHub, IopubWatcher, raise_open_file_limit

    count = 1100
    soft, _ = raise_open_file_limit()
    assert soft >= 8 * count, f"this test needs {8 * count} descriptors; the limit is {soft}"
    kernels = zmq.Context()
    kernels.set(zmq.MAX_SOCKETS, 4 * count)
    hub = ActivityHub()
    pubs, watchers = [], []
    try:
        for i in range(count):
            pub = kernels.socket(zmq.PUB)
            pub.linger = 0
            port = pub.bind_to_random_port("tcp://127.0.0.1")
            pubs.append(pub)
            watcher = IopubWatcher(f"tcp://127.0.0.1:{port}", b"k%d" % i, hub=hub)
            watcher.start()
            watchers.append(watcher)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(w.connected_since for w in watchers):
            time.sleep(0.1)
        assert all(w.connected_since for w in watchers), sum(1 for w in watchers if w.connected_since)
        assert not any(w.error for w in watchers)
        busy = frames("status", {"execution_state": "busy"})
        while time.monotonic() < deadline and not all(w.busy for w in watchers):
            for i, pub in enumerate(pubs):
                if not watchers[i].busy:
                    pub.send_multipart(frames("status", {"execution_state": "busy"}, key=b"k%d" % i))
            time.sleep(0.2)
        assert all(w.busy for w in watchers), sum(1 for w in watchers if w.busy)
        # A message signed with another kernel's key counts for nothing.
        before = watchers[0].last_activity
        pubs[0].send_multipart(busy)
        time.sleep(0.3)
        assert watchers[0].last_activity == before
        assert hub.watching == count
    finally:
        hub.close()
        for pub in pubs:
            pub.close(0)
        kernels.term()
