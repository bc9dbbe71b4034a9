"""`remote-kernel-spec migrate`: gateway_provisioners' real installers' kernel.json files (see
gp_kernelspecs/README.md) and Enterprise Gateway's, translated; and the command around it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from remote_kernel_provisioner.cli import main
from remote_kernel_provisioner.migrate import MigrationError, migrate_kernelspec

GP = Path(__file__).with_name("gp_kernelspecs")


def gp(name: str) -> dict[str, Any]:
    return dict(json.loads((GP / f"{name}.json").read_text()))


def config_of(spec: dict[str, Any]) -> dict[str, Any]:
    provisioner = spec["metadata"]["kernel_provisioner"]
    assert provisioner["provisioner_name"] == "remote-kernel"
    return dict(provisioner["config"])


@pytest.mark.parametrize(
    ("name", "backend", "language"),
    [
        ("k8s_py", "kubernetes", "python"),
        ("k8s_scala", "kubernetes", "scala"),
        ("k8s_spark_py", "kubernetes", "python"),
        ("k8s_crd_spark", "sparkApplication", "python"),
        ("docker_r", "docker", "r"),
        ("swarm_py", "dockerSwarm", "python"),
        ("ssh_py", "ssh", "python"),
        ("ssh_spark_full", "ssh", "python"),
        ("yarn_py", "yarn", "python"),
        ("yarn_full", "yarn", "python"),
        ("yarn_dask", "yarn", "python"),
        ("yarn_scala", "yarn", "scala"),
    ],
)
def test_every_installer_output_becomes_a_kernelspec_of_ours_and_a_profile(
    name: str, backend: str, language: str
) -> None:
    result = migrate_kernelspec(name, gp(name))
    spec = result.kernelspec
    assert spec["argv"][:3] == ["python", "-m", "kernel_launchers.python_launcher"]
    assert spec["language"] == {"python": "python", "r": "R", "scala": "scala"}[language]
    assert config_of(spec)["profile"] == result.profile["metadata"]["name"] == name.replace("_", "-")
    assert result.profile["kind"] == "RemoteKernelProfile"
    assert result.profile["spec"]["backend"] == backend
    assert result.profile["spec"]["languages"] == [language]
    # The installer's defaults are not written (they would override the server's settings).
    assert "launch_timeout" not in config_of(spec) or config_of(spec)["launch_timeout"] != 30
    # Nothing of the original launch scripts, templates or variables is left.
    text = json.dumps(spec)
    assert "${" not in text and "/scripts/" not in text and "run.sh" not in text


def test_options_go_to_the_kernelspec_or_to_the_profile_by_who_may_set_them() -> None:
    result = migrate_kernelspec("ssh_spark_full", gp("ssh_spark_full"))
    config = config_of(result.kernelspec)
    assert config["launch_timeout"] == 90
    assert config["port_range"] == "40000..41999"
    assert config["authorized_users"] == ["alice", "bob"]
    assert config["kernel_class_name"] == "my.Kernel"
    # Hosts are the administrator's: the profile's, split as the user meant ("h1,h2").
    assert result.profile["spec"]["ssh"] == {"hosts": ["h1", "h2"]}
    assert result.profile["spec"]["users"] == {"authorized": ["alice", "bob"]}
    assert "remote_hosts" not in config
    assert any("--master spark://m:7077" in line for line in result.dropped)


def test_a_spark_on_yarn_kernelspec_keeps_its_spark_and_its_eager_start() -> None:
    result = migrate_kernelspec("yarn_py", gp("yarn_py"))
    assert result.profile["spec"]["yarn"] == {"spark": True}
    dropped = "\n".join(result.dropped)
    assert "--master yarn" in dropped and "--deploy-mode cluster" in dropped
    assert "PYSPARK_PYTHON" in dropped
    eager = gp("yarn_py")
    eager["argv"][eager["argv"].index("lazy")] = "eager"
    config = config_of(migrate_kernelspec("yarn_py", eager).kernelspec)
    assert (config["backend"], config["backend_config"]) == ("yarn", {"sparkInitMode": "eager"})


def test_gateway_provisioners_unfilled_templates_are_recognised_and_said() -> None:
    """0.5.0's jupyter-yarn-spec leaves ${language} and the rest unfilled with some options."""
    result = migrate_kernelspec("yarn_full", gp("yarn_full"))
    assert result.kernelspec["language"] == "python"
    assert any("template unfilled" in line for line in result.dropped)
    scala = migrate_kernelspec("yarn_scala", gp("yarn_scala"))
    assert scala.kernelspec["language"] == "scala" and scala.kernelspec["interrupt_mode"] == "signal"
    assert scala.profile["spec"]["yarn"] == {"spark": True, "sparkOpts": "--conf spark.yarn.am.waitTime=1d"}
    dropped = "\n".join(scala.dropped)
    assert "template unfilled" in dropped and "--alternate-sigint USR2" in dropped


