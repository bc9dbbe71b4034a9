"""Validation of a RemoteKernel's spec, under its profile, into a KernelRequest. Pure: no I/O.

The spec is a tenant's: every value in it (and every KERNEL_* variable) is checked against what
the profile leaves open. What is privileged comes from the profile (the administrator's) or the
operator's settings, never from the spec.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kernel_launchers.ports import PortRangeError, parse_port_range
from kernel_launchers.protocol import ProtocolError, canonical_kernel_id
from kernel_launchers.sealed_connection import SealError, parse_public_key

from .errors import SpecError
from .profiles import Profile, name_allowed
from .quantities import cpu_nanos, memory_bytes
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
LAUNCHER_LANGUAGES = ("python", "r", "scala")  # kernels the launcher starts: ipykernel, IRkernel, Toree
# Backends that run Scala (Toree) kernels: the launcher beside Spark on a host or in an image.
SCALA_BACKENDS = ("ssh", "kubernetes", "docker", "dockerSwarm", "yarn")
# Set by the operator from the spec; a user value that disagrees is an error, not an override.
RESERVED_ENV = ("KERNEL_ID", "KERNEL_USERNAME", "KERNEL_LANGUAGE")
# The username of pool members that serve every user: their identity is bound at claim.
POOL_USERNAME = "system:kernel-operator:pool"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A POSIX account name as useradd accepts it: what a kernel may run as when impersonating.
_ACCOUNT = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_CLASS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# What a tenant may set in the block of each backend; the rest of a block is the profile's.
TENANT_FIELDS: dict[str, tuple[str, ...]] = {
    "ssh": ("hosts", "loadBalancing"),
    "yarn": ("queue", "nodeLabel", "sparkOpts", "driverMemory", "executorMemory", "sparkInitMode"),
}


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
    profile: str = ""
    # The tenant's own choices for the backend (TENANT_FIELDS), already checked against the profile;
    # ``backend_config`` is the profile's block, the administrator's.
    tenant_config: dict[str, Any] = field(default_factory=dict)


def _check_client_public_key(spec: Mapping[str, Any]) -> None:
    """spec.clientPublicKey, if any, is a key the connection can be sealed to at Running (the
    lifecycle reads it from the spec then: a launch may be resumed by another operator)."""
    text = spec.get("clientPublicKey")
    if text is None:
        return
    try:
        parse_public_key(text)
    except SealError as err:
        raise SpecError(f"{err} Leave it out to read the key from the kernel's Secret.") from err


def impersonated_account(username: str, profile: Profile, settings: OperatorSettings) -> str | None:
    """The account to run the kernel as, or None; the seed's GP_IMPERSONATION_ENABLED.

    The administrator decides (the profile's ``impersonation``, or RKO_IMPERSONATION for every
    profile), never the spec: with it on, every kernel runs as its user.
    """
    if not (settings.impersonation or profile.backend_config.get("impersonation")):
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


def check_user(username: str, settings: OperatorSettings, profile: Profile) -> None:
    """The seed's rule, for the operator's lists and then the profile's: unauthorized users win;
    a non-empty authorized list must match."""
    for where, unauthorized, authorized in (
        (
            "RKO_UNAUTHORIZED_USERS / RKO_AUTHORIZED_USERS",
            settings.unauthorized_users,
            settings.authorized_users,
        ),
        (f"profile {profile.name}'s users", profile.unauthorized_users, profile.authorized_users),
    ):
        if username in unauthorized:
            raise SpecError(
                f"User {username!r} is not allowed to launch kernels (unauthorized in {where}).",
                reason="Unauthorized",
            )
        if authorized and username not in authorized:
            raise SpecError(
                f"User {username!r} is not among the authorized users of {where}, so may not launch kernels.",
                reason="Unauthorized",
            )


def _env(
    spec: Mapping[str, Any], kernel_id: str, username: str, language: str, profile: Profile
) -> dict[str, str]:
    raw = spec.get("env") or {}
    if not isinstance(raw, Mapping):
        raise SpecError("spec.env must be a map of names to strings.")
    env: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise SpecError(f"spec.env name {name!r} is not a valid environment variable name.")
        if name.startswith("RKO_"):
            raise SpecError(f"spec.env may not set {name}: RKO_* variables belong to the operator.")
        if not name.startswith("KERNEL_") and not name_allowed(name, profile.env_allowed):
            raise SpecError(
                f"spec.env may not set {name}: profile {profile.name} allows KERNEL_* variables"
                + (f" and {', '.join(profile.env_allowed)}" if profile.env_allowed else "")
                + "; ask its administrator to add the name to spec.env.allowed.",
                reason="EnvNotAllowed",
            )
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
    env.update(profile.env_values)  # the administrator's values win
    env.update(expected)
    return env


def image_allowed(image: str, profile: Profile) -> bool:
    return image == profile.image or name_allowed(image, profile.images)


def _image(requested: str | None, field_name: str, profile: Profile, default: str | None) -> str | None:
    """An image the tenant asked for, if the profile allows it; else the default."""
    if not requested:
        return default
    if not image_allowed(requested, profile):
        allowed = ", ".join(filter(None, (profile.image, *profile.images))) or "none"
        raise SpecError(
            f"{field_name} {requested!r} is not an image profile {profile.name} allows (allowed: "
            f"{allowed}); ask its administrator to add it to spec.images.",
            reason="ImageNotAllowed",
        )
    return requested


_RESOURCE_MEASURES: dict[str, Callable[[Any], int]] = {"cpu": cpu_nanos, "memory": memory_bytes, "gpus": int}


def _resources(spec: Mapping[str, Any], profile: Profile) -> dict[str, Any]:
    resources = dict(profile.defaults.get("resources") or {})
    resources.update({k: v for k, v in (spec.get("resources") or {}).items() if v is not None})
    for key, measure in _RESOURCE_MEASURES.items():
        limit = profile.maxima.get(key)
        if limit is None or resources.get(key) is None:
            continue
        try:
            too_much = measure(resources[key]) > measure(limit)
        except ValueError as err:
            raise SpecError(f"spec.resources.{key} {resources[key]!r} is not a quantity.") from err
        if too_much:
            raise SpecError(
                f"spec.resources.{key} {resources[key]} is more than profile {profile.name} allows ({limit}).",
                reason="ExceedsProfile",
            )
    return resources


def _port_range(
    spec: Mapping[str, Any], profile: Profile, settings: OperatorSettings
) -> tuple[tuple[int, int], str]:
    bound_text = str(profile.defaults.get("portRange") or settings.port_range_text)
    try:
        bound = parse_port_range(bound_text)
    except PortRangeError as err:
        raise SpecError(
            f"Profile {profile.name}'s defaults.portRange: {err}", reason="ProfileInvalid"
        ) from err
    text = spec.get("portRange")
    if text is None:
        return bound, bound_text
    try:
        wanted = parse_port_range(str(text))
    except PortRangeError as err:
        raise SpecError(f"spec.portRange: {err}", reason="InvalidPortRange") from err
    if bound != (0, 0) and (wanted == (0, 0) or wanted[0] < bound[0] or wanted[1] > bound[1]):
        raise SpecError(
            f"spec.portRange {text} is not within profile {profile.name}'s range {bound_text}.",
            reason="InvalidPortRange",
        )
    return wanted, str(text)


def _timeouts(spec: Mapping[str, Any], profile: Profile, settings: OperatorSettings) -> tuple[float, float]:
    launch = spec.get("launchTimeoutSeconds") or profile.defaults.get("launchTimeoutSeconds")
    launch_timeout = float(launch) if launch is not None else settings.launch_timeout
    if launch_timeout <= 0:
        raise SpecError("spec.launchTimeoutSeconds must be positive.")
    idle = spec.get("idleTimeoutSeconds")
    idle_timeout = float(idle if idle is not None else profile.defaults.get("idleTimeoutSeconds") or 0)
    max_launch = profile.maxima.get("launchTimeoutSeconds")
    if max_launch is not None and launch_timeout > float(max_launch):
        raise SpecError(
            f"spec.launchTimeoutSeconds {launch_timeout:g} is more than profile {profile.name} allows "
            f"({max_launch}).",
            reason="ExceedsProfile",
        )
    max_idle = profile.maxima.get("idleTimeoutSeconds")
    if max_idle is not None and not 0 < idle_timeout <= float(max_idle):
        raise SpecError(
            f"spec.idleTimeoutSeconds {idle_timeout:g} is not allowed: profile {profile.name} culls idle "
            f"kernels within {max_idle} s (0, never, is not allowed either).",
            reason="ExceedsProfile",
        )
    return launch_timeout, idle_timeout


def _encryption(spec: Mapping[str, Any], profile: Profile, settings: OperatorSettings) -> str:
    encryption = str(
        spec.get("transportEncryption")
        or profile.defaults.get("transportEncryption")
        or settings.transport_encryption
    )
    if encryption not in ENCRYPTION_POLICIES:
        raise SpecError(f"spec.transportEncryption {encryption!r} is not one of {ENCRYPTION_POLICIES}.")
    if profile.require_encryption and encryption != "required":
        raise SpecError(
            f"Profile {profile.name} requires transport encryption: set spec.transportEncryption to "
            "'required' (CurveZMQ).",
            reason="EncryptionRequired",
        )
    return encryption


def _tenant_config(spec: Mapping[str, Any], profile: Profile) -> dict[str, Any]:
    """The tenant's block for this backend: only the fields it may set."""
    for block in TENANT_FIELDS:
        if spec.get(block) and block != profile.backend:
            raise SpecError(
                f"spec.{block} is set, but profile {profile.name} runs kernels on the {profile.backend} "
                f"backend; remove spec.{block} or choose a {block} profile.",
                reason="InvalidSpec",
            )
    given = dict(spec.get(profile.backend) or {})
    extra = sorted(set(given) - set(TENANT_FIELDS.get(profile.backend, ())))
    if extra:
        raise SpecError(
            f"spec.{profile.backend} may not set {', '.join(extra)}: profile {profile.name} decides it.",
            reason="InvalidSpec",
        )
    return given


