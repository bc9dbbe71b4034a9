"""RemoteKernelProfiles: the administrator's kinds of kernel. Pure: no I/O, no kopf.

A profile holds everything privileged (backend, namespace, identity, volumes, hosts, endpoints,
templates) and says what a RemoteKernel naming it may choose. ``Profile.from_object`` reads one
from its API object; ``pick_profile`` chooses the one a RemoteKernel runs under (named, else the
one annotated as the default); ``namespace_selected`` applies its namespace selector.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError

PROFILE_PLURAL = "remotekernelprofiles"
PROFILE_KIND = "RemoteKernelProfile"
# The IngressClass convention: one profile annotated "true" serves RemoteKernels naming none.
DEFAULT_ANNOTATION = "kernel-operator.io/is-default-profile"
BACKEND_BLOCKS = ("kubernetes", "sparkApplication", "customResource", "docker", "dockerSwarm", "yarn", "ssh")


@dataclass(frozen=True)
class Profile:
    """One RemoteKernelProfile's spec, as the operator uses it."""

    name: str
    backend: str
    backend_config: dict[str, Any] = field(default_factory=dict)  # the backend's block: the admin's
    namespace_selector: dict[str, Any] | None = None
    authorized_users: tuple[str, ...] = ()
    unauthorized_users: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    image: str = ""
    env_allowed: tuple[str, ...] = ()
    env_values: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    maxima: dict[str, Any] = field(default_factory=dict)
    require_encryption: bool = False

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> Profile:
        name = str((obj.get("metadata") or {}).get("name") or "")
        spec = obj.get("spec") or {}
        backend = str(spec.get("backend") or "")
        if backend not in BACKEND_BLOCKS:
            raise SpecError(
                f"RemoteKernelProfile {name} names no known backend ({backend!r}); its administrator "
                f"must set spec.backend to one of {', '.join(BACKEND_BLOCKS)}.",
                reason="ProfileInvalid",
            )
        users = spec.get("users") or {}
        env = spec.get("env") or {}
        # dockerSwarm shares the docker block: the same container settings.
        block = "docker" if backend == "dockerSwarm" else backend
        return cls(
            name=name,
            backend=backend,
            backend_config=dict(spec.get(block) or {}),
            namespace_selector=spec.get("namespaceSelector"),
            authorized_users=tuple(str(u) for u in users.get("authorized") or ()),
            unauthorized_users=tuple(str(u) for u in users.get("unauthorized") or ()),
            languages=tuple(str(x) for x in spec.get("languages") or ()),
            images=tuple(str(i) for i in spec.get("images") or ()),
            image=str(spec.get("image") or ""),
            env_allowed=tuple(str(n) for n in env.get("allowed") or ()),
            env_values={str(k): str(v) for k, v in (env.get("values") or {}).items()},
            defaults=dict(spec.get("defaults") or {}),
            maxima=dict(spec.get("maxima") or {}),
            require_encryption=bool(spec.get("requireTransportEncryption")),
        )


def is_default(obj: Mapping[str, Any]) -> bool:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(DEFAULT_ANNOTATION, "")).lower() == "true"


def pick_profile(requested: str, objects: Iterable[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The profile object a RemoteKernel runs under: the one it names, else the default."""
    found = list(objects)
    if requested:
        for obj in found:
            if (obj.get("metadata") or {}).get("name") == requested:
                return obj
        raise SpecError(
            f"RemoteKernelProfile {requested!r} does not exist; ask an administrator which profiles "
            "there are (kubectl get rkprofile).",
            reason="ProfileNotFound",
        )
    defaults = [obj for obj in found if is_default(obj)]
    if len(defaults) == 1:
        return defaults[0]
    if not defaults:
        raise SpecError(
            "spec.profile is empty and no RemoteKernelProfile is the default; name one in spec.profile "
            f"(kubectl get rkprofile), or an administrator annotates one {DEFAULT_ANNOTATION}=true.",
            reason="ProfileNotFound",
        )
    names = ", ".join(sorted(str((o.get("metadata") or {}).get("name")) for o in defaults))
    raise SpecError(
        f"Several RemoteKernelProfiles are marked default ({names}); name one in spec.profile, or an "
        f"administrator keeps {DEFAULT_ANNOTATION}=true on only one.",
        reason="ProfileAmbiguous",
    )


def _expression_holds(expression: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key = str(expression.get("key"))
    operator = expression.get("operator")
    values = [str(v) for v in expression.get("values") or ()]
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    return False  # an unknown operator selects nothing: fail closed


def namespace_selected(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a namespace with ``labels`` matches a LabelSelector (None selects every one)."""
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(str(key)) != str(value):
            return False
    return all(_expression_holds(e, labels) for e in selector.get("matchExpressions") or ())


def name_allowed(name: str, allowed: Sequence[str]) -> bool:
    """``name`` equals an entry, or starts with an entry ending in '*'."""
    return any(name == entry or (entry.endswith("*") and name.startswith(entry[:-1])) for entry in allowed)