def test_a_dask_kernelspec_says_dask_is_not_carried_over() -> None:
    result = migrate_kernelspec("yarn_dask", gp("yarn_dask"))
    assert any("dask-yarn" in line for line in result.dropped)
    assert "DASK_OPTS" not in json.dumps(result.kernelspec)


def test_images_become_the_profiles_allowed_images() -> None:
    result = migrate_kernelspec("k8s_spark_py", gp("k8s_spark_py"))
    assert config_of(result.kernelspec)["image_name"] == "my/spark:1"
    assert result.profile["spec"]["image"] == "my/spark:1"
    assert result.profile["spec"]["images"] == ["my/exec:1", "my/spark:1"]
    crd = migrate_kernelspec("k8s_crd_spark", gp("k8s_crd_spark")).profile["spec"]
    assert crd["sparkApplication"] == {"driverImage": "my/spark:1", "executorImage": "my/spark:1"}


EG_YARN = {
    "language": "python",
    "display_name": "Spark - Python (YARN Cluster Mode)",
    "metadata": {
        "process_proxy": {
            "class_name": "enterprise_gateway.services.processproxies.yarn.YarnClusterProcessProxy",
            "config": {"yarn_endpoint": "http://rm:8088/ws/v1/cluster", "authorized_users": "alice,bob"},
        }
    },
    "env": {
        "SPARK_HOME": "/usr/hdp/current/spark2-client",
        "SPARK_OPTS": "--master yarn --deploy-mode cluster --name ${KERNEL_ID:-ERROR__NO__KERNEL_ID} "
        "--conf spark.yarn.submit.waitAppCompletion=false --conf spark.executor.memory=2g "
        "${KERNEL_EXTRA_SPARK_OPTS}",
        "EG_IMPERSONATION_ENABLED": "True",
        "EG_SOMETHING_ELSE": "1",
        "MY_SETTING": "x",
        "KERNEL_EXTRA": "y",
    },
    "argv": [
        "/usr/local/share/jupyter/kernels/spark_python_yarn_cluster/bin/run.sh",
        "--RemoteProcessProxy.kernel-id",
        "{kernel_id}",
        "--RemoteProcessProxy.response-address",
        "{response_address}",
        "--RemoteProcessProxy.spark-context-initialization-mode",
        "eager",
    ],
}


