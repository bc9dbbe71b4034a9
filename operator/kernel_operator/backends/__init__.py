"""Backends: one module per kind of infrastructure, each behind the ``Backend`` interface.

Adding a backend is one module here, its tests, and its block in the CRD. Backends know
nothing of kopf or of the RemoteKernel resource; they launch, inspect and stop.
"""

from __future__ import annotations

from ..errors import SpecError
from ..kube import Kube
from ..settings import OperatorSettings
from .base import (
    Backend,
    BackendRef,
    BackendStatus,
    ClosingBackend,
    LaunchPlan,
    LoggingBackend,
    SignalingBackend,
)
from .custom_resource import CustomResourceBackend, SparkApplicationBackend
from .docker import DockerBackend
from .docker_swarm import DockerSwarmBackend
from .kubernetes import KubernetesBackend
from .ssh import SecretCredentials, SshBackend
from .yarn import YarnBackend

__all__ = [
    "Backend",
    "BackendRef",
    "BackendStatus",
    "Backends",
    "ClosingBackend",
    "LaunchPlan",
    "LoggingBackend",
    "SignalingBackend",
]


class Backends:
    """The backends this operator runs, created once at start-up."""

    def __init__(self, settings: OperatorSettings, kube: Kube) -> None:
        self._by_name: dict[str, Backend] = {
            "ssh": SshBackend(settings.ssh, SecretCredentials(kube, settings.namespace, settings.ssh.secret)),
            "kubernetes": KubernetesBackend(kube, settings),
            "docker": DockerBackend(settings.docker),
            "dockerSwarm": DockerSwarmBackend(settings.docker),
            "yarn": YarnBackend(settings.yarn),
            "customResource": CustomResourceBackend(kube, settings),
            "sparkApplication": SparkApplicationBackend(kube, settings),
        }

    async def aclose(self) -> None:
        """End every backend's background tasks (the operator stops; kernels run on)."""
        for backend in self._by_name.values():
            if isinstance(backend, ClosingBackend):
                await backend.aclose()

    def get(self, name: str) -> Backend:
        try:
            return self._by_name[name]
        except KeyError:
            raise SpecError(
                f"The {name!r} backend is not available in this operator yet; "
                f"available: {', '.join(sorted(self._by_name))}.",
                reason="BackendNotAvailable",
            ) from None
