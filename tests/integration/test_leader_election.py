"""Several replicas of the operator: one leads (a coordination.k8s.io Lease), the others stand
by, take launch reports, and take over when the leader is lost; and what they export.

Two replicas of one operator class ("ha") run as processes on this machine, sharing their
response port (RKO_RESPONSE_REUSE_PORT: the kernel spreads launchers' connections over the
replicas alive, as a Service spreads them over ready pods). Fencing is shown by cutting a
replica's only path to the API server (a TCP relay on loopback).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from kernel_launchers import protocol
from localcluster import free_port
from localcluster.servers import OperatorProcess, Sshd
from tests.helpers import wait_for

from .conftest import delete_remote_kernels, ensure_namespace
from .test_faults import delete_and_check_nothing_left, runs_code
from .test_operator_ssh import GROUP, PLURAL, VERSION, get, make_kernel, wait_phase

CLASS = "ha"
LABELS = {"kernel-operator.io/operator-class": CLASS}
LEASE_NAMESPACE = "rko-system"
LEASE = f"remote-kernel-operator-leader-{CLASS}"
KERNELS = 20
EXIT_FENCED = 75
pytestmark = pytest.mark.timeout(600)


class TcpRelay:
    """A relay on loopback to the API server that can be cut: every connection through it is
    closed and new ones are refused (a replica partitioned from the control plane)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.cut_off = False
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.cut_off:
                conn.close()
                continue
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                conn.close()
                continue
            with self.lock:
                self.conns += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self.cut_off = True
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self.conns.clear()

    def close(self) -> None:
        self.cut()
        self.sock.close()


def relayed_kubeconfig(admin: Path, relay: TcpRelay, path: Path) -> Path:
    doc = yaml.safe_load(admin.read_text())
    server = doc["clusters"][0]["cluster"]["server"]
    doc["clusters"][0]["cluster"]["server"] = re.sub(r":\d+$", f":{relay.port}", server)
    path.write_text(yaml.safe_dump(doc))
    return path


def upstream_of(admin: Path) -> tuple[str, int]:
    server = yaml.safe_load(admin.read_text())["clusters"][0]["cluster"]["server"]
    host, port = server.split("://", 1)[1].rsplit(":", 1)
    return host.strip("[]"), int(port)


@dataclass
class Replicas:
    base_env: dict[str, str]
    http: dict[str, int]
    response_port: int
    kubeconfig: Path
    tmp: Path
    procs: dict[str, OperatorProcess]

    def env(self, name: str) -> dict[str, str]:
        return {
            **self.base_env,
            "RKO_POD_NAME": f"ha-{name}",
            "RKO_HTTP_BIND": f"127.0.0.1:{self.http[name]}",
        }

    def start(self, name: str, kubeconfig: Path | None = None) -> OperatorProcess:
        proc = self.procs.get(name)
        if proc is None or kubeconfig is not None:
            proc = OperatorProcess(
                kubeconfig=kubeconfig or self.kubeconfig,
                log_path=self.tmp / f"{name}.log",
                env=self.env(name),
            )
            self.procs[name] = proc
        proc.start(wait_ready=False)
        wait_for(lambda: ready(self.http[name]), timeout=30, what=f"replica {name} to serve /readyz")
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop()


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


Sample = tuple[str, dict[str, str], float]


