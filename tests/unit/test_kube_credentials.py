"""Where the operator's API credentials come from (kube_auth), the REST paths it builds, and
that its process loads no generated Kubernetes client (kube_http speaks JSON itself)."""

from __future__ import annotations

import base64
import datetime
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from kernel_operator.kube import api_path
from kernel_operator.kube_auth import (
    Credentials,
    CredentialsError,
    _run_plugin,
    from_kubeconfig,
    from_kubeconfig_files,
    in_cluster,
)
from kernel_operator.kube_http import auth_headers, ssl_context

CA = b"-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n"


def no_plugin(spec: Mapping[str, Any], base: str) -> Mapping[str, Any]:
    raise AssertionError("no plugin is configured")


def config(current: str | None = "c", user: dict[str, Any] | None = None, **cluster: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "team"}}],
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443/", **cluster}}],
        "users": [{"name": "u", "user": user if user is not None else {"token": "t0"}}],
    }
    if current:
        doc["current-context"] = current
    return doc


def test_the_current_context_gives_server_namespace_token_and_decoded_data() -> None:
    doc = config(
        user={
            "client-certificate-data": base64.b64encode(b"CERT").decode(),
            "client-key-data": base64.b64encode(b"KEY").decode(),
        },
        **{"certificate-authority-data": base64.b64encode(CA).decode()},
    )
    creds = from_kubeconfig([(doc, "/nowhere")], no_plugin)
    assert creds.server == "https://127.0.0.1:6443"  # no trailing slash: paths start with one
    assert (creds.ca_pem, creds.cert_pem, creds.key_pem) == (CA, b"CERT", b"KEY")
    assert creds.namespace == "team" and creds.token is None and not creds.insecure


def test_merged_kubeconfigs_take_the_first_definition_of_each_name(tmp_path: Path) -> None:
    first = {"current-context": "c", "users": [{"name": "u", "user": {"token": "first"}}]}
    second = config(current="other", user={"token": "second"})
    paths = []
    for i, doc in enumerate((first, second)):
        path = tmp_path / f"k{i}"
        path.write_text(json.dumps(doc))
        paths.append(str(path))
    creds = from_kubeconfig_files(paths, no_plugin)
    assert creds.token == "first"
    assert creds.server == "https://127.0.0.1:6443"


def test_relative_files_are_read_from_the_kubeconfigs_folder(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(CA)
    (tmp_path / "token").write_text("from-a-file\n")
    doc = config(user={"tokenFile": "token"}, **{"certificate-authority": "ca.crt"})
    creds = from_kubeconfig([(doc, str(tmp_path))], no_plugin)
    assert creds.ca_pem == CA and creds.token == "from-a-file"


def test_an_exec_plugin_gives_the_token_and_its_expiry() -> None:
    seen: list[str] = []

    def plugin(spec: Mapping[str, Any], base: str) -> Mapping[str, Any]:
        seen.append(str(spec["command"]))
        return {"token": "short-lived", "expirationTimestamp": "2026-12-03T06:00:00Z"}

    creds = from_kubeconfig([(config(user={"exec": {"command": "get-token"}}), "/x")], plugin)
    assert seen == ["get-token"] and creds.token == "short-lived"
    assert creds.expires == datetime.datetime(2026, 12, 3, 6, tzinfo=datetime.timezone.utc)


def test_a_real_exec_plugin_runs_with_its_env_and_its_failure_is_explained(tmp_path: Path) -> None:
    script = tmp_path / "plugin.py"
    script.write_text(
        "import json, os, sys\n"
        "if os.environ.get('FAIL'): sys.exit('the identity provider said no')\n"
        "print(json.dumps({'status': {'token': os.environ['TOKEN']}}))\n"
    )
    spec = {"command": sys.executable, "args": [str(script)], "env": [{"name": "TOKEN", "value": "t1"}]}
    assert _run_plugin(spec, str(tmp_path))["token"] == "t1"
    spec["env"] = [{"name": "FAIL", "value": "1"}]
    with pytest.raises(CredentialsError, match=r"failed \(1\): the identity provider said no"):
        _run_plugin(spec, str(tmp_path))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (config(current=None), "sets no current-context"),
        (config(current="gone"), "current-context 'gone' is not defined"),
        ({**config(), "clusters": []}, "names cluster 'k', which the kubeconfig does not define"),
        (config(server=""), "has no server"),
        (config(user={"auth-provider": {"name": "gcp"}}), "auth-provider, which is not supported"),
        (config(user={"tokenFile": "/no/such/token"}), "/no/such/token, named as a Kubernetes credential"),
    ],
)
def test_a_bad_kubeconfig_is_refused_with_what_to_fix(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(CredentialsError, match=message):
        from_kubeconfig([(doc, "/")], no_plugin)


def test_an_unreadable_kubeconfig_is_named(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match=r"kubeconfig .*missing cannot be read"):
        from_kubeconfig_files([str(tmp_path / "missing")], no_plugin)


def test_in_a_pod_the_service_account_is_used(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token\n")
    (tmp_path / "ca.crt").write_bytes(CA)
    (tmp_path / "namespace").write_text("rko-system")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    creds = in_cluster(env, str(tmp_path))
    assert creds == Credentials(
        server="https://[fd00::1]:443", ca_pem=CA, token="sa-token", namespace="rko-system"
    )


def test_headers_and_tls_follow_the_credentials() -> None:
    assert auth_headers(Credentials("https://h", token="t")) == {"Authorization": "Bearer t"}
    basic = auth_headers(Credentials("https://h", username="a", password="b"))
    assert basic == {"Authorization": "Basic " + base64.b64encode(b"a:b").decode()}
    assert auth_headers(Credentials("https://h")) == {}
    assert ssl_context(Credentials("http://h")) is False
    assert ssl_context(Credentials("https://h", insecure=True)) is False
    with pytest.raises(ssl.SSLError):
        ssl_context(Credentials("https://h", ca_pem=b"garbage"))


def test_paths_of_core_group_namespaced_and_cluster_objects() -> None:
    assert api_path("", "v1", "pods", "ns") == "/api/v1/namespaces/ns/pods"
    assert api_path("", "v1", "nodes", None, "n1") == "/api/v1/nodes/n1"
    assert (
        api_path("kernel-operator.io", "v1alpha1", "remotekernels", "a", "k", "status")
        == "/apis/kernel-operator.io/v1alpha1/namespaces/a/remotekernels/k/status"
    )
    # A hostile name cannot leave its path segment.
    assert api_path("g", "v1", "things", "a", "../../x?y") == "/apis/g/v1/namespaces/a/things/..%2F..%2Fx%3Fy"


def test_the_operator_process_loads_no_generated_kubernetes_client() -> None:
    code = (
        "import sys\n"
        "from kernel_operator.__main__ import skip_unused_clients\n"
        "skip_unused_clients()\n"
        "import kopf, kernel_operator.handlers, kernel_operator.runtime\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'kubernetes_asyncio', 'pykube')"
        " and sys.modules[m] is not None))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
