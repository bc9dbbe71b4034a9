"""A private Docker engine (Debian's docker.io) for tests, the demo and image builds.

Its images live in .cache/docker (kept between runs, so the kernel image is built once); it
creates no bridge and no iptables rules, because every container here uses host networking
and nothing may be sent to bridge addresses.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .cluster import REPO_ROOT

DATA_ROOT = REPO_ROOT / ".cache" / "docker"


class DockerError(RuntimeError):
    """The Docker engine could not be started or used."""


@dataclass
class DockerEngine:
    data_root: Path = DATA_ROOT
    tls_port: int | None = None  # also listen on tcp://127.0.0.1:<port> with mutual TLS

    @property
    def client_tls_dir(self) -> Path:
        """ca.pem, cert.pem and key.pem for a client of the TLS listener."""
        return self.run_dir / "tls-client"

    def _tls_args(self) -> list[str]:
        if self.tls_port is None:
            return []
        from . import pki

        server_dir = self.run_dir / "tls-server"
        server_dir.mkdir(parents=True, exist_ok=True)
        self.client_tls_dir.mkdir(parents=True, exist_ok=True)
        ca = pki.make_ca("rko-docker-ca")
        server = pki.issue(ca, "dockerd", ip_addresses=("127.0.0.1",), dns_names=("localhost",), server=True)
        client = pki.issue(ca, "remote-kernel-operator", client=True)
        for folder, pair in ((server_dir, server), (self.client_tls_dir, client)):
            (folder / "ca.pem").write_bytes(ca.cert_pem)
            (folder / "cert.pem").write_bytes(pair.cert_pem)
            (folder / "key.pem").write_bytes(pair.key_pem)
            (folder / "key.pem").chmod(0o600)
        return [
            f"--host=tcp://127.0.0.1:{self.tls_port}",
            "--tlsverify",
            f"--tlscacert={server_dir / 'ca.pem'}",
            f"--tlscert={server_dir / 'cert.pem'}",
            f"--tlskey={server_dir / 'key.pem'}",
        ]

    @property
    def run_dir(self) -> Path:
        # Short: a unix socket's path must stay under ~100 bytes.
        digest = hashlib.sha256(str(self.data_root.resolve()).encode()).hexdigest()[:8]
        return Path(f"/tmp/rko-docker-{digest}")

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def running(self) -> bool:
        return (
            subprocess.run(["docker", "version"], env=self.env, capture_output=True, check=False).returncode
            == 0
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start dockerd unless one already serves this data root."""
        if shutil.which("dockerd") is None:
            raise DockerError(
                "dockerd is not installed; run hack/install-system-deps.sh (Debian's docker.io)."
            )
        if self.running():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        log = open(self.run_dir / "dockerd.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [
                "dockerd",
                f"--data-root={self.data_root}",
                f"--exec-root={self.run_dir / 'exec'}",
                f"--pidfile={self.run_dir / 'docker.pid'}",
                f"--host={self.host}",
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
                *self._tls_args(),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.run_dir / "dockerd.log").read_text(errors="replace")[-2000:]
                raise DockerError(f"dockerd exited with {proc.returncode}:\n{tail}")
            if self.running():
                return
            time.sleep(0.2)
        raise DockerError(f"dockerd did not answer within {timeout} s; see {self.run_dir / 'dockerd.log'}")

    def stop(self, timeout: float = 30.0) -> None:
        pidfile = self.run_dir / "docker.pid"
        if not pidfile.exists():
            return
        pid = int(pidfile.read_text().strip() or 0)
        if pid <= 0:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            stat = (
                Path(f"/proc/{pid}/stat").read_text(errors="replace")
                if Path(f"/proc/{pid}/stat").exists()
                else ""
            )
            if stat and stat.rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.1)

    def _build_image(self, script: str, *args: str, what: str) -> str:
        """Run one of hack/images' build scripts against this engine; the image reference is
        the last line it prints."""
        path = REPO_ROOT / "hack" / "images" / script
        result = subprocess.run(
            [str(path), *args], env=self.env, stdout=subprocess.PIPE, text=True, check=False
        )
        if result.returncode != 0:
            raise DockerError(f"Building the {what} failed; see the messages above.")
        return result.stdout.strip().splitlines()[-1]

    def build_operator_image(self) -> str:
        """Build (or find) the operator's image from the repository's Dockerfile."""
        return self._build_image("build-operator-image.sh", what="operator image")

    def build_kernel_image(self, language: str = "python") -> str:
        """Build (or find) the kernel image for ``language`` (python, r, scala, or gp-bootstrap: an image
        as gateway_provisioners bootstraps one, plus our wheel); returns its reference."""
        return self._build_image("build-kernel-image.sh", language, what="kernel image")
