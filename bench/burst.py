"""``make bench`` (second part): many kernels at once, a cluster full of them, and where the
time of one launch goes. Every figure is a ratio to something measured in the same run.

- Steps of one launch (ssh backend, localhost): client create -> operator records the launch -> backend
  started -> launcher started -> kernel listening -> report accepted -> status written ->
  client sees Running -> first reply, from the client's clock, the operator's log and the
  launcher's log (one machine, one clock).
- Burst: N RemoteKernels created at once (ssh backend: localhost, and the three network-
  namespace hosts): all Running? wall time against the CPU-bound limit, N x (machine CPU
  seconds one launch costs) / cores, measured here first. On localhost twice: from memory as
  it is, then with the memory the burst uses faulted in first, as one launch finds it
  (guest_memory says why); the pods the same two ways (faulting in made the pod burst slower
  here, see the README); the ssh hosts' burst from faulted-in memory. One launch's CPU is
  measured before and after each burst, and the limit takes the median of both.
- Through jupyter_client: N AsyncKernelManagers in one process, ours against
  gateway_provisioners' DistributedProvisioner on localhost (how many fail, hang, or are left
  running after shutdown_kernel(now=True); the longest the client's event loop was blocked).
- Scale: M RemoteKernels in the cluster (a few running, the rest finished): the operator
  restarted, how long until a new kernel is Running; its RSS; API requests a second in steady
  state (counted from the API server's metrics).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_split import CpuSplit, machine_cpu
from guest_memory import available_mib, balloon_present, burst_mib, prefault
from launch_latency import gateway_provisioners_python, kernels_left, kernelspecs, p95

from localcluster import LocalCluster, free_port
from localcluster.cluster import REPO_ROOT
from localcluster.crds import apply_profile, install_crds
from localcluster.docker import DockerEngine
from localcluster.hosts import PYTHON_MOUNT, HostPool
from localcluster.node import KubeletNode
from localcluster.servers import OperatorProcess, localhost_operator

WORK = REPO_ROOT / ".cache" / "bench-burst"
CONCURRENT = Path(__file__).with_name("many_clients.py")
GROUP, VERSION, PLURAL = "kernel-operator.io", "v1alpha1", "remotekernels"
NAMESPACE = "default"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def api_requests(api: client.ApiClient) -> float:
    """Requests the API server has served so far (its apiserver_request_total counter)."""
    method, url, headers, body, _ = api.param_serialize("GET", "/metrics", auth_settings=["BearerToken"])
    text = api.call_api(method, url, header_params=headers, body=body).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("apiserver_request_total{")
    )


class Kernels:
    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)

    def create(self, profile: str, labels: dict[str, str] | None = None, **spec: Any) -> str:
        kernel_id = str(uuid.uuid4())
        name = f"k-{kernel_id}"
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "RemoteKernel",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"kernelId": kernel_id, "username": "alice", "profile": profile, **spec},
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
        return name

    def phases(self, selector: str = "") -> dict[str, str]:
        items = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, label_selector=selector
        )
        return {i["metadata"]["name"]: (i.get("status") or {}).get("phase", "") for i in items["items"]}

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)  # type: ignore[no-any-return]
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def delete_all(self, selector: str = "", timeout: float = 300) -> None:
        for name in self.phases(selector):
            try:
                self.custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
            except ApiException as err:
                if err.status != 404:
                    raise
        deadline = time.monotonic() + timeout
        while self.phases(selector) and time.monotonic() < deadline:
            time.sleep(0.5)


SETTLED = ("Running", "Failed", "Succeeded")


def wait_settled(kernels: Kernels, names: list[str], timeout: float) -> tuple[dict[str, str], float]:
    """Wait until every kernel is Running or Failed; their phases, and when the last settled.

    By a watch, as clients wait (the provisioner does): listing a hundred kernels every 0.1 s
    cost the API server and this bench more CPU than the operator's part of a burst."""
    deadline = time.monotonic() + timeout
    mine: dict[str, str] = dict.fromkeys(names, "")
    while time.monotonic() < deadline:
        listed = kernels.custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)
        for item in listed["items"]:
            if item["metadata"]["name"] in mine:
                mine[item["metadata"]["name"]] = (item.get("status") or {}).get("phase", "")
        if all(p in SETTLED for p in mine.values()):
            return mine, time.perf_counter()
        stream = watch.Watch()
        try:
            for event in stream.stream(
                kernels.custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                NAMESPACE,
                PLURAL,
                resource_version=listed["metadata"]["resourceVersion"],
                timeout_seconds=max(1, int(deadline - time.monotonic())),
            ):
                obj = event["object"]
                if event["type"] == "ERROR":
                    break  # e.g. 410 Gone: list again
                if obj["metadata"]["name"] in mine:
                    mine[obj["metadata"]["name"]] = (obj.get("status") or {}).get("phase", "")
                    if all(p in SETTLED for p in mine.values()):
                        return mine, time.perf_counter()
        except ApiException:
            pass  # list again
        finally:
            stream.stop()
    return mine, time.perf_counter()


