"""Scala kernels (Apache Toree from PyPI's toree 0.5.0, Spark from pyspark 3.5.3) through the same
launcher, handshake and control port as Python and R: over ssh through a real sshd, run by
nbclient and by jupyter_client's AsyncKernelManager; kernelspecs made by our installer."""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync
from kubernetes import client
from nbclient import NotebookClient

from localcluster.servers import OperatorProcess, Sshd
from remote_kernel_provisioner.cli import main as spec_cli
from tests.helpers import wait_for
from tests.profiles import ensure_profile

from .test_operator_ssh import GROUP, PLURAL, VERSION, _reply_to, get, make_kernel, ready_client, wait_phase
from .test_pools import claimer, connect, delete_pool, make_pool, pool_status

pytestmark = pytest.mark.timeout(420)
SCALA_PROFILE = {"backend": "ssh", "languages": ["scala"], "ssh": {"hosts": ["127.0.0.1"]}}


def toree_jvms() -> list[str]:
    """Toree JVMs on this machine, by their command lines."""
    found = subprocess.run(["pgrep", "-af", "org.apache.toree.Main"], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


@pytest.fixture
def scala_kernelspec(
    custom: client.CustomObjectsApi,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    """`remote-kernel-spec install --language scala` against the administrator's Scala profile."""
    profile = ensure_profile(custom.api_client, SCALA_PROFILE)
    prefix = tmp_path / "prefix"
    args = ["install", "--prefix", str(prefix), "--language", "scala", "--kernel-name", "remote_scala"]
    assert (
        spec_cli([*args, "--namespace", namespace, "--profile", profile, "--remote-hosts", "127.0.0.1"]) == 0
    )
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("KERNEL_USERNAME", "alice")
    return "remote_scala"


def scala_notebook(kernel_name: str, where: str) -> list[str]:
    """The issue's notebook, run by nbclient on ``kernel_name``: RDD and Spark SQL results, the
    user and Spark's version, and where Spark runs (``sc.master``).

    Toree publishes a cell's result and its idle status from different actors, so under load the
    result can come after the idle (seen once in CI, on YARN), where nbclient no longer listens
    (JupyterLab does). A cell left without output is given the result that arrives within 10 s
    after it, and the late arrivals are printed."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("sc.parallelize(1 to 1000).sum"),
        nbformat.v4.new_code_cell(
            'spark.sql("SELECT count(*) AS n, sum(id) AS s FROM range(100)").collect()(0).toString'
        ),
        nbformat.v4.new_code_cell('sys.env("KERNEL_USERNAME") + " " + spark.version'),
        nbformat.v4.new_code_cell("sc.master"),
    ]
    began = time.monotonic()
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=240, startup_timeout=300)
    late: list[int] = []
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
            if not cell.outputs:
                result = late_result(client)
                assert result is not None, f"cell {index} of the Scala notebook {where} had no result"
                cell.outputs.append(result)
                late.append(index)
    results = [str(cell.outputs[-1]["data"]["text/plain"]) for cell in nb.cells]
    print(
        f"Scala notebook {where}: 4 cells, start to finish {time.monotonic() - began:.1f} s; {results}"
        + (f"; results after idle for cells {late}" if late else "")
    )
    assert results[0] in ("500500", "500500.0")  # RDD.sum is a Double
    assert results[1] == "[100,4950]"
    assert results[2] == "alice 3.5.3"
    return results


def late_result(client: NotebookClient, timeout: float = 10.0) -> Any:
    """An execute_result the kernel publishes after the cell's idle status, if one comes."""
    assert client.kc is not None
    get = run_sync(client.kc.get_iopub_msg)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if msg["msg_type"] == "execute_result":
            return nbformat.v4.output_from_msg(msg)
    return None


def no_remote_kernel_left(custom: client.CustomObjectsApi, namespace: str) -> None:
    wait_for(
        lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"],
        timeout=60,
        what="the RemoteKernel deleted",
    )


def test_a_scala_notebook_computes_with_spark_and_spark_sql_over_ssh(
    operator: OperatorProcess,
    sshd: Sshd,
    scala_kernelspec: str,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    assert scala_notebook(scala_kernelspec, "over ssh")[3] == "local[*]"
    # nbclient shut the kernel down: its RemoteKernel and its JVM are gone.
    no_remote_kernel_left(custom, namespace)
    wait_for(lambda: not toree_jvms(), timeout=30, what="no Toree JVM left")


def output_collector(out: list[str]) -> Callable[[dict[str, Any]], None]:
    """An iopub hook that appends what a cell printed or returned to ``out``."""

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] in ("stream", "execute_result"):
            data = msg["content"].get("data") or {}
            out.append(str(data.get("text/plain", msg["content"].get("text", ""))))

    return hook


async def run_scala(kc: Any, code: str, timeout: float = 180.0) -> tuple[dict[str, Any], str]:
    """A Scala cell's reply and what it printed or returned. Toree may publish a result after
    the cell's idle status, where execute_interactive has stopped listening: wait for it."""
    out: list[str] = []
    hook = output_collector(out)
    reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    deadline = time.monotonic() + 10
    while reply["content"]["status"] == "ok" and not out and time.monotonic() < deadline:
        try:
            hook(await kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            break
    return reply["content"], "".join(out)


async def test_a_scala_kernel_is_interrupted_restarted_and_shut_down_leaving_no_jvm(
    operator: OperatorProcess,
    sshd: Sshd,
    scala_kernelspec: str,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    km = AsyncKernelManager(kernel_name=scala_kernelspec)
    await km.start_kernel(env={**os.environ})
    try:
        rk = get(custom, namespace, f"k-{km.kernel_id}")
        assert rk is not None and rk["spec"]["kernel"]["language"] == "scala"
        assert rk["status"]["backendRef"]["local"] is False  # through sshd
        async with ready_client(km, timeout=240) as kc:
            reply, out = await run_scala(kc, "val x = 6 * 7\nx")
            assert reply["status"] == "ok" and out.endswith("42"), out
            # Toree takes no interrupt message: the kernelspec says signal (SIGINT through the
            # operator and the launcher), which Toree turns into interrupting the cell.
            msg_id = kc.execute("Thread.sleep(120000)")
            await asyncio.sleep(3)
            started = time.monotonic()
            await km.interrupt_kernel()
            interrupted = await _reply_to(kc, msg_id, timeout=60)
            assert interrupted["content"]["status"] == "error"
            assert "InterruptedException" in interrupted["content"]["ename"]
            assert time.monotonic() - started < 30
            reply, out = await run_scala(kc, "x + 1")  # the session survives the interrupt
            assert reply["status"] == "ok" and out.endswith("43"), out
        first = km.kernel_id
        jvms_before = toree_jvms()
        assert len(jvms_before) == 1, jvms_before
        await km.restart_kernel(now=True)
        assert km.kernel_id == first  # the same kernel id, a new RemoteKernel and JVM
        async with ready_client(km, timeout=240) as kc:
            reply, out = await run_scala(kc, "sc.parallelize(1 to 10).count")
            assert reply["status"] == "ok" and out.endswith("10"), out
        assert toree_jvms() != jvms_before
    finally:
        await km.shutdown_kernel(now=True)
    assert get(custom, namespace, f"k-{km.kernel_id}") is None
    wait_for(lambda: not toree_jvms(), timeout=30, what="no Toree JVM left after shutdown")


async def test_a_scala_kernel_runs_spark_in_a_pod_from_the_scala_image(
    operator: OperatorProcess,
    node_images: Callable[[str], str],
    scala_kernel_image: str,
    custom: client.CustomObjectsApi,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = node_images(scala_kernel_image)  # copied into the node's containerd
    profile = ensure_profile(
        custom.api_client, {"backend": "kubernetes", "languages": ["scala"], "image": image}
    )
    prefix = tmp_path / "prefix"
    args = ["install", "--prefix", str(prefix), "--language", "scala", "--kernel-name", "pod_scala"]
    assert spec_cli([*args, "--namespace", namespace, "--profile", profile]) == 0
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("KERNEL_USERNAME", "alice")
    assert scala_notebook("pod_scala", "in a pod")[3] == "local[*]"
    no_remote_kernel_left(custom, namespace)


def test_a_scala_kernel_refuses_required_encryption_and_sparkapplications_with_a_clear_reason(
    operator: OperatorProcess, custom: client.CustomObjectsApi, namespace: str
) -> None:
    name, _ = make_kernel(
        namespace,
        custom,
        kernel={"language": "scala"},
        transportEncryption="required",
        ssh={"hosts": ["localhost"]},
    )
    status = wait_phase(custom, namespace, name, "Failed", "Running", timeout=240)["status"]
    assert status["phase"] == "Failed", status
    assert "Apache Toree does not support CurveZMQ" in status["message"]
    name, _ = make_kernel(namespace, custom, backend="sparkApplication", kernel={"language": "scala"})
    status = wait_phase(custom, namespace, name, "Failed", "Running")["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "LanguageNotSupported"), status
    assert "Scala kernels run on the ssh" in status["message"]


def scala_said(kc: Any, code: str, timeout: float = 120.0) -> str:
    """What a Scala cell printed or returned (a result published after idle included)."""
    out: list[str] = []
    hook = output_collector(out)
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    assert reply["content"]["status"] == "ok", reply["content"]
    deadline = time.monotonic() + 10
    while not out and time.monotonic() < deadline:
        try:
            hook(kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            break
    return "".join(out).strip()


def test_a_scala_kernel_claimed_from_a_pool_takes_its_users_environment_with_spark_ready(
    operator: OperatorProcess,
    sshd: Sshd,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    profile = ensure_profile(api_client, {**SCALA_PROFILE, "env": {"allowed": ["TEAM_*"]}}, name="pool-scala")
    make_pool(
        custom,
        namespace,
        name="warm-scala",
        profile=profile,
        replicas=1,
        template={"kernel": {"language": "scala"}},
    )
    wait_for(
        lambda: pool_status(custom, namespace, "warm-scala").get("ready") == 1,
        timeout=300,
        what="a pooled Scala kernel, Spark started",
    )
    started = time.monotonic()
    name, kernel_id = claimer(
        custom, namespace, profile=profile, kernel={"language": "scala"}, env={"TEAM_NAME": "violet"}
    )
    obj = wait_phase(custom, namespace, name, "Running", "Failed", timeout=60)
    claimed_in = time.monotonic() - started
    assert obj["status"]["reason"] == "ClaimedFromPool", obj["status"]
    kc = connect(api_client, namespace, obj)
    try:
        began = time.monotonic()
        counted = scala_said(kc, "spark.range(1000).count()")
        first_job = time.monotonic() - began
        # The identity reaches sys.env and System.getenv, and a child started with sys.env (a
        # JVM cannot change the C environment a plain child inherits: see the README).
        said = scala_said(
            kc,
            'println(Seq(sys.env("KERNEL_USERNAME"), sys.env("KERNEL_ID"), System.getenv("TEAM_NAME"), '
            'scala.sys.process.Process(Seq("sh", "-c", "echo $KERNEL_USERNAME"), None, sys.env.toSeq: _*)'
            '.!!.trim).mkString(" "))',
        )
    finally:
        kc.stop_channels()
    print(
        f"Scala kernel claimed from a pool: Running {claimed_in:.2f} s after its creation; "
        f"first spark.range(1000).count() {first_job:.2f} s"
    )
    assert counted.endswith("1000"), counted
    assert said.split() == ["alice", kernel_id, "violet", "alice"], said
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    delete_pool(custom, namespace, "warm-scala")
    no_remote_kernel_left(custom, namespace)
    wait_for(lambda: not toree_jvms(), timeout=60, what="no Toree JVM left")
