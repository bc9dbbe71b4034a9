"""The ssh backend (gateway_provisioners' DistributedProvisioner): kernels on a pool of hosts.

The profile names the hosts (a RemoteKernel may pick among them), the login, the Python and
whether kernels run as their users. A host named in ``local_hosts`` (none unless the operator's
RKO_SSH_LOCAL_HOSTS enables it) runs the launcher as a local process, with no ssh. Other hosts
are reached with paramiko; host keys are checked against a known_hosts (no AutoAddPolicy
unless explicitly allowed), from a file or from the operator's ssh Secret, read again at each
new connection so a rotated key needs no restart. Password authentication is off unless
enabled. Hosts are chosen round-robin or by least connections; a host that cannot be reached
is skipped, the next one tried, and it is tried last for a while afterwards.

With impersonation, everything on a host runs as the kernel's user (runuser from a root
login, ``sudo -n`` otherwise); uid 0 is refused on the host as well as by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from ..balancer import HostBalancer, NoHostLeft
from ..errors import BackendError, BackendUnavailable, CommandUnanswered, SpecError
from ..kube import Kube, KubeError
from ..launch_command import (
    EXIT_NO_ACCOUNT,
    EXIT_UID_ZERO,
    LAUNCH_FILE,
    LAUNCHER_LOG,
    LAUNCHER_MODULE,
    launch_file,
    remote_find_command,
    remote_log_tail_command,
    remote_signal_command,
    remote_start_command,
    remote_status_batch_command,
    remote_stop_command,
    run_dir_for,
    run_dir_is_for,
    split_status_batch,
)
from ..settings import SshSettings
from ..spec import KernelRequest
from .base import BackendRef, BackendStatus, LaunchPlan
from .batching import Batcher
from .blocking import BlockingPool
from .ssh_connections import Connection, ConnectionPool, Key, PoolTimeout

log = logging.getLogger(__name__)
_LOCAL_ENV = ("PATH", "LANG", "LC_ALL", "HOME", "TZ")  # the only operator variables a kernel gets
_REMOTE_ENV = ("LANG", "LC_ALL", "TZ")  # PATH and HOME are the remote login's own
LOG_TAIL_BYTES = 1500  # of a dead launcher's log, quoted in the kernel's failure message
# Failures that say the host itself is unusable: it is tried last for a while.
StatusKey = tuple[str, int, str, str | None]  # host, port, login, user
_HOST_FAULTS = frozenset({"HostUnreachable", "HostKeyMismatch", "UnknownHostKey", "SshAuthFailed"})


@dataclass(frozen=True)
class SshSecret:
    """The operator's ssh credentials as its Secret holds them (kubernetes.io/ssh-auth keys)."""

    private_key: str = ""
    known_hosts: str = ""
    password: str = ""
    passphrase: str = ""


class _SecretNeeded(Exception):
    """A new ssh connection is needed, and the ssh Secret was not read for it (see SshBackend._run)."""


class SecretCredentials:
    """Reads the ssh Secret (``ssh-privatekey``, ``known_hosts``, optional ``password`` and
    ``passphrase``) from the operator's namespace, when one is configured."""

    def __init__(self, kube: Kube, namespace: str, name: str) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name

    async def load(self) -> SshSecret | None:
        if not self.name:
            return None
        try:
            data = await self.kube.read_secret(self.namespace, self.name)
        except KubeError as err:
            raise BackendUnavailable(
                f"Cannot read the ssh Secret {self.namespace}/{self.name}: {err}"
            ) from err
        if data is None:
            raise BackendUnavailable(
                f"The ssh Secret {self.namespace}/{self.name} (RKO_SSH_SECRET) does not exist; create it "
                "with the keys ssh-privatekey and known_hosts.",
                reason="SshSecretMissing",
            )

        def text(key: str) -> str:
            return data.get(key, b"").decode()

        return SshSecret(text("ssh-privatekey"), text("known_hosts"), text("password"), text("passphrase"))


def private_key_from_text(text: str, passphrase: str = "") -> paramiko.PKey:
    """A private key in OpenSSH or PEM form, of any type paramiko supports."""
    errors = []
    for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return kind.from_private_key(io.StringIO(text), password=passphrase or None)
        except (paramiko.SSHException, ValueError) as err:
            errors.append(f"{kind.__name__}: {err}")
    raise BackendError(
        "The ssh Secret's ssh-privatekey is not a usable private key (" + "; ".join(errors) + ").",
        reason="SshKeyInvalid",
    )


