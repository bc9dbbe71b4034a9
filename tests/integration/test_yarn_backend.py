"""The yarn backend against a real YARN: Hadoop's MiniYARNCluster on loopback.

An operator of its own class ("yarn") serves these tests, impersonating (each kernel's YARN
application runs as its user). Plain kernels run under our ApplicationMaster (LauncherAM);
Spark kernels are Spark drivers submitted by PyPI's pyspark in cluster mode. After every test
no YARN application may be left running.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import AsyncKernelManager
from kubernetes import client

from localcluster import free_port
from localcluster.servers import OperatorProcess
from localcluster.yarn import MiniYarn, operator_env
from tests.helpers import wait_for

from .conftest import _timings, delete_remote_kernels, ensure_namespace, launcher_processes
from .test_faults import settle
from .test_operator_ssh import (
    GROUP,
    PLURAL,
    VERSION,
    _reply_to,
    delete_and_wait_gone,
    get,
    make_kernel,
    ready_client,
    start_remote_kernel,
    wait_phase,
)

CLASS = "yarn"
LABELS = {f"{GROUP}/operator-class": CLASS}
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def mini_yarn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MiniYarn]:
    yarn = MiniYarn(tmp_path_factory.mktemp("yarn"))
    yarn.start()
    print(f"MiniYARNCluster started in {yarn.started_in:.1f} s at {yarn.web}")
    yield yarn
    yarn.stop()


@pytest.fixture(scope="module")
def dead_endpoint() -> str:
    """A ResourceManager address where nothing answers (the first of an HA pair, down)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def yarn_operator(
    crd: None,
    api_client: client.ApiClient,
    kubeconfig: Path,
    mini_yarn: MiniYarn,
    dead_endpoint: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    ensure_namespace(api_client, "rko-system")
    proc = OperatorProcess(
        kubeconfig=kubeconfig,
        log_path=tmp_path_factory.mktemp("yarn-operator") / "operator.log",
        env={
            "RKO_OPERATOR_CLASS": CLASS,
            "RKO_NAMESPACE": "rko-system",
            "RKO_MONITOR_INTERVAL": "0.5",
            "RKO_IMPERSONATION": "true",
            # Long enough to ride out a ResourceManager restart.
            "RKO_UNREACHABLE_GRACE_SECONDS": "90",
            **operator_env(mini_yarn, f"127.0.0.1:{free_port()}", dead_endpoint),
        },
    )
    proc.start()
    yield proc
    delete_remote_kernels(api_client, CLASS)
    proc.stop()


@pytest.fixture(autouse=True)
def no_application_left(mini_yarn: MiniYarn) -> Iterator[None]:
    yield
    wait_for(
        lambda: not mini_yarn.running_applications(),
        timeout=30,
        what="every YARN application of the test to end",
    )
    # The NodeManager ends a killed container's process group; nothing of the kernel remains.
    wait_for(
        lambda: not launcher_processes(),
        timeout=15,
        what="launcher and kernel processes to exit",
        found=launcher_processes,
    )


def yarn_kernel(
    tmp_path: Path, kubeconfig: Path, namespace: str, monkeypatch: pytest.MonkeyPatch, **backend: Any
) -> Any:
    return start_remote_kernel(
        tmp_path,
        kubeconfig,
        namespace,
        monkeypatch,
        backend="yarn",
        operator_class=CLASS,
        launch_timeout=120,
        backend_config=backend,
    )


def app_of(custom: client.CustomObjectsApi, namespace: str, kernel_id: str) -> str:
    obj = get(custom, namespace, f"k-{kernel_id}")  # the provisioner names it after the kernel
    assert obj is not None, f"no RemoteKernel for kernel {kernel_id}"
    return str(obj["status"]["backendRef"]["applicationId"])


async def _output(kc: Any, code: str) -> str:
    chunks: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        content = msg["content"]
        if msg["msg_type"] == "stream":
            chunks.append(content["text"])
        elif msg["msg_type"] == "execute_result":
            chunks.append(content["data"]["text/plain"])
        elif msg["msg_type"] == "error":
            chunks.append(f"{content['ename']}: {content['evalue']}")

    reply = await kc.execute_interactive(code, output_hook=hook, timeout=120)
    assert reply["content"]["status"] == "ok", "".join(chunks)
    return "".join(chunks).strip()


def test_the_test_node_is_healthy_however_full_the_machines_disk_is(mini_yarn: MiniYarn) -> None:
    """YARN's default marks a disk bad at 90 % used; CI's shared disk crossed it once and every
    application then waited for room that never came. Only a full disk counts here."""
    [node] = mini_yarn.get("/nodes")["nodes"]["node"]
    assert (node["state"], node["healthReport"]) == ("RUNNING", ""), node
    site = (mini_yarn.conf_dir / "yarn-site.xml").read_text()
    key = "yarn.nodemanager.disk-health-checker.max-disk-utilization-per-disk-percentage"
    assert f"<name>{key}</name><value>100.0</value>" in site


async def test_python_code_runs_in_a_yarn_application_interrupt_restart_shutdown(
    yarn_operator: OperatorProcess,
    mini_yarn: MiniYarn,
    custom: client.CustomObjectsApi,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.monotonic()
    km: AsyncKernelManager = await yarn_kernel(tmp_path, kubeconfig, namespace, monkeypatch)
    kernel_id = str(km.kernel_id)
    async with ready_client(km) as kc:
        print(f"YARN kernel ready in {time.monotonic() - started:.2f} s")
        out = await _output(
            kc,
            "import os; print(os.environ['KERNEL_USERNAME'], os.environ['CONTAINER_ID'].startswith('container_'))",
        )
        assert out == "alice True"
        assert await _output(kc, "6 * 7") == "42"
        msg_id = kc.execute("import time; time.sleep(60)")
        time.sleep(1)
        await km.interrupt_kernel()
        reply = await _reply_to(kc, msg_id, timeout=15)
        assert reply["content"]["ename"] == "KeyboardInterrupt"

    first_app = app_of(custom, namespace, kernel_id)
    app = mini_yarn.application(first_app)
    assert app["state"] == "RUNNING" and app["user"] == "alice" and app["applicationType"] == "JUPYTER_KERNEL"
    assert f"rko-kernel-{kernel_id}" in app["applicationTags"]
    assert "rko.launch.token" not in str(app)  # the token never shows in YARN's reports

    await km.restart_kernel()
    async with ready_client(km) as kc:
        assert await _output(kc, "'time' in globals()") == "False"  # a fresh kernel
    second_app = app_of(custom, namespace, str(km.kernel_id))
    assert second_app != first_app
    assert mini_yarn.application(first_app)["state"] in ("KILLED", "FINISHED")

    started = time.monotonic()
    await km.shutdown_kernel()
    print(f"YARN kernel shut down in {time.monotonic() - started:.2f} s")
    assert mini_yarn.application(second_app)["state"] in ("KILLED", "FINISHED")
    assert not custom.list_namespaced_custom_object(GROUP, "v1alpha1", namespace, "remotekernels")["items"]


@pytest.mark.parametrize("init", ["lazy", "eager"])
async def test_a_spark_kernel_runs_a_spark_job_on_yarn(
    init: str,
    yarn_operator: OperatorProcess,
    mini_yarn: MiniYarn,
    custom: client.CustomObjectsApi,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.monotonic()
    km: AsyncKernelManager = await yarn_kernel(
        tmp_path,
        kubeconfig,
        namespace,
        monkeypatch,
        spark=True,
        sparkInitMode=init,
        driverMemory="512m",
        executorMemory="512m",
    )
    async with ready_client(km) as kc:
        print(f"Spark kernel ({init}) ready in {time.monotonic() - started:.2f} s")
        assert await _output(kc, "spark.range(1000).selectExpr('sum(id)').first()[0]") == "499500"
        assert await _output(kc, "sc.range(1000).sum()") == "499500"
        mode = await _output(kc, "print(sc.master, sc.getConf().get('spark.submit.deployMode'))")
        assert mode == "yarn cluster"
    app = mini_yarn.application(app_of(custom, namespace, str(km.kernel_id)))
    assert app["applicationType"] == "SPARK" and app["user"] == "alice" and app["state"] == "RUNNING"
    await km.shutdown_kernel()
    assert mini_yarn.application(app["id"])["state"] in ("KILLED", "FINISHED")


def test_a_killed_application_turns_the_kernel_failed_with_yarns_reason(
    yarn_operator: OperatorProcess, mini_yarn: MiniYarn, custom: client.CustomObjectsApi, namespace: str
) -> None:
    name, _ = make_kernel(namespace, custom, labels=LABELS, backend="yarn", launchTimeoutSeconds=120)
    running = wait_phase(custom, namespace, name, "Running", "Failed", timeout=120)
    assert running["status"]["phase"] == "Running", running["status"]
    app_id = running["status"]["backendRef"]["applicationId"]
    mini_yarn.kill(app_id)
    killed_at = time.monotonic()
    failed = wait_phase(custom, namespace, name, "Failed", timeout=30)
    print(f"Killed application noticed in {time.monotonic() - killed_at:.2f} s")
    status = failed["status"]
    assert status["reason"] == "ApplicationKilled"
    assert app_id in status["message"] and "killed by user" in status["message"].lower()
    delete_and_wait_gone(custom, namespace, name)


@pytest.mark.parametrize(
    ("queue", "reason", "words"),
    [("tiny", "QueueFull", "without room"), ("nosuch", "ApplicationFailed", "nosuch")],
)
def test_a_queue_that_cannot_take_the_kernel_fails_it_within_seconds(
    yarn_operator: OperatorProcess,
    mini_yarn: MiniYarn,
    custom: client.CustomObjectsApi,
    namespace: str,
    queue: str,
    reason: str,
    words: str,
) -> None:
    started = time.monotonic()
    name, _ = make_kernel(
        namespace,
        custom,
        labels=LABELS,
        backend="yarn",
        launchTimeoutSeconds=300,
        yarn={"queue": queue, "queueWaitSeconds": 3},
    )
    failed = wait_phase(custom, namespace, name, "Failed", "Running", timeout=60)
    seconds = time.monotonic() - started
    status = failed["status"]
    assert status["phase"] == "Failed" and status["reason"] == reason, status
    assert words in status["message"] and seconds < 30, (seconds, status["message"])
    print(f"queue {queue!r}: Failed in {seconds:.1f} s: {status['message'][:200]}")
    delete_and_wait_gone(custom, namespace, name)


async def test_the_kernel_survives_a_resource_manager_restart(
    yarn_operator: OperatorProcess,
    mini_yarn: MiniYarn,
    custom: client.CustomObjectsApi,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    km: AsyncKernelManager = await yarn_kernel(tmp_path, kubeconfig, namespace, monkeypatch)
    kernel_id = str(km.kernel_id)
    async with ready_client(km) as kc:
        assert await _output(kc, "x = 20; x + 1") == "21"
        began = time.monotonic()
        mini_yarn.restart_resource_manager()
        print(f"ResourceManager restarted in {time.monotonic() - began:.1f} s")
        assert await _output(kc, "x + 2") == "22"  # the kernel never noticed
    app_id = app_of(custom, namespace, kernel_id)
    # Recovered by the new ResourceManager; the ApplicationMaster registered with it again.
    wait_for(
        lambda: mini_yarn.application(app_id)["state"] == "RUNNING", timeout=60, what="the app to be RUNNING"
    )
    time.sleep(2)  # a few monitor rounds against the new ResourceManager
    objs = custom.list_namespaced_custom_object(GROUP, "v1alpha1", namespace, "remotekernels")["items"]
    assert [o["status"]["phase"] for o in objs] == ["Running"]
    await km.shutdown_kernel()
    assert mini_yarn.application(app_id)["state"] in ("KILLED", "FINISHED")


def test_a_resource_manager_restarted_during_launches_loses_nothing(
    yarn_operator: OperatorProcess,
    mini_yarn: MiniYarn,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    """The ResourceManager restarts while three kernels are being submitted and started: each
    ends Running and runs code, or Failed with a reason; deleting them leaves no application
    (the autouse fixture) and no process."""
    names: dict[str, str] = {}
    for _ in range(3):
        name, kernel_id = make_kernel(
            namespace, custom, labels=LABELS, backend="yarn", launchTimeoutSeconds=240
        )
        names[name] = kernel_id
    time.sleep(1.0)
    began = time.monotonic()
    mini_yarn.restart_resource_manager()
    restarted = time.monotonic() - began
    outcomes = settle(custom, api_client, namespace, names, timeout=240)
    running = list(outcomes.values()).count("Running")
    print(
        f"ResourceManager restarted in {restarted:.1f} s during 3 launches: {running}/3 Running; {outcomes}"
    )
    for name in names:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(lambda: all(get(custom, namespace, n) is None for n in names), timeout=90, what="all deleted")
    tags = {f"rko-kernel-{k}" for k in names.values()}
    wait_for(
        lambda: (
            not [
                a
                for a in mini_yarn.running_applications()
                if tags & set((a.get("applicationTags") or "").split(","))
            ]
        ),
        timeout=60,
        what="their applications to end",
    )


async def test_the_alternate_resource_manager_is_used_when_the_first_is_down(
    yarn_operator: OperatorProcess,
    dead_endpoint: str,
    mini_yarn: MiniYarn,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    km: AsyncKernelManager = await yarn_kernel(
        tmp_path, kubeconfig, namespace, monkeypatch, endpoint=dead_endpoint, altEndpoint=mini_yarn.web
    )
    async with ready_client(km) as kc:
        assert await _output(kc, "1 + 1") == "2"
    await km.shutdown_kernel()


@pytest.mark.parametrize(
    ("username", "yarn", "reason", "words"),
    [
        ("root", {}, "Unauthorized", "root"),
        ("alice", {"spark": True, "sparkOpts": "--proxy-user bob"}, "InvalidSparkOptions", "--proxy-user"),
        (
            "alice",
            {"spark": True, "sparkOpts": "--conf spark.yarn.queue=x"},
            "InvalidSparkOptions",
            "spark.yarn.queue",
        ),
        ("alice", {"endpoint": "http://10.1.2.3:8088"}, "EndpointNotAllowed", "10.1.2.3"),
        ("alice", {"queue": "bad queue"}, "InvalidQueue", "bad queue"),
        ("alice", {"spark": True, "driverMemory": "lots"}, "InvalidMemory", "lots"),
        ("alice", {"securityEnabled": True}, "KerberosUnavailable", "requests-kerberos"),
    ],
)
def test_bad_yarn_requests_fail_with_a_reason_and_submit_nothing(
    yarn_operator: OperatorProcess,
    mini_yarn: MiniYarn,
    custom: client.CustomObjectsApi,
    namespace: str,
    username: str,
    yarn: dict[str, Any],
    reason: str,
    words: str,
) -> None:
    before = len(mini_yarn.applications())
    name, _ = make_kernel(namespace, custom, labels=LABELS, backend="yarn", username=username, yarn=yarn)
    failed = wait_phase(custom, namespace, name, "Failed", timeout=20)
    assert failed["status"]["reason"] == reason and words in failed["status"]["message"], failed["status"]
    assert len(mini_yarn.applications()) == before
    delete_and_wait_gone(custom, namespace, name)


def test_a_node_label_reaches_yarn(
    yarn_operator: OperatorProcess, mini_yarn: MiniYarn, custom: client.CustomObjectsApi, namespace: str
) -> None:
    # The test YARN has no node labels, so YARN itself refuses the request: proof it got there.
    name, _ = make_kernel(namespace, custom, labels=LABELS, backend="yarn", yarn={"nodeLabel": "gpu"})
    failed = wait_phase(custom, namespace, name, "Failed", timeout=30)
    assert "gpu" in failed["status"]["message"] or "label" in failed["status"]["message"].lower(), failed[
        "status"
    ]
    print(f"node label: {failed['status']['reason']}: {failed['status']['message'][:300]}")
    delete_and_wait_gone(custom, namespace, name)


def test_a_spark_kernel_claimed_from_a_pool_has_spark_ready_at_once(
    yarn_operator: OperatorProcess,
    mini_yarn: MiniYarn,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    """Impersonation is on (the kernel runs as its user), so the pool is alice's own; its
    kernels start Spark eagerly, and a claim has spark and sc at hand."""
    import uuid

    from tests.profiles import ensure_profile

    from .test_pools import connect, run

    profile = ensure_profile(api_client, {"backend": "yarn", "yarn": {"spark": True}}, name="pool-spark")
    memory = {"driverMemory": "512m", "executorMemory": "512m"}
    labels = {"kernel-operator.io/operator-class": CLASS}
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "remotekernelpools",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "RemoteKernelPool",
            "metadata": {"name": "spark", "labels": labels},
            "spec": {
                "profile": profile,
                "replicas": 1,
                "username": "alice",
                "template": {"yarn": memory, "launchTimeoutSeconds": 180},
            },
        },
    )
    wait_for(
        lambda: (
            (
                custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, "remotekernelpools", "spark"
                ).get("status")
                or {}
            ).get("ready")
            == 1
        ),
        timeout=180,
        what="a pooled Spark kernel to be ready",
    )
    kernel_id = str(uuid.uuid4())
    name = f"k-{kernel_id}"
    started = time.monotonic()
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "RemoteKernel",
            "metadata": {"name": name, "labels": labels},
            "spec": {"kernelId": kernel_id, "username": "alice", "profile": profile, "yarn": memory},
        },
    )
    obj = wait_phase(custom, namespace, name, "Running", "Failed", timeout=60)
    running = time.monotonic() - started
    assert obj["status"]["reason"] == "ClaimedFromPool", obj["status"]
    kc = connect(api_client, namespace, obj)
    try:
        counted = time.monotonic()
        assert run(kc, "print(spark.range(1000).count())").strip() == "1000"
        first_job = time.monotonic() - counted
        assert run(
            kc, "import os; print(os.environ['KERNEL_ID'], os.environ['KERNEL_USERNAME'])"
        ).split() == [
            kernel_id,
            "alice",
        ]
    finally:
        kc.stop_channels()
    _timings["pooled Spark-on-YARN kernel: RemoteKernel created -> Running (s)"] = running
    _timings["pooled Spark-on-YARN kernel: first spark.range(1000).count() (s)"] = first_job
    app = mini_yarn.application(obj["status"]["backendRef"]["applicationId"])
    assert app["applicationType"] == "SPARK" and app["user"] == "alice"
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "remotekernelpools", "spark")
    delete_and_wait_gone(custom, namespace, name, timeout=60)


async def test_kernels_start_from_the_migrated_spark_and_scala_yarn_kernelspecs(
    gp_kernelspecs: Path,
    yarn_operator: OperatorProcess,
    mini_yarn: MiniYarn,
    custom: client.CustomObjectsApi,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gateway_provisioners' YARN kernelspecs, migrated: its Spark one, and its Scala one (which
    GP 0.5.0 itself wrote as an unfilled template)."""
    from .test_migrate import apply_migrated, run_migrated

    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    for name, value in (("KERNEL_DRIVER_MEMORY", "1g"), ("KERNEL_EXECUTOR_MEMORY", "512m")):
        monkeypatch.setenv(name, value)
    profiles = apply_migrated(
        gp_kernelspecs, tmp_path, custom, namespace, monkeypatch, "--operator-class", CLASS
    )
    assert next(p for p in profiles if p["metadata"]["name"] == "gp-yarn-spark")["spec"]["yarn"] == {
        "spark": True
    }
    assert (
        await run_migrated("gp_yarn_spark", "print(sc.range(1000).sum())", custom, namespace, ready=120)
        == "499500"
    )
    scala = 'println(sc.parallelize(1 to 1000).sum + " " + sc.master)'
    assert await run_migrated("gp_yarn_scala", scala, custom, namespace, ready=300) in (
        "500500.0 yarn",
        "500500 yarn",
    )


async def test_a_scala_kernel_runs_toree_as_the_spark_driver_on_yarn(
    yarn_operator: OperatorProcess,
    mini_yarn: MiniYarn,
    custom: client.CustomObjectsApi,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Toree in the cluster-mode driver's JVM (ToreeDriver), the launcher beside it: Spark and
    Spark SQL on YARN, an interrupt, and a shutdown that ends the application."""
    from remote_kernel_provisioner.cli import main as spec_cli
    from tests.profiles import ensure_profile

    from .test_scala_kernels import run_scala, scala_notebook

    profile = ensure_profile(custom.api_client, {"backend": "yarn", "languages": ["scala"]})
    prefix = tmp_path / "prefix"
    assert (
        spec_cli(
            [
                "install",
                "--prefix",
                str(prefix),
                "--language",
                "scala",
                "--kernel-name",
                "yarn_scala",
                "--profile",
                profile,
                "--namespace",
                namespace,
                "--operator-class",
                CLASS,
                "--launch-timeout",
                "300",
            ]
        )
        == 0
    )
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    for name, value in (
        ("KERNEL_USERNAME", "alice"),
        ("KERNEL_DRIVER_MEMORY", "1g"),
        ("KERNEL_EXECUTOR_MEMORY", "512m"),
    ):
        monkeypatch.setenv(name, value)
    # The notebook (nbclient), on YARN: Spark's master is yarn, and the driver is Toree's JVM.
    assert scala_notebook("yarn_scala", "on YARN")[3] == "yarn"
    # Interrupt and shutdown through jupyter_client; the application ends with the kernel.
    km = AsyncKernelManager(kernel_name="yarn_scala")
    await km.start_kernel(env={**os.environ})
    try:
        async with ready_client(km, timeout=240) as kc:
            reply, out = await run_scala(kc, 'sc.getConf.get("spark.submit.deployMode")', timeout=240)
            assert reply["status"] == "ok" and out == "cluster", (reply, out)
            msg_id = kc.execute("Thread.sleep(120000)")
            await asyncio.sleep(3)
            await km.interrupt_kernel()
            interrupted = await _reply_to(kc, msg_id, timeout=60)
            assert interrupted["content"]["status"] == "error"
            assert "InterruptedException" in interrupted["content"]["ename"]
        app = mini_yarn.application(app_of(custom, namespace, str(km.kernel_id)))
        assert app["applicationType"] == "SPARK" and app["user"] == "alice" and app["state"] == "RUNNING"
    finally:
        await km.shutdown_kernel(now=True)
    assert mini_yarn.application(app["id"])["state"] in ("KILLED", "FINISHED")
