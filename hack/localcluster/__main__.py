"""Command line: ``python -m localcluster up|down|status [--dir DIR]`` (run from hack/)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .cluster import REPO_ROOT, ClusterError, LocalCluster

DEFAULT_DIR = Path(os.environ.get("RKO_CLUSTER_DIR", REPO_ROOT / ".cache" / "cluster" / "run"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localcluster", description=__doc__)
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state folder")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.dir)
    if args.action == "up":
        if cluster.running():
            print(f"A cluster is already running from {cluster.dir}.")
        else:
            print("Starting etcd, kube-apiserver, kube-controller-manager and kube-scheduler...")
            started = time.monotonic()
            try:
                state = cluster.start()
            except ClusterError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            print(f"The cluster is ready at {state.server} after {time.monotonic() - started:.1f} s.")
        print("Use it with:")
        print(f"  export KUBECONFIG={cluster.admin_kubeconfig}")
        print("  kubectl get namespaces")
        print(f"Logs are in {cluster.log_dir}; stop it with `make cluster-down`.")
        return 0
    if args.action == "down":
        cluster.stop()
        print(f"The cluster in {cluster.dir} is stopped.")
        return 0
    current = cluster.load_state()
    if current and cluster.running():
        print(f"running at {current.server}; KUBECONFIG={cluster.admin_kubeconfig}")
        return 0
    print("not running")
    return 3


if __name__ == "__main__":
    sys.exit(main())
