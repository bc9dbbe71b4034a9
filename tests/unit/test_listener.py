"""The response listener on a loopback socket: accepts exactly one good launch per token."""

from __future__ import annotations

import asyncio
import struct
import time
import uuid

import pytest

from kernel_launchers import protocol
from kernel_launchers.protocol import LaunchPayload
from kernel_operator.listener import ResponseListener

KEY = b"k" * 32  # a launcher's control key


def payload(kernel_id: str, token: str) -> LaunchPayload:
    return {
        "kernel_id": kernel_id,
        "token": token,
        "connection": {
            "ip": "127.0.0.1",
            "transport": "tcp",
            "signature_scheme": "hmac-sha256",
            "key": "k",
            "shell_port": 1,
            "iopub_port": 2,
            "stdin_port": 3,
            "control_port": 4,
            "hb_port": 5,
        },
        "pid": 1,
        "pgid": 1,
        "hostname": "h",
        "control_port": 6,
        "control_key": protocol.encode_key(b"c" * 32),
        "sent_at": time.time(),
    }


async def send(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(16), 5)
    writer.close()
    return reply


@pytest.fixture
async def listener() -> ResponseListener:
    private = protocol.new_private_key()
    server = ResponseListener(private)
    await server.start("127.0.0.1", 0)
    yield server  # type: ignore[misc]
    await server.stop()


def port_of(server: ResponseListener) -> int:
    assert server._server is not None
    return int(server._server.sockets[0].getsockname()[1])


async def test_one_good_launch_is_accepted_and_its_replay_is_not(listener: ResponseListener) -> None:
    kernel_id, token = str(uuid.uuid4()), protocol.new_token()
    got: list[LaunchPayload] = []

    async def on_launch(p: LaunchPayload) -> None:
        got.append(p)

    listener.expect(kernel_id, protocol.token_hash(token), on_launch)
    frame = protocol.seal_launch_payload(
        payload(kernel_id, token), protocol.public_key_of(listener._private_key)
    )
    assert await send(port_of(listener), frame) == b"OK\n"
    assert [p["kernel_id"] for p in got] == [kernel_id]
    # Sent again (the launcher's acknowledgement was lost): acknowledged, and nothing happens.
    assert await send(port_of(listener), frame) == b"OK\n"
    assert [p["kernel_id"] for p in got] == [kernel_id]
    assert (listener.accepted, listener.repeated, listener.rejected) == (1, 1, 0)
    # Another token for the same launch is not a repeat: refused.
    other = protocol.seal_launch_payload(
        payload(kernel_id, protocol.new_token()), protocol.public_key_of(listener._private_key)
    )
    assert await send(port_of(listener), other) == b""
    assert (listener.accepted, listener.rejected) == (1, 1)


async def test_a_launch_accepted_before_a_restart_is_acknowledged_again(
    listener: ResponseListener,
) -> None:
    """A restarted operator knows accepted launches from status (launch.tokenHash): a launcher
    still waiting for its lost acknowledgement gets it, and its kernel keeps running."""
    kernel_id, token = str(uuid.uuid4()), protocol.new_token()
    frame = protocol.seal_launch_payload(
        payload(kernel_id, token), protocol.public_key_of(listener._private_key)
    )
    assert await send(port_of(listener), frame) == b""  # nothing known: refused
    listener.answered(kernel_id, protocol.token_hash(token))
    assert await send(port_of(listener), frame) == b"OK\n"
    listener.forget_answered(kernel_id)
    assert await send(port_of(listener), frame) == b""
    assert (listener.accepted, listener.repeated, listener.rejected) == (0, 1, 2)


async def test_a_wrong_token_is_refused_for_good_and_the_launch_stays_pending(
    listener: ResponseListener,
) -> None:
    kernel_id, token = str(uuid.uuid4()), protocol.new_token()
    got: list[LaunchPayload] = []

    async def on_launch(p: LaunchPayload) -> None:
        got.append(p)

    listener.expect(kernel_id, protocol.token_hash(token), on_launch)
    public = protocol.public_key_of(listener._private_key)
    # Final: only the current launch's token is awaited here; the launcher stops its kernel.
    assert (
        await send(port_of(listener), protocol.seal_launch_payload(payload(kernel_id, "forged"), public))
        == b"NO bad_token\n"
    )
    assert (
        await send(port_of(listener), protocol.seal_launch_payload(payload(kernel_id, token), public))
        == b"OK\n"
    )
    assert len(got) == 1


async def test_a_failed_persist_lets_the_launcher_retry(listener: ResponseListener) -> None:
    kernel_id, token = str(uuid.uuid4()), protocol.new_token()
    calls = 0

    async def on_launch(p: LaunchPayload) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the API server is down")

    listener.expect(kernel_id, protocol.token_hash(token), on_launch)
    frame = protocol.seal_launch_payload(
        payload(kernel_id, token), protocol.public_key_of(listener._private_key)
    )
    assert await send(port_of(listener), frame) == b""
    assert await send(port_of(listener), frame) == b"OK\n"
    assert calls == 2


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00\x00\x00",
        struct.pack(">I", 10**9),
        struct.pack(">I", 20) + b"x" * 20,
        b"hello world, not a frame at all",
    ],
)
async def test_garbage_is_rejected_and_the_listener_keeps_serving(
    listener: ResponseListener, garbage: bytes
) -> None:
    assert await send(port_of(listener), garbage) == b""
    kernel_id, token = str(uuid.uuid4()), protocol.new_token()

    async def on_launch(p: LaunchPayload) -> None:
        return None

    listener.expect(kernel_id, protocol.token_hash(token), on_launch)
    frame = protocol.seal_launch_payload(
        payload(kernel_id, token), protocol.public_key_of(listener._private_key)
    )
    assert await send(port_of(listener), frame) == b"OK\n"


