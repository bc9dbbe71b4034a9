"""The customResource and sparkApplication backends' pure parts, and the backend over a fake Kube."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from kernel_operator.backends.base import BackendStatus, LaunchPlan, kernel_image
from kernel_operator.backends.custom_object_builder import (
    SPARK_POD_IP_REF,
    build_custom_object,
    build_spark_application,
    combined_state,
    custom_object_state,
    pod_selector,
    spark_application_state,
    substitute,
)
from kernel_operator.backends.custom_resource import CustomResourceBackend, SparkApplicationBackend
from kernel_operator.errors import BackendError, SpecError
from kernel_operator.kube import KubeError
from kernel_operator.settings import OperatorSettings
from kernel_operator.spec import KernelRequest
from tests.unit.requests import request_from

OWNER = {"apiVersion": "kernel-operator.io/v1alpha1", "kind": "RemoteKernel", "name": "k", "uid": "u"}
WIDGET = {"group": "example.com", "version": "v1", "plural": "widgets", "kind": "Widget"}


def request(
    backend: str = "customResource", env: dict[str, str] | None = None, **config: Any
) -> KernelRequest:
    spec: dict[str, Any] = {
        "kernelId": str(uuid.uuid4()),
        "username": "alice",
        "backend": backend,
        backend: config,
    }
    if env:
        spec["env"] = env
    return request_from(spec, OperatorSettings.from_env({}), name="k", uid="uid")


def test_values_go_into_string_leaves_and_launcher_args_into_lists() -> None:
    template = {
        "a": "${KERNEL_ID}",
        "b": ["x", "${LAUNCHER_ARGS}", "y"],
        "c": {"d": "pre-${KERNEL_USERNAME}"},
        "n": 3,
    }
    out = substitute(template, {"KERNEL_ID": "id1", "KERNEL_USERNAME": "alice"}, ["--a", "1"])
    assert out == {"a": "id1", "b": ["x", "--a", "1", "y"], "c": {"d": "pre-alice"}, "n": 3}
    # A value that looks like YAML stays one string: nothing is parsed after substitution.
    evil = substitute({"a": "${KERNEL_USERNAME}"}, {"KERNEL_USERNAME": "x\nkind: Secret"}, [])
    assert evil == {"a": "x\nkind: Secret"}
    with pytest.raises(SpecError, match=r"\$\{NOPE\}") as err:
        substitute({"a": "${NOPE}"}, {"KERNEL_ID": "x"}, [])
    assert err.value.reason == "InvalidTemplate"


def test_a_custom_object_is_its_template_with_the_operators_identity() -> None:
    req = request(
        **WIDGET,
        template={
            "apiVersion": "evil/v1",
            "metadata": {"name": "other", "labels": {"team": "a"}},
            "spec": {"image": "${KERNEL_IMAGE}", "args": ["${LAUNCHER_ARGS}"], "owner": "${KERNEL_USERNAME}"},
            "status": {"phase": "Running"},
        },
    )
    obj = build_custom_object(req, ["--kernel-id", req.kernel_id], "img:1", "ns", OWNER)
    assert obj["apiVersion"] == "example.com/v1" and obj["kind"] == "Widget"
    assert obj["metadata"]["name"] == f"k-{req.kernel_id}" and obj["metadata"]["namespace"] == "ns"
    assert obj["metadata"]["labels"]["team"] == "a"
    assert obj["metadata"]["labels"]["kernel-operator.io/kernel-id"] == req.kernel_id
    assert obj["metadata"]["ownerReferences"] == [OWNER]
    assert obj["spec"] == {"image": "img:1", "args": ["--kernel-id", req.kernel_id], "owner": "alice"}
    assert "status" not in obj


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({**WIDGET, "group": "apps"}, "kubernetes backend"),
        ({**WIDGET, "group": "kernel-operator.io"}, "another operator"),
        ({**WIDGET, "group": "Bad Group"}, "not a valid name"),
        ({**WIDGET, "version": "one"}, "not an API version"),
        ({**WIDGET, "kind": ""}, "needs kind and a template"),
        (WIDGET, "needs kind and a template"),
    ],
)
def test_bad_custom_resource_specs_are_refused(config: dict[str, Any], words: str) -> None:
    req = request(**{**config, "template": config.get("template", {})})
    with pytest.raises(SpecError, match=words):
        build_custom_object(req, [], "img", "ns", None)


def test_the_kernels_pod_is_found_by_labels() -> None:
    req = request(**WIDGET, podSelector={"app": "${KERNEL_NAME}", "role": "kernel"})
    assert pod_selector(req) == f"app=k-{req.kernel_id},role=kernel"
    plain = request(**WIDGET)
    assert pod_selector(plain) == f"kernel-operator.io/kernel-id={plain.kernel_id}"
    spark = request("sparkApplication")
    assert pod_selector(spark) == f"sparkoperator.k8s.io/app-name=k-{spark.kernel_id},spark-role=driver"


def test_a_spark_application_runs_the_launcher_as_its_python_driver() -> None:
    req = request(
        "sparkApplication",
        env={"KERNEL_SERVICE_ACCOUNT_NAME": "cluster-admin-sa"},  # a variable only: the profile decides
        serviceAccount="spark",
        executorImage="exec:1",
        driver={"cores": 2, "memory": "1g"},
        executor={"instances": 3},
        sparkConf={"spark.sql.shuffle.partitions": "8"},
    )
    app = build_spark_application(req, ["--ip", SPARK_POD_IP_REF], "kernel:1", "ns", OWNER)
    spec = app["spec"]
    assert app["apiVersion"] == "sparkoperator.k8s.io/v1beta2" and app["kind"] == "SparkApplication"
    assert (
        spec["type"] == "Python" and spec["mode"] == "cluster" and spec["restartPolicy"] == {"type": "Never"}
    )
    assert spec["mainApplicationFile"] == "local:///usr/local/lib/rko/spark_driver.py"
    assert spec["arguments"][:2] == ["--ip", "$(SPARK_DRIVER_BIND_ADDRESS)"]
    assert spec["driver"]["cores"] == 2 and spec["driver"]["memory"] == "1g"
    assert spec["driver"]["serviceAccount"] == "spark" and spec["executor"]["image"] == "exec:1"
    assert spec["executor"]["instances"] == 3 and spec["sparkConf"] == {"spark.sql.shuffle.partitions": "8"}
    env = {e["name"]: e for e in spec["driver"]["env"]}
    assert env["KERNEL_ID"]["value"] == req.kernel_id
    assert "value" not in env["RKO_LAUNCH_TOKEN"] and env["RKO_LAUNCH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert app["metadata"]["ownerReferences"] == [OWNER]
    with pytest.raises(SpecError, match="lots"):
        build_spark_application(request("sparkApplication", driver={"memory": "lots"}), [], "i", "ns", None)
    with pytest.raises(SpecError, match=r"spark\.kubernetes\.authenticate"):
        build_spark_application(
            request(
                "sparkApplication", sparkConf={"spark.kubernetes.authenticate.driver.serviceAccountName": "x"}
            ),
            [],
            "i",
            "ns",
            None,
        )


def app_in(state: str, message: str = "") -> dict[str, Any]:
    return {
        "metadata": {"name": "k-1"},
        "status": {"applicationState": {"state": state, "errorMessage": message}},
    }


@pytest.mark.parametrize(
    ("state", "kind", "reason"),
    [
        ("", "starting", ""),
        ("NEW", "starting", ""),
        ("SUBMITTED", "starting", ""),
        ("PENDING_RERUN", "starting", ""),
        ("RUNNING", "running", ""),
        ("COMPLETED", "succeeded", "ApplicationCompleted"),
        ("SUBMISSION_FAILED", "failed", "SubmissionFailed"),
        ("FAILED", "failed", "ApplicationFailed"),
        ("FAILING", "failed", "ApplicationFailed"),
        ("UNKNOWN", "failed", "ApplicationFailed"),
    ],
)
def test_spark_application_states_map_to_the_kernels(state: str, kind: str, reason: str) -> None:
    status = spark_application_state(app_in(state, "spark-submit failed: quota"))
    assert status.state == kind and status.reason == reason
    if kind == "failed":
        assert state in status.message and "quota" in status.message
    assert spark_application_state(None).state == "gone"


def test_a_generic_objects_own_failure_wins_over_its_pod() -> None:
    failed = custom_object_state(
        {"metadata": {"name": "w"}, "status": {"phase": "Failed", "message": "no quota"}}
    )
    assert failed.state == "failed" and "no quota" in failed.message
    condition = {"type": "Failed", "status": "True", "message": "bad image"}
    assert "bad image" in custom_object_state({"metadata": {}, "status": {"conditions": [condition]}}).message
    assert custom_object_state({"metadata": {}, "status": {}}).state == "starting"
    running_pod = BackendStatus("running")
    assert combined_state(failed, [running_pod]) is failed
    assert combined_state(BackendStatus("starting"), [running_pod]) is running_pod
    assert combined_state(BackendStatus("running"), []).state == "starting"


class FakeKube:
    """Our Kube seam, in memory."""

    def __init__(self, create_error: KubeError | None = None) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.secrets: dict[str, dict[str, bytes]] = {}
        self.pods: list[dict[str, Any]] = []
        self.deleted_pods: list[str] = []
        self.create_error = create_error

    async def create_secret(
        self, namespace: str, name: str, data: dict[str, bytes], labels: Any, owner: Any
    ) -> bool:
        created = name not in self.secrets
        self.secrets[name] = data
        self.labels = dict(labels or {})
        return created

    async def replace_secret_data(self, namespace: str, name: str, data: dict[str, bytes]) -> None:
        self.secrets[name] = data

    async def delete_secret(self, namespace: str, name: str, owner_label: str | None = None) -> None:
        if owner_label is None or self.labels.get("kernel-operator.io/uid") == owner_label:
            self.secrets.pop(name, None)

    async def create_custom_object(
        self, group: str, version: str, plural: str, namespace: str, body: Any
    ) -> Any:
        if self.create_error:
            raise self.create_error
        self.objects[body["metadata"]["name"]] = body
        return body

    async def read_custom_object(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> Any:
        return self.objects.get(name)

    async def delete_custom_object(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> None:
        self.objects.pop(name, None)

    async def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return self.pods

    async def delete_pod(self, namespace: str, name: str, grace: int) -> None:
        self.deleted_pods.append(name)


def plan(req: KernelRequest) -> LaunchPlan:
    return LaunchPlan(req, "127.0.0.1:1", b"k" * 32, "tok", "/tmp/x", OWNER)


def test_the_spark_backend_creates_reads_and_deletes_its_application() -> None:
    kube = FakeKube()
    backend = SparkApplicationBackend(kube, OperatorSettings.from_env({"RKO_KERNEL_IMAGE": "kernel:1"}))  # type: ignore[arg-type]
    req = request("sparkApplication")
    ref = asyncio.run(backend.launch(plan(req)))
    assert ref["plural"] == "sparkapplications" and kube.secrets[f"k-{req.kernel_id}-launch"] == {
        "token": b"tok"
    }
    assert asyncio.run(backend.status(ref)).state == "starting"
    kube.objects[ref["name"]]["status"] = {
        "applicationState": {"state": "SUBMISSION_FAILED", "errorMessage": "x"}
    }
    assert asyncio.run(backend.status(ref)).reason == "SubmissionFailed"
    kube.pods = [
        {
            "metadata": {"name": "k-driver", "labels": {"kernel-operator.io/uid": "uid"}},
            "status": {"phase": "Running"},
        },
        {
            "metadata": {"name": "someone-else"},
            "status": {"phase": "Running"},
        },  # matched by the selector only
    ]
    kube.objects[ref["name"]]["status"] = {"applicationState": {"state": "RUNNING"}}
    assert asyncio.run(backend.status(ref)).state == "running"
    assert asyncio.run(backend.find(req)) == ref
    asyncio.run(backend.stop(ref, "another-uid"))  # status naming what another kernel owns
    assert kube.objects and not kube.deleted_pods and kube.secrets
    asyncio.run(backend.stop(ref, "uid"))
    assert not kube.objects and kube.deleted_pods == ["k-driver"] and not kube.secrets


def test_a_kind_the_api_server_does_not_know_says_what_to_check() -> None:
    kube = FakeKube(create_error=KubeError("Creating widgets.example.com failed: 404 Not Found", status=404))
    backend = CustomResourceBackend(kube, OperatorSettings.from_env({"RKO_KERNEL_IMAGE": "kernel:1"}))  # type: ignore[arg-type]
    with pytest.raises(BackendError, match="CRD installed") as err:
        asyncio.run(backend.launch(plan(request(**WIDGET, template={"spec": {"a": 1}}))))
    assert err.value.reason == "ObjectRejected" and not kube.secrets


def test_the_image_comes_from_the_spec_then_kernel_image_then_the_profile_then_the_operator() -> None:
    from kernel_operator.spec import build_request
    from tests.unit.requests import profile_from

    def make(spec_extra: dict[str, Any], **profile: Any) -> KernelRequest:
        spec = {"kernelId": str(uuid.uuid4()), "username": "a", **spec_extra}
        return build_request(
            "ns",
            "k",
            "u",
            spec,
            profile_from({"backend": "docker", **profile}),
            OperatorSettings.from_env({}),
        )

    allowed = {"images": ["s:1", "e:*"]}
    both = make({"image": "s:1", "env": {"KERNEL_IMAGE": "e:1"}}, **allowed)
    assert kernel_image(both, "o:1", "docker") == "s:1"
    assert kernel_image(make({"env": {"KERNEL_IMAGE": "e:2"}}, **allowed), "o:1", "docker") == "e:2"
    assert kernel_image(make({}, image="p:1"), "o:1", "docker") == "p:1"
    assert kernel_image(make({}), "o:1", "docker") == "o:1"
    # What the profile does not allow is refused, from the spec or from KERNEL_IMAGE alike.
    for extra in ({"image": "evil:1"}, {"env": {"KERNEL_IMAGE": "evil:1"}}):
        with pytest.raises(SpecError, match="not an image profile p allows") as refused:
            make(extra, **allowed)
        assert refused.value.reason == "ImageNotAllowed"
    with pytest.raises(SpecError, match="RKO_KERNEL_IMAGE") as err:
        kernel_image(request("sparkApplication"), "", "sparkApplication")
    assert err.value.reason == "ImageMissing" and "sparkApplication backend" in str(err.value)
