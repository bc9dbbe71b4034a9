"""End to end on the real control plane: the operator, the launcher, the ssh backend, the client.

Kernels run on this machine: as local processes for host ``localhost`` (no ssh), and through
Debian's sshd on 127.0.0.1 for host ``127.0.0.1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from kubernetes import client
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from localcluster.servers import OperatorProcess, Sshd
from tests.helpers import wait_for
from tests.profiles import kernelspec_config, tenant_spec

from .conftest import launcher_processes

GROUP, VERSION, PLURAL = "kernel-operator.io", "v1alpha1", "remotekernels"
CLASS_LABEL = f"{GROUP}/operator-class"
pytestmark = pytest.mark.integration


def make_kernel(
    namespace: str, custom: client.CustomObjectsApi, labels: dict[str, str] | None = None, **spec: Any
) -> tuple[str, str]:
    """A RemoteKernel for ``spec`` (in the legacy all-in-one form: its backend and block go into a
    profile the administrator creates, the rest is the tenant's spec naming it)."""
    kernel_id = str(uuid.uuid4())
    legacy: dict[str, Any] = {"kernelId": kernel_id, "username": "alice", "backend": "ssh"}
    legacy.update(spec)
    body_spec = tenant_spec(custom.api_client, legacy)
    name = f"k-{kernel_id}"
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "RemoteKernel",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": body_spec,
        },
    )
    return name, kernel_id