async def test_a_slow_sender_is_cut_off(listener: ResponseListener, monkeypatch: pytest.MonkeyPatch) -> None:
    import kernel_operator.listener as module

    monkeypatch.setattr(module, "READ_DEADLINE", 0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(listener))
    writer.write(b"\x00\x00")  # half a length prefix, then silence
    await writer.drain()
    assert await asyncio.wait_for(reader.read(16), 5) == b""
    writer.close()
    assert listener.rejected == 1


async def test_a_trickling_sender_is_cut_off_by_the_whole_frame_deadline(
    listener: ResponseListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kernel_operator.listener as module

    monkeypatch.setattr(module, "READ_DEADLINE", 0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(listener))
    frame = protocol.seal_launch_payload(payload(str(uuid.uuid4()), "t"), protocol.new_private_key()[:32])
    started = time.monotonic()
    closed = False
    for byte in frame[:40]:  # one byte every 0.1 s: each read is quick, the whole is not
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        if reader.at_eof():
            closed = True
            break
        await asyncio.sleep(0.1)
    assert closed or await asyncio.wait_for(reader.read(16), 2) == b""
    assert time.monotonic() - started < 3
    writer.close()
    assert listener.rejected == 1


async def test_connections_beyond_the_cap_are_closed_unread_and_the_rest_still_served() -> None:
    server = ResponseListener(protocol.new_private_key(), max_connections=5)
    await server.start("127.0.0.1", 0)
    try:
        held = [await asyncio.open_connection("127.0.0.1", port_of(server)) for _ in range(5)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        assert await asyncio.wait_for(reader.read(16), 2) == b""  # closed at once
        writer.close()
        assert server.refused_busy >= 1 and server.active == 5
        for _, held_writer in held:
            held_writer.close()
        await asyncio.sleep(0.2)
        assert server.active == 0
    finally:
        await server.stop()


async def test_an_unsigned_or_forged_exit_notice_wakes_nobody(listener: ResponseListener) -> None:
    kernel_id = str(uuid.uuid4())
    woken: list[str] = []
    listener.watch_exit(kernel_id, KEY, lambda: woken.append(kernel_id))
    assert await send(port_of(listener), protocol.exit_notice(kernel_id, b"x" * 32)) == b""
    stale = protocol.exit_notice(kernel_id, KEY, now=time.time() - 3600)
    assert await send(port_of(listener), stale) == b""
    assert woken == [] and listener.rejected == 2


async def test_an_exit_notice_wakes_its_watcher_and_only_its_watcher(listener: ResponseListener) -> None:
    kernel_id = str(uuid.uuid4())
    woken: list[str] = []
    listener.watch_exit(kernel_id, KEY, lambda: woken.append(kernel_id))
    assert await send(port_of(listener), protocol.exit_notice(kernel_id, KEY)) == b"OK\n"
    assert woken == [kernel_id]
    assert await send(port_of(listener), protocol.exit_notice(str(uuid.uuid4()), KEY)) == b"OK\n"  # harmless
    listener.unwatch_exit(kernel_id)
    assert await send(port_of(listener), protocol.exit_notice(kernel_id, KEY)) == b"OK\n"
    assert woken == [kernel_id]  # only the watched kernel, only while watched


async def test_two_kernels_sharing_a_kernel_id_answer_only_for_their_own_launch(
    listener: ResponseListener,
) -> None:
    """Launches are keyed by launch id (a RemoteKernel's uid), not by the kernel id: a second
    launch with the same kernel id cannot take, or overwrite, the first's pending token."""
    kernel_id = str(uuid.uuid4())
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    got: dict[str, list[LaunchPayload]] = {first: [], second: []}
    tokens = {first: protocol.new_token(), second: protocol.new_token()}

    for launch_id in (first, second):

        async def on_launch(p: LaunchPayload, launch_id: str = launch_id) -> None:
            got[launch_id].append(p)

        listener.expect(launch_id, protocol.token_hash(tokens[launch_id]), on_launch)
    public = protocol.public_key_of(listener._private_key)
    # The second launcher's token presented for the first launch: refused, nothing consumed.
    forged = protocol.seal_launch_payload({**payload(kernel_id, tokens[second]), "launch_id": first}, public)
    assert await send(port_of(listener), forged) == b"NO bad_token\n"  # said to the sender only
    for launch_id in (first, second):
        frame = protocol.seal_launch_payload(
            {**payload(kernel_id, tokens[launch_id]), "launch_id": launch_id}, public
        )
        assert await send(port_of(listener), frame) == b"OK\n"
    assert [p["launch_id"] for p in got[first]] == [first]
    assert [p["launch_id"] for p in got[second]] == [second]


async def test_a_second_launcher_with_the_same_token_is_not_acknowledged(listener: ResponseListener) -> None:
    """A launch retried on another host carries the same token: once one launcher is accepted,
    a report from another (another pid) is refused, so that launcher stops its kernel."""
    kernel_id, token = str(uuid.uuid4()), protocol.new_token()
    public = protocol.public_key_of(listener._private_key)

    async def on_launch(p: LaunchPayload) -> None:
        return None

    listener.expect(kernel_id, protocol.token_hash(token), on_launch)
    first = payload(kernel_id, token)
    assert await send(port_of(listener), protocol.seal_launch_payload(first, public)) == b"OK\n"
    stray = {**first, "pid": 4242}
    assert await send(port_of(listener), protocol.seal_launch_payload(stray, public)) == b""  # type: ignore[arg-type]
    assert await send(port_of(listener), protocol.seal_launch_payload(first, public)) == b"OK\n"
    assert (listener.accepted, listener.repeated, listener.rejected) == (1, 1, 1)
