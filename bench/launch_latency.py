"""``make bench``: kernel launch latency and shutdown time, ours against the alternatives.

Rows, all measured in one run by bench/measure.py (start_kernel -> first execute_reply of 1+1):
- jupyter_client's direct local launch (ipykernel's own kernelspec);
- our provisioner, ssh backend, host localhost (the operator starts the launcher locally), from
  the project's venv (an editable install, whose import hook costs every Python process ~10-20
  ms) and from the wheel installed as a host has it (the ssh test hosts' environment), as
  gateway_provisioners' row runs from its wheel; the ratio of each to gateway_provisioners;
- our provisioner, ssh backend through Debian's sshd on 127.0.0.1;
- our provisioner, ssh backend round-robin over three hosts (network namespaces, own sshd each);
- our provisioner on the kubernetes, docker and dockerSwarm backends, and on the
  sparkApplication backend (the tests' stand-in spark-operator makes the driver pod);
- our provisioner on the yarn backend (MiniYARNCluster): a plain kernel under our
  ApplicationMaster, and a Spark kernel submitted by pyspark's spark-submit in cluster mode;
- gateway_provisioners' DistributedProvisioner, installed from PyPI into its own venv, on
  localhost and round-robin over the same three hosts, and its YarnProvisioner (Spark in
  cluster mode) on the same YARN;
- Scala: Apache Toree launched directly by jupyter_client (spark-submit, Spark local), and ours
  over ssh (localhost) and on YARN (Toree as the cluster-mode driver). gateway_provisioners'
  own Scala kernelspec (its Toree launcher in cluster mode) on the same YARN.
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
import time
from pathlib import Path

import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))
from localcluster import LocalCluster, free_port
from localcluster.cluster import REPO_ROOT
from localcluster.crds import install_crds
from localcluster.docker import DockerEngine
from localcluster.gateway_provisioners import GP_VERSION, gp_install, gp_venv
from localcluster.hosts import PYTHON_MOUNT, HostPool, build_host_env
from localcluster.node import KubeletNode
from localcluster.servers import OperatorProcess, Sshd
from localcluster.yarn import MiniYarn, operator_env, spark_home, spark_opts

sys.path.insert(0, str(REPO_ROOT))
from tests.profiles import kernelspec_config
from tests.spark_operator import CRD as SPARK_CRD
from tests.spark_operator import controller_command as spark_controller_command

WORK = REPO_ROOT / ".cache" / "bench"
MEASURE = Path(__file__).with_name("measure.py")
SERVER_MEASURE = Path(__file__).with_name("jupyter_server_latency.py")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def gateway_provisioners_python() -> Path:
    """A separate venv with gateway_provisioners from PyPI and its ssh kernelspec."""
    python = gp_venv(WORK / f"gp-{GP_VERSION}")
    spec = python.parents[1] / "share" / "jupyter" / "kernels" / "gp_ssh" / "kernel.json"
    if not spec.exists():
        gp_install(
            "jupyter-ssh-spec",
            python.parents[1],
            "gp_ssh",
            "--remote-hosts",
            "localhost",
            venv=python.parents[1],
        )
    return python


def gp_hosts_kernelspec(root: Path, gp_python: Path, hosts: list[str]) -> None:
    """gateway_provisioners' ssh kernelspec, pointed at the test hosts. Its remote command runs
    a bare ``python`` from the login's PATH, so argv names the GP venv's interpreter (the hosts
    share this machine's filesystem but for /tmp and /home: see ``gp_venv_on_hosts``)."""
    source = gp_python.parents[1] / "share" / "jupyter" / "kernels" / "gp_ssh" / "kernel.json"
    spec = json.loads(source.read_text())
    spec["argv"][0] = str(gp_python)
    spec["metadata"]["kernel_provisioner"]["config"]["remote_hosts"] = hosts
    spec_dir = root / "kernels" / "gp_hosts"
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def gp_venv_on_hosts(pool: HostPool, gp_python: Path) -> None:
    """GP's remote command runs its venv's interpreter and launcher by their paths on the host.
    Each host has its own /tmp and /home (``hostinit``), so a checkout under either (a CI
    clone in /tmp) hides them there and every launch times out: copy the venv to each host,
    at the same path."""
    venv = gp_python.parents[1]
    if not venv.is_relative_to("/tmp") and not venv.is_relative_to("/home"):
        return
    for host in pool.hosts.values():
        target = host.path(str(venv))
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", str(venv), str(target)], check=True)


def gp_yarn_kernelspec(root: Path, gp_python: Path, yarn: MiniYarn) -> None:
    """gateway_provisioners' Spark-on-YARN kernelspec for the test YARN.

    Its installer (0.5.0) leaves ${...} placeholders in kernel.json (language, SPARK_HOME,
    PYSPARK_PYTHON, SPARK_OPTS...), so they are filled in here as a user would by hand; its
    launcher imports server_listener.py, which spark-submit does not ship unless told to.
    """
    staging = WORK / "gp-yarn-spec"
    spec_dir = staging / "share" / "jupyter" / "kernels" / "gp_yarn"
    if not spec_dir.exists():
        subprocess.run(
            [
                str(gp_python.parent / "jupyter-yarn-spec"),
                "install",
                "--spark",
                "--prefix",
                str(staging),
                "--kernel-name",
                "gp_yarn",
                "--spark-home",
                str(spark_home()),
            ],
            check=True,
            capture_output=True,
        )
    spec = json.loads((spec_dir / "kernel.json").read_text())
    scripts = spec_dir / "scripts"
    py4j = next((spark_home() / "python" / "lib").glob("py4j-*.zip"))
    spec.update(language="python", display_name="gp_yarn")
    spec["metadata"]["kernel_provisioner"]["config"] = {"yarn_endpoint": yarn.web, "launch_timeout": 120}
    spec["env"] = {
        "SPARK_HOME": str(spark_home()),
        "PYSPARK_PYTHON": str(gp_python),
        "HADOOP_CONF_DIR": str(yarn.conf_dir),
        "PYTHONPATH": f"{spark_home() / 'python'}:{py4j}",
        "SPARK_OPTS": (
            "--master yarn --deploy-mode cluster --name ${KERNEL_ID:-ERROR__NO__KERNEL_ID} "
            "--conf spark.yarn.submit.waitAppCompletion=false "
            f"--conf spark.yarn.appMasterEnv.PYTHONPATH={spark_home() / 'python'}:{py4j} "
            f"--conf spark.pyspark.python={gp_python} --py-files {scripts / 'server_listener.py'} "
            f"{spark_opts()}"
        ),
        "LAUNCH_OPTS": "",
    }
    spec["argv"] = [str(spec_dir / "bin" / "run.sh")] + [
        "ipykernel.ipkernel.IPythonKernel"
        if arg == "${ipykernel_subclass_name}"
        else "lazy"
        if arg == "${spark_init_mode}"
        else arg
        for arg in spec["argv"][1:]
    ]
    out = root / "kernels" / "gp_yarn"
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel.json").write_text(json.dumps(spec))


def gp_yarn_scala_kernelspec(root: Path, gp_python: Path, yarn: MiniYarn) -> None:
    """gateway_provisioners' Scala (Toree) kernelspec for the test YARN, as its installer writes
    it (no --yarn-endpoint: with it, 0.5.0 leaves the template unfilled), with what a user must
    add by hand: Toree's assembly jar in lib/ (GP ships only its launcher jar), SPARK_HOME, the
    YARN endpoint, and Java 17's --add-opens for Toree."""
    from kernel_launchers.python_launcher import TOREE_JAR_OPENS, toree_assembly

    staging = WORK / "gp-yarn-scala-spec"
    spec_dir = staging / "share" / "jupyter" / "kernels" / "gp_yarn_scala"
    if not spec_dir.exists():
        gp_install(
            "jupyter-yarn-spec", staging, "gp_yarn_scala", "--language", "Scala", venv=gp_python.parents[1]
        )
    jar = toree_assembly({})
    (spec_dir / "lib" / jar.name).write_bytes(jar.read_bytes())  # its run.sh looks in lib/
    spec = json.loads((spec_dir / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"] = {"yarn_endpoint": yarn.web, "launch_timeout": 240}
    spec["env"].update(
        SPARK_HOME=str(spark_home()),
        HADOOP_CONF_DIR=str(yarn.conf_dir),
        __TOREE_SPARK_OPTS__=(
            "--master yarn --deploy-mode cluster --name ${KERNEL_ID:-ERROR__NO__KERNEL_ID} "
            "--conf spark.yarn.submit.waitAppCompletion=false --conf spark.yarn.am.waitTime=1d "
            "--driver-memory 1g --executor-memory 512m "
            f"--conf spark.driver.extraJavaOptions={TOREE_JAR_OPENS} {spark_opts()}"  # one word
        ),
    )
    out = root / "kernels" / "gp_yarn_scala"
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel.json").write_text(json.dumps(spec))


def ssh_home(pool: HostPool) -> Path:
    """A HOME whose ~/.ssh holds the pool's client key and host keys: gateway_provisioners reads
    only ~/.ssh (no setting for either), and this machine's own ~/.ssh stays untouched."""
    home = WORK / "gp-home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
    key = home / ".ssh" / "id_ed25519"
    key.write_bytes(pool.client_key.read_bytes())
    key.chmod(0o600)
    (home / ".ssh" / "known_hosts").write_text(pool.known_hosts())
    return home


def kernelspecs(root: Path, kubeconfig: Path, image: str, host_python: Path | None = None) -> Path:
    configs: dict[str, dict[str, object]] = {
        # Since profiles, the hosts are the administrator's: each row's profile names its own.
        "rk_local": {"backend": "ssh", "backend_config": {"profileHosts": ["localhost"]}},
        "rk_hosts": {"backend": "ssh", "operator_class": "hosts"},
        "rk_sshd": {"backend": "ssh", "backend_config": {"profileHosts": ["127.0.0.1"]}},
        "rk_pod": {"backend": "kubernetes", "image_name": image},
        "rk_docker": {"backend": "docker", "image_name": image},
        "rk_swarm": {"backend": "dockerSwarm", "image_name": image},
        "rk_sparkapp": {"backend": "sparkApplication", "image_name": image},
        "rk_yarn": {"backend": "yarn", "operator_class": "yarn", "launch_timeout": 120},
        "rk_yarn_spark": {
            "backend": "yarn",
            "operator_class": "yarn",
            "launch_timeout": 120,
            "backend_config": {"spark": True},
        },
        "rk_scala_local": {
            "backend": "ssh",
            "backend_config": {"profileHosts": ["localhost"]},
            "launch_timeout": 240,
        },
        "rk_scala_yarn": {"backend": "yarn", "operator_class": "yarn", "launch_timeout": 240},
        # The same, run with KERNEL_SPARK_INIT_MODE=lazy (main): as GP's Scala kernelspec starts.
        "rk_scala_yarn_lazy": {"backend": "yarn", "operator_class": "yarn", "launch_timeout": 240},
    }
    if host_python is not None:  # the launcher and kernel from the wheel, not the editable venv
        configs["rk_local_installed"] = {
            "backend": "ssh",
            "backend_config": {"profileHosts": ["localhost"], "python": str(host_python)},
        }
    scala = {"rk_scala_local", "rk_scala_yarn", "rk_scala_yarn_lazy"}
    api = config.new_client_from_config(config_file=str(kubeconfig))
    try:  # each config as the profile an administrator would write for it, and a kernelspec naming it
        configs = {name: kernelspec_config(api, legacy) for name, legacy in configs.items()}
    finally:
        api.close()
    for name, config_ in configs.items():
        spec_dir = root / "kernels" / name
        spec_dir.mkdir(parents=True, exist_ok=True)
        (spec_dir / "kernel.json").write_text(
            json.dumps(
                {
                    "argv": ["python", "-m", "kernel_launchers.python_launcher"],
                    "display_name": name,
                    "language": "scala" if name in scala else "python",
                    "interrupt_mode": "signal" if name in scala else "message",
                    "metadata": {
                        "kernel_provisioner": {
                            "provisioner_name": "remote-kernel",
                            "config": {**config_, "namespace": "default", "kubeconfig": str(kubeconfig)},
                        }
                    },
                }
            )
        )
    toree_local_kernelspec(root)
    return root


def toree_local_kernelspec(root: Path) -> None:
    """Apache Toree launched directly by jupyter_client, as `jupyter toree install` would set it
    up: spark-submit on the connection file, Spark local and eager (as ours defaults)."""
    from kernel_launchers.python_launcher import kernel_command

    argv = kernel_command(Path("{connection_file}"), None, "scala", spark_init="eager", environ={})
    spec_dir = root / "kernels" / "toree_local"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv, "display_name": "Toree", "language": "scala", "interrupt_mode": "signal"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


KERNEL_MARKERS = ("ipykernel_launcher", "kernel_launchers", "launch_ipykernel", "org.apache.toree.Main")


def kernels_left(wait: float = 3.0) -> int:
    """Kernel and launcher processes still alive on the machine or its test hosts (their PID
    namespaces are visible from here), after ``wait`` seconds for stragglers to exit."""
    time.sleep(wait)
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(marker in cmdline for marker in KERNEL_MARKERS):
            count += 1
    return count


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
    parser.add_argument(
        "--only",
        default="",
        help="measure only the rows whose kernel name contains one of these (comma-separated)",
    )
    parser.add_argument("--no-server", action="store_true", help="skip the Jupyter Server table")
    args = parser.parse_args()
    # Stopped with SIGTERM, still run the clean-up below (cluster, sshd, engine, node).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    WORK.mkdir(parents=True, exist_ok=True)
    gp_python = gateway_provisioners_python()
    cluster = LocalCluster(WORK / "cluster")
    sshd = Sshd(WORK / "sshd")
    engine = DockerEngine()
    node = KubeletNode(WORK / "node", cluster, name="bench-node", index=1)  # apart from the tests' (0)
    spark_controller: subprocess.Popen[bytes] | None = None
    operator: OperatorProcess | None = None
    hosts_operator: OperatorProcess | None = None
    yarn_operator: OperatorProcess | None = None
    yarn = MiniYarn(WORK / "yarn")
    pool = HostPool(WORK / "hosts", network=1)  # apart from the tests' pool (0)
    results: dict[str, dict[str, list[float]]] = {}
    through_server: dict[str, list[float]] = {}
    server_rows: dict[str, str] = {}
    left: dict[str, int] = {}
    failed: dict[str, str] = {}
    try:
        print("==> Starting the local control plane, sshd and the operator...", flush=True)
        cluster.start()
        sshd.start()
        engine.start()
        pool.start()
        node.plumb()
        known_hosts = WORK / "hosts" / "known_hosts"
        known_hosts.write_text(pool.known_hosts())
        addresses = [host.address for host in pool.hosts.values()]
        # Swarm mode for the dockerSwarm row, on loopback only; left again at the end.
        subprocess.run(
            ["docker", "swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377"],
            env=engine.env,
            capture_output=True,
            check=False,
        )
        image = engine.build_kernel_image()
        # A real node (the kubelet with containerd) runs the pod rows' kernels.
        node.start(engine.env)
        node.import_images(image, docker_env=engine.env)
        api = config.new_client_from_config(config_file=str(cluster.admin_kubeconfig))
        install_crds(api)
        client.ApiextensionsV1Api(api).create_custom_resource_definition(
            yaml.safe_load(SPARK_CRD.read_text())
        )
        # The tests' stand-in for spark-operator (why: tests/spark_operator/controller.py).
        spark_controller = subprocess.Popen(
            spark_controller_command(cluster.admin_kubeconfig),
            cwd=REPO_ROOT,
            stdout=open(WORK / "spark-operator.log", "ab"),  # noqa: SIM115 - handed to the child
            stderr=subprocess.STDOUT,
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
                # The node's gateway: its pods reach it, and so do this machine's kernels.
                "RKO_RESPONSE_BIND": f"{node.addresses.gateway}:{free_port()}",
                "RKO_SSH_LOCAL_HOSTS": "localhost",
                "RKO_SSH_KEY_FILE": str(sshd.client_key),
                "RKO_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
                "RKO_SSH_PORT": str(sshd.port),
                "RKO_DOCKER_HOST": engine.host,
                "RKO_DOCKER_KERNEL_IP": "127.0.0.1",
            },
        )
        operator.start()
        # A second operator, of class "hosts", for the three hosts: launchers there reach it on
        # the machine's side of their bridge.
        hosts_operator = OperatorProcess(
            kubeconfig=cluster.admin_kubeconfig,
            log_path=WORK / "hosts-operator.log",
            env={
                "RKO_OPERATOR_CLASS": "hosts",
                "RKO_RESPONSE_BIND": f"{pool.gateway}:{free_port()}",
                "RKO_SSH_HOSTS": ",".join(addresses),
                "RKO_SSH_LOCAL_HOSTS": "",
                "RKO_SSH_USER": "root",
                "RKO_SSH_KEY_FILE": str(pool.client_key),
                "RKO_SSH_KNOWN_HOSTS": str(known_hosts),
                "RKO_SSH_PYTHON": f"{PYTHON_MOUNT}/bin/python",
            },
        )
        hosts_operator.start()
        yarn.start()
        print(f"==> MiniYARNCluster started in {yarn.started_in:.1f} s", flush=True)
        yarn_operator = OperatorProcess(
            kubeconfig=cluster.admin_kubeconfig,
            log_path=WORK / "yarn-operator.log",
            env={"RKO_OPERATOR_CLASS": "yarn", **operator_env(yarn, f"127.0.0.1:{free_port()}")},
        )
        yarn_operator.start()
        jupyter = kernelspecs(
            Path(tempfile.mkdtemp(prefix="rko-bench-")),
            cluster.admin_kubeconfig,
            image,
            build_host_env() / "bin" / "python",
        )
        gp_hosts_kernelspec(jupyter, gp_python, addresses)
        gp_venv_on_hosts(pool, gp_python)
        gp_yarn_kernelspec(jupyter, gp_python, yarn)
        gp_yarn_scala_kernelspec(jupyter, gp_python, yarn)
        gp_home = ssh_home(pool)
        env = {**os.environ, "JUPYTER_PATH": str(jupyter)}
        rows = [
            ("jupyter_client direct local launch", Path(sys.executable), "python3"),
            ("remote-kernel-operator, ssh backend, localhost", Path(sys.executable), "rk_local"),
            (
                "remote-kernel-operator, ssh backend, localhost, the wheel installed",
                Path(sys.executable),
                "rk_local_installed",
            ),
            ("remote-kernel-operator, ssh backend, via sshd", Path(sys.executable), "rk_sshd"),
            ("remote-kernel-operator, ssh backend, 3 hosts round-robin", Path(sys.executable), "rk_hosts"),
            (
                "remote-kernel-operator, kubernetes backend (pod on a real kubelet)",
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
            (
                "remote-kernel-operator, sparkApplication backend (stand-in operator)",
                Path(sys.executable),
                "rk_sparkapp",
            ),
            (f"gateway_provisioners {GP_VERSION} DistributedProvisioner, localhost", gp_python, "gp_ssh"),
            (f"gateway_provisioners {GP_VERSION} DistributedProvisioner, 3 hosts", gp_python, "gp_hosts"),
            ("remote-kernel-operator, yarn backend (our ApplicationMaster)", Path(sys.executable), "rk_yarn"),
            (
                "remote-kernel-operator, yarn backend, Spark (spark-submit, cluster)",
                Path(sys.executable),
                "rk_yarn_spark",
            ),
            (f"gateway_provisioners {GP_VERSION} YarnProvisioner, Spark (cluster)", gp_python, "gp_yarn"),
            (
                "Apache Toree direct local launch (spark-submit, Spark local, eager)",
                Path(sys.executable),
                "toree_local",
            ),
            (
                "remote-kernel-operator, Scala (Toree), ssh backend, localhost",
                Path(sys.executable),
                "rk_scala_local",
            ),
            (
                "remote-kernel-operator, Scala (Toree), yarn backend (driver in cluster mode)",
                Path(sys.executable),
                "rk_scala_yarn",
            ),
            (
                "remote-kernel-operator, Scala (Toree), yarn backend, Spark lazy (as GP's)",
                Path(sys.executable),
                "rk_scala_yarn_lazy",
            ),
            (
                f"gateway_provisioners {GP_VERSION} YarnProvisioner, Scala (its Toree launcher, cluster, lazy)",
                gp_python,
                "gp_yarn_scala",
            ),
        ]
        for label, python, kernel in rows:
            if args.only and not any(word in kernel for word in args.only.split(",")):
                continue
            row_env = dict(env)
            if python == gp_python:
                # As in an activated venv (its kernelspec runs plain "python"), and with its
                # response listener on loopback: nothing is sent to other addresses.
                row_env["PATH"] = f"{python.parent}{os.pathsep}{env['PATH']}"
                row_env["GP_RESPONSE_IP"] = "127.0.0.1"
                # Its kernels' logs in this bench's folder, not left in /tmp (its default).
                row_env["GP_KERNEL_LOG_DIR"] = str(WORK)
            if kernel == "gp_hosts":
                row_env.update(HOME=str(gp_home), GP_RESPONSE_IP=pool.gateway, GP_REMOTE_USER="root")
            runs = args.runs
            if kernel.endswith("_lazy"):
                row_env["KERNEL_SPARK_INIT_MODE"] = "lazy"
            if kernel in (
                "toree_local",
                "rk_scala_local",
                "rk_scala_yarn",
                "rk_scala_yarn_lazy",
                "gp_yarn_scala",
            ):
                runs = min(runs, 5)  # a JVM with Spark: ~15-30 s a launch on 2 cores
                # GP's kernelspec sets the same memory in its SPARK_OPTS: it reads these variables
                # only for a check that int()s them and needs yarn-site.xml in its own process.
                if python != gp_python:
                    row_env.update(KERNEL_DRIVER_MEMORY="1g", KERNEL_EXECUTOR_MEMORY="512m")
            try:
                results[label] = measure(python, kernel, runs, row_env)
            except subprocess.CalledProcessError as err:  # a row that cannot run says so
                failed[label] = f"failed (exit code {err.returncode}; its output is above)"
                print(f"==> {label}: {failed[label]}", flush=True)
                continue
            left[label] = kernels_left()
            if "yarn" in kernel:
                apps = len(yarn.running_applications())
                left[label] = max(left[label], apps)
            if left[label]:
                print(f"==> {label}: {left[label]} kernel processes left running after shutdown", flush=True)
        if not args.no_server:
            print("==> Through Jupyter Server: REST create -> first execute_reply...", flush=True)
            server_rows = {
                "python3": "Jupyter Server, local ipykernel",
                "rk_local": "Jupyter Server, ssh backend, localhost",
                "rk_pod": "Jupyter Server, kubernetes backend (pod)",
            }
            out = subprocess.run(
                [
                    sys.executable,
                    str(SERVER_MEASURE),
                    *[f"--kernel={k}" for k in server_rows],
                    "--runs",
                    str(args.runs),
                ],
                env=env,
                check=True,
                stdout=subprocess.PIPE,
                text=True,
            )
            through_server = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for proc in (operator, hosts_operator, yarn_operator):
            if proc is not None:
                proc.stop()
        yarn.stop()
        pool.stop()
        if spark_controller is not None:
            spark_controller.terminate()
            spark_controller.wait(30)
        node.stop()
        # Every kernel container gone (a Swarm task's is removed a moment after its service)
        # before leaving Swarm mode, which would strand it.
        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and subprocess.run(
                ["docker", "ps", "-aq", "--filter", "label=kernel-operator.io/kernel-id"],
                env=engine.env,
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        ):
            time.sleep(0.5)
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
    print(f"| {'launcher':<68} | launch p50 | launch p95 | shutdown p50 | shutdown p95 | left running |")
    print(f"|{'-' * 70}|-----------:|-----------:|-------------:|-------------:|-------------:|")
    for label, data in results.items():
        launch, shutdown = data["launch"], data["shutdown"]
        print(
            f"| {label:<68} | {statistics.median(launch):10.3f} | {p95(launch):10.3f} "
            f"| {statistics.median(shutdown):12.3f} | {p95(shutdown):12.3f} | {left.get(label, 0):12d} |"
        )
    for label, why in failed.items():
        print(f"| {label:<68} | {why} |")
    print("(left running: kernel and launcher processes still alive 3 s after the row's last shutdown)")
    gp = results.get(f"gateway_provisioners {GP_VERSION} DistributedProvisioner, localhost")
    if gp:
        for label in (
            "remote-kernel-operator, ssh backend, localhost",
            "remote-kernel-operator, ssh backend, localhost, the wheel installed",
        ):
            if label in results:
                ratio = statistics.median(results[label]["launch"]) / statistics.median(gp["launch"])
                print(f"{label}: {ratio:.2f}x gateway_provisioners on localhost (p50s; goal 0.8x)")
    if through_server:
        print()
        print(
            f"Through Jupyter Server (REST POST /api/kernels -> first execute_reply on the websocket), {args.runs} runs each, seconds"
        )
        print(f"| {'kernel':<68} | launch p50 | launch p95 |")
        print(f"|{'-' * 70}|-----------:|-----------:|")
        for kernel, times in through_server.items():
            base = kernel.removesuffix(" create")
            label = server_rows[base] if base == kernel else f"{server_rows[base]}: the REST create alone"
            print(f"| {label:<68} | {statistics.median(times):10.3f} | {p95(times):10.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
