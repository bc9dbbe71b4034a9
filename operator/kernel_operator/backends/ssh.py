"""The ssh backend (gateway_provisioners' DistributedProvisioner): kernels on a pool of hosts.

A host named in ``local_hosts`` runs the launcher as a local process, with no ssh. Other hosts
are reached with paramiko; host keys are checked against a known_hosts file (no AutoAddPolicy
unless explicitly allowed). Hosts are chosen round-robin or by least connections; a host that
cannot be reached is skipped and the next one tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path

import paramiko

from ..balancer import HostBalancer, NoHostLeft
from ..errors import BackendError, BackendUnavailable
from ..launch_command import (
    LAUNCHER_MODULE,
    remote_start_command,
    remote_status_command,
    remote_stop_command,
)
from ..settings import SshSettings
from ..spec import KernelRequest
from .base import BackendRef, BackendStatus, LaunchPlan

log = logging.getLogger(__name__)
_BASE_ENV = ("PATH", "LANG", "LC_ALL", "HOME", "TZ")  # the only operator variables a kernel gets


class SshBackend:
    name = "ssh"

    def __init__(self, settings: SshSettings) -> None:
        self.settings = settings
        self.balancer = HostBalancer()
        self._clients: dict[tuple[str, int], paramiko.SSHClient] = {}
        self._lock = threading.Lock()
        self._children: dict[int, asyncio.subprocess.Process] = {}

    # -- bookkeeping -------------------------------------------------------------------------
    def adopt(self, ref: BackendRef) -> None:
        if ref.get("host"):
            self.balancer.add(str(ref["host"]))

    def release(self, ref: BackendRef) -> None:
        if ref.get("host"):
            self.balancer.remove(str(ref["host"]))

    async def find(self, request: KernelRequest) -> BackendRef | None:
        """Unrecorded ssh launches give up on their own: the launcher exits when no operator
        acknowledges it within its retry window."""
        return None

    def is_local(self, host: str) -> bool:
        return host in self.settings.local_hosts

    # -- launch ------------------------------------------------------------------------------
    async def launch(self, plan: LaunchPlan) -> BackendRef:
        config = plan.request.backend_config
        hosts = list(config.get("hosts") or self.settings.hosts)
        algorithm = str(config.get("loadBalancing") or self.settings.load_balancing)
        failures: list[str] = []
        tried: set[str] = set()
        while True:
            try:
                host = self.balancer.pick(hosts, algorithm, frozenset(tried))
            except NoHostLeft:
                raise BackendError(
                    "No ssh host could start the kernel: " + "; ".join(failures),
                    reason="NoHostAvailable",
                ) from None
            tried.add(host)
            try:
                ref = await self._launch_on(host, plan)
            except BackendUnavailable as err:
                log.warning("Host %s could not start kernel %s: %s", host, plan.request.kernel_id, err)
                failures.append(f"{host}: {err}")
                continue
            self.balancer.add(host)
            return ref

    def _kernel_env(self, plan: LaunchPlan) -> dict[str, str]:
        env = {k: os.environ[k] for k in _BASE_ENV if k in os.environ}
        env.update(plan.request.env)
        return env

    async def _launch_on(self, host: str, plan: LaunchPlan) -> BackendRef:
        config = plan.request.backend_config
        run_dir = plan.run_dir
        ip = await _address_of(host)
        if self.is_local(host):
            return await self._launch_local(host, ip, plan, config.get("workingDir"))
        python = str(config.get("python") or self.settings.python)
        command = remote_start_command(
            python,
            plan.launcher_args(ip),
            self._kernel_env(plan),
            run_dir,
            config.get("workingDir"),
        )
        port = int(config.get("port") or self.settings.port)
        out = await asyncio.to_thread(self._exec, host, port, command, plan.token + "\n")
        try:
            pid = int(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as err:
            raise BackendError(f"Host {host} did not report the launcher's pid: {out!r}") from err
        return {
            "host": host,
            "port": port,
            "pid": pid,
            "pgid": pid,
            "runDir": run_dir,
            "local": False,
        }

    async def _launch_local(
        self, host: str, ip: str, plan: LaunchPlan, working_dir: str | None
    ) -> BackendRef:
        python = str(plan.request.backend_config.get("python") or self.settings.python or sys.executable)
        run_dir = plan.run_dir
        path = Path(run_dir)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = self._kernel_env(plan)
        env["RKO_LAUNCH_TOKEN"] = plan.token
        with open(path / "launcher.log", "ab") as log_file:
            try:
                proc = await asyncio.create_subprocess_exec(
                    python,
                    "-m",
                    LAUNCHER_MODULE,
                    *plan.launcher_args(ip),
                    env=env,
                    cwd=working_dir or None,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    start_new_session=True,  # its own group: stop takes the kernel too
                )
            except OSError as err:
                raise BackendError(f"Cannot start {python} on {host}: {err}", reason="LaunchFailed") from err
        self._children[proc.pid] = proc
        # Reap the child when it exits, so no zombie is left and its exit code is known.
        asyncio.get_running_loop().create_task(proc.wait())
        return {"host": host, "pid": proc.pid, "pgid": proc.pid, "runDir": run_dir, "local": True}

    # -- status ------------------------------------------------------------------------------
    async def status(self, ref: BackendRef) -> BackendStatus:
        pid, run_dir = int(ref["pid"]), str(ref["runDir"])
        if ref.get("local"):
            # exit_status first: the launcher writes it as the kernel ends, then exits itself.
            text = _read(Path(run_dir) / "exit_status")
            child = self._children.get(pid)
            running = child.returncode is None if child is not None else _pid_running(pid)
            if text == "gone" and running:
                return BackendStatus("running")
        else:
            try:
                text = await asyncio.to_thread(
                    self._exec,
                    str(ref["host"]),
                    int(ref.get("port", 22)),
                    remote_status_command(pid, run_dir),
                )
            except BackendUnavailable as err:
                return BackendStatus("gone", "HostUnreachable", f"Host {ref['host']} is unreachable: {err}")
            if text.strip() == "running":
                return BackendStatus("running")
        return _exit_status(text, ref)

    # -- stop --------------------------------------------------------------------------------
    async def stop(self, ref: BackendRef) -> None:
        pgid, run_dir = int(ref.get("pgid") or ref["pid"]), str(ref["runDir"])
        if ref.get("local"):
            await _stop_local_group(pgid)
            self._children.pop(int(ref["pid"]), None)
            shutil.rmtree(run_dir, ignore_errors=True)
            return
        await asyncio.to_thread(
            self._exec,
            str(ref["host"]),
            int(ref.get("port", 22)),
            remote_stop_command(pgid, run_dir),
        )

    # -- ssh ---------------------------------------------------------------------------------
    def _client(self, host: str, port: int) -> paramiko.SSHClient:
        with self._lock:
            client = self._clients.get((host, port))
            transport = client.get_transport() if client else None
            if client is not None and transport is not None and transport.is_active():
                return client
            client = paramiko.SSHClient()
            if self.settings.known_hosts:
                client.load_host_keys(self.settings.known_hosts)
            else:
                client.load_system_host_keys()
            if self.settings.allow_unknown_hosts:
                log.warning("RKO_SSH_ALLOW_UNKNOWN_HOSTS is on: accepting %s's key unchecked.", host)
                client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            else:
                client.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                client.connect(
                    host,
                    port=port,
                    username=self.settings.user or None,
                    key_filename=self.settings.key_file or None,
                    timeout=self.settings.connect_timeout,
                    banner_timeout=self.settings.connect_timeout,
                    auth_timeout=self.settings.connect_timeout,
                    allow_agent=False,
                    look_for_keys=not self.settings.key_file,
                )
            except paramiko.BadHostKeyException as err:
                raise BackendUnavailable(
                    f"the host key of {host} changed; refusing to connect (update the known_hosts "
                    "file if the change is expected)",
                    reason="HostKeyMismatch",
                ) from err
            except paramiko.SSHException as err:
                if "not found in known_hosts" in str(err):
                    raise BackendUnavailable(
                        f"{host} is not in the known_hosts file ({self.settings.known_hosts or '~/.ssh/known_hosts'}); "
                        "add its key there",
                        reason="UnknownHostKey",
                    ) from err
                raise BackendUnavailable(f"ssh to {host}:{port} failed: {err}") from err
            except OSError as err:
                raise BackendUnavailable(f"cannot reach {host}:{port}: {err}") from err
            self._clients[(host, port)] = client
            return client

    def _exec(self, host: str, port: int, command: str, stdin_text: str | None = None) -> str:
        client = self._client(host, port)
        try:
            stdin, stdout, stderr = client.exec_command(command, timeout=30)
            if stdin_text is not None:
                stdin.write(stdin_text)
                stdin.channel.shutdown_write()
            out = stdout.read().decode(errors="replace")
            code = stdout.channel.recv_exit_status()
        except (paramiko.SSHException, OSError) as err:
            with self._lock:
                self._clients.pop((host, port), None)
            raise BackendUnavailable(f"ssh command on {host} failed: {err}") from err
        if code != 0:
            err_text = stderr.read().decode(errors="replace").strip()
            raise BackendError(f"ssh command on {host} exited with {code}: {err_text}")
        return out

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


async def _address_of(host: str) -> str:
    """The IPv4 address a kernel on ``host`` binds and reports (loopback names stay loopback)."""
    if host in ("localhost", "127.0.0.1"):
        return "127.0.0.1"
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, family=socket.AF_INET)
    except OSError as err:
        raise BackendUnavailable(f"cannot resolve {host}: {err}") from err
    return str(infos[0][4][0])


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return "gone"


def _exit_status(text: str, ref: BackendRef) -> BackendStatus:
    """Map the launcher's exit_status file (or its absence) to a BackendStatus."""
    try:
        data = json.loads(text)
        code = int(data["code"])
        message = str(data.get("message") or "")
    except (ValueError, KeyError, TypeError):
        return BackendStatus(
            "gone",
            "ProcessGone",
            f"The launcher on {ref.get('host')} (pid {ref.get('pid')}) is gone.",
        )
    if code == 0:
        return BackendStatus("succeeded", "KernelExited", "The kernel exited normally.", 0)
    detail = f": {message}" if message else ""
    return BackendStatus("failed", "KernelFailed", f"The kernel exited with code {code}{detail}.", code)


def _pid_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies awaiting a reaper do not count)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


async def _stop_local_group(pgid: int, grace: float = 3.0) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while loop.time() < deadline:
        if not _group_alive(pgid):
            return
        await asyncio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
