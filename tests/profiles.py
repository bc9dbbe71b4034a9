"""Profiles for tests: what an administrator would write for what a test wants to run.

Tests describe a kernel the way they read best, in one mapping (``backend``, its block, an
image); ``split_spec`` hands the privileged part to a RemoteKernelProfile and leaves the tenant
only what a tenant may set. Integration tests create that profile as the administrator does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from kubernetes import client

from localcluster.crds import apply_profile

# What a tenant may set in each backend's block (the rest is the profile's).
TENANT_FIELDS = {
    "ssh": ("hosts", "loadBalancing"),
    "yarn": ("queue", "nodeLabel", "sparkOpts", "driverMemory", "executorMemory", "sparkInitMode"),
}
ADMIN_BLOCKS = ("kubernetes", "docker", "customResource", "sparkApplication")
# Top-level keys of a test's spec that are the profile's (policy, not a tenant's choice).
PROFILE_KEYS = (
    "namespaceSelector",
    "users",
    "languages",
    "images",
    "defaults",
    "maxima",
    "requireTransportEncryption",
)


def split_spec(spec: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(profile spec, RemoteKernel spec) for a legacy all-in-one spec."""
    tenant = {
        k: v for k, v in spec.items() if k not in ("backend", *ADMIN_BLOCKS, *PROFILE_KEYS, "ssh", "yarn")
    }
    backend = str(spec.get("backend") or "ssh")
    profile: dict[str, Any] = {"backend": backend, **{k: spec[k] for k in PROFILE_KEYS if k in spec}}
    block = "docker" if backend == "dockerSwarm" else backend
    for name in ADMIN_BLOCKS:
        if spec.get(name):
            profile[name] = dict(spec[name])
    for name, fields in TENANT_FIELDS.items():
        given = dict(spec.get(name) or {})
        mine = {k: v for k, v in given.items() if k in fields}
        theirs = {k: v for k, v in given.items() if k not in fields}
        if "impersonate" in theirs:
            theirs["impersonation"] = theirs.pop("impersonate")
        if "profileHosts" in theirs:  # a test's way to give the profile other hosts than it picks
            theirs["hosts"] = theirs.pop("profileHosts")
        if mine:
            tenant[name] = mine
        if theirs:
            profile.setdefault(name, {}).update(theirs)
    queue = (tenant.get("yarn") or {}).get("queue")
    if queue:
        profile.setdefault("yarn", {}).setdefault("queues", [queue])  # the queue it would allow
    hosts = (tenant.get("ssh") or {}).get("hosts")
    if hosts and not (profile.get("ssh") or {}).get("hosts"):
        profile.setdefault("ssh", {})["hosts"] = list(hosts)  # the hosts an administrator would list
    if block != backend and profile.get(backend):
        profile[block] = profile.pop(backend)
    names = [str(n) for n in spec.get("env") or {} if not str(n).startswith("KERNEL_")]
    if names:
        profile["env"] = {"allowed": names}  # the test's own variables: its profile allows them
    images = [str(spec[k]) for k in ("image", "executorImage") if spec.get(k)]
    if images:
        profile["images"] = [*profile.get("images", []), *images]
    return profile, tenant


def profile_name(profile_spec: Mapping[str, Any]) -> str:
    """A stable name per profile content, so tests asking for the same profile share it."""
    digest = hashlib.sha256(json.dumps(profile_spec, sort_keys=True).encode()).hexdigest()[:10]
    return f"t-{profile_spec.get('backend', 'x').lower()}-{digest}"


def ensure_profile(
    api_client: client.ApiClient,
    profile_spec: Mapping[str, Any],
    name: str | None = None,
    default: bool = False,
) -> str:
    """Create (or replace) a RemoteKernelProfile as the administrator; returns its name."""
    name = name or profile_name(profile_spec)
    apply_profile(api_client, name, profile_spec, default)
    return name


def tenant_spec(api_client: client.ApiClient, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The RemoteKernel spec for a legacy all-in-one ``spec``, its profile created."""
    profile, tenant = split_spec(spec)
    tenant["profile"] = ensure_profile(api_client, profile)
    return tenant


def kernelspec_config(api_client: client.ApiClient, config: Mapping[str, Any]) -> dict[str, Any]:
    """A provisioner config naming a profile, for a legacy one that named a backend and its block."""
    out = {k: v for k, v in config.items() if k not in ("backend", "backend_config", "executor_image_name")}
    backend = str(config.get("backend") or "ssh")
    legacy: dict[str, Any] = {"backend": backend, backend: dict(config.get("backend_config") or {})}
    for key, field in (("image_name", "image"), ("executor_image_name", "executorImage")):
        if config.get(key):
            legacy[field] = config[key]
    profile, tenant = split_spec(legacy)
    if config.get("env_passthrough"):
        profile["env"] = {"allowed": list(config["env_passthrough"])}
    out["profile"] = ensure_profile(api_client, profile)
    if config.get("executor_image_name"):
        out["executor_image_name"] = config["executor_image_name"]
    block = tenant.get(backend)
    if block:
        out["backend"], out["backend_config"] = backend, block
    return out
