"""The ssh backend across several real hosts: network namespaces, each with its own sshd.

An operator of its own class ("hosts") serves these tests: credentials from a Kubernetes
Secret, impersonation on, short timeouts. Hosts h1..h3 are its pool; "stranger" answers on
two addresses, one with a host key that differs from the known_hosts entry, one not listed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from localcluster import free_port
from localcluster.hosts import PYTHON_MOUNT, HostPool, NetnsHost
from localcluster.servers import OperatorProcess
from tests.helpers import wait_for

from .conftest import delete_remote_kernels, ensure_namespace
from .test_faults import settle
from .test_operator_ssh import (
    GROUP,
    PLURAL,
    VERSION,
    _reply_to,
    delete_and_wait_gone,
    get,
    make_kernel,
    ready_client,
    start_remote_kernel,
    wait_phase,
)

CLASS = "hosts"
LABELS = {f"{GROUP}/operator-class": CLASS}
SECRET = "rko-ssh-hosts"
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def hosts_operator(
    operator: OperatorProcess,  # the default-class operator runs too: they must not interfere
    crd: None,
    api_client: client.ApiClient,
    kubeconfig: Path,
    host_pool: HostPool,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    ensure_namespace(api_client, "rko-system")
    core = client.CoreV1Api(api_client)
    stranger = host_pool.hosts["stranger"]
    # The stranger's first address is vouched for with another host's key: a "changed" key.
    known_hosts = host_pool.known_hosts("h1", "h2", "h3") + (
        f"{stranger.address} {host_pool.hosts['h1'].host_key_pub}\n"
    )
    core.create_namespaced_secret(
        "rko-system",
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=SECRET),
            type="kubernetes.io/ssh-auth",
            string_data={"ssh-privatekey": host_pool.client_key.read_text(), "known_hosts": known_hosts},
        ),
    )
    pool = [host_pool.address(name) for name in ("h1", "h2", "h3")]
    proc = OperatorProcess(
        kubeconfig=kubeconfig,
        log_path=tmp_path_factory.mktemp("hosts-operator") / "operator.log",
        env={
            "RKO_OPERATOR_CLASS": CLASS,
            "RKO_NAMESPACE": "rko-system",
            # Launchers on the hosts reach the operator on the machine's side of their bridge.
            "RKO_RESPONSE_BIND": f"{host_pool.gateway}:{free_port()}",
            "RKO_MONITOR_INTERVAL": "0.5",
            "RKO_SSH_HOSTS": ",".join(pool),
            "RKO_SSH_LOCAL_HOSTS": "",
            "RKO_SSH_USER": "root",
            "RKO_SSH_SECRET": SECRET,
            "RKO_SSH_PYTHON": f"{PYTHON_MOUNT}/bin/python",
            "RKO_SSH_CONNECT_TIMEOUT": "2",
            "RKO_SSH_COMMAND_TIMEOUT": "3",
            "RKO_SSH_HOST_RETRY_SECONDS": "60",
            "RKO_IMPERSONATION": "true",
            # Nobody is refused by name, so the impersonation guard itself is what refuses root.
            "RKO_UNAUTHORIZED_USERS": "",
            "RKO_UNREACHABLE_GRACE_SECONDS": "3",
        },
    )
    proc.start()
    yield proc
    delete_remote_kernels(api_client, CLASS)
    proc.stop()
    core.delete_namespaced_secret(SECRET, "rko-system")
    assert " 403 " not in proc.log()


def host_named(pool: HostPool, address: str) -> NetnsHost:
    return next(h for h in pool.hosts.values() if address in (h.address, *h.extra_addresses))


def start_kernels(custom: client.CustomObjectsApi, namespace: str, count: int, **spec: Any) -> list[str]:
    names = [make_kernel(namespace, custom, labels=LABELS, **spec)[0] for _ in range(count)]
    for name in names:
        status = wait_phase(custom, namespace, name, "Running", "Failed")["status"]
        assert status["phase"] == "Running", status
    return names


def delete_all(custom: client.CustomObjectsApi, namespace: str, names: list[str]) -> None:
    for name in names:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(
        lambda: all(get(custom, namespace, n) is None for n in names),
        timeout=60,
        what="the kernels to be deleted",
    )


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def assert_no_kernels_anywhere(pool: HostPool) -> None:
    def clean() -> bool:
        return not any(host.kernel_processes() for host in pool.hosts.values())

    wait_for(clean, timeout=15, what="no launcher or kernel on any host")


# -- balancing --------------------------------------------------------------------------------


def test_round_robin_spreads_kernels_evenly_and_runs_them_as_their_user(
    operator: OperatorProcess,
    hosts_operator: OperatorProcess,
    custom: client.CustomObjectsApi,
    namespace: str,
    host_pool: HostPool,
) -> None:
    names = start_kernels(custom, namespace, 6, username="bob")
    objs = [get(custom, namespace, n) for n in names]
    # Finalizers are per operator class: kopf removes its own from objects it does not handle.
    assert all(o["metadata"]["finalizers"] == ["kernel-operator.io/finalizer-hosts"] for o in objs)  # type: ignore[index]
    refs = [o["status"]["backendRef"] for o in objs]  # type: ignore[index]
    counts = Counter(ref["host"] for ref in refs)
    assert counts == Counter({host_pool.address(h): 2 for h in ("h1", "h2", "h3")}), counts
    for ref in refs:
        host = host_named(host_pool, ref["host"])
        kernels = host.kernel_processes()
        mine = [pid for pid, cmd in kernels.items() if ref["runDir"] in cmd]
        assert len(mine) == 2, kernels  # the launcher and its kernel, on that host only
        assert {uid_of(pid) for pid in mine} == {2002}  # bob's account on the hosts
        assert ref["user"] == "bob"
    delete_all(custom, namespace, names)
    assert_no_kernels_anywhere(host_pool)
    for ref in refs:  # and their run dirs are gone from each host's own /tmp
        assert not host_named(host_pool, ref["host"]).path(ref["runDir"]).exists()
    # The default-class operator never touched them (nor their finalizers).
    assert not [n for n in names if n in operator.log()]


def test_least_connection_counts_survive_an_operator_restart(
    hosts_operator: OperatorProcess, custom: client.CustomObjectsApi, namespace: str, host_pool: HostPool
) -> None:
    spec = {"ssh": {"loadBalancing": "least-connection"}}
    names = start_kernels(custom, namespace, 3, **spec)
    by_host = {get(custom, namespace, n)["status"]["backendRef"]["host"]: n for n in names}  # type: ignore[index]
    assert len(by_host) == 3, by_host  # one kernel per host
    freed = host_pool.address("h2")
    delete_and_wait_gone(custom, namespace, by_host.pop(freed))
    hosts_operator.stop()
    hosts_operator.start()
    # A fresh operator with empty counts would pick the first host; rebuilt counts pick h2.
    (new,) = start_kernels(custom, namespace, 1, **spec)
    assert get(custom, namespace, new)["status"]["backendRef"]["host"] == freed  # type: ignore[index]
    delete_all(custom, namespace, [*by_host.values(), new])
    assert_no_kernels_anywhere(host_pool)


# -- code, identity and refusals --------------------------------------------------------------


async def test_a_jupyter_client_runs_code_as_the_impersonated_user_on_the_chosen_host(
    hosts_operator: OperatorProcess,
    custom: client.CustomObjectsApi,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    host_pool: HostPool,
) -> None:
    h3 = host_pool.address("h3")
    km = await start_remote_kernel(
        tmp_path, kubeconfig, namespace, monkeypatch, operator_class=CLASS, remote_hosts=[h3]
    )
    try:
        async with ready_client(km) as kc:
            code = (
                "import os, getpass; print(getpass.getuser(), os.getuid(), os.environ['HOME'], os.getcwd())"
            )
            outputs: list[str] = []
            reply = await kc.execute_interactive(
                code,
                timeout=20,
                output_hook=lambda m: outputs.append(m["content"].get("text", "")),
            )
            assert reply["content"]["status"] == "ok"
            assert "".join(outputs).split() == ["alice", "2001", "/home/alice", "/home/alice"]
        assert km.get_connection_info()["ip"] == h3  # the kernel listens on its host's own address
    finally:
        await km.shutdown_kernel(now=True)
    assert_no_kernels_anywhere(host_pool)


@pytest.mark.parametrize(
    ("username", "hosts", "reason", "words"),
    [
        ("root", None, "ImpersonationRefused", "never run as root"),
        ("toor", None, "ImpersonationRefused", "uid 0"),
        ("mallory", None, "UnknownUser", "no account"),
        ("alice", ["stranger"], "HostKeyMismatch", "host key"),
        ("alice", ["stranger-extra"], "UnknownHostKey", "known_hosts"),
        ("alice", ["198.18.0.99"], "HostNotAllowed", "not among profile"),
    ],
)
def test_refusals_fail_the_kernel_with_a_clear_reason_and_start_nothing(
    hosts_operator: OperatorProcess,
    custom: client.CustomObjectsApi,
    namespace: str,
    host_pool: HostPool,
    username: str,
    hosts: list[str] | None,
    reason: str,
    words: str,
) -> None:
    stranger = host_pool.hosts["stranger"]
    aliases = {"stranger": stranger.address, "stranger-extra": stranger.extra_addresses[0]}
    spec: dict[str, Any] = {"username": username}
    if hosts:
        spec["ssh"] = {"hosts": [aliases.get(h, h) for h in hosts]}
        if reason == "HostNotAllowed":  # the profile lists the pool; the tenant picks another host
            spec["ssh"]["profileHosts"] = [host_pool.address(n) for n in ("h1", "h2", "h3")]
    started = time.monotonic()
    name, _ = make_kernel(namespace, custom, labels=LABELS, **spec)
    status = wait_phase(custom, namespace, name, "Failed", "Running", timeout=30)["status"]
    assert status["phase"] == "Failed", status
    assert status["reason"] == reason, status
    assert words in status["message"], status
    assert time.monotonic() - started < 20  # at once, not at the launch timeout
    assert_no_kernels_anywhere(host_pool)
    delete_and_wait_gone(custom, namespace, name)


# -- the launcher gone, the network cut -------------------------------------------------------


async def test_poll_interrupt_and_kill_work_after_the_launcher_is_gone(
    hosts_operator: OperatorProcess,
    custom: client.CustomObjectsApi,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    host_pool: HostPool,
) -> None:
    h1 = host_pool.hosts["h1"]
    km = await start_remote_kernel(
        tmp_path,
        kubeconfig,
        namespace,
        monkeypatch,
        interrupt_mode="signal",
        operator_class=CLASS,
        remote_hosts=[h1.address],
    )
    name = f"k-{km.kernel_id}"
    try:
        launchers = [pid for pid, cmd in h1.kernel_processes().items() if "kernel_launchers" in cmd]
        assert len(launchers) == 1
        os.kill(launchers[0], signal.SIGKILL)  # its control port goes with it
        await asyncio.sleep(2)  # several monitor intervals
        assert await km.is_alive()  # poll: the kernel itself still runs
        assert get(custom, namespace, name)["status"]["phase"] == "Running"  # type: ignore[index]
        async with ready_client(km) as kc:
            msg_id = kc.execute("import time; time.sleep(60)")
            await asyncio.sleep(1)
            await km.interrupt_kernel()  # signal mode: operator -> (no launcher) -> ssh kill -INT
            reply = await _reply_to(kc, msg_id, timeout=15)
            assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert "signalling through the ssh backend" in hosts_operator.log()
    finally:
        await km.shutdown_kernel(now=True)  # kill: the process group, over ssh
    assert get(custom, namespace, name) is None
    assert_no_kernels_anywhere(host_pool)


def test_a_network_cut_fails_the_kernel_and_deletion_cleans_up_once_the_host_is_back(
    hosts_operator: OperatorProcess, custom: client.CustomObjectsApi, namespace: str, host_pool: HostPool
) -> None:
    h3 = host_pool.hosts["h3"]
    (name,) = start_kernels(custom, namespace, 1, ssh={"hosts": [h3.address]})
    ref = get(custom, namespace, name)["status"]["backendRef"]  # type: ignore[index]
    h3.set_link(False)
    try:
        status = wait_phase(custom, namespace, name, "Failed", timeout=60)["status"]
        assert status["reason"] == "HostUnreachable", status
        assert "unreachable" in status["message"]
        assert h3.kernel_processes()  # cut off, not dead: it still runs on the host
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        time.sleep(3)
        assert get(custom, namespace, name) is not None  # the finalizer waits for the host
    finally:
        h3.set_link(True)
    wait_for(lambda: get(custom, namespace, name) is None, timeout=60, what=f"{name} to be deleted")
    assert not h3.kernel_processes()
    assert not h3.path(ref["runDir"]).exists()


def test_hosts_that_are_down_or_refuse_ssh_are_skipped_within_seconds(
    hosts_operator: OperatorProcess, custom: client.CustomObjectsApi, namespace: str, host_pool: HostPool
) -> None:
    h1, h2, h3 = (host_pool.hosts[n] for n in ("h1", "h2", "h3"))
    pool = [h1.address, h2.address, h3.address]
    h1.set_link(False)  # down: packets vanish, connecting times out (RKO_SSH_CONNECT_TIMEOUT=2)
    h2.set_sshd(False)  # up, but refuses ssh: connection refused at once
    names: list[str] = []
    log_start = len(hosts_operator.log())
    try:
        started = time.monotonic()
        for _ in range(3):  # one after another, so each launch sees what the previous learned
            names += start_kernels(custom, namespace, 1, ssh={"hosts": pool})
        elapsed = time.monotonic() - started
        hosts = {get(custom, namespace, n)["status"]["backendRef"]["host"] for n in names}  # type: ignore[index]
        assert hosts == {h3.address}, hosts
        # A dead host costs its connect timeout at most once, then is tried last: three launches
        # take seconds, far from a launch timeout (30 s) each.
        assert elapsed < 20, elapsed
        log = hosts_operator.log()[log_start:]
        assert log.count(f"Host {h1.address} could not start kernel") <= 1, log
        assert log.count(f"Host {h2.address} could not start kernel") <= 1, log

        # With every host of a kernel's list out, it fails at once with each host's reason.
        started = time.monotonic()
        name, _ = make_kernel(namespace, custom, labels=LABELS, ssh={"hosts": [h1.address, h2.address]})
        status = wait_phase(custom, namespace, name, "Failed", timeout=30)["status"]
        assert time.monotonic() - started < 15
        message = status["message"]
        assert status["reason"] == "HostUnreachable", status
        assert h1.address in message and h2.address in message, message
        names.append(name)
    finally:
        h1.set_link(True)
        h2.set_sshd(True)
    delete_all(custom, namespace, names)
    assert_no_kernels_anywhere(host_pool)


def test_the_ssh_secret_is_what_the_operator_uses(
    hosts_operator: OperatorProcess, api_client: client.ApiClient, host_pool: HostPool
) -> None:
    """No key or known_hosts file is given to this operator: only the Secret's contents."""
    env = hosts_operator.env
    assert "RKO_SSH_KEY_FILE" not in env and "RKO_SSH_KNOWN_HOSTS" not in env
    secret = client.CoreV1Api(api_client).read_namespaced_secret(SECRET, "rko-system")
    assert secret.type == "kubernetes.io/ssh-auth"
    assert base64.b64decode(secret.data["ssh-privatekey"]).decode() == host_pool.client_key.read_text()