# How long one launch's CPU is counted from its create: past Running, because a kernel reports
# ready once its sockets are bound and finishes its start-up (its shell, its IOLoop) after that.
LAUNCH_CPU_WINDOW = 3.0
# How long the machine's idle use is measured before each single launch.
IDLE_WINDOW = 2.0
# A pause after each single launch's deletion: its pod or processes finish stopping in it, not
# in the next launch's idle window.
AFTER_DELETE = 2.0


def idle_use(seconds: float) -> tuple[float, dict[str, float]]:
    """The machine's CPU use while nothing is launched: CPU-s a second, in all and by part."""
    c0, t0 = machine_cpu(), time.perf_counter()
    split = CpuSplit().start()
    time.sleep(seconds)
    split.stop()
    took = time.perf_counter() - t0
    return (machine_cpu() - c0) / took, {k: v / took for k, v in split.parts().items()}


def one_launch_cpu(
    kernels: Kernels, profile: str, runs: int
) -> tuple[list[float], list[float], dict[str, float], float]:
    """The machine CPU seconds one launch costs (a fixed window from its create, less what the
    machine spent idle just before it), the wall seconds from create to Running, one at a time,
    the median CPU seconds of each part of the machine in that window (less its idle use), and
    the median MiB of memory one running kernel takes from the machine.

    The idle use is measured before each launch, not once: a node that has just started, or
    one still removing the containers of deleted pods, is busy for a while, and one busy idle
    window subtracted from every launch once made a pod's launch look like 0.26 CPU-s."""
    cpu, wall, splits, memory = [], [], [], []
    for _ in range(runs + 1):
        idle, idle_parts = idle_use(IDLE_WINDOW)
        split = CpuSplit().start()
        m0 = available_mib()
        c0, t0 = machine_cpu(), time.perf_counter()
        name = kernels.create(profile)
        wait_settled(kernels, [name], 120)  # as the burst waits, so like is compared with like
        wall.append(time.perf_counter() - t0)
        time.sleep(max(0.0, t0 + LAUNCH_CPU_WINDOW - time.perf_counter()))
        cpu.append(machine_cpu() - c0 - idle * (time.perf_counter() - t0))
        split.stop()
        took = time.perf_counter() - t0
        splits.append({k: v - idle_parts.get(k, 0.0) * took for k, v in split.parts().items()})
        memory.append(float(m0 - available_mib()))
        kernels.delete_all()
        time.sleep(AFTER_DELETE)
    parts = {k for s in splits[1:] for k in s}
    median = {k: statistics.median([s.get(k, 0.0) for s in splits[1:]]) for k in parts}
    return cpu[1:], wall[1:], median, statistics.median(memory[1:])  # the first is a warm-up


def burst(
    kernels: Kernels, profile: str, count: int, timeout: float, per_kernel_mib: float | None = None
) -> dict[str, Any]:
    """``count`` RemoteKernels created at once, until all settle. Given ``per_kernel_mib``, the
    memory they will use is faulted in first (guest_memory: like for like with one launch)."""
    memory: dict[str, Any] = {}
    if per_kernel_mib is not None:
        memory = prefault(burst_mib(count, per_kernel_mib, available_mib()))
    split = CpuSplit().start()
    before = available_mib()
    c0, t0 = machine_cpu(), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        names = list(pool.map(lambda _: kernels.create(profile), range(count)))
    created = time.perf_counter() - t0
    phases, settled = wait_settled(kernels, names, timeout)
    result = {
        "count": count,
        "running": sum(1 for p in phases.values() if p == "Running"),
        "failed": sum(1 for p in phases.values() if p != "Running"),
        "created_in": created,
        "wall": settled - t0,
        "cpu": machine_cpu() - c0,
        "memory": {**memory, "taken_mib": before - available_mib()},
    }
    split.stop()
    result["split"] = split.parts()
    result["started"] = split.started()
    kernels.delete_all(timeout=300)
    result["left"] = kernels_left()
    return result


