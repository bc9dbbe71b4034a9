"""RemoteKernelProvisioner: jupyter_client's provisioner interface on top of RemoteKernels.

A kernelspec selects it with ``"metadata": {"kernel_provisioner": {"provisioner_name":
"remote-kernel", "config": {...}}}``; every key of ``config`` is a trait below. It needs no
rights beyond creating, watching and deleting RemoteKernels and reading their Secrets in one
namespace; the operator does the launching.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import time
import uuid
from typing import Any, cast

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, CaselessStrEnum, Dict, Float, Integer, List, Unicode, default

from kernel_launchers.sealed_connection import SealError, open_sealed

from .client_key import PROCESS_KEY
from .cluster import AlreadyExists, RemoteKernels
from .connections import CONNECTIONS
from .resource import (
    SIGNAL_ANNOTATION,
    build_remote_kernel,
    check_user,
    connection_info,
    finalizer_name,
    kernel_env,
    kernel_labels,
    pod_owner,
    resource_name,
    server_name_from_env,
)

RUNNING, FAILED, SUCCEEDED = "Running", "Failed", "Succeeded"


class KernelLaunchError(RuntimeError):
    """The operator reported the kernel Failed; the message is its reason."""


class RemoteKernelProvisioner(KernelProvisionerBase):
    """Launches kernels by creating RemoteKernel resources for the Remote Kernel Operator."""

    profile = Unicode(
        "",
        config=True,
        help="The RemoteKernelProfile to run under (an administrator's kind of kernel: backend, where, "
        "as whom); empty: the cluster's default profile.",
    )
    backend = CaselessStrEnum(
        ["kubernetes", "sparkApplication", "customResource", "docker", "dockerSwarm", "yarn", "ssh"],
        default_value=None,
        allow_none=True,
        config=True,
        help="The profile's backend, for backend_config (ssh or yarn: spec.ssh / spec.yarn); the "
        "profile decides the backend.",
    )
    namespace = Unicode(config=True, help="Namespace of the RemoteKernel (KERNEL_NAMESPACE, else 'default').")
    kubeconfig = Unicode(
        None, allow_none=True, config=True, help="kubeconfig path (default: KUBECONFIG or in-cluster)."
    )
    image_name = Unicode(
        None, allow_none=True, config=True, help="Kernel image (container backends; KERNEL_IMAGE)."
    )
    executor_image_name = Unicode(
        None, allow_none=True, config=True, help="Spark executor image (KERNEL_EXECUTOR_IMAGE)."
    )
    launch_timeout = Float(
        None, allow_none=True, config=True, help="Seconds to wait for the kernel (default: the operator's)."
    )
    idle_timeout = Integer(0, config=True, help="Delete the kernel after this many idle seconds; 0 never.")
    port_range = Unicode(
        None, allow_none=True, config=True, help="'lower..upper' ports for the kernel; '0..0' any."
    )
    transport_encryption = CaselessStrEnum(
        ["disabled", "auto", "required"],
        default_value=None,
        allow_none=True,
        config=True,
        help="CurveZMQ policy.",
    )
    authorized_users = List(
        Unicode(), config=True, help="Users who may launch (checked again by the operator)."
    )
    unauthorized_users = List(
        Unicode(), default_value=["root"], config=True, help="Users who may not launch."
    )
    remote_hosts = List(
        Unicode(), config=True, help="ssh backend: hosts to launch on (default: the operator's)."
    )
    load_balancing_algorithm = CaselessStrEnum(
        ["round-robin", "least-connection"],
        default_value=None,
        allow_none=True,
        config=True,
        help="ssh backend.",
    )
    attach_existing = Bool(
        True,
        config=True,
        help="Starting a kernel whose RemoteKernel already runs (same kernel id, same user) attaches "
        "to it instead of failing: how a restarted Jupyter server gets its kernels back.",
    )
    server_name = Unicode(
        config=True,
        help="Labels the RemoteKernel with the Jupyter server that started it (JUPYTER_SERVER_NAME, "
        "else the host name), so that server finds its kernels again after a restart.",
    )
    owner_pod_name = Unicode(
        config=True,
        help="A pod (in the kernel's namespace) that owns the kernel: deleting it deletes the kernel. "
        "Default JUPYTER_POD_NAME (set it from the downward API in the Jupyter server's pod).",
    )
    owner_pod_uid = Unicode(config=True, help="That pod's uid (default JUPYTER_POD_UID).")
    operator_class = Unicode(
        "",
        config=True,
        help="Which operator handles the kernel: the one started with this RKO_OPERATOR_CLASS ('' the default).",
    )
    backend_config = Dict(
        config=True,
        help="The tenant's choices for the profile's backend (spec.ssh: hosts, loadBalancing; spec.yarn: "
        "queue, sparkOpts, driverMemory, executorMemory, nodeLabel, sparkInitMode).",
    )
    env_passthrough = List(Unicode(), config=True, help="Variables besides KERNEL_* to pass to the kernel.")
    kernel_class_name = Unicode(
        None, allow_none=True, config=True, help="Python kernel class (KERNEL_CLASS_NAME)."
    )
    delete_failed = Bool(True, config=True, help="Delete a RemoteKernel that failed to launch.")
    use_pool = Bool(
        True,
        config=True,
        help="Take a ready kernel from a RemoteKernelPool that fits (kubectl get rkpool), when there is "
        "one; false always launches a new kernel.",
    )
    poll_interval = Float(
        0.1, config=True, help="Seconds between polls while waiting for the kernel to exit."
    )

    _kernels: RemoteKernels | None = None
    _kernels_loop: asyncio.AbstractEventLoop | None = None
    _created = False
    _running_seen: float | None = None  # when the RemoteKernel was last seen Running (monotonic)

    @default("namespace")
    def _namespace_default(self) -> str:
        return os.environ.get("KERNEL_NAMESPACE", "default")

    @default("server_name")
    def _server_name_default(self) -> str:
        return server_name_from_env()

    @default("owner_pod_name")
    def _owner_pod_name_default(self) -> str:
        return os.environ.get("JUPYTER_POD_NAME", "")

    @default("owner_pod_uid")
    def _owner_pod_uid_default(self) -> str:
        return os.environ.get("JUPYTER_POD_UID", "")

    # -- helpers -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return resource_name(str(self.kernel_id))

    async def _api(self) -> RemoteKernels:
        # A client belongs to the event loop it was made in; synchronous managers (jupyter
        # console's) may call us from more than one loop, so each loop gets its own.
        loop = asyncio.get_running_loop()
        if self._kernels is None or self._kernels_loop is not loop:
            self._kernels = await CONNECTIONS.acquire(self.namespace, self.kubeconfig)
            self._kernels_loop = loop
        return self._kernels

    @property
    def has_process(self) -> bool:
        return self._created

    # -- launch --------------------------------------------------------------------------------
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        kwargs = await super().pre_launch(**kwargs)
        env: dict[str, str] = kwargs["env"]
        username = env.get("KERNEL_USERNAME") or getpass.getuser()
        check_user(username, self.authorized_users, self.unauthorized_users)
        self._username = username
        self._kernel_env = kernel_env(env, self.env_passthrough)
        self._kernel_env["KERNEL_USERNAME"] = username
        self._encryption = self._encryption_policy()
        # The command is the operator's to build; keep the kernelspec's for the log only.
        kwargs["cmd"] = list(self.kernel_spec.argv) if self.kernel_spec else []
        return kwargs

    def _encryption_policy(self) -> str | None:
        """The CurveZMQ policy, as jupyter_client's KernelManager defines it (>= 8.9).

        'auto' asks for encryption only when the kernelspec declares curve support; 'required'
        was already checked against the kernelspec by the manager, and the launcher fails the
        kernel if its pyzmq cannot do it.
        """
        policy: str | None = self.transport_encryption
        km = self.parent
        if policy is None and km is not None and hasattr(km, "_transport_encryption_policy"):
            policy = str(km._transport_encryption_policy())
        if policy == "auto":
            supported = km is not None and bool(
                getattr(km, "_kernel_supports_curve_encryption", lambda: False)()
            )
            return "auto" if supported else "disabled"
        return policy

    def _body(self, client_public_key: str | None = None) -> dict[str, Any]:
        env = self._kernel_env
        blocks: dict[str, dict[str, Any]] = {}
        if self.backend_config:
            if self.backend not in ("ssh", "yarn"):
                raise ValueError(
                    "backend_config holds a tenant's ssh or yarn choices: set backend to ssh or yarn "
                    f"(the profile's backend), not {self.backend!r}."
                )
            blocks[self.backend] = dict(self.backend_config)
        ssh = blocks.setdefault("ssh", {}) if self.remote_hosts or self.load_balancing_algorithm else {}
        if self.remote_hosts:
            ssh.setdefault("hosts", list(self.remote_hosts))
        if self.load_balancing_algorithm:
            ssh.setdefault("loadBalancing", self.load_balancing_algorithm)
        return build_remote_kernel(
            kernel_id=str(self.kernel_id),
            username=self._username,
            language=self.kernel_spec.language if self.kernel_spec else "python",
            profile=self.profile,
            env=env,
            image=env.get("KERNEL_IMAGE") or self.image_name,
            executor_image=env.get("KERNEL_EXECUTOR_IMAGE") or self.executor_image_name,
            class_name=env.get("KERNEL_CLASS_NAME") or self.kernel_class_name,
            launch_timeout=float(env["KERNEL_LAUNCH_TIMEOUT"])
            if env.get("KERNEL_LAUNCH_TIMEOUT")
            else self.launch_timeout,
            idle_timeout=self.idle_timeout,
            port_range=self.port_range,
            transport_encryption=self._encryption,
            backend_config=blocks,
            labels=kernel_labels(self.operator_class, self.server_name, self._kernel_name()),
            owner_references=pod_owner(self.owner_pod_name, self.owner_pod_uid),
            use_pool=self.use_pool,
            client_public_key=client_public_key,
            finalizer=finalizer_name(self.operator_class),
        )

    def _kernel_name(self) -> str:
        """The kernelspec's name (a KernelSpec loaded from its directory may not carry it)."""
        name = self.kernel_spec.name if self.kernel_spec else ""
        return str(name or getattr(self.parent, "kernel_name", "") or "")

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        kernels = await self._api()
        key = PROCESS_KEY.ready()
        body = self._body(key[1] if key else None)
        try:
            created = await kernels.create(body)
        except AlreadyExists:
            # A restart reuses the kernel id: the previous resource must be gone first; a
            # running one of this user is attached to (a restarted server's kernel).
            existing = await kernels.get(self.name)
            if existing is not None and not _deleting(existing):
                return await self._attach(existing)
            await kernels.watch_until(self.name, lambda obj: obj is None, timeout=30)
            created = await kernels.create(body)
        self._created, self._running_seen = True, None
        PROCESS_KEY.prepare()  # made while this launch waits: the next ones read no Secret
        # Sealed in status, the connection needs no Secret read after the wait: no second
        # connection is opened for one.
        warming = asyncio.ensure_future(kernels.warm()) if key is None else None
        try:
            obj = await self._wait_settled(kernels, created)
        finally:
            if warming is not None:
                if not warming.done():
                    warming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warming
        return await self._launched(obj)

    async def _wait_settled(self, kernels: RemoteKernels, created: dict[str, Any]) -> dict[str, Any] | None:
        """The RemoteKernel once Running or Failed (None: deleted meanwhile)."""
        timeout = (self.launch_timeout or 30.0) + 15.0  # the operator times out first, with a reason
        self.log.info("Created RemoteKernel %s/%s; waiting for it to run.", self.namespace, self.name)
        began = time.monotonic()
        obj: dict[str, Any] | None = created
        while True:
            try:
                obj = await kernels.watch_until(self.name, _settled, timeout, start=obj)
                break
            except TimeoutError as err:
                obj = await kernels.get(self.name)
                if _settled(obj):
                    break
                more = more_time(obj, timeout, time.monotonic() - began)
                if more is None:
                    await self._discard(obj)
                    raise TimeoutError(
                        f"Kernel {self.kernel_id} did not start within {time.monotonic() - began:.0f} s "
                        "and no reason was reported; is the Remote Kernel Operator running?"
                    ) from err
                timeout = more
        return obj

    async def _launched(self, obj: dict[str, Any] | None) -> KernelConnectionInfo:
        if obj is None:
            self._created = False
            self._running_seen = None
            raise KernelLaunchError(f"RemoteKernel {self.namespace}/{self.name} was deleted during launch.")
        status = obj.get("status") or {}
        if status.get("phase") != RUNNING:
            message = (
                f"Kernel {self.kernel_id} failed to launch: {status.get('reason')}: {status.get('message')}"
            )
            if self.delete_failed:
                await self._discard()
            raise KernelLaunchError(message)
        await self._load_connection(obj)
        return self.connection_info

    async def _attach(self, obj: dict[str, Any]) -> KernelConnectionInfo:
        """Take over a running RemoteKernel of this user (a restarted server's kernel)."""
        where = f"RemoteKernel {self.namespace}/{self.name}"
        if not self.attach_existing:
            raise KernelLaunchError(f"{where} already exists; delete it or use a new kernel id.")
        owner = (obj.get("spec") or {}).get("username")
        if owner != self._username:
            raise KernelLaunchError(
                f"{where} belongs to user {owner!r}, not {self._username!r}; not attaching."
            )
        if (obj.get("status") or {}).get("phase") != RUNNING:
            settled = await (await self._api()).watch_until(
                self.name, _settled, (self.launch_timeout or 30.0) + 15.0
            )
            if settled is None or (settled.get("status") or {}).get("phase") != RUNNING:
                raise KernelLaunchError(f"{where} exists but is not running; delete it first.")
            obj = settled
        self.log.info("Attaching to the running %s.", where)
        self._created = True
        await self._load_connection(obj)
        # A manager restarted in the same runtime dir finds the kernel's connection file from
        # before; jupyter_client then skips loading the info it matches, so load it here.
        load = getattr(self.parent, "load_connection_info", None)
        if load is not None:
            load(self.connection_info)
        return self.connection_info

    async def _load_connection(self, obj: dict[str, Any]) -> None:
        self._running_seen = time.monotonic()
        status = obj["status"]
        data = self._sealed_data(obj)
        if data is None:
            kernels = await self._api()
            data = await kernels.secret_data(status["connection"]["secretRef"]["name"])
        self.connection_info = connection_info(status, data)

    def _sealed_data(self, obj: dict[str, Any]) -> dict[str, str] | None:
        """The kernel's Secret data as the operator sealed it to this process's key in status
        (a kernel this process created with it); None: read the Secret."""
        key = PROCESS_KEY.ready()
        sealed = (obj["status"].get("connection") or {}).get("sealed")
        if key is None or not sealed or (obj.get("spec") or {}).get("clientPublicKey") != key[1]:
            return None
        try:
            return open_sealed(sealed, key[0], str(obj["metadata"]["uid"]))
        except SealError as err:
            self.log.warning("Reading the Secret of RemoteKernel %s instead: %s", self.name, err)
            return None

    async def _discard(self, obj: dict[str, Any] | None = None) -> None:
        kernels = await self._api()
        if obj is not None and not obj.get("status"):
            # No operator ever wrote it (none serves its class or namespace): the finalizer it was
            # created with would keep it Terminating until one does. Nothing was started.
            await kernels.release_unseen(obj, finalizer_name(self.operator_class))
        await kernels.delete(self.name)
        self._created = False
        self._running_seen = None

    # -- lifecycle -----------------------------------------------------------------------------
    async def poll(self) -> int | None:
        if not self._created:
            return 0
        # Seen Running by the launch a moment ago: alive, without a read. Right after a start,
        # jupyter_client's wait_for_ready asks, and so does Jupyter Server when a client opens
        # the kernel's first websocket (its restarter asks every 3 s).
        if self._running_seen is not None and time.monotonic() - self._running_seen < RUNNING_FRESH_SECONDS:
            return None
        return await self._exit_code()

    async def _exit_code(self) -> int | None:
        """The kernel's exit code as its RemoteKernel says now (None: not ended)."""
        obj = await (await self._api()).get(self.name)
        if obj is None:
            return 0
        phase = (obj.get("status") or {}).get("phase")
        if phase == SUCCEEDED:
            return 0
        if phase == FAILED:
            return 1
        return None

    async def wait(self) -> int | None:
        # Read every turn, never from the launch's sighting: a shutdown waits here for the end.
        while self._created:
            code = await self._exit_code()
            if code is not None:
                return code
            await asyncio.sleep(self.poll_interval)
        return 0

    async def send_signal(self, signum: int) -> None:
        if signum == 0 or not self._created:
            return
        # The operator forwards it to the launcher, which holds the kernel process.
        await (await self._api()).annotate(self.name, SIGNAL_ANNOTATION, f"{int(signum)}/{uuid.uuid4().hex}")

    async def kill(self, restart: bool = False) -> None:
        await self._delete_and_wait()

    async def terminate(self, restart: bool = False) -> None:
        await self._delete_and_wait()

    async def _delete_and_wait(self, timeout: float = 30.0) -> None:
        if not self._created:
            return
        kernels = await self._api()
        await kernels.delete(self.name)
        await kernels.watch_until(self.name, lambda obj: obj is None, timeout)
        self._created = False
        self._running_seen = None

    async def cleanup(self, restart: bool = False) -> None:
        await self._delete_and_wait()
        # Close even on restart: jupyter_client may hand the restart to a new provisioner.
        await self.close()

    async def close(self) -> None:
        """Release this process's API connection and leave the kernel running (detach)."""
        if self._kernels is not None and self._kernels_loop is asyncio.get_running_loop():
            await CONNECTIONS.release(self._kernels)
        self._kernels = None

    async def shutdown_requested(self, restart: bool = False) -> None:
        """Nothing to do: the kernel's shutdown_request ends it, and the operator sees that."""

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return recommended

    # -- persistence ---------------------------------------------------------------------------
    async def get_provisioner_info(self) -> dict[str, Any]:
        info: dict[str, Any] = await super().get_provisioner_info()
        connection = dict(info.get("connection_info") or {})
        for name in ("key", "curve_publickey", "curve_secretkey"):
            if isinstance(connection.get(name), bytes):
                connection[name] = connection[name].decode()
        info.update(
            connection_info=connection,
            namespace=self.namespace,
            resource=self.name,
            kubeconfig=self.kubeconfig,
            profile=self.profile,
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Re-attach from saved info; the kernel id (and namespace) alone suffice, the rest is
        read back from the RemoteKernel and its Secret."""
        self.kernel_id = provisioner_info["kernel_id"]
        self.connection_info = cast(KernelConnectionInfo, provisioner_info.get("connection_info") or {})
        self.namespace = provisioner_info.get("namespace", self.namespace)
        self.kubeconfig = provisioner_info.get("kubeconfig", self.kubeconfig)
        self.profile = provisioner_info.get("profile", self.profile)
        obj = await (await self._api()).get(self.name)
        if obj is None or (obj.get("status") or {}).get("phase") != RUNNING:
            raise KernelLaunchError(
                f"RemoteKernel {self.namespace}/{self.name} is not running; cannot re-attach."
            )
        self._created = True
        await self._load_connection(obj)


def _deleting(obj: dict[str, Any]) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


RUNNING_FRESH_SECONDS = 1.0  # the launch's Running answers poll() this long without a read
QUEUED_MAX_SECONDS = 600.0  # the longest a kernel may wait in the operator's queue (Pending)


def more_time(obj: dict[str, Any] | None, timeout: float, waited: float) -> float | None:
    """How much longer to wait for a kernel not settled after ``waited`` seconds (None: give up).

    The operator's launch deadline counts from when its launch begins, not from when the
    RemoteKernel was made: in a burst, kernels wait their turn in Pending
    (RKO_MAX_CONCURRENT_LAUNCHES). A kernel the operator queued or is launching is waited
    for (up to QUEUED_MAX_SECONDS in the queue, then ``timeout`` again: the operator ends
    the launch with a reason first); one the operator never took up is not."""
    phase = ((obj or {}).get("status") or {}).get("phase")
    if phase == "Pending" and waited < QUEUED_MAX_SECONDS:
        return timeout
    if phase == "Launching" and waited < QUEUED_MAX_SECONDS + timeout:
        return timeout
    return None


def _settled(obj: dict[str, Any] | None) -> bool:
    """Running with connection info, or ended; or gone."""
    if obj is None:
        return True
    status = obj.get("status") or {}
    phase = status.get("phase")
    return (phase == RUNNING and "connection" in status) or phase in (FAILED, SUCCEEDED)