def test_an_enterprise_gateway_process_proxy_kernelspec_is_migrated() -> None:
    result = migrate_kernelspec("spark_python_yarn_cluster", EG_YARN)
    assert result.source == "Enterprise Gateway YarnClusterProcessProxy"
    yarn = result.profile["spec"]["yarn"]
    assert yarn["endpoint"] == "http://rm:8088/ws/v1/cluster"
    assert yarn["impersonation"] is True
    assert yarn["spark"] is True and yarn["sparkOpts"] == "--conf spark.executor.memory=2g"
    config = config_of(result.kernelspec)
    assert config["authorized_users"] == ["alice", "bob"]
    assert config["backend_config"] == {"sparkInitMode": "eager"}
    # Other variables reach the kernel, and the profile must allow them; KERNEL_* always may.
    assert result.kernelspec["env"] == {"MY_SETTING": "x", "KERNEL_EXTRA": "y"}
    assert config["env_passthrough"] == ["MY_SETTING"]
    assert result.profile["spec"]["env"] == {"allowed": ["MY_SETTING"]}
    assert any("EG_SOMETHING_ELSE" in line for line in result.dropped)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"language": "python", "argv": ["python", "-m", "ipykernel_launcher"]}, "local kernelspec"),
        (
            {"metadata": {"kernel_provisioner": {"provisioner_name": "remote-kernel"}}},
            "already uses the remote-kernel",
        ),
        (
            {"metadata": {"process_proxy": {"class_name": "x.conductor.ConductorClusterProcessProxy"}}},
            "Conductor",
        ),
        ({"metadata": {"kernel_provisioner": {"provisioner_name": "someone-elses"}}}, "neither"),
        (
            {
                "language": "julia",
                "metadata": {"kernel_provisioner": {"provisioner_name": "docker-provisioner"}},
            },
            "not Python, R or Scala",
        ),
    ],
)
def test_what_cannot_be_migrated_is_refused_with_the_reason(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(MigrationError, match=message):
        migrate_kernelspec("k", spec)


def test_a_narrow_port_range_is_said_not_carried_over() -> None:
    spec = gp("ssh_py")
    spec["metadata"]["kernel_provisioner"]["config"]["port_range"] = "40000..40100"
    result = migrate_kernelspec("ssh_py", spec)
    assert "port_range" not in config_of(result.kernelspec)
    assert any("port_range 40000..40100" in line and "1000" in line for line in result.dropped)


def install_gp(tmp_path: Path, *names: str) -> Path:
    """The fixture kernelspecs installed as a Jupyter data directory would hold them."""
    for name in names:
        directory = tmp_path / "share" / "jupyter" / "kernels" / name
        directory.mkdir(parents=True)
        (directory / "kernel.json").write_text((GP / f"{name}.json").read_text())
        (directory / "logo-64x64.png").write_bytes(b"png")
        (directory / "scripts").mkdir()
        (directory / "scripts" / "launch_kubernetes.py").write_text("# the seed's launcher\n")
    return tmp_path / "share" / "jupyter"


def test_the_command_migrates_all_writes_profiles_and_fails_only_for_what_was_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = install_gp(tmp_path / "src", "k8s_py", "ssh_py", "eg_conductor")
    monkeypatch.setenv("JUPYTER_PATH", str(source))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "userdata"))
    profiles = tmp_path / "profiles.yaml"
    out = tmp_path / "out"
    assert main(["migrate", "--all", "--prefix", str(out), "--write-profiles", str(profiles)]) == 0
    printed = capsys.readouterr()
    assert "Skipped eg_conductor: IBM Spectrum Conductor" in printed.err  # --all: not named, no failure
    written = out / "share" / "jupyter" / "kernels" / "k8s_py"
    assert config_of(json.loads((written / "kernel.json").read_text()))["profile"] == "k8s-py"
    assert (written / "logo-64x64.png").exists() and not (written / "scripts").exists()
    assert [p["metadata"]["name"] for p in yaml.safe_load_all(profiles.read_text())] == ["k8s-py", "ssh-py"]
    # Named, it is a failure; written again without --replace, it is refused.
    assert main(["migrate", "eg_conductor", "--prefix", str(out)]) == 2
    assert main(["migrate", "k8s_py", "--prefix", str(out)]) == 2
    assert "add --replace" in capsys.readouterr().err
    assert main(["migrate", "k8s_py", "--prefix", str(out), "--suffix", "_rko", "--dry-run"]) == 0
    assert not (out / "share" / "jupyter" / "kernels" / "k8s_py_rko").exists()
    assert main(["migrate", "no_such_kernel"]) == 2


@pytest.mark.parametrize(
    ("module_class", "backend", "config"),
    [
        ("k8s.KubernetesProcessProxy", "kubernetes", {"image_name": "elyra/kernel-py:3.2.3"}),
        ("docker_swarm.DockerProcessProxy", "docker", {"image_name": "elyra/kernel-py:3.2.3"}),
        ("docker_swarm.DockerSwarmProcessProxy", "dockerSwarm", {"image_name": "elyra/kernel-py:3.2.3"}),
        ("yarn.YarnClusterProcessProxy", "yarn", {}),
        ("distributed.DistributedProcessProxy", "ssh", {"remote_hosts": ["h1", "h2"]}),
        (
            "spark_operator.SparkOperatorProcessProxy",
            "sparkApplication",
            {"image_name": "elyra/kernel-spark-py"},
        ),
        (
            "crd.CustomResourceProcessProxy",
            "customResource",
            {"group": "example.org", "version": "v1", "plural": "notebooks"},
        ),
    ],
)
def test_every_enterprise_gateway_process_proxy_maps_to_its_backend(
    module_class: str, backend: str, config: dict[str, Any]
) -> None:
    spec = {
        "language": "python",
        "display_name": module_class,
        "metadata": {
            "process_proxy": {
                "class_name": f"enterprise_gateway.services.processproxies.{module_class}",
                "config": dict(config),
            }
        },
        "argv": ["python", "launch_ipykernel.py", "--RemoteProcessProxy.kernel-id", "{kernel_id}"],
    }
    result = migrate_kernelspec("eg", spec)
    assert result.source == f"Enterprise Gateway {module_class.split('.')[1]}"
    assert result.profile["spec"]["backend"] == backend
    assert config_of(result.kernelspec)  # a remote-kernel kernelspec
    if "image_name" in config:
        assert config["image_name"] in json.dumps(result.profile["spec"])
    if backend == "ssh":
        assert result.profile["spec"]["ssh"]["hosts"] == ["h1", "h2"]
