"""The kernel phase machine, with fakes at our own seams (Kube, Backends, the listener)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from typing import Any

import pytest

from kernel_launchers import protocol, sealed_connection
from kernel_launchers.protocol import LaunchPayload
from kernel_operator import keys
from kernel_operator.backends.base import BackendStatus, LaunchPlan
from kernel_operator.claim import Claimed
from kernel_operator.errors import BackendError, BackendUnavailable, ControlUnanswered, SpecError
from kernel_operator.lifecycle import KernelLifecycle, OperatorContext
from kernel_operator.settings import OperatorSettings

SSH_PROFILE = {
    "metadata": {"name": "ssh-default", "annotations": {"kernel-operator.io/is-default-profile": "true"}},
    "spec": {"backend": "ssh", "ssh": {"hosts": ["h1"]}},
}


class FakeKube:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.secrets: dict[str, dict[str, bytes]] = {}
        self.owners: dict[str, Any] = {}
        self.profiles: dict[str, dict[str, Any]] = {"ssh-default": SSH_PROFILE}
        self.namespace_labels_: dict[str, dict[str, str]] = {"ns": {}}
        # The status the API server holds, when a test says ({}: nothing newer than the body;
        # None: the RemoteKernel is gone).
        self.stored_status: dict[str, Any] | None = {}

    async def read_profile(self, name: str) -> dict[str, Any] | None:
        return self.profiles.get(name)

    async def list_profiles(self) -> list[dict[str, Any]]:
        return list(self.profiles.values())

    async def namespace_labels(self, name: str) -> dict[str, str] | None:
        return self.namespace_labels_.get(name)

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.patches.append(status)

    async def read_remote_kernel_status(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.stored_status

    async def read_remote_kernel(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self.stored_status is None:
            return None
        return {"metadata": {"namespace": namespace, "name": name}, "status": self.stored_status}

    async def create_secret(self, namespace, name, data, labels=None, owner=None) -> bool:  # type: ignore[no-untyped-def]
        if name in self.secrets:
            return False
        self.secrets[name], self.owners[name] = data, owner
        return True

    async def replace_secret_data(self, namespace: str, name: str, data: dict[str, bytes]) -> None:
        self.secrets[name] = data

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return self.secrets.get(name)

    async def delete_secret(self, namespace: str, name: str, owner_label: str | None = None) -> None:
        self.secrets.pop(name, None)

    def phases(self) -> list[str]:
        return [p["phase"] for p in self.patches if "phase" in p]


class FakeBackend:
    name = "ssh"

    def __init__(self, fail_launch: BackendError | None = None) -> None:
        self.fail_launch = fail_launch
        self.plans: list[LaunchPlan] = []
        self.states: list[BackendStatus] = []
        self.stopped: list[dict[str, Any]] = []
        self.released: list[dict[str, Any]] = []
        self.found: dict[str, Any] | BaseException | None = None
        self.looked_up = 0

    async def launch(self, plan: LaunchPlan) -> dict[str, Any]:
        if self.fail_launch:
            raise self.fail_launch
        self.plans.append(plan)
        return {"host": "h1", "pid": 99, "pgid": 99, "runDir": plan.run_dir, "local": True}

    async def status(self, ref: dict[str, Any]) -> BackendStatus:
        return self.states.pop(0) if self.states else BackendStatus("running")

    async def stop(self, ref: dict[str, Any], owner: str) -> None:
        self.stopped.append(ref)
        self.owner = owner

    def release(self, ref: dict[str, Any]) -> None:
        self.released.append(ref)

    def adopt(self, ref: dict[str, Any]) -> None:
        pass

    async def find(self, request: Any) -> dict[str, Any] | None:
        self.looked_up += 1
        if isinstance(self.found, BaseException):
            raise self.found
        return self.found


class FakeBackends:
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    def get(self, name: str) -> FakeBackend:
        if name != "ssh":
            raise SpecError(f"The {name!r} backend is not available", reason="BackendNotAvailable")
        return self.backend


class FakeListener:
    def __init__(self) -> None:
        self.expected: dict[str, tuple[str, Any]] = {}
        self.forgotten: list[str] = []
        self.watchers: dict[str, Any] = {}
        self.answers: dict[str, tuple[str, int | None]] = {}

    def expect(self, kernel_id: str, token_hash: str, on_launch: Any) -> None:
        self.expected[kernel_id] = (token_hash, on_launch)

    def forget(self, kernel_id: str) -> None:
        self.forgotten.append(kernel_id)

    def watch_exit(self, kernel_id: str, key: bytes, wake: Any) -> None:
        self.watchers[kernel_id] = wake

    def unwatch_exit(self, kernel_id: str, wake: Any = None) -> None:
        self.watchers.pop(kernel_id, None)

    def answered(self, launch_id: str, token_hash: str, launcher_pid: int | None = None) -> None:
        self.answers[launch_id] = (token_hash, launcher_pid)

    def forget_answered(self, launch_id: str) -> None:
        self.answers.pop(launch_id, None)


class Stop:
    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()

    async def wait(self, timeout: float | None = None) -> Stop:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)
        return self


def context(backend: FakeBackend, **env: str) -> tuple[OperatorContext, FakeKube, FakeListener]:
    kube, listener = FakeKube(), FakeListener()
    settings = OperatorSettings.from_env({"RKO_MONITOR_INTERVAL": "0.05", **env})
    ctx = OperatorContext(
        settings=settings,
        kube=kube,  # type: ignore[arg-type]
        backends=FakeBackends(backend),  # type: ignore[arg-type]
        listener=listener,  # type: ignore[arg-type]
        private_key=protocol.new_private_key(),
        response_address="127.0.0.1:8877",
    )
    return ctx, kube, listener


def body(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    kernel_id = str(uuid.uuid4())
    return {
        "metadata": {"namespace": "ns", "name": f"k-{kernel_id}", "uid": "uid-1", "generation": 1},
        "spec": {"kernelId": kernel_id, "username": "alice", **spec},
        # A kernel past Pending was launched on the backend its profile named, as status records.
        "status": {"backend": "ssh", **status} if status else {},
    }


def good_payload(kernel_id: str, token: str = "t") -> LaunchPayload:
    return {
        "kernel_id": kernel_id,
        "token": token,
        "connection": {
            "ip": "10.1.1.1",
            "transport": "tcp",
            "signature_scheme": "hmac-sha256",
            "key": "the-hmac-key",
            "shell_port": 1,
            "iopub_port": 2,
            "stdin_port": 3,
            "control_port": 4,
            "hb_port": 5,
        },
        "pid": 99,
        "pgid": 99,
        "hostname": "h1",
        "control_port": 7,
        "control_key": protocol.encode_key(b"c" * 32),
        "sent_at": 0.0,
    }


def seal_control_key(ctx: OperatorContext, kube: FakeKube, b: dict[str, Any]) -> None:
    """The launcher's control key, sealed in the kernel's Secret as the operator keeps it."""
    sealed = keys.seal(ctx.private_key, b["metadata"]["uid"], b"c" * 32)
    kube.secrets[f"{b['metadata']['name']}-connection"] = {"control-key.sealed": sealed}


def events() -> tuple[list[tuple[str, str, str]], Any]:
    got: list[tuple[str, str, str]] = []
    return got, lambda t, r, m: got.append((t, r, m))


async def test_a_kernel_goes_from_pending_to_running_to_succeeded() -> None:
    backend = FakeBackend()
    ctx, kube, listener = context(backend)
    b = body()
    emitted, emit = events()
    lifecycle = KernelLifecycle(ctx, b, emit, logging.getLogger("t"))
    stop = Stop()
    task = asyncio.create_task(lifecycle.run(stop))
    while b["metadata"]["uid"] not in listener.expected:
        await asyncio.sleep(0.01)
    token_hash, on_launch = listener.expected[b["metadata"]["uid"]]
    plan = backend.plans[0]
    assert token_hash == protocol.token_hash(plan.token)
    assert "--token" not in plan.launcher_args("1.2.3.4")
    await on_launch(good_payload(b["spec"]["kernelId"]))
    backend.states = [BackendStatus("running"), BackendStatus("succeeded", "KernelExited", "bye", 0)]
    await asyncio.wait_for(task, 5)
    # Pending only while queued for a launch slot: one that can launch at once goes straight on.
    assert kube.phases() == ["Launching", "Running", "Succeeded"]
    running = next(p for p in kube.patches if p.get("phase") == "Running")
    assert running["connection"]["secretRef"] == {"name": f"{b['metadata']['name']}-connection", "key": "key"}
    assert "the-hmac-key" not in repr(kube.patches) and "the-hmac-key" not in repr(emitted)
    secret = kube.secrets[f"{b['metadata']['name']}-connection"]
    assert secret["key"] == b"the-hmac-key"
    assert b"c" * 32 not in secret["control-key.sealed"]  # sealed, not stored in clear
    assert kube.owners[f"{b['metadata']['name']}-connection"]["uid"] == "uid-1"
    assert [r for _, r, _ in emitted] == ["Launching", "KernelReady", "KernelExited"]
    assert backend.stopped  # the exited kernel's leftovers are cleaned


async def test_a_bad_spec_fails_without_launching() -> None:
    backend = FakeBackend()
    ctx, kube, _ = context(backend)
    emitted, emit = events()
    await KernelLifecycle(ctx, body(username="root"), emit, logging.getLogger("t")).run(Stop())
    assert kube.phases() == ["Failed"]
    assert kube.patches[-1]["reason"] == "Unauthorized"
    assert emitted[-1][0] == "Warning"
    assert backend.plans == []


async def test_a_backend_that_cannot_launch_fails_the_kernel() -> None:
    backend = FakeBackend(fail_launch=BackendError("no host", reason="NoHostAvailable"))
    ctx, kube, _ = context(backend)
    await KernelLifecycle(ctx, body(), events()[1], logging.getLogger("t")).run(Stop())
    assert kube.phases() == ["Launching", "Failed"]
    assert kube.patches[-1]["reason"] == "NoHostAvailable"
    assert kube.patches[-1]["launch"] is None


async def test_a_launch_that_never_reports_times_out_and_the_backend_is_stopped() -> None:
    backend = FakeBackend()
    ctx, kube, listener = context(backend)
    await asyncio.wait_for(
        KernelLifecycle(ctx, body(launchTimeoutSeconds=1), events()[1], logging.getLogger("t")).run(Stop()),
        10,
    )
    assert kube.phases()[-1] == "Failed"
    assert kube.patches[-1]["reason"] == "LaunchTimeout"
    assert "within 1 s" in kube.patches[-1]["message"]
    assert backend.stopped and backend.released
    assert listener.forgotten


class TalkativeBackend(FakeBackend):
    async def log_tail(self, ref: dict[str, Any], owner: str) -> str:
        return "launcher ERROR the kernel did not listen\n"


async def test_a_launch_timeout_quotes_the_end_of_the_launchers_log() -> None:
    backend = TalkativeBackend()
    ctx, kube, _ = context(backend)
    await asyncio.wait_for(
        KernelLifecycle(ctx, body(launchTimeoutSeconds=1), events()[1], logging.getLogger("t")).run(Stop()),
        10,
    )
    assert kube.patches[-1]["reason"] == "LaunchTimeout"
    assert kube.patches[-1]["message"].endswith("Its log ends: launcher ERROR the kernel did not listen")


async def test_a_launcher_that_dies_fails_the_launch_at_once() -> None:
    backend = FakeBackend()
    backend.states = [BackendStatus("failed", "KernelFailed", "exit 3", 3)]
    ctx, kube, _ = context(backend)
    await asyncio.wait_for(
        KernelLifecycle(ctx, body(launchTimeoutSeconds=60), events()[1], logging.getLogger("t")).run(Stop()),
        5,
    )
    assert kube.patches[-1]["phase"] == "Failed"
    assert "stopped before it was ready" in kube.patches[-1]["message"]


async def test_a_launch_its_operator_never_started_is_launched_again_after_a_restart() -> None:
    """The operator wrote Launching and was killed before it started anything: the restarted
    one finds nothing on the backend and, once the launch is old enough, launches again
    instead of waiting out the launch timeout."""
    backend = FakeBackend()  # find() finds nothing
    ctx, kube, _ = context(backend)
    now = dt.datetime.now(dt.timezone.utc)
    long_ago = (now - dt.timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    later = (now + dt.timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%SZ")
    b = body(
        status={
            "phase": "Launching",
            "launch": {"tokenHash": "old", "startedAt": long_ago, "deadline": later},
        }
    )
    emitted, emit = events()
    stop = Stop()
    task = asyncio.create_task(KernelLifecycle(ctx, b, emit, logging.getLogger("t")).run(stop))
    for _ in range(100):
        if backend.plans:
            break
        await asyncio.sleep(0.02)
    stop.event.set()
    await asyncio.wait_for(task, 5)
    assert len(backend.plans) == 1  # launched again, once
    assert "Relaunching" in [reason for _, reason, _ in emitted]
    relaunch = [p for p in kube.patches if p.get("phase") == "Launching"]
    assert relaunch and relaunch[0]["launch"]["tokenHash"] != "old"


async def test_a_restarted_operator_resumes_a_launch_in_flight() -> None:
    backend = FakeBackend()
    ctx, kube, listener = context(backend)
    deadline = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    b = body(
        status={
            "phase": "Launching",
            "launch": {"tokenHash": "abc", "deadline": deadline},
            "backendRef": {"host": "h1", "pid": 99, "pgid": 99, "runDir": "/tmp/x", "local": True},
        }
    )
    stop = Stop()
    task = asyncio.create_task(KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).run(stop))
    while b["metadata"]["uid"] not in listener.expected:
        await asyncio.sleep(0.01)
    token_hash, on_launch = listener.expected[b["metadata"]["uid"]]
    assert token_hash == "abc"  # the stored hash, not a new token
    await on_launch(good_payload(b["spec"]["kernelId"]))
    stop.event.set()
    await asyncio.wait_for(task, 5)
    assert backend.plans == []  # nothing launched twice
    assert kube.phases() == ["Running"]


async def test_a_failed_kernel_is_left_alone() -> None:
    backend = FakeBackend()
    ctx, kube, _ = context(backend)
    await KernelLifecycle(ctx, body(status={"phase": "Failed"}), events()[1], logging.getLogger("t")).run(
        Stop()
    )
    assert kube.patches == [] and backend.plans == []


async def test_delete_stops_the_backend_and_removes_the_secret() -> None:
    backend = FakeBackend()
    ctx, kube, _ = context(backend)
    b = body(status={"phase": "Running", "backendRef": {"host": "h1", "pid": 1, "runDir": "/tmp/x"}})
    kube.secrets[f"{b['metadata']['name']}-connection"] = {"key": b"k"}
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).delete()
    assert kube.phases() == ["Terminating"]
    assert backend.stopped == [b["status"]["backendRef"]] and backend.released
    assert kube.secrets == {}


async def test_a_kernel_stopped_here_is_not_stopped_or_counted_again_from_an_older_body() -> None:
    """The daemon stopped the kernel and marked its ref "stopped"; the finalizer then read a
    body from before that mark (CI saw 7 stops counted for 5 kernels)."""
    backend = FakeBackend()
    ctx, kube, _ = context(backend)
    b = body(status={"phase": "Running", "backendRef": {"host": "h1", "pid": 1, "runDir": "/tmp/x"}})
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).stop_backend()
    stale = body(status=dict(b["status"]))
    stale["metadata"] = b["metadata"]
    kube.stored_status = dict(b["status"])  # the "stopped" mark not read back yet
    await KernelLifecycle(ctx, stale, events()[1], logging.getLogger("t")).delete()
    assert len(backend.stopped) == 1
    assert ctx.metrics.stops.labels("ssh", "stopped")._value.get() == 1


async def test_delete_with_a_body_older_than_the_launch_stops_what_status_now_names() -> None:
    """kopf may hand the delete handler a body from before the launch recorded its ref (a
    deletion 50 ms after creation did leave the launcher running): the status the API server
    holds now is what counts."""
    backend = FakeBackend()
    ctx, kube, _ = context(backend)
    stale = body(status={"phase": "Pending"})
    ref = {"host": "h1", "pid": 7, "runDir": "/tmp/y"}
    kube.stored_status = {"phase": "Launching", "backend": "ssh", "backendRef": ref}
    await KernelLifecycle(ctx, stale, events()[1], logging.getLogger("t")).delete()
    assert backend.stopped == [ref]


async def test_delete_of_a_remote_kernel_already_gone_stops_its_launch_and_writes_nothing() -> None:
    backend = FakeBackend()
    ctx, kube, _ = context(backend)
    b = body(status={"phase": "Launching", "backendRef": {"host": "h1", "pid": 8, "runDir": "/tmp/z"}})
    kube.stored_status = None
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).delete()
    assert backend.stopped == [b["status"]["backendRef"]]
    assert kube.phases() == []


async def test_delete_of_an_unknown_backend_still_removes_the_secret() -> None:
    backend = FakeBackend()
    ctx, kube, _ = context(backend)
    b = body(status={"phase": "Failed", "backendRef": {"x": 1}, "backend": "yarn"})
    kube.secrets[f"{b['metadata']['name']}-connection"] = {"key": b"k"}
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).delete()
    assert kube.secrets == {} and backend.stopped == []


async def test_signals_need_a_running_kernel() -> None:
    backend = FakeBackend()
    ctx, _, _ = context(backend)
    with pytest.raises(BackendError, match="cannot take signals"):
        await KernelLifecycle(
            ctx, body(status={"phase": "Launching"}), events()[1], logging.getLogger("t")
        ).send_signal(2)


async def test_an_exit_notice_is_acted_on_at_once_not_at_the_next_poll() -> None:
    backend = FakeBackend()
    ctx, kube, listener = context(backend, RKO_MONITOR_INTERVAL="60")
    b = body(status={"phase": "Running", "backendRef": {"host": "h1", "pid": 1, "runDir": "/tmp/x"}})
    seal_control_key(ctx, kube, b)
    task = asyncio.create_task(KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).run(Stop()))
    while b["metadata"]["uid"] not in listener.watchers:
        await asyncio.sleep(0.01)
    backend.states = [BackendStatus("succeeded", "KernelExited", "bye", 0)]
    listener.watchers[b["metadata"]["uid"]]()
    await asyncio.wait_for(task, 2)  # far sooner than the 60 s poll
    assert kube.phases() == ["Succeeded"]
    assert listener.watchers == {}
    assert kube.patches[0]["backendRef"]["stopped"] is True  # the finalizer will not stop it again


async def test_after_an_exit_notice_a_lagging_backend_is_checked_again_soon() -> None:
    backend = FakeBackend()
    ctx, kube, listener = context(backend, RKO_MONITOR_INTERVAL="60")
    b = body(status={"phase": "Running", "backendRef": {"host": "h1", "pid": 1, "runDir": "/tmp/x"}})
    seal_control_key(ctx, kube, b)
    task = asyncio.create_task(KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).run(Stop()))
    while b["metadata"]["uid"] not in listener.watchers:
        await asyncio.sleep(0.01)
    # The pod still reads Running twice after the launcher said its kernel ended.
    backend.states = [
        BackendStatus("running"),
        BackendStatus("running"),
        BackendStatus("succeeded", "KernelExited", "bye", 0),
    ]
    listener.watchers[b["metadata"]["uid"]]()
    await asyncio.wait_for(task, 2)
    assert kube.phases() == ["Succeeded"]


async def test_an_unrecorded_launch_is_found_by_its_labels_and_stopped_at_the_timeout() -> None:
    backend = FakeBackend()
    backend.found = {"kind": "Container", "id": "abc"}
    ctx, kube, _ = context(backend)
    past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    b = body(status={"phase": "Launching", "launch": {"tokenHash": "abc", "deadline": past}})
    await asyncio.wait_for(KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).run(Stop()), 5)
    assert kube.patches[-1]["reason"] == "LaunchTimeout"
    assert backend.stopped == [{"kind": "Container", "id": "abc"}]


async def test_a_launch_the_backend_failed_after_making_something_has_it_found_and_stopped_on_delete() -> (
    None
):
    """dockerd restarted between a container's create and its start: the launch fails with
    nothing recorded, and the created container must not outlive the RemoteKernel."""
    backend = FakeBackend(
        fail_launch=BackendError("the engine went out of reach", reason="BackendUnavailable")
    )
    ctx, kube, _ = context(backend)
    b = body()
    lifecycle = KernelLifecycle(ctx, b, events()[1], logging.getLogger("t"))
    await asyncio.wait_for(lifecycle.run(Stop()), 5)
    stored: dict[str, Any] = {}
    for patch in kube.patches:
        stored.update({k: v for k, v in patch.items() if v is not None})
    assert stored["phase"] == "Failed" and stored["backend"] == "ssh" and "backendRef" not in stored
    # The backend is out of reach at the deletion: it waits (the finalizer retries).
    backend.found = BackendUnavailable("the engine is restarting")
    kube.stored_status = dict(stored)
    with pytest.raises(BackendUnavailable):
        await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).delete()
    assert backend.stopped == []
    backend.found = {"kind": "Container", "id": "created-not-started"}
    kube.stored_status = dict(stored)
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).delete()
    assert backend.stopped == [{"kind": "Container", "id": "created-not-started"}]
    # A kernel failed by its checks never reached a backend: nothing is looked for.
    backend.found, backend.stopped = {"kind": "Container", "id": "x"}, []
    kube.stored_status = {"phase": "Failed", "reason": "InvalidSpec"}
    looked_up = backend.looked_up
    await KernelLifecycle(ctx, body(), events()[1], logging.getLogger("t")).delete()
    assert backend.stopped == [] and backend.looked_up == looked_up


@pytest.mark.parametrize(
    "refusal",
    [
        BackendError("spec.ssh.hosts names h9, not among the profile's hosts", reason="HostNotAllowed"),
        SpecError("Profile p names no ssh hosts", reason="NoHostAvailable"),
    ],
)
async def test_a_failed_launch_whose_look_up_is_refused_is_deleted_at_once(refusal: Exception) -> None:
    """The launch was refused for the same reason the look-up is (a host the profile does not
    allow): it made nothing, and the deletion must not retry it forever."""
    backend = FakeBackend()
    backend.found = refusal
    ctx, kube, _ = context(backend)
    kube.stored_status = {"phase": "Failed", "reason": "HostNotAllowed", "backend": "ssh"}
    # Completes (no raise for the finalizer to retry), having tried the look-up.
    await asyncio.wait_for(KernelLifecycle(ctx, body(), events()[1], logging.getLogger("t")).delete(), 5)
    assert backend.looked_up == 1 and backend.stopped == []


# -- unreachable backends, stops that cannot happen yet, signals without a launcher -------------


class UnreachableBackend(FakeBackend):
    """Its status always raises BackendUnavailable (a host cut off); stop fails the same way."""

    def __init__(self) -> None:
        super().__init__()
        self.status_calls = 0

    async def status(self, ref: dict[str, Any]) -> BackendStatus:
        self.status_calls += 1
        raise BackendUnavailable("cannot reach h1:22: timed out", reason="HostUnreachable")

    async def stop(self, ref: dict[str, Any], owner: str) -> None:
        raise BackendUnavailable("cannot reach h1:22: timed out", reason="HostUnreachable")


async def test_an_unreachable_backend_fails_the_kernel_after_the_grace_period_only() -> None:
    backend = UnreachableBackend()
    ctx, kube, _ = context(backend, RKO_UNREACHABLE_GRACE_SECONDS="0.3")
    b = body(status={"phase": "Running", "backendRef": {"host": "h1", "pid": 1, "runDir": "/tmp/x"}})
    await asyncio.wait_for(KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).run(Stop()), 5)
    assert backend.status_calls >= 3  # several misses were tolerated first
    failed = kube.patches[-1]
    assert failed["phase"] == "Failed" and failed["reason"] == "HostUnreachable"
    assert "unreachable for" in failed["message"] and "RKO_UNREACHABLE_GRACE_SECONDS" in failed["message"]
    # The stop could not happen: not recorded as stopped, so deleting the kernel tries again.
    assert all("backendRef" not in p for p in kube.patches)


async def test_a_blip_shorter_than_the_grace_period_is_forgiven() -> None:
    class Blip(FakeBackend):
        calls = 0

        async def status(self, ref: dict[str, Any]) -> BackendStatus:
            self.calls += 1
            if self.calls <= 2:
                raise BackendUnavailable("timed out", reason="HostUnreachable")
            if self.calls == 3:
                return BackendStatus("running")
            return BackendStatus("succeeded", "KernelExited", "bye", 0)

    backend = Blip()
    ctx, kube, _ = context(backend, RKO_UNREACHABLE_GRACE_SECONDS="60")
    b = body(status={"phase": "Running", "backendRef": {"host": "h1", "pid": 1, "runDir": "/tmp/x"}})
    await asyncio.wait_for(KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).run(Stop()), 5)
    assert kube.phases() == ["Succeeded"]


async def test_delete_retries_while_the_backend_is_unreachable_and_gives_up_when_told() -> None:
    backend = UnreachableBackend()
    ctx, kube, _ = context(backend)
    b = body(status={"phase": "Failed", "backendRef": {"host": "h1", "pid": 1, "runDir": "/tmp/x"}})
    kube.secrets[f"{b['metadata']['name']}-connection"] = {"key": b"k"}
    with pytest.raises(BackendUnavailable):
        await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).delete()
    assert kube.secrets  # nothing removed while a retry is due
    got, emit = events()
    await KernelLifecycle(ctx, b, emit, logging.getLogger("t")).delete(give_up=True)
    assert kube.secrets == {}
    assert [(t, r) for t, r, _ in got] == [("Warning", "StopAbandoned")]
    assert "may be left" in got[0][2] and "h1" in got[0][2]


class SignalingFake(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.signals: list[tuple[dict[str, Any], int]] = []

    async def signal(self, ref: dict[str, Any], signum: int, owner: str) -> None:
        self.signals.append((ref, signum))


def _running_with_dead_launcher(ctx: OperatorContext, kube: FakeKube) -> dict[str, Any]:
    from kernel_operator import keys

    b = body(
        status={
            "phase": "Running",
            # Nothing listens on this port: the launcher is gone.
            "backendRef": {"host": "h1", "pid": 1, "kernelPid": 2, "runDir": "/tmp/x", "controlPort": 1},
            "connection": {"ip": "127.0.0.1"},
        }
    )
    sealed = keys.seal(ctx.private_key, b["metadata"]["uid"], b"c" * 32)
    kube.secrets[f"{b['metadata']['name']}-connection"] = {"control-key.sealed": sealed}
    return b


async def test_a_signal_goes_through_the_backend_when_the_launcher_is_gone() -> None:
    backend = SignalingFake()
    ctx, kube, _ = context(backend)
    b = _running_with_dead_launcher(ctx, kube)
    reply = await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).send_signal(2)
    assert reply == {"ok": True, "via": "ssh"}
    assert backend.signals == [(b["status"]["backendRef"], 2)]


async def test_a_signal_request_is_delivered_once_and_recorded_in_status() -> None:
    """kopf hands the signal handler every event of the kernel while the annotation stays: one
    request id is one signal, however many events repeat it."""
    backend = SignalingFake()
    ctx, kube, _ = context(backend)
    b = _running_with_dead_launcher(ctx, kube)
    for _ in range(3):
        await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).signal_requested("2/r1")
    assert [s for _, s in backend.signals] == [2]
    assert kube.patches[-1] == {"signalHandled": "2/r1"}
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).signal_requested("2/r2")
    assert [s for _, s in backend.signals] == [2, 2]  # a new request is a new signal


async def test_a_restarted_operator_does_not_send_a_handled_signal_again() -> None:
    """A new replica remembers nothing; status says which request the one before handled (an
    interrupt delivered twice can end an R kernel between requests)."""
    backend = SignalingFake()
    ctx, kube, _ = context(backend)
    b = _running_with_dead_launcher(ctx, kube)
    b["status"]["signalHandled"] = "2/r1"
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).signal_requested("2/r1")
    assert backend.signals == [] and kube.patches == []


async def test_a_signal_request_is_recorded_before_it_is_sent() -> None:
    """An operator killed between the two must not send the request again after its restart."""
    recorded_when_sent: list[list[dict[str, Any]]] = []

    class Recording(SignalingFake):
        async def signal(self, ref: dict[str, Any], signum: int, owner: str) -> None:
            recorded_when_sent.append(list(kube.patches))
            await super().signal(ref, signum, owner)

    ctx, kube, _ = context(Recording())
    b = _running_with_dead_launcher(ctx, kube)
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).signal_requested("2/r1")
    assert recorded_when_sent == [[{"signalHandled": "2/r1"}]]


@pytest.mark.parametrize("request_", ["abc/r1", "", "-9/r1", "2"])
async def test_a_malformed_signal_request_is_ignored_and_not_retried(
    request_: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = SignalingFake()
    ctx, kube, _ = context(backend)
    b = _running_with_dead_launcher(ctx, kube)
    for _ in range(2):
        await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).signal_requested(request_)
    if request_ == "2":  # no request id: still one signal, once
        assert [s for _, s in backend.signals] == [2]
    else:
        assert backend.signals == []
        assert "is not '<signal number>/<request id>'" in caplog.text
    assert kube.patches == [{"signalHandled": request_}]


async def test_a_signal_for_a_kernel_not_running_is_a_warning_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = SignalingFake()
    ctx, kube, _ = context(backend)
    b = body(status={"phase": "Launching"})
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).signal_requested("2/r1")
    assert backend.signals == [] and "could not be delivered" in caplog.text
    assert kube.patches == [{"signalHandled": "2/r1"}]  # not tried again at the next event


async def test_without_a_signaling_backend_a_dead_launcher_is_an_error() -> None:
    backend = FakeBackend()
    ctx, kube, _ = context(backend)
    b = _running_with_dead_launcher(ctx, kube)
    with pytest.raises(BackendUnavailable, match="unreachable"):
        await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).send_signal(2)


async def test_the_kernels_pid_from_the_payload_is_recorded() -> None:
    backend = FakeBackend()
    ctx, kube, _ = context(backend)
    b = body(status={"phase": "Launching", "backendRef": {"host": "h1", "pid": 99, "runDir": "/tmp/x"}})
    payload = good_payload(b["spec"]["kernelId"])
    payload["kernel_pid"] = 123
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).persist_connection(payload)
    assert kube.patches[-1]["backendRef"]["kernelPid"] == 123


def _client_pair() -> tuple[bytes, str]:
    private = protocol.new_private_key()
    return private, sealed_connection.encode_public_key(protocol.public_key_of(private))


async def test_the_key_is_sealed_in_status_to_the_clients_key_alone_and_the_secret_stays() -> None:
    ctx, kube, _ = context(FakeBackend())
    private, public = _client_pair()
    b = body(
        status={"phase": "Launching", "backendRef": {"host": "h1", "pid": 99, "runDir": "/tmp/x"}},
        clientPublicKey=public,
    )
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).persist_connection(
        good_payload(b["spec"]["kernelId"])
    )
    connection = kube.patches[-1]["connection"]
    assert kube.patches[-1]["phase"] == "Running" and "the-hmac-key" not in repr(kube.patches)
    opened = sealed_connection.open_sealed(connection["sealed"], private, "uid-1")
    assert opened == {"key": "dGhlLWhtYWMta2V5"}  # base64 of the key, as a Secret's data reads
    assert kube.secrets[f"{b['metadata']['name']}-connection"]["key"] == b"the-hmac-key"
    # Without a client key, nothing is sealed: the client reads the Secret.
    ctx, kube, _ = context(FakeBackend())
    b = body(status={"phase": "Launching", "backendRef": {"host": "h1", "pid": 99, "runDir": "/tmp/x"}})
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).persist_connection(
        good_payload(b["spec"]["kernelId"])
    )
    assert "sealed" not in kube.patches[-1]["connection"]


async def test_a_claimed_kernel_is_sealed_to_its_claimers_key_never_with_the_members_seal() -> None:
    ctx, kube, _ = context(FakeBackend())
    private, public = _client_pair()
    b = body(clientPublicKey=public)
    claimed = Claimed(
        pool="pool",
        pool_uid="pool-uid",
        member="member",
        member_uid="member-uid",
        backend="ssh",
        profile="p",
        backend_ref={"host": "h1"},
        connection={"ip": "10.1.1.1", "shellPort": 1, "sealed": "a member's, never its claimer's"},
        token_hash="h",
        secret={"key": b"the-hmac-key", "control-key.sealed": b"sealed"},
        seal="seal",
    )
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t"))._record_claim(claimed)
    connection = kube.patches[-1]["connection"]
    assert sealed_connection.open_sealed(connection["sealed"], private, "uid-1") == {
        "key": "dGhlLWhtYWMta2V5"
    }
    b = body()  # a claimer without a key gets nothing sealed, and nothing of the member's
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t"))._record_claim(claimed)
    assert "sealed" not in kube.patches[-1]["connection"]


async def test_a_second_remote_kernel_with_a_kernel_id_in_use_fails_and_touches_nothing() -> None:
    backend = FakeBackend()
    ctx, kube, listener = context(backend)
    first = body()
    task = asyncio.create_task(KernelLifecycle(ctx, first, events()[1], logging.getLogger("t")).run(Stop()))
    while first["metadata"]["uid"] not in listener.expected:
        await asyncio.sleep(0.01)
    pending = listener.expected[first["metadata"]["uid"]]
    # Another tenant's RemoteKernel, elsewhere, with the same kernel id.
    second = body()
    second["spec"]["kernelId"] = first["spec"]["kernelId"]
    second["metadata"].update(namespace="other", uid="uid-2")
    kube.patches.clear()
    await KernelLifecycle(ctx, second, events()[1], logging.getLogger("t")).run(Stop())
    assert kube.phases() == ["Failed"] and kube.patches[-1]["reason"] == "KernelIdInUse"
    assert len(backend.plans) == 1 and listener.expected[first["metadata"]["uid"]] == pending
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # Once the first one is deleted, the id is free again.
    await KernelLifecycle(ctx, first, events()[1], logging.getLogger("t")).delete()
    assert ctx.claim_kernel_id(first["spec"]["kernelId"], "uid-3")


@pytest.mark.parametrize(
    ("profile", "labels", "reason"),
    [
        ("missing", {}, "ProfileNotFound"),
        ("team-a", {"team": "b"}, "ProfileNotAllowed"),
        ("", {}, "ProfileAmbiguous"),
    ],
)
async def test_a_kernel_whose_profile_is_missing_or_not_for_its_namespace_fails_before_launch(
    profile: str, labels: dict[str, str], reason: str
) -> None:
    backend = FakeBackend()
    ctx, kube, _ = context(backend)
    kube.profiles["team-a"] = {
        "metadata": {"name": "team-a", "annotations": {"kernel-operator.io/is-default-profile": "true"}},
        "spec": {"backend": "ssh", "namespaceSelector": {"matchLabels": {"team": "a"}}},
    }
    kube.namespace_labels_["ns"] = labels
    await KernelLifecycle(ctx, body(profile=profile), events()[1], logging.getLogger("t")).run(Stop())
    assert kube.phases() == ["Failed"] and kube.patches[-1]["reason"] == reason
    assert backend.plans == []


async def test_stop_is_told_the_remote_kernels_uid_so_it_acts_only_on_what_carries_it() -> None:
    backend = FakeBackend()
    ctx, _, _ = context(backend)
    b = body(status={"phase": "Running", "backendRef": {"host": "h1", "pid": 1, "runDir": "/tmp/x"}})
    await KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).delete()
    assert backend.stopped and backend.owner == "uid-1"


class SlowBackend(FakeBackend):
    """A launch that takes a while: long enough for a deletion to arrive in the middle."""

    def __init__(self) -> None:
        super().__init__()
        self.release_launch = asyncio.Event()

    async def launch(self, plan: LaunchPlan) -> dict[str, Any]:
        await self.release_launch.wait()
        return await super().launch(plan)


async def test_a_deletion_during_a_launch_stops_what_the_launch_starts_afterwards() -> None:
    backend = SlowBackend()
    ctx, kube, _ = context(backend)
    b = body()
    stop = Stop()
    daemon = asyncio.create_task(KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).run(stop))
    while b["metadata"]["uid"] not in ctx.launches:
        await asyncio.sleep(0.01)
    # kopf stops the daemon and runs the delete handler beside it, status not yet recorded.
    stop.event.set()
    b["status"] = {"phase": "Launching", "backend": "ssh"}
    deletion = asyncio.create_task(KernelLifecycle(ctx, b, events()[1], logging.getLogger("t")).delete())
    await asyncio.sleep(0.05)
    assert not deletion.done()  # it waits for the launch in flight
    backend.release_launch.set()
    await asyncio.wait_for(deletion, 5)
    await asyncio.wait_for(daemon, 5)
    assert len(backend.plans) == 1 and backend.stopped, "what the launch started was stopped"
    assert ctx.launches == {}
    assert not [p for p in kube.patches if "backendRef" in p and not p["backendRef"].get("stopped")]


async def test_launches_beyond_the_limit_wait_in_pending_and_start_as_slots_free() -> None:
    """With RKO_MAX_CONCURRENT_LAUNCHES=1 the second kernel waits until the first launch ends
    (here: it times out), so each launch runs at full speed and its timeout counts from its start."""
    backend = FakeBackend()
    ctx, kube, _ = context(backend, RKO_MAX_CONCURRENT_LAUNCHES="1")
    # (Deadlines are written to the second: a 2 s timeout ends 1 to 2 s after the launch.)
    first = KernelLifecycle(ctx, body(launchTimeoutSeconds=2), events()[1], logging.getLogger("t"))
    emitted, emit = events()
    second = KernelLifecycle(ctx, body(launchTimeoutSeconds=2), emit, logging.getLogger("t"))
    tasks = [asyncio.create_task(first.run(Stop())), asyncio.create_task(second.run(Stop()))]
    await asyncio.sleep(0.3)
    assert len(backend.plans) == 1  # the second is still Pending
    assert kube.phases() == ["Launching", "Pending"]  # the first launched at once, unqueued
    assert [r for _, r, _ in emitted] == ["Queued"] and "RKO_MAX_CONCURRENT_LAUNCHES" in emitted[0][2]
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert len(backend.plans) == 2
    phases = kube.phases()
    assert phases.index("Failed") < len(phases) - 1 - phases[::-1].index("Launching")
    assert not ctx.launch_slots.locked()


async def test_a_signal_the_launcher_took_but_did_not_answer_is_not_sent_again() -> None:
    """A launcher that reads the request and never replies may have delivered it: the backend
    must not deliver it a second time (two SIGINTs can end an R kernel between requests)."""
    backend = SignalingFake()
    ctx, kube, _ = context(backend)
    b = _running_with_dead_launcher(ctx, kube)
    taken: list[bytes] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        taken.append(await reader.readline())
        await asyncio.sleep(10)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    b["status"]["backendRef"]["controlPort"] = server.sockets[0].getsockname()[1]
    lifecycle = KernelLifecycle(ctx, b, events()[1], logging.getLogger("t"))
    try:
        with pytest.raises(ControlUnanswered, match="not sent again"):
            await lifecycle.send_signal(2, timeout=0.3)
    finally:
        server.close()
    assert len(taken) == 1 and backend.signals == []


@pytest.mark.parametrize(
    ("setting", "asked", "kept"),
    [
        (None, None, None),  # neither: kept until deleted
        ("60", None, 60.0),  # the administrator's default
        (None, 5, 5.0),  # the tenant's, with no policy
        ("60", 5, 5.0),  # shorter than the policy: the tenant's own object
        ("60", 10**9, 60.0),  # a tenant asking to outlive the policy gets the policy
    ],
)
def test_a_tenant_cannot_keep_a_finished_kernel_past_the_administrators_ttl(
    setting: str | None, asked: int | None, kept: float | None
) -> None:
    env = {"RKO_TTL_SECONDS_AFTER_FINISHED": setting} if setting else {}
    ctx, _, _ = context(FakeBackend(), **env)
    spec = {"ttlSecondsAfterFinished": asked} if asked is not None else {}
    lifecycle = KernelLifecycle(ctx, body(**spec), events()[1], logging.getLogger("t"))
    assert lifecycle.time_to_live() == kept


async def test_waiting_for_a_stop_or_a_wake_leaves_no_task_behind_even_when_cancelled() -> None:
    """A waiter left pending (the wake that never comes) made kopf wait 5 s on every stop."""
    from kernel_operator.lifecycle import stopped_or_woken

    flag, wake = Stop(), asyncio.Event()
    before = {t for t in asyncio.all_tasks() if not t.done()}
    waiting = asyncio.ensure_future(stopped_or_woken(flag, wake, 60))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.05)  # the waiters' cancellation runs its course
    assert {t for t in asyncio.all_tasks() if not t.done()} == before
    wake.set()
    await asyncio.wait_for(stopped_or_woken(flag, wake, 60), 1)  # woken at once
    wake.clear()
    flag.event.set()
    await asyncio.wait_for(stopped_or_woken(flag, wake, 60), 1)  # stopped at once
