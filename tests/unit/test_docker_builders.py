"""The docker backend's pure parts: the container's configuration and the state mapping."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from kernel_operator.backends.docker import container_config, container_state
from kernel_operator.errors import SpecError
from kernel_operator.settings import OperatorSettings
from tests.unit.requests import request_from


def request(**spec: Any):  # type: ignore[no-untyped-def]
    base: dict[str, Any] = {"kernelId": str(uuid.uuid4()), "username": "alice", "backend": "docker"}
    base.update(spec)
    return request_from(base, OperatorSettings.from_env({}), name="k", uid="uid")


def test_the_container_has_the_kernels_variables_labels_and_limits_only() -> None:
    req = request(
        env={"MY": "1"},
        resources={"cpu": "500m", "memory": "1Gi"},
        docker={
            "user": "1000:100",
            "workingDir": "/home/jovyan",
            "mounts": [{"type": "volume", "source": "data", "target": "/data"}],
        },
    )
    config = container_config(req, ["--ip", "127.0.0.1"], "img:1", "/tmp/rko-launch-token", "host")
    assert config["command"] == [
        "python", "-m", "kernel_launchers.python_launcher", "--ip", "127.0.0.1",
        "--token-file", "/tmp/rko-launch-token",
    ]  # fmt: skip
    assert config["environment"]["MY"] == "1" and config["environment"]["KERNEL_ID"] == req.kernel_id
    # The token is never in the container's environment (docker inspect shows it to anyone).
    assert set(config["environment"]) == {"MY", "KERNEL_ID", "KERNEL_USERNAME", "KERNEL_LANGUAGE"}
    assert config["labels"]["kernel-operator.io/kernel-id"] == req.kernel_id
    assert config["labels"]["kernel-operator.io/uid"] == req.uid
    assert config["privileged"] is False
    assert config["network_mode"] == "host" and config["user"] == "1000:100"
    assert config["nano_cpus"] == 500_000_000 and config["mem_limit"] == 2**30
    assert config["working_dir"] == "/home/jovyan"
    assert config["cap_drop"] == ["ALL"] and config["security_opt"] == ["no-new-privileges"]
    assert config["mounts"][0]["Target"] == "/data"


@pytest.mark.parametrize(
    ("docker", "env", "words"),
    [
        ({"user": "root"}, {}, "not uid\\[:gid\\] in numbers"),
        ({"user": "0:0"}, {}, "never run as root"),
        ({"mounts": [{"target": "relative"}]}, {}, "absolute"),
        ({"mounts": [{"type": "bind", "source": "here", "target": "/x"}]}, {}, "bind source"),
    ],
)
def test_bad_container_requests_are_refused(docker: dict[str, Any], env: dict[str, str], words: str) -> None:
    with pytest.raises(SpecError, match=words):
        container_config(request(docker=docker, env=env), [], "img", "/tmp/t", "host")


def test_a_container_never_runs_as_the_images_user_and_kernel_uid_changes_nothing() -> None:
    config = container_config(request(env={"KERNEL_UID": "0"}), [], "img", "/tmp/t", "host")
    assert config["user"] == "1000:1000"  # the default, not the image's (maybe root) or the tenant's


def test_the_token_travels_as_a_private_file_owned_by_the_kernels_user() -> None:
    import io
    import tarfile

    from kernel_operator.backends.docker import token_archive

    with tarfile.open(fileobj=io.BytesIO(token_archive("tok", 1000, 100))) as archive:
        (member,) = archive.getmembers()
        assert (member.name, member.mode, member.uid, member.gid) == ("rko-launch-token", 0o400, 1000, 100)
        handle = archive.extractfile(member)
        assert handle is not None and handle.read() == b"tok"


@pytest.mark.parametrize(
    ("attrs", "state", "reason"),
    [
        (None, "gone", "ContainerGone"),
        ({"Name": "/k", "State": {"Status": "created"}}, "starting", ""),
        ({"Name": "/k", "State": {"Status": "running"}}, "running", ""),
        ({"Name": "/k", "State": {"Status": "exited", "ExitCode": 0}}, "succeeded", "KernelExited"),
        ({"Name": "/k", "State": {"Status": "exited", "ExitCode": 3}}, "failed", "ContainerFailed"),
        (
            {"Name": "/k", "State": {"Status": "dead", "ExitCode": 137, "Error": "oom"}},
            "failed",
            "ContainerFailed",
        ),
    ],
)
def test_engine_states_map_to_kernel_states(attrs: Any, state: str, reason: str) -> None:
    result = container_state(attrs)
    assert (result.state, result.reason) == (state, reason)


def test_a_service_is_one_unrestarted_task_with_the_containers_data() -> None:
    from kernel_operator.backends.docker_swarm import service_config

    req = request(docker={"user": "1000"}, resources={"cpu": "1"})
    config = service_config(req, ["--ip", "127.0.0.1"], "img:1", "host")
    assert config["restart_policy"]["Condition"] == "none"
    assert config["networks"] == ["host"] and config["user"] == "1000:1000"
    assert f"KERNEL_ID={req.kernel_id}" in config["env"]
    assert not [e for e in config["env"] if e.startswith("RKO_LAUNCH_TOKEN")]  # a Swarm secret instead
    assert config["command"][-2:] == ["--token-file", "/run/secrets/rko-launch-token"]
    assert config["container_labels"]["kernel-operator.io/kernel-id"] == req.kernel_id
    assert config["resources"]["Limits"]["NanoCPUs"] == 1_000_000_000
    with pytest.raises(SpecError, match="root"):
        service_config(request(docker={"user": "0"}), [], "i", "host")


@pytest.mark.parametrize(
    ("tasks", "state", "reason"),
    [
        (None, "gone", "ServiceGone"),
        ([], "starting", ""),
        ([{"CreatedAt": "1", "Status": {"State": "preparing"}}], "starting", ""),
        ([{"CreatedAt": "1", "Status": {"State": "running"}}], "running", ""),
        ([{"CreatedAt": "1", "Status": {"State": "complete"}}], "succeeded", "KernelExited"),
        (
            [
                {"CreatedAt": "1", "Status": {"State": "running"}},
                {
                    "CreatedAt": "2",
                    "Status": {
                        "State": "failed",
                        "Err": "task: non-zero exit (3)",
                        "ContainerStatus": {"ExitCode": 3},
                    },
                },
            ],
            "failed",
            "TaskFailed",
        ),
        (
            [{"CreatedAt": "1", "Status": {"State": "rejected", "Err": "No such image"}}],
            "failed",
            "TaskFailed",
        ),
    ],
)
def test_swarm_task_states_map_to_kernel_states(tasks: Any, state: str, reason: str) -> None:
    from kernel_operator.backends.docker_swarm import task_state

    result = task_state(tasks)
    assert (result.state, result.reason) == (state, reason)
