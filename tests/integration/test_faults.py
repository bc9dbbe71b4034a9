"""Faults at any moment: the operator SIGKILLed during concurrent launches, deletions during a
launch, acknowledgements lost or late, finished kernels expiring.

An operator of its own class ("faults") serves these tests, so it can be killed and restarted
without disturbing the session's; its launchers report through a proxy the tests control.
The size of the chaos round comes from RKO_CHAOS_KERNELS and RKO_CHAOS_ROUNDS: small in CI,
larger in ``make chaos``.
"""

from __future__ import annotations

import base64
import glob
import os
import random
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import BlockingKernelClient
from kubernetes import client

from localcluster import free_port
from localcluster.servers import OperatorProcess, Sshd
from tests.helpers import wait_for

from .conftest import delete_remote_kernels, ensure_namespace, launcher_processes
from .test_operator_ssh import GROUP, PLURAL, VERSION, get, make_kernel, wait_phase

CLASS = "faults"
LABELS = {"kernel-operator.io/operator-class": CLASS}
KERNELS = int(os.environ.get("RKO_CHAOS_KERNELS", "12"))
ROUNDS = int(os.environ.get("RKO_CHAOS_ROUNDS", "2"))


class AckProxy:
    """A TCP proxy in front of the operator's response listener that can swallow or delay the
    operator's reply (the launcher's acknowledgement) to the next ``n`` launch reports."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.drop = 0
        self.delay = 0.0
        self.dropped = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            conn.settimeout(10)
            try:
                while chunk := conn.recv(65536):
                    data += chunk
                with socket.create_connection(self.upstream, timeout=10) as up:
                    up.sendall(data)
                    up.shutdown(socket.SHUT_WR)
                    reply = up.recv(16)
            except OSError:
                return
            with self.lock:
                swallow = reply.startswith(b"OK") and len(data) > 200 and self.drop > 0
                if swallow:
                    self.drop -= 1
                    self.dropped += 1
                delay = self.delay if swallow else 0.0
            if swallow:
                time.sleep(delay)  # delayed past the launcher's wait, or lost outright
                return
            with __import__("contextlib").suppress(OSError):
                conn.sendall(reply)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def faults_operator(
    operator: OperatorProcess,  # the default-class operator runs too, and must not interfere
    crd: None,
    api_client: client.ApiClient,
    kubeconfig: Path,
    sshd: Sshd,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[OperatorProcess, AckProxy]]:
    ensure_namespace(api_client, "rko-system")
    listen = ("127.0.0.1", free_port())
    proxy = AckProxy(listen)
    proc = OperatorProcess(
        kubeconfig=kubeconfig,
        log_path=tmp_path_factory.mktemp("faults-operator") / "operator.log",
        env={
            "RKO_OPERATOR_CLASS": CLASS,
            "RKO_NAMESPACE": "rko-system",
            "RKO_RESPONSE_BIND": f"{listen[0]}:{listen[1]}",
            "RKO_RESPONSE_ADDRESS": f"127.0.0.1:{proxy.port}",
            "RKO_MONITOR_INTERVAL": "0.5",
            "RKO_SSH_KEY_FILE": str(sshd.client_key),
            "RKO_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
            "RKO_SSH_PORT": str(sshd.port),
            "RKO_SSH_LOCAL_HOSTS": "localhost",
            "RKO_SSH_HOSTS": "localhost",
            # asyncio reports any callback holding the event loop over 100 ms (the chaos
            # test fails on one).
            "RKO_LOOP_SLOW_CALLBACK_MS": "100",
        },
    )
    proc.start()
    yield proc, proxy
    delete_remote_kernels(api_client, CLASS)
    proc.stop()
    proxy.close()


def slow_callbacks(log: str) -> list[str]:
    """asyncio's own report of a callback over RKO_LOOP_SLOW_CALLBACK_MS."""
    return [line for line in log.splitlines() if "Executing <" in line and " took " in line]


