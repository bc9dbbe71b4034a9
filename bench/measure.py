"""Times kernel launches through jupyter_client, in whatever environment runs this file.

For each run: start_kernel -> first execute_reply of ``1+1`` (the launch latency), then
shutdown_kernel (the shutdown time). Prints one JSON object: {"launch": [...], "shutdown": [...]}.
Runs in the project's venv (direct local launch, our provisioner) and in a separate venv with
gateway_provisioners, so every row of the table is measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time


async def one(kernel_name: str, env: dict[str, str], wait_for_ready: bool = True) -> tuple[float, float]:
    """(launch, shutdown) seconds. ``wait_for_ready``: as Jupyter's clients do (it ends by
    draining iopub for 0.2 s, a fixed cost in every row); else ``1+1`` is sent at once."""
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name=kernel_name)
    started = time.perf_counter()
    await km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    try:
        if wait_for_ready:
            await kc.wait_for_ready(timeout=120)
            reply = await kc.execute_interactive("1+1", timeout=60, output_hook=lambda m: None)
        else:
            msg_id = kc.execute("1+1")
            reply = await kc.get_shell_msg(timeout=120)
            while reply["parent_header"].get("msg_id") != msg_id:
                reply = await kc.get_shell_msg(timeout=120)
        launch = time.perf_counter() - started
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"execute failed: {reply['content']}")
    finally:
        kc.stop_channels()
    started = time.perf_counter()
    await km.shutdown_kernel()
    return launch, time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    env = {**os.environ, "KERNEL_USERNAME": os.environ.get("KERNEL_USERNAME", "bench")}
    launches, shutdowns = [], []
    for i in range(args.warmup + args.runs):
        launch, shutdown = await one(args.kernel, env)
        if i >= args.warmup:
            launches.append(launch)
            shutdowns.append(shutdown)
        label = "warm-up" if i < args.warmup else f"run {i + 1 - args.warmup}"
        print(
            f"  {args.kernel}: {label}: launch {launch:.3f} s, shutdown {shutdown:.3f} s",
            file=sys.stderr,
            flush=True,
        )
    print(json.dumps({"launch": launches, "shutdown": shutdowns}))


if __name__ == "__main__":
    asyncio.run(main())
