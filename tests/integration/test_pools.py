"""Warm pools end to end on the ssh backend (kernels on this machine): claim, late identity,
single use, concurrent claims, refill, maximum age, the empty-pool policies, pool deletion, an
operator restart with a pool, and what a tenant may not do with them."""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from kubernetes import client
from kubernetes.client.rest import ApiException

from localcluster.servers import OperatorProcess
from tests.helpers import wait_for
from tests.profiles import ensure_profile

from .conftest import launcher_processes
from .test_faults import connection_of
from .test_operator_ssh import GROUP, PLURAL, VERSION, get, wait_phase

pytestmark = pytest.mark.integration
POOLS = "remotekernelpools"
PROFILE = "pool-ssh"


@pytest.fixture
def pool_profile(api_client: client.ApiClient, operator: OperatorProcess) -> str:
    return ensure_profile(
        api_client,
        {"backend": "ssh", "ssh": {"hosts": ["localhost"]}, "env": {"allowed": ["TEAM_*"]}},
        name=PROFILE,
    )


def make_pool(
    custom: client.CustomObjectsApi, namespace: str, name: str = "warm", **spec: Any
) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RemoteKernelPool",
        "metadata": {"name": name},
        "spec": {"profile": PROFILE, "replicas": 2, **spec},
    }
    return custom.create_namespaced_custom_object(GROUP, VERSION, namespace, POOLS, body)  # type: ignore[no-any-return]


def pool_status(custom: client.CustomObjectsApi, namespace: str, name: str = "warm") -> dict[str, Any]:
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, POOLS, name)
    return dict(obj.get("status") or {})


def wait_ready(
    custom: client.CustomObjectsApi, namespace: str, count: int, name: str = "warm"
) -> dict[str, Any]:
    return wait_for(
        lambda: (s := pool_status(custom, namespace, name)).get("ready") == count and s,
        timeout=60,
        what=f"pool {name} to have {count} ready kernels",
    )


def members(custom: client.CustomObjectsApi, namespace: str) -> list[dict[str, Any]]:
    found = custom.list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, label_selector="kernel-operator.io/pool-uid"
    )
    return list(found["items"])


def free_members(custom: client.CustomObjectsApi, namespace: str) -> set[str]:
    return {
        m["metadata"]["uid"]
        for m in members(custom, namespace)
        if m["metadata"]["labels"].get("kernel-operator.io/claim") == "free"
    }


def claimer(
    custom: client.CustomObjectsApi, namespace: str, username: str = "alice", **spec: Any
) -> tuple[str, str]:
    kernel_id = str(uuid.uuid4())
    name = f"k-{kernel_id}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RemoteKernel",
        "metadata": {"name": name},
        "spec": {"kernelId": kernel_id, "username": username, "profile": PROFILE, **spec},
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    return name, kernel_id


def connect(api_client: client.ApiClient, namespace: str, obj: dict[str, Any]) -> BlockingKernelClient:
    kc = BlockingKernelClient()
    kc.load_connection_info(connection_of(api_client, namespace, obj))
    kc.start_channels()
    kc.wait_for_ready(timeout=20)
    return kc


def run(kc: BlockingKernelClient, code: str) -> str:
    out: list[str] = []
    reply = kc.execute_interactive(
        code, timeout=20, output_hook=lambda m: out.append(m["content"].get("text", ""))
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(out)


def delete_pool(custom: client.CustomObjectsApi, namespace: str, name: str = "warm") -> None:
    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, POOLS, name)
    except ApiException as err:
        assert err.status == 404, err


