"""The client in the Jupyter ecosystem: Jupyter Server (REST and websocket), a server restart
that keeps its kernels, nbclient running a notebook, jupyter console, and kernelspecs made by
our installer. Kernels run on the ssh backend (localhost) of the session's operator."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import pytest
import requests
from kubernetes import client
from nbclient import NotebookClient
from tornado.websocket import websocket_connect

from localcluster import free_port
from localcluster.servers import OperatorProcess
from remote_kernel_provisioner.cli import main as spec_cli
from tests.helpers import wait_for

from .conftest import launcher_processes
from .test_operator_ssh import GROUP, PLURAL, VERSION, get, wait_phase

KERNEL = "remote"
pytestmark = pytest.mark.timeout(240)


def install_kernelspec(prefix: Path, namespace: str, *extra: str) -> Path:
    """Our installer, as a user would run it; returns the JUPYTER_PATH entry."""
    args = ["install", "--prefix", str(prefix), "--backend", "ssh", "--kernel-name", KERNEL]
    assert spec_cli([*args, "--namespace", namespace, "--remote-hosts", "localhost", *extra]) == 0
    return prefix / "share" / "jupyter"


@pytest.fixture
def jupyter_env(tmp_path: Path, kubeconfig: Path, namespace: str) -> dict[str, str]:
    return {
        **os.environ,
        "JUPYTER_PATH": str(install_kernelspec(tmp_path / "prefix", namespace)),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "KUBECONFIG": str(kubeconfig),
        "KERNEL_USERNAME": "alice",
        "JUPYTER_SERVER_NAME": f"server-{uuid.uuid4().hex[:8]}",
    }


@dataclass
class JupyterServer:
    """``jupyter server`` as a child process on loopback, with our re-attach extension on."""

    env: dict[str, str]
    root: Path
    port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    proc: subprocess.Popen[bytes] | None = None
    app: str = "jupyter_server"  # or "jupyterlab": the same server with the Lab front end
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # Enabled as a user would: in the config directory (JUPYTER_CONFIG_DIR).
        config_dir = Path(self.env["JUPYTER_CONFIG_DIR"])
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "jupyter_server_config.json").write_text(
            json.dumps({"ServerApp": {"jpserver_extensions": {"remote_kernel_provisioner": True}}})
        )
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                self.app,
                f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0",
                "--ServerApp.ip=127.0.0.1",
                "--ServerApp.open_browser=False",
                f"--ServerApp.root_dir={self.root}",
                f"--IdentityProvider.token={self.token}",
                "--allow-root",  # the suite runs as root (network namespaces, sshd)
                *self.extra_args,
            ],
            env=self.env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"jupyter server exited; see {self.root / 'server.log'}")
            try:
                return requests.get(f"{self.url}/api/status", headers=self.headers, timeout=2).ok
            except requests.ConnectionError:
                return False

        wait_for(up, timeout=60, what="Jupyter Server to answer")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, f"{self.url}{path}", headers=self.headers, timeout=120, **kwargs)

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(60)

    def log(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")


@pytest.fixture
def server(jupyter_env: dict[str, str], tmp_path: Path) -> Iterator[JupyterServer]:
    srv = JupyterServer(jupyter_env, tmp_path / "server")
    srv.start()
    yield srv
    srv.stop()


async def execute(
    srv: JupyterServer, kernel_id: str, code: str, timeout: float = 60
) -> tuple[dict[str, Any], str]:
    """Run ``code`` over the kernel's websocket; returns (execute_reply content, stdout text)."""
    url = f"ws://127.0.0.1:{srv.port}/api/kernels/{kernel_id}/channels?token={srv.token}"
    conn = await websocket_connect(url)
    msg_id = uuid.uuid4().hex
    conn.write_message(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "username": "alice",
                    "session": uuid.uuid4().hex,
                    "msg_type": "execute_request",
                    "version": "5.3",
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(),
                },
                "parent_header": {},
                "metadata": {},
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": True,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    out: list[str] = []
    reply: dict[str, Any] | None = None
    idle = False
    deadline = time.monotonic() + timeout
    try:
        # The reply (shell) may overtake the output (iopub): the request is done when both the
        # reply and iopub's "idle" for it (which follows all its output) have arrived.
        while reply is None or not idle:
            raw = await asyncio.wait_for(conn.read_message(), max(0.1, deadline - time.monotonic()))
            assert raw is not None, "the websocket closed"
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "execute_reply":
                reply = msg["content"]
            elif msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                idle = True
        return reply, "".join(out)
    finally:
        conn.close()


def wait_kernel_gone(custom: client.CustomObjectsApi, namespace: str, kernel_id: str) -> None:
    wait_for(
        lambda: get(custom, namespace, f"k-{kernel_id}") is None, timeout=60, what=f"k-{kernel_id} to go"
    )


# -- Jupyter Server ---------------------------------------------------------------------------