def connection_of(api_client: client.ApiClient, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    conn = obj["status"]["connection"]
    secret = client.CoreV1Api(api_client).read_namespaced_secret(conn["secretRef"]["name"], namespace)
    return {
        "ip": conn["ip"],
        "transport": conn["transport"],
        "signature_scheme": conn["signatureScheme"],
        "key": base64.b64decode(secret.data["key"]).decode(),
        "shell_port": conn["shellPort"],
        "iopub_port": conn["iopubPort"],
        "stdin_port": conn["stdinPort"],
        "control_port": conn["controlPort"],
        "hb_port": conn["hbPort"],
    }


def runs_code(api_client: client.ApiClient, namespace: str, obj: dict[str, Any]) -> bool:
    kc = BlockingKernelClient()
    kc.load_connection_info(connection_of(api_client, namespace, obj))
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=30)
        reply = kc.execute_interactive("1 + 1", timeout=30)
        return bool(reply["content"]["status"] == "ok")
    finally:
        kc.stop_channels()


def settle(
    custom: client.CustomObjectsApi,
    api_client: client.ApiClient,
    namespace: str,
    names: Iterable[str],
    timeout: float = 120,
) -> dict[str, str]:
    """Wait for each kernel to end Running or Failed. A Running one must run code; a Failed one
    must say why. Returns each name's outcome: "Running" or "Failed/<reason>: <message>"."""
    outcomes: dict[str, str] = {}
    for name in names:
        obj = wait_phase(custom, namespace, name, "Running", "Failed", timeout=timeout)
        status = obj["status"]
        if status["phase"] == "Failed":
            assert status.get("reason") and status.get("message"), status
            outcomes[name] = f"Failed/{status['reason']}: {status['message'][:120]}"
        else:
            assert runs_code(api_client, namespace, obj), name
            outcomes[name] = "Running"
    return outcomes


def leftovers(kernel_ids: list[str], api_client: client.ApiClient, namespace: str) -> dict[str, Any]:
    procs = [c for c in launcher_processes() if any(k in c for k in kernel_ids)]
    dirs = [d for k in kernel_ids for d in glob.glob(f"/tmp/rko-{k}-*")]
    secrets = [
        s.metadata.name
        for s in client.CoreV1Api(api_client).list_namespaced_secret(namespace).items
        if any(k in s.metadata.name for k in kernel_ids)
    ]
    return {k: v for k, v in {"processes": procs, "run dirs": dirs, "secrets": secrets}.items() if v}


def delete_and_check_nothing_left(
    custom: client.CustomObjectsApi, api_client: client.ApiClient, namespace: str, names: dict[str, str]
) -> None:
    """Delete the RemoteKernels ``names`` (name -> kernel id); wait until they are gone and
    nothing of theirs is left."""
    for name in names:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(lambda: all(get(custom, namespace, n) is None for n in names), timeout=90, what="all deleted")
    kernel_ids = list(names.values())
    try:
        wait_for(lambda: not leftovers(kernel_ids, api_client, namespace), timeout=30, what="nothing left")
    except BaseException:
        print(f"left: {leftovers(kernel_ids, api_client, namespace)}")  # what the failure is about
        raise