def get(custom: client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)  # type: ignore[no-any-return]
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def wait_phase(
    custom: client.CustomObjectsApi, namespace: str, name: str, *phases: str, timeout: float = 60
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        obj = get(custom, namespace, name)
        return obj if obj and (obj.get("status") or {}).get("phase") in phases else None

    return wait_for(reached, timeout=timeout, what=f"{name} to reach {phases}")


def delete_and_wait_gone(
    custom: client.CustomObjectsApi, namespace: str, name: str, timeout: float = 30
) -> None:
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(lambda: get(custom, namespace, name) is None, timeout=timeout, what=f"{name} to be deleted")


def kernelspec(
    tmp_path: Path, kubeconfig: Path, namespace: str, interrupt_mode: str = "message", **config: Any
) -> Path:
    """A kernelspec naming our provisioner, in a JUPYTER_PATH of its own (a legacy ``config``
    naming a backend gets the profile an administrator would write for it)."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "remote"
    spec_dir.mkdir(parents=True)
    legacy = {"backend": "ssh", "namespace": namespace, "kubeconfig": str(kubeconfig), **config}
    api = k8s_config.new_client_from_config(config_file=str(kubeconfig))
    try:
        provisioner_config = kernelspec_config(api, legacy)
    finally:
        api.close()
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["python", "-m", "kernel_launchers.python_launcher"],
                "display_name": "Remote Python",
                "language": "python",
                "interrupt_mode": interrupt_mode,
                "metadata": {
                    "kernel_provisioner": {"provisioner_name": "remote-kernel", "config": provisioner_config}
                },
            }
        )
    )
    return tmp_path / "jupyter"


async def start_remote_kernel(
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    username: str = "alice",
    interrupt_mode: str = "message",
    **config: Any,
) -> AsyncKernelManager:
    """A KernelManager started through our provisioner with ``config`` in its kernelspec."""
    path = kernelspec(tmp_path, kubeconfig, namespace, interrupt_mode=interrupt_mode, **config)
    monkeypatch.setenv("JUPYTER_PATH", str(path))
    km = AsyncKernelManager(kernel_name="remote")
    await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": username})
    return km


@pytest.fixture
def jupyter_path(
    tmp_path: Path, kubeconfig: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    path = kernelspec(tmp_path, kubeconfig, namespace)
    monkeypatch.setenv("JUPYTER_PATH", str(path))
    yield path


def assert_nothing_left(api_client: client.ApiClient, namespace: str, kernel_id: str) -> None:
    custom = client.CustomObjectsApi(api_client)
    core = client.CoreV1Api(api_client)
    wait_for(
        lambda: get(custom, namespace, f"k-{kernel_id}") is None, timeout=20, what="the RemoteKernel to go"
    )
    secrets = [s.metadata.name for s in core.list_namespaced_secret(namespace).items]
    assert not [s for s in secrets if kernel_id in s], secrets
    wait_for(
        lambda: not [c for c in launcher_processes() if kernel_id in c],
        timeout=10,
        what="no launcher processes",
    )
    assert not Path(f"/tmp/rko-{kernel_id}").exists()


# -- kubectl-style use ----------------------------------------------------------------------------


def test_a_remote_kernel_runs_and_deleting_it_cleans_up(
    operator: OperatorProcess, api_client: client.ApiClient, custom: client.CustomObjectsApi, namespace: str
) -> None:
    name, kernel_id = make_kernel(namespace, custom)
    obj = wait_phase(custom, namespace, name, "Running", "Failed")
    status = obj["status"]
    assert status["phase"] == "Running", status
    assert status["connection"]["ip"] == "127.0.0.1"
    assert status["conditions"][0]["type"] == "Ready" and status["conditions"][0]["status"] == "True"
    assert status["backendRef"]["local"] is True
    secret = client.CoreV1Api(api_client).read_namespaced_secret(f"{name}-connection", namespace)
    assert secret.metadata.owner_references[0].uid == obj["metadata"]["uid"]
    # The HMAC key is in the Secret and nowhere in the resource, its events or the operator's log.
    import base64

    key = base64.b64decode(secret.data["key"]).decode()
    assert key not in json.dumps(obj)

    # Events are posted after the status write they report, so they may come a moment later.
    def events_seen() -> list[Any]:
        found = client.CoreV1Api(api_client).list_namespaced_event(namespace).items
        reasons = {e.reason for e in found if e.involved_object.name == name}
        return found if {"Launching", "KernelReady"} <= reasons else []

    events = wait_for(
        events_seen,
        timeout=10,
        what="the Launching and KernelReady events",
        found=lambda: [
            e.reason
            for e in client.CoreV1Api(api_client).list_namespaced_event(namespace).items
            if e.involved_object.name == name
        ],
    )
    assert key not in json.dumps([e.message for e in events])
    assert key not in operator.log()
    assert [c for c in launcher_processes() if kernel_id in c]

    delete_and_wait_gone(custom, namespace, name)
    assert_nothing_left(api_client, namespace, kernel_id)


def test_kubectl_apply_and_delete(
    operator: OperatorProcess,
    kubeconfig: Path,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    from .test_local_cluster import kubectl

    kernel_id = str(uuid.uuid4())
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RemoteKernel",
        "metadata": {"name": f"k-{kernel_id}", "namespace": namespace},
        # The common case: no profile named, so the cluster's default profile serves it.
        "spec": {"kernelId": kernel_id, "username": "bob"},
    }
    applied = subprocess.run(
        [*kubectl_cmd(kubeconfig), "apply", "-f", "-"],
        input=json.dumps(manifest),
        text=True,
        capture_output=True,
        check=False,
    )
    assert applied.returncode == 0, applied.stderr
    wait_phase(custom, namespace, f"k-{kernel_id}", "Running")
    listed = kubectl(kubeconfig, "get", "rk", "-n", namespace)
    assert "Running" in listed.stdout and "bob" in listed.stdout and "127.0.0.1" in listed.stdout
    deleted = kubectl(kubeconfig, "delete", "rk", f"k-{kernel_id}", "-n", namespace)
    assert deleted.returncode == 0, deleted.stderr
    assert_nothing_left(api_client, namespace, kernel_id)


def kubectl_cmd(kubeconfig: Path) -> list[str]:
    import shutil
    import sys

    exe = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"
    return [exe, f"--kubeconfig={kubeconfig}"]


# -- bad input and failures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "reason", "words"),
    [
        ({"username": "root"}, "Unauthorized", "RKO_UNAUTHORIZED_USERS"),
        ({"portRange": "40000..40010"}, "InvalidPortRange", "at least 1000"),
        ({"portRange": "70000..80000"}, "InvalidPortRange", "1024..65535"),
        ({"backend": "yarn"}, "YarnNotConfigured", "RKO_YARN_ENDPOINT"),
        ({"env": {"KERNEL_ID": "something-else"}}, "InvalidSpec", "disagrees"),
    ],
)
def test_bad_requests_fail_with_a_reason_and_launch_nothing(
    operator: OperatorProcess,
    custom: client.CustomObjectsApi,
    namespace: str,
    spec: dict[str, Any],
    reason: str,
    words: str,
) -> None:
    name, kernel_id = make_kernel(namespace, custom, **spec)
    status = wait_phase(custom, namespace, name, "Failed", "Running")["status"]
    assert status["phase"] == "Failed" and status["reason"] == reason, status
    assert words in status["message"]
    assert "backendRef" not in status
    assert not [c for c in launcher_processes() if kernel_id in c]
    # Failed is final: no retry loop keeps changing it.
    version = get(custom, namespace, name)["metadata"]["resourceVersion"]  # type: ignore[index]
    time.sleep(2)
    assert get(custom, namespace, name)["metadata"]["resourceVersion"] == version  # type: ignore[index]


def test_a_launch_that_never_reports_times_out_and_is_stopped(
    operator: OperatorProcess, custom: client.CustomObjectsApi, namespace: str, tmp_path: Path
) -> None:
    # Its arguments (the run directory among them) stay on its command line, as a launcher's do.
    silent = fake_python(
        tmp_path, "silent", f"exec {sys.executable} -c 'import time; time.sleep(300)' \"$@\""
    )
    name, _kernel_id = make_kernel(namespace, custom, launchTimeoutSeconds=3, ssh={"python": str(silent)})
    started = time.monotonic()
    status = wait_phase(custom, namespace, name, "Failed", "Running", timeout=30)["status"]
    assert status["phase"] == "Failed" and status["reason"] == "LaunchTimeout", status
    assert "within 3 s" in status["message"]
    assert time.monotonic() - started < 15
    pid = status["backendRef"]["pid"]
    wait_for(
        lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid),
        timeout=10,
        what="the silent launcher to be stopped",
    )


def fake_python(tmp_path: Path, name: str, body: str) -> Path:
    """A shell script given to the ssh backend as its "python", to make a launcher misbehave."""
    script = tmp_path / f"{name}-python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_launcher_that_dies_fails_the_kernel_fast(
    operator: OperatorProcess, custom: client.CustomObjectsApi, namespace: str, tmp_path: Path
) -> None:
    broken = fake_python(tmp_path, "broken", "echo 'no python here' >&2\nexit 7")
    started = time.monotonic()
    name, _ = make_kernel(namespace, custom, launchTimeoutSeconds=60, ssh={"python": str(broken)})
    status = wait_phase(custom, namespace, name, "Failed", "Running", timeout=30)["status"]
    assert status["phase"] == "Failed", status
    assert "stopped before it was ready" in status["message"]
    assert time.monotonic() - started < 10  # not the 60 s launch timeout


def test_a_killed_kernel_turns_failed(
    operator: OperatorProcess, custom: client.CustomObjectsApi, namespace: str
) -> None:
    name, _kernel_id = make_kernel(namespace, custom)
    status = wait_phase(custom, namespace, name, "Running")["status"]
    os.killpg(status["backendRef"]["pgid"], 9)
    status = wait_phase(custom, namespace, name, "Failed", "Succeeded", timeout=15)["status"]
    assert status["phase"] == "Failed", status
    assert status["conditions"][0]["status"] == "False"


# -- the listener under attack ----------------------------------------------------------------------


def _send(address: str, data: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(5)
        try:
            return conn.recv(16)
        except OSError:
            return b""


def test_forged_replayed_truncated_and_garbage_payloads_are_rejected(
    operator: OperatorProcess, custom: client.CustomObjectsApi, namespace: str, api_client: client.ApiClient
) -> None:
    from kernel_launchers import protocol

    address = operator.env["RKO_RESPONSE_BIND"]
    key_secret = client.CoreV1Api(api_client).read_namespaced_secret(
        "remote-kernel-operator-keys", "rko-system"
    )
    import base64

    public = protocol.public_key_of(base64.b64decode(key_secret.data["private-key"]))
    name, kernel_id = make_kernel(namespace, custom)
    running = wait_phase(custom, namespace, name, "Running")
    payload: protocol.LaunchPayload = {
        "kernel_id": kernel_id,
        "token": "guessed-token",
        "connection": {
            "ip": "127.0.0.1",
            "transport": "tcp",
            "signature_scheme": "hmac-sha256",
            "key": "attacker-key",
            "shell_port": 1111,
            "iopub_port": 1112,
            "stdin_port": 1113,
            "control_port": 1114,
            "hb_port": 1115,
        },
        "pid": 1,
        "pgid": 1,
        "hostname": "evil",
        "control_port": 1,
        "control_key": protocol.encode_key(b"x" * 32),
        "sent_at": time.time(),
    }
    forged = protocol.seal_launch_payload(payload, public)
    attempts = [
        forged,  # a launch already answered: its token was single-use
        forged[: len(forged) // 2],  # truncated
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # garbage
        struct.pack(">I", 10**9),  # absurd length
        os.urandom(300),
    ]
    for data in attempts:
        assert _send(address, data) != b"OK\n"
    # A second kernel still launches: the listener kept serving.
    other, _ = make_kernel(namespace, custom)
    wait_phase(custom, namespace, other, "Running")
    # The first kernel's connection is what its own launcher sent, not the forgery.
    assert get(custom, namespace, name)["status"]["connection"] == running["status"]["connection"]  # type: ignore[index]
    log = operator.log()
    assert log.count("Rejected a launch response") >= len(attempts)
    for n in (name, other):
        delete_and_wait_gone(custom, namespace, n)


# -- the operator restarted -------------------------------------------------------------------------


def test_operator_restart_mid_launch_completes_the_launch(
    operator: OperatorProcess, custom: client.CustomObjectsApi, namespace: str, tmp_path: Path
) -> None:
    import sys

    slow = fake_python(tmp_path, "slow", f'sleep 4\nexec {sys.executable} "$@"')
    fingerprint_before = _fingerprint(operator.log())
    name, _kernel_id = make_kernel(namespace, custom, launchTimeoutSeconds=60, ssh={"python": str(slow)})
    wait_for(
        lambda: (get(custom, namespace, name) or {}).get("status", {}).get("backendRef"),
        timeout=20,
        what="the launcher to be started",
    )
    operator.stop(kill=True)
    operator.start()
    assert _fingerprint(operator.log()) == fingerprint_before  # the key pair came from its Secret
    status = wait_phase(custom, namespace, name, "Running", "Failed", timeout=60)["status"]
    assert status["phase"] == "Running", status
    delete_and_wait_gone(custom, namespace, name)


def _fingerprint(log: str) -> str:
    marker = "; key "
    return log[log.rindex(marker) + len(marker) :].split()[0]


# -- a real sshd ------------------------------------------------------------------------------------


def test_a_kernel_launched_over_ssh(
    operator: OperatorProcess,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
    sshd: Sshd,
) -> None:
    name, kernel_id = make_kernel(namespace, custom, ssh={"hosts": ["127.0.0.1"]})
    status = wait_phase(custom, namespace, name, "Running", "Failed")["status"]
    assert status["phase"] == "Running", status
    assert status["backendRef"]["local"] is False and status["backendRef"]["host"] == "127.0.0.1"
    delete_and_wait_gone(custom, namespace, name)
    assert_nothing_left(api_client, namespace, kernel_id)


def test_an_ssh_host_with_an_unknown_key_is_refused(
    operator: OperatorProcess, custom: client.CustomObjectsApi, namespace: str, sshd: Sshd
) -> None:
    # The same sshd answers on 127.0.0.2, but known_hosts only vouches for "[127.0.0.1]:port".
    name, _ = make_kernel(namespace, custom, ssh={"hosts": ["127.0.0.2"]})
    status = wait_phase(custom, namespace, name, "Failed", "Running")["status"]
    assert status["phase"] == "Failed" and status["reason"] == "UnknownHostKey", status
    assert "127.0.0.2" in status["message"] and "known_hosts" in status["message"]


# -- through jupyter_client -------------------------------------------------------------------------


async def test_kernel_manager_runs_interrupts_restarts_and_shuts_down(
    operator: OperatorProcess, api_client: client.ApiClient, jupyter_path: Path, namespace: str
) -> None:
    km = AsyncKernelManager(kernel_name="remote")
    await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": "alice"})
    kernel_id = str(km.kernel_id)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        reply = await kc.execute_interactive("import os; x = 6 * 7", timeout=20)
        assert reply["content"]["status"] == "ok"
        outputs: list[str] = []
        await kc.execute_interactive(
            "print(x, os.environ['KERNEL_USERNAME'], os.environ['KERNEL_ID'])",
            output_hook=lambda m: outputs.append(m["content"].get("text", "")),
            timeout=20,
        )
        assert "".join(outputs).split() == ["42", "alice", kernel_id]

        msg_id = kc.execute("import time; time.sleep(60)")
        await asyncio.sleep(1)
        await km.interrupt_kernel()
        reply = await _reply_to(kc, msg_id, timeout=10)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        kc.stop_channels()

    await km.restart_kernel()
    async with ready_client(km) as kc:
        reply = await kc.execute_interactive("'x' in globals()", timeout=20)
        assert reply["content"]["status"] == "ok"

    started = time.monotonic()
    await km.shutdown_kernel()
    shutdown_seconds = time.monotonic() - started
    assert_nothing_left(api_client, namespace, kernel_id)
    print(f"shutdown took {shutdown_seconds:.2f} s")


async def test_an_unauthorized_user_is_refused_before_anything_is_created(
    operator: OperatorProcess, custom: client.CustomObjectsApi, jupyter_path: Path, namespace: str
) -> None:
    km = AsyncKernelManager(kernel_name="remote")
    with pytest.raises(PermissionError, match="not allowed"):
        await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": "root"})
    assert custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"] == []


async def test_a_failed_launch_raises_the_operators_reason_at_once(
    operator: OperatorProcess,
    custom: client.CustomObjectsApi,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = kernelspec(tmp_path, kubeconfig, namespace, port_range="50000..50010", unauthorized_users=[])
    monkeypatch.setenv("JUPYTER_PATH", str(path))
    km = AsyncKernelManager(kernel_name="remote")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="InvalidPortRange"):
        await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": "alice"})
    assert time.monotonic() - started < 10
    wait_for(
        lambda: custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"] == [],
        timeout=10,
        what="the failed RemoteKernel to be deleted",
    )


async def test_another_process_reattaches_through_provisioner_info(
    operator: OperatorProcess, api_client: client.ApiClient, jupyter_path: Path, namespace: str
) -> None:
    km = AsyncKernelManager(kernel_name="remote")
    await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": "alice"})
    info = json.loads(json.dumps(await km.provisioner.get_provisioner_info()))  # as a server would store it
    kernel_id = str(km.kernel_id)
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=30)
    await kc.execute_interactive("marker = 'still here'", timeout=20)
    kc.stop_channels()
    await km.provisioner.close()  # the first server goes away, leaving its kernel running

    # A new manager, as after a server restart, finds the same kernel from the stored info.
    from jupyter_client.provisioning import KernelProvisionerFactory

    km2 = AsyncKernelManager(kernel_name="remote", kernel_id=kernel_id)
    km2.provisioner = KernelProvisionerFactory.instance(parent=km2.parent).create_provisioner_instance(
        kernel_id, km2.kernel_spec, parent=km2
    )
    await km2.provisioner.load_provisioner_info(info)
    km2.load_connection_info(km2.provisioner.connection_info)
    kc2 = km2.client()
    kc2.start_channels()
    try:
        await kc2.wait_for_ready(timeout=30)
        outputs: list[str] = []
        await kc2.execute_interactive(
            "print(marker)", output_hook=lambda m: outputs.append(m["content"].get("text", "")), timeout=20
        )
        assert "".join(outputs).strip() == "still here"
    finally:
        kc2.stop_channels()
    await km2.shutdown_kernel(now=True)
    assert_nothing_left(api_client, namespace, kernel_id)


@contextlib.asynccontextmanager
async def ready_client(km: AsyncKernelManager, timeout: float = 30) -> AsyncIterator[Any]:
    """A client of ``km``'s kernel, ready to execute; its channels are stopped afterwards."""
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=timeout)
        yield kc
    finally:
        kc.stop_channels()