async def test_jupyter_server_creates_executes_restarts_and_deletes_a_remote_kernel(
    operator: OperatorProcess, server: JupyterServer, custom: client.CustomObjectsApi, namespace: str
) -> None:
    created = server.api("POST", "/api/kernels", json={"name": KERNEL})
    assert created.status_code == 201, created.text
    kernel_id = created.json()["id"]
    rk = get(custom, namespace, f"k-{kernel_id}")
    assert rk is not None and rk["status"]["phase"] == "Running"
    assert rk["spec"]["username"] == "alice" and rk["status"]["backend"] == "ssh"
    # The extension made the server's key at start-up: even its first kernel's key came sealed.
    assert rk["spec"]["clientPublicKey"] and rk["status"]["connection"]["sealed"]
    # Its kernel websockets are ours (TCP_NODELAY), and this execute goes through one.
    assert "Kernel websockets send each message at once (TCP_NODELAY)." in server.log()
    reply, out = await execute(server, kernel_id, "x = 6\nprint(x * 7)")
    assert reply["status"] == "ok" and out == "42\n"

    first_uid = rk["metadata"]["uid"]
    restarted = server.api("POST", f"/api/kernels/{kernel_id}/restart")
    assert restarted.status_code == 200, restarted.text
    rk = get(custom, namespace, f"k-{kernel_id}")
    assert rk is not None and rk["metadata"]["uid"] != first_uid  # a new kernel, same id
    reply, _ = await execute(server, kernel_id, "x")
    assert reply["status"] == "error" and reply["ename"] == "NameError"  # state did not survive

    assert server.api("DELETE", f"/api/kernels/{kernel_id}").status_code == 204
    wait_kernel_gone(custom, namespace, kernel_id)
    assert server.api("GET", "/api/kernels").json() == []