def test_a_lost_acknowledgement_does_not_kill_the_running_kernel(
    faults_operator: tuple[OperatorProcess, AckProxy],
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    """The operator persisted the launch and said OK, but the OK never reached the launcher:
    its retry is acknowledged again (acceptance is idempotent), and the kernel stays Running."""
    proc, proxy = faults_operator
    proxy.drop, proxy.delay = 1, 0.0
    name, kernel_id = make_kernel(namespace, custom, labels=LABELS)
    obj = wait_phase(custom, namespace, name, "Running", "Failed", timeout=60)
    assert obj["status"]["phase"] == "Running", obj["status"]
    wait_for(lambda: proxy.dropped >= 1, timeout=10, what="the acknowledgement to be lost")
    time.sleep(2)  # the launcher's retry comes 0.1 s later
    obj = get(custom, namespace, name)
    assert obj is not None and obj["status"]["phase"] == "Running", obj and obj["status"]
    assert runs_code(api_client, namespace, obj)
    assert "Acknowledged again the connection info" in proc.log()
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(lambda: get(custom, namespace, name) is None, timeout=30, what=f"{name} to go")
    wait_for(lambda: not leftovers([kernel_id], api_client, namespace), timeout=20, what="nothing left")


def test_an_acknowledgement_delayed_past_the_launchers_wait_does_not_kill_the_kernel(
    faults_operator: tuple[OperatorProcess, AckProxy],
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    _, proxy = faults_operator
    proxy.drop, proxy.delay = 1, 11.0  # the launcher waits 10 s for its answer
    name, _ = make_kernel(namespace, custom, labels=LABELS)
    wait_phase(custom, namespace, name, "Running", "Failed", timeout=60)
    wait_for(lambda: proxy.dropped >= 2, timeout=30, what="the acknowledgement to be delayed")
    time.sleep(13)
    obj = get(custom, namespace, name)
    assert obj is not None and obj["status"]["phase"] == "Running", obj and obj["status"]
    assert runs_code(api_client, namespace, obj)
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(lambda: get(custom, namespace, name) is None, timeout=30, what=f"{name} to go")


def test_a_finished_remote_kernel_is_deleted_after_its_time_to_live(
    faults_operator: tuple[OperatorProcess, AckProxy], custom: client.CustomObjectsApi, namespace: str
) -> None:
    core = client.CoreV1Api(custom.api_client)
    name, _ = make_kernel(namespace, custom, labels=LABELS, ttlSecondsAfterFinished=2, username="root")
    obj = wait_phase(custom, namespace, name, "Failed", timeout=30)
    assert obj["status"].get("finishedAt"), obj["status"]
    kept, _ = make_kernel(namespace, custom, labels=LABELS, username="root")  # no TTL: kept
    wait_phase(custom, namespace, kept, "Failed", timeout=30)
    wait_for(lambda: get(custom, namespace, name) is None, timeout=20, what=f"{name} to expire")
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    assert any(e.reason == "Expired" for e in events), [e.reason for e in events]
    time.sleep(3)
    assert get(custom, namespace, kept) is not None


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3, 0.6, 1.2])
def test_a_deletion_at_any_stage_of_a_launch_leaves_nothing_behind(
    faults_operator: tuple[OperatorProcess, AckProxy],
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
    delay: float,
) -> None:
    name, kernel_id = make_kernel(namespace, custom, labels=LABELS)
    time.sleep(delay)
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(lambda: get(custom, namespace, name) is None, timeout=30, what=f"{name} to go")
    wait_for(lambda: not leftovers([kernel_id], api_client, namespace), timeout=20, what="nothing left")


def test_the_operator_killed_at_random_moments_during_concurrent_launches(
    faults_operator: tuple[OperatorProcess, AckProxy],
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    """Each round: KERNELS RemoteKernels created at once, the operator SIGKILLed at a random
    moment during their launches and restarted. Every kernel ends Running (and runs code) or
    Failed with a reason; after deleting them all nothing is left."""
    proc, _ = faults_operator
    rng = random.Random(int(os.environ.get("RKO_CHAOS_SEED", "17")))
    for round_ in range(ROUNDS):
        names: dict[str, str] = {}
        for _ in range(KERNELS):
            name, kernel_id = make_kernel(namespace, custom, labels=LABELS, launchTimeoutSeconds=60)
            names[name] = kernel_id
        time.sleep(rng.uniform(0.0, 2.5))
        proc.stop(kill=True)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.start()
        outcomes = settle(custom, api_client, namespace, names)
        failed = {n: o for n, o in outcomes.items() if o != "Running"}
        print(f"chaos round {round_ + 1}: {len(names) - len(failed)}/{len(names)} Running; {failed}")
        delete_and_check_nothing_left(custom, api_client, namespace, dict(names))
    assert not slow_callbacks(proc.log()), slow_callbacks(proc.log())[:5]


def test_etcd_and_the_api_server_restarted_during_launches(
    faults_operator: tuple[OperatorProcess, AckProxy],
    local_cluster: Any,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    """The control plane crashes (etcd and the API server SIGKILLed) while kernels launch and
    comes back on the same data: each kernel ends Running and runs code, or Failed with a
    reason; deleting them all leaves nothing."""
    proc, _ = faults_operator
    names = {}
    for _ in range(max(4, KERNELS // 2)):
        name, kernel_id = make_kernel(namespace, custom, labels=LABELS, launchTimeoutSeconds=90)
        names[name] = kernel_id
    time.sleep(0.3)
    local_cluster.restart(("etcd", "apiserver"))
    outcomes = list(settle(custom, api_client, namespace, names, timeout=150).values())
    print(f"control plane restart: {outcomes.count('Running')}/{len(names)} Running")
    delete_and_check_nothing_left(custom, api_client, namespace, names)
    assert proc.proc is not None and proc.proc.poll() is None, "the operator died with the API server"
