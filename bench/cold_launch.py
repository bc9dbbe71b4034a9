"""``make bench``: one cold launch through our provisioner against a direct local launch, paired.

The goal (issue 17) is a ratio of two p50s, each a few hundred milliseconds, on a machine whose
speed drifts by more than the difference over minutes (a shared VM): measured one row after the
other, the same code gave 1.08x to 1.30x. Here each run is a pair, direct then ours (the order
alternating), in one process, so both rows see the same machine. Both are measured as
bench/measure.py measures every row (start_kernel -> first execute_reply of ``1+1``, after
``wait_for_ready``), with the ssh backend on localhost, the operator run as ``make demo`` runs it.

Prints p50 and p95 of each row, the ratio of the p50s, and the median of the pairs' ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from kubernetes import config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))
from localcluster import LocalCluster, free_port
from localcluster.cluster import REPO_ROOT
from localcluster.crds import install_crds
from localcluster.servers import OperatorProcess

sys.path.insert(0, str(REPO_ROOT))
from measure import one  # bench/measure.py: every launch row is timed the same way
from tests.profiles import ensure_profile

WORK = REPO_ROOT / ".cache" / "bench-cold"
NAMESPACE = "default"
PROFILE = "bench-cold"
OURS = "remote-cold"
DIRECT = "python3"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(q * len(ordered) + 0.999999) - 1)]


def kernelspec(root: Path, kubeconfig: Path) -> None:
    spec_dir = root / "kernels" / OURS
    spec_dir.mkdir(parents=True)
    provisioner = {"namespace": NAMESPACE, "kubeconfig": str(kubeconfig), "profile": PROFILE, "use_pool": False}
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["python", "-m", "kernel_launchers.python_launcher"],
                "display_name": OURS,
                "language": "python",
                "metadata": {"kernel_provisioner": {"provisioner_name": "remote-kernel", "config": provisioner}},
            }
        )
    )


async def pairs(runs: int, env: dict[str, str]) -> tuple[list[float], list[float]]:
    direct: list[float] = []
    ours: list[float] = []
    await one(DIRECT, env)  # warm-ups: the first launch of each loads its modules into caches
    await one(OURS, env)
    for i in range(runs):
        order = (DIRECT, OURS) if i % 2 == 0 else (OURS, DIRECT)
        took = {name: (await one(name, env))[0] for name in order}
        direct.append(took[DIRECT])
        ours.append(took[OURS])
        print(
            f"  pair {i + 1}: direct {took[DIRECT]:.3f} s, ours {took[OURS]:.3f} s "
            f"({took[OURS] / took[DIRECT]:.2f}x)",
            file=sys.stderr,
            flush=True,
        )
    return direct, ours


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=int(os.environ.get("RKO_BENCH_RUNS", "20")))
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(WORK / "cluster")
    cluster.start()
    operator = None
    try:
        api = config.new_client_from_config(config_file=str(cluster.admin_kubeconfig))
        install_crds(api)
        ensure_profile(api, {"backend": "ssh", "ssh": {"hosts": ["localhost"]}}, name=PROFILE)
        operator = OperatorProcess(
            kubeconfig=cluster.admin_kubeconfig,
            log_path=WORK / "operator.log",
            env={
                "RKO_RESPONSE_BIND": f"127.0.0.1:{free_port()}",
                "RKO_SSH_LOCAL_HOSTS": "localhost",
                "RKO_SSH_HOSTS": "localhost",
                "RKO_NAMESPACE": NAMESPACE,
            },
        )
        operator.start()
        root = Path(tempfile.mkdtemp(prefix="rko-bench-cold-"))
        kernelspec(root, cluster.admin_kubeconfig)
        env = {**os.environ, "JUPYTER_PATH": str(root), "KERNEL_USERNAME": "bench"}
        os.environ["JUPYTER_PATH"] = str(root)
        direct, ours = asyncio.run(pairs(args.runs, env))
    finally:
        if operator is not None:
            operator.stop()
        cluster.stop()
    ratios = [o / d for d, o in zip(direct, ours, strict=True)]
    print()
    print(f"One cold launch, {args.runs} pairs (direct and ours in turn), start_kernel -> first reply, seconds")
    print("| row | p50 | p95 |")
    print("| --- | ---: | ---: |")
    print(f"| jupyter_client direct local launch | {statistics.median(direct):.3f} | {pct(direct, 0.95):.3f} |")
    print(f"| our provisioner, ssh backend, localhost | {statistics.median(ours):.3f} | {pct(ours, 0.95):.3f} |")
    print(
        f"\nours vs direct: {statistics.median(ours) / statistics.median(direct):.2f}x (p50s), "
        f"median of the pairs' ratios {statistics.median(ratios):.2f}x (goal 1.15x)"
    )


if __name__ == "__main__":
    main()
