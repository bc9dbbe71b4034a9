"""Launch latency through Jupyter Server: REST create -> first execute_reply over the websocket.

Runs one ``jupyter server`` on loopback with the kernelspecs of JUPYTER_PATH and, for each
kernel name given, ``--runs`` times: POST /api/kernels, execute ``1+1`` over
/api/kernels/<id>/channels, DELETE. Prints one JSON object {kernel: [seconds, ...],
"<kernel> create": [seconds of the POST alone, ...]}.

The server runs with our server extension on, as the README tells users to run it (its kernel
websockets then send each message at once, for every kernel alike); ``--no-extension`` runs
jupyter_server as it comes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
from tornado.websocket import websocket_connect


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def first_reply(port: int, token: str, kernel_id: str) -> None:
    conn = await websocket_connect(f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels?token={token}")
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "username": "bench",
        "session": uuid.uuid4().hex,
        "msg_type": "execute_request",
        "version": "5.3",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    content = {
        "code": "1+1",
        "silent": False,
        "store_history": False,
        "user_expressions": {},
        "allow_stdin": False,
    }
    conn.write_message(
        json.dumps(
            {
                "header": header,
                "parent_header": {},
                "metadata": {},
                "content": content,
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    try:
        while True:
            raw = await asyncio.wait_for(conn.read_message(), 120)
            if raw is None:
                raise RuntimeError("the websocket closed")
            msg = json.loads(raw)
            if msg["msg_type"] == "execute_reply" and msg["parent_header"].get("msg_id") == msg_id:
                if msg["content"]["status"] != "ok":
                    raise RuntimeError(f"execute failed: {msg['content']}")
                return
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel", action="append", required=True)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds to wait before each run, the same for every kernel: the previous kernel's stop "
        "and a pool's refill are over (else the next launch shares the cores with them)",
    )
    parser.add_argument("--no-extension", action="store_true", help="without our server extension")
    args = parser.parse_args()
    port, token = free_port(), uuid.uuid4().hex
    extension = (
        [] if args.no_extension else ["--ServerApp.jpserver_extensions=remote_kernel_provisioner=True"]
    )
    root = Path(tempfile.mkdtemp(prefix="rko-bench-server-"))
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyter_server", f"--ServerApp.port={port}", "--ServerApp.ip=127.0.0.1",
            "--ServerApp.open_browser=False", f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
            "--allow-root", *extension,
        ],
        stdout=open(root / "server.log", "ab"),  # noqa: SIM115 - handed to the child
        stderr=subprocess.STDOUT,
        env={**os.environ, "KERNEL_USERNAME": os.environ.get("KERNEL_USERNAME", "bench")},
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    headers = {"Authorization": f"token {token}"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{api}/status", headers=headers, timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"jupyter server did not start; see {root / 'server.log'}")
            time.sleep(0.1)
        results: dict[str, list[float]] = {}
        for kernel in args.kernel:
            times, creates = [], []
            for i in range(args.runs + 1):  # the first is a warm-up
                time.sleep(args.settle)
                started = time.perf_counter()
                created = requests.post(f"{api}/kernels", json={"name": kernel}, headers=headers, timeout=180)
                created.raise_for_status()
                create = time.perf_counter() - started
                kernel_id = created.json()["id"]
                asyncio.run(first_reply(port, token, kernel_id))
                elapsed = time.perf_counter() - started
                requests.delete(f"{api}/kernels/{kernel_id}", headers=headers, timeout=180).raise_for_status()
                print(
                    f"  server/{kernel}: {'warm-up' if i == 0 else f'run {i}'}: {elapsed:.3f} s "
                    f"(REST create {create:.3f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                if i:
                    times.append(elapsed)
                    creates.append(create)
            results[kernel] = times
            # The REST create alone: the rest (websocket, the server's kernel_info nudge, the
            # execute) is the server's own and the same for every kernel that is up.
            results[f"{kernel} create"] = creates
        print(json.dumps(results))
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
