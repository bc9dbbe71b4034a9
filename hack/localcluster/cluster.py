"""Start and stop a local Kubernetes control plane on loopback.

etcd, kube-apiserver (TLS, RBAC and Node authorization), kube-controller-manager and
kube-scheduler run as child processes of one ``kcluster`` binary built by
``hack/cluster/build.sh``. All state (PKI, etcd data, logs, kubeconfigs, pids) lives in
one folder, so another process (``make cluster-down``) can stop what ``make cluster``
started.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import pki

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BINARY = REPO_ROOT / ".cache" / "cluster" / "current" / "kcluster"
# In the range RFC 2544 sets aside for benchmarking networks (never anyone's real address), like
# every address the suite owns. The "kubernetes" Service's IP (the first) is the one address a
# test node routes to: its relay forwards it to the API server (see node.py); other ClusterIPs
# are only allocated.
SERVICE_CIDR = "198.18.30.0/24"
SERVICE_IP = "198.18.30.1"
COMPONENTS = ("etcd", "apiserver", "controller-manager", "scheduler")


class ClusterError(RuntimeError):
    """The local control plane could not be started or reached."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ClusterState:
    """What a started cluster needs to be found and stopped again; saved as state.json."""

    etcd_port: int
    etcd_peer_port: int
    apiserver_port: int
    controller_manager_port: int
    scheduler_port: int
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"