def burst_against_one(
    kernels: Kernels,
    profile: str,
    count: int,
    timeout: float,
    before: list[float],
    runs: int,
    per_kernel_mib: float | None = None,
    settle: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """A burst, then one launch's CPU measured again. The CPU-bound limit takes the median of
    the single launches before and after it: what one launch costs moves with the hour on this
    VM (0.63-1.05 CPU-s for a pod within an hour), and a few launches measured only before
    the burst decided the ratio more than the burst did. ``settle`` waits until the kernels
    before are cleaned up (a node removes its containers up to a minute after the pods are
    gone), so that no clean-up is counted as the burst's or the single launches' work."""
    if settle is not None:
        settle()
    result = burst(kernels, profile, count, timeout, per_kernel_mib=per_kernel_mib)
    if settle is not None:
        result["settled_after_s"] = settle()
    after = one_launch_cpu(kernels, profile, runs)[0]
    result["one_cpu_before"] = statistics.median(before)
    result["one_cpu_after"] = statistics.median(after)
    result["one_cpu_after_runs"] = after
    result["one_cpu"] = statistics.median(before + after)
    return result


TS = re.compile(r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def log_time(line: str) -> float | None:
    match = TS.match(line)
    if not match:
        return None
    return dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def first_after(lines: list[str], words: str, after: float) -> float | None:
    for line in lines:
        t = log_time(line)
        if t is not None and t >= after - 0.001 and words in line:
            return t
    return None


def steps(
    kernels: Kernels, profile: str, operator: OperatorProcess, api: client.ApiClient
) -> dict[str, float]:
    """Where the time of one launch goes, each step's time from the client's create."""
    from jupyter_client import BlockingKernelClient

    t0 = time.time()
    name = kernels.create(profile)
    obj: dict[str, Any] = {}
    while (obj.get("status") or {}).get("phase") not in ("Running", "Failed"):
        obj = kernels.get(name) or {}
        time.sleep(0.005)
    seen = time.time()
    status = obj["status"]
    conn = status["connection"]
    secret = client.CoreV1Api(api).read_namespaced_secret(conn["secretRef"]["name"], NAMESPACE)
    import base64

    kc = BlockingKernelClient()
    kc.load_connection_info(
        {
            "ip": conn["ip"],
            "transport": "tcp",
            "signature_scheme": "hmac-sha256",
            "key": base64.b64decode(secret.data["key"]).decode(),
            "shell_port": conn["shellPort"],
            "iopub_port": conn["iopubPort"],
            "stdin_port": conn["stdinPort"],
            "control_port": conn["controlPort"],
            "hb_port": conn["hbPort"],
        }
    )
    kc.start_channels()
    kc.execute_interactive("1+1", timeout=30)
    replied = time.time()
    kc.stop_channels()
    run_dir = status["backendRef"]["runDir"]
    launcher_log = Path(run_dir, "launcher.log").read_text().splitlines()
    op_log = operator.log().splitlines()
    marks = {
        "operator recorded the launch (Launching)": first_after(
            op_log, "Launching: Launching the kernel", t0
        ),
        "backend started (launcher spawned)": first_after(op_log, "backend started the launcher", t0),
        "kernel process started (launcher start-up)": first_after(launcher_log, "The launcher of kernel", t0),
        "kernel listening": first_after(launcher_log, "The kernel listens", t0),
        "report accepted (status written)": first_after(op_log, "Running: The kernel is ready", t0),
        "client sees Running": seen,
        "first reply": replied,
    }
    kernels.delete_all()
    return {k: (v - t0 if v is not None else float("nan")) for k, v in marks.items()}


def through_jupyter_client(
    python: Path, kernel: str, count: int, env: dict[str, str], deadline: float
) -> dict[str, Any]:
    """``bench/many_clients.py`` in ``python``'s environment; None figures when it hung."""
    try:
        out = subprocess.run(
            [str(python), str(CONCURRENT), "--kernel", kernel, "--count", str(count), "--timeout", "120"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            timeout=deadline,
            check=False,
        )
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, ValueError):
        result = {"count": count, "hung": True}
    result["left"] = kernels_left(5)
    return result


def scale(
    kernels: Kernels, api: client.ApiClient, operator: OperatorProcess, profile: str, total: int, running: int
) -> dict[str, Any]:
    """``total`` RemoteKernels, ``running`` of them Running and the rest Failed; then the
    operator restarted and a new kernel launched."""
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        # Finished ones: refused at once (an unauthorized user), so they cost no kernel.
        list(
            pool.map(
                lambda _: kernels.custom.create_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    NAMESPACE,
                    PLURAL,
                    {
                        "apiVersion": f"{GROUP}/{VERSION}",
                        "kind": "RemoteKernel",
                        "metadata": {"name": f"done-{uuid.uuid4()}"},
                        "spec": {"kernelId": str(uuid.uuid4()), "username": "root", "profile": profile},
                    },
                ),
                range(total - running),
            )
        )
        names = list(pool.map(lambda _: kernels.create(profile), range(running)))
    phases, _ = wait_settled(kernels, names, 300)
    deadline = time.monotonic() + 300
    while (
        sum(1 for p in kernels.phases().values() if p in ("Failed", "Running")) < total
        and time.monotonic() < deadline
    ):
        time.sleep(1)
    assert operator.proc is not None
    time.sleep(5)
    r0, t_steady = api_requests(api), time.monotonic()
    time.sleep(20)
    steady_rps = (api_requests(api) - r0) / (time.monotonic() - t_steady)
    rss_before = rss_mb(operator.proc.pid)
    operator.stop()
    t0 = time.perf_counter()
    operator.start(timeout=120)
    name = kernels.create(profile)
    while (kernels.get(name) or {}).get("status", {}).get("phase") not in ("Running", "Failed"):
        time.sleep(0.05)
    serving = time.perf_counter() - t0
    phase = (kernels.get(name) or {}).get("status", {}).get("phase")
    time.sleep(10)
    rss_after = rss_mb(operator.proc.pid)
    result = {
        "total": total,
        "running": sum(1 for p in phases.values() if p == "Running"),
        "steady_api_rps": steady_rps,
        "rss_mb_before_restart": rss_before,
        "restart_to_new_kernel_running": serving,
        "new_kernel_phase": phase,
        "rss_mb_after_restart": rss_after,
    }
    kernels.delete_all(timeout=600)
    result["left"] = kernels_left()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100, help="kernels in a burst")
    parser.add_argument("--runs", type=int, default=5, help="single launches for the CPU cost and the steps")
    parser.add_argument("--scale", type=int, default=1000, help="RemoteKernels in the scale run (0: skip)")
    parser.add_argument("--scale-running", type=int, default=100)
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to skip: steps,burst,hosts,pods,direct,jupyter,gp,scale",
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    WORK.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    cluster = LocalCluster(WORK / "cluster")
    pool = HostPool(WORK / "hosts", network=2)
    operator = hosts_operator = pods_operator = None
    node = KubeletNode(WORK / "node", cluster, name="burst-node", index=4)  # apart from the others
    kernels: Kernels | None = None
    report: dict[str, Any] = {"cores": cores}
    try:
        print("==> Starting the control plane, the ssh hosts and the operators...", flush=True)
        cluster.start()
        api = config.new_client_from_config(config_file=str(cluster.admin_kubeconfig))
        install_crds(api)
        kernels = Kernels(api)
        while True:
            try:
                kernels.phases()
                break
            except ApiException:
                time.sleep(0.2)
        apply_profile(api, "local", {"backend": "ssh", "ssh": {"hosts": ["localhost"]}})
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name="remote-kernel-operator"))
        )
        operator = localhost_operator(cluster.admin_kubeconfig, WORK / "operator.log")
        operator.start()
        cpu, wall, split, mib = one_launch_cpu(kernels, "local", args.runs)
        report["balloon"] = balloon_present()
        report["one_launch"] = {
            "split": split,
            "mib": mib,
            "cpu_p50": statistics.median(cpu),
            "wall_p50": statistics.median(wall),
            "wall_p95": p95(wall),
        }
        if "steps" not in skip:
            runs = [steps(kernels, "local", operator, api) for _ in range(args.runs)]
            report["steps"] = {k: statistics.median([r[k] for r in runs]) for k in runs[0]}
        if "burst" not in skip:
            print(
                f"==> Burst: {args.count} RemoteKernels at once on localhost, memory as it is...", flush=True
            )
            report["burst_local_cold"] = burst_against_one(kernels, "local", args.count, 600, cpu, args.runs)
            print(
                f"==> Burst: {args.count} RemoteKernels at once on localhost, memory faulted in...",
                flush=True,
            )
            before = report["burst_local_cold"]["one_cpu_after_runs"]
            report["burst_local"] = burst_against_one(
                kernels, "local", args.count, 600, before, args.runs, per_kernel_mib=mib
            )
        if "hosts" not in skip:
            pool.start()
            known = WORK / "hosts" / "known_hosts"
            known.write_text(pool.known_hosts())
            addresses = [h.address for h in pool.hosts.values()]
            apply_profile(
                api,
                "hosts",
                {
                    "backend": "ssh",
                    "ssh": {"hosts": addresses, "user": "root", "python": f"{PYTHON_MOUNT}/bin/python"},
                },
            )
            hosts_operator = OperatorProcess(
                kubeconfig=cluster.admin_kubeconfig,
                log_path=WORK / "hosts-operator.log",
                env={
                    "RKO_OPERATOR_CLASS": "hosts",
                    "RKO_RESPONSE_BIND": f"{pool.gateway}:{free_port()}",
                    "RKO_SSH_USER": "root",
                    "RKO_SSH_KEY_FILE": str(pool.client_key),
                    "RKO_SSH_KNOWN_HOSTS": str(known),
                    "RKO_SSH_PYTHON": f"{PYTHON_MOUNT}/bin/python",
                },
            )
            hosts_operator.start()
            print(f"==> Burst: {args.count} RemoteKernels at once on three ssh hosts...", flush=True)
            labels = {"kernel-operator.io/operator-class": "hosts"}
            orig = kernels.create
            kernels.create = lambda profile, **kw: orig(profile, labels=labels, **kw)  # type: ignore[method-assign]
            hcpu, _, hsplit, hmib = one_launch_cpu(kernels, "hosts", args.runs)
            report["one_launch_hosts_cpu_p50"] = statistics.median(hcpu)
            report["one_launch_hosts_split"] = hsplit
            report["burst_hosts"] = burst_against_one(
                kernels, "hosts", args.count, 600, hcpu, args.runs, per_kernel_mib=hmib
            )
            kernels.create = orig  # type: ignore[method-assign]
        if "pods" not in skip:
            engine = DockerEngine()
            engine.start()
            image = engine.build_kernel_image()
            node.plumb()
            node.start(engine.env)
            node.import_images(image, docker_env=engine.env)
            apply_profile(api, "pods", {"backend": "kubernetes", "image": image})
            pods_operator = OperatorProcess(
                kubeconfig=cluster.admin_kubeconfig,
                log_path=WORK / "pods-operator.log",
                # On the node's gateway, which its pods reach.
                env={
                    "RKO_OPERATOR_CLASS": "pods",
                    "RKO_RESPONSE_BIND": f"{node.addresses.gateway}:{free_port()}",
                },
            )
            pods_operator.start()
            labels = {"kernel-operator.io/operator-class": "pods"}
            orig = kernels.create
            kernels.create = lambda profile, **kw: orig(profile, labels=labels, **kw)  # type: ignore[method-assign]
            pcpu, _, psplit, pmib = one_launch_cpu(kernels, "pods", args.runs)
            report["one_launch_pods_cpu_p50"] = statistics.median(pcpu)
            report["one_launch_pods_split"] = psplit
            print(
                f"==> Burst: {args.count} RemoteKernels at once as pods on one real node, memory as it is...",
                flush=True,
            )
            cold = burst_against_one(
                kernels, "pods", args.count, 900, pcpu, args.runs, settle=node.wait_empty
            )
            report["burst_pods_cold"] = cold
            print(
                f"==> Burst: {args.count} RemoteKernels at once as pods on one real node, memory faulted in...",
                flush=True,
            )
            report["burst_pods"] = burst_against_one(
                kernels,
                "pods",
                args.count,
                900,
                cold["one_cpu_after_runs"],
                args.runs,
                per_kernel_mib=pmib,
                settle=node.wait_empty,
            )
            kernels.create = orig  # type: ignore[method-assign]
        if {"direct", "jupyter", "gp"} - skip:
            jupyter = kernelspecs(
                Path(tempfile.mkdtemp(prefix="rko-burst-")), cluster.admin_kubeconfig, "unused:0"
            )
            env = {**os.environ, "JUPYTER_PATH": str(jupyter), "KERNEL_USERNAME": "alice"}
            if "direct" not in skip:
                print(f"==> {args.count} AsyncKernelManagers at once, direct local ipykernels...", flush=True)
                report["jupyter_direct"] = through_jupyter_client(
                    Path(sys.executable), "python3", args.count, env, 300
                )
            if "jupyter" not in skip:
                print(f"==> {args.count} AsyncKernelManagers at once, our provisioner...", flush=True)
                report["jupyter_ours"] = through_jupyter_client(
                    Path(sys.executable), "rk_local", args.count, env, 300
                )
            if "gp" not in skip:
                gp_python = gateway_provisioners_python()
                gp_env = {
                    **env,
                    "PATH": f"{gp_python.parent}{os.pathsep}{env['PATH']}",
                    "GP_RESPONSE_IP": "127.0.0.1",
                    "GP_KERNEL_LOG_DIR": str(WORK),  # its kernels' logs here, not left in /tmp
                }
                for n in sorted({30, args.count}):
                    print(f"==> {n} AsyncKernelManagers at once, gateway_provisioners...", flush=True)
                    report[f"jupyter_gp_{n}"] = through_jupyter_client(gp_python, "gp_ssh", n, gp_env, 150)
                    subprocess.run(["pkill", "-f", "ipykernel_launcher|launch_ipykernel"], check=False)
        if args.scale and "scale" not in skip:
            print(f"==> Scale: {args.scale} RemoteKernels, {args.scale_running} running...", flush=True)
            report["scale"] = scale(kernels, api, operator, "local", args.scale, args.scale_running)
    finally:
        if kernels is not None:  # a part that failed may leave kernels: their operators stop them
            with contextlib.suppress(Exception):
                kernels.delete_all(timeout=120)
        for proc in (operator, hosts_operator, pods_operator):
            if proc is not None:
                proc.stop()
        node.stop()
        pool.stop()
        cluster.stop()
        (WORK / "report.json").write_text(json.dumps(report, indent=2))
        print_report(report)  # what was measured, even when a later part failed
    return 0


