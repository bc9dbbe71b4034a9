"""Where the operator's credentials for the Kubernetes API come from: the pod's ServiceAccount,
else a kubeconfig (``KUBECONFIG`` or ``~/.kube/config``), with exec credential plugins.

One source for both API clients in the process: kopf's (through a login handler) and ours
(``kube_http``). Reading happens here, at the edge; choosing among what was read is pure
(``from_kubeconfig``), so the rules are unit-tested without files or clusters.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import OperatorError

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
EXEC_TIMEOUT = 60.0


class CredentialsError(OperatorError):
    """No usable credentials for the Kubernetes API were found."""


@dataclass(frozen=True)
class Credentials:
    """How to reach and authenticate to the API server. PEM data, never paths: what was read
    stays what is used, even if a file is rotated underneath (a reload reads it again)."""

    server: str
    ca_pem: bytes | None = None
    insecure: bool = False
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    token: str | None = None
    username: str | None = None
    password: str | None = None
    namespace: str | None = None
    expires: datetime.datetime | None = None  # an exec plugin's token: load again after this


def load() -> Credentials:
    """In a pod, its ServiceAccount; elsewhere the kubeconfig. Blocking (files, a plugin)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(f"{SERVICE_ACCOUNT_DIR}/token"):
        return in_cluster(os.environ, SERVICE_ACCOUNT_DIR)
    return from_kubeconfig_files(_kubeconfig_paths(os.environ), _run_plugin)


def in_cluster(env: Mapping[str, str], directory: str) -> Credentials:
    host = env["KUBERNETES_SERVICE_HOST"]
    port = env.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:  # IPv6
        host = f"[{host}]"
    namespace = _read_text(f"{directory}/namespace") if os.path.exists(f"{directory}/namespace") else None
    return Credentials(
        server=f"https://{host}:{port}",
        ca_pem=_read_bytes(f"{directory}/ca.crt"),
        # Bound ServiceAccount tokens rotate: a 401 makes the client load them again.
        token=_read_text(f"{directory}/token").strip(),
        namespace=(namespace or "").strip() or None,
    )


def _kubeconfig_paths(env: Mapping[str, str]) -> list[str]:
    listed = [p.strip() for p in env.get("KUBECONFIG", "").split(os.pathsep) if p.strip()]
    if listed:
        return [os.path.expanduser(p) for p in listed]
    default = os.path.expanduser("~/.kube/config")
    if os.path.exists(default):
        return [default]
    raise CredentialsError(
        "No Kubernetes credentials: not in a pod with a ServiceAccount token, KUBECONFIG is not "
        "set and ~/.kube/config does not exist. Point KUBECONFIG at a kubeconfig file."
    )


def from_kubeconfig_files(
    paths: list[str], run_plugin: Callable[[Mapping[str, Any], str], Mapping[str, Any]]
) -> Credentials:
    docs: list[tuple[dict[str, Any], str]] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as err:
            raise CredentialsError(f"The kubeconfig {path} cannot be read: {err}") from err
        if not isinstance(doc, dict):
            raise CredentialsError(f"The kubeconfig {path} is not a mapping.")
        docs.append((doc, os.path.dirname(os.path.abspath(path))))
    return from_kubeconfig(docs, run_plugin)


