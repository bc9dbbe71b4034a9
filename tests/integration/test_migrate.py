"""`remote-kernel-spec migrate` on what gateway_provisioners 0.5.0's own installers write (PyPI,
in a venv of its own), every installer and backend it has; then kernels started from the
migrated kernelspecs, under the profiles the command wrote, on the real servers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from jupyter_client.manager import AsyncKernelManager
from kubernetes import client

from localcluster.servers import OperatorProcess
from remote_kernel_provisioner.cli import main as spec_cli
from tests.profiles import apply_profile

from .test_operator_ssh import get, ready_client

pytestmark = pytest.mark.timeout(600)


def migrate_all(
    source: Path, out: Path, monkeypatch: pytest.MonkeyPatch, *options: str
) -> tuple[int, list[dict[str, Any]], str]:
    monkeypatch.setenv("JUPYTER_PATH", str(source))
    profiles = out / "profiles.yaml"
    code = spec_cli(["migrate", "--all", "--prefix", str(out), "--write-profiles", str(profiles), *options])
    return code, list(yaml.safe_load_all(profiles.read_text())) if profiles.exists() else [], str(out)


def kernelspec(out: Path, name: str) -> dict[str, Any]:
    return dict(json.loads((out / "share" / "jupyter" / "kernels" / name / "kernel.json").read_text()))


def test_every_gateway_provisioners_installer_output_is_migrated_or_refused_with_a_reason(
    gp_kernelspecs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, profiles, _ = migrate_all(gp_kernelspecs, tmp_path, monkeypatch)
    printed = capsys.readouterr()
    assert code == 0, printed
    backends = {p["metadata"]["name"]: p["spec"]["backend"] for p in profiles}
    assert backends == {
        "gp-docker-py": "docker",
        "gp-k8s-py": "kubernetes",
        "gp-k8s-scala": "kubernetes",
        "gp-k8s-spark-crd": "sparkApplication",
        "gp-ssh-py": "ssh",
        "gp-swarm-py": "dockerSwarm",
        "gp-yarn-spark": "yarn",
        "gp-yarn-scala": "yarn",  # 0.5.0 left its template unfilled: migrated as what it meant
    }
    # What cannot work here is said, with why; nothing is silently lost.
    assert "the installer left its template unfilled" in printed.out
    assert "not carried over: SPARK_OPTS options the operator sets itself" in printed.out
    for name in backends:
        spec = kernelspec(tmp_path, name.replace("-", "_"))
        assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "remote-kernel"
        assert "${" not in json.dumps(spec)
    ssh = next(p for p in profiles if p["metadata"]["name"] == "gp-ssh-py")["spec"]
    assert ssh["ssh"] == {"hosts": ["127.0.0.1"]} and ssh["users"] == {"authorized": ["alice"]}


async def test_kernels_start_from_migrated_ssh_pod_and_docker_kernelspecs(
    gp_kernelspecs: Path,
    operator: OperatorProcess,
    node_images: Callable[[str], str],
    kernel_image: str,
    custom: client.CustomObjectsApi,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node_images(kernel_image)  # the pod's image, in the node's containerd
    code, profiles, _ = migrate_all(gp_kernelspecs, tmp_path, monkeypatch, "--namespace", namespace)
    assert code == 0
    for profile in profiles:  # as the administrator applies them
        apply_profile(custom.api_client, profile["metadata"]["name"], profile["spec"], False)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    for name in ("gp_ssh_py", "gp_k8s_py", "gp_docker_py"):
        km = AsyncKernelManager(kernel_name=name)
        await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": "alice"})
        try:
            rk = get(custom, namespace, f"k-{km.kernel_id}")
            assert rk is not None and rk["spec"]["profile"] == name.replace("_", "-")
            async with ready_client(km, timeout=60) as kc:
                reply = await kc.execute_interactive(
                    "import os; print(6 * 7, os.environ['KERNEL_USERNAME'])", timeout=60
                )
                assert reply["content"]["status"] == "ok"
            print(f"{name}: a kernel from the migrated kernelspec ran code ({rk['status']['backend']})")
        finally:
            await km.shutdown_kernel(now=True)
        assert get(custom, namespace, f"k-{km.kernel_id}") is None
