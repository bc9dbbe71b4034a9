"""A real Kubernetes node for tests: the upstream kubelet with Debian's containerd and runc.

The node lives in a network namespace of its own (``rko-node<N>``), joined to the machine by
one veth pair, with addresses in the range RFC 2544 sets aside for benchmarking networks (never
anyone's real address), so every packet stays between the machine and the suite's namespaces:

- 198.18.<20+N>.1  the machine's end (where the operator listens for launchers);
- 198.18.<20+N>.2  the node's address (its InternalIP; the kubelet serves on it);
- 198.18.<40+N>.0/24  its pods, on a CNI bridge inside the node (Debian's CNI plugins);
- the "kubernetes" Service's IP (cluster.SERVICE_IP), on the machine's end, where a relay
  forwards port 443 to the API server on loopback: there is no kube-proxy.

containerd and the kubelet run in the node's own PID and mount namespaces under ``nodeinit``,
with every file under the node's folder: the fixed host paths they use are bind mounts there,
and the kernel settings the kubelet wants are files, so nothing on the machine changes. Images
come from the suite's Docker engine (``docker save`` into containerd's k8s.io namespace); a
pull of anything else can only go to a registry on the node's loopback, which answers nothing.

Needs root, iproute2, nsenter/unshare, containerd, runc and containernetworking-plugins, and
the kubelet that ``hack/node/build.sh`` builds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import pki
from .cluster import REPO_ROOT, SERVICE_IP, LocalCluster
from .hosts import ip

BUILD_SCRIPT = REPO_ROOT / "hack" / "node" / "build.sh"
BIN_DIR = REPO_ROOT / ".cache" / "node" / "current"
CNI_BIN_DIR = Path("/usr/lib/cni")
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
SUITE_RANGE = "198.18.0.0/16"  # every address the suite gives out (RFC 2544's benchmarking range)
# What the kubelet writes to /proc/sys unless it finds these values (pkg/kubelet/cm's
# setupKernelTunables); each is a file bind-mounted over the machine's own inside the node.
KUBELET_SYSCTLS = {
    "vm.overcommit_memory": "1",
    "vm.panic_on_oom": "0",
    "kernel.panic": "10",
    "kernel.panic_on_oops": "1",
    "kernel.keys.root_maxkeys": "1000000",
    "kernel.keys.root_maxbytes": "25000000",
}
# Host paths fixed in containerd's and the kubelet's code, each bound to a folder of the node.
FIXED_PATHS = {
    "kubelet": "/var/lib/kubelet",
    "containerd-run": "/run/containerd",
    "cni-state": "/var/lib/cni",
    "netns": "/run/netns",
    "pod-logs": "/var/log/pods",
}
# Shared by every node on the machine (nodes may overlap: the lost-node test starts a second).
MOUNT_POINTS_MADE = Path("/run/rko-node-mount-points")
CGROUP_PARENT = "k8s.io"  # containerd's folder in every cgroup hierarchy (left empty; removed)


class NodeError(RuntimeError):
    """The test node could not be built, started or stopped cleanly."""


@dataclass(frozen=True)
class NodeAddresses:
    gateway: str
    node_ip: str
    pod_subnet: str
    pod_gateway: str

    @classmethod
    def for_index(cls, index: int) -> NodeAddresses:
        return cls(
            gateway=f"198.18.{20 + index}.1",
            node_ip=f"198.18.{20 + index}.2",
            pod_subnet=f"198.18.{40 + index}.0/24",
            pod_gateway=f"198.18.{40 + index}.1",
        )


# -- pure builders -----------------------------------------------------------------------------
def kubelet_config(root: Path, addresses: NodeAddresses, socket: Path) -> dict[str, Any]:
    """The KubeletConfiguration of a test node: no host-wide changes, no eviction, no GC."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": addresses.node_ip,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 0,
        # The API server has no kubelet client certificate here: logs and exec are allowed to it.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "tlsCertFile": str(root / "pki" / "kubelet.crt"),
        "tlsPrivateKeyFile": str(root / "pki" / "kubelet.key"),
        "containerRuntimeEndpoint": f"unix://{socket}",
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "failSwapOn": False,
        "failCgroupV1": False,
        "protectKernelDefaults": False,
        "makeIPTablesUtilChains": False,
        "evictionHard": {},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "podLogsDir": FIXED_PATHS["pod-logs"],
        "volumePluginDir": str(root / "volume-plugins"),
        "resolvConf": str(root / "resolv.conf"),
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "10s",
        "localStorageCapacityIsolation": False,
    }