def kubeconfig(server: str, ca_pem: bytes, client: pki.KeyPair, user: str) -> dict[str, Any]:
    """A kubeconfig document with the certificates embedded."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(client.cert_pem),
                    "client-key-data": b64(client.key_pem),
                },
            }
        ],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }


class LocalCluster:
    """A control plane whose files live in ``state_dir``."""

    def __init__(self, state_dir: Path, binary: Path = DEFAULT_BINARY) -> None:
        self.dir = state_dir.resolve()
        self.binary = binary
        self.pki_dir = self.dir / "pki"
        self.log_dir = self.dir / "logs"
        self.state_file = self.dir / "state.json"

    # -- paths -------------------------------------------------------------------------
    @property
    def admin_kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    def _pki(self, name: str) -> Path:
        return self.pki_dir / name

    def load_state(self) -> ClusterState | None:
        if not self.state_file.exists():
            return None
        return ClusterState(**json.loads(self.state_file.read_text()))

    def _save_state(self, state: ClusterState) -> None:
        self.state_file.write_text(json.dumps(asdict(state), indent=2))

    # -- PKI and kubeconfigs ----------------------------------------------------------
    def _write(self, path: Path, data: bytes, private: bool = False) -> None:
        path.write_bytes(data)
        if private:
            path.chmod(0o600)

    def _make_pki(self) -> None:
        self.pki_dir.mkdir(parents=True, exist_ok=True)
        ca = pki.make_ca()
        self._write(self._pki("ca.crt"), ca.cert_pem)
        self._write(self._pki("ca.key"), ca.key_pem, private=True)
        serving = pki.issue(
            ca,
            "kube-apiserver",
            dns_names=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            ip_addresses=("127.0.0.1", SERVICE_IP),
            server=True,
        )
        self._write(self._pki("apiserver.crt"), serving.cert_pem)
        self._write(self._pki("apiserver.key"), serving.key_pem, private=True)
        sa_private, sa_public = pki.make_service_account_keys()
        self._write(self._pki("sa.key"), sa_private, private=True)
        self._write(self._pki("sa.pub"), sa_public)

    def _ca(self) -> pki.KeyPair:
        return pki.KeyPair(self._pki("ca.crt").read_bytes(), self._pki("ca.key").read_bytes())

    def write_kubeconfig(
        self, path: Path, user: str, organizations: tuple[str, ...] = (), server: str | None = None
    ) -> Path:
        """Write a kubeconfig for a client-certificate user (e.g. ``system:node:n1``); ``server``
        replaces the API server's loopback address (a test node reaches it another way)."""
        state = self.load_state()
        if state is None:
            raise ClusterError(f"No cluster state in {self.dir}; start the cluster first.")
        ca = self._ca()
        client = pki.issue(ca, user, organizations=organizations, client=True)
        doc = kubeconfig(server or state.server, ca.cert_pem, client, user)
        path.write_text(json.dumps(doc, indent=2))
        path.chmod(0o600)
        return path

    # -- processes --------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [str(self.binary), name, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group, so a stop takes all its children too
        )
        log.close()
        return proc.pid

    def _args(self, state: ClusterState) -> dict[str, list[str]]:
        p = self._pki
        common_kubeconfig = {
            "controller-manager": self.dir / "controller-manager.kubeconfig",
            "scheduler": self.dir / "scheduler.kubeconfig",
        }
        return {
            "etcd": [
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-url=http://127.0.0.1:{state.etcd_port}",
                f"--listen-peer-url=http://127.0.0.1:{state.etcd_peer_port}",
            ],
            "apiserver": [
                f"--etcd-servers=http://127.0.0.1:{state.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={state.apiserver_port}",
                f"--cert-dir={self.dir / 'apiserver-certs'}",
                f"--tls-cert-file={p('apiserver.crt')}",
                f"--tls-private-key-file={p('apiserver.key')}",
                f"--client-ca-file={p('ca.crt')}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={p('sa.pub')}",
                f"--service-account-signing-key-file={p('sa.key')}",
                # The endpoints of the "kubernetes" Service may not be a loopback address.
                "--endpoint-reconciler-type=none",
                # A node's own address, never its name: nothing here resolves names, and a
                # lookup would leave the machine.
                "--kubelet-preferred-address-types=InternalIP",
                "--profiling=false",
            ],
            "controller-manager": [
                f"--kubeconfig={common_kubeconfig['controller-manager']}",
                f"--authentication-kubeconfig={common_kubeconfig['controller-manager']}",
                f"--authorization-kubeconfig={common_kubeconfig['controller-manager']}",
                "--bind-address=127.0.0.1",
                f"--secure-port={state.controller_manager_port}",
                f"--cert-dir={self.dir / 'controller-manager-certs'}",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={p('sa.key')}",
                f"--root-ca-file={p('ca.crt')}",
                f"--cluster-signing-cert-file={p('ca.crt')}",
                f"--cluster-signing-key-file={p('ca.key')}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--leader-elect=false",
                # Fast enough to notice a vanished node within seconds in tests.
                "--node-monitor-grace-period=20s",
                "--profiling=false",
            ],
            "scheduler": [
                f"--kubeconfig={common_kubeconfig['scheduler']}",
                f"--authentication-kubeconfig={common_kubeconfig['scheduler']}",
                f"--authorization-kubeconfig={common_kubeconfig['scheduler']}",
                "--bind-address=127.0.0.1",
                f"--secure-port={state.scheduler_port}",
                f"--cert-dir={self.dir / 'scheduler-certs'}",
                "--leader-elect=false",
                "--profiling=false",
            ],
        }

    def start(self, timeout: float = 90.0) -> ClusterState:
        """Start every component and wait until the cluster serves and has its controllers."""
        if not self.binary.exists():
            raise ClusterError(
                f"{self.binary} does not exist; build it with `make cluster-bin` (hack/cluster/build.sh)."
            )
        if self.running():
            raise ClusterError(f"A cluster is already running from {self.dir}; stop it first.")
        # Every start is a new cluster: new keys, empty etcd.
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self._make_pki()
        state = ClusterState(
            etcd_port=free_port(),
            etcd_peer_port=free_port(),
            apiserver_port=free_port(),
            controller_manager_port=free_port(),
            scheduler_port=free_port(),
        )
        self._save_state(state)
        self.write_kubeconfig(self.admin_kubeconfig, "kubernetes-admin", ("system:masters",))
        self.write_kubeconfig(self.dir / "controller-manager.kubeconfig", "system:kube-controller-manager")
        self.write_kubeconfig(self.dir / "scheduler.kubeconfig", "system:kube-scheduler")
        deadline = time.monotonic() + timeout
        try:
            self._launch(state, COMPONENTS, deadline)
            self._wait_default_service_account(state, deadline)
        except BaseException:
            self.stop()
            raise
        return state

    def restart(self, components: tuple[str, ...] = ("etcd", "apiserver"), timeout: float = 60.0) -> None:
        """Kill ``components`` (SIGKILL, as a crash) and start them again on the same data and
        ports; wait until the API server serves again. The other components stay up."""
        state = self.load_state()
        if state is None:
            raise ClusterError(f"No cluster runs from {self.dir}.")
        for name in components:
            pid = state.pids.get(name)
            if pid is not None:
                _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
            _alive(state.pids[n]) for n in components if n in state.pids
        ):
            time.sleep(0.05)
        for name in components:  # gone: start-up checks must not look for them
            state.pids.pop(name, None)
        self._launch(state, tuple(n for n in COMPONENTS if n in components), deadline)

    def _launch(self, state: ClusterState, names: tuple[str, ...], deadline: float) -> None:
        """Start ``names`` in order, each once the one before serves."""
        args = self._args(state)
        for name in names:
            state.pids[name] = self._spawn(name, args[name])
            self._save_state(state)
            if name == "etcd":
                self._wait_port(state, state.etcd_port, deadline, name)
            elif name == "apiserver":
                self._wait_ready(state, deadline)

    def running(self) -> bool:
        state = self.load_state()
        return bool(state and any(_alive(pid) for pid in state.pids.values()))

    def stop(self, grace: float = 10.0) -> None:
        """Stop every component (process groups, newest first) and wait until they are gone."""
        state = self.load_state()
        if state is None:
            return
        for name in reversed(COMPONENTS):
            pid = state.pids.get(name)
            if pid is not None:
                _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in state.pids.values()):
            time.sleep(0.1)
        for pid in state.pids.values():
            if _alive(pid):
                _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in state.pids.values()):
            time.sleep(0.05)
        state.pids = {}
        self._save_state(state)

    # -- readiness ----------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self._pki("ca.crt")))
        admin = self.dir / "pki" / "admin"
        admin.mkdir(exist_ok=True)
        if not (admin / "tls.crt").exists():
            client = pki.issue(self._ca(), "kubernetes-admin", organizations=("system:masters",), client=True)
            self._write(admin / "tls.crt", client.cert_pem)
            self._write(admin / "tls.key", client.key_pem, private=True)
        ctx.load_cert_chain(str(admin / "tls.crt"), str(admin / "tls.key"))
        return ctx

    def get(self, path: str, state: ClusterState | None = None) -> tuple[int, bytes]:
        """GET a path from the API server as the admin; returns (status, body)."""
        state = state or self.load_state()
        if state is None:
            raise ClusterError("The cluster is not started.")
        req = urllib.request.Request(state.server + path)
        try:
            with urllib.request.urlopen(req, context=self._ssl_context(), timeout=5) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as err:
            return int(err.code), bytes(err.read())

    def _check_alive(self, state: ClusterState) -> None:
        for name, pid in state.pids.items():
            if not _alive(pid):
                log = self.log_dir / f"{name}.log"
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise ClusterError(f"{name} exited during start-up; the end of {log}:\n{tail}")

    def _wait_port(self, state: ClusterState, port: int, deadline: float, name: str) -> None:
        while time.monotonic() < deadline:
            self._check_alive(state)
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise ClusterError(f"{name} did not listen on 127.0.0.1:{port} in time.")

    def _wait_ready(self, state: ClusterState, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            self._check_alive(state)
            try:
                status, body = self.get("/readyz", state)
                if status == 200:
                    return
                last = body.decode(errors="replace")[-500:]
            except (OSError, urllib.error.URLError) as err:
                last = str(err)
            time.sleep(0.2)
        raise ClusterError(f"kube-apiserver was not ready in time: {last}")

    def _wait_default_service_account(self, state: ClusterState, deadline: float) -> None:
        # The ServiceAccount controller creating "default" shows the controllers are working.
        while time.monotonic() < deadline:
            self._check_alive(state)
            status, _ = self.get("/api/v1/namespaces/default/serviceaccounts/default", state)
            if status == 200:
                return
            time.sleep(0.2)
        raise ClusterError("kube-controller-manager did not create the default ServiceAccount in time.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone once reaped; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return _is_not_zombie(pid)


def _is_not_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