def build_request(
    namespace: str,
    name: str,
    uid: str,
    spec: Mapping[str, Any],
    profile: Profile,
    settings: OperatorSettings,
    pool_member: bool = False,
) -> KernelRequest:
    """Check ``spec`` against the schema's intent, its profile and the operator's policy.

    ``pool_member``: the spec is a sealed pool member's (the operator's own), whose placeholder
    user is checked at claim, as the claimer."""
    try:
        kernel_id = canonical_kernel_id(str(spec.get("kernelId", "")))
    except ProtocolError as err:
        raise SpecError(f"spec.kernelId: {err}") from err
    username = str(spec.get("username") or "")
    if not username:
        raise SpecError("spec.username is required: it is KERNEL_USERNAME, checked before launch.")
    if not (pool_member and username == POOL_USERNAME):
        check_user(username, settings, profile)
    kernel = spec.get("kernel") or {}
    language = str(kernel.get("language") or "python").lower()
    if language not in LAUNCHER_LANGUAGES:
        raise SpecError(
            f"spec.kernel.language {language!r} has no launcher yet; use one of {', '.join(LAUNCHER_LANGUAGES)}.",
            reason="LanguageNotSupported",
        )
    if language == "scala" and profile.backend not in SCALA_BACKENDS:
        raise SpecError(
            f"Scala kernels run on the {', '.join(SCALA_BACKENDS)} backends, not {profile.backend} "
            f"(profile {profile.name}); pick a profile on one of those.",
            reason="LanguageNotSupported",
        )
    if profile.languages and language not in profile.languages:
        raise SpecError(
            f"Profile {profile.name} runs {', '.join(profile.languages)} kernels, not {language}.",
            reason="LanguageNotSupported",
        )
    class_name = kernel.get("className") or None
    if class_name is not None and not _CLASS_NAME.match(str(class_name)):
        raise SpecError(f"spec.kernel.className {class_name!r} is not a dotted Python name.")
    port_range, port_range_text = _port_range(spec, profile, settings)
    launch_timeout, idle_timeout = _timeouts(spec, profile, settings)
    env = _env(spec, kernel_id, username, language, profile)
    _check_client_public_key(spec)
    image = _image(spec.get("image") or env.get("KERNEL_IMAGE"), "spec.image", profile, profile.image or None)
    executor_image = _image(
        spec.get("executorImage") or env.get("KERNEL_EXECUTOR_IMAGE"), "spec.executorImage", profile, None
    )
    return KernelRequest(
        kernel_id=kernel_id,
        namespace=namespace,
        name=name,
        uid=uid,
        username=username,
        backend=profile.backend,
        language=language,
        class_name=class_name,
        image=image,
        env=env,
        port_range=port_range,
        port_range_text=port_range_text,
        transport_encryption=_encryption(spec, profile, settings),
        launch_timeout=launch_timeout,
        idle_timeout=idle_timeout,
        backend_config=dict(profile.backend_config),
        resources=_resources(spec, profile),
        run_as=impersonated_account(username, profile, settings),
        executor_image=executor_image,
        profile=profile.name,
        tenant_config=_tenant_config(spec, profile),
    )