def test_a_claim_takes_a_ready_kernel_binds_its_user_and_the_pool_refills(
    pool_profile: str, api_client: client.ApiClient, custom: client.CustomObjectsApi, namespace: str
) -> None:
    make_pool(custom, namespace)
    wait_ready(custom, namespace, 2)
    pooled = free_members(custom, namespace)
    # Nothing of a pooled kernel is within the tenant's reach: its key waits in the operator's
    # namespace.
    core = client.CoreV1Api(api_client)
    assert not [
        s.metadata.name
        for s in core.list_namespaced_secret(namespace).items
        if "connection" in s.metadata.name
    ]
    started = time.monotonic()
    name, kernel_id = claimer(custom, namespace, env={"TEAM_NAME": "blue", "KERNEL_WORKING_DIR": "/tmp"})
    obj = wait_phase(custom, namespace, name, "Running", "Failed", timeout=30)
    waited = time.monotonic() - started
    status = obj["status"]
    assert status["phase"] == "Running" and status["reason"] == "ClaimedFromPool", status
    assert status["pool"]["name"] == "warm" and status["pool"]["memberUid"] in pooled
    assert waited < 5, f"a claim took {waited:.2f} s"
    kc = connect(api_client, namespace, obj)
    try:
        said = run(
            kc,
            "import os; print(os.environ['KERNEL_USERNAME'], os.environ['KERNEL_ID'], "
            "os.environ['TEAM_NAME'], os.getcwd(), len(In), len(Out))",
        )
    finally:
        kc.stop_channels()
    # The warm-up and binding cells left nothing in the claimer's history or output cache: its
    # first cell is In[1].
    assert said.split() == ["alice", kernel_id, "blue", "/tmp", "2", "0"], said
    # The member passes from the pool to its claimer (what it owns goes with the claimer); the
    # pool refills behind the claim and counts it.
    (member,) = [m for m in members(custom, namespace) if m["metadata"]["uid"] == status["pool"]["memberUid"]]
    assert [o["uid"] for o in member["metadata"]["ownerReferences"]] == [obj["metadata"]["uid"]]
    assert member["metadata"]["labels"]["kernel-operator.io/claim"] == obj["metadata"]["uid"]
    refilled = wait_ready(custom, namespace, 2)
    assert refilled["claimed"] == 1 and refilled["selector"].startswith("kernel-operator.io/pool-uid=")
    assert status["pool"]["memberUid"] not in free_members(custom, namespace)  # single use
    # Deleting the claimer stops the kernel it took over.
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(lambda: get(custom, namespace, name) is None, timeout=30, what="the claimer to go")
    wait_for(
        lambda: not [c for c in launcher_processes() if status["backendRef"].get("runDir", "@") in c],
        timeout=15,
        what="the claimed kernel's launcher to stop",
    )
    wait_for(
        lambda: get(custom, namespace, member["metadata"]["name"]) is None,
        timeout=30,
        what="the claimed member object to go with its claimer",
    )
    delete_pool(custom, namespace)


def test_concurrent_claims_never_share_a_kernel_and_the_rest_start_cold(
    pool_profile: str, custom: client.CustomObjectsApi, namespace: str
) -> None:
    make_pool(custom, namespace, replicas=3)
    wait_ready(custom, namespace, 3)
    with ThreadPoolExecutor(8) as ex:
        names = [n for n, _ in ex.map(lambda _: claimer(custom, namespace), range(8))]
    objs = [wait_phase(custom, namespace, n, "Running", "Failed", timeout=60) for n in names]
    assert all(o["status"]["phase"] == "Running" for o in objs), [o["status"] for o in objs]
    claimed = [o["status"]["pool"]["memberUid"] for o in objs if o["status"].get("pool")]
    cold = [o for o in objs if not o["status"].get("pool")]
    assert len(claimed) == len(set(claimed)), f"a pooled kernel was claimed twice: {claimed}"
    assert len(claimed) == 3 and len(cold) == 5, (claimed, [o["status"]["reason"] for o in cold])
    assert {o["status"]["reason"] for o in cold} == {"KernelReady"}
    # Every claimed kernel has a process of its own: three distinct launchers.
    assert len({o["status"]["backendRef"]["pid"] for o in objs}) == 8
    wait_ready(custom, namespace, 3)
    delete_pool(custom, namespace)


def test_a_kernel_that_does_not_fit_or_opts_out_starts_cold(
    pool_profile: str, custom: client.CustomObjectsApi, namespace: str
) -> None:
    make_pool(custom, namespace, replicas=1)
    wait_ready(custom, namespace, 1)
    opted_out, _ = claimer(custom, namespace, usePool=False)
    other_language, _ = claimer(custom, namespace, kernel={"language": "r"}, usePool=True)
    other_range, _ = claimer(custom, namespace, portRange="0..0", env={"KERNEL_QUEUE": "other"})
    obj = wait_phase(custom, namespace, opted_out, "Running", "Failed")
    assert obj["status"]["reason"] == "KernelReady" and "pool" not in obj["status"]
    for name in (other_language, other_range):
        got = wait_phase(custom, namespace, name, "Running", "Failed", "Launching", "Pending")
        assert "pool" not in got["status"], got["status"]
    assert pool_status(custom, namespace).get("claimed", 0) == 0
    assert len(free_members(custom, namespace)) == 1
    delete_pool(custom, namespace)


def test_an_old_unclaimed_kernel_is_replaced(
    pool_profile: str, custom: client.CustomObjectsApi, namespace: str
) -> None:
    make_pool(custom, namespace, replicas=1, maxAgeSeconds=2)
    wait_ready(custom, namespace, 1)
    first = free_members(custom, namespace)
    wait_for(
        lambda: (now := free_members(custom, namespace)) and not now & first,
        timeout=30,
        what="the old pooled kernel to be replaced",
    )
    delete_pool(custom, namespace)