def containerd_config(root: Path, socket: Path, cni_conf_dir: Path, registry_dir: Path) -> str:
    """containerd's config.toml (version 2): its own root, state and socket, runc under the
    node's folder, cgroupfs, the locally imported pause image, streams on loopback."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return "\n".join(
        [
            "version = 2",
            f'root = "{root / "containerd" / "root"}"',
            f'state = "{root / "containerd" / "state"}"',
            "disabled_plugins = [",
            '  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",',
            '  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",',
            '  "io.containerd.tracing.processor.v1.otlp",',
            "]",
            "[grpc]",
            f'  address = "{socket}"',
            "[ttrpc]",
            f'  address = "{socket}.ttrpc"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{root / "containerd" / "opt"}"',
            f"[{cri}]",
            f'  sandbox_image = "{PAUSE_IMAGE}"',
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "  enable_selinux = false",
            "  disable_apparmor = true",
            # Without CAP_SYS_RESOURCE (this machine's sandbox drops it) runc cannot lower a
            # process's oom_score_adj, which the kubelet asks for pods (-998 for the sandbox).
            "  restrict_oom_score_adj = true",
            f"[{cri}.containerd]",
            '  snapshotter = "overlayfs"',
            '  default_runtime_name = "runc"',
            f"[{cri}.containerd.runtimes.runc]",
            '  runtime_type = "io.containerd.runc.v2"',
            f"[{cri}.containerd.runtimes.runc.options]",
            "  SystemdCgroup = false",
            f'  Root = "{root / "runc"}"',
            f"[{cri}.cni]",
            f'  bin_dir = "{CNI_BIN_DIR}"',
            f'  conf_dir = "{cni_conf_dir}"',
            f"[{cri}.registry]",
            f'  config_path = "{registry_dir}"',
            "",
        ]
    )


def cni_conflist(addresses: NodeAddresses) -> dict[str, Any]:
    """Pods on a bridge inside the node, the node as their gateway; no iptables (no masquerade:
    the machine routes to the pods' subnet through the node)."""
    return {
        "cniVersion": "1.0.0",
        "name": "rko-pods",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": addresses.pod_subnet, "gateway": addresses.pod_gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "loopback"},
        ],
    }


def registry_hosts(port: int) -> str:
    """hosts.toml for every registry the node might pull from: only the node's own loopback,
    where nothing listens, so a pull fails at once and no packet leaves the node."""
    return "\n".join(
        [
            f'server = "http://127.0.0.1:{port}"',
            f'[host."http://127.0.0.1:{port}"]',
            '  capabilities = ["pull", "resolve"]',
            "",
        ]
    )


