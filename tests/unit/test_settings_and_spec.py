"""Operator settings from the environment, and spec validation: every bad input has a clear error."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from kernel_operator.errors import SettingsError, SpecError
from kernel_operator.settings import OperatorSettings
from kernel_operator.spec import build_request, check_user
from tests.unit.requests import profile_from, request_from


def test_defaults_follow_the_seed() -> None:
    s = OperatorSettings.from_env({})
    assert s.launch_timeout == 30.0
    assert s.unauthorized_users == frozenset({"root"})
    assert s.authorized_users == frozenset()
    assert s.port_range == (0, 0)
    assert s.ssh.load_balancing == "round-robin"
    assert s.ssh.allow_unknown_hosts is False


def test_settings_are_read_from_rko_variables() -> None:
    s = OperatorSettings.from_env(
        {
            "RKO_LAUNCH_TIMEOUT": "12",
            "RKO_AUTHORIZED_USERS": "alice, bob",
            "RKO_PORT_RANGE": "40000..42000",
            "RKO_SSH_HOSTS": "h1,h2",
            "RKO_SSH_LOAD_BALANCING": "least-connection",
            "RKO_RESPONSE_BIND": "127.0.0.1:9000",
            "RKO_CHECK_NODES": "false",
        }
    )
    assert not s.check_nodes
    assert OperatorSettings.from_env({}).check_nodes
    assert s.launch_timeout == 12
    assert s.authorized_users == {"alice", "bob"}
    assert s.port_range == (40000, 42000)
    assert s.ssh.hosts == ("h1", "h2")
    assert s.response_bind == ("127.0.0.1", 9000)
    assert OperatorSettings.from_env({}).pool_refill_delay == 1.0
    assert OperatorSettings.from_env({"RKO_POOL_REFILL_DELAY_SECONDS": "0"}).pool_refill_delay == 0


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"RKO_LAUNCH_TIMEOUT": "soon"}, "not a number"),
        ({"RKO_LAUNCH_TIMEOUT": "0"}, "at least 1"),
        ({"RKO_PORT_RANGE": "1-2"}, "RKO_PORT_RANGE"),
        ({"RKO_TRANSPORT_ENCRYPTION": "maybe"}, "RKO_TRANSPORT_ENCRYPTION"),
        ({"RKO_SSH_LOAD_BALANCING": "random"}, "RKO_SSH_LOAD_BALANCING"),
        ({"RKO_RESPONSE_BIND": "nowhere"}, "HOST:PORT"),
        ({"RKO_SSH_ALLOW_UNKNOWN_HOSTS": "perhaps"}, "boolean"),
        ({"RKO_IMPERSONATION": "sometimes"}, "RKO_IMPERSONATION"),
        ({"RKO_OPERATOR_CLASS": "Not A Label"}, "DNS label"),
        ({"RKO_OPERATOR_CLASS": "team_a"}, "DNS label"),
        ({"RKO_UNREACHABLE_GRACE_SECONDS": "-1"}, "at least 0"),
        ({"RKO_SSH_COMMAND_TIMEOUT": "0"}, "at least 0.1"),
        ({"RKO_CHECK_NODES": "rarely"}, "RKO_CHECK_NODES"),
        ({"RKO_POOL_REFILL_DELAY_SECONDS": "-0.5"}, "at least 0"),
        ({"RKO_POOL_REFILL_DELAY_SECONDS": "600"}, "at most 60"),
        ({"RKO_POOL_REFILL_DELAY_SECONDS": "later"}, "not a number"),
    ],
)
def test_bad_settings_are_refused(env: dict[str, str], words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        OperatorSettings.from_env(env)


def spec(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"kernelId": str(uuid.uuid4()), "username": "alice", "backend": "ssh"}
    base.update(overrides)
    return base


def test_a_good_spec_becomes_a_request_with_defaults() -> None:
    settings = OperatorSettings.from_env({"RKO_LAUNCH_TIMEOUT": "40"})
    s = spec(env={"MY_VAR": "1"}, ssh={"hosts": ["a"]})
    req = request_from(s, settings, name="k-x", uid="uid")
    assert req.kernel_id == s["kernelId"]
    assert req.launch_timeout == 40
    assert req.env == {
        "MY_VAR": "1",
        "KERNEL_ID": s["kernelId"],
        "KERNEL_USERNAME": "alice",
        "KERNEL_LANGUAGE": "python",
    }
    assert req.backend_config == {"hosts": ["a"]} and req.tenant_config == {"hosts": ["a"]}
    assert req.port_range == (0, 0) and req.backend == "ssh" and req.profile == "p"


@pytest.mark.parametrize(
    ("overrides", "reason", "words"),
    [
        ({"kernelId": "not-a-uuid"}, "InvalidSpec", "kernelId"),
        ({"backend": "mainframe"}, "ProfileInvalid", "names no known backend"),
        ({"username": ""}, "InvalidSpec", "username is required"),
        ({"username": "root"}, "Unauthorized", "RKO_UNAUTHORIZED_USERS"),
        ({"portRange": "1..2"}, "InvalidPortRange", "1024..65535"),
        ({"portRange": "40000..40100"}, "InvalidPortRange", "at least 1000"),
        ({"portRange": "41000..40000"}, "InvalidPortRange", "lower bound above"),
        ({"transportEncryption": "sometimes"}, "InvalidSpec", "transportEncryption"),
        ({"env": {"RKO_NAMESPACE": "x"}}, "InvalidSpec", "belong to the operator"),
        ({"env": {"BAD-NAME": "x"}}, "InvalidSpec", "not a valid environment variable"),
        ({"env": {"KERNEL_USERNAME": "mallory"}}, "InvalidSpec", "disagrees"),
        ({"env": {"N": 3}}, "InvalidSpec", "must be a string"),
        # The key the connection is sealed to: a tenant's, so only a usable one is taken.
        ({"clientPublicKey": "not base64!"}, "InvalidSpec", "clientPublicKey is not base64"),
        ({"clientPublicKey": "AAAA"}, "InvalidSpec", "must be 32 bytes"),
        ({"clientPublicKey": "A" * 43 + "="}, "InvalidSpec", "low-order point"),  # all-zero
        ({"clientPublicKey": 7}, "InvalidSpec", "must be a string"),
    ],
)
def test_bad_specs_fail_with_a_reason(overrides: dict[str, Any], reason: str, words: str) -> None:
    with pytest.raises(SpecError, match=words) as err:
        request_from(spec(**overrides), OperatorSettings.from_env({}), name="k", uid="uid")
    assert err.value.reason == reason


def test_authorized_users_limit_who_may_launch_and_unauthorized_wins() -> None:
    settings = OperatorSettings.from_env(
        {"RKO_AUTHORIZED_USERS": "alice,root", "RKO_UNAUTHORIZED_USERS": "root"}
    )
    profile = profile_from({"backend": "ssh"})
    check_user("alice", settings, profile)
    with pytest.raises(SpecError, match="authorized users of RKO_"):
        check_user("bob", settings, profile)
    with pytest.raises(SpecError, match="not allowed"):
        check_user("root", settings, profile)
    # The profile's lists apply after the operator's.
    narrow = profile_from({"backend": "ssh", "users": {"authorized": ["carol"], "unauthorized": ["dave"]}})
    everyone = OperatorSettings.from_env({})
    check_user("carol", everyone, narrow)
    with pytest.raises(SpecError, match="profile p's users") as info:
        check_user("alice", everyone, narrow)
    assert info.value.reason == "Unauthorized"


def test_ssh_hosts_impersonation_and_class_settings() -> None:
    s = OperatorSettings.from_env(
        {
            "RKO_SSH_HOSTS": "a,b",
            "RKO_SSH_SECRET": "ssh-creds",
            "RKO_IMPERSONATION": "true",
            "RKO_OPERATOR_CLASS": "team-a",
            "RKO_SSH_LOCAL_HOSTS": "",
        }
    )
    assert s.ssh.hosts == ("a", "b")
    assert s.ssh.secret == "ssh-creds" and s.ssh.password_auth is False
    assert s.ssh.local_hosts == ()
    assert s.impersonation is True and s.operator_class == "team-a"
    defaults = OperatorSettings.from_env({})
    assert defaults.impersonation is False and defaults.unreachable_grace == 30.0
    assert defaults.stop_give_up == 600.0 and defaults.ssh.host_retry_seconds == 30.0
    # No kernel runs as the operator's own child process unless enabled, and no host is assumed.
    assert defaults.ssh.local_hosts == () and defaults.ssh.hosts == ()


def test_impersonation_runs_the_kernel_as_its_user_and_never_as_root() -> None:
    on = OperatorSettings.from_env({"RKO_IMPERSONATION": "true", "RKO_UNAUTHORIZED_USERS": ""})
    assert request_from(spec(), on, name="k", uid="u").run_as == "alice"
    for bad, words in (
        ("root", "never run as root"),
        ("al ice", "not a valid account"),
        ("-x", "not a valid"),
    ):
        with pytest.raises(SpecError, match=words) as info:
            request_from(spec(username=bad), on, name="k", uid="u")
        assert info.value.reason == "ImpersonationRefused"
    off = OperatorSettings.from_env({})
    assert request_from(spec(), off, name="k", uid="u").run_as is None
    # The profile turns it on for its kernels; a tenant cannot ask for it.
    assert request_from(spec(ssh={"impersonate": True}), off, name="k", uid="u").run_as == "alice"
    with pytest.raises(SpecError, match="may not set impersonation") as info:
        build_request(
            "ns", "k", "u", spec(ssh={"impersonation": True}), profile_from({"backend": "ssh"}), off
        )
    assert info.value.reason == "InvalidSpec"
