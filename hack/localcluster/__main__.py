"""Command line: ``python -m localcluster up|down|status|node-up|node-down [--dir DIR]`` (run
from hack/). ``node-up`` adds a real node (kubelet + containerd) to the running cluster, holding
the kernel and operator images; ``node-down`` removes it."""

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
    parser.add_argument("action", choices=["up", "down", "status", "node-up", "node-down"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state folder")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.dir)
    if args.action in ("node-up", "node-down"):
        return node_command(cluster, args.action)
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


def node_command(cluster: LocalCluster, action: str) -> int:
    from .docker import DockerEngine
    from .node import KubeletNode, NodeError

    root = cluster.dir.parent / "node"
    if action == "node-down":
        stopped = KubeletNode.stop_saved(root, cluster)
        print(f"The node in {root} is stopped." if stopped else "No node is running.")
        return 0
    if not cluster.running():
        print("error: start the cluster first (make cluster).", file=sys.stderr)
        return 1
    KubeletNode.stop_saved(root, cluster)  # one node at a time
    engine = DockerEngine()
    engine.start()
    node = KubeletNode(root, cluster, name="node-1", index=3)  # apart from tests, bench, demo
    node.plumb()
    try:
        node.start(engine.env)
        images = (engine.build_kernel_image(), engine.build_operator_image())
        node.import_images(*images, docker_env=engine.env)
    except NodeError as err:
        node.stop()
        print(f"error: {err}", file=sys.stderr)
        return 1
    node.save_state()
    print(f"Node {node.name} is Ready at {node.addresses.node_ip}, holding {', '.join(images)}.")
    print(f"Its pods get addresses in {node.addresses.pod_subnet}; an operator on this machine")
    print(f"reaches them, and they reach it, at {node.addresses.gateway} (RKO_RESPONSE_BIND).")
    print(f"Logs are in {node.log_dir}; remove it with `make node-down`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
