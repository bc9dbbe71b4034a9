"""Warm pools (RemoteKernelPool): reading a pool, its members' manifests, seals, and the plan
that keeps a pool full. Pure: no I/O, no kopf.

A pool keeps ``replicas`` kernels of one profile launched and ready. Its members are ordinary
RemoteKernels created by the operator (owned by the pool, labelled with its uid), so launching,
watching and stopping them is the lifecycle's usual work. Two things make a member trusted:
the label ``kernel-operator.io/claim`` (``free`` until one RemoteKernel claims it) and the
annotation ``kernel-operator.io/pool-seal``, an HMAC under a key derived from the operator's
private key over the member's namespace, name, pool and spec. A tenant can create an object
that looks like a member, but not seal it: an unsealed "member" is never claimed.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import CLASS_LABEL, GROUP, VERSION, finalizer_for
from .errors import SpecError
from .spec import POOL_USERNAME, KernelRequest

POOL_PLURAL = "remotekernelpools"
POOL_KIND = "RemoteKernelPool"
POOL_LABEL = f"{GROUP}/pool"  # the pool's name, for people and kubectl
POOL_UID_LABEL = f"{GROUP}/pool-uid"  # the pool's uid: how the operator finds members
CLAIM_LABEL = f"{GROUP}/claim"  # FREE, then the claiming RemoteKernel's uid, or VOID
SEAL_ANNOTATION = f"{GROUP}/pool-seal"
FREE = "free"
VOID = "void"  # retired by the pool (too old, scaled down, orphaned claim): stop it
WHEN_EMPTY = ("ColdStart", "Wait")
DEFAULT_MAX_AGE = 3600.0
DEFAULT_WAIT = 30.0
# Members' fields copied from the pool's template: what a RemoteKernel's spec may say.
TEMPLATE_FIELDS = (
    "kernel",
    "image",
    "executorImage",
    "env",
    "resources",
    "portRange",
    "transportEncryption",
    "launchTimeoutSeconds",
    "ssh",
    "yarn",
)
# Environment read by backends when they launch: a claimer must agree with the member on these.
# Every other variable is bound late, in the running kernel.
LAUNCH_ENV = frozenset(
    {
        "KERNEL_IMAGE",
        "KERNEL_EXECUTOR_IMAGE",
        "KERNEL_DRIVER_MEMORY",
        "KERNEL_EXECUTOR_MEMORY",
        "KERNEL_EXTRA_SPARK_OPTS",
        "KERNEL_NODE_LABEL",
        "KERNEL_QUEUE",
        "KERNEL_SPARK_INIT_MODE",
        "KERNEL_NAMESPACE",
        "KERNEL_NAME",
    }
)
# Set per kernel by the operator: never compared, always bound.
IDENTITY_ENV = frozenset({"KERNEL_ID", "KERNEL_USERNAME"})


@dataclass(frozen=True)
class PoolSpec:
    """One RemoteKernelPool, as the operator uses it."""

    namespace: str
    name: str
    uid: str
    replicas: int
    profile: str  # as the pool names it ("" = the default profile)
    username: str  # "" = any user (identity bound at claim)
    template: dict[str, Any] = field(default_factory=dict)
    max_age: float = DEFAULT_MAX_AGE
    when_empty: str = "ColdStart"
    wait_seconds: float = DEFAULT_WAIT
    generation: int = 1

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> PoolSpec:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        name = str(meta.get("name") or "")
        replicas = spec.get("replicas", 1)
        if not isinstance(replicas, int) or replicas < 0:
            raise SpecError(f"RemoteKernelPool {name}: spec.replicas must be a whole number >= 0.")
        when_empty = str(spec.get("whenEmpty") or "ColdStart")
        if when_empty not in WHEN_EMPTY:
            raise SpecError(
                f"RemoteKernelPool {name}: spec.whenEmpty {when_empty!r} is not one of {', '.join(WHEN_EMPTY)}."
            )
        template = dict(spec.get("template") or {})
        extra = sorted(set(template) - set(TEMPLATE_FIELDS))
        if extra:
            raise SpecError(
                f"RemoteKernelPool {name}: spec.template may not set {', '.join(extra)} "
                f"(allowed: {', '.join(TEMPLATE_FIELDS)})."
            )
        max_age = spec.get("maxAgeSeconds")
        return cls(
            namespace=str(meta.get("namespace") or ""),
            name=name,
            uid=str(meta.get("uid") or ""),
            replicas=replicas,
            profile=str(spec.get("profile") or ""),
            username=str(spec.get("username") or ""),
            template=template,
            max_age=float(max_age) if max_age is not None else DEFAULT_MAX_AGE,
            when_empty=when_empty,
            wait_seconds=float(spec.get("waitSeconds") or DEFAULT_WAIT),
            generation=int(meta.get("generation") or 1),
        )


def seal_key(private_key: bytes) -> bytes:
    """The key of pool seals: derived from the operator's private key, so every replica of the
    operator (and the next one) agrees, and no tenant holds it."""
    return hmac.new(private_key, b"kernel-operator.io/pool-seal/v1", hashlib.sha256).digest()


def _mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "\0".join(parts).encode(), hashlib.sha256).hexdigest()


def member_seal(key: bytes, namespace: str, name: str, pool_uid: str, spec: Mapping[str, Any]) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return _mac(key, "member", namespace, name, pool_uid, canonical)


def is_sealed_member(key: bytes, obj: Mapping[str, Any]) -> bool:
    """True when ``obj`` is a RemoteKernel the operator created for a pool, unchanged."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    pool_uid = str(labels.get(POOL_UID_LABEL) or "")
    seal = str((meta.get("annotations") or {}).get(SEAL_ANNOTATION) or "")
    if not pool_uid or not seal:
        return False
    expected = member_seal(
        key, str(meta.get("namespace")), str(meta.get("name")), pool_uid, obj.get("spec") or {}
    )
    return hmac.compare_digest(seal, expected)


