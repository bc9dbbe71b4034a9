"""``make bench``: one cold launch through our provisioner against a direct local launch, paired.

The goal (issue 17) is a ratio of two p50s, each a few hundred milliseconds, on a machine whose
speed drifts by more than the difference over minutes (a shared VM): measured one row after the
other, the same code gave 1.08x to 1.30x. Here each run is a pair, direct then ours (the order
alternating), in one process, so both rows see the same machine. Both are measured as
bench/measure.py measures every row (start_kernel -> first execute_reply of ``1+1``, after
``wait_for_ready``), with the ssh backend on localhost, the operator run as ``make demo`` runs it.

Two environments, each with its own pair of rows:
- the project's venv, an editable install: its import hook (``__editable__..._finder``, loaded
  by ``site``) costs ~20 ms in every Python process, and ours starts two (launcher and kernel);
- the ssh test hosts' environment (``hack/localcluster/hosts.py``), the wheel installed as a
  user's host has it: both the direct kernel and ours run from it.

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
from typing import Any

from kubernetes import config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))
from localcluster import LocalCluster
from localcluster.cluster import REPO_ROOT
from localcluster.crds import install_crds
from localcluster.hosts import build_host_env
from localcluster.servers import localhost_operator

sys.path.insert(0, str(REPO_ROOT))
from measure import one  # bench/measure.py: every launch row is timed the same way
from tests.profiles import ensure_profile

WORK = REPO_ROOT / ".cache" / "bench-cold"
NAMESPACE = "default"
PROFILE = "bench-cold"
INSTALLED_PROFILE = "bench-cold-installed"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(q * len(ordered) + 0.999999) - 1)]


def kernelspec(root: Path, name: str, argv: list[str], provisioner: dict[str, Any] | None = None) -> None:
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True)
    spec: dict[str, Any] = {"argv": argv, "display_name": name, "language": "python"}
    if provisioner is not None:
        spec["metadata"] = {
            "kernel_provisioner": {"provisioner_name": "remote-kernel", "config": provisioner}
        }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def ours(kubeconfig: Path, profile: str) -> dict[str, Any]:
    return {"namespace": NAMESPACE, "kubeconfig": str(kubeconfig), "profile": profile, "use_pool": False}


async def pairs(
    direct_name: str, ours_name: str, runs: int, env: dict[str, str]
) -> tuple[list[float], list[float]]:
    direct: list[float] = []
    ours: list[float] = []
    await one(direct_name, env)  # warm-ups: the first launch of each loads its modules into caches
    await one(ours_name, env)
    for i in range(runs):
        order = (direct_name, ours_name) if i % 2 == 0 else (ours_name, direct_name)
        took = {name: (await one(name, env))[0] for name in order}
        direct.append(took[direct_name])
        ours.append(took[ours_name])
        print(
            f"  {ours_name}, pair {i + 1}: direct {took[direct_name]:.3f} s, ours {took[ours_name]:.3f} s "
            f"({took[ours_name] / took[direct_name]:.2f}x)",
            file=sys.stderr,
            flush=True,
        )
    return direct, ours


def table(title: str, direct: list[float], ours: list[float]) -> list[str]:
    ratios = [o / d for d, o in zip(direct, ours, strict=True)]
    return [
        "",
        title,
        "| row | p50 | p95 |",
        "| --- | ---: | ---: |",
        f"| jupyter_client direct local launch | {statistics.median(direct):.3f} | {pct(direct, 0.95):.3f} |",
        f"| our provisioner, ssh backend, localhost | {statistics.median(ours):.3f} | {pct(ours, 0.95):.3f} |",
        f"ours vs direct: {statistics.median(ours) / statistics.median(direct):.2f}x (p50s), "
        f"median of the pairs' ratios {statistics.median(ratios):.2f}x (goal 1.15x)",
    ]


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
        host_env = build_host_env()
        host_python = str(host_env / "bin" / "python")
        ensure_profile(api, {"backend": "ssh", "ssh": {"hosts": ["localhost"]}}, name=PROFILE)
        ensure_profile(
            api,
            {"backend": "ssh", "ssh": {"hosts": ["localhost"], "python": host_python}},
            name=INSTALLED_PROFILE,
        )
        operator = localhost_operator(
            cluster.admin_kubeconfig, WORK / "operator.log", RKO_NAMESPACE=NAMESPACE
        )
        operator.start()
        root = Path(tempfile.mkdtemp(prefix="rko-bench-cold-"))
        launcher = ["python", "-m", "kernel_launchers.python_launcher"]  # the provisioner ignores it
        kernelspec(root, "remote-cold", launcher, ours(cluster.admin_kubeconfig, PROFILE))
        kernelspec(root, "remote-cold-installed", launcher, ours(cluster.admin_kubeconfig, INSTALLED_PROFILE))
        kernelspec(
            root, "python3-installed", [host_python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        )
        env = {**os.environ, "JUPYTER_PATH": str(root), "KERNEL_USERNAME": "bench"}
        os.environ["JUPYTER_PATH"] = str(root)
        venv = asyncio.run(pairs("python3", "remote-cold", args.runs, env))
        installed = asyncio.run(pairs("python3-installed", "remote-cold-installed", args.runs, env))
    finally:
        if operator is not None:
            operator.stop()
        cluster.stop()
    print(
        f"One cold launch, {args.runs} pairs each (direct and ours in turn), start_kernel -> first reply, s"
    )
    print("\n".join(table("The project's venv (an editable install):", *venv)))
    print("\n".join(table("The wheel installed (the ssh test hosts' environment):", *installed)))


if __name__ == "__main__":
    main()
