"""A pool of ssh test hosts: one network namespace each, on a private bridge.

Each host is a network namespace with its own address on the pool's bridge ``rko-br<N>``
(198.18.<N>.0/24, in the range RFC 2544 sets aside for benchmarking networks: never anyone's
real address), and its own PID and mount namespaces in which Debian's sshd runs with a host
key of its own (see ``hostinit``). The machine side of the bridge (198.18.<N>.1) is where the
operator listens for launchers. Pools with different N (the tests use 0, the benchmark 1) live
side by side. Traffic stays on this machine: between the root namespace and the
suite's own namespaces.

Needs root (ip netns, mounts) and Debian's iproute2, openssh-server and python3-venv; the
shared Python environment is built by ``hack/images/build-host-env.sh``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .cluster import REPO_ROOT
from .servers import SSHD, sshd_config, wait_port

# Mount points, empty on the machine (and left there: another pool's hosts may use them).
PYTHON_MOUNT = "/run/rko-python"  # where every host sees the shared Python environment
HOST_DIR_MOUNT = "/run/rko-host"  # where each host sees its own folder (keys, sshd config)
HOST_ENV_SCRIPT = REPO_ROOT / "hack" / "images" / "build-host-env.sh"
# Accounts every host has besides the machine's own. toor is a second name for uid 0, as BSDs
# ship it: impersonating it must be refused just like root.
ACCOUNTS = {"alice": (2001, 2001), "bob": (2002, 2002), "toor": (0, 0)}


class HostError(RuntimeError):
    """A test host could not be set up."""


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", netns, "ip"] if netns else ["ip"]
    result = subprocess.run([*prefix, *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise HostError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def build_host_env() -> Path:
    """The shared Python environment (built once, cached under .cache/hosts)."""
    result = subprocess.run(["bash", str(HOST_ENV_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise HostError(f"{HOST_ENV_SCRIPT} failed with code {result.returncode}")
    return Path(result.stdout.strip().splitlines()[-1])


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(part) for part in text.split()]


def _pid_namespace(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


@dataclass
class NetnsHost:
    """One host: a network namespace with an address, sshd on port 22, and its own processes."""

    name: str
    address: str
    root: Path
    bridge: str
    extra_addresses: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def netns(self) -> str:
        return f"{self.bridge}-{self.name}"

    @property
    def host_key_pub(self) -> str:
        """``<type> <base64>`` of this host's ed25519 key."""
        parts = (self.root / "host_ed25519.pub").read_text().split()
        return f"{parts[0]} {parts[1]}"

    @property
    def init_pid(self) -> int:
        """The host's PID 1 as the machine sees it (the child of ``unshare``)."""
        assert self.proc is not None
        children = _children(self.proc.pid)
        if not children:
            raise HostError(f"host {self.name} has no init process")
        return children[0]

    def start(self, python_env: Path, client_key_pub: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        host_key = self.root / "host_ed25519"
        if not host_key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        (self.root / "authorized_keys").write_text(client_key_pub)
        self._write_accounts()
        self._plumb()
        inside = Path(HOST_DIR_MOUNT)
        (self.root / "sshd_config").write_text(sshd_config(22, ("0.0.0.0",), inside))
        config = {
            "host_dir": str(self.root),
            "host_dir_mount": HOST_DIR_MOUNT,
            "python_env": str(python_env),
            "python_mount": PYTHON_MOUNT,
            "homes": {user: ids for user, ids in ACCOUNTS.items() if ids[0] != 0},
            "sshd_command": [SSHD, "-D", "-e", "-f", str(inside / "sshd_config")],
            "sshd_log": str(inside / "sshd.log"),
        }
        (self.root / "init.json").write_text(json.dumps(config))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        for mount_point in (PYTHON_MOUNT, HOST_DIR_MOUNT):  # empty mount points on the machine
            Path(mount_point).mkdir(exist_ok=True)
        log = open(self.root / "init.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                "--propagation",
                "private",
                sys.executable,
                str(Path(__file__).with_name("hostinit.py")),
                str(self.root / "init.json"),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        try:
            wait_port(self.address, 22, timeout=20)
        except TimeoutError as err:
            raise HostError(f"host {self.name}'s sshd did not start; see {self.root / 'init.log'}") from err

    def _write_accounts(self) -> None:
        passwd = Path("/etc/passwd").read_text().rstrip("\n").splitlines()
        group = Path("/etc/group").read_text().rstrip("\n").splitlines()
        for user, (uid, gid) in ACCOUNTS.items():
            home = "/root" if uid == 0 else f"/home/{user}"
            passwd.append(f"{user}:x:{uid}:{gid}::{home}:/bin/sh")
            if gid != 0:
                group.append(f"{user}:x:{gid}:")
        (self.root / "passwd").write_text("\n".join(passwd) + "\n")
        (self.root / "group").write_text("\n".join(group) + "\n")

    def _plumb(self) -> None:
        veth = f"{self.bridge}-{self.name}"[:15]
        ip("netns", "add", self.netns)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        ip("link", "set", veth, "master", self.bridge, "up")
        for address in (self.address, *self.extra_addresses):
            ip("addr", "add", f"{address}/24", "dev", "eth0", netns=self.netns)
        ip("link", "set", "eth0", "up", netns=self.netns)
        ip("link", "set", "lo", "up", netns=self.netns)

    # -- faults --------------------------------------------------------------------------------
    def set_link(self, up: bool) -> None:
        """Cut (or restore) the host's network: packets are dropped silently, as on a real cut."""
        ip("link", "set", "eth0", "up" if up else "down", netns=self.netns)

    def set_sshd(self, running: bool) -> None:
        """Stop sshd and its open sessions (the host refuses ssh), or start it again."""
        os.kill(self.init_pid, signal.SIGUSR2 if running else signal.SIGUSR1)
        if running:
            wait_port(self.address, 22, timeout=20)
            return
        for pid, cmd in self.processes().items():
            if cmd.startswith("sshd:"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    # -- inspection ----------------------------------------------------------------------------
    def processes(self) -> dict[int, str]:
        """Machine pid -> command line of every live process on this host (zombies excluded)."""
        namespace = _pid_namespace(self.init_pid)
        found: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or _pid_namespace(int(entry.name)) != namespace:
                continue
            try:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if state not in ("Z", "X"):
                found[int(entry.name)] = cmdline.strip()
        return found

    def kernel_processes(self) -> dict[int, str]:
        """Launchers and kernels running on this host."""
        return {
            pid: cmd
            for pid, cmd in self.processes().items()
            if "kernel_launchers" in cmd or "ipykernel_launcher" in cmd
        }

    def path(self, inside: str) -> Path:
        """A path as this host sees it (its own /tmp and /home), readable from the machine."""
        return Path(f"/proc/{self.init_pid}/root") / inside.lstrip("/")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(HostError, ProcessLookupError):
                os.kill(self.init_pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        ip("netns", "del", self.netns, check=False)


@dataclass
class HostPool:
    """Several NetnsHosts on one bridge, and the client key and known_hosts that reach them."""

    root: Path
    names: tuple[str, ...] = ("h1", "h2", "h3")
    network: int = 0
    hosts: dict[str, NetnsHost] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"rko-br{self.network}"

    @property
    def gateway(self) -> str:
        """The machine's address on the pool's bridge: where launchers reach the operator."""
        return f"198.18.{self.network}.1"

    @property
    def client_key(self) -> Path:
        return self.root / "client_ed25519"

    def address(self, name: str) -> str:
        return self.hosts[name].address

    def start(self, extra_addresses: dict[str, int] | None = None) -> None:
        """Start every host; ``extra_addresses`` gives a host more addresses (same sshd, same key)."""
        self.root.mkdir(parents=True, exist_ok=True)
        cleanup_stale(self.bridge)
        python_env = build_host_env()
        if not self.client_key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.client_key)], check=True
            )
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        client_pub = self.client_key.with_suffix(".pub").read_text()
        try:
            for index, name in enumerate(self.names):
                count = (extra_addresses or {}).get(name, 0)
                subnet = f"198.18.{self.network}"
                host = NetnsHost(
                    name,
                    f"{subnet}.{11 + index}",
                    self.root / name,
                    self.bridge,
                    extra_addresses=tuple(f"{subnet}.{111 + 10 * index + k}" for k in range(count)),
                )
                self.hosts[name] = host
                host.start(python_env, client_pub)
        except BaseException:
            self.stop()
            raise

    def known_hosts(self, *names: str) -> str:
        """known_hosts lines vouching for the named hosts' main addresses (all by default)."""
        lines = []
        for name in names or tuple(self.hosts):
            host = self.hosts[name]
            lines.append(f"{host.address} {host.host_key_pub}")
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        for host in self.hosts.values():
            host.stop()
        ip("link", "del", self.bridge, check=False)


def cleanup_stale(bridge: str) -> None:
    """Remove the bridge and namespaces an interrupted run of this pool left behind."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(f"{bridge}-"):
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        ip("netns", "del", name, check=False)
    ip("link", "del", bridge, check=False)
