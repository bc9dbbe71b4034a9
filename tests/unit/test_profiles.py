"""Profiles and what a tenant's spec may set under them: every tenant field abused once."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from kernel_operator.backends.pod_builder import build_pod, enforce_pod_security
from kernel_operator.errors import SpecError
from kernel_operator.profiles import Profile, namespace_selected, pick_profile
from kernel_operator.settings import OperatorSettings
from kernel_operator.spec import KernelRequest, build_request
from tests.unit.requests import profile_from


def named(name: str, default: bool = False, **spec: Any) -> dict[str, Any]:
    annotations = {"kernel-operator.io/is-default-profile": "true"} if default else {}
    return {"metadata": {"name": name, "annotations": annotations}, "spec": {"backend": "ssh", **spec}}


def build(spec: dict[str, Any], **profile: Any) -> KernelRequest:
    tenant = {"kernelId": str(uuid.uuid4()), "username": "alice", **spec}
    return build_request(
        "ns", "k", "uid", tenant, profile_from({"backend": "ssh", **profile}), OperatorSettings.from_env({})
    )


def refused(reason: str, words: str, spec: dict[str, Any], **profile: Any) -> None:
    with pytest.raises(SpecError, match=words) as err:
        build(spec, **profile)
    assert err.value.reason == reason, err.value


def test_a_remote_kernel_naming_no_profile_gets_the_one_default_profile() -> None:
    profiles = [named("a"), named("b", default=True)]
    assert pick_profile("", profiles)["metadata"]["name"] == "b"
    assert pick_profile("a", profiles)["metadata"]["name"] == "a"
    with pytest.raises(SpecError, match="no RemoteKernelProfile is the default") as err:
        pick_profile("", [named("a")])
    assert err.value.reason == "ProfileNotFound"
    with pytest.raises(SpecError, match="Several RemoteKernelProfiles are marked default") as err:
        pick_profile("", [named("a", default=True), named("b", default=True)])
    assert err.value.reason == "ProfileAmbiguous"
    with pytest.raises(SpecError, match="'c' does not exist") as err:
        pick_profile("c", profiles)
    assert err.value.reason == "ProfileNotFound"


def test_a_profile_serves_only_the_namespaces_its_selector_picks() -> None:
    selector = {
        "matchLabels": {"team": "a"},
        "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["prod"]}],
    }
    assert namespace_selected(None, {})
    assert namespace_selected(selector, {"team": "a"})
    assert not namespace_selected(selector, {"team": "b"})
    assert not namespace_selected(selector, {"team": "a", "tier": "prod"})
    assert not namespace_selected({"matchExpressions": [{"key": "x", "operator": "Bogus"}]}, {"x": "1"})


def test_the_backend_and_its_settings_come_from_the_profile_never_the_spec() -> None:
    profile = Profile.from_object(named("p", ssh={"hosts": ["h1"], "impersonation": True}))
    assert profile.backend == "ssh" and profile.backend_config == {"hosts": ["h1"], "impersonation": True}
    request = build({"backend": "kubernetes", "kubernetes": {"namespace": "kube-system"}})
    assert request.backend == "ssh" and request.backend_config == {}  # unknown spec fields are ignored


@pytest.mark.parametrize(
    ("spec", "profile", "reason", "words"),
    [
        # Images: only the profile's, from the spec or from KERNEL_IMAGE alike.
        ({"image": "evil:1"}, {"images": ["ok:*"]}, "ImageNotAllowed", "evil:1"),
        ({"env": {"KERNEL_IMAGE": "evil:1"}}, {"image": "ok:1"}, "ImageNotAllowed", "evil:1"),
        ({"executorImage": "evil:1"}, {"images": ["ok:*"]}, "ImageNotAllowed", "evil:1"),
        # Env: KERNEL_* and the profile's names; never RKO_*.
        ({"env": {"LD_PRELOAD": "/x.so"}}, {}, "EnvNotAllowed", "LD_PRELOAD"),
        (
            {"env": {"RKO_LAUNCH_TOKEN": "x"}},
            {"env": {"allowed": ["*"]}},
            "InvalidSpec",
            "belong to the operator",
        ),
        # Resources and timeouts: at most the profile's maxima.
        ({"resources": {"cpu": "64"}}, {"maxima": {"cpu": "2"}}, "ExceedsProfile", "cpu"),
        ({"resources": {"memory": "1Ti"}}, {"maxima": {"memory": "8Gi"}}, "ExceedsProfile", "memory"),
        ({"resources": {"gpus": 8}}, {"maxima": {"gpus": 0}}, "ExceedsProfile", "gpus"),
        (
            {"launchTimeoutSeconds": 3600},
            {"maxima": {"launchTimeoutSeconds": 60}},
            "ExceedsProfile",
            "launch",
        ),
        ({"idleTimeoutSeconds": 0}, {"maxima": {"idleTimeoutSeconds": 3600}}, "ExceedsProfile", "cull"),
        ({"idleTimeoutSeconds": 86400}, {"maxima": {"idleTimeoutSeconds": 3600}}, "ExceedsProfile", "cull"),
        # Ports within the profile's range; encryption as the profile requires.
        ({"portRange": "0..0"}, {"defaults": {"portRange": "40000..41999"}}, "InvalidPortRange", "within"),
        (
            {"portRange": "30000..31999"},
            {"defaults": {"portRange": "40000..41999"}},
            "InvalidPortRange",
            "within",
        ),
        (
            {"transportEncryption": "disabled"},
            {"requireTransportEncryption": True},
            "EncryptionRequired",
            "requires",
        ),
        # Languages and users the profile allows.
        ({"kernel": {"language": "r"}}, {"languages": ["python"]}, "LanguageNotSupported", "python"),
        ({"kernel": {"language": "scala"}}, {"languages": ["python"]}, "LanguageNotSupported", "python"),
        (
            {"kernel": {"language": "scala"}},
            {"backend": "sparkApplication"},
            "LanguageNotSupported",
            "not sparkApplication",
        ),
        ({"kernel": {"language": "julia"}}, {}, "LanguageNotSupported", "python, r, scala"),
        ({}, {"users": {"authorized": ["bob"]}}, "Unauthorized", "profile p"),
        ({"kernel": {"className": "os;import os"}}, {}, "InvalidSpec", "dotted Python name"),
        # Backend blocks: only the tenant's fields, only for the profile's backend.
        ({"ssh": {"python": "/tmp/evil"}}, {}, "InvalidSpec", "may not set python"),
        ({"ssh": {"user": "root", "port": 2222}}, {}, "InvalidSpec", "may not set port, user"),
        ({"yarn": {"queue": "x"}}, {}, "InvalidSpec", "runs kernels on the ssh backend"),
    ],
)
def test_what_a_tenant_may_not_set_is_refused_with_a_reason(
    spec: dict[str, Any], profile: dict[str, Any], reason: str, words: str
) -> None:
    refused(reason, words, spec, **profile)


def test_a_scala_kernel_runs_where_its_profile_allows_it() -> None:
    request = build({"kernel": {"language": "scala"}}, languages=["scala"])
    assert request.language == "scala" and request.env["KERNEL_LANGUAGE"] == "scala"


def test_what_the_profile_leaves_open_passes_and_its_defaults_apply() -> None:
    request = build(
        {"image": "ok:2", "env": {"MY_VAR": "1"}, "resources": {"cpu": "1"}, "portRange": "40000..41000"},
        images=["ok:*"],
        env={"allowed": ["MY_*"], "values": {"PROXY": "http://proxy", "MY_VAR": "admin"}},
        defaults={"portRange": "40000..41999", "idleTimeoutSeconds": 600, "resources": {"memory": "1Gi"}},
        maxima={"cpu": "2"},
    )
    assert request.image == "ok:2" and request.resources == {"memory": "1Gi", "cpu": "1"}
    assert request.env["MY_VAR"] == "admin" and request.env["PROXY"] == "http://proxy"  # the admin's win
    assert request.idle_timeout == 600 and request.port_range == (40000, 41000)


def test_the_final_pod_meets_the_restricted_standard_whatever_the_profile_merged() -> None:
    request = build_request(
        "ns",
        "k",
        "uid",
        {"kernelId": str(uuid.uuid4()), "username": "alice"},
        profile_from(
            {
                "backend": "kubernetes",
                "kubernetes": {
                    "podTemplate": {
                        "spec": {
                            "hostPID": True,
                            "hostNetwork": True,
                            "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
                            "containers": [
                                {"name": "x"},
                                {"name": "sidecar", "securityContext": {"privileged": True}},
                            ],
                        }
                    }
                },
            }
        ),
        OperatorSettings.from_env({}),
    )
    with pytest.raises(SpecError) as err:
        build_pod(request, [], "img", "ns", None)
    message = str(err.value)
    assert err.value.reason == "PodSecurityViolation"
    for violation in ("spec.hostPID", "spec.hostNetwork", "volume root (hostPath)", "sidecar: privileged"):
        assert violation in message


def test_what_the_operator_can_set_safely_it_sets_on_every_container() -> None:
    pod = {
        "spec": {
            "containers": [
                {"name": "a"},
                {"name": "b", "securityContext": {"allowPrivilegeEscalation": True}},
            ],
            "initContainers": [{"name": "i"}],
        }
    }
    hardened = enforce_pod_security(pod, "restricted")
    for container in [*hardened["spec"]["containers"], *hardened["spec"]["initContainers"]]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["runAsNonRoot"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert hardened["spec"]["securityContext"]["runAsNonRoot"] is True
    # A privileged profile is the administrator's explicit choice: nothing is changed.
    assert enforce_pod_security({"spec": {"hostPID": True}}, "privileged") == {"spec": {"hostPID": True}}
    with pytest.raises(SpecError, match=r"capabilities\.add"):
        enforce_pod_security(
            {
                "spec": {
                    "containers": [{"name": "a", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}]
                }
            },
            "baseline",
        )


def test_no_service_account_token_unless_the_profile_asks_and_never_the_tenants_account() -> None:
    def pod(env: dict[str, str], **kubernetes: Any) -> dict[str, Any]:
        request = build_request(
            "ns",
            "k",
            "uid",
            {"kernelId": str(uuid.uuid4()), "username": "alice", "env": env},
            profile_from({"backend": "kubernetes", "kubernetes": kubernetes}),
            OperatorSettings.from_env({}),
        )
        return build_pod(request, [], "img", "ns", None)["spec"]

    plain = pod({"KERNEL_SERVICE_ACCOUNT_NAME": "admin", "KERNEL_NAMESPACE": "kube-system"})
    assert plain["automountServiceAccountToken"] is False and "serviceAccountName" not in plain
    assert pod({}, serviceAccountName="kernels", automountServiceAccountToken=True)[
        "automountServiceAccountToken"
    ]
