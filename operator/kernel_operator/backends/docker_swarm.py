"""The dockerSwarm backend (gateway_provisioners' DockerSwarmProvisioner): a kernel as a service.

One replica, never restarted by Swarm (the operator decides what a dead kernel means), on the
network the profile names (default: host). The service is described by the pure
``service_config``; its newest task's state becomes the kernel's state. The launch token is a
Swarm secret mounted into the task (0400, the kernel's user), never in the service's spec;
it is removed with the service.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import docker
from docker.errors import NotFound

from .. import UID_LABEL
from ..errors import BackendUnavailable
from ..spec import KernelRequest
from .base import BackendRef, BackendStatus, LaunchPlan
from .docker import ENGINE_ERRORS, TOKEN_FILE, DockerBackend, container_config, container_user

SECRETS_DIR = "/run/secrets"

STARTING = {"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting"}


def secret_name(request: KernelRequest) -> str:
    return f"rko-token-{request.uid}"


def service_config(
    request: KernelRequest, launcher_args: list[str], image: str, network: str
) -> dict[str, Any]:
    """Keyword arguments for ``services.create``, from the same checked data as a container
    (the token secret's reference is added at launch, once the secret exists)."""
    container = container_config(request, launcher_args, image, f"{SECRETS_DIR}/{TOKEN_FILE}", network)
    config: dict[str, Any] = {
        "image": image,
        "command": container["command"],
        "env": [f"{name}={value}" for name, value in sorted(container["environment"].items())],
        "name": container["name"],
        "labels": container["labels"],
        "container_labels": container["labels"],
        "networks": [network],
        "restart_policy": docker.types.RestartPolicy(condition="none"),
        "cap_drop": ["ALL"],
    }
    if "user" in container:
        config["user"] = container["user"]
    if "working_dir" in container:
        config["workdir"] = container["working_dir"]
    if "nano_cpus" in container or "mem_limit" in container:
        config["resources"] = docker.types.Resources(
            cpu_limit=container.get("nano_cpus"), mem_limit=container.get("mem_limit")
        )
    if "mounts" in container:
        config["mounts"] = container["mounts"]
    return config


def task_state(tasks: Sequence[Mapping[str, Any]] | None) -> BackendStatus:
    """The newest task's state as the kernel's state (None: the service is gone)."""
    if tasks is None:
        return BackendStatus("gone", "ServiceGone", "The kernel's Swarm service was removed.")
    if not tasks:
        return BackendStatus("starting")
    newest = max(tasks, key=lambda t: str(t.get("CreatedAt", "")))
    status = newest.get("Status") or {}
    state = str(status.get("State", "new"))
    if state in STARTING:
        return BackendStatus("starting")
    if state == "running":
        return BackendStatus("running")
    code = (status.get("ContainerStatus") or {}).get("ExitCode")
    if state == "complete":
        return BackendStatus("succeeded", "KernelExited", "The kernel's Swarm task completed.", 0)
    detail = status.get("Err") or status.get("Message") or state
    return BackendStatus(
        "failed", "TaskFailed", f"The kernel's Swarm task is {state}: {detail} (exit code {code}).", code
    )


class DockerSwarmBackend(DockerBackend):
    name = "dockerSwarm"

    kind = "Service"

    def build_config(
        self, request: KernelRequest, launcher_args: list[str], image: str, network: str
    ) -> dict[str, Any]:
        return service_config(request, launcher_args, image, network)

    def start(self, engine: docker.DockerClient, config: dict[str, Any], plan: LaunchPlan) -> str:
        """Store the token as a Swarm secret for this kernel, then create the service using it."""
        request = plan.request
        uid, gid = container_user(request)
        secrets: Any = engine.secrets  # the SDK's stubs leave these calls untyped
        services: Any = engine.services
        name = secret_name(request)
        for old in secrets.list(filters={"name": name}):  # a launch retried after a crash
            old.remove()
        secret = secrets.create(name=name, data=plan.token.encode(), labels={UID_LABEL: request.uid})
        reference = docker.types.SecretReference(
            secret.id, name, filename=TOKEN_FILE, uid=str(uid), gid=str(gid), mode=0o400
        )
        try:
            return str(services.create(**config, secrets=[reference]).id)
        except BaseException:
            with contextlib.suppress(*ENGINE_ERRORS):  # else the owner's deletion finds it by label
                secret.remove()
            raise

    def _find(self, owner: str) -> BackendRef | None:
        services: Any = self.client().services
        try:
            found = services.list(filters={"label": f"{UID_LABEL}={owner}"})
        except ENGINE_ERRORS as err:
            raise BackendUnavailable(f"The Docker engine at {self.settings.host} failed: {err}") from err
        return {"kind": "Service", "id": str(found[0].id), "name": found[0].name} if found else None

    def _status(self, service_id: str) -> BackendStatus:
        services: Any = self.client().services
        try:
            return task_state(services.get(service_id).tasks())
        except NotFound:
            return task_state(None)
        except ENGINE_ERRORS as err:
            raise BackendUnavailable(f"The Docker engine at {self.settings.host} failed: {err}") from err

    def _stop(self, service_id: str, owner: str) -> None:
        engine = self.client()
        services: Any = engine.services
        secrets: Any = engine.secrets
        try:
            with contextlib.suppress(NotFound):
                service = services.get(service_id)
                if (service.attrs.get("Spec", {}).get("Labels") or {}).get(UID_LABEL) == owner:
                    service.remove()
            # Removable once no service uses it; only this kernel's, found by its label.
            for secret in secrets.list(filters={"label": f"{UID_LABEL}={owner}"}):
                with contextlib.suppress(NotFound):
                    secret.remove()
        except ENGINE_ERRORS as err:
            raise BackendUnavailable(f"Removing service {service_id[:12]} failed: {err}") from err
