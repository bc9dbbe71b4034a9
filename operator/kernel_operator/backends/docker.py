"""The docker backend (gateway_provisioners' DockerProvisioner): a kernel in a container.

The container is described by the pure ``container_config`` and run through the docker SDK
(calls run in a thread: the SDK is synchronous). It carries labels with the kernel id and the
RemoteKernel's uid, so a restarted operator finds what it started and stops nothing else; an
image that is not on the engine fails at once. It always runs as a non-root user, with every
capability dropped and no-new-privileges, and mounts only what the profile lists. The launch
token is copied into the created container as a 0400 file before it starts: never in its
environment, where ``docker inspect`` would show it.
"""

from __future__ import annotations

import contextlib
import io
import re
import tarfile
import threading
from collections.abc import Mapping
from typing import Any

import docker
from docker.errors import DockerException, ImageNotFound, NotFound

from .. import UID_LABEL
from ..errors import BackendError, BackendUnavailable, SpecError
from ..launch_command import LAUNCHER_MODULE
from ..quantities import cpu_nanos, memory_bytes
from ..settings import DockerSettings
from ..spec import KernelRequest
from .base import BackendRef, BackendStatus, LaunchPlan, kernel_image
from .batching import Batcher
from .blocking import BlockingPool

KERNEL_ID_LABEL = "kernel-operator.io/kernel-id"
DEFAULT_USER = "1000:1000"  # kernels never run as the image's user, which may be root
TOKEN_DIR = "/tmp"
TOKEN_FILE = "rko-launch-token"
DOCKER_THREADS = 16  # docker-py's blocking calls, apart from other backends'
# The engine's answers (DockerException) and the engine out of reach: requests' errors, which
# docker-py lets through, are OSErrors.
ENGINE_ERRORS: tuple[type[Exception], ...] = (DockerException, OSError)
_USER = re.compile(r"^([0-9]+)(?::([0-9]+))?$")


def container_user(request: KernelRequest) -> tuple[int, int]:
    """uid and gid the kernel runs as: the profile's docker.user (never the spec's, never 0)."""
    user = str(request.backend_config.get("user") or DEFAULT_USER)
    match = _USER.match(user)
    if not match:
        raise SpecError(
            f"Profile {request.profile}'s docker.user {user!r} is not uid[:gid] in numbers.",
            reason="ProfileInvalid",
        )
    uid = int(match.group(1))
    gid = int(match.group(2) if match.group(2) is not None else uid)
    if uid == 0:
        raise SpecError(
            f"Profile {request.profile} runs kernels as root (docker.user {user}); kernels in containers "
            "never run as root: its administrator must choose another uid.",
            reason="Unauthorized",
        )
    return uid, gid