def host_keys_from_text(text: str) -> paramiko.HostKeys:
    """known_hosts content (plain or hashed names) as paramiko's HostKeys."""
    keys = paramiko.HostKeys()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
        except (paramiko.SSHException, ValueError):
            entry = None
        if entry is None or entry.key is None:
            log.warning("Skipping an unreadable known_hosts line: %.40s...", line)
            continue
        for name in entry.hostnames:
            keys.add(name, entry.key.get_name(), entry.key)
    return keys


class SshBackend:
    name = "ssh"

    def __init__(self, settings: SshSettings, credentials: SecretCredentials | None = None) -> None:
        self.settings = settings
        self.credentials = credentials
        self.balancer = HostBalancer()
        self._statuses: Batcher[StatusKey, tuple[int, int, str], str] = Batcher(self._status_batch)
        self._connections = ConnectionPool(settings.channels_per_connection, settings.connections_per_host)
        self._threads = BlockingPool("ssh", settings.threads)
        self._children: dict[int, asyncio.subprocess.Process] = {}
        self._reapers: set[asyncio.Task[int]] = set()

    # -- bookkeeping -------------------------------------------------------------------------
    def adopt(self, ref: BackendRef) -> None:
        if ref.get("host"):
            self.balancer.add(str(ref["host"]))

    def release(self, ref: BackendRef) -> None:
        if ref.get("host"):
            self.balancer.remove(str(ref["host"]))

    async def find(self, request: KernelRequest) -> BackendRef | None:
        """The launch of an operator stopped before it recorded it: the run directory made for
        this RemoteKernel (``run_dir_for``), looked for on each of the kernel's hosts, with the
        launcher whose command line names it (pid 0 when only the directory is left)."""
        run_dir = run_dir_for(request.kernel_id, request.uid)
        user = request.run_as
        port, login = self.login(request)
        for host in self.candidate_hosts(request):
            if self.is_local(host):
                if not Path(run_dir).is_dir():
                    continue
                pid = _launcher_of(run_dir)
                if not pid and not (Path(run_dir) / LAUNCHER_LOG).exists():
                    continue  # cut off before its launcher started: the next launch clears it
                return {"host": host, "pid": pid, "pgid": _pgid_of(pid), "runDir": run_dir, "local": True}
            try:
                out = await self._run(host, port, login, remote_find_command(run_dir, user))
            except BackendError as err:
                log.warning("Cannot look for kernel %s's launch on %s: %s", request.kernel_id, host, err)
                continue
            if not out.strip():
                continue
            pid, pgid = _found_pids(out)
            return _remote_ref(host, port, login, pid, pgid, run_dir, user)
        return None

    def is_local(self, host: str) -> bool:
        return host in self.settings.local_hosts

    # -- launch ------------------------------------------------------------------------------
    def candidate_hosts(self, request: KernelRequest) -> list[str]:
        """The hosts the spec picked among its profile's, else all of the profile's (or, for a
        profile naming none, the operator's RKO_SSH_HOSTS)."""
        pool = [str(h) for h in request.backend_config.get("hosts") or self.settings.hosts]
        if not pool:
            raise SpecError(
                f"Profile {request.profile} names no ssh hosts and the operator has no RKO_SSH_HOSTS; "
                "its administrator must list the hosts in the profile's ssh.hosts.",
                reason="NoHostAvailable",
            )
        named = [str(h) for h in request.tenant_config.get("hosts") or []]
        refused = [h for h in named if h not in pool]
        if refused:
            raise BackendError(
                f"spec.ssh.hosts names {', '.join(refused)}, not among profile {request.profile}'s "
                f"hosts ({', '.join(pool)}).",
                reason="HostNotAllowed",
            )
        return named or pool

    def login(self, request: KernelRequest) -> tuple[int, str]:
        """The ssh port and login user: the profile's, else the operator's."""
        config = request.backend_config
        return int(config.get("port") or self.settings.port), str(config.get("user") or self.settings.user)

    async def launch(self, plan: LaunchPlan) -> BackendRef:
        request = plan.request
        hosts = self.candidate_hosts(request)
        algorithm = str(
            request.tenant_config.get("loadBalancing")
            or request.backend_config.get("loadBalancing")
            or self.settings.load_balancing
        )
        failures: list[BackendUnavailable] = []
        tried: set[str] = set()
        abandoned: list[str] = []  # hosts whose start may have run after all
        while True:
            try:
                host = self.balancer.pick(hosts, algorithm, frozenset(tried), now=time.monotonic())
            except NoHostLeft:
                raise _no_host_left(failures) from None
            tried.add(host)
            try:
                ref = await self._launch_on(host, plan)
            except BackendUnavailable as err:
                log.warning("Host %s could not start kernel %s: %s", host, plan.request.kernel_id, err)
                failures.append(err)
                if isinstance(err, CommandUnanswered):
                    abandoned.append(host)
                if err.reason in _HOST_FAULTS:
                    self.balancer.cool_down(host, time.monotonic() + self.settings.host_retry_seconds)
                continue
            self.balancer.add(host)
            self.balancer.recovered(host)
            if abandoned:
                # Recorded, so a stop clears them too: a launcher started there after all
                # holds this launch's token (its report is refused: not the recorded launcher).
                ref["abandoned"] = abandoned
            return ref

    def _kernel_env(self, plan: LaunchPlan, remote: bool) -> dict[str, str]:
        names = _REMOTE_ENV if remote else _LOCAL_ENV
        env = {k: os.environ[k] for k in names if k in os.environ}
        env.update(plan.request.env)
        return env

    async def _launch_on(self, host: str, plan: LaunchPlan) -> BackendRef:
        request = plan.request
        config = request.backend_config
        run_dir = plan.run_dir
        user = request.run_as
        working_dir = request.env.get("KERNEL_WORKING_DIR") or config.get("workingDir")
        if self.is_local(host):
            if user:
                raise BackendUnavailable(
                    f"{host} is a local host (RKO_SSH_LOCAL_HOSTS): impersonation needs an ssh login.",
                    reason="ImpersonationUnsupported",
                )
            return await self._launch_local(host, await _address_of(host), plan, working_dir)
        ip = await _address_of(host)
        python = str(config.get("python") or self.settings.python)
        launch = launch_file(plan.token, self._kernel_env(plan, remote=True))
        command = remote_start_command(
            python, plan.launcher_args(ip), run_dir, working_dir, user, launch_bytes=len(launch.encode())
        )
        port, login = self.login(request)
        out = await self._run(host, port, login, command, launch, user)
        try:
            pid = int(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as err:
            raise BackendError(f"Host {host} did not report the launcher's pid: {out!r}") from err
        ref = _remote_ref(host, port, login, pid, pid, run_dir, user)
        ref["ip"] = ip  # where its kernel listens: a report from elsewhere is another launcher's
        return ref

    async def _launch_local(
        self, host: str, ip: str, plan: LaunchPlan, working_dir: str | None
    ) -> BackendRef:
        python = str(plan.request.backend_config.get("python") or self.settings.python or sys.executable)
        run_dir = plan.run_dir
        path = Path(run_dir)
        await _clear_earlier_attempt(path)
        try:
            path.mkdir(mode=0o700)  # not exist_ok: anything already there was not made by us
        except OSError as err:
            raise BackendError(
                f"Cannot make the run directory {run_dir} on {host}: {err}", reason="RunDirUnavailable"
            ) from err
        fd = os.open(path / LAUNCH_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(launch_file(plan.token, self._kernel_env(plan, remote=False)))
        with open(path / LAUNCHER_LOG, "ab") as log_file:
            try:
                proc = await asyncio.create_subprocess_exec(
                    python,
                    "-m",
                    LAUNCHER_MODULE,
                    *plan.launcher_args(ip),
                    "--launch-file",
                    str(path / LAUNCH_FILE),
                    env={k: os.environ[k] for k in _LOCAL_ENV if k in os.environ},
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
        reaper = asyncio.get_running_loop().create_task(proc.wait())
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)
        return {"host": host, "pid": proc.pid, "pgid": proc.pid, "runDir": run_dir, "local": True}

    # -- status ------------------------------------------------------------------------------
    async def status(self, ref: BackendRef) -> BackendStatus:
        """The launcher's state; raises BackendUnavailable when the host cannot be reached."""
        if not _complete(ref):
            return BackendStatus(
                "gone", "BackendRefIncomplete", f"The kernel's record {ref} names no host and run directory."
            )
        pid, run_dir = int(ref["pid"]), str(ref["runDir"])
        kernel_pid = int(ref.get("kernelPid") or 0)
        if ref.get("local"):
            # exit_status first: the launcher writes it as the kernel ends, then exits itself.
            text = _read(Path(run_dir) / "exit_status")
            child = self._children.get(pid)
            running = child.returncode is None if child is not None else _is_ours(pid, run_dir)
            if text == "gone" and (running or (kernel_pid and _is_ours(kernel_pid, run_dir))):
                return BackendStatus("running")
            if text == "gone":
                text += "\n" + _tail(Path(run_dir) / LAUNCHER_LOG)
        else:
            try:
                # One command per host and user answers every kernel asking meanwhile.
                text = await self._statuses.ask(
                    (*self._host_of(ref), ref.get("user")), (pid, kernel_pid, run_dir)
                )
            except BackendUnavailable:
                raise
            except BackendError as err:
                return BackendStatus(
                    "gone", err.reason, f"The kernel on {ref['host']} cannot be inspected: {err}"
                )
            if text.strip() in ("running", "orphaned"):
                return BackendStatus("running")
        return _exit_status(text, ref)

    async def _status_batch(self, key: StatusKey, items: list[tuple[int, int, str]]) -> list[str]:
        host, port, login, user = key
        out = await self._run(host, port, login, remote_status_batch_command(items, user), user=user)
        return split_status_batch(out, len(items))

    async def log_tail(self, ref: BackendRef, owner: str) -> str:
        """The end of the launcher's log in its run directory (only a run directory of ``owner``)."""
        run_dir = str(ref.get("runDir") or "")
        if not _complete(ref) or not run_dir_is_for(run_dir, owner):
            return ""
        if ref.get("local"):
            return _tail(Path(run_dir) / LAUNCHER_LOG, 600)
        with contextlib.suppress(BackendError):
            return await self._run(*self._host_of(ref), remote_log_tail_command(run_dir, ref.get("user")))
        return ""

    # -- signals -----------------------------------------------------------------------------
    async def signal(self, ref: BackendRef, signum: int, owner: str) -> None:
        """Signal the kernel's process directly (its launcher is gone): over ssh, or locally.

        Only a process that names ``owner``'s run directory: a status naming another kernel's
        pid and run directory gets nothing signalled."""
        if not _complete(ref):
            raise BackendError(
                f"The kernel's record {ref} names no host and run directory; nothing was signalled."
            )
        pid = int(ref.get("kernelPid") or ref["pid"])
        run_dir = str(ref["runDir"])
        if not run_dir_is_for(run_dir, owner):
            raise BackendError(f"The run directory {run_dir!r} is not this kernel's; nothing was signalled.")
        if ref.get("local"):
            if not _is_ours(pid, run_dir):
                raise BackendError(f"The kernel process {pid} is gone.")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
            return
        await self._run(*self._host_of(ref), remote_signal_command(pid, signum, run_dir, ref.get("user")))

    # -- stop --------------------------------------------------------------------------------
    async def stop(self, ref: BackendRef, owner: str) -> None:
        if not _complete(ref):
            # Nothing names what to stop; a launcher left unacknowledged gives up on its own.
            log.warning("Not stopping %s: it names no host and run directory.", ref)
            return
        pgid, run_dir = int(ref.get("pgid") or ref.get("pid") or 0), str(ref["runDir"])
        if not run_dir_is_for(run_dir, owner):
            log.warning("Not stopping %s: its run directory %r is not this kernel's.", ref, run_dir)
            return
        if ref.get("local"):
            # Our own child (this operator started it), or a group one of whose processes
            # names the kernel's run directory (after a restart): nothing else is signalled.
            if pgid in self._children or _group_is_ours(pgid, run_dir):
                await _stop_local_group(pgid)
            self._children.pop(int(ref["pid"]), None)
            shutil.rmtree(run_dir, ignore_errors=True)
            return
        try:
            await self._run(*self._host_of(ref), remote_stop_command(pgid, run_dir, user=ref.get("user")))
        except BackendUnavailable:
            raise
        except BackendError as err:
            if err.reason != "UnknownUser":  # the account is gone, and its processes with it
                raise
        for host in ref.get("abandoned") or []:
            await self._clear_abandoned(str(host), ref, run_dir)

    async def _clear_abandoned(self, host: str, ref: BackendRef, run_dir: str) -> None:
        """Stop what a start on ``host`` that went unanswered may have started (best effort: a
        launcher still unreachable is refused when it reports, and stops its kernel then)."""
        _, port, login = self._host_of(ref)
        user = ref.get("user")
        try:
            found = await self._run(host, port, login, remote_find_command(run_dir, user))
            if found.strip():
                _, pgid = _found_pids(found)
                await self._run(host, port, login, remote_stop_command(pgid, run_dir, user=user))
        except BackendError as err:
            log.warning(
                "Could not clear the unanswered start on %s (%s); a launcher there is refused when it "
                "reports: %s",
                host,
                run_dir,
                err,
            )

    # -- ssh ---------------------------------------------------------------------------------
    def _host_of(self, ref: BackendRef) -> tuple[str, int, str]:
        """The host, ssh port and login a remote launch recorded."""
        return str(ref["host"]), int(ref.get("port", 22)), str(ref.get("login", self.settings.user))

    async def _run(
        self,
        host: str,
        port: int,
        login: str,
        command: str,
        stdin_text: str | None = None,
        user: str | None = None,
    ) -> str:
        """Run ``command`` on ``host``; the Secret is read only when a new connection is needed."""
        secret = None
        if self.credentials is not None and not self._connections.has_room((host, port, login)):
            secret = await self.credentials.load()
        try:
            return await self._threads.run(self._exec, host, port, login, command, stdin_text, secret, user)
        except _SecretNeeded:
            # The pool had room when asked, and none when the thread got to it: a connection
            # is made after all, and it must trust the Secret's known_hosts, not ~/.ssh's.
            assert self.credentials is not None
            secret = await self.credentials.load()
            return await self._threads.run(self._exec, host, port, login, command, stdin_text, secret, user)

    def _exec(
        self,
        host: str,
        port: int,
        login: str,
        command: str,
        stdin_text: str | None = None,
        secret: SshSecret | None = None,
        user: str | None = None,
    ) -> str:
        key = (host, port, login)
        conn, channel = self._open_channel(key, secret)
        try:
            channel.settimeout(self.settings.command_timeout)
            channel.exec_command(command)
            if stdin_text is not None:
                channel.sendall(stdin_text.encode())
            channel.shutdown_write()
            out = _read_all(channel.makefile("rb"))
            err_text = _read_all(channel.makefile_stderr("rb"))
            code = channel.recv_exit_status()
            channel.close()
        except (paramiko.SSHException, OSError, EOFError) as err:
            self._connections.discard_if_dead(key, conn)
            # The command may have reached the host (and run, or run once a cut link is back).
            raise CommandUnanswered(
                f"ssh command on {host} failed: {err or type(err).__name__}", reason="HostUnreachable"
            ) from err
        finally:
            self._connections.checkin(key, conn)
        if code != 0:
            if code == EXIT_NO_ACCOUNT:
                raise BackendUnavailable(f"{host} has no account {user!r}: {err_text}", reason="UnknownUser")
            if code == EXIT_UID_ZERO:
                raise BackendError(f"{host}: {err_text}", reason="ImpersonationRefused")
            raise BackendError(f"ssh command on {host} exited with {code}: {err_text}")
        return out

    def _open_channel(self, key: Key, secret: SshSecret | None) -> tuple[Connection, paramiko.Channel]:
        """A session channel on a pooled connection to ``key``'s host (checked out: give the
        connection back with ``checkin``)."""
        host, port, login = key
        for _ in range(self.settings.connections_per_host + 1):
            try:
                conn = self._connections.checkout(
                    key, lambda: self._new_client(host, port, login, secret), self.settings.command_timeout
                )
            except PoolTimeout as err:
                raise BackendUnavailable(f"{host} is busy: {err}", reason="HostBusy") from err
            transport = conn.client.get_transport()
            try:
                if transport is None:
                    raise paramiko.SSHException("the connection has no transport")
                return conn, transport.open_session(timeout=self.settings.command_timeout)
            except (paramiko.SSHException, OSError, EOFError) as err:
                if _refused(err) and conn.alive():
                    # A channel refused on a live connection: the server's MaxSessions (paramiko
                    # says ChannelException, or only "Unable to open channel" when threads race
                    # for the transport's saved error). This connection is full, not broken:
                    # another one takes the command, and nothing else is disturbed.
                    conn.full_at(conn.channels - 1)
                    self._connections.checkin(key, conn)
                    log.info("The ssh connection to %s is full (%s); using another.", host, err)
                    continue
                # No answer at all (a cut link): this connection is of no more use.
                self._connections.checkin(key, conn)
                self._connections.discard(key, conn)
                raise BackendUnavailable(
                    f"ssh to {host} failed: {err or type(err).__name__}", reason="HostUnreachable"
                ) from err
        raise BackendUnavailable(
            f"{host} refused every new ssh channel (sshd's MaxSessions).", reason="HostBusy"
        )

    def _new_client(self, host: str, port: int, login: str, secret: SshSecret | None) -> paramiko.SSHClient:
        if secret is None and self.credentials is not None and self.credentials.name:
            raise _SecretNeeded()
        settings = self.settings
        client = paramiko.SSHClient()
        known_hosts = settings.known_hosts or "~/.ssh/known_hosts"
        if secret is not None and secret.known_hosts:
            known_hosts = f"the ssh Secret's known_hosts ({settings.secret})"
            for name, entries in host_keys_from_text(secret.known_hosts).items():
                for key_type, key in entries.items():
                    client.get_host_keys().add(name, key_type, key)
        elif settings.known_hosts:
            client.load_host_keys(settings.known_hosts)
        else:
            client.load_system_host_keys()
        if settings.allow_unknown_hosts:
            log.warning("RKO_SSH_ALLOW_UNKNOWN_HOSTS is on: accepting %s's key unchecked.", host)
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        pkey = None
        if secret is not None and secret.private_key:
            pkey = private_key_from_text(secret.private_key, secret.passphrase)
        password = secret.password if secret is not None and settings.password_auth else None
        timeout = settings.connect_timeout
        try:
            client.connect(
                host,
                port=port,
                username=login or None,
                pkey=pkey,
                key_filename=None if pkey else settings.key_file or None,
                password=password or None,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                allow_agent=False,
                look_for_keys=not (pkey or settings.key_file),
            )
        except paramiko.BadHostKeyException as err:
            raise BackendUnavailable(
                f"the host key of {host} changed; refusing to connect (update {known_hosts} if the "
                "change is expected)",
                reason="HostKeyMismatch",
            ) from err
        except paramiko.AuthenticationException as err:
            raise BackendUnavailable(
                f"ssh login to {host}:{port} as {login or 'the current user'} was refused: {err}",
                reason="SshAuthFailed",
            ) from err
        except paramiko.SSHException as err:
            if "not found in known_hosts" in str(err):
                raise BackendUnavailable(
                    f"{host} is not in {known_hosts}; add its key there", reason="UnknownHostKey"
                ) from err
            raise BackendUnavailable(f"ssh to {host}:{port} failed: {err}", reason="HostUnreachable") from err
        except OSError as err:
            raise BackendUnavailable(f"cannot reach {host}:{port}: {err}", reason="HostUnreachable") from err
        transport = client.get_transport()
        if transport is not None:
            # Notice a dead link while idle, not only at the next command.
            transport.set_keepalive(max(1, int(settings.command_timeout / 2)))
        return client

    def close(self) -> None:
        self._connections.close()
        self._threads.shutdown()

    async def aclose(self) -> None:
        """Stop waiting on local kernels' launchers (they run on; a restarted operator adopts them)."""
        for reaper in list(self._reapers):
            reaper.cancel()
        self._reapers.clear()


def _refused(err: BaseException) -> bool:
    """Whether opening a channel failed because the server said no (not for want of an answer)."""
    return isinstance(err, paramiko.ChannelException) or str(err) == "Unable to open channel."


def _read_all(stream: Any) -> str:
    return bytes(stream.read()).decode(errors="replace")


def _no_host_left(failures: Sequence[BackendUnavailable]) -> BackendError:
    """The error when every host failed: one reason when they agree, NoHostAvailable if not."""
    reasons = {err.reason for err in failures}
    reason = reasons.pop() if len(reasons) == 1 else "NoHostAvailable"
    detail = "; ".join(str(err) for err in failures) or "no host is configured"
    return BackendError(f"No ssh host could start the kernel: {detail}.", reason=reason)


async def _address_of(host: str) -> str:
    """The IPv4 address a kernel on ``host`` binds and reports (loopback names stay loopback)."""
    if host in ("localhost", "127.0.0.1"):
        return "127.0.0.1"
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, family=socket.AF_INET)
    except OSError as err:
        raise BackendUnavailable(f"cannot resolve {host}: {err}") from err
    return str(infos[0][4][0])


def _found_pids(out: str) -> tuple[int, int]:
    """``(pid, pgid)`` from ``remote_find_command``'s answer; ``(0, 0)`` when no process is left."""
    words = out.split()
    return (int(words[0]), int(words[1])) if len(words) == 2 and "".join(words).isdigit() else (0, 0)


def _remote_ref(
    host: str, port: int, login: str, pid: int, pgid: int, run_dir: str, user: str | None
) -> BackendRef:
    """What status records of a launcher started over ssh."""
    ref: BackendRef = {
        "host": host,
        "port": port,
        "login": login,
        "pid": pid,
        "pgid": pgid,
        "runDir": run_dir,
        "local": False,
    }
    if user:
        ref["user"] = user
    return ref


def _complete(ref: BackendRef) -> bool:
    """Whether ``ref`` names what the ssh backend needs to find a kernel again."""
    return bool(ref.get("host") and ref.get("runDir") and "pid" in ref)


def _launcher_of(run_dir: str) -> int:
    """The pid of the local launcher whose command line names ``run_dir``, else of any process
    naming it (its kernel); 0 if none."""
    any_pid = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _is_ours(int(entry.name), run_dir):
            any_pid = int(entry.name)
            with contextlib.suppress(OSError):
                if LAUNCHER_MODULE in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    return any_pid
    return any_pid


def _pgid_of(pid: int) -> int:
    try:
        return os.getpgid(pid) if pid else 0
    except ProcessLookupError:
        return 0


def _tail(path: Path, size: int = LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - size))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


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
        # 'gone', then (remote) the end of the launcher's log: what it said before it died.
        log_tail = text.partition("\n")[2].strip()
        said = f" Its log ends: {log_tail}" if log_tail else ""
        return BackendStatus(
            "gone",
            "ProcessGone",
            f"The launcher on {ref.get('host')} (pid {ref.get('pid')}) is gone.{said}",
        )
    if code == 0:
        return BackendStatus("succeeded", "KernelExited", "The kernel exited normally.", 0)
    detail = f": {message}" if message else ""
    return BackendStatus("failed", "KernelFailed", f"The kernel exited with code {code}{detail}.", code)


def _is_ours(pid: int, run_dir: str) -> bool:
    """Process ``pid`` is alive (not a zombie) and its command line names ``run_dir``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X") and run_dir in cmdline


def _group_is_ours(pgid: int, run_dir: str) -> bool:
    """Whether a process of group ``pgid`` names ``run_dir``: only then is the group this kernel's."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and _is_ours(int(entry.name), run_dir):
            return True
    return False


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


async def _clear_earlier_attempt(path: Path) -> None:
    """Stop and remove what an earlier attempt of this same launch left in its run directory
    (the operator's status write failed after it started, e.g. while the API server was down).

    Only a real directory owned by the operator's own user and private to it counts as ours:
    anything else stays, and making the directory then fails with a clear reason."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        return
    groups = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _is_ours(int(entry.name), str(path)):
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(int(entry.name)))
    for pgid in groups - {os.getpgid(0)}:  # never the operator's own group
        await _stop_local_group(pgid)
    log.warning("Removed the run directory %s an earlier attempt of this launch left.", path)
    shutil.rmtree(path, ignore_errors=True)


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