def claim_seal(key: bytes, claimer_uid: str, member_uid: str) -> str:
    """Binds a claimer to the member whose backend it took over (recorded in its status)."""
    return _mac(key, "claim", claimer_uid, member_uid)


def claim_verified(key: bytes, claimer_uid: str, record: Mapping[str, Any]) -> str | None:
    """The member uid in ``status.pool`` if its seal holds, else None (a tampered status)."""
    member_uid = str(record.get("memberUid") or "")
    seal = str(record.get("seal") or "")
    if member_uid and seal and hmac.compare_digest(seal, claim_seal(key, claimer_uid, member_uid)):
        return member_uid
    return None


def member_name(pool: PoolSpec) -> str:
    return f"{pool.name[:40]}-{uuid.uuid4().hex[:10]}"


def member_spec(pool: PoolSpec, request_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A member's spec: the pool's template, a new kernel id, the pool's user (or the pool
    placeholder, replaced at claim) and what the profile needs (``request_defaults``)."""
    spec: dict[str, Any] = {k: v for k, v in pool.template.items() if v is not None}
    # Every field the CRD would default is set here: the seal covers the spec as stored.
    spec["kernel"] = {"language": "python", **(spec.get("kernel") or {})}
    spec["usePool"] = False  # a member never claims from a pool itself
    spec["kernelId"] = str(uuid.uuid4())
    spec["username"] = pool.username or POOL_USERNAME
    if pool.profile:
        spec["profile"] = pool.profile
    for key, value in request_defaults.items():
        if isinstance(value, Mapping) and isinstance(spec.get(key), Mapping):
            spec[key] = {**spec[key], **value}  # e.g. yarn: the template's, with Spark started eagerly
        else:
            spec[key] = value
    return spec


def member_manifest(
    pool: PoolSpec, name: str, spec: Mapping[str, Any], key: bytes, operator_class: str
) -> dict[str, Any]:
    labels = {POOL_LABEL: pool.name[:63], POOL_UID_LABEL: pool.uid, CLAIM_LABEL: FREE}
    if operator_class:
        labels[CLASS_LABEL] = operator_class
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RemoteKernel",
        "metadata": {
            "name": name,
            "namespace": pool.namespace,
            "labels": labels,
            "annotations": {SEAL_ANNOTATION: member_seal(key, pool.namespace, name, pool.uid, spec)},
            "finalizers": [finalizer_for(operator_class)],
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": POOL_KIND,
                    "name": pool.name,
                    "uid": pool.uid,
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": dict(spec),
    }


def selector(pool_uid: str) -> str:
    """The label selector of a pool's members (also its scale subresource's selector)."""
    return f"{POOL_UID_LABEL}={pool_uid}"


# -- matching a claimer to a pool --------------------------------------------------------------
def mismatch(claimer: KernelRequest, member: KernelRequest) -> str | None:
    """Why a kernel made for ``member`` cannot serve ``claimer`` (None: it can).

    Everything a backend fixed at launch must agree; identity and the rest of the environment
    are bound late."""
    if member.run_as is not None and member.run_as != claimer.run_as:
        return "the pool's kernels run as another account"
    if member.username not in (POOL_USERNAME, claimer.username):
        return f"the pool serves user {member.username} only"
    pairs: Sequence[tuple[str, Any, Any]] = (
        ("profile", claimer.profile, member.profile),
        ("backend", claimer.backend, member.backend),
        ("language", claimer.language, member.language),
        ("kernel class", claimer.class_name, member.class_name),
        ("image", claimer.image, member.image),
        ("executor image", claimer.executor_image, member.executor_image),
        ("resources", claimer.resources, member.resources),
        ("port range", claimer.port_range, member.port_range),
        ("backend options", _comparable(claimer.tenant_config), _comparable(member.tenant_config)),
        ("launch environment", _launch_env(claimer.env), _launch_env(member.env)),
    )
    if member.language == "scala":  # a JVM keeps the working directory it started in
        wd = "KERNEL_WORKING_DIR"
        pairs = (*pairs, ("working directory", claimer.env.get(wd), member.env.get(wd)))
    for what, wanted, offered in pairs:
        if wanted != offered:
            return f"its {what} differs ({wanted!r} asked, {offered!r} pooled)"
    # "auto" takes what the kernel offers (jupyter_client's policy); the others must agree.
    if claimer.transport_encryption not in ("auto", member.transport_encryption):
        return (
            f"its transport encryption differs ({claimer.transport_encryption!r} asked, "
            f"{member.transport_encryption!r} pooled)"
        )
    return None


def _comparable(tenant_config: Mapping[str, Any]) -> dict[str, Any]:
    # A pooled Spark kernel starts Spark eagerly; a claimer asking for lazy start loses nothing.
    return {k: v for k, v in tenant_config.items() if k != "sparkInitMode"}


def _launch_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k in LAUNCH_ENV and k != "KERNEL_SPARK_INIT_MODE"}


def late_env(claimer: KernelRequest, member: KernelRequest) -> dict[str, str]:
    """What the claimed kernel's environment must gain: the claimer's identity and every
    variable whose value differs from the member's."""
    return {k: v for k, v in claimer.env.items() if k in IDENTITY_ENV or member.env.get(k) != v}