async def _reply_to(kc: Any, msg_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        msg: dict[str, Any] = await kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


# -- transport encryption ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "declared", "encrypted"),
    [("disabled", True, False), ("auto", False, False), ("auto", True, True), ("required", True, True)],
)
async def test_transport_encryption_follows_jupyter_clients_policy(
    operator: OperatorProcess,
    custom: client.CustomObjectsApi,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
    declared: bool,
    encrypted: bool,
) -> None:
    import zmq

    path = kernelspec(tmp_path, kubeconfig, namespace)
    spec_file = path / "kernels" / "remote" / "kernel.json"
    spec = json.loads(spec_file.read_text())
    if declared:
        spec["metadata"]["supported_encryption"] = ["curve"]
    spec_file.write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(path))
    km = AsyncKernelManager(kernel_name="remote", transport_encryption=policy)
    await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": "alice"})
    try:
        status = get(custom, namespace, f"k-{km.kernel_id}")["status"]  # type: ignore[index]
        assert status["connection"]["transportEncryption"] == ("curve" if encrypted else "none")
        assert (km.curve_publickey is not None) is encrypted
        async with ready_client(km) as kc:
            reply = await kc.execute_interactive("21 * 2", timeout=20)
            assert reply["content"]["status"] == "ok"
        # A peer without the Curve keys gets no heartbeat answer from an encrypted kernel.
        ctx = zmq.Context.instance()
        probe = ctx.socket(zmq.REQ)
        probe.linger = 0
        probe.connect(f"tcp://127.0.0.1:{status['connection']['hbPort']}")
        probe.send(b"ping")
        answered = probe.poll(2000) != 0
        probe.close()
        assert answered is not encrypted
    finally:
        await km.shutdown_kernel(now=True)


