"""Warm pools' pure parts: seals, the refill plan, matching a claimer, late-binding code, and the
shell frames the operator signs."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kernel_operator.errors import SpecError
from kernel_operator.pools import (
    CLAIM_LABEL,
    FREE,
    POOL_UID_LABEL,
    SEAL_ANNOTATION,
    VOID,
    Member,
    PoolSpec,
    backoff_seconds,
    binding_code,
    claim_seal,
    claim_verified,
    is_sealed_member,
    late_env,
    member_manifest,
    member_spec,
    mismatch,
    plan_pool,
    refill_hold_seconds,
    scala_env_payload,
    seal_key,
)
from kernel_operator.profiles import Profile
from kernel_operator.settings import OperatorSettings
from kernel_operator.shell import execute_frames, parse_reply
from kernel_operator.spec import POOL_USERNAME, build_request

KEY = seal_key(b"operator-private-key-bytes-000000")
NOW = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.timezone.utc)


def pool(**changes: Any) -> PoolSpec:
    base = PoolSpec(namespace="team", name="warm", uid="pool-uid-1", replicas=2, profile="p", username="")
    return replace(base, **changes)


def sealed_member(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    p = pool()
    return member_manifest(p, "warm-abc", spec or member_spec(p, {}), KEY, "")


def test_a_member_the_operator_made_is_sealed_and_any_change_breaks_the_seal() -> None:
    obj = sealed_member()
    assert is_sealed_member(KEY, obj)
    assert obj["metadata"]["labels"][CLAIM_LABEL] == FREE
    assert obj["metadata"]["ownerReferences"][0]["uid"] == "pool-uid-1"
    # Made with the operator's finalizer on: kopf does not spend a write adding it.
    assert obj["metadata"]["finalizers"] == ["kernel-operator.io/finalizer"]
    for tamper in (
        lambda o: o["spec"].update(username="mallory"),
        lambda o: o["spec"].setdefault("env", {}).update(PYTHONSTARTUP="/tmp/evil.py"),
        lambda o: o["metadata"].update(name="other"),
        lambda o: o["metadata"]["labels"].update({POOL_UID_LABEL: "another-pool"}),
        lambda o: o["metadata"]["annotations"].update({SEAL_ANNOTATION: "0" * 64}),
    ):
        forged = json.loads(json.dumps(obj))
        tamper(forged)
        assert not is_sealed_member(KEY, forged)
    assert not is_sealed_member(seal_key(b"another operator's key"), obj)
    unlabelled = json.loads(json.dumps(obj))
    del unlabelled["metadata"]["annotations"][SEAL_ANNOTATION]
    assert not is_sealed_member(KEY, unlabelled)


def test_a_claim_record_holds_only_with_its_seal() -> None:
    record = {"memberUid": "m-1", "seal": claim_seal(KEY, "claimer-1", "m-1")}
    assert claim_verified(KEY, "claimer-1", record) == "m-1"
    assert claim_verified(KEY, "claimer-2", record) is None  # copied into another kernel's status
    assert claim_verified(KEY, "claimer-1", {**record, "memberUid": "m-2"}) is None
    assert claim_verified(KEY, "claimer-1", {"memberUid": "m-1"}) is None


def test_pool_spec_errors_say_what_to_fix() -> None:
    def obj(**spec: Any) -> dict[str, Any]:
        return {"metadata": {"name": "warm", "namespace": "team", "uid": "u"}, "spec": spec}

    assert PoolSpec.from_object(obj(replicas=3)).replicas == 3
    with pytest.raises(SpecError, match="replicas must be a whole number"):
        PoolSpec.from_object(obj(replicas=-1))
    with pytest.raises(SpecError, match="whenEmpty 'Never' is not one of ColdStart, Wait"):
        PoolSpec.from_object(obj(whenEmpty="Never"))
    with pytest.raises(SpecError, match="template may not set username"):
        PoolSpec.from_object(obj(template={"username": "root"}))


def test_member_specs_take_the_template_a_new_id_and_the_placeholder_user() -> None:
    p = pool(template={"env": {"TEAM": "x"}, "yarn": {"queue": "q", "sparkInitMode": "lazy"}})
    spec = member_spec(p, {"yarn": {"sparkInitMode": "eager"}, "idleTimeoutSeconds": 60})
    assert spec["username"] == POOL_USERNAME and spec["profile"] == "p"
    assert spec["yarn"] == {"queue": "q", "sparkInitMode": "eager"}  # Spark starts eagerly in a pool
    assert spec["idleTimeoutSeconds"] == 60 and spec["env"] == {"TEAM": "x"}
    assert member_spec(p, {})["kernelId"] != spec["kernelId"]
    assert member_spec(pool(username="alice"), {})["username"] == "alice"


def test_a_member_spec_sets_every_field_the_crd_defaults_so_its_seal_survives_storage() -> None:
    import yaml

    crd = yaml.safe_load(
        (Path(__file__).parents[2] / "crds" / "remotekernels.kernel-operator.io.yaml").read_text()
    )
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def defaulted(node: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
        found = [path] if "default" in node else []
        for key, child in (node.get("properties") or {}).items():
            found += defaulted(child, (*path, key))
        return found

    spec = member_spec(pool(), {})
    paths = defaulted(schema)
    assert paths, "the CRD defaults nothing? then this test is stale"
    for path in paths:
        value: Any = spec
        for key in path:
            assert isinstance(value, dict) and key in value, f"member_spec does not set {'.'.join(path)}"
            value = value[key]


def _member(
    name: str, claim: str = FREE, phase: str = "Running", age: float = 10, ready: bool = True
) -> Member:
    created = NOW - dt.timedelta(seconds=age)
    return Member(name, f"uid-{name}", claim, phase, created, created if ready else None, ready, "", "")


def test_the_plan_fills_the_pool_retires_old_surplus_and_ended_kernels() -> None:
    plan = plan_pool(3, 100, [_member("a"), _member("b", phase="Launching", ready=False)], NOW)
    assert (plan.create, plan.ready, plan.launching, plan.retire) == (1, 1, 1, ())
    old = plan_pool(1, 100, [_member("a", age=500), _member("b")], NOW)
    assert old.retire == ("a",) and old.create == 0
    never = plan_pool(1, 0, [_member("a", age=10**6)], NOW)  # maxAge 0 keeps kernels
    assert never.retire == ()
    # Surplus: launching ones go before ready ones, the youngest first.
    surplus = plan_pool(
        1,
        1000,
        [_member("r1", age=50), _member("r2", age=5), _member("l1", phase="Launching", ready=False)],
        NOW,
    )
    assert set(surplus.retire) == {"l1", "r2"}
    failed = plan_pool(1, 100, [_member("f", phase="Failed")], NOW)
    assert failed.retire == ("f",) and [m.name for m in failed.failed] == ["f"] and failed.create == 1
    assert plan_pool(2, 100, [_member("v", claim=VOID)], NOW).retire == ("v",)


def test_the_plan_leaves_handed_over_kernels_and_retires_orphaned_claims_only() -> None:
    handed = _member("h", claim="claimer-1", age=1000)
    orphan = _member("o", claim="claimer-2", age=120)
    fresh = _member("n", claim="claimer-3", age=5)
    plan = plan_pool(1, 100, [handed, orphan, fresh], NOW, frozenset({"uid-h"}))
    assert plan.retire == ("o",) and plan.create == 1 and plan.ready == 0


def test_backoff_grows_and_is_capped() -> None:
    assert backoff_seconds(0) == 0
    assert backoff_seconds(1) == 2 and backoff_seconds(3) == 8
    assert backoff_seconds(50) == 300


def _request(spec: dict[str, Any], profile: Profile | None = None, member: bool = False) -> Any:
    base = {"kernelId": "00000000-0000-0000-0000-000000000001", "username": "alice"}
    return build_request(
        "team",
        "k",
        "uid",
        {**base, **spec},
        profile or Profile(name="p", backend="ssh", env_allowed=("TEAM_*",)),
        OperatorSettings(),
        pool_member=member,
    )


def test_a_claimer_fits_a_pool_unless_something_fixed_at_launch_differs() -> None:
    member = _request({"username": POOL_USERNAME}, member=True)
    assert mismatch(_request({}), member) is None
    assert mismatch(_request({"env": {"TEAM_X": "1", "KERNEL_WORKING_DIR": "/w"}}), member) is None
    assert "language" in (mismatch(_request({"kernel": {"language": "r"}}), member) or "")
    assert "launch environment" in (mismatch(_request({"env": {"KERNEL_QUEUE": "q"}}), member) or "")
    assert "port range" in (mismatch(_request({"portRange": "40000..41000"}), member) or "")
    assert "transport encryption" in (mismatch(_request({"transportEncryption": "required"}), member) or "")
    assert mismatch(_request({"transportEncryption": "auto"}), member) is None
    per_user = _request({"username": "bob"}, member=True)
    assert "serves user bob only" in (mismatch(_request({}), per_user) or "")


def test_a_scala_claimer_needs_the_pooled_jvms_working_directory() -> None:
    scala = {"kernel": {"language": "scala"}}
    member = _request(
        {**scala, "username": POOL_USERNAME, "env": {"KERNEL_SPARK_INIT_MODE": "eager"}}, member=True
    )
    assert mismatch(_request(scala), member) is None
    assert (
        mismatch(_request({**scala, "env": {"KERNEL_SPARK_INIT_MODE": "lazy", "TEAM_A": "1"}}), member)
        is None
    )
    moved = mismatch(_request({**scala, "env": {"KERNEL_WORKING_DIR": "/w"}}), member)
    assert "working directory differs ('/w' asked, None pooled)" in (moved or "")


def test_the_pool_placeholder_user_passes_only_for_a_sealed_member() -> None:
    profile = Profile(name="p", backend="ssh", authorized_users=("alice",))
    assert _request({"username": POOL_USERNAME}, profile, member=True).username == POOL_USERNAME
    with pytest.raises(SpecError, match="not among the authorized users"):
        _request({"username": POOL_USERNAME}, profile, member=False)


def test_late_env_carries_identity_and_what_differs() -> None:
    member = _request({"username": POOL_USERNAME, "env": {"TEAM_A": "same"}}, member=True)
    wanted = _request({"env": {"TEAM_A": "same", "TEAM_B": "new"}})
    env = late_env(wanted, member)
    assert env["KERNEL_USERNAME"] == "alice" and env["KERNEL_ID"] == wanted.kernel_id
    assert env["TEAM_B"] == "new" and "TEAM_A" not in env


def test_the_python_binding_cell_sets_env_and_cwd_whatever_the_values(tmp_path: Path) -> None:
    hostile = "x'); import os; os.system('touch /tmp/pwned'); ('"
    code = binding_code("python", {"RKO_T_USER": hostile, "RKO_T_2": "é\n\"'"}, str(tmp_path))
    assert hostile not in code  # values travel encoded, never as code
    here = os.getcwd()
    try:
        exec(compile(code, "<binding>", "eval"), {})
        assert os.environ["RKO_T_USER"] == hostile and os.environ["RKO_T_2"] == "é\n\"'"
        assert os.getcwd() == str(tmp_path)
    finally:
        os.chdir(here)
        os.environ.pop("RKO_T_USER", None)
        os.environ.pop("RKO_T_2", None)
    assert "base64_dec" in binding_code("r", {"A": "b"}, None)
    with pytest.raises(SpecError, match="cannot take an identity late"):
        binding_code("julia", {}, None)


def test_the_scala_binding_cell_carries_hostile_values_only_as_base64() -> None:
    hostile = {'X"); sys.exit(1); ("': 'v"\\ }; Runtime.getRuntime.exec("touch /tmp/pwned"); {', "K": "é\n:,"}
    code = binding_code("scala", hostile, "/ignored")
    literal = code.split('".split(",")')[0].rsplit('"', 1)[1]  # the payload's literal
    assert set(literal) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=:,")
    pairs = [p.split(":") for p in scala_env_payload(hostile).split(",")]
    decoded = {base64.b64decode(k).decode(): base64.b64decode(v).decode() for k, v in pairs}
    assert decoded == hostile and literal == scala_env_payload(hostile)
    assert "Runtime" not in code.replace(literal, "") and "/ignored" not in code


def test_execute_frames_are_signed_and_only_the_matching_signed_reply_counts() -> None:
    key = b"k" * 32
    frames = execute_frames(key, "session", "msg-1", "1+1")
    content = json.loads(frames[5])
    assert content["silent"] is True and content["store_history"] is False
    header = json.dumps({"msg_type": "execute_reply"}).encode()
    parent = json.dumps({"msg_id": "msg-1"}).encode()
    body = json.dumps({"status": "ok"}).encode()
    import hashlib
    import hmac

    def signed(k: bytes, parts: list[bytes]) -> list[bytes]:
        mac = hmac.new(k, digestmod=hashlib.sha256)
        for p in parts:
            mac.update(p)
        return [b"<IDS|MSG>", mac.hexdigest().encode(), *parts]

    good = signed(key, [header, parent, b"{}", body])
    assert parse_reply(good, key, "msg-1") == {"status": "ok"}
    assert parse_reply(good, key, "msg-2") is None  # another request's reply
    assert parse_reply(signed(b"x" * 32, [header, parent, b"{}", body]), key, "msg-1") is None
    assert parse_reply([b"garbage"], key, "msg-1") is None


class PoolKube:
    """The Kubernetes seam, for the pool controller: RemoteKernels in memory."""

    def __init__(self) -> None:
        self.kernels: dict[str, dict[str, Any]] = {}
        self.pool_status: dict[str, Any] = {}
        self.created = 0
        self.count = 0

    async def read_profile(self, name: str) -> dict[str, Any] | None:
        if name != "p":
            return None
        return {"metadata": {"name": "p"}, "spec": {"backend": "ssh", "ssh": {"hosts": ["h"]}}}

    async def namespace_labels(self, name: str) -> dict[str, str]:
        return {}

    async def list_remote_kernels(
        self, selector: str = "", namespaces: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        key, _, value = selector.partition("=")
        return [
            json.loads(json.dumps(k))
            for k in self.kernels.values()
            if not selector or k["metadata"]["labels"].get(key) == value
        ]

    async def create_remote_kernel(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.created += 1
        self.count += 1
        obj = json.loads(json.dumps(body))
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        obj["metadata"].update(uid=f"m-{self.count}", namespace=namespace, creationTimestamp=now)
        self.kernels[obj["metadata"]["name"]] = obj
        return obj

    async def swap_label(self, namespace: str, name: str, label: str, expected: str, value: str) -> Any:
        obj = self.kernels.get(name)
        if obj is None or obj["metadata"]["labels"].get(label) != expected:
            return None
        obj["metadata"]["labels"][label] = value
        return obj

    async def delete_remote_kernel(self, namespace: str, name: str) -> None:
        self.kernels.pop(name, None)

    async def delete_secret(self, namespace: str, name: str) -> None:
        pass

    async def patch_pool_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.pool_status.update(status)


def _controller(
    kube: PoolKube, replicas: int = 2, settings: OperatorSettings | None = None, **spec: Any
) -> tuple[Any, Any]:
    from kernel_operator.lifecycle import OperatorContext
    from kernel_operator.pool_controller import PoolController
    from kernel_operator.pool_registry import PoolRegistry

    ctx = OperatorContext(
        settings=settings or OperatorSettings(),
        kube=kube,  # type: ignore[arg-type]
        backends=None,  # type: ignore[arg-type]
        listener=None,  # type: ignore[arg-type]
        private_key=b"k" * 32,
        response_address="127.0.0.1:1",
        pools=PoolRegistry(KEY),
    )
    body = {
        "metadata": {"name": "warm", "namespace": "team", "uid": "pool-1", "generation": 1},
        "spec": {"profile": "p", "replicas": replicas, **spec},
    }
    events: list[tuple[str, str, str]] = []
    import logging

    controller = PoolController(ctx, body, lambda *e: events.append(e), logging.getLogger("t"), "")
    entry = ctx.pools.register(PoolSpec.from_object(body))
    return controller, entry


async def test_the_controller_fills_a_pool_once_and_counts_ready_kernels() -> None:
    kube = PoolKube()
    controller, entry = _controller(kube)
    await controller.reconcile(entry)
    assert kube.created == 2
    for _ in range(3):  # launching members are counted: no second batch
        await controller.reconcile(entry)
    assert kube.created == 2 and kube.pool_status["launching"] == 2
    for obj in kube.kernels.values():
        stamp = obj["metadata"]["creationTimestamp"]
        obj["status"] = {"phase": "Running", "readyAt": stamp, "pooledAt": stamp}
    await controller.reconcile(entry)
    assert kube.created == 2 and kube.pool_status["ready"] == 2
    assert kube.pool_status["selector"] == "kernel-operator.io/pool-uid=pool-1"
    assert entry.member_request is not None and entry.member_request.username == POOL_USERNAME


async def test_the_controller_never_loops_on_objects_that_fail_the_seal() -> None:
    kube = PoolKube()
    controller, entry = _controller(kube, replicas=2)
    for i in range(12):  # a tenant's look-alikes, or members sealed under another key
        kube.kernels[f"fake-{i}"] = {
            "metadata": {
                "name": f"fake-{i}",
                "uid": f"f-{i}",
                "labels": {POOL_UID_LABEL: "pool-1", CLAIM_LABEL: FREE},
            },
            "spec": {},
        }
    for _ in range(5):
        await controller.reconcile(entry)
    assert kube.created == 0  # 12 look-alikes fill the bound of 2 x replicas + 8


async def test_a_failing_member_backs_the_pool_off_and_says_why() -> None:
    kube = PoolKube()
    controller, entry = _controller(kube, replicas=1)
    await controller.reconcile(entry)
    (obj,) = kube.kernels.values()
    obj["status"] = {"phase": "Failed", "reason": "LaunchTimeout", "message": "no report"}
    await controller.reconcile(entry)
    assert kube.created == 1  # not refilled at once: backing off
    assert kube.pool_status["conditions"][0]["reason"] == "MembersFailing"
    assert "LaunchTimeout" in kube.pool_status["conditions"][0]["message"]


async def test_an_invalid_pool_creates_nothing_and_says_why() -> None:
    kube = PoolKube()
    controller, entry = _controller(kube, profile="missing")
    await controller.reconcile(entry)
    assert kube.created == 0 and entry.member_request is None
    assert kube.pool_status["conditions"][0]["reason"] == "ProfileNotFound"


def test_the_refill_hold_counts_from_the_first_claim_and_ends_when_nothing_is_ready() -> None:
    assert refill_hold_seconds(0.0, 1.0, 3, 100.0) == 0  # no claim
    assert refill_hold_seconds(100.0, 1.0, 3, 100.25) == 0.75
    assert refill_hold_seconds(100.0, 1.0, 3, 102.0) == 0  # held long enough
    assert refill_hold_seconds(100.0, 1.0, 0, 100.25) == 0  # none ready: the next claim starts cold
    assert refill_hold_seconds(100.0, 0.0, 3, 100.25) == 0  # RKO_POOL_REFILL_DELAY_SECONDS=0


def _ready_all(kube: PoolKube) -> None:
    for obj in kube.kernels.values():
        stamp = obj["metadata"]["creationTimestamp"]
        obj["status"] = {"phase": "Running", "readyAt": stamp, "pooledAt": stamp}


async def _claim(kube: PoolKube, entry: Any, registry: Any, name: str) -> None:
    assert await kube.swap_label("team", name, CLAIM_LABEL, FREE, f"claimer-{name}") is not None
    registry.member_taken(entry)


async def test_the_pool_refills_a_claim_after_the_delay_while_kernels_are_ready() -> None:
    kube = PoolKube()
    controller, entry = _controller(kube, replicas=3)
    await controller.reconcile(entry)
    _ready_all(kube)
    first, second, _ = sorted(kube.kernels)
    await _claim(kube, entry, controller.ctx.pools, first)
    delay = await controller.reconcile(entry)
    assert kube.created == 3 and 0 < delay <= 1.0  # held back, and woken when the hold ends
    # A second claim during the hold does not push it further: steady claims never starve it.
    claimed_at = entry.claimed_at
    await _claim(kube, entry, controller.ctx.pools, second)
    assert entry.claimed_at == claimed_at
    entry.claimed_at -= 1.0  # the hold has passed
    await controller.reconcile(entry)
    assert kube.created == 5 and entry.claimed_at == 0


async def test_the_pool_refills_at_once_when_its_last_ready_kernel_is_claimed_or_no_delay_is_set() -> None:
    kube = PoolKube()
    controller, entry = _controller(kube, replicas=1)
    await controller.reconcile(entry)
    _ready_all(kube)
    await _claim(kube, entry, controller.ctx.pools, next(iter(kube.kernels)))
    await controller.reconcile(entry)
    assert kube.created == 2  # nothing left ready: refilled at once

    kube = PoolKube()
    settings = OperatorSettings.from_env({"RKO_POOL_REFILL_DELAY_SECONDS": "0"})
    controller, entry = _controller(kube, replicas=2, settings=settings)
    await controller.reconcile(entry)
    _ready_all(kube)
    await _claim(kube, entry, controller.ctx.pools, next(iter(kube.kernels)))
    await controller.reconcile(entry)
    assert kube.created == 3


def test_a_running_member_that_has_not_answered_yet_is_launching_not_ready() -> None:
    starting = _member("s", phase="Running", ready=False)  # e.g. Spark still starting eagerly
    plan = plan_pool(1, 100, [starting], NOW)
    assert (plan.ready, plan.launching, plan.create) == (0, 1, 0)


def test_the_warm_up_cell_readies_ipython_and_runs_spark_jobs_only_where_there_is_spark() -> None:
    from kernel_operator.pools import warmup_code

    code = warmup_code("python")
    ran: list[int] = []

    class Spark:
        def range(self, n: int) -> Any:
            ran.append(n)
            return self

        def count(self) -> int:
            return 1

    formatted: list[Any] = []

    class Shell:  # IPython's, as far as the warm-up uses it
        class display_formatter:
            @staticmethod
            def format(obj: Any) -> Any:
                formatted.append(obj)
                return {}, {}

    namespace: dict[str, Any] = {"spark": Spark(), "get_ipython": Shell}
    exec(code, namespace)
    exec(code, {})  # no Spark, no IPython: nothing happens, nothing fails
    assert ran == [1, 10, 100, 1000, 10000] and warmup_code("r") == ""
    assert formatted == [0]  # the display formatters made before the claimer's first result
    assert set(namespace) == {"spark", "get_ipython", "__builtins__"}  # nothing left to see
    assert (
        warmup_code("scala") == "Seq(1L, 10L, 100L, 1000L, 10000L).foreach(n => spark.range(n).count()); ()"
    )


def test_every_language_a_pool_accepts_has_a_binding_cell() -> None:
    from kernel_operator.pools import BINDABLE_LANGUAGES

    assert all(binding_code(language, {"A": "b"}, None) for language in BINDABLE_LANGUAGES)