# -- the node ----------------------------------------------------------------------------------
def build_kubelet() -> Path:
    """The kubelet and pause binaries' folder (built once, cached under .cache/node)."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], check=False)
    if result.returncode != 0:
        raise NodeError(f"{BUILD_SCRIPT} failed with code {result.returncode}")
    return BIN_DIR.resolve()


def _run(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        raise NodeError(f"`{' '.join(args)}` failed: {(result.stderr or result.stdout).strip()[-2000:]}")
    return result


@dataclass
class KubeletNode:
    """One node: its network namespace, containerd, the kubelet, and the images it holds."""

    root: Path
    cluster: LocalCluster
    name: str = "node-1"
    index: int = 0
    proc: subprocess.Popen[bytes] | None = None
    relay: subprocess.Popen[bytes] | None = None

    @property
    def addresses(self) -> NodeAddresses:
        return NodeAddresses.for_index(self.index)

    @property
    def netns(self) -> str:
        return f"rko-node{self.index}"

    @property
    def veth(self) -> str:
        return f"rko-nd{self.index}"

    @property
    def socket(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    # -- network -------------------------------------------------------------------------------
    def plumb(self) -> None:
        """The node's namespace, its veth pair and routes; the operator may bind the gateway
        as soon as this returns (before the kubelet runs)."""
        self.cleanup_stale()
        a = self.addresses
        ip("netns", "add", self.netns)
        ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        ip("addr", "add", f"{a.gateway}/24", "dev", self.veth)
        ip("addr", "add", f"{SERVICE_IP}/32", "dev", self.veth)
        ip("link", "set", self.veth, "up")
        ip("addr", "add", f"{a.node_ip}/24", "dev", "eth0", netns=self.netns)
        ip("link", "set", "eth0", "up", netns=self.netns)
        ip("link", "set", "lo", "up", netns=self.netns)
        # Only the suite's own range goes to the machine (the operator, the API server's relay,
        # other nodes): nothing from a pod can reach any other address.
        ip("route", "add", SUITE_RANGE, "via", a.gateway, netns=self.netns)
        ip("route", "add", a.pod_subnet, "via", a.node_ip, "dev", self.veth)
        # On the machine, the suite's range ends here: an address of a node that is gone (a
        # lost-node test's) fails at once instead of following the default route off the machine.
        ip("route", "replace", "unreachable", SUITE_RANGE)

    def cleanup_stale(self) -> None:
        """Remove what an interrupted run of this node left: its processes and namespace."""
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
        if any(line.split()[:1] == [self.netns] for line in listing.stdout.splitlines()):
            pids = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", self.netns, check=False)
        ip("link", "del", self.veth, check=False)
        _remove_cgroups()

    # -- start ---------------------------------------------------------------------------------
    def start(self, docker_env: dict[str, str], timeout: float = 60.0) -> None:
        """Start containerd and the kubelet in the (plumbed) namespace; wait for Ready.
        ``docker_env`` reaches the suite's Docker engine, which builds the pause image."""
        bin_dir = build_kubelet()
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        config = self._write_files(bin_dir)
        for target in (*FIXED_PATHS.values(), *(_sysctl_path(n) for n in KUBELET_SYSCTLS)):
            if not Path(target).exists():
                if target.startswith("/proc/"):
                    raise NodeError(f"{target} does not exist on this machine's kernel.")
                Path(target).mkdir(parents=True)
                _record_mount_point(target)
        self._start_relay()
        log = open(self.log_dir / "init.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{self.netns}",
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                "--mount",
                "--propagation",
                "private",
                sys.executable,
                str(Path(__file__).with_name("nodeinit.py")),
                str(config),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        try:
            self._wait_ready(timeout)
            self.import_images(PAUSE_IMAGE, docker_env=docker_env)
        except BaseException:
            self.stop()
            raise

    def _write_files(self, bin_dir: Path) -> Path:
        root = self.root
        a = self.addresses
        for folder in (*FIXED_PATHS, "pki", "cni", "certs.d/_default", "volume-plugins", "sysctl"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        ca = pki.KeyPair(
            (self.cluster.pki_dir / "ca.crt").read_bytes(), (self.cluster.pki_dir / "ca.key").read_bytes()
        )
        serving = pki.issue(ca, self.name, dns_names=(self.name,), ip_addresses=(a.node_ip,), server=True)
        (root / "pki" / "kubelet.crt").write_bytes(serving.cert_pem)
        (root / "pki" / "kubelet.key").write_bytes(serving.key_pem)
        (root / "pki" / "kubelet.key").chmod(0o600)
        kubeconfig = self.cluster.write_kubeconfig(
            root / "kubelet.kubeconfig",
            f"system:node:{self.name}",
            ("system:nodes",),
            server=f"https://{SERVICE_IP}:443",
        )
        (root / "kubelet.yaml").write_text(json.dumps(kubelet_config(root, a, self.socket), indent=2))
        (root / "containerd.toml").write_text(
            containerd_config(root, self.socket, root / "cni", root / "certs.d")
        )
        (root / "cni" / "10-rko-pods.conflist").write_text(json.dumps(cni_conflist(a), indent=2))
        # containerd 1.6 reads a folder per registry host; docker.io and registry.k8s.io cover
        # every image name the suite uses (an unqualified name is docker.io's).
        for registry in ("_default", "docker.io", "registry.k8s.io"):
            (root / "certs.d" / registry).mkdir(parents=True, exist_ok=True)
            (root / "certs.d" / registry / "hosts.toml").write_text(registry_hosts(1))
        (root / "resolv.conf").write_text("")  # no DNS: nothing in the suite resolves names
        sysctls: dict[str, str] = {}
        for name, value in KUBELET_SYSCTLS.items():
            path = root / "sysctl" / name
            path.write_text(value + "\n")
            sysctls[name] = str(path)
        config = {
            "binds": {str(root / key): target for key, target in FIXED_PATHS.items()},
            "sysctls": sysctls,
            "log_dir": str(self.log_dir),
            "containerd_socket": str(self.socket),
            "containerd_command": ["containerd", "--config", str(root / "containerd.toml")],
            "kubelet_command": [
                str(bin_dir / "kubelet"),
                f"--config={root / 'kubelet.yaml'}",
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={self.name}",
                f"--node-ip={a.node_ip}",
                f"--root-dir={FIXED_PATHS['kubelet']}",
                "--v=1",
            ],
            "kubelet_env": {"RKO_CONTAINER_LOGS_DIR": str(root / "container-logs")},
        }
        (root / "container-logs").mkdir(exist_ok=True)
        path = root / "init.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def _start_relay(self) -> None:
        state = self.cluster.load_state()
        if state is None:
            raise NodeError("The control plane is not running; start it before the node.")
        with socket.socket() as probe:
            probe.settimeout(1)
            if probe.connect_ex((SERVICE_IP, 443)) == 0:
                return  # another node of this cluster relays it already
        log = open(self.log_dir / "relay.log", "ab")  # noqa: SIM115 - handed to the child
        self.relay = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "localcluster.relay",
                f"{SERVICE_IP}:443",
                f"127.0.0.1:{state.apiserver_port}",
            ],
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "hack")},
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise NodeError(f"The node's init exited; see {self.log_dir}/init.log and kubelet.log.")
            status, body = self.cluster.get(f"/api/v1/nodes/{self.name}")
            if status == 200:
                conditions = json.loads(body).get("status", {}).get("conditions") or []
                ready = [c for c in conditions if c.get("type") == "Ready"]
                if ready and ready[0].get("status") == "True":
                    return
                last = json.dumps(ready)
            time.sleep(0.2)
        raise NodeError(
            f"The node {self.name} was not Ready within {timeout} s ({last}); see {self.log_dir}."
        )

    # -- images --------------------------------------------------------------------------------
    def import_images(self, *refs: str, docker_env: dict[str, str] | None = None) -> None:
        """Copy images from the suite's Docker engine into containerd's k8s.io namespace. The
        pause image is built here first from the kubelet build's static pause binary."""
        if PAUSE_IMAGE in refs:
            self._build_pause_image(docker_env)
        save = subprocess.Popen(
            ["docker", "save", *refs], stdout=subprocess.PIPE, env=docker_env or os.environ.copy()
        )
        try:
            _run(
                "ctr",
                "--address",
                str(self.socket),
                "-n",
                "k8s.io",
                "images",
                "import",
                "-",
                stdin=save.stdout,
            )
        finally:
            assert save.stdout is not None
            save.stdout.close()
            if save.wait() != 0:
                raise NodeError(f"`docker save {' '.join(refs)}` failed with code {save.returncode}.")

    def containers(self) -> int:
        """How many containers containerd holds for the kubelet, pod sandboxes included."""
        listed = _run("ctr", "--address", str(self.socket), "-n", "k8s.io", "containers", "list", "-q")
        return len(listed.stdout.split())

    def wait_empty(self, timeout: float = 120.0) -> float:
        """Wait until the kubelet has removed every container of the pods deleted from it (its
        container GC runs once a minute, after the pods are gone from the API); seconds waited."""
        start = time.monotonic()
        while self.containers() and time.monotonic() - start < timeout:
            time.sleep(1.0)
        return time.monotonic() - start

    def _build_pause_image(self, docker_env: dict[str, str] | None) -> None:
        context = self.root / "pause-image"
        context.mkdir(exist_ok=True)
        (context / "pause").write_bytes((BIN_DIR / "pause").read_bytes())
        (context / "pause").chmod(0o755)
        (context / "Dockerfile").write_text(
            'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n'
        )
        _run("docker", "build", "-q", "--network", "none", "-t", PAUSE_IMAGE, str(context), env=docker_env)

    # -- faults --------------------------------------------------------------------------------
    @property
    def init_pid(self) -> int:
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        if not children:
            raise NodeError("the node has no init process")
        return int(children[0])

    def set_kubelet(self, running: bool) -> None:
        """Stop the kubelet (the node is lost: its containers go on) or start it again."""
        os.kill(self.init_pid, signal.SIGUSR2 if running else signal.SIGUSR1)

    def lose(self) -> None:
        """The node lost at once, as to a power cut: its PID namespace's init is SIGKILLed, so
        the kernel kills every process of the node (kubelet, containerd, every container: none
        gets a signal it can handle), then its network goes."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(NodeError, ProcessLookupError, OSError):
                os.kill(self.init_pid, signal.SIGKILL)
        # The images stay until the node is stopped for good: removing gigabytes of files here
        # would load the disk (and etcd's writes) just when the test times the failover.
        self.stop(grace=5.0, discard_images=False)

    # -- stop ----------------------------------------------------------------------------------
    def stop(self, grace: float = 15.0, discard_images: bool = True) -> None:
        """Stop everything of the node and remove it: processes, mounts, namespace, cgroups and
        (unless told not to) containerd's store."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(NodeError, ProcessLookupError, OSError):
                os.kill(self.init_pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.relay is not None and self.relay.poll() is None:
            self.relay.terminate()
            self.relay.wait(10)
        self._remove()
        if discard_images:
            self._discard_images()

    def _discard_images(self) -> None:
        # containerd's store holds the node's copies of the images (gigabytes); a node imports
        # them again when it starts, so nothing of use is lost. Its logs stay.
        shutil.rmtree(self.root / "containerd", ignore_errors=True)

    def _remove(self) -> None:
        ip("netns", "del", self.netns, check=False)
        ip("link", "del", self.veth, check=False)
        _remove_cgroups()
        # A mount point is shared by every node on the machine: removing it under a running
        # node would detach that node's bind mount, and its kubelet would then write to the
        # machine's own /var/lib/kubelet. The last node out removes them.
        if not _other_nodes(self.netns):
            _remove_mount_points()
            ip("route", "del", "unreachable", SUITE_RANGE, check=False)

    # -- a node that outlives the command that started it (``make node``) ---------------------
    def save_state(self) -> None:
        assert self.proc is not None
        state = {
            "name": self.name,
            "index": self.index,
            "unshare_pid": self.proc.pid,
            "relay_pid": self.relay.pid if self.relay is not None else None,
        }
        (self.root / "state.json").write_text(json.dumps(state, indent=2))

    @classmethod
    def stop_saved(cls, root: Path, cluster: LocalCluster, grace: float = 15.0) -> bool:
        """Stop a node another process started and saved; False if there was none."""
        path = root / "state.json"
        if not path.exists():
            return False
        state = json.loads(path.read_text())
        node = cls(root, cluster, name=state["name"], index=state["index"])
        unshare = int(state["unshare_pid"])
        children = Path(f"/proc/{unshare}/task/{unshare}/children")
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):
            os.kill(int(children.read_text().split()[0]), signal.SIGTERM)
        deadline = time.monotonic() + grace
        while Path(f"/proc/{unshare}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in (unshare, state.get("relay_pid")):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGTERM)
        node._remove()
        node._discard_images()
        path.unlink()
        return True


def _record_mount_point(target: str) -> None:
    """Note an (empty) mount point a node made on the machine, for the last node to remove."""
    made = set(MOUNT_POINTS_MADE.read_text().split()) if MOUNT_POINTS_MADE.exists() else set()
    MOUNT_POINTS_MADE.write_text("\n".join(sorted(made | {target})) + "\n")


def _remove_mount_points() -> None:
    if not MOUNT_POINTS_MADE.exists():
        return
    for target in sorted(MOUNT_POINTS_MADE.read_text().split(), key=len, reverse=True):
        with contextlib.suppress(OSError):
            Path(target).rmdir()  # empty on the machine: the nodes' files were in their folders
    MOUNT_POINTS_MADE.unlink()


def _other_nodes(own: str) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    names = [line.split()[0] for line in listing.splitlines() if line.split()]
    return [n for n in names if n.startswith("rko-node") and n != own]


def _sysctl_path(name: str) -> str:
    return "/proc/sys/" + name.replace(".", "/")


def _remove_cgroups(timeout: float = 10.0) -> None:
    """containerd's cgroup folders, deepest first, once the processes in them are gone (a
    killed PID namespace takes a moment to empty them)."""
    deadline = time.monotonic() + timeout
    while _remove_cgroups_once() and time.monotonic() < deadline:
        time.sleep(0.1)


def _remove_cgroups_once() -> bool:
    """Remove what can be removed; True while some folder remains."""
    hierarchies = [h for h in Path("/sys/fs/cgroup").iterdir() if (h / CGROUP_PARENT).is_dir()]
    for hierarchy in hierarchies:
        top = hierarchy / CGROUP_PARENT
        if not top.is_dir():
            continue
        for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
    return any((h / CGROUP_PARENT).is_dir() for h in hierarchies)