def token_archive(token: str, uid: int, gid: int) -> bytes:
    """A tar holding the launch token as a 0400 file owned by the kernel's user."""
    data = token.encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(TOKEN_FILE)
        info.size, info.mode, info.uid, info.gid = len(data), 0o400, uid, gid
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _mounts(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    mounts = []
    for mount in config.get("mounts") or []:
        kind = mount.get("type", "volume")
        target = str(mount.get("target", ""))
        if not target.startswith("/"):
            raise SpecError(f"docker.mounts target {target!r} must be an absolute path.")
        if kind == "bind" and not str(mount.get("source", "")).startswith("/"):
            raise SpecError(f"docker.mounts bind source {mount.get('source')!r} must be an absolute path.")
        mounts.append(
            {
                "Type": kind,
                "Source": mount.get("source") or None,
                "Target": target,
                "ReadOnly": bool(mount.get("readOnly")),
            }
        )
    return mounts


def container_config(
    request: KernelRequest, launcher_args: list[str], image: str, token_file: str, network: str
) -> dict[str, Any]:
    """Keyword arguments for ``containers.create``: data from the request, never templated text.

    The launcher reads its token from ``token_file``, put there by the backend (not the env).
    """
    uid, gid = container_user(request)
    config: dict[str, Any] = {
        "image": image,
        "command": ["python", "-m", LAUNCHER_MODULE, *launcher_args, "--token-file", token_file],
        "environment": dict(request.env),
        "labels": {
            KERNEL_ID_LABEL: request.kernel_id,
            UID_LABEL: request.uid,
            "kernel-operator.io/namespace": request.namespace,
            "kernel-operator.io/name": request.name,
        },
        "name": f"k-{request.kernel_id}",
        "network_mode": network,
        "user": f"{uid}:{gid}",
        "privileged": False,
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
    }
    working_dir = request.env.get("KERNEL_WORKING_DIR") or request.backend_config.get("workingDir")
    if working_dir:
        config["working_dir"] = str(working_dir)
    if request.resources.get("cpu") is not None:
        config["nano_cpus"] = cpu_nanos(request.resources["cpu"])
    if request.resources.get("memory") is not None:
        config["mem_limit"] = memory_bytes(request.resources["memory"])
    mounts = _mounts(request.backend_config)
    if mounts:
        config["mounts"] = [
            docker.types.Mount(m["Target"], m["Source"], type=m["Type"], read_only=m["ReadOnly"])
            for m in mounts
        ]
    return config


def container_state(attrs: Mapping[str, Any] | None) -> BackendStatus:
    """A container's engine state as the kernel's state."""
    if attrs is None:
        return BackendStatus("gone", "ContainerGone", "The kernel's container was removed.")
    state = attrs.get("State") or {}
    status = state.get("Status", "")
    name = str(attrs.get("Name", "")).lstrip("/")
    if status in ("created", "restarting"):
        return BackendStatus("starting")
    if status in ("running", "paused"):
        return BackendStatus("running")
    code = int(state.get("ExitCode", -1))
    message = state.get("Error") or ""
    if status == "exited" and code == 0:
        return BackendStatus(
            "succeeded", "KernelExited", f"The kernel's container {name} exited normally.", 0
        )
    detail = f": {message}" if message else ""
    return BackendStatus(
        "failed",
        "ContainerFailed",
        f"The kernel's container {name} is {status} with exit code {code}{detail}.",
        code,
    )


class DockerBackend:
    name = "docker"

    def __init__(self, settings: DockerSettings) -> None:
        self.settings = settings
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()
        self._threads = BlockingPool(self.name, DOCKER_THREADS)
        self._statuses: Batcher[str, str, BackendStatus] = Batcher(self._status_batch)

    def client(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                tls: bool | docker.tls.TLSConfig = False
                if self.settings.tls_verify:
                    cert = self.settings.cert_path
                    tls = docker.tls.TLSConfig(
                        client_cert=(f"{cert}/cert.pem", f"{cert}/key.pem"),
                        ca_cert=f"{cert}/ca.pem",
                        verify=True,
                    )
                try:
                    # A fixed API version: "auto" would query the engine before trust_env can be
                    # turned off, and requests lets REQUESTS_CA_BUNDLE override the engine's CA.
                    client = docker.DockerClient(
                        base_url=self.settings.host, tls=tls, timeout=30, version=self.settings.api_version
                    )
                    client.api.trust_env = False
                    client.api.version()  # fail here, with a clear message, if it cannot be reached
                except ENGINE_ERRORS as err:
                    raise BackendUnavailable(
                        f"Cannot reach the Docker engine at {self.settings.host}: {err}"
                    ) from err
                self._client = client
            return self._client

    def adopt(self, ref: BackendRef) -> None:
        """Nothing to rebuild: the containers' labels are the record."""

    def release(self, ref: BackendRef) -> None:
        """Nothing to release."""

    async def find(self, request: KernelRequest) -> BackendRef | None:
        return await self._threads.run(self._find, request.uid)

    def _find(self, owner: str) -> BackendRef | None:
        try:
            found = self.client().containers.list(
                ignore_removed=True, all=True, filters={"label": f"{UID_LABEL}={owner}"}
            )
        except ENGINE_ERRORS as err:
            raise BackendUnavailable(f"The Docker engine at {self.settings.host} failed: {err}") from err
        return {"kind": "Container", "id": str(found[0].id), "name": found[0].name} if found else None

    # What differs between a container and a Swarm service: the kind, the config, the call.
    kind = "Container"

    def build_config(
        self, request: KernelRequest, launcher_args: list[str], image: str, network: str
    ) -> dict[str, Any]:
        return container_config(request, launcher_args, image, f"{TOKEN_DIR}/{TOKEN_FILE}", network)

    def start(self, engine: docker.DockerClient, config: dict[str, Any], plan: LaunchPlan) -> str:
        """Create the container, copy the token in, then start it (the token is never in its spec)."""
        container = engine.containers.create(**config)
        try:
            uid, gid = container_user(plan.request)
            if not container.put_archive(TOKEN_DIR, token_archive(plan.token, uid, gid)):
                raise BackendError("The Docker engine refused to copy the launch token into the container.")
            container.start()
        except BaseException:
            with contextlib.suppress(*ENGINE_ERRORS):  # else the owner's deletion finds it by label
                container.remove(force=True)
            raise
        return str(container.id)

    async def launch(self, plan: LaunchPlan) -> BackendRef:
        request = plan.request
        image = kernel_image(request, self.settings.kernel_image, self.name)
        network = str(request.backend_config.get("network") or self.settings.network)
        config = self.build_config(request, plan.launcher_args(self.settings.kernel_ip), image, network)
        started_id = await self._threads.run(self._start_checked, image, config, plan)
        return {"kind": self.kind, "id": started_id, "name": config["name"]}

    def _start_checked(self, image: str, config: dict[str, Any], plan: LaunchPlan) -> str:
        engine = self.client()
        try:
            engine.images.get(image)
        except ImageNotFound:
            raise BackendError(
                f"The image {image!r} is not on the Docker engine at {self.settings.host}; build or load it "
                "there (the operator does not pull).",
                reason="ImageNotFound",
            ) from None
        except ENGINE_ERRORS as err:
            raise BackendUnavailable(f"The Docker engine at {self.settings.host} failed: {err}") from err
        try:
            return self.start(engine, config, plan)
        except OSError as err:  # a restarting engine: what it created is found and removed by uid
            raise BackendUnavailable(
                f"The Docker engine at {self.settings.host} went out of reach while starting the kernel's "
                f"{self.kind.lower()}: {err}"
            ) from err
        except DockerException as err:
            raise BackendError(
                f"The kernel's {self.kind.lower()} could not be started: {err}",
                reason=f"{self.kind}CreateFailed",
            ) from err

    async def status(self, ref: BackendRef) -> BackendStatus:
        # Every kernel asking meanwhile is answered by one listing of the engine's containers.
        return await self._statuses.ask(self.settings.host, str(ref["id"]))

    async def _status_batch(self, host: str, ids: list[str]) -> list[BackendStatus]:
        return await self._threads.run(self._statuses_of, ids)

    def _statuses_of(self, ids: list[str]) -> list[BackendStatus]:
        """One list call for the running ones; only a container that is not running is
        inspected (for its exit code)."""
        try:
            listed = self.client().api.containers(all=True, filters={"label": UID_LABEL})
        except ENGINE_ERRORS as err:
            raise BackendUnavailable(f"The Docker engine at {self.settings.host} failed: {err}") from err
        states = {str(c.get("Id")): str(c.get("State") or "") for c in listed}
        answers = []
        for container_id in ids:
            # Records hold the full id; a short one (an older record) is matched by prefix.
            state = states.get(container_id)
            if state is None and len(container_id) < 64:
                state = next((v for k, v in states.items() if k.startswith(container_id)), None)
            if state in ("running", "paused", "created", "restarting"):
                answers.append(container_state({"State": {"Status": state}}))
            else:
                answers.append(self._status(container_id))
        return answers

    def _status(self, container_id: str) -> BackendStatus:
        try:
            container = self.client().containers.get(container_id)
        except NotFound:
            return container_state(None)
        except ENGINE_ERRORS as err:
            raise BackendUnavailable(f"The Docker engine at {self.settings.host} failed: {err}") from err
        return container_state(container.attrs)

    async def stop(self, ref: BackendRef, owner: str) -> None:
        await self._threads.run(self._stop, str(ref["id"]), owner)

    def _stop(self, container_id: str, owner: str) -> None:
        try:
            container = self.client().containers.get(container_id)
            if (container.labels or {}).get(UID_LABEL) != owner:
                return  # not this kernel's: status named something else
            container.stop(timeout=self.settings.stop_timeout)
            container.remove(force=True)
        except NotFound:
            return
        except ENGINE_ERRORS as err:
            raise BackendUnavailable(f"Stopping container {container_id[:12]} failed: {err}") from err