async def test_a_signal_reaches_the_kernel_through_the_operator_and_the_launcher(
    operator: OperatorProcess,
    api_client: client.ApiClient,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # interrupt_mode "signal": KernelManager calls provisioner.send_signal(SIGINT), which the
    # operator forwards over the launcher's signed control port.
    delivered = "Signal 2 was delivered to the kernel"
    before = operator.log().count(delivered)  # the operator (and its log) serves the whole module
    km = await start_remote_kernel(tmp_path, kubeconfig, namespace, monkeypatch, interrupt_mode="signal")
    custom = client.CustomObjectsApi(api_client)
    name = f"k-{km.kernel_id}"
    try:
        # kopf keeps no last-handled-configuration on a RemoteKernel (a write less per launch):
        # signals are followed by event, and each request is recorded once handled.
        annotations = (get(custom, namespace, name) or {})["metadata"].get("annotations") or {}
        assert not [a for a in annotations if a.endswith("last-handled-configuration")], annotations
        await assert_interrupt_ends_a_long_cell(km)
        obj = get(custom, namespace, name) or {}
        request = obj["metadata"]["annotations"]["kernel-operator.io/signal"]
        wait_for(
            lambda: (
                ((get(custom, namespace, name) or {}).get("status") or {}).get("signalHandled") == request
            ),
            timeout=10,
            what="the signal request recorded as handled",
        )
        await asyncio.sleep(0.5)  # the events of that status write carry the annotation too
        assert operator.log().count(delivered) == before + 1  # one signal per request
    finally:
        await km.shutdown_kernel(now=True)


async def test_a_kernel_no_operator_takes_up_times_out_and_is_not_left_terminating(
    operator: OperatorProcess,
    api_client: client.ApiClient,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The provisioner creates a RemoteKernel with its operator's finalizer already on (a write
    less per launch). For a class no operator serves, nothing would ever remove it: the timed-out
    launch must still delete the resource, not leave it Terminating for good."""
    with pytest.raises(TimeoutError, match="is the Remote Kernel Operator running"):
        await start_remote_kernel(
            tmp_path, kubeconfig, namespace, monkeypatch, operator_class="nobody", launch_timeout=1
        )
    custom = client.CustomObjectsApi(api_client)

    def nobodys() -> list[str]:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        return [
            o["metadata"]["name"]
            for o in items
            if o["metadata"].get("labels", {}).get(CLASS_LABEL) == "nobody"
        ]

    wait_for(lambda: not nobodys(), timeout=5, what="the timed-out RemoteKernel to be deleted")


async def assert_interrupt_ends_a_long_cell(km: AsyncKernelManager, before: Any = None) -> None:
    """A cell sleeping 60 s is interrupted through ``km`` (``before()`` runs just before) and
    ends with KeyboardInterrupt within 5 s."""
    async with ready_client(km) as kc:
        msg_id = kc.execute("import time; time.sleep(60)")
        await asyncio.sleep(1)
        if before is not None:
            before()
        started = time.monotonic()
        await km.interrupt_kernel()
        reply = await _reply_to(kc, msg_id, timeout=10)
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 5


def test_every_port_of_the_kernel_lies_in_its_port_range(
    operator: OperatorProcess, custom: client.CustomObjectsApi, namespace: str
) -> None:
    name, _ = make_kernel(namespace, custom, portRange="42000..43999")
    status = wait_phase(custom, namespace, name, "Running", "Failed")["status"]
    assert status["phase"] == "Running", status
    ports = [
        status["connection"][p] for p in ("shellPort", "iopubPort", "stdinPort", "controlPort", "hbPort")
    ]
    ports.append(status["backendRef"]["controlPort"])
    assert all(42000 <= p <= 43999 for p in ports), ports
    assert len(set(ports)) == len(ports)
    delete_and_wait_gone(custom, namespace, name)