def test_a_host_link_cut_and_restored_during_concurrent_launches_loses_nothing(
    hosts_operator: OperatorProcess,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
    host_pool: HostPool,
) -> None:
    """One host's link cut for less than the unreachable grace while kernels launch across the
    pool, then restored: kernels already Running there stay Running and answer; each launch
    ends Running and runs code, or Failed with a reason; deleting them leaves nothing on any host."""
    h1, h2, h3 = (host_pool.hosts[n] for n in ("h1", "h2", "h3"))
    pool = [h1.address, h2.address, h3.address]
    made = [make_kernel(namespace, custom, labels=LABELS, ssh={"hosts": [h2.address]}) for _ in range(2)]
    running = [name for name, _ in made]
    for name in running:
        assert wait_phase(custom, namespace, name, "Running", "Failed")["status"]["phase"] == "Running"
    more = [make_kernel(namespace, custom, labels=LABELS, ssh={"hosts": pool}) for _ in range(6)]
    launching = [name for name, _ in more]
    kernel_ids = [kernel_id for _, kernel_id in made + more]
    time.sleep(0.3)
    h2.set_link(False)
    try:
        time.sleep(2)  # below RKO_UNREACHABLE_GRACE_SECONDS (3)
    finally:
        h2.set_link(True)
    outcomes = settle(custom, api_client, namespace, running + launching, timeout=90)
    print(f"link cut: {list(outcomes.values()).count('Running')}/{len(outcomes)} Running; {outcomes}")
    time.sleep(2)  # the monitor has looked at the survivors since the link came back
    for name in running:
        status = get(custom, namespace, name)["status"]  # type: ignore[index]
        assert status["phase"] == "Running", status
    delete_all(custom, namespace, running + launching)
    assert_no_kernels_anywhere(host_pool)
    assert not [d for h in (h1, h2, h3) for k in kernel_ids for d in h.path("/tmp").glob(f"rko-{k}-*")]
