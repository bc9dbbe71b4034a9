"""Kernel requests for unit tests: a legacy all-in-one spec, split into profile and tenant spec."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kernel_operator.profiles import Profile
from kernel_operator.settings import OperatorSettings
from kernel_operator.spec import KernelRequest, build_request
from tests.profiles import split_spec


def profile_from(spec: Mapping[str, Any], name: str = "p") -> Profile:
    return Profile.from_object({"metadata": {"name": name}, "spec": dict(spec)})


def request_from(
    spec: Mapping[str, Any],
    settings: OperatorSettings | None = None,
    name: str = "k",
    uid: str = "uid",
    namespace: str = "ns",
) -> KernelRequest:
    """The request for ``spec`` (backend and its block as the profile's, the rest the tenant's)."""
    profile_spec, tenant = split_spec(spec)
    return build_request(
        namespace, name, uid, tenant, profile_from(profile_spec), settings or OperatorSettings.from_env({})
    )
