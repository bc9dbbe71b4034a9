"""N kernels started at once through jupyter_client, as Jupyter Server does (one process, N
AsyncKernelManagers), in whatever environment runs this file (ours, or gateway_provisioners').

Each kernel: start_kernel -> first execute_reply of ``1+1``, within --timeout; then all are
shut down with shutdown_kernel(now=True). The whole run is bounded by --deadline: a client
whose event loop blocks for good is reported as hung by the caller (this process is killed).
A watchdog thread measures the longest the event loop went without running a tick.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time


async def one(kernel_name: str, env: dict[str, str], timeout: float) -> tuple[object, float | None, str]:
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name=kernel_name)
    started = time.perf_counter()
    try:
        await asyncio.wait_for(km.start_kernel(env=env), timeout)
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=timeout)
            reply = await kc.execute_interactive("1+1", timeout=timeout, output_hook=lambda m: None)
        finally:
            kc.stop_channels()
        if reply["content"]["status"] != "ok":
            return km, None, f"execute: {reply['content'].get('ename')}"
        return km, time.perf_counter() - started, ""
    except Exception as err:
        return km, None, f"{type(err).__name__}: {err}"[:200]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args()
    env = {**os.environ, "KERNEL_USERNAME": os.environ.get("KERNEL_USERNAME", "alice")}
    loop = asyncio.get_running_loop()
    beat = [time.monotonic()]
    worst = [0.0]

    async def heartbeat() -> None:
        while True:
            beat[0] = time.monotonic()
            await asyncio.sleep(0.01)

    def watchdog() -> None:
        while True:
            time.sleep(0.01)
            worst[0] = max(worst[0], time.monotonic() - beat[0])

    threading.Thread(target=watchdog, daemon=True).start()
    ticker = loop.create_task(heartbeat())
    started = time.perf_counter()
    results = await asyncio.gather(*(one(args.kernel, env, args.timeout) for _ in range(args.count)))
    wall = time.perf_counter() - started
    errors = [err for _, latency, err in results if latency is None]
    latencies = sorted(latency for _, latency, _ in results if latency is not None)
    stopped = time.perf_counter()
    await asyncio.gather(
        *(km.shutdown_kernel(now=True) for km, _, _ in results if getattr(km, "has_kernel", False)),  # type: ignore[attr-defined]
        return_exceptions=True,
    )
    shutdown = time.perf_counter() - stopped
    ticker.cancel()
    print(
        json.dumps(
            {
                "count": args.count,
                "ok": len(latencies),
                "failed": len(errors),
                "errors": sorted(set(errors))[:5],
                "wall": wall,
                "p50": latencies[len(latencies) // 2] if latencies else None,
                "max": latencies[-1] if latencies else None,
                "shutdown": shutdown,
                "loop_blocked_max": worst[0],
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
