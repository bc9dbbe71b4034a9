"""``make demo``: from nothing to code running in a remote kernel, in one command.

Starts the local control plane (hack/localcluster), installs the CRD, runs the operator, then
starts a kernel through jupyter_client with the remote-kernel provisioner (ssh backend on this
machine), runs code in it, prints the result and the launch time, and cleans everything up.
With ``--backend kubernetes`` the kernel runs in a pod on a real node started for the demo (the
kubelet with containerd, hack/localcluster/node.py; the kernel image built locally). With
``--kubeconfig`` it uses an existing cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from localcluster import LocalCluster, free_port
from localcluster.cluster import REPO_ROOT
from localcluster.crds import apply_profile, install_crds
from localcluster.docker import DockerEngine
from localcluster.node import KubeletNode
from localcluster.servers import OperatorProcess

# The administrator's kind of kernel for the demo: on this machine, as the operator's children.
DEMO_PROFILE = {"backend": "ssh", "ssh": {"hosts": ["localhost"]}}
NODE_INDEX = 2  # the demo's node network, apart from the tests' (0) and the benchmark's (1)


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def ensure_namespace(api: client.ApiClient, name: str) -> None:
    try:
        client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    except ApiException as err:
        if err.status != 409:
            raise


async def run_kernel(kubeconfig: Path, namespace: str, code: str, backend: str) -> None:
    from jupyter_client.manager import AsyncKernelManager

    jupyter = Path(tempfile.mkdtemp(prefix="rko-demo-"))
    spec_dir = jupyter / "kernels" / "remote-python"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["python", "-m", "kernel_launchers.python_launcher"],
                "display_name": f"Remote Python ({backend} backend)",
                "language": "python",
                "interrupt_mode": "message",
                "metadata": {
                    "kernel_provisioner": {
                        "provisioner_name": "remote-kernel",
                        "config": {
                            "profile": "demo-local",
                            "namespace": namespace,
                            "kubeconfig": str(kubeconfig),
                        },
                    }
                },
            }
        )
    )
    os.environ["JUPYTER_PATH"] = str(jupyter)
    km = AsyncKernelManager(kernel_name="remote-python")
    step("Starting a kernel: the provisioner creates a RemoteKernel and waits for the operator.")
    started = time.monotonic()
    await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": os.environ.get("USER", "demo")})
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        ready = time.monotonic() - started
        step(f"The kernel is ready (RemoteKernel {namespace}/k-{km.kernel_id}); running: {code}")
        outputs: list[str] = []
        reply = await kc.execute_interactive(
            code, output_hook=lambda m: outputs.append(m["content"].get("text", "")), timeout=60
        )
        first_reply = time.monotonic() - started
    finally:
        kc.stop_channels()
    print()
    print(f"  result: {''.join(outputs).strip()}  (status {reply['content']['status']})")
    print(f"  launch time: {ready:.2f} s to ready, {first_reply:.2f} s to the first execute_reply")
    print()
    step("Shutting the kernel down (the RemoteKernel and its Secret are deleted).")
    started = time.monotonic()
    await km.shutdown_kernel()
    print(f"  shutdown took {time.monotonic() - started:.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kubeconfig", type=Path, help="use this cluster instead of a local control plane")
    parser.add_argument("--namespace", default="default")
    parser.add_argument(
        "--backend",
        choices=["ssh", "kubernetes"],
        default="ssh",
        help="ssh: a kernel on this machine; kubernetes: a kernel in a pod on a real local node",
    )
    parser.add_argument(
        "--code",
        default="import platform, os; print(f'Hello from {platform.node()}, "
        'user {os.environ["KERNEL_USERNAME"]}, kernel {os.environ["KERNEL_ID"][:8]}\')',
    )
    args = parser.parse_args()
    work = REPO_ROOT / ".cache" / "demo"
    work.mkdir(parents=True, exist_ok=True)
    cluster: LocalCluster | None = None
    operator: OperatorProcess | None = None
    node: KubeletNode | None = None
    profile = DEMO_PROFILE
    bind = "127.0.0.1"
    try:
        if args.kubeconfig:
            kubeconfig = args.kubeconfig
            step(f"Using the cluster in {kubeconfig}.")
        else:
            step("Starting a local control plane (etcd, kube-apiserver, controller-manager, scheduler)...")
            cluster = LocalCluster(work / "cluster")
            if cluster.running():
                cluster.stop()
            started = time.monotonic()
            cluster.start()
            kubeconfig = cluster.admin_kubeconfig
            step(f"The control plane is ready after {time.monotonic() - started:.1f} s.")
        if args.backend == "kubernetes":
            if cluster is None:
                raise SystemExit("--backend kubernetes starts its own node: use it without --kubeconfig.")
            engine = DockerEngine()
            engine.start()
            image = engine.build_kernel_image()
            step("Starting a node: the kubelet with containerd and runc, in its own network namespace.")
            node = KubeletNode(work / "node", cluster, name="demo-node", index=NODE_INDEX)
            node.plumb()
            started = time.monotonic()
            node.start(engine.env)
            step(f"The node is Ready after {time.monotonic() - started:.1f} s; copying {image} into it.")
            node.import_images(image, docker_env=engine.env)
            profile = {"backend": "kubernetes", "image": image}
            bind = node.addresses.gateway  # where the kernel's pod reaches the operator
        api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        step("Installing the RemoteKernel and RemoteKernelProfile CRDs from crds/, and the demo's profile.")
        install_crds(api)
        apply_profile(api, "demo-local", profile)
        ensure_namespace(api, "remote-kernel-operator")
        ensure_namespace(api, args.namespace)
        step("Starting the operator (python -m kernel_operator).")
        operator = OperatorProcess(
            kubeconfig=kubeconfig,
            log_path=work / f"operator-{uuid.uuid4().hex[:6]}.log",
            # Kernels as the operator's own children: off by default, enabled for the demo.
            env={"RKO_RESPONSE_BIND": f"{bind}:{free_port()}", "RKO_SSH_LOCAL_HOSTS": "localhost"},
        )
        operator.start()
        asyncio.run(run_kernel(kubeconfig, args.namespace, args.code, args.backend))
        step("Done.")
        return 0
    finally:
        if operator is not None:
            operator.stop()
            print(f"  operator log: {operator.log_path}")
        if node is not None:
            step("Stopping the node (its pods, containerd, the kubelet, its network namespace).")
            node.stop()
        if cluster is not None:
            step("Stopping the local control plane.")
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