def scrape_samples(port: int) -> list[Sample]:
    """The replica's /metrics: (name, labels, value) for every sample."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        samples.append((name, labels, float(value)))
    return samples


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == w for k, w in labels.items()))


def scrape(port: int) -> dict[str, float]:
    """Unlabelled samples by name (rko_leader, process_*)."""
    return {n: v for n, ls, v in scrape_samples(port) if not ls}


def holder(coordination: client.CoordinationV1Api) -> str:
    try:
        lease = coordination.read_namespaced_lease(LEASE, LEASE_NAMESPACE)
    except ApiException as err:
        if err.status == 404:
            return ""
        raise
    return str(lease.spec.holder_identity or "")


@pytest.fixture
def replicas(
    crd: None,
    api_client: client.ApiClient,
    kubeconfig: Path,
    sshd: Sshd,
    tmp_path: Path,
) -> Iterator[Replicas]:
    ensure_namespace(api_client, LEASE_NAMESPACE)
    coordination = client.CoordinationV1Api(api_client)
    with contextlib.suppress(ApiException):
        coordination.delete_namespaced_lease(LEASE, LEASE_NAMESPACE)
    port = free_port()
    env = {
        "RKO_OPERATOR_CLASS": CLASS,
        "RKO_NAMESPACE": LEASE_NAMESPACE,
        "RKO_LEADER_ELECTION": "true",
        "RKO_RESPONSE_BIND": f"127.0.0.1:{port}",
        "RKO_RESPONSE_REUSE_PORT": "true",
        "RKO_MONITOR_INTERVAL": "0.5",
        "RKO_SSH_KEY_FILE": str(sshd.client_key),
        "RKO_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
        "RKO_SSH_PORT": str(sshd.port),
        "RKO_SSH_LOCAL_HOSTS": "localhost",
        "RKO_SSH_HOSTS": "localhost",
        "RKO_DRAIN_SECONDS": "15",
    }
    group = Replicas(env, {"a": free_port(), "b": free_port()}, port, kubeconfig, tmp_path, {})
    yield group
    with contextlib.suppress(ApiException):
        coordination.delete_namespaced_lease(LEASE, LEASE_NAMESPACE)  # held by a test, maybe
    for name, proc in list(group.procs.items()):
        if proc.proc is None or proc.proc.poll() is not None:
            group.start(name, kubeconfig=kubeconfig)  # every replica runs while kernels are deleted
    delete_remote_kernels(api_client, CLASS)
    group.stop_all()
    with contextlib.suppress(ApiException):
        coordination.delete_namespaced_lease(LEASE, LEASE_NAMESPACE)


def wait_some_launching(custom: client.CustomObjectsApi, namespace: str, names: dict[str, str]) -> None:
    wait_for(
        lambda: any(
            ((get(custom, namespace, n) or {}).get("status") or {}).get("phase") == "Launching" for n in names
        ),
        timeout=60,
        what="launches under way",
    )


def seconds_to_first_status(
    custom: client.CustomObjectsApi, namespace: str, name: str, since: float
) -> float:
    """Seconds from ``since`` (monotonic) to the first status of kernel ``name``, asked for
    after a leader was lost: only a leader's handlers write a new kernel's first status (a
    standby takes reports for Launching kernels only), so that write is a leader acting."""
    wait_for(
        lambda: ((get(custom, namespace, name) or {}).get("status") or {}).get("phase"),
        timeout=60,
        interval=0.05,
        what="a leader's first status write",
    )
    return time.monotonic() - since


def test_a_standby_takes_over_when_the_leader_is_killed_during_concurrent_launches(
    replicas: Replicas, api_client: client.ApiClient, custom: client.CustomObjectsApi, namespace: str
) -> None:
    """The leader SIGKILLed (and not restarted: its node is lost) while KERNELS launch: every
    kernel ends Running and runs code, the standby leads and acts within 15 s, nothing leaks."""
    coordination = client.CoordinationV1Api(api_client)
    a = replicas.start("a")
    wait_for(lambda: holder(coordination) == "ha-a", timeout=30, what="replica a to lead")
    replicas.start("b")
    time.sleep(1.5)
    assert holder(coordination) == "ha-a"
    assert scrape(replicas.http["a"])["rko_leader"] == 1.0
    assert scrape(replicas.http["b"])["rko_leader"] == 0.0
    names = dict(
        make_kernel(namespace, custom, labels=LABELS, launchTimeoutSeconds=90) for _ in range(KERNELS)
    )
    wait_some_launching(custom, namespace, names)
    assert a.proc is not None
    a.proc.kill()
    killed = time.monotonic()
    a.proc.wait()
    probe, _ = make_kernel(namespace, custom, labels=LABELS)
    names[probe] = ""
    acted = seconds_to_first_status(custom, namespace, probe, killed)
    lease_holder = holder(coordination)
    took = []
    for name in names:
        obj = wait_phase(custom, namespace, name, "Running", "Failed", timeout=120)
        assert obj["status"]["phase"] == "Running", obj["status"]
        assert runs_code(api_client, namespace, obj), name
        created = dt.datetime.strptime(obj["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
        ready_at = dt.datetime.strptime(obj["status"]["readyAt"], "%Y-%m-%dT%H:%M:%SZ")
        took.append((ready_at - created).total_seconds())
    took.sort()
    print(
        f"leader killed during {KERNELS} launches: the new leader's first status write {acted:.1f} s after "
        f"the kill; launch (created to Running, whole seconds) p50 {took[len(took) // 2]:.0f} s, "
        f"max {took[-1]:.0f} s"
    )
    assert lease_holder == "ha-b"
    assert acted <= 15, acted
    b_log = replicas.procs["b"].log()
    assert "leads now" in b_log and "taken over from ha-a" in b_log
    samples = scrape(replicas.http["b"])
    assert samples["rko_leader"] == 1.0
    delete_and_check_nothing_left(custom, api_client, namespace, names)


def test_a_stopped_leader_hands_over_at_once_and_drains_its_reports(
    replicas: Replicas, api_client: client.ApiClient, custom: client.CustomObjectsApi, namespace: str
) -> None:
    """SIGTERM (a rolling upgrade's): the leader stops its handlers, releases the Lease (the
    standby leads within a couple of retry periods, not a Lease duration) and keeps taking
    reports while kernels are Launching."""
    coordination = client.CoordinationV1Api(api_client)
    a = replicas.start("a")
    wait_for(lambda: holder(coordination) == "ha-a", timeout=30, what="replica a to lead")
    replicas.start("b")
    names = dict(make_kernel(namespace, custom, labels=LABELS, launchTimeoutSeconds=90) for _ in range(8))
    time.sleep(0.5)
    assert a.proc is not None
    a.proc.terminate()
    stopped = time.monotonic()
    wait_for(lambda: holder(coordination) == "ha-b", timeout=20, interval=0.1, what="replica b to lead")
    handover = time.monotonic() - stopped
    print(f"graceful handover: {handover:.1f} s")
    assert handover < 10, handover  # the Lease was released, not left to lapse
    for name in names:
        obj = wait_phase(custom, namespace, name, "Running", "Failed", timeout=90)
        assert obj["status"]["phase"] == "Running", obj["status"]
    a.proc.wait(30)
    assert "released the leader Lease" in a.log()
    delete_and_check_nothing_left(custom, api_client, namespace, names)


def test_a_leader_cut_off_from_the_api_server_stops_before_another_leads(
    replicas: Replicas,
    api_client: client.ApiClient,
    kubeconfig: Path,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    """Fencing: a leader that cannot renew its Lease exits (code 75) within the renew deadline,
    before the Lease lapses and the standby may act."""
    coordination = client.CoordinationV1Api(api_client)
    relay = TcpRelay(upstream_of(kubeconfig))
    try:
        a = replicas.start(
            "a", kubeconfig=relayed_kubeconfig(kubeconfig, relay, replicas.tmp / "relayed.yaml")
        )
        wait_for(lambda: holder(coordination) == "ha-a", timeout=30, what="replica a to lead")
        replicas.start("b")
        name, _ = make_kernel(namespace, custom, labels=LABELS)
        wait_phase(custom, namespace, name, "Running", timeout=60)
        relay.cut()
        cut = time.monotonic()
        assert a.proc is not None
        assert a.proc.wait(30) == EXIT_FENCED
        fenced = time.monotonic() - cut
        wait_for(lambda: holder(coordination) == "ha-b", timeout=30, interval=0.1, what="replica b to lead")
        led = time.monotonic() - cut
        print(f"fencing: the cut-off leader exited after {fenced:.1f} s; the standby led after {led:.1f} s")
        assert fenced < led, (fenced, led)
        assert "lost the leader Lease" in a.log()
        # The kernel it launched runs on under the new leader.
        time.sleep(2)
        obj = get(custom, namespace, name)
        assert obj is not None and obj["status"]["phase"] == "Running"
        assert runs_code(api_client, namespace, obj)
    finally:
        relay.close()


def test_the_metrics_count_what_happened(
    replicas: Replicas, api_client: client.ApiClient, custom: client.CustomObjectsApi, namespace: str
) -> None:
    """A mixed run (kernels that run, fail and are culled as idle), then the real endpoint is
    scraped: its counts are the test's, and the histogram counted every launch."""
    coordination = client.CoordinationV1Api(api_client)
    replicas.start("a")
    wait_for(lambda: holder(coordination) == "ha-a", timeout=30, what="replica a to lead")
    before = scrape_samples(replicas.http["a"])
    running = [make_kernel(namespace, custom, labels=LABELS)[0] for _ in range(3)]
    failing = [make_kernel(namespace, custom, labels=LABELS, username="root")[0] for _ in range(2)]
    culled = [make_kernel(namespace, custom, labels=LABELS, idleTimeoutSeconds=2)[0] for _ in range(2)]
    for name in running:
        wait_phase(custom, namespace, name, "Running", timeout=60)
    for name in failing:
        wait_phase(custom, namespace, name, "Failed", timeout=60)
    for name in culled:
        wait_for(lambda n=name: get(custom, namespace, n) is None, timeout=60, what=f"{name} to be culled")
    after = scrape_samples(replicas.http["a"])

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("rko_launches_total", backend="ssh", outcome="running") == 5  # 3, and the 2 culled
    assert grew("rko_launches_total", outcome="failed") == 2  # refused before any backend
    assert grew("rko_launches_total") == 7
    assert grew("rko_idle_culls_total", backend="ssh") == 2
    assert grew("rko_launch_duration_seconds_count", backend="ssh") == 5
    assert grew("rko_launch_duration_seconds_bucket", backend="ssh", le="+Inf") == 5
    assert total(after, "rko_kernels", backend="ssh", phase="Running") == 3
    assert total(after, "rko_leader") == 1.0 and total(after, "process_resident_memory_bytes") > 0
    for name in running + failing:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(
        lambda: all(get(custom, namespace, n) is None for n in running + failing), timeout=60, what="deleted"
    )
    final = scrape_samples(replicas.http["a"])
    assert total(final, "rko_kernels") == 0, [s for s in final if s[0] == "rko_kernels"]
    assert (
        total(final, "rko_stops_total", backend="ssh", outcome="stopped")
        - total(before, "rko_stops_total", backend="ssh", outcome="stopped")
        == 5
    )


