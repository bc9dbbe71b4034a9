"""Local servers for tests and the demo: Debian's sshd on loopback, and the operator itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cluster import REPO_ROOT, free_port

SSHD = "/usr/sbin/sshd"


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def sshd_config(port: int, listen: tuple[str, ...], key_dir: Path, host_key: str = "host_ed25519") -> str:
    """An sshd_config for test servers: keys only (no passwords, no PAM), root by key only."""
    return "\n".join(
        [
            f"Port {port}",
            *(f"ListenAddress {address}" for address in listen),
            f"HostKey {key_dir / host_key}",
            f"AuthorizedKeysFile {key_dir / 'authorized_keys'}",
            f"PidFile {key_dir / 'sshd.pid'}",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "StrictModes no",
            "UsePAM no",
            "LogLevel ERROR",
            "",
        ]
    )


@dataclass
class Sshd:
    """One OpenSSH server on 127.0.0.1 with its own host key, accepting one client key."""

    root: Path
    host: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_key(self) -> Path:
        return self.root / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        host_key = self.root / "host_ed25519"
        for key in (host_key, self.client_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (self.root / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        host_pub = host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        config = self.root / "sshd_config"
        # A second address with the same host key, absent from known_hosts: the tests'
        # "unknown host" is a real sshd whose key nobody vouched for.
        config.write_text(sshd_config(self.port, (self.host, "127.0.0.2"), self.root, host_key.name))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        log = open(self.root / "sshd.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
        log.close()
        wait_port(self.host, self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class OperatorProcess:
    """``python -m kernel_operator`` as a child process, restartable, logging to a file."""

    kubeconfig: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0, wait_ready: bool = True) -> None:
        """Start the operator; unless ``wait_ready`` is False, wait until its startup handler
        succeeded and its response listener accepts connections."""
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PYTHONPATH": str(REPO_ROOT / "hack"),
            **self.env,
        }
        offset = len(self.log())
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernel_operator"],
            env=env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        if not wait_ready:
            return
        host, _, port = self.env["RKO_RESPONSE_BIND"].rpartition(":")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.proc.returncode}; see {self.log_path}")
            if "Activity 'start' succeeded" in self.log()[offset:]:
                wait_port(host, int(port))
                return
            time.sleep(0.1)
        raise TimeoutError(f"the operator did not start in {timeout} s; see {self.log_path}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def localhost_operator(kubeconfig: Path, log_path: Path, **env: str) -> OperatorProcess:
    """An operator (not started) whose ssh backend launches on this machine, reporting on loopback:
    the benches' set-up. ``env`` adds or overrides settings (e.g. ``RKO_NAMESPACE``)."""
    return OperatorProcess(
        kubeconfig=kubeconfig,
        log_path=log_path,
        env={
            "RKO_RESPONSE_BIND": f"127.0.0.1:{free_port()}",
            "RKO_SSH_LOCAL_HOSTS": "localhost",
            "RKO_SSH_HOSTS": "localhost",
            **env,
        },
    )
