"""``make bench``: warm pools against cold starts and a direct local launch, in one run.

Rows (ssh backend, host localhost: the operator starts launchers on this machine):
- RemoteKernel created -> Running (seen by a watch), claimed from a pool (each claim on a quiet
  machine: after the refill, ``--settle`` seconds) vs a cold start;
- jupyter_client start_kernel -> first execute_reply of ``1+1``: direct local launch (ipykernel's
  own kernelspec), our provisioner cold (use_pool false), our provisioner with a warm pool;
- refill: REFILL kernels claimed at once, and the time until the pool is full again;
- Scala (Apache Toree, Spark local and eager): start_kernel -> first reply of ``1+1``, Toree
  launched directly by jupyter_client vs our provisioner cold vs a warm pool of one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))
from localcluster import LocalCluster
from localcluster.cluster import REPO_ROOT
from localcluster.crds import install_crds
from localcluster.servers import localhost_operator

sys.path.insert(0, str(REPO_ROOT))
from measure import one  # bench/measure.py: every launch row is timed the same way
from tests.profiles import ensure_profile

WORK = REPO_ROOT / ".cache" / "bench-pools"
SERVER_MEASURE = Path(__file__).with_name("jupyter_server_latency.py")
GROUP, VERSION = "kernel-operator.io", "v1alpha1"
NAMESPACE = "default"
PROFILE = "bench-pool"
SCALA_PROFILE = "bench-pool-scala"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def row(name: str, values: list[float]) -> str:
    return (
        f"| {name} | {len(values)} | {statistics.median(values) * 1000:.0f} | "
        f"{pct(values, 0.95) * 1000:.0f} | {pct(values, 0.99) * 1000:.0f} |"
    )


def pool_status(custom: client.CustomObjectsApi, pool: str = "bench") -> dict[str, Any]:
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "remotekernelpools", pool)
    return dict(obj.get("status") or {})


def pool_ready(
    custom: client.CustomObjectsApi, count: int, timeout: float = 120, pool: str = "bench"
) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if pool_status(custom, pool).get("ready") == count:
            return time.monotonic() - started
        time.sleep(0.05)
    raise RuntimeError(f"the pool {pool} did not get {count} ready kernels in {timeout} s")


def create_and_wait_running(custom: client.CustomObjectsApi, use_pool: bool) -> tuple[float, bool]:
    kernel_id = str(uuid.uuid4())
    name = f"k-{kernel_id}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RemoteKernel",
        "metadata": {"name": name},
        "spec": {"kernelId": kernel_id, "username": "bench", "profile": PROFILE, "usePool": use_pool},
    }
    w = watch.Watch()
    started = time.perf_counter()
    created = custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "remotekernels", body)
    pooled = False
    for event in w.stream(
        custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        NAMESPACE,
        "remotekernels",
        field_selector=f"metadata.name={name}",
        resource_version=created["metadata"]["resourceVersion"],
        timeout_seconds=60,
    ):
        status = event["object"].get("status") or {}
        if status.get("phase") in ("Running", "Failed"):
            elapsed = time.perf_counter() - started
            pooled = bool(status.get("pool"))
            if status["phase"] != "Running":
                raise RuntimeError(f"kernel failed: {status}")
            break
    w.stop()
    custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "remotekernels", name)
    return elapsed, pooled


async def first_reply(kernel_name: str, env: dict[str, str], wait_for_ready: bool = True) -> float:
    """start_kernel -> the first execute_reply of ``1+1``, measured as bench/measure.py does."""
    return (await one(kernel_name, env, wait_for_ready))[0]


def kernelspec(
    root: Path, name: str, kubeconfig: Path, use_pool: bool, profile: str = PROFILE, language: str = "python"
) -> None:
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True)
    config_ = {
        "namespace": NAMESPACE,
        "kubeconfig": str(kubeconfig),
        "profile": profile,
        "use_pool": use_pool,
    }
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["python", "-m", "kernel_launchers.python_launcher"],
                "display_name": name,
                "language": language,
                "interrupt_mode": "signal" if language == "scala" else "message",
                "metadata": {"kernel_provisioner": {"provisioner_name": "remote-kernel", "config": config_}},
            }
        )
    )


def scala_rows(custom: client.CustomObjectsApi, root: Path, kubeconfig: Path, runs: int) -> list[str]:
    """Toree launched directly by jupyter_client, through our provisioner cold, and claimed from
    a warm pool of one (refilled between runs): start_kernel -> first reply of ``1+1``."""
    from launch_latency import toree_local_kernelspec  # bench/: the same direct row as there

    ensure_profile(
        custom.api_client,
        {"backend": "ssh", "languages": ["scala"], "ssh": {"hosts": ["localhost"]}},
        name=SCALA_PROFILE,
    )
    toree_local_kernelspec(root)
    kernelspec(root, "remote-scala-cold", kubeconfig, False, SCALA_PROFILE, "scala")
    kernelspec(root, "remote-scala-pooled", kubeconfig, True, SCALA_PROFILE, "scala")
    pool = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RemoteKernelPool",
        "metadata": {"name": "bench-scala"},
        "spec": {"profile": SCALA_PROFILE, "replicas": 1, "maxAgeSeconds": 0,
                 "template": {"kernel": {"language": "scala"}}},
    }  # fmt: skip
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "remotekernelpools", pool)
    env = {**os.environ, "KERNEL_USERNAME": "bench"}
    direct: list[float] = []
    cold: list[float] = []
    pooled: list[float] = []
    try:
        for i in range(runs):
            direct.append(asyncio.run(first_reply("toree_local", env)))
            cold.append(asyncio.run(first_reply("remote-scala-cold", env)))
            refilled = pool_ready(custom, 1, timeout=300, pool="bench-scala")
            pooled.append(asyncio.run(first_reply("remote-scala-pooled", env)))
            print(
                f"  Scala run {i + 1}: direct {direct[-1]:.2f} s, cold {cold[-1]:.2f} s, "
                f"pooled {pooled[-1]:.2f} s (pool ready {refilled:.1f} s after the cold run)",
                file=sys.stderr,
                flush=True,
            )
    finally:
        custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "remotekernelpools", "bench-scala")
    ratio = statistics.median(pooled) / statistics.median(direct)
    return [
        row("Scala: start_kernel -> first reply, Toree direct local launch", direct),
        row("Scala: start_kernel -> first reply, provisioner, cold", cold),
        row("Scala: start_kernel -> first reply, provisioner, warm pool", pooled),
        f"Scala: warm pool vs Toree direct local launch (p50): {ratio:.2f}x",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=int(os.environ.get("RKO_BENCH_RUNS", "20")))
    parser.add_argument("--refill", type=int, default=20)
    parser.add_argument("--scala-runs", type=int, default=3, help="Scala rows' runs (0: none)")
    parser.add_argument("--only-scala", action="store_true", help="measure the Scala rows only")
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds between a refill and the next claim (a quiet machine)",
    )
    parser.add_argument(
        "--server-settle",
        type=float,
        default=2.0,
        help="seconds before each run through Jupyter Server, every row alike (the pool's refill of "
        "the previous claim, ~0.5-1 s of both cores here, is over; its runs follow each other)",
    )
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(WORK / "cluster")
    cluster.start()
    operator = None
    try:
        api = config.new_client_from_config(config_file=str(cluster.admin_kubeconfig))
        install_crds(api)
        custom = client.CustomObjectsApi(api)
        ensure_profile(api, {"backend": "ssh", "ssh": {"hosts": ["localhost"]}}, name=PROFILE)
        operator = localhost_operator(
            cluster.admin_kubeconfig, WORK / "operator.log", RKO_NAMESPACE=NAMESPACE
        )
        operator.start()
        root = Path(tempfile.mkdtemp(prefix="rko-bench-pools-"))
        os.environ["JUPYTER_PATH"] = str(root)
        if args.only_scala:
            print("\n".join(scala_rows(custom, root, cluster.admin_kubeconfig, args.scala_runs)))
            return
        pool = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "RemoteKernelPool",
            "metadata": {"name": "bench"},
            "spec": {"profile": PROFILE, "replicas": args.refill, "maxAgeSeconds": 0},
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "remotekernelpools", pool)
        pool_ready(custom, args.refill)
        claimed: list[float] = []
        cold: list[float] = []
        for _ in range(args.runs):
            elapsed, pooled = create_and_wait_running(custom, use_pool=True)
            assert pooled, "a claim started cold: the pool was empty"
            claimed.append(elapsed)
            pool_ready(custom, args.refill)
            time.sleep(args.settle)  # the refill's launch and the last kernel's stop are done
        for _ in range(max(5, args.runs // 4)):
            cold.append(create_and_wait_running(custom, use_pool=False)[0])
        # Refill: claim a whole pool at once.
        before = int(pool_status(custom).get("claimed") or 0)
        names = []
        for _ in range(args.refill):
            kid = str(uuid.uuid4())
            names.append(f"k-{kid}")
            custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                NAMESPACE,
                "remotekernels",
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "RemoteKernel",
                    "metadata": {"name": f"k-{kid}"},
                    "spec": {"kernelId": kid, "username": "bench", "profile": PROFILE},
                },
            )
        started = time.monotonic()
        while int(pool_status(custom).get("claimed") or 0) < before + args.refill:
            if time.monotonic() - started > 120:
                raise RuntimeError("the claims were not all counted")
            time.sleep(0.05)
        pool_ready(custom, args.refill, timeout=300)
        refill = time.monotonic() - started
        for name in names:
            custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "remotekernels", name)
        # Through jupyter_client: direct, cold through the provisioner, claimed through it.
        kernelspec(root, "remote-cold", cluster.admin_kubeconfig, use_pool=False)
        kernelspec(root, "remote-pooled", cluster.admin_kubeconfig, use_pool=True)
        env = {**os.environ, "KERNEL_USERNAME": "bench"}
        direct, remote_cold, remote_pooled = [], [], []
        direct_now, pooled_now = [], []
        runs = max(5, args.runs // 2)

        def settled(kernel: str, wait_for_ready: bool = True) -> float:
            # Every row alike: the pool full, then --settle seconds (the last kernel's stop and the
            # refill's launch are over), so no launch shares the two cores with them.
            pool_ready(custom, args.refill)
            time.sleep(args.settle)
            return asyncio.run(first_reply(kernel, env, wait_for_ready))

        for _ in range(runs):
            direct.append(settled("python3"))
            remote_cold.append(settled("remote-cold"))
            remote_pooled.append(settled("remote-pooled"))
            direct_now.append(settled("python3", wait_for_ready=False))
            pooled_now.append(settled("remote-pooled", wait_for_ready=False))
        # Through Jupyter Server: REST create -> first execute_reply over its websocket.
        server = subprocess.run(
            [sys.executable, str(SERVER_MEASURE), "--kernel=python3", "--kernel=remote-cold",
             "--kernel=remote-pooled", "--runs", str(runs), "--settle", str(args.server_settle)],
            env=env, check=True, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        through_server = json.loads(server.stdout.strip().splitlines()[-1])
        custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "remotekernelpools", "bench")
        deadline = time.monotonic() + 60  # the Python pool's kernels stopped: a quiet machine
        while (
            time.monotonic() < deadline
            and custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "remotekernels")["items"]
        ):
            time.sleep(0.3)
        scala = scala_rows(custom, root, cluster.admin_kubeconfig, args.scala_runs) if args.scala_runs else []
        print()
        print("| row | runs | p50 ms | p95 ms | p99 ms |")
        print("| --- | --- | --- | --- | --- |")
        print(row("RemoteKernel created -> Running, claimed from a pool", claimed))
        print(row("RemoteKernel created -> Running, cold start (usePool false)", cold))
        print(row("start_kernel -> first reply, direct local launch", direct))
        print(row("start_kernel -> first reply, provisioner, cold", remote_cold))
        print(row("start_kernel -> first reply, provisioner, warm pool", remote_pooled))
        print(row("start_kernel -> execute at once -> reply, direct local launch", direct_now))
        print(row("start_kernel -> execute at once -> reply, provisioner, warm pool", pooled_now))
        print(row("Jupyter Server REST + websocket, local ipykernel", through_server["python3"]))
        print(row("Jupyter Server REST + websocket, provisioner, cold", through_server["remote-cold"]))
        print(row("Jupyter Server REST + websocket, provisioner, warm pool", through_server["remote-pooled"]))
        print(row("Jupyter Server REST create alone, local ipykernel", through_server["python3 create"]))
        print(
            row(
                "Jupyter Server REST create alone, provisioner, warm pool",
                through_server["remote-pooled create"],
            )
        )
        ratio = statistics.median(remote_pooled) / statistics.median(direct)
        print(
            f"\nwarm pool vs direct local launch (p50): {ratio:.2f}x with wait_for_ready, "
            f"{statistics.median(pooled_now) / statistics.median(direct_now):.2f}x executing at once"
        )
        server_ratio = statistics.median(through_server["remote-pooled"]) / statistics.median(
            through_server["python3"]
        )
        print(f"through Jupyter Server, warm pool vs local ipykernel (p50): {server_ratio:.2f}x")
        print(
            f"refill: {args.refill} kernels claimed at once, pool full again after {refill:.1f} s "
            f"({args.refill / refill:.1f} kernels/s)"
        )
        if scala:
            print()
            print("\n".join(scala))
    finally:
        if operator is not None:
            try:
                for pool_name in ("bench", "bench-scala"):
                    try:
                        custom.delete_namespaced_custom_object(
                            GROUP, VERSION, NAMESPACE, "remotekernelpools", pool_name
                        )
                    except client.ApiException as err:
                        if err.status != 404:
                            raise
                deadline = time.monotonic() + 60
                while (
                    time.monotonic() < deadline
                    and custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "remotekernels")[
                        "items"
                    ]
                ):
                    time.sleep(0.3)
            except Exception as err:
                print(f"cleanup: {err}", file=sys.stderr)
            operator.stop()
        cluster.stop()


if __name__ == "__main__":
    main()
