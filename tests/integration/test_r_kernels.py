"""R kernels (IRkernel) through the same launcher and handshake: on the ssh backend, through a
real sshd, and in a pod from the R kernel image; kernelspecs made by our installer."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from kubernetes import client

from localcluster.servers import OperatorProcess, Sshd
from remote_kernel_provisioner.cli import main as spec_cli
from tests.profiles import ensure_profile

from .test_operator_ssh import _reply_to, get, ready_client

pytestmark = pytest.mark.timeout(300)


async def start_r_kernel(
    tmp_path: Path, kubeconfig: Path, namespace: str, monkeypatch: pytest.MonkeyPatch, *install: str
) -> AsyncKernelManager:
    prefix = tmp_path / "prefix"
    args = ["install", "--prefix", str(prefix), "--language", "R", "--kernel-name", "remote_r"]
    assert spec_cli([*args, "--namespace", namespace, *install]) == 0
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    km = AsyncKernelManager(kernel_name="remote_r")
    await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": "alice"})
    return km


async def run_r(kc: Any, code: str) -> tuple[dict[str, Any], str]:
    out: list[str] = []
    reply = await kc.execute_interactive(
        code, timeout=60, output_hook=lambda m: out.append(m["content"].get("text", ""))
    )
    return reply["content"], "".join(out)


async def _idle_after(kc: Any, msg_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        msg = await kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"].get("execution_state") == "idle"
        ):
            return


async def test_an_r_kernel_runs_over_ssh_and_is_interrupted_by_a_signal(
    operator: OperatorProcess,
    sshd: Sshd,
    custom: client.CustomObjectsApi,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The administrator's profile: R kernels on the host behind sshd.
    profile = ensure_profile(
        custom.api_client, {"backend": "ssh", "languages": ["r"], "ssh": {"hosts": ["127.0.0.1"]}}
    )
    km = await start_r_kernel(
        tmp_path, kubeconfig, namespace, monkeypatch, "--profile", profile, "--remote-hosts", "127.0.0.1"
    )
    try:
        rk = get(custom, namespace, f"k-{km.kernel_id}")
        assert rk is not None and rk["spec"]["kernel"]["language"] == "r"
        assert rk["status"]["backendRef"]["local"] is False  # through sshd, not a local process
        async with ready_client(km) as kc:
            reply, out = await run_r(kc, 'x <- c(1, 2, 3)\ncat(sum(x) * 7, Sys.getenv("KERNEL_USERNAME"))')
            assert reply["status"] == "ok" and out == "42 alice"
            # IRkernel takes no interrupt message: the kernelspec says signal, which goes
            # through the operator and the launcher.
            msg_id = kc.execute("Sys.sleep(60)")
            await asyncio.sleep(2)
            started = time.monotonic()
            await km.interrupt_kernel()
            assert (await _reply_to(kc, msg_id, timeout=20))["content"]["status"] == "abort"
            assert time.monotonic() - started < 15
            # After an interrupted reply IRkernel aborts whatever is already queued on the
            # shell socket, so the next request goes only after its "idle" for this one.
            await _idle_after(kc, msg_id, timeout=20)
            reply, out = await run_r(kc, "cat(x)")  # the session survives the interrupt
            assert out == "1 2 3"
    finally:
        await km.shutdown_kernel(now=True)
    assert get(custom, namespace, f"k-{km.kernel_id}") is None


async def test_an_r_kernel_runs_in_a_pod_from_the_r_image(
    operator: OperatorProcess,
    node_images: Callable[[str], str],
    r_kernel_image: str,
    custom: client.CustomObjectsApi,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = node_images(r_kernel_image)  # copied into the node's containerd
    profile = ensure_profile(custom.api_client, {"backend": "kubernetes", "image": image})
    km = await start_r_kernel(tmp_path, kubeconfig, namespace, monkeypatch, "--profile", profile)
    try:
        async with ready_client(km) as kc:
            reply, out = await run_r(kc, 'cat(R.version$language, Sys.getenv("KERNEL_POD_NAME"))')
            assert reply["status"] == "ok"
            assert out == f"R k-{km.kernel_id}"
    finally:
        await km.shutdown_kernel(now=True)
    assert get(custom, namespace, f"k-{km.kernel_id}") is None


async def test_an_r_kernel_refuses_required_encryption_with_a_clear_reason(
    operator: OperatorProcess,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    from .test_operator_ssh import make_kernel, wait_phase

    name, _ = make_kernel(
        namespace,
        custom,
        kernel={"language": "r"},
        transportEncryption="required",
        ssh={"hosts": ["localhost"]},
    )
    status = wait_phase(custom, namespace, name, "Failed", "Running")["status"]
    assert status["phase"] == "Failed", status
    assert "IRkernel does not support CurveZMQ" in status["message"]