# -- the plan that keeps a pool full -------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    name: str
    uid: str
    claim: str
    phase: str
    created: dt.datetime
    ready_at: dt.datetime | None
    pooled: bool  # answered a request: claimable (see status.pooledAt)
    reason: str
    message: str

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> Member:
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        ready = status.get("readyAt")
        return cls(
            name=str(meta.get("name")),
            uid=str(meta.get("uid")),
            claim=str((meta.get("labels") or {}).get(CLAIM_LABEL) or ""),
            phase=str(status.get("phase") or ""),
            created=_parse(str(meta.get("creationTimestamp") or "")) or _epoch(),
            ready_at=_parse(str(ready)) if ready else None,
            pooled=bool(status.get("pooledAt")),
            reason=str(status.get("reason") or ""),
            message=str(status.get("message") or ""),
        )

    @property
    def free(self) -> bool:
        return self.claim == FREE

    @property
    def ready(self) -> bool:
        return self.free and self.phase == "Running" and self.pooled

    @property
    def ended(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


def _epoch() -> dt.datetime:
    return dt.datetime.fromtimestamp(0, dt.timezone.utc)


def _parse(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


@dataclass(frozen=True)
class PoolPlan:
    create: int
    retire: tuple[str, ...]  # free members to stop and delete (too old, surplus, ended)
    failed: tuple[Member, ...]  # members that ended before a claim (why the pool is degraded)
    ready: int
    launching: int


def plan_pool(
    replicas: int,
    max_age: float,
    members: Sequence[Member],
    now: dt.datetime,
    handed_over: frozenset[str] = frozenset(),
    orphan_after: float = 60.0,
) -> PoolPlan:
    """What to do so ``replicas`` unclaimed members are live, none older than ``max_age``.

    ``handed_over`` holds the uids of members whose claimer recorded the claim: they belong to
    their claimer now (its owner reference) and the pool leaves them alone. A member claimed
    longer than ``orphan_after`` seconds ago by a RemoteKernel that did not record it is retired
    (its claimer died mid-claim)."""
    retire: list[str] = []
    failed: list[Member] = []
    live: list[Member] = []
    for member in members:
        if member.claim == VOID:
            retire.append(member.name)
        elif not member.free:
            if member.uid in handed_over:
                continue
            if (now - member.created).total_seconds() > orphan_after and member.ready_at is not None:
                retire.append(member.name)
        elif member.ended:
            failed.append(member)
            retire.append(member.name)
        elif max_age > 0 and (now - (member.ready_at or member.created)).total_seconds() > max_age:
            retire.append(member.name)
        else:
            live.append(member)
    # Surplus: the youngest launching ones go first, then the youngest ready ones.
    surplus = len(live) - replicas
    if surplus > 0:
        order = sorted(live, key=lambda m: (m.phase == "Running", -m.created.timestamp()))
        for member in order[:surplus]:
            retire.append(member.name)
            live.remove(member)
    ready = sum(1 for m in live if m.ready)
    return PoolPlan(
        create=max(0, replicas - len(live)),
        retire=tuple(retire),
        failed=tuple(failed),
        ready=ready,
        launching=len(live) - ready,
    )


def backoff_seconds(consecutive_failures: int) -> float:
    """How long a pool waits before refilling after members failed in a row (0: not at all)."""
    if consecutive_failures <= 0:
        return 0.0
    return float(min(300, 2 ** min(consecutive_failures, 9)))


def refill_hold_seconds(claimed_at: float, delay: float, ready: int, now: float) -> float:
    """How much longer a pool holds its refill back after a claim (0: refill now).

    A claimed kernel's first requests come right after its claim; launches started then take
    the CPU they need (RKO_POOL_REFILL_DELAY_SECONDS). The hold counts from the first claim not
    yet refilled, so steady claims never starve the refill, and it ends at once when no kernel
    is left ready (the next claim would start cold or wait)."""
    if claimed_at <= 0 or delay <= 0 or ready <= 0:
        return 0.0
    return max(0.0, claimed_at + delay - now)


# -- late binding: code the claimed kernel runs, silently -------------------------------------
BINDABLE_LANGUAGES = ("python", "r", "scala")  # those binding_code writes a cell for


def binding_code(language: str, env: Mapping[str, str], cwd: str | None) -> str:
    """A silent cell that gives a running kernel its user's environment and working directory.

    Values travel base64-encoded JSON, so no value can break out of the literal."""
    payload = base64.b64encode(json.dumps({"env": dict(env), "cwd": cwd or ""}).encode()).decode()
    if language == "python":
        return (
            "(lambda o, e: (o.environ.update(e['env']), e['cwd'] and o.chdir(e['cwd']), None)[-1])"
            f"(__import__('os'), __import__('json').loads(__import__('base64').b64decode('{payload}')))"
        )
    if language == "r":
        return (
            "local({e <- jsonlite::fromJSON(rawToChar(jsonlite::base64_dec("
            f"'{payload}')), simplifyVector = FALSE); "
            "if (length(e$env)) do.call(Sys.setenv, e$env); "
            "if (nzchar(e$cwd)) setwd(e$cwd); invisible(NULL)})"
        )
    if language == "scala":
        return _scala_binding(env)
    raise SpecError(f"Kernels in {language!r} cannot take an identity late; they are not pooled.")


def scala_env_payload(env: Mapping[str, str]) -> str:
    """``b64(name):b64(value)`` pairs joined by commas: nothing in it can end a Scala literal."""

    def enc(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return ",".join(f"{enc(k)}:{enc(v)}" for k, v in env.items())


def _scala_binding(env: Mapping[str, str]) -> str:
    # A JVM's environment is read-only by API; System.getenv()'s view wraps the process
    # environment that ProcessBuilder copies, so writing through it reaches sys.env and children.
    # The launcher opens java.util for this (--add-opens). A JVM cannot change its working
    # directory: pools match a Scala claimer's KERNEL_WORKING_DIR instead (see mismatch).
    return (
        '{ val d = java.util.Base64.getDecoder; def s(b: String) = new String(d.decode(b), "UTF-8"); '
        'val e = System.getenv(); val f = e.getClass.getDeclaredField("m"); f.setAccessible(true); '
        "val m = f.get(e).asInstanceOf[java.util.Map[String, String]]; "
        f'"{scala_env_payload(env)}".split(",").filter(_.nonEmpty).foreach {{ p => '
        'val kv = p.split(":", -1); m.put(s(kv(0)), s(kv(1))) }; () }'
    )


def warmup_code(language: str) -> str:
    """The silent cell that tells a pooled kernel is ready. Where the kernel has Spark it also runs
    a few tiny jobs, so a claimer's first job waits neither for executors nor for the JVMs'
    first, unoptimised runs of Spark's code: one warm-up job left the first count of a claimer
    at 1.08-1.42 s, five at 0.85-0.96 s (Spark on YARN, this 2-core machine, 2026-12-02)."""
    sizes = (1, 10, 100, 1000, 10000)
    if language == "python":
        # IPython makes its display formatters at the first result shown: ~3-5 ms of the
        # claimer's first cell (1+1) on this machine, paid here instead. Nothing is displayed.
        return (
            "try:\n"
            "    get_ipython().display_formatter.format(0)\n"
            "except Exception:\n"
            "    pass\n"
            "try:\n"
            "    spark\n"
            "except NameError:\n"
            "    pass\n"
            "else:\n"
            f"    for _rko_rows in {sizes!r}:\n"
            "        spark.range(_rko_rows).count()\n"
            "    del _rko_rows\n"
        )
    if language == "scala":  # Toree always defines spark (eager in a pool)
        return f"Seq({', '.join(f'{n}L' for n in sizes)}).foreach(n => spark.range(n).count()); ()"
    return ""
