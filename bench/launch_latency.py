"""``make bench``: kernel launch latency and shutdown time, ours against the alternatives.

Rows, all measured in one run by bench/measure.py (start_kernel -> first execute_reply of 1+1):
- jupyter_client's direct local launch (ipykernel's own kernelspec);
- our provisioner, ssh backend, host localhost (the operator starts the launcher locally);
- our provisioner, ssh backend through Debian's sshd on 127.0.0.1;
- gateway_provisioners' DistributedProvisioner on localhost, installed from PyPI into its own venv.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))
from localcluster import LocalCluster, free_port
from localcluster.cluster import REPO_ROOT
from localcluster.docker import DockerEngine
from localcluster.servers import OperatorProcess, Sshd

sys.path.insert(0, str(REPO_ROOT))
from tests.node_agent import node_agent_command

WORK = REPO_ROOT / ".cache" / "bench"
GP_VERSION = "0.5.0"
MEASURE = Path(__file__).with_name("measure.py")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def gateway_provisioners_python() -> Path:
    """A separate venv with gateway_provisioners from PyPI and its ssh kernelspec."""
    venv = WORK / f"gp-{GP_VERSION}"
    python = venv / "bin" / "python"
    spec = venv / "share" / "jupyter" / "kernels" / "gp_ssh" / "kernel.json"
    if not spec.exists():
        print(f"==> Installing gateway_provisioners {GP_VERSION} into {venv}...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"gateway_provisioners=={GP_VERSION}", "ipykernel"],
            check=True,
        )
        subprocess.run(
            [
                str(venv / "bin" / "jupyter-ssh-spec"),
                "install",
                "--sys-prefix",
                "--kernel-name",
                "gp_ssh",
                "--remote-hosts",
                "localhost",
            ],
            check=True,
            capture_output=True,
        )
    return python


def kernelspecs(root: Path, kubeconfig: Path, image: str) -> Path:
    configs: dict[str, dict[str, object]] = {
        "rk_local": {"backend": "ssh", "remote_hosts": ["localhost"]},
        "rk_sshd": {"backend": "ssh", "remote_hosts": ["127.0.0.1"]},
        "rk_pod": {"backend": "kubernetes", "image_name": image},
        "rk_docker": {"backend": "docker", "image_name": image},
        "rk_swarm": {"backend": "dockerSwarm", "image_name": image},
    }
    for name, config_ in configs.items():
        spec_dir = root / "kernels" / name
        spec_dir.mkdir(parents=True, exist_ok=True)
        (spec_dir / "kernel.json").write_text(
            json.dumps(
                {
                    "argv": ["python", "-m", "kernel_launchers.python_launcher"],
                    "display_name": name,
                    "language": "python",
                    "interrupt_mode": "message",
                    "metadata": {
                        "kernel_provisioner": {
                            "provisioner_name": "remote-kernel",
                            "config": {**config_, "namespace": "default", "kubeconfig": str(kubeconfig)},
                        }
                    },
                }
            )
        )
    return root


def measure(python: Path, kernel: str, runs: int, env: dict[str, str]) -> dict[str, list[float]]:
    print(f"==> {kernel}: {runs} launches...", flush=True)
    out = subprocess.run(
        [str(python), str(MEASURE), "--kernel", kernel, "--runs", str(runs)],
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    # Stopped with SIGTERM, still run the clean-up below (cluster, sshd, engine, agent).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    WORK.mkdir(parents=True, exist_ok=True)
    gp_python = gateway_provisioners_python()
    cluster = LocalCluster(WORK / "cluster")
    sshd = Sshd(WORK / "sshd")
    engine = DockerEngine()
    agent: subprocess.Popen[bytes] | None = None
    operator: OperatorProcess | None = None
    results: dict[str, dict[str, list[float]]] = {}
    try:
        print("==> Starting the local control plane, sshd and the operator...", flush=True)
        cluster.start()
        sshd.start()
        engine.start()
        # Swarm mode for the dockerSwarm row, on loopback only; left again at the end.
        subprocess.run(
            ["docker", "swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377"],
            env=engine.env,
            capture_output=True,
            check=False,
        )
        image = engine.build_kernel_image()
        node_kubeconfig = cluster.write_kubeconfig(
            WORK / "node.kubeconfig", "system:node:bench-node", ("system:nodes",)
        )
        agent = subprocess.Popen(
            node_agent_command(node_kubeconfig, "bench-node", engine.host),
            cwd=REPO_ROOT,
            stdout=open(WORK / "node-agent.log", "ab"),  # noqa: SIM115 - handed to the child
            stderr=subprocess.STDOUT,
        )
        api = config.new_client_from_config(config_file=str(cluster.admin_kubeconfig))
        client.ApiextensionsV1Api(api).create_custom_resource_definition(
            yaml.safe_load((REPO_ROOT / "crds" / "remotekernels.kernel-operator.io.yaml").read_text())
        )
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name="remote-kernel-operator"))
        )
        custom = client.CustomObjectsApi(api)
        while True:
            try:
                custom.list_cluster_custom_object("kernel-operator.io", "v1alpha1", "remotekernels")
                break
            except ApiException:
                continue
        operator = OperatorProcess(
            kubeconfig=cluster.admin_kubeconfig,
            log_path=WORK / "operator.log",
            env={
                "RKO_RESPONSE_BIND": f"127.0.0.1:{free_port()}",
                "RKO_SSH_LOCAL_HOSTS": "localhost",
                "RKO_SSH_KEY_FILE": str(sshd.client_key),
                "RKO_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
                "RKO_SSH_PORT": str(sshd.port),
                "RKO_DOCKER_HOST": engine.host,
                "RKO_DOCKER_KERNEL_IP": "127.0.0.1",
            },
        )
        operator.start()
        jupyter = kernelspecs(Path(tempfile.mkdtemp(prefix="rko-bench-")), cluster.admin_kubeconfig, image)
        env = {**os.environ, "JUPYTER_PATH": str(jupyter)}
        rows = [
            ("jupyter_client direct local launch", Path(sys.executable), "python3"),
            ("remote-kernel-operator, ssh backend, localhost", Path(sys.executable), "rk_local"),
            ("remote-kernel-operator, ssh backend, via sshd", Path(sys.executable), "rk_sshd"),
            (
                "remote-kernel-operator, kubernetes backend (pod via node agent)",
                Path(sys.executable),
                "rk_pod",
            ),
            (
                "remote-kernel-operator, docker backend (container, host network)",
                Path(sys.executable),
                "rk_docker",
            ),
            (
                "remote-kernel-operator, dockerSwarm backend (service, host network)",
                Path(sys.executable),
                "rk_swarm",
            ),
            (f"gateway_provisioners {GP_VERSION} DistributedProvisioner, localhost", gp_python, "gp_ssh"),
        ]
        for label, python, kernel in rows:
            row_env = dict(env)
            if python == gp_python:
                # As in an activated venv (its kernelspec runs plain "python"), and with its
                # response listener on loopback: nothing is sent to other addresses.
                row_env["PATH"] = f"{python.parent}{os.pathsep}{env['PATH']}"
                row_env["GP_RESPONSE_IP"] = "127.0.0.1"
            results[label] = measure(python, kernel, args.runs, row_env)
    finally:
        if operator is not None:
            operator.stop()
        if agent is not None:
            agent.terminate()
            agent.wait(30)
        subprocess.run(
            ["docker", "swarm", "leave", "--force"], env=engine.env, capture_output=True, check=False
        )
        engine.stop()
        sshd.stop()
        cluster.stop()
    print()
    print(
        f"Kernel launch (start_kernel -> first execute_reply of 1+1) and shutdown, {args.runs} runs each, seconds"
    )
    print(f"| {'launcher':<64} | launch p50 | launch p95 | shutdown p50 | shutdown p95 |")
    print(f"|{'-' * 66}|-----------:|-----------:|-------------:|-------------:|")
    for label, data in results.items():
        launch, shutdown = data["launch"], data["shutdown"]
        print(
            f"| {label:<64} | {statistics.median(launch):10.3f} | {p95(launch):10.3f} "
            f"| {statistics.median(shutdown):12.3f} | {p95(shutdown):12.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