async def test_a_killed_jupyter_server_gets_its_running_kernels_back_after_a_restart(
    operator: OperatorProcess,
    jupyter_env: dict[str, str],
    tmp_path: Path,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    first = JupyterServer(jupyter_env, tmp_path / "server")
    first.start()
    kernel_id = first.api("POST", "/api/kernels", json={"name": KERNEL}).json()["id"]
    reply, _ = await execute(first, kernel_id, "state = 41")
    assert reply["status"] == "ok"
    first.stop(kill=True)  # no chance to shut anything down
    assert get(custom, namespace, f"k-{kernel_id}")["status"]["phase"] == "Running"  # type: ignore[index]

    second = JupyterServer(jupyter_env, tmp_path / "server")
    second.start()
    try:
        wait_for(
            lambda: kernel_id in [k["id"] for k in second.api("GET", "/api/kernels").json()],
            timeout=60,
            what="the restarted server to list the kernel again",
        )
        reply, out = await execute(second, kernel_id, "print(state + 1)")
        assert reply["status"] == "ok" and out == "42\n"  # the same kernel, its state intact
        assert "Re-attached the running remote kernel" in second.log()
        assert second.api("DELETE", f"/api/kernels/{kernel_id}").status_code == 204
        wait_kernel_gone(custom, namespace, kernel_id)
    finally:
        second.stop()


async def test_a_kernel_manager_in_a_new_process_attaches_by_kernel_id(
    operator: OperatorProcess,
    jupyter_env: dict[str, str],
    custom: client.CustomObjectsApi,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from jupyter_client.manager import AsyncKernelManager

    starter = (
        "import asyncio, sys\n"
        "from jupyter_client.manager import AsyncKernelManager\n"
        "async def main():\n"
        f"    km = AsyncKernelManager(kernel_name={KERNEL!r})\n"
        "    await km.start_kernel()\n"
        "    kc = km.client(); kc.start_channels(); await kc.wait_for_ready(timeout=60)\n"
        "    await kc.execute_interactive('state = 41', timeout=30)\n"
        "    print(km.kernel_id, flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", starter], env=jupyter_env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    kernel_id = proc.stdout.readline().strip()
    proc.kill()  # the first process dies without a word
    proc.wait()
    for name, value in jupyter_env.items():
        monkeypatch.setenv(name, value)
    km = AsyncKernelManager(kernel_name=KERNEL)
    await km.start_kernel(kernel_id=kernel_id)  # attaches: the RemoteKernel runs, same user
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        outputs: list[str] = []
        await kc.execute_interactive(
            "print(state + 1)", timeout=30, output_hook=lambda m: outputs.append(m["content"].get("text", ""))
        )
        assert "".join(outputs) == "42\n"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    wait_kernel_gone(custom, namespace, kernel_id)


async def test_attaching_to_another_users_kernel_is_refused(
    operator: OperatorProcess,
    jupyter_env: dict[str, str],
    custom: client.CustomObjectsApi,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from jupyter_client.manager import AsyncKernelManager

    for name, value in jupyter_env.items():
        monkeypatch.setenv(name, value)
    km = AsyncKernelManager(kernel_name=KERNEL)
    await km.start_kernel()
    try:
        intruder = AsyncKernelManager(kernel_name=KERNEL)
        with pytest.raises(Exception, match="belongs to user 'alice', not 'mallory'"):
            await intruder.start_kernel(
                kernel_id=km.kernel_id, env={**os.environ, "KERNEL_USERNAME": "mallory"}
            )
        assert await km.is_alive()
    finally:
        await km.shutdown_kernel(now=True)


# -- nbclient and jupyter console ---------------------------------------------------------------


def test_nbclient_runs_a_multi_cell_notebook_through_a_remote_kernel(
    operator: OperatorProcess,
    jupyter_env: dict[str, str],
    custom: client.CustomObjectsApi,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in jupyter_env.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import os\nnumbers = list(range(1, 11))"),
        nbformat.v4.new_code_cell("total = sum(numbers)\ntotal"),
        nbformat.v4.new_markdown_cell("A markdown cell is skipped."),
        nbformat.v4.new_code_cell("print(os.environ['KERNEL_USERNAME'], total * 2)"),
    ]
    NotebookClient(nb, kernel_name=KERNEL, timeout=60, startup_timeout=90).execute()
    assert nb.cells[1].outputs[0]["data"]["text/plain"] == "55"
    assert nb.cells[3].outputs[0]["text"] == "alice 110\n"
    # nbclient shut the kernel down: its RemoteKernel is gone.
    assert custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"] == []


def test_jupyter_console_runs_code_through_the_provisioner(
    operator: OperatorProcess, jupyter_env: dict[str, str], custom: client.CustomObjectsApi, namespace: str
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter_console",
            f"--kernel={KERNEL}",
            "--simple-prompt",
            "--ZMQTerminalInteractiveShell.kernel_timeout=90",
        ],
        input="print(6 * 7)\nexit\n",
        env=jupyter_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert "42" in result.stdout, (result.stdout, result.stderr)
    # jupyter console ends by a shutdown_request to the kernel (not through its manager): the
    # kernel exits, the operator records it and stops everything; the resource stays as a record.
    (item,) = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    name = item["metadata"]["name"]
    status = wait_phase(custom, namespace, name, "Succeeded", timeout=30)["status"]
    assert status["backendRef"]["stopped"] is True
    assert not [p for p in launcher_processes() if status["backendRef"]["runDir"] in p]


# -- idle culling and owners ----------------------------------------------------------------------


async def test_the_operator_culls_an_idle_kernel_but_not_a_busy_or_active_one(
    operator: OperatorProcess,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from .test_operator_ssh import ready_client, start_remote_kernel

    km = await start_remote_kernel(tmp_path, kubeconfig, namespace, monkeypatch, idle_timeout=4)
    name = f"k-{km.kernel_id}"
    assert get(custom, namespace, name)["spec"]["idleTimeoutSeconds"] == 4  # type: ignore[index]
    async with ready_client(km) as kc:
        # Busy for longer than the timeout: not idle.
        reply = await kc.execute_interactive("import time; time.sleep(7)", timeout=30)
        assert reply["content"]["status"] == "ok"
        # Active every 2 s for 6 s: not idle either.
        for _ in range(3):
            await asyncio.sleep(2)
            assert (await kc.execute_interactive("1", timeout=10))["content"]["status"] == "ok"
        assert get(custom, namespace, name) is not None
    # Then silent, and nobody around: the client lets go of the kernel without shutting it down.
    await km.provisioner.close()  # type: ignore[union-attr]
    silent_since = time.monotonic()
    wait_kernel_gone(custom, namespace, str(km.kernel_id))
    assert 3.5 <= time.monotonic() - silent_since < 20
    events = client.CoreV1Api(api_client).list_namespaced_event(namespace).items
    culled = [e for e in events if e.reason == "IdleCulled" and e.involved_object.name == name]
    assert culled and "idle for 4 s" in culled[0].message
    assert not [p for p in launcher_processes() if str(km.kernel_id) in p]


async def test_a_kernel_owned_by_the_jupyter_servers_pod_goes_with_the_pod(
    operator: OperatorProcess,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from .test_operator_ssh import start_remote_kernel

    core = client.CoreV1Api(api_client)
    # The Jupyter server's pod, as the API knows it (its downward API gives name and uid).
    pod = core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="jupyter-server"),
            spec=client.V1PodSpec(
                containers=[client.V1Container(name="server", image="jupyter/server:none")],
                node_selector={"no-such-node": "true"},  # stays Pending: only its identity matters
            ),
        ),
    )
    monkeypatch.setenv("JUPYTER_POD_NAME", pod.metadata.name)
    monkeypatch.setenv("JUPYTER_POD_UID", pod.metadata.uid)
    km = await start_remote_kernel(tmp_path, kubeconfig, namespace, monkeypatch)
    name = f"k-{km.kernel_id}"
    owners = get(custom, namespace, name)["metadata"]["ownerReferences"]  # type: ignore[index]
    assert owners == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "jupyter-server",
            "uid": pod.metadata.uid,
            "blockOwnerDeletion": False,
        }
    ]
    await km.provisioner.close()  # type: ignore[union-attr]
    core.delete_namespaced_pod("jupyter-server", namespace, grace_period_seconds=0)
    # The garbage collector deletes the RemoteKernel; the operator's finalizer stops the kernel.
    wait_kernel_gone(custom, namespace, str(km.kernel_id))
    assert not [p for p in launcher_processes() if str(km.kernel_id) in p]