def print_split(
    one: dict[str, float], burst: dict[str, float], count: int, started: dict[str, int] | None = None
) -> None:
    """Where the CPU went: one launch against a burst's share per kernel, part by part."""
    print("\nWhere the CPU went (CPU-s per kernel): one launch alone, and a burst's total / N:")
    print("| part | one launch | in the burst | burst / one |\n|---|---:|---:|---:|")
    for part in sorted(set(one) | set(burst), key=lambda p: -burst.get(p, 0.0)):
        a, b = one.get(part, 0.0), burst.get(part, 0.0) / count
        ratio = f"{b / a:.2f}x" if a > 0.005 else "-"
        print(f"| {part} | {a:.3f} | {b:.3f} | {ratio} |")
    a, b = sum(one.values()), sum(burst.values()) / count
    print(f"| all | {a:.3f} | {b:.3f} | {b / a:.2f}x |")
    if started:
        print("Processes started in the burst: " + ", ".join(f"{part} {n}" for part, n in started.items()))


def print_report(r: dict[str, Any]) -> None:
    cores = r["cores"]
    if "one_launch" not in r:
        return
    one = r["one_launch"]
    print()
    print(
        f"One launch (ssh backend, localhost), create -> Running: p50 {one['wall_p50']:.3f} s, p95 {one['wall_p95']:.3f} s; "
        f"the machine spent {one['cpu_p50']:.2f} CPU-s on it ({cores} cores; counted for "
        f"{LAUNCH_CPU_WINDOW:g} s from the create, less the machine's idle use)."
    )
    if "steps" in r:
        print("\nWhere the time of one launch goes (p50, seconds since the client's create):")
        print("| step | at | step took |\n|---|---:|---:|")
        prev = 0.0
        for k, v in r["steps"].items():
            print(f"| {k} | {v:.3f} | {v - prev:.3f} |")
            prev = v
    if any(k.startswith("burst_") for k in r):
        print(
            f"\nMemory: one kernel takes {one.get('mib', 0):.0f} MiB of the machine's available memory; "
            + (
                "a virtio balloon is bound, so the host may take back what the guest leaves free, "
                "and a first touch of that memory costs more: a burst marked 'memory faulted in' "
                "had the memory it uses touched first, as one launch finds it (the pages the "
                "launch before it freed)."
                if r.get("balloon")
                else "no virtio balloon is bound."
            )
        )
    for key, label, split_key in (
        ("burst_local_cold", "ssh backend, localhost, memory as it is", None),
        ("burst_local", "ssh backend, localhost", None),
        ("burst_hosts", "ssh backend, 3 ssh hosts", "one_launch_hosts_split"),
        (
            "burst_pods_cold",
            "kubernetes backend, pods on one real node, memory as it is",
            "one_launch_pods_split",
        ),
        ("burst_pods", "kubernetes backend, pods on one real node", "one_launch_pods_split"),
    ):
        if key not in r:
            continue
        b = r[key]
        cpu_one = b["one_cpu"]
        limit = b["count"] * cpu_one / cores
        mem = b.get("memory", {})
        if "first_s_per_gib" in mem:  # faulted in first
            label += (
                f", memory faulted in ({mem['mib'] / 1024:.1f} GiB: first touch "
                f"{mem['first_s_per_gib']:.2f} s/GiB, again {mem['again_s_per_gib']:.2f} s/GiB)"
            )
        if "taken_mib" in mem:
            label += f"; all settled, the kernels held {mem['taken_mib'] / 1024:.1f} GiB"
        print(f"\nBurst, {b['count']} RemoteKernels created at once, {label}:")
        print(
            "| Running | failed | all settled (s) | CPU-bound limit (s) | ratio | machine CPU-s | left running |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        print(
            f"| {b['running']} | {b['failed']} | {b['wall']:.1f} | {limit:.1f} | {b['wall'] / limit:.2f}x | {b['cpu']:.0f} | {b['left']} |"
        )
        if "one_cpu_after" in b:
            print(
                f"One launch: {b['one_cpu_before']:.3f} CPU-s before the burst, {b['one_cpu_after']:.3f} "
                f"after; the limit uses {cpu_one:.3f} (the median of both); in the burst "
                f"{b['cpu'] / b['count']:.3f} CPU-s a kernel."
            )
        one_split = r.get(split_key) if split_key else one.get("split")
        if b.get("split") and one_split:
            print_split(one_split, b["split"], b["count"], b.get("started"))
    rows = [(k, v) for k, v in r.items() if k.startswith("jupyter_")]
    if rows:
        print(
            "\nN AsyncKernelManagers at once in one process (start -> 1+1), then shutdown_kernel(now=True):"
        )
        print(
            "| client | N | ok | failed | hung | wall (s) | p50 (s) | loop blocked max (s) | left running |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for k, v in rows:
            who = {
                "jupyter_ours": "remote-kernel-operator (ssh, localhost)",
                "jupyter_direct": "jupyter_client direct local launch",
            }.get(k, "gateway_provisioners 0.5.0 (DistributedProvisioner, localhost)")
            if v.get("hung"):
                print(f"| {who} | {v['count']} | - | - | yes | - | - | - | {v['left']} |")
            else:
                p50 = f"{v['p50']:.1f}" if v.get("p50") else "-"
                print(
                    f"| {who} | {v['count']} | {v['ok']} | {v['failed']} | no | {v['wall']:.1f} | {p50} | {v['loop_blocked_max']:.2f} | {v['left']} |"
                )
    if "scale" in r:
        s = r["scale"]
        print(f"\nScale: {s['total']} RemoteKernels ({s['running']} Running, the rest Failed):")
        print(
            f"- operator RSS {s['rss_mb_before_restart']:.0f} MB; after a restart {s['rss_mb_after_restart']:.0f} MB"
        )
        print(
            f"- restarted, a new kernel {s['new_kernel_phase']} after {s['restart_to_new_kernel_running']:.1f} s"
        )
        print(f"- API requests a second in steady state (whole API server): {s['steady_api_rps']:.1f}")
        print(f"- left running after deleting them all: {s['left']}")


if __name__ == "__main__":
    sys.exit(main())