def test_an_empty_pool_that_waits_serves_the_claim_from_its_refill(
    pool_profile: str, custom: client.CustomObjectsApi, namespace: str
) -> None:
    make_pool(custom, namespace, replicas=1, whenEmpty="Wait", waitSeconds=30)
    wait_ready(custom, namespace, 1)
    first, _ = claimer(custom, namespace)
    second, _ = claimer(custom, namespace)
    a = wait_phase(custom, namespace, first, "Running", "Failed")
    b = wait_phase(custom, namespace, second, "Running", "Failed")
    # One took the ready kernel; the other waited for the refill instead of starting cold.
    assert a["status"].get("pool") and b["status"].get("pool"), (a["status"], b["status"])
    assert a["status"]["pool"]["memberUid"] != b["status"]["pool"]["memberUid"]
    delete_pool(custom, namespace)


def test_deleting_a_pool_stops_its_unclaimed_kernels_and_leaves_claimed_ones(
    pool_profile: str, api_client: client.ApiClient, custom: client.CustomObjectsApi, namespace: str
) -> None:
    make_pool(custom, namespace, replicas=2)
    wait_ready(custom, namespace, 2)
    name, _ = claimer(custom, namespace)
    obj = wait_phase(custom, namespace, name, "Running", "Failed")
    assert obj["status"].get("pool"), obj["status"]
    wait_ready(custom, namespace, 2)
    run_dirs = [
        m["status"]["backendRef"]["runDir"]
        for m in members(custom, namespace)
        if m.get("status", {}).get("backendRef")
        and m["metadata"]["labels"]["kernel-operator.io/claim"] == "free"
    ]
    assert len(run_dirs) == 2
    delete_pool(custom, namespace)
    claimed_uid = obj["status"]["pool"]["memberUid"]
    wait_for(
        lambda: [m["metadata"]["uid"] for m in members(custom, namespace)] == [claimed_uid],
        timeout=30,
        what="the pool's unclaimed kernels to go (the claimed one stays, its claimer's)",
    )
    wait_for(
        lambda: not [c for c in launcher_processes() for d in run_dirs if d in c],
        timeout=15,
        what="the unclaimed kernels' launchers to stop",
    )
    kc = connect(api_client, namespace, get(custom, namespace, name) or {})
    try:
        assert run(kc, "print(6 * 7)").strip() == "42"
    finally:
        kc.stop_channels()
    assert (get(custom, namespace, name) or {})["status"]["phase"] == "Running"


def test_pooled_kernels_survive_an_operator_restart_and_are_claimed_after_it(
    pool_profile: str,
    operator: OperatorProcess,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    make_pool(custom, namespace, replicas=2)
    wait_ready(custom, namespace, 2)
    before = free_members(custom, namespace)
    operator.stop()
    operator.start()
    # The same kernels are still pooled (nothing relaunched), and one serves a claim.
    time.sleep(2)
    assert free_members(custom, namespace) == before
    name, kernel_id = claimer(custom, namespace)
    obj = wait_phase(custom, namespace, name, "Running", "Failed", timeout=30)
    assert obj["status"].get("pool", {}).get("memberUid") in before, obj["status"]
    kc = connect(api_client, namespace, obj)
    try:
        assert run(kc, "import os; print(os.environ['KERNEL_ID'])").strip() == kernel_id
    finally:
        kc.stop_channels()
    delete_pool(custom, namespace)


def test_a_forged_pool_member_is_never_claimed(
    pool_profile: str, custom: client.CustomObjectsApi, namespace: str
) -> None:
    """A tenant labels a kernel of its own like a pooled one (its claim label free, the pool as
    owner, a made-up seal): it stays the tenant's kernel and nobody else is given it."""
    pool = make_pool(custom, namespace, replicas=0, whenEmpty="ColdStart")
    kernel_id = str(uuid.uuid4())
    forged = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RemoteKernel",
        "metadata": {
            "name": "forged",
            "labels": {
                "kernel-operator.io/pool": "warm",
                "kernel-operator.io/pool-uid": pool["metadata"]["uid"],
                "kernel-operator.io/claim": "free",
            },
            "annotations": {"kernel-operator.io/pool-seal": "0" * 64},
        },
        "spec": {"kernelId": kernel_id, "username": "mallory", "profile": PROFILE},
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, forged)
    wait_phase(custom, namespace, "forged", "Running")
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, POOLS, "warm", {"spec": {"replicas": 1}})
    wait_ready(custom, namespace, 1)
    # The pool did not count the forged kernel: it launched one of its own.
    assert len(free_members(custom, namespace)) == 2
    names = [claimer(custom, namespace)[0] for _ in range(2)]
    uids = {
        (wait_phase(custom, namespace, n, "Running", "Failed")["status"].get("pool") or {}).get("memberUid")
        for n in names
    }
    forged_uid = (get(custom, namespace, "forged") or {})["metadata"]["uid"]
    assert forged_uid not in uids
    # Its Secret is where a normal kernel's is (the tenant's own), not hidden as a pooled one.
    assert (get(custom, namespace, "forged") or {})["status"]["connection"]["secretRef"][
        "name"
    ] == "forged-connection"
    delete_pool(custom, namespace)


