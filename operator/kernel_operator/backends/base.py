"""The interface every backend implements. No kopf, no Kubernetes resource handling here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from ..errors import SpecError
from ..launch_command import launcher_args
from ..spec import KernelRequest

BackendRef = dict[str, Any]  # JSON-able; stored as status.backendRef
State = Literal["starting", "running", "succeeded", "failed", "gone"]


@dataclass(frozen=True)
class LaunchPlan:
    """What a backend needs to start a launcher for one kernel."""

    request: KernelRequest
    response_address: str
    public_key: bytes
    token: str  # single-use; a backend delivers it without putting it on a command line
    run_dir: str
    owner: dict[str, Any] | None = None  # an ownerReference to the RemoteKernel

    def launcher_args(self, ip: str) -> list[str]:
        """The launcher's arguments (without the interpreter) for a kernel bound to ``ip``."""
        return launcher_args(self.request, self.response_address, self.public_key, ip, self.run_dir)


def kernel_image(request: KernelRequest, default: str, backend: str) -> str:
    """The image a container backend runs: the request's (spec.image or KERNEL_IMAGE, checked
    against the profile, else the profile's image), then the operator's RKO_KERNEL_IMAGE."""
    image = request.image or default
    if not image:
        raise SpecError(
            f"The {backend} backend needs an image: the profile's image, spec.image among the "
            "profile's images, or the operator's RKO_KERNEL_IMAGE.",
            reason="ImageMissing",
        )
    return image


@dataclass(frozen=True)
class BackendStatus:
    """What a backend reports about a kernel it started."""

    state: State
    reason: str = ""
    message: str = ""
    exit_code: int | None = None


class Backend(Protocol):
    """Launch, inspect and stop kernels on one kind of infrastructure."""

    name: str

    async def launch(self, plan: LaunchPlan) -> BackendRef:
        """Start the launcher; return how to find what was started. Raises BackendError."""
        ...

    async def status(self, ref: BackendRef) -> BackendStatus:
        """The current state of what ``launch`` started."""
        ...

    async def stop(self, ref: BackendRef, owner: str) -> None:
        """Stop everything ``launch`` started; idempotent, no error if already gone.

        ``ref`` comes from status; ``owner`` is the RemoteKernel's uid. Only what carries that
        uid (a label, a tag, a run directory named after it) is stopped, so a ref that was
        tampered with cannot make the operator delete or kill anything else.
        """
        ...

    def release(self, ref: BackendRef) -> None:
        """Forget bookkeeping for a stopped kernel (e.g. least-connection counts)."""
        ...

    def adopt(self, ref: BackendRef) -> None:
        """Take back bookkeeping for a kernel found running after an operator restart."""
        ...

    async def find(self, request: KernelRequest) -> BackendRef | None:
        """What was started for this kernel, found by its labels or name; None if nothing.

        Used when a launch was made but not recorded (the operator stopped in between).
        """
        ...


@runtime_checkable
class SignalingBackend(Protocol):
    """A backend that can signal a kernel's process without its launcher (e.g. over ssh)."""

    name: str

    async def signal(self, ref: BackendRef, signum: int, owner: str) -> None:
        """Send ``signum`` to the kernel's process, only if it is RemoteKernel ``owner``'s (as
        ``Backend.stop``). Raises BackendError if it cannot."""
        ...


@runtime_checkable
class ClosingBackend(Protocol):
    """A backend with background tasks of its own (a watch, reapers of child processes)."""

    name: str

    async def aclose(self) -> None:
        """End those tasks as the operator stops (the kernels run on): kopf otherwise waits
        5 s for them on every stop, then cancels them."""
        ...


@runtime_checkable
class LoggingBackend(Protocol):
    """A backend that can show the end of a launcher's log (quoted when a launch fails)."""

    name: str

    async def log_tail(self, ref: BackendRef, owner: str) -> str:
        """The last lines the launcher of RemoteKernel ``owner`` wrote; "" if unknown."""
        ...
