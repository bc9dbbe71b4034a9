"""The kernelspec installer: what it writes, where, and that it writes only what it was given."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from traitlets.config import Config

from remote_kernel_provisioner.cli import main
from remote_kernel_provisioner.kernelspec import (
    SpecOptionError,
    SpecOptions,
    bootstrap_script,
    build_kernelspec,
)


def install(tmp_path: Path, *args: str) -> dict:  # type: ignore[type-arg]
    assert main(["install", "--prefix", str(tmp_path), *args]) == 0
    specs = list((tmp_path / "share" / "jupyter" / "kernels").iterdir())
    assert len(specs) == 1
    return json.loads((specs[0] / "kernel.json").read_text())  # type: ignore[no-any-return]


def config_of(spec: dict) -> dict:  # type: ignore[type-arg]
    return spec["metadata"]["kernel_provisioner"]["config"]  # type: ignore[no-any-return]


def test_only_the_options_given_are_written(tmp_path: Path) -> None:
    spec = install(tmp_path, "--backend", "kubernetes")
    # No launch_timeout, port range or user lists: the server's and operator's settings apply.
    assert config_of(spec) == {"backend": "kubernetes"}
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "remote-kernel"
    assert spec["language"] == "python" and spec["interrupt_mode"] == "message"
    assert spec["metadata"]["supported_encryption"] == ["curve"]


def test_every_seed_option_lands_in_the_provisioner_config(tmp_path: Path) -> None:
    spec = install(
        tmp_path,
        "--backend", "ssh",
        "--kernel-name", "ssh_py",
        "--display-name", "Python on the pool",
        "--remote-hosts", "node1,node2",
        "--remote-hosts", "node3",
        "--load-balancing-algorithm", "least-connection",
        "--authorized-users", "alice",
        "--authorized-users", "bob",
        "--unauthorized-users", "root,admin",
        "--port-range", "40000..41999",
        "--launch-timeout", "45",
        "--idle-timeout", "600",
        "--transport-encryption", "required",
        "--namespace", "jupyter",
        "--operator-class", "hosts",
        "--ipykernel-subclass-name", "my.Kernel",
        "--backend-config", "workingDir=/srv",
        "--env", "FOO=bar",
    )  # fmt: skip
    assert config_of(spec) == {
        "backend": "ssh",
        "remote_hosts": ["node1", "node2", "node3"],
        "load_balancing_algorithm": "least-connection",
        "authorized_users": ["alice", "bob"],
        "unauthorized_users": ["root", "admin"],
        "port_range": "40000..41999",
        "launch_timeout": 45,
        "idle_timeout": 600,
        "transport_encryption": "required",
        "namespace": "jupyter",
        "operator_class": "hosts",
        "kernel_class_name": "my.Kernel",
        "backend_config": {"workingDir": "/srv"},
    }
    assert spec["display_name"] == "Python on the pool" and spec["env"] == {"FOO": "bar"}


def test_container_yarn_and_swarm_options(tmp_path: Path) -> None:
    docker = build_kernelspec(SpecOptions(backend="dockerSwarm", image_name="k:1"))
    assert config_of(docker) == {"backend": "dockerSwarm", "image_name": "k:1"}
    swarm = install(tmp_path, "--backend", "docker", "--swarm", "--image-name", "k:1")
    assert config_of(swarm)["backend"] == "dockerSwarm"
    yarn = install(
        tmp_path / "y", "--profile", "spark-yarn", "--backend", "yarn", "--extra-spark-opts", "--conf a=b",
    )  # fmt: skip
    assert config_of(yarn)["profile"] == "spark-yarn"
    assert config_of(yarn)["backend_config"] == {"sparkOpts": "--conf a=b"}


def test_a_kernelspec_names_a_profile_and_needs_no_backend(tmp_path: Path) -> None:
    spec = install(tmp_path, "--profile", "python-pods", "--image-name", "k:1")
    assert config_of(spec) == {"profile": "python-pods", "image_name": "k:1"}
    assert (tmp_path / "share" / "jupyter" / "kernels" / "remote_python-pods_python").is_dir()
    with pytest.raises(SpecOptionError, match="not a RemoteKernelProfile name"):
        build_kernelspec(SpecOptions(profile="Bad Name"))
    with pytest.raises(SpecOptionError, match="ssh or yarn"):
        build_kernelspec(SpecOptions(profile="p", backend_config={"queue": "q"}))


def test_an_r_kernelspec_is_interrupted_by_signal_and_declares_no_curve(tmp_path: Path) -> None:
    spec = install(tmp_path, "--backend", "kubernetes", "--language", "R", "--image-name", "rko-kernel-r:x")
    assert spec["language"] == "R" and spec["interrupt_mode"] == "signal"
    assert "supported_encryption" not in spec["metadata"]
    assert spec["argv"][-2:] == ["--kernel-language", "r"]
    assert (tmp_path / "share" / "jupyter" / "kernels" / "remote_kubernetes_r").is_dir()


def test_a_scala_kernelspec_runs_toree_is_interrupted_by_signal_and_declares_no_curve(tmp_path: Path) -> None:
    spec = install(tmp_path, "--profile", "scala-ssh", "--language", "scala")
    assert spec["language"] == "scala" and spec["interrupt_mode"] == "signal"
    assert spec["display_name"] == "Scala on scala-ssh (remote)"
    assert "supported_encryption" not in spec["metadata"] and "debugger" not in spec["metadata"]
    assert spec["argv"][-2:] == ["--kernel-language", "scala"]


def test_an_existing_kernelspec_needs_replace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    install(tmp_path, "--backend", "kubernetes", "--launch-timeout", "10")
    assert main(["install", "--prefix", str(tmp_path), "--backend", "kubernetes"]) == 2
    assert "--replace" in capsys.readouterr().err
    assert main(["install", "--prefix", str(tmp_path), "--backend", "kubernetes", "--replace"]) == 0
    spec = json.loads(
        (tmp_path / "share" / "jupyter" / "kernels" / "remote_kubernetes_python" / "kernel.json").read_text()
    )
    assert "launch_timeout" not in config_of(spec)


def test_user_and_sys_prefix_install_where_jupyter_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    assert main(["install", "--user", "--backend", "docker", "--kernel-name", "mine"]) == 0
    assert (tmp_path / "data" / "kernels" / "mine" / "kernel.json").exists()
    specs = KernelSpecManager().find_kernel_specs()
    assert specs["mine"] == str(tmp_path / "data" / "kernels" / "mine")
    with pytest.raises(SystemExit):  # --user and --sys-prefix together
        main(["install", "--user", "--sys-prefix"])


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (SpecOptions(backend="mesos"), "--backend 'mesos'"),
        (SpecOptions(backend="ssh", language="julia"), "python, r or scala"),
        (SpecOptions(backend="sparkApplication", language="scala"), "Scala kernels run on the ssh"),
        (SpecOptions(backend="ssh", language="scala", transport_encryption="required"), "Apache Toree"),
        (SpecOptions(backend="ssh", kernel_name="a b"), "--kernel-name"),
        (SpecOptions(backend="ssh", port_range="1-2"), "lower..upper"),
        (SpecOptions(backend="ssh", port_range="40000..40010"), "at least 1000"),
        (SpecOptions(backend="ssh", launch_timeout=0), "positive"),
        (SpecOptions(backend="ssh", transport_encryption="maybe"), "disabled, auto, required"),
        (SpecOptions(backend="ssh", language="r", transport_encryption="required"), "IRkernel"),
        (SpecOptions(backend="kubernetes", remote_hosts=["a"]), "ssh backend only"),
        (SpecOptions(backend="ssh", image_name="x"), "container backends"),
    ],
)
def test_bad_options_are_refused_with_what_to_do(options: SpecOptions, words: str) -> None:
    with pytest.raises(SpecOptionError, match=words):
        build_kernelspec(options)


def test_a_bad_option_on_the_command_line_exits_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["install", "--prefix", str(tmp_path), "--backend", "nowhere"]) == 2
    assert "--backend 'nowhere'" in capsys.readouterr().err
    assert not (tmp_path / "share").exists()


def test_the_servers_configuration_applies_where_the_kernelspec_is_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed's defect: its installers write defaults that then beat the server's settings."""
    install(tmp_path, "--backend", "ssh", "--kernel-name", "quiet")
    install(tmp_path / "loud", "--backend", "ssh", "--kernel-name", "loud", "--launch-timeout", "7")
    monkeypatch.setenv("JUPYTER_PATH", f"{tmp_path}/share/jupyter:{tmp_path}/loud/share/jupyter")
    server_config = Config(
        {"RemoteKernelProvisioner": {"launch_timeout": 99.0, "port_range": "50000..50999"}}
    )
    for name, timeout in (("quiet", 99.0), ("loud", 7.0)):
        km = KernelManager(kernel_name=name, config=server_config)
        provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
            "00000000-0000-0000-0000-000000000000", km.kernel_spec, parent=km
        )
        assert provisioner.launch_timeout == timeout  # type: ignore[attr-defined]
        assert provisioner.port_range == "50000..50999"  # type: ignore[attr-defined]


def test_the_bootstrap_script_runs_our_launcher(tmp_path: Path) -> None:
    assert main(["bootstrap", "--dest", str(tmp_path), "--python", "/opt/kernel/bin/python"]) == 0
    script = tmp_path / "bootstrap-kernel.sh"
    assert script.stat().st_mode & 0o111
    assert script.read_text() == bootstrap_script("/opt/kernel/bin/python")
    assert "-m kernel_launchers.python_launcher" in script.read_text()


def test_it_is_also_a_jupyter_subcommand(tmp_path: Path) -> None:
    jupyter = Path(sys.executable).with_name("jupyter")
    assert shutil.which("jupyter-remote-kernel-spec", path=str(jupyter.parent))
    result = subprocess.run(
        [str(jupyter), "remote-kernel-spec", "install", "--prefix", str(tmp_path), "--backend", "docker"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{jupyter.parent}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "share" / "jupyter" / "kernels" / "remote_docker_python" / "kernel.json").exists()