def from_kubeconfig(
    docs: list[tuple[dict[str, Any], str]],
    run_plugin: Callable[[Mapping[str, Any], str], Mapping[str, Any]],
) -> Credentials:
    """The current context's credentials from kubeconfig documents (each with the folder its
    relative paths are relative to), merged as kubectl does: the first definition of a name wins."""
    current: str | None = None
    named: dict[str, dict[str, tuple[dict[str, Any], str]]] = {"contexts": {}, "clusters": {}, "users": {}}
    inner = {"contexts": "context", "clusters": "cluster", "users": "user"}
    for doc, base in docs:
        current = current or doc.get("current-context") or None
        for section, key in inner.items():
            for item in doc.get(section) or []:
                if isinstance(item, dict) and "name" in item:
                    named[section].setdefault(str(item["name"]), (dict(item.get(key) or {}), base))
    if not current:
        raise CredentialsError(
            "The kubeconfig sets no current-context; set one with kubectl config use-context."
        )
    if current not in named["contexts"]:
        raise CredentialsError(f"The kubeconfig's current-context {current!r} is not defined in it.")
    context, _ = named["contexts"][current]
    cluster_name, user_name = str(context.get("cluster", "")), str(context.get("user", ""))
    if cluster_name not in named["clusters"]:
        raise CredentialsError(
            f"Context {current!r} names cluster {cluster_name!r}, which the kubeconfig does not define."
        )
    cluster, cluster_base = named["clusters"][cluster_name]
    user, user_base = named["users"].get(user_name, ({}, ""))
    if not cluster.get("server"):
        raise CredentialsError(f"Cluster {cluster_name!r} in the kubeconfig has no server.")
    if user.get("auth-provider"):
        raise CredentialsError(
            f"User {user_name!r} in the kubeconfig uses an auth-provider, which is not supported; "
            "use a token, a client certificate or an exec credential plugin."
        )
    plugin: Mapping[str, Any] = {}
    if user.get("exec"):
        plugin = run_plugin(user["exec"], user_base)
    return Credentials(
        server=str(cluster["server"]).rstrip("/"),
        ca_pem=_pem(cluster, "certificate-authority", cluster_base),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        cert_pem=_plugin_pem(plugin, "clientCertificateData") or _pem(user, "client-certificate", user_base),
        key_pem=_plugin_pem(plugin, "clientKeyData") or _pem(user, "client-key", user_base),
        token=plugin.get("token") or user.get("token") or _token_file(user, user_base),
        username=user.get("username"),
        password=user.get("password"),
        namespace=context.get("namespace"),
        expires=_expiry(plugin.get("expirationTimestamp")),
    )


def _pem(section: Mapping[str, Any], key: str, base: str) -> bytes | None:
    """``key``-data (base64) or the file ``key`` names (relative to ``base``)."""
    data = section.get(f"{key}-data")
    if data:
        return base64.b64decode(str(data))
    path = section.get(key)
    return _read_bytes(os.path.join(base, os.path.expanduser(str(path)))) if path else None


def _plugin_pem(status: Mapping[str, Any], key: str) -> bytes | None:
    """PEM text from an exec plugin's ExecCredential status (not base64, unlike a kubeconfig)."""
    data = status.get(key)
    return str(data).encode() if data else None


def _token_file(user: Mapping[str, Any], base: str) -> str | None:
    path = user.get("tokenFile")
    return _read_text(os.path.join(base, os.path.expanduser(str(path)))).strip() if path else None


def _expiry(value: Any) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as err:
        raise CredentialsError(
            f"The credential plugin's expirationTimestamp {value!r} is not a time."
        ) from err


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise CredentialsError(f"{path}, named as a Kubernetes credential, cannot be read: {err}") from err


def _read_text(path: str) -> str:
    return _read_bytes(path).decode()


def _run_plugin(spec: Mapping[str, Any], base: str) -> Mapping[str, Any]:
    """An exec credential plugin's ExecCredential status (client.authentication.k8s.io)."""
    command = str(spec.get("command") or "")
    if not command:
        raise CredentialsError("The kubeconfig's exec credential plugin names no command.")
    if os.sep in command and not os.path.isabs(command):
        command = os.path.join(base, command)
    env = dict(os.environ)
    env.update({str(e["name"]): str(e["value"]) for e in spec.get("env") or [] if "name" in e})
    env["KUBERNETES_EXEC_INFO"] = json.dumps(
        {"apiVersion": spec.get("apiVersion"), "kind": "ExecCredential", "spec": {"interactive": False}}
    )
    try:
        done = subprocess.run(
            [command, *[str(a) for a in spec.get("args") or []]],
            env=env,
            capture_output=True,
            timeout=EXEC_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise CredentialsError(f"The kubeconfig's credential plugin {command} could not run: {err}") from err
    if done.returncode != 0:
        raise CredentialsError(
            f"The kubeconfig's credential plugin {command} failed ({done.returncode}): "
            f"{done.stderr.decode(errors='replace').strip()[:500]}"
        )
    try:
        status = json.loads(done.stdout)["status"]
    except (ValueError, KeyError, TypeError) as err:
        raise CredentialsError(
            f"The kubeconfig's credential plugin {command} printed no ExecCredential status."
        ) from err
    return dict(status)
