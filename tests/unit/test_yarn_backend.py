"""The yarn backend: its pure builders and state mapping, and the backend over a fake ResourceManager.

The fake stands in for our own seam (``ResourceManagerClient``); the real ResourceManager is
exercised by tests/integration/test_yarn_backend.py.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from kernel_launchers.protocol import encode_key
from kernel_launchers.python_launcher import SPARK_INIT, TOREE_JAVA_OPTIONS, kernel_command, parse_args
from kernel_operator.backends.base import LaunchPlan
from kernel_operator.backends.yarn import (
    TOKEN_SECRET,
    YarnBackend,
    YarnOptions,
    application_state,
    check_spark_opts,
    properties_text,
    spark_properties,
    spark_submit_command,
    submission,
    submitted_application_id,
    yarn_options,
)
from kernel_operator.errors import BackendError, BackendUnavailable, SpecError
from kernel_operator.settings import OperatorSettings, YarnSettings
from kernel_operator.spec import KernelRequest
from tests.unit.requests import request_from

RM = "http://rm-a:8088"
RM_B = "http://rm-b:8088"
ENV = {
    "RKO_YARN_ENDPOINT": RM,
    "RKO_YARN_ALT_ENDPOINT": RM_B,
    "RKO_YARN_AM_JAR": "/opt/rko/rko-yarn-am.jar",
    "RKO_YARN_PYTHON": "/opt/py/bin/python",
}


def settings(**env: str) -> OperatorSettings:
    return OperatorSettings.from_env({**ENV, **env})


def request(
    env: dict[str, str] | None = None, ops: OperatorSettings | None = None, **spec: Any
) -> KernelRequest:
    base: dict[str, Any] = {"kernelId": str(uuid.uuid4()), "username": "alice", "backend": "yarn"}
    base.update(spec)
    if env:
        base["env"] = env
    return request_from(base, ops or settings(), name="k", uid="uid")


def options(req: KernelRequest, ops: OperatorSettings | None = None) -> YarnOptions:
    return yarn_options(req, (ops or settings()).yarn, "operator")


# -- options ----------------------------------------------------------------------------------


def test_settings_are_read_from_the_environment() -> None:
    yarn = settings(RKO_YARN_QUEUE="q1", RKO_YARN_QUEUE_WAIT_SECONDS="5").yarn
    assert yarn.endpoint == RM and yarn.alt_endpoint == RM_B
    assert yarn.allowed_endpoints == (RM, RM_B)  # by default the spec may name only these
    assert yarn.queue == "q1" and yarn.queue_wait == 5
    assert yarn.am_jar.endswith("rko-yarn-am.jar") and "{{HADOOP_CONF_DIR}}" in yarn.am_classpath


def test_the_spec_wins_over_kernel_variables_which_win_over_the_operator() -> None:
    env = {"KERNEL_QUEUE": "from-env", "KERNEL_NODE_LABEL": "cpu", "KERNEL_DRIVER_MEMORY": "2g"}
    queues = ["from-spec", "from-env"]  # what the profile lets tenants choose
    opts = options(request(env=env, yarn={"queue": "from-spec", "queues": queues}))
    assert opts.queue == "from-spec" and opts.node_label == "cpu" and opts.driver_memory == "2g"
    assert options(request(env=env, yarn={"queues": queues})).queue == "from-env"
    assert options(request()).queue == "default"
    from kernel_operator.spec import build_request
    from tests.unit.requests import profile_from

    etl = profile_from({"backend": "yarn", "yarn": {"queue": "etl"}})
    tenant = {"kernelId": str(uuid.uuid4()), "username": "alice"}
    assert (
        options(build_request("ns", "k", "u", tenant, etl, settings())).queue == "etl"
    )  # the profile's default
    assert opts.endpoints == (RM, RM_B) and opts.user == "operator"


def test_impersonation_makes_the_kernels_user_the_applications_user() -> None:
    ops = settings(RKO_IMPERSONATION="true")
    assert options(request(ops=ops), ops).user == "alice"


@pytest.mark.parametrize(
    ("spec", "reason", "words"),
    [
        ({"endpoint": "http://10.0.0.9:8088"}, "EndpointNotAllowed", "10.0.0.9"),
        ({"altEndpoint": "http://evil:8088"}, "EndpointNotAllowed", "evil"),
        ({"queue": "a queue"}, "InvalidQueue", "a queue"),
        ({"nodeLabel": "gpu&&x"}, "InvalidNodeLabel", "gpu&&x"),
        ({"spark": True, "driverMemory": "lots"}, "InvalidMemory", "lots"),
        (
            {"sparkOpts": "--conf a=b", "allowedSparkOptions": ["a"]},
            "InvalidSparkOptions",
            "spec.yarn.spark is false",
        ),
        (
            {"spark": True, "sparkOpts": "--conf spark.x=1"},
            "InvalidSparkOptions",
            "allows only no Spark options",
        ),
        (
            {
                "spark": True,
                "sparkOpts": "--jars /var/run/secrets/kubernetes.io/serviceaccount/token",
                "allowedSparkOptions": ["--jars"],
            },
            "InvalidSparkOptions",
            "only remote URIs",
        ),
        (
            {
                "spark": True,
                "sparkOpts": "--conf spark.files=file:///etc/passwd",
                "allowedSparkOptions": ["spark.*"],
            },
            "InvalidSparkOptions",
            "only remote URIs",
        ),
        ({"queue": "root.admins", "queues": ["analytics"]}, "QueueNotAllowed", "root.admins"),
        ({"spark": True, "sparkOpts": "--proxy-user bob"}, "InvalidSparkOptions", "--proxy-user"),
        ({"spark": True, "sparkOpts": "--master local"}, "InvalidSparkOptions", "--master"),
        ({"spark": True, "sparkOpts": "--deploy-mode=client"}, "InvalidSparkOptions", "--deploy-mode"),
        (
            {"spark": True, "sparkOpts": "--conf spark.yarn.queue=x"},
            "InvalidSparkOptions",
            "spark.yarn.queue",
        ),
        ({"spark": True, "sparkOpts": "-c spark.master=local"}, "InvalidSparkOptions", "spark.master"),
        (
            {"spark": True, "sparkOpts": "--conf=spark.kerberos.keytab=/k"},
            "InvalidSparkOptions",
            "spark.kerberos",
        ),
        (
            {"spark": True, "sparkOpts": "--conf spark.yarn.appMasterEnv.RKO_LAUNCH_TOKEN=x"},
            "InvalidSparkOptions",
            "RKO_LAUNCH_TOKEN",
        ),
        ({"spark": True, "sparkOpts": "--conf 'unclosed"}, "InvalidSparkOptions", "shell words"),
        ({"spark": True, "sparkInitMode": "never"}, "InvalidSpec", "sparkInitMode"),
    ],
)
def test_bad_yarn_choices_are_refused_with_what_to_change(
    spec: dict[str, Any], reason: str, words: str
) -> None:
    with pytest.raises(SpecError) as err:
        options(request(yarn=spec))
    assert err.value.reason == reason and words in str(err.value)


def test_a_yarn_kernel_without_a_resource_manager_says_what_to_set() -> None:
    ops = OperatorSettings.from_env({})
    with pytest.raises(SpecError, match="RKO_YARN_ENDPOINT") as err:
        yarn_options(request(ops=ops), ops.yarn, "operator")
    assert err.value.reason == "YarnNotConfigured"


def test_extra_spark_options_from_kernel_variables_are_checked_too() -> None:
    with pytest.raises(SpecError, match="--keytab"):
        options(request(env={"KERNEL_EXTRA_SPARK_OPTS": "--keytab /etc/k"}, yarn={"spark": True}))
    allowed = ["spark.sql.*", "--py-files"]
    words = "--conf spark.sql.shuffle.partitions=4 --py-files hdfs:///a.zip"
    assert check_spark_opts(words, "x", allowed) == (
        "--conf",
        "spark.sql.shuffle.partitions=4",
        "--py-files",
        "hdfs:///a.zip",
    )
    with pytest.raises(SpecError, match="only remote URIs"):
        check_spark_opts("--py-files a.zip", "x", allowed)  # a path on the operator's machine
    with pytest.raises(SpecError, match=r"may not set spark\.executor\.instances"):
        check_spark_opts("--conf spark.executor.instances=100", "x", allowed)


# -- what is submitted ------------------------------------------------------------------------


def test_the_rest_submission_carries_the_token_only_as_a_credentials_secret() -> None:
    req = request(resources={"memory": "512Mi", "cpu": "1500m"}, yarn={"nodeLabel": "gpu"})
    ops = settings()
    args = ["--kernel-id", req.kernel_id, "--kernel-class-name", "a b"]
    body = submission("application_1_0001", req, options(req), ops.yarn, args, "s3cret-token")
    spec = body["am-container-spec"]
    command = spec["commands"]["command"]
    assert command.startswith(
        "{{JAVA_HOME}}/bin/java -Xmx64m io.kerneloperator.yarnam.LauncherAM /opt/py/bin/python"
    )
    assert "'a b'" in command and "<LOG_DIR>/am.stderr" in command
    env = {e["key"]: e["value"] for e in spec["environment"]["entry"]}
    assert env["KERNEL_ID"] == req.kernel_id and env["CLASSPATH"].endswith("<CPS>/opt/rko/rko-yarn-am.jar")
    secrets = spec["credentials"]["secrets"]["entry"]
    assert secrets == [{"key": TOKEN_SECRET, "value": base64.b64encode(b"s3cret-token").decode()}]
    assert "s3cret-token" not in command and "s3cret-token" not in str(env)
    assert body["application-tags"] == {"tag": [f"rko-kernel-{req.kernel_id}", "rko-uid-uid"]}
    assert body["max-app-attempts"] == 1 and body["queue"] == "default"
    assert body["resource"] == {"memory": 512, "vCores": 2}
    assert body["app-node-label-expression"] == body["am-container-node-label-expression"] == "gpu"


def test_spark_submit_runs_in_cluster_mode_with_the_token_as_a_file() -> None:
    ops = settings(RKO_SPARK_OPTS="--conf spark.yarn.archive=hdfs:///spark.zip", RKO_IMPERSONATION="true")
    req = request(
        ops=ops,
        yarn={
            "spark": True,
            "executorMemory": "1g",
            "nodeLabel": "gpu",
            "sparkOpts": "--conf spark.x=1",
            "allowedSparkOptions": ["spark.x"],
        },
    )
    argv = spark_submit_command(
        req, options(req, ops), ops.yarn, ["--kernel-id", req.kernel_id], "/tmp/t/token", "/tmp/t/p", True
    )
    joined = " ".join(argv)
    assert argv[0] == "spark-submit"
    assert "--master yarn --deploy-mode cluster" in joined and "--properties-file /tmp/t/p" in joined
    assert "--files /tmp/t/token#rko-launch-token" in joined
    assert "--proxy-user alice" in joined and "--executor-memory 1g" in joined
    # The tenant's options first; the operator's after them (spark-submit keeps the last of a
    # repeated option), then the administrator's own; the driver and its arguments last.
    assert joined.index("spark.x=1") < joined.index("--master") < joined.index("spark.yarn.archive")
    assert joined.index("spark.yarn.archive") < joined.index("spark_driver.py")
    assert argv[-4:] == ["--token-file", "rko-launch-token", "--spark-context-initialization-mode", "lazy"]
    # The kernel's variables are in the properties file, never on the command line.
    assert "KERNEL_ID" not in joined
    conf = spark_properties(req, options(req, ops), ops.yarn)
    assert conf["spark.yarn.tags"] == f"rko-kernel-{req.kernel_id},rko-uid-uid"
    assert conf["spark.yarn.am.nodeLabelExpression"] == "gpu" and conf["spark.yarn.queue"] == "default"
    assert conf["spark.yarn.appMasterEnv.KERNEL_ID"] == req.kernel_id
    assert properties_text({"a": "x\ny=1"}) == "a=x\\ny\\=1\n"  # a value cannot start an entry
    eager = request(ops=ops, yarn={"spark": True, "sparkInitMode": "eager"})
    assert spark_submit_command(eager, options(eager, ops), ops.yarn, [], "/t", "/p", False)[-1] == "eager"
    not_impersonating = spark_submit_command(req, options(req, ops), ops.yarn, [], "/t", "/p", False)
    assert "--proxy-user" not in not_impersonating


def test_a_scala_kernel_is_toree_as_the_cluster_mode_driver_with_spark_eager() -> None:
    ops = settings(RKO_TOREE_ASSEMBLY="/opt/toree/toree-assembly.jar")
    req = request(ops=ops, kernel={"language": "scala"})  # no yarn.spark: Toree is Spark
    opts = options(req, ops)
    assert opts.spark and opts.spark_init == "eager"
    argv = spark_submit_command(req, opts, ops.yarn, ["--kernel-language", "scala"], "/t", "/p", False)
    joined = " ".join(argv)
    assert "--master yarn --deploy-mode cluster" in joined and "spark_driver.py" not in joined
    main = argv.index("--class")
    assert argv[main : main + 5] == [
        "--class",
        "io.kerneloperator.yarnam.ToreeDriver",
        "--jars",
        "/opt/toree/toree-assembly.jar",
        "/opt/rko/rko-yarn-am.jar",
    ]
    assert argv[-4:] == ["--token-file", "rko-launch-token", "--spark-context-initialization-mode", "eager"]
    conf = spark_properties(req, opts, ops.yarn)
    assert conf["spark.yarn.appMasterEnv.RKO_LAUNCHER_PYTHON"] == "/opt/py/bin/python"
    assert conf["spark.driver.extraJavaOptions"] == TOREE_JAVA_OPTIONS
    lazy = request(ops=ops, kernel={"language": "scala"}, yarn={"sparkInitMode": "lazy"})
    assert options(lazy, ops).spark_init == "lazy"
    with pytest.raises(SpecError, match="Python or Scala") as refused:
        options(request(ops=ops, kernel={"language": "r"}, yarn={"spark": True}), ops)
    assert refused.value.reason == "LanguageNotSupported"


# -- state ------------------------------------------------------------------------------------

NOW = 1_000_000.0


def app(state: str, final: str = "UNDEFINED", **extra: Any) -> dict[str, Any]:
    return {
        "id": "application_1_0007",
        "state": state,
        "finalStatus": final,
        "queue": "q",
        "startedTime": NOW,
        **extra,
    }


@pytest.mark.parametrize(
    ("report", "state", "reason"),
    [
        (app("NEW"), "starting", ""),
        (app("NEW_SAVING"), "starting", ""),
        (app("SUBMITTED"), "starting", ""),
        (app("ACCEPTED"), "starting", ""),
        (app("RUNNING"), "running", ""),
        (app("FINISHED", "SUCCEEDED"), "succeeded", "ApplicationFinished"),
        (app("FINISHED", "FAILED", diagnostics="launcher exited with code 3"), "failed", "ApplicationFailed"),
        (app("FAILED", "FAILED", diagnostics="unknown queue: q"), "failed", "ApplicationFailed"),
        (app("KILLED", "KILLED", diagnostics="Application killed by user."), "failed", "ApplicationKilled"),
    ],
)
def test_yarn_states_map_to_the_kernels_state(report: dict[str, Any], state: str, reason: str) -> None:
    status = application_state(report, NOW + 1000, queue_wait=60)
    assert status.state == state and status.reason == reason
    if report.get("diagnostics"):
        assert report["diagnostics"] in status.message and "application_1_0007" in status.message


def test_an_application_waiting_for_room_fails_after_the_queue_wait() -> None:
    waiting = app("ACCEPTED", diagnostics="Queue's AM resource limit exceeded.")
    assert application_state(waiting, NOW + 59_000, queue_wait=60).state == "starting"
    status = application_state(waiting, NOW + 61_000, queue_wait=60)
    assert status.state == "failed" and status.reason == "QueueFull"
    assert "'q'" in status.message and "AM resource limit exceeded" in status.message
    # Its ApplicationMaster has a container: it is starting, not waiting for room.
    started = app("ACCEPTED", amContainerLogs="http://nm/logs")
    assert application_state(started, NOW + 61_000, queue_wait=60).state == "starting"


def test_the_application_id_is_read_from_spark_submits_output() -> None:
    out = "INFO Client: Submitting application application_17_0003 to ResourceManager\nINFO ... application_17_0004"
    assert submitted_application_id(out) == "application_17_0004"
    assert submitted_application_id("nothing here") is None


# -- the backend over a fake ResourceManager --------------------------------------------------


class FakeResourceManager:
    def __init__(self) -> None:
        self.apps: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, ...]] = []
        self.endpoints: Sequence[str] = ()
        self.started = 0.0  # long ago

    def new_application(self, user: str) -> str:
        self.calls.append(("new", user))
        return f"application_1_{len(self.apps) + 1:04d}"

    def submit(self, body: dict[str, Any], user: str) -> None:
        self.calls.append(("submit", user))
        self.apps[body["application-id"]] = {
            "id": body["application-id"],
            "state": "ACCEPTED",
            "body": body,
            "applicationTags": ",".join(body["application-tags"]["tag"]),  # as YARN reports them
        }

    def application(self, app_id: str) -> dict[str, Any] | None:
        return self.apps.get(app_id)

    def find_by_tag(self, tag: str) -> dict[str, Any] | None:
        found = [
            a
            for a in self.apps.values()
            if tag in a.get("body", {}).get("application-tags", {}).get("tag", [])
        ]
        return found[-1] if found else None

    def started_on(self) -> float:
        return self.started

    def live_applications(self, types: Sequence[str]) -> dict[str, dict[str, Any]]:
        self.calls.append(("list",))
        live = ("NEW", "NEW_SAVING", "SUBMITTED", "ACCEPTED", "RUNNING")
        return {i: a for i, a in self.apps.items() if a.get("state") in live}

    def kill(self, app_id: str, user: str) -> None:
        self.calls.append(("kill", app_id, user))
        self.apps[app_id]["state"] = "KILLED"


def backend(fake: FakeResourceManager, ops: OperatorSettings | None = None) -> YarnBackend:
    def factory(endpoints: Sequence[str], timeout: float, security: bool) -> Any:
        fake.endpoints = endpoints
        return fake

    return YarnBackend((ops or settings()).yarn, factory)


def plan(req: KernelRequest) -> LaunchPlan:
    return LaunchPlan(req, "127.0.0.1:8877", b"k" * 32, "tok", "/tmp/x")


def test_a_plain_kernel_is_submitted_found_and_killed_once() -> None:
    fake = FakeResourceManager()
    yarn = backend(fake)
    req = request()
    ref = asyncio.run(yarn.launch(plan(req)))
    assert ref["applicationId"] == "application_1_0001" and ref["endpoints"] == [RM, RM_B]
    command = fake.apps["application_1_0001"]["body"]["am-container-spec"]["commands"]["command"]
    assert "--exit-with-parent" in command and "--run-dir rko-run" in command
    assert encode_key(b"k" * 32) in command
    assert asyncio.run(yarn.find(req)) == ref
    assert asyncio.run(yarn.status(ref)).state == "starting"
    asyncio.run(yarn.stop({**ref, "applicationId": "application_1_0001"}, "another-uid"))
    assert not [c for c in fake.calls if c[0] == "kill"]  # not tagged with that uid: left alone
    asyncio.run(yarn.stop(ref, "uid"))
    asyncio.run(yarn.stop(ref, "uid"))  # idempotent: an ended application is not killed again
    assert [c for c in fake.calls if c[0] == "kill"] == [("kill", "application_1_0001", yarn.operator_user)]
    assert fake.calls[0] == ("new", yarn.operator_user)


def test_twenty_kernels_on_one_resource_manager_cost_one_list() -> None:
    """Each kernel used to ask the ResourceManager for its own report every second; the live
    applications are listed once for all, and only one that ended is reported alone."""
    fake = FakeResourceManager()
    yarn = backend(fake)

    async def run() -> list[str]:
        refs = [await yarn.launch(plan(request())) for _ in range(20)]
        fake.apps[refs[0]["applicationId"]]["state"] = "FINISHED"
        fake.apps[refs[0]["applicationId"]]["finalStatus"] = "SUCCEEDED"
        fake.calls.clear()
        states = await asyncio.gather(*(yarn.status(ref) for ref in refs))
        return [s.state for s in states]

    states = asyncio.run(run())
    assert states[0] == "succeeded" and set(states[1:]) == {"starting"}
    assert fake.calls == [("list",)]


def test_a_plain_kernel_needs_the_application_master_jar() -> None:
    ops = settings(RKO_YARN_AM_JAR="")
    with pytest.raises(SpecError, match="RKO_YARN_AM_JAR"):
        asyncio.run(backend(FakeResourceManager(), ops).launch(plan(request(ops=ops))))


class SparkBackend(YarnBackend):
    """The spark-submit seam replaced: records the argv and answers with canned output."""

    def __init__(self, fake: FakeResourceManager, code: int, output: str) -> None:
        super().__init__(settings().yarn, lambda *_: fake)
        self.result = (code, output)
        self.argv: list[str] = []
        self.token_seen = ""

    async def run_spark_submit(self, argv: list[str], options: YarnOptions) -> tuple[int, str]:
        self.argv = argv
        token_file = argv[argv.index("--files") + 1].split("#")[0]
        with open(token_file) as handle:
            self.token_seen = handle.read()
        return self.result


def test_a_spark_kernel_is_submitted_by_spark_submit() -> None:
    yarn = SparkBackend(FakeResourceManager(), 0, "INFO Submitted application application_9_0042\n")
    ref = asyncio.run(yarn.launch(plan(request(yarn={"spark": True}))))
    assert ref["applicationId"] == "application_9_0042" and ref["spark"] is True
    assert yarn.token_seen == "tok" and "tok" not in yarn.argv


def test_a_failed_spark_submit_fails_the_launch_with_its_output() -> None:
    yarn = SparkBackend(FakeResourceManager(), 1, "Exception in thread main: queue nosuch does not exist")
    with pytest.raises(BackendError, match="queue nosuch does not exist") as err:
        asyncio.run(yarn.launch(plan(request(yarn={"spark": True}))))
    assert err.value.reason == "SparkSubmitFailed"


def test_a_secured_resource_manager_without_kerberos_support_is_refused_clearly() -> None:
    with pytest.raises(SpecError, match="requests-kerberos") as err:
        asyncio.run(backend(FakeResourceManager()).launch(plan(request(yarn={"securityEnabled": True}))))
    assert err.value.reason == "KerberosUnavailable"


# -- the launcher's part ----------------------------------------------------------------------


def test_a_spark_kernel_starts_spark_before_serving() -> None:
    cmd = kernel_command(Path("/r/kernel.json"), None, spark_init="eager")
    assert cmd[-1] == f"--IPKernelApp.exec_lines={SPARK_INIT['eager']}"
    assert "getOrCreate()" in SPARK_INIT["eager"] and "Thread" in SPARK_INIT["lazy"]
    assert not any("exec_lines" in part for part in kernel_command(Path("/r"), None))


def test_the_launcher_can_follow_its_parent() -> None:
    base = [
        "--kernel-id",
        str(uuid.uuid4()),
        "--response-address",
        "h:1",
        "--public-key",
        encode_key(b"k" * 32),
    ]
    assert parse_args([*base, "--token", "t", "--exit-with-parent"]).exit_with_parent
    assert not parse_args([*base, "--token", "t"]).exit_with_parent


def test_yarn_settings_defaults_are_usable() -> None:
    assert YarnSettings().am_memory_mb == 256 and YarnSettings().queue == "default"


def test_an_application_the_resource_manager_does_not_know_is_not_gone_at_once() -> None:
    fake = FakeResourceManager()
    yarn = backend(fake)
    ref = {"applicationId": "application_1_0099", "endpoints": [RM]}
    # The kernel fails only after the unreachable grace (the lifecycle's), never on one answer.
    with pytest.raises(BackendUnavailable, match="application_1_0099") as err:
        asyncio.run(yarn.status(ref))
    assert err.value.reason == "ApplicationUnknown"
    asyncio.run(yarn.stop(ref, "uid"))  # up for long: nothing there to kill
    fake.started = time.time() * 1000 - 5_000  # restarted 5 s ago: still recovering
    with pytest.raises(BackendUnavailable) as err:
        asyncio.run(yarn.stop(ref, "uid"))  # deletion waits rather than leave a recovered application running
    assert err.value.reason == "ResourceManagerRecovering"
