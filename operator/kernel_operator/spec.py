"""Validation of a RemoteKernel's spec into a KernelRequest. Pure: no I/O, no kopf."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kernel_launchers.ports import PortRangeError, parse_port_range
from kernel_launchers.protocol import ProtocolError, canonical_kernel_id

from .errors import SpecError
from .settings import ENCRYPTION_POLICIES, OperatorSettings

BACKENDS = (
    "kubernetes",
    "sparkApplication",
    "customResource",
    "docker",
    "dockerSwarm",
    "yarn",
    "ssh",
)
LAUNCHER_LANGUAGES = ("python", "r")  # kernels the launcher starts: ipykernel, IRkernel
# Set by the operator from the spec; a user value that disagrees is an error, not an override.
RESERVED_ENV = ("KERNEL_ID", "KERNEL_USERNAME", "KERNEL_LANGUAGE")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A POSIX account name as useradd accepts it: what a kernel may run as when impersonating.
_ACCOUNT = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


@dataclass(frozen=True)
class KernelRequest:
    """A checked request to run one kernel, with the operator's defaults applied."""

    kernel_id: str
    namespace: str
    name: str
    uid: str
    username: str
    backend: str
    language: str
    class_name: str | None
    image: str | None
    env: dict[str, str]
    port_range: tuple[int, int]
    port_range_text: str
    transport_encryption: str
    launch_timeout: float
    idle_timeout: float
    backend_config: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    run_as: str | None = None  # the account the kernel runs as (impersonation), else the backend's
    executor_image: str | None = None  # Spark executors (sparkApplication)


def impersonated_account(
    username: str, backend_config: Mapping[str, Any], settings: OperatorSettings
) -> str | None:
    """The account to run the kernel as, or None; the seed's GP_IMPERSONATION_ENABLED.

    The operator's setting decides, not the spec: with impersonation on, every kernel runs as
    its user (no opting out into the operator's account); with it off, a spec cannot ask for it.
    """
    if not settings.impersonation:
        if backend_config.get("impersonate"):
            raise SpecError(
                "The spec asks for impersonation, but this operator does not impersonate "
                "(RKO_IMPERSONATION is off); ask its administrator, or drop 'impersonate'.",
                reason="ImpersonationDisabled",
            )
        return None
    if not _ACCOUNT.match(username):
        raise SpecError(
            f"User {username!r} cannot be impersonated: not a valid account name "
            "(letters, digits, '_', '.', '-'; at most 32).",
            reason="ImpersonationRefused",
        )
    if username == "root":
        raise SpecError(
            "Kernels never run as root: impersonating 'root' is refused.", reason="ImpersonationRefused"
        )
    return username


def check_user(username: str, settings: OperatorSettings) -> None:
    """The seed's rule: unauthorized users win; a non-empty authorized list must match."""
    if username in settings.unauthorized_users:
        raise SpecError(
            f"User {username!r} is not allowed to launch kernels (listed in RKO_UNAUTHORIZED_USERS).",
            reason="Unauthorized",
        )
    if settings.authorized_users and username not in settings.authorized_users:
        raise SpecError(
            f"User {username!r} is not in RKO_AUTHORIZED_USERS, so may not launch kernels.",
            reason="Unauthorized",
        )


def _env(spec: Mapping[str, Any], kernel_id: str, username: str, language: str) -> dict[str, str]:
    raw = spec.get("env") or {}
    if not isinstance(raw, Mapping):
        raise SpecError("spec.env must be a map of names to strings.")
    env: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise SpecError(f"spec.env name {name!r} is not a valid environment variable name.")
        if name.startswith("RKO_"):
            raise SpecError(f"spec.env may not set {name}: RKO_* variables belong to the operator.")
        if not isinstance(value, str):
            raise SpecError(f"spec.env[{name!r}] must be a string.")
        env[name] = value
    expected = {"KERNEL_ID": kernel_id, "KERNEL_USERNAME": username, "KERNEL_LANGUAGE": language}
    for name in RESERVED_ENV:
        if name in env and env[name] != expected[name]:
            raise SpecError(
                f"spec.env {name}={env[name]!r} disagrees with the spec ({expected[name]!r}); "
                "remove it from env, the operator sets it."
            )
    env.update(expected)
    return env


def build_request(
    namespace: str, name: str, uid: str, spec: Mapping[str, Any], settings: OperatorSettings
) -> KernelRequest:
    """Check ``spec`` against the schema's intent and the operator's policy."""
    try:
        kernel_id = canonical_kernel_id(str(spec.get("kernelId", "")))
    except ProtocolError as err:
        raise SpecError(f"spec.kernelId: {err}") from err
    backend = spec.get("backend")
    if backend not in BACKENDS:
        raise SpecError(f"spec.backend {backend!r} is not one of {', '.join(BACKENDS)}.")
    username = str(spec.get("username") or "")
    if not username:
        raise SpecError("spec.username is required: it is KERNEL_USERNAME, checked before launch.")
    check_user(username, settings)
    kernel = spec.get("kernel") or {}
    language = str(kernel.get("language") or "python").lower()
    if language not in LAUNCHER_LANGUAGES:
        raise SpecError(
            f"spec.kernel.language {language!r} has no launcher yet; use one of {', '.join(LAUNCHER_LANGUAGES)}.",
            reason="LanguageNotSupported",
        )
    port_text = spec.get("portRange")
    if port_text is None:
        port_range, port_range_text = settings.port_range, settings.port_range_text
    else:
        try:
            port_range, port_range_text = parse_port_range(str(port_text)), str(port_text)
        except PortRangeError as err:
            raise SpecError(f"spec.portRange: {err}", reason="InvalidPortRange") from err
    encryption = str(spec.get("transportEncryption") or settings.transport_encryption)
    if encryption not in ENCRYPTION_POLICIES:
        raise SpecError(f"spec.transportEncryption {encryption!r} is not one of {ENCRYPTION_POLICIES}.")
    timeout = spec.get("launchTimeoutSeconds")
    launch_timeout = float(timeout) if timeout is not None else settings.launch_timeout
    if launch_timeout <= 0:
        raise SpecError("spec.launchTimeoutSeconds must be positive.")
    backend_config = dict(spec.get(str(backend)) or {})
    return KernelRequest(
        kernel_id=kernel_id,
        namespace=namespace,
        name=name,
        uid=uid,
        username=username,
        backend=str(backend),
        language=language,
        class_name=kernel.get("className") or None,
        image=spec.get("image") or None,
        env=_env(spec, kernel_id, username, language),
        port_range=port_range,
        port_range_text=port_range_text,
        transport_encryption=encryption,
        launch_timeout=launch_timeout,
        idle_timeout=float(spec.get("idleTimeoutSeconds") or 0),
        backend_config=backend_config,
        resources=dict(spec.get("resources") or {}),
        run_as=impersonated_account(username, backend_config, settings),
        executor_image=spec.get("executorImage") or None,
    )
