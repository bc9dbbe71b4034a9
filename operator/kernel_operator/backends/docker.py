"""The docker backend (gateway_provisioners' DockerProvisioner): a kernel in a container.

The container is described by the pure ``container_config`` and run through the docker SDK
(calls run in a thread: the SDK is synchronous). It carries labels with the kernel id, so a
restarted operator finds what it started; an image that is not on the engine fails at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from ..errors import BackendError, BackendUnavailable, SpecError
from ..launch_command import LAUNCHER_MODULE
from ..quantities import cpu_nanos, memory_bytes
from ..settings import DockerSettings
from ..spec import KernelRequest
from .base import BackendRef, BackendStatus, LaunchPlan, kernel_image

KERNEL_ID_LABEL = "kernel-operator.io/kernel-id"


def _user(request: KernelRequest) -> str | None:
    user = request.backend_config.get("user") or request.env.get("KERNEL_UID")
    if user is None or user == "":
        return None
    name = str(user).split(":", 1)[0]
    if name in ("0", "root"):
        raise SpecError(
            "Kernels may not run as root in containers (docker.user / KERNEL_UID).", reason="Unauthorized"
        )
    return str(user)


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
    request: KernelRequest, launcher_args: list[str], image: str, token: str, network: str
) -> dict[str, Any]:
    """Keyword arguments for ``containers.run``: data from the spec, never templated text."""
    env = dict(request.env)
    env["RKO_LAUNCH_TOKEN"] = token  # the launcher removes it before the kernel starts
    config: dict[str, Any] = {
        "image": image,
        "command": ["python", "-m", LAUNCHER_MODULE, *launcher_args],
        "environment": env,
        "labels": {
            KERNEL_ID_LABEL: request.kernel_id,
            "kernel-operator.io/namespace": request.namespace,
            "kernel-operator.io/name": request.name,
        },
        "name": f"k-{request.kernel_id}",
        "network_mode": network,
        "detach": True,
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
    }
    user = _user(request)
    if user:
        config["user"] = user
    working_dir = request.backend_config.get("workingDir") or request.env.get("KERNEL_WORKING_DIR")
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
                except (DockerException, OSError) as err:
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
        return await asyncio.to_thread(self._find, request.kernel_id)

    def _find(self, kernel_id: str) -> BackendRef | None:
        try:
            found = self.client().containers.list(
                all=True, filters={"label": f"{KERNEL_ID_LABEL}={kernel_id}"}
            )
        except (APIError, DockerException) as err:
            raise BackendUnavailable(f"The Docker engine at {self.settings.host} failed: {err}") from err
        return {"kind": "Container", "id": str(found[0].id), "name": found[0].name} if found else None

    # What differs between a container and a Swarm service: the kind, the config, the call.
    kind = "Container"

    def build_config(
        self, request: KernelRequest, launcher_args: list[str], image: str, token: str, network: str
    ) -> dict[str, Any]:
        return container_config(request, launcher_args, image, token, network)

    def start(self, engine: docker.DockerClient, config: dict[str, Any]) -> str:
        return str(engine.containers.run(**config).id)

    async def launch(self, plan: LaunchPlan) -> BackendRef:
        request = plan.request
        image = kernel_image(request, self.settings.kernel_image, self.name)
        network = str(request.backend_config.get("network") or self.settings.network)
        config = self.build_config(
            request, plan.launcher_args(self.settings.kernel_ip), image, plan.token, network
        )
        started_id = await asyncio.to_thread(self._start_checked, image, config)
        return {"kind": self.kind, "id": started_id, "name": config["name"]}

    def _start_checked(self, image: str, config: dict[str, Any]) -> str:
        engine = self.client()
        try:
            engine.images.get(image)
        except ImageNotFound:
            raise BackendError(
                f"The image {image!r} is not on the Docker engine at {self.settings.host}; build or load it "
                "there (the operator does not pull).",
                reason="ImageNotFound",
            ) from None
        except (APIError, DockerException) as err:
            raise BackendUnavailable(f"The Docker engine at {self.settings.host} failed: {err}") from err
        try:
            return self.start(engine, config)
        except (APIError, DockerException) as err:
            raise BackendError(
                f"The kernel's {self.kind.lower()} could not be started: {err}",
                reason=f"{self.kind}CreateFailed",
            ) from err

    async def status(self, ref: BackendRef) -> BackendStatus:
        return await asyncio.to_thread(self._status, str(ref["id"]))

    def _status(self, container_id: str) -> BackendStatus:
        try:
            container = self.client().containers.get(container_id)
        except NotFound:
            return container_state(None)
        except (APIError, DockerException) as err:
            raise BackendUnavailable(f"The Docker engine at {self.settings.host} failed: {err}") from err
        return container_state(container.attrs)

    async def stop(self, ref: BackendRef) -> None:
        await asyncio.to_thread(self._stop, str(ref["id"]))

    def _stop(self, container_id: str) -> None:
        try:
            container = self.client().containers.get(container_id)
            container.stop(timeout=self.settings.stop_timeout)
            container.remove(force=True)
        except NotFound:
            return
        except (APIError, DockerException) as err:
            raise BackendUnavailable(f"Stopping container {container_id[:12]} failed: {err}") from err
