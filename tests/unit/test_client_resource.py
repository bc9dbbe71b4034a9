"""The client's pure builders: the RemoteKernel body, the kernel env, connection info."""

from __future__ import annotations

import base64

import pytest

from remote_kernel_provisioner.resource import (
    LaunchRefused,
    build_remote_kernel,
    check_user,
    connection_info,
    finalizer_name,
    kernel_env,
)


def test_the_body_carries_the_kernelspec_config_and_kernel_variables() -> None:
    body = build_remote_kernel(
        kernel_id="6c9c8d0e-1111-2222-3333-444455556666",
        username="alice",
        language="Python",
        profile="python-ssh",
        env={"KERNEL_USERNAME": "alice", "KERNEL_EXTRA": "1"},
        launch_timeout=45,
        port_range="40000..41000",
        transport_encryption="auto",
        backend_config={"ssh": {"hosts": ["a", "b"], "loadBalancing": "least-connection"}},
    )
    assert body["metadata"]["name"] == "k-6c9c8d0e-1111-2222-3333-444455556666"
    spec = body["spec"]
    # Only what a tenant may ask for: the profile, not a backend or where it runs.
    assert spec["profile"] == "python-ssh" and "backend" not in spec
    assert spec["kernel"] == {"language": "python"}
    assert spec["launchTimeoutSeconds"] == 45 and spec["portRange"] == "40000..41000"
    assert spec["ssh"] == {"hosts": ["a", "b"], "loadBalancing": "least-connection"}
    assert spec["env"] == {"KERNEL_USERNAME": "alice", "KERNEL_EXTRA": "1"}
    assert "image" not in spec and "idleTimeoutSeconds" not in spec


def test_only_kernel_variables_and_named_ones_travel() -> None:
    env = {"KERNEL_USERNAME": "a", "KERNEL_ID": "x", "PATH": "/bin", "AWS_SECRET": "s", "MY_VAR": "1"}
    assert kernel_env(env, ["MY_VAR"]) == {"KERNEL_USERNAME": "a", "MY_VAR": "1"}


def test_users_are_checked_before_anything_is_created() -> None:
    check_user("alice", [], ["root"])
    with pytest.raises(LaunchRefused, match="not allowed"):
        check_user("root", [], ["root"])
    with pytest.raises(LaunchRefused, match="authorized_users"):
        check_user("bob", ["alice"], [])


def test_connection_info_comes_from_status_and_secret() -> None:
    status = {
        "connection": {
            "ip": "10.0.0.5",
            "transport": "tcp",
            "signatureScheme": "hmac-sha256",
            "shellPort": 1,
            "iopubPort": 2,
            "stdinPort": 3,
            "controlPort": 4,
            "hbPort": 5,
            "secretRef": {"name": "s", "key": "key"},
        }
    }
    data = {
        k: base64.b64encode(v).decode()
        for k, v in {"key": b"hmac", "curve-publickey": b"P", "curve-secretkey": b"S"}.items()
    }
    info = connection_info(status, data)
    assert info["ip"] == "10.0.0.5" and info["shell_port"] == 1 and info["hb_port"] == 5
    assert info["key"] == b"hmac"  # bytes, as KernelManager compares it
    assert info["curve_publickey"] == "P" and info["curve_secretkey"] == "S"


@pytest.mark.parametrize("operator_class", ["", "blue"])
def test_the_body_carries_the_finalizer_its_operator_keeps(operator_class: str) -> None:
    """Set at creation, the operator's finalizer saves it a write on every launch; the name must
    be the one that operator's class uses, or it would never be removed."""
    from kernel_operator import finalizer_for

    body = build_remote_kernel(
        kernel_id="6c9c8d0e-1111-2222-3333-444455556666",
        username="alice",
        language="python",
        env={},
        finalizer=finalizer_name(operator_class),
    )
    assert body["metadata"]["finalizers"] == [finalizer_for(operator_class)]
    assert (
        "finalizers"
        not in build_remote_kernel(
            kernel_id="6c9c8d0e-1111-2222-3333-444455556666", username="alice", language="python", env={}
        )["metadata"]
    )