def test_a_pool_says_why_it_cannot_fill_and_the_profile_caps_it(
    api_client: client.ApiClient, operator: OperatorProcess, custom: client.CustomObjectsApi, namespace: str
) -> None:
    make_pool(custom, namespace, name="nowhere", profile="no-such-profile")
    ensure_profile(
        api_client,
        {"backend": "ssh", "ssh": {"hosts": ["localhost"], "impersonation": True}},
        name="pool-as-users",
    )
    make_pool(custom, namespace, name="as-users", profile="pool-as-users")
    ensure_profile(
        api_client,
        {"backend": "ssh", "ssh": {"hosts": ["localhost"]}, "maxima": {"poolReplicas": 1}},
        name="pool-capped",
    )
    make_pool(custom, namespace, name="capped", profile="pool-capped", replicas=3)

    def reason(name: str) -> str:
        conditions = pool_status(custom, namespace, name).get("conditions") or [{}]
        return str(conditions[0].get("reason", ""))

    wait_for(lambda: reason("nowhere") == "ProfileNotFound", what="the pool to say its profile is missing")
    wait_for(lambda: reason("as-users") == "PoolNeedsUser", what="the pool to ask for a user")
    wait_for(
        lambda: (
            reason("capped") == "CappedByProfile"
            and pool_status(custom, namespace, "capped").get("ready") == 1
        )
    )
    assert not [
        m
        for m in members(custom, namespace)
        if m["metadata"]["labels"]["kernel-operator.io/pool"] != "capped"
    ]
    for name in ("nowhere", "as-users", "capped"):
        delete_pool(custom, namespace, name)


def test_kubectl_scale_resizes_a_pool(
    pool_profile: str, custom: client.CustomObjectsApi, namespace: str, kubeconfig: Any
) -> None:
    import subprocess

    from .test_operator_ssh import kubectl_cmd

    make_pool(custom, namespace, replicas=1)
    wait_ready(custom, namespace, 1)
    subprocess.run(
        [*kubectl_cmd(kubeconfig), "-n", namespace, "scale", "rkpool/warm", "--replicas=3"],
        check=True,
        capture_output=True,
        env={**os.environ},
    )
    wait_ready(custom, namespace, 3)
    subprocess.run(
        [*kubectl_cmd(kubeconfig), "-n", namespace, "scale", "rkpool/warm", "--replicas=0"],
        check=True,
        capture_output=True,
    )
    wait_for(lambda: not members(custom, namespace), timeout=30, what="the pool to scale to nothing")
    assert pool_status(custom, namespace)["replicas"] == 0
    delete_pool(custom, namespace)


def test_an_r_kernel_from_a_pool_takes_its_users_identity(
    pool_profile: str, api_client: client.ApiClient, custom: client.CustomObjectsApi, namespace: str
) -> None:
    make_pool(custom, namespace, name="warm-r", replicas=1, template={"kernel": {"language": "r"}})
    wait_ready(custom, namespace, 1, name="warm-r")
    name, kernel_id = claimer(
        custom, namespace, kernel={"language": "r"}, env={"TEAM_NAME": "green", "KERNEL_WORKING_DIR": "/tmp"}
    )
    obj = wait_phase(custom, namespace, name, "Running", "Failed", timeout=30)
    assert obj["status"]["reason"] == "ClaimedFromPool", obj["status"]
    kc = connect(api_client, namespace, obj)
    try:
        said = run(
            kc,
            'cat(Sys.getenv("KERNEL_USERNAME"), Sys.getenv("KERNEL_ID"), Sys.getenv("TEAM_NAME"), getwd())',
        )
    finally:
        kc.stop_channels()
    assert said.split() == ["alice", kernel_id, "green", "/tmp"], said
    delete_pool(custom, namespace, "warm-r")