def test_a_standby_refuses_a_report_whose_token_is_not_the_recorded_one(
    replicas: Replicas, api_client: client.ApiClient, custom: client.CustomObjectsApi, namespace: str
) -> None:
    """A standby opens every report sealed for the shared key, but takes one only for a kernel
    that is Launching with that very token: a report with another token is refused (counted
    as bad_token), and the kernel is untouched."""
    coordination = client.CoordinationV1Api(api_client)
    now = dt.datetime.now(dt.timezone.utc)
    # Held by a replica that never lets go: the one started here stands by for the whole test.
    coordination.create_namespaced_lease(
        LEASE_NAMESPACE,
        client.V1Lease(
            metadata=client.V1ObjectMeta(name=LEASE),
            spec=client.V1LeaseSpec(
                holder_identity="someone-else", lease_duration_seconds=3600, renew_time=now, acquire_time=now
            ),
        ),
    )
    replicas.base_env["RKO_LOG_FORMAT"] = "json"  # and its logs are searchable JSON lines
    replicas.start("b")
    assert scrape(replicas.http["b"])["rko_leader"] == 0.0
    name, kernel_id = make_kernel(namespace, custom, labels=LABELS)
    uid = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)["metadata"]["uid"]
    recorded = protocol.new_token()
    # The launching replica's record, as the leader writes it (only the operator may write status).
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        {"status": {"phase": "Launching", "launch": {"tokenHash": protocol.token_hash(recorded)}}},
    )
    private = client.CoreV1Api(api_client).read_namespaced_secret(
        "remote-kernel-operator-keys", LEASE_NAMESPACE
    )
    public_key = protocol.public_key_of(base64.b64decode(private.data["private-key"]))
    payload: Any = {
        "kernel_id": kernel_id,
        "launch_id": uid,
        "token": protocol.new_token(),  # not the recorded one
        "connection": {
            "ip": "127.0.0.1",
            "transport": "tcp",
            "signature_scheme": "hmac-sha256",
            "key": "forged",
            "shell_port": 1,
            "iopub_port": 2,
            "stdin_port": 3,
            "control_port": 4,
            "hb_port": 5,
        },
        "pid": 1,
        "pgid": 1,
        "kernel_pid": 1,
        "hostname": "forged",
        "control_port": 6,
        "control_key": protocol.encode_key(b"k" * 32),
        "sent_at": time.time(),
    }
    with socket.create_connection(("127.0.0.1", replicas.response_port), timeout=10) as conn:
        conn.sendall(protocol.seal_launch_payload(payload, public_key))
        conn.shutdown(socket.SHUT_WR)
        # Final: a read begun after the report shows another token recorded (its launcher stops).
        assert conn.recv(64) == b"NO bad_token\n"
    status = (get(custom, namespace, name) or {}).get("status") or {}
    assert status.get("phase") == "Launching" and "connection" not in status, status
    assert (
        total(scrape_samples(replicas.http["b"]), "rko_listener_rejections_total", cause="bad_token") == 1.0
    )
    lines = [json.loads(line) for line in replicas.procs["b"].log().splitlines() if line.startswith("{")]
    assert lines and all(
        set(line) >= {"time", "level", "message", "uid", "kernel_id", "phase"} for line in lines
    )
    assert any("is not the one its current launch recorded" in line["message"] for line in lines)
    # Nothing was launched for it: let the deletion find nothing to stop.
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": {"phase": "Failed", "launch": None}}
    )
