"""The yarn backend (gateway_provisioners' YarnProvisioner): a kernel as a YARN application.

Two ways in, both tagged with the kernel id so a restarted operator finds what it started:

- a plain kernel is submitted through the ResourceManager's REST API; its ApplicationMaster is
  LauncherAM (launchers/yarn_am), which registers with YARN and runs the kernel launcher;
- a Spark kernel (``yarn.spark``) is submitted by ``spark-submit --master yarn --deploy-mode
  cluster``; the launcher is the Spark driver and the kernel gets ``spark`` and ``sc``.

The launch token never appears on a command line or in the environment: it travels as a secret
in the application's credentials (REST) or as a localized file (Spark). The builders here are
pure; ``resource_manager`` is the only module that talks to YARN.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import getpass
import importlib.util
import logging
import math
import os
import re
import shlex
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kernel_launchers
from kernel_launchers.python_launcher import TOREE_JAVA_OPTIONS, KernelNotInstalled, toree_assembly

from ..errors import BackendError, BackendUnavailable, SpecError
from ..launch_command import LAUNCHER_MODULE, launcher_args
from ..quantities import cpu_nanos, memory_bytes
from ..settings import YarnSettings
from ..spec import KernelRequest
from .base import BackendRef, BackendStatus, LaunchPlan
from .batching import Batcher
from .blocking import BlockingPool
from .resource_manager import FINAL_STATES, ResourceManagerClient, kerberos_auth

log = logging.getLogger(__name__)
AM_CLASS = "io.kerneloperator.yarnam.LauncherAM"
TOKEN_SECRET = "rko.launch.token"  # LauncherAM reads it from the application's credentials
TOKEN_FILE = "rko-launch-token"  # the localized token file's name in a Spark driver's directory
RUN_DIR = "rko-run"  # relative: the launcher's files stay in the container's own directory
APPLICATION_TYPE = "JUPYTER_KERNEL"
SPARK_DRIVER = str(Path(kernel_launchers.__file__).with_name("spark_driver.py"))
TOREE_DRIVER = "io.kerneloperator.yarnam.ToreeDriver"  # in rko-yarn-am.jar (RKO_YARN_AM_JAR)
STARTING = ("NEW", "NEW_SAVING", "SUBMITTED", "ACCEPTED")
STOP_WAIT_SECONDS = 15.0
YARN_THREADS = 8  # REST calls to ResourceManagers, apart from other backends'
# A ResourceManager answers REST calls before it has recovered its applications after a
# restart; for this long after its start an unknown application is "not yet", not "gone".
RECOVERY_SECONDS = 60.0

_QUEUE = re.compile(r"^[A-Za-z0-9_.-]{1,253}$")
_LABEL = re.compile(r"^[A-Za-z0-9_-]{1,253}$")
_SPARK_MEMORY = re.compile(r"^[0-9]+[kmgtKMGT]?$")
_APP_ID = re.compile(r"\bapplication_[0-9]+_[0-9]+\b")

# spark-submit options no profile may open to tenants: they decide where and as whom the kernel
# runs, or are the operator's own.
OPERATOR_SPARK_FLAGS = frozenset(
    {"--master", "--deploy-mode", "--proxy-user", "--principal", "--keytab", "--queue", "--class", "--name"}
)
OPERATOR_SPARK_CONF = frozenset(
    {
        "spark.master",
        "spark.submit.deployMode",
        "spark.yarn.queue",
        "spark.yarn.tags",
        "spark.yarn.principal",
        "spark.yarn.keytab",
        "spark.pyspark.python",
        "spark.pyspark.driver.python",
        "spark.yarn.submit.waitAppCompletion",
        "spark.yarn.maxAppAttempts",
    }
)
OPERATOR_SPARK_CONF_PREFIXES = ("spark.kerberos.", "spark.yarn.appMasterEnv.RKO_", "spark.executorEnv.RKO_")
# Options that ship files or set class paths: a tenant's value must be a remote URI (hdfs://,
# s3a://…), never a path on the operator's machine (whose token and keys it would upload).
FILE_FLAGS = frozenset(
    {
        "--jars",
        "--files",
        "--py-files",
        "--archives",
        "--properties-file",
        "--driver-class-path",
        "--driver-library-path",
        "--driver-java-options",
        "--packages",
        "--repositories",
        "--exclude-packages",
        "--conf-file",
    }
)
FILE_CONF_PREFIXES = (
    "spark.jars",
    "spark.files",
    "spark.submit.pyFiles",
    "spark.archives",
    "spark.yarn.dist.",
    "spark.yarn.jars",
    "spark.yarn.archive",
    "spark.driver.extraClassPath",
    "spark.driver.extraLibraryPath",
    "spark.driver.extraJavaOptions",
    "spark.executor.extraClassPath",
    "spark.executor.extraLibraryPath",
    "spark.executor.extraJavaOptions",
    "spark.yarn.am.extraJavaOptions",
    "spark.yarn.am.extraLibraryPath",
    "spark.driver.resource.",
    "spark.executor.resource.",
    "spark.kubernetes.",
    "spark.yarn.keytab",
    "spark.yarn.principal",
)
_REMOTE_URI = re.compile(r"^(hdfs|viewfs|s3a|s3|gs|abfss?|wasbs?|https?)://[^\s]+$")


@dataclass(frozen=True)
class YarnOptions:
    """A kernel's YARN choices: the spec first, then its KERNEL_* variables, then the operator's."""

    endpoints: tuple[str, ...]
    security_enabled: bool
    queue: str
    node_label: str | None
    spark: bool
    spark_opts: tuple[str, ...]
    driver_memory: str | None
    executor_memory: str | None
    queue_wait: float
    user: str
    spark_init: str = "lazy"
    admin_spark_opts: tuple[str, ...] = ()  # the profile's own, applied after the tenant's


def application_tag(kernel_id: str) -> str:
    """YARN lower-cases tags; kernel ids are lower-case already."""
    return f"rko-kernel-{kernel_id}"


def owner_tag(uid: str) -> str:
    """The RemoteKernel's uid as a tag: what the operator finds and stops applications by."""
    return f"rko-uid-{uid.lower()}"


def application_tags(request: KernelRequest) -> list[str]:
    return [application_tag(request.kernel_id), owner_tag(request.uid)]


def _pick(request: KernelRequest, field: str, variable: str) -> str | None:
    """A tenant's choice: its spec's yarn block, else its KERNEL_* variable (both checked later)."""
    value = request.tenant_config.get(field)
    if value is None or value == "":
        value = request.env.get(variable)
    return str(value) if value not in (None, "") else None


def _endpoint(value: str | None, default: str, allowed: Sequence[str], field: str) -> str:
    if value is None:
        return default
    endpoint = value.rstrip("/")
    if endpoint not in allowed:
        raise SpecError(
            f"spec.yarn.{field} {endpoint!r} is not a ResourceManager this operator may use; allowed: "
            f"{', '.join(allowed) or 'none'} (RKO_YARN_ALLOWED_ENDPOINTS).",
            reason="EndpointNotAllowed",
        )
    return endpoint


def _split_opts(text: str, source: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as err:
        raise SpecError(f"{source} is not valid shell words: {err}", reason="InvalidSparkOptions") from err


def _option_pairs(words: Sequence[str], source: str) -> list[tuple[str, str | None]]:
    """spark-submit words as (flag, value) pairs; a --conf's key is part of its flag: '--conf key'."""
    pairs: list[tuple[str, str | None]] = []
    index = 0
    while index < len(words):
        word = words[index]
        if not word.startswith("-"):
            raise SpecError(
                f"{source}: {word!r} is not an option (the operator gives the main file).",
                reason="InvalidSparkOptions",
            )
        flag, sep, value = word.partition("=")
        if not sep and index + 1 < len(words) and not words[index + 1].startswith("--"):
            index += 1
            value, sep = words[index], "="
        if flag in ("--conf", "-c"):
            key, _, conf_value = value.partition("=")
            pairs.append((f"--conf {key}", conf_value))
        else:
            pairs.append((flag, value if sep else None))
        index += 1
    return pairs


def check_spark_opts(text: str, source: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """A tenant's extra spark-submit options, allowed only where the profile lists them.

    Flags (``--driver-cores``) and --conf keys (``spark.executor.instances``, or prefixes ending
    in '*') must be in ``allowed``; those that decide where or as whom the kernel runs never
    are; those that ship files must name remote URIs, never paths on the operator's machine.
    """
    words = _split_opts(text, source)
    for flag, value in _option_pairs(words, source):
        key = flag.removeprefix("--conf ")
        if (
            flag in OPERATOR_SPARK_FLAGS
            or key in OPERATOR_SPARK_CONF
            or key.startswith(OPERATOR_SPARK_CONF_PREFIXES)
        ):
            raise SpecError(
                f"{source} may not set {key}: the operator decides it (spec.yarn.queue for the queue; "
                "impersonation is the profile's).",
                reason="InvalidSparkOptions",
            )
        if not any(key == entry or (entry.endswith("*") and key.startswith(entry[:-1])) for entry in allowed):
            raise SpecError(
                f"{source} may not set {key}: the profile allows only "
                f"{', '.join(allowed) or 'no Spark options'} (yarn.allowedSparkOptions).",
                reason="InvalidSparkOptions",
            )
        ships_files = flag in FILE_FLAGS or key.startswith(FILE_CONF_PREFIXES)
        if ships_files and not all(_REMOTE_URI.match(item) for item in (value or "").split(",") if item):
            raise SpecError(
                f"{source}: {key} may name only remote URIs (hdfs://, s3a://, https://…), not local paths.",
                reason="InvalidSparkOptions",
            )
    return tuple(words)


def yarn_options(request: KernelRequest, settings: YarnSettings, operator_user: str) -> YarnOptions:
    """Check a kernel's YARN choices against the operator's policy. Pure."""
    config = request.backend_config
    default_queue = str(config.get("queue") or settings.queue)
    queue = _pick(request, "queue", "KERNEL_QUEUE") or default_queue
    if not _QUEUE.match(queue):
        raise SpecError(f"YARN queue {queue!r} is not a valid queue name.", reason="InvalidQueue")
    allowed_queues = {default_queue, *(str(q) for q in config.get("queues") or ())}
    if queue not in allowed_queues:
        raise SpecError(
            f"YARN queue {queue!r} is not one profile {request.profile} allows "
            f"({', '.join(sorted(allowed_queues))}).",
            reason="QueueNotAllowed",
        )
    label = _pick(request, "nodeLabel", "KERNEL_NODE_LABEL")
    if label is not None and not _LABEL.match(label):
        raise SpecError(
            f"YARN node label {label!r} is not a valid label (letters, digits, '_', '-').",
            reason="InvalidNodeLabel",
        )
    memories: dict[str, str | None] = {}
    for field, variable in (
        ("driverMemory", "KERNEL_DRIVER_MEMORY"),
        ("executorMemory", "KERNEL_EXECUTOR_MEMORY"),
    ):
        value = _pick(request, field, variable)
        if value is not None and not _SPARK_MEMORY.match(value):
            raise SpecError(
                f"{field} {value!r} is not a Spark memory size such as 512m or 2g.", reason="InvalidMemory"
            )
        memories[field] = value
    opts_text = _pick(request, "sparkOpts", "KERNEL_EXTRA_SPARK_OPTS") or ""
    # A Scala kernel is Toree, which is the Spark driver itself.
    spark = bool(config.get("spark")) or request.language == "scala"
    allowed_opts = [str(o) for o in config.get("allowedSparkOptions") or ()]
    spark_opts = (
        check_spark_opts(opts_text, "spec.yarn.sparkOpts / KERNEL_EXTRA_SPARK_OPTS", allowed_opts)
        if opts_text
        else ()
    )
    if spark_opts and not spark:
        raise SpecError(
            "Spark options were given, but spec.yarn.spark is false: set it to launch through spark-submit.",
            reason="InvalidSparkOptions",
        )
    if spark and request.language not in ("python", "scala"):
        raise SpecError(
            "Spark kernels on YARN are Python or Scala kernels here.", reason="LanguageNotSupported"
        )
    # Scala: eager, as the launcher defaults (a lazy Spark loses Toree's first interrupt).
    spark_init = str(
        _pick(request, "sparkInitMode", "KERNEL_SPARK_INIT_MODE")
        or ("eager" if request.language == "scala" else "lazy")
    )
    if spark_init not in ("lazy", "eager"):
        raise SpecError(f"spec.yarn.sparkInitMode {spark_init!r} is not lazy or eager.", reason="InvalidSpec")
    # The tenant's choices are checked first: a refusal never depends on the cluster's setup.
    endpoint = _endpoint(config.get("endpoint"), settings.endpoint, settings.allowed_endpoints, "endpoint")
    alt = _endpoint(
        config.get("altEndpoint"), settings.alt_endpoint, settings.allowed_endpoints, "altEndpoint"
    )
    if not endpoint:
        raise SpecError(
            "The yarn backend has no ResourceManager: set RKO_YARN_ENDPOINT (e.g. http://rm:8088) "
            "in the operator, or spec.yarn.endpoint to one it allows.",
            reason="YarnNotConfigured",
        )
    wait = config.get("queueWaitSeconds")
    security = config.get("securityEnabled")
    return YarnOptions(
        endpoints=tuple(e for e in (endpoint, alt) if e),
        security_enabled=settings.security_enabled if security is None else bool(security),
        queue=queue,
        node_label=label,
        spark=spark,
        spark_opts=spark_opts,
        driver_memory=memories["driverMemory"],
        executor_memory=memories["executorMemory"],
        queue_wait=float(wait) if wait else settings.queue_wait,
        user=request.run_as or operator_user,
        spark_init=spark_init,
        admin_spark_opts=tuple(
            _split_opts(str(config.get("sparkOpts") or ""), "the profile's yarn.sparkOpts")
        ),
    )


def am_command(settings: YarnSettings, args: Sequence[str]) -> str:
    """The ApplicationMaster's command; YARN runs it with bash and expands <LOG_DIR> itself."""
    q = shlex.quote
    launcher = " ".join([q(settings.python), "-m", LAUNCHER_MODULE, *map(q, args)])
    return f"{settings.java} -Xmx64m {AM_CLASS} {launcher} 1><LOG_DIR>/am.stdout 2><LOG_DIR>/am.stderr"


def am_resource(request: KernelRequest, settings: YarnSettings) -> dict[str, int]:
    memory = request.resources.get("memory")
    cpu = request.resources.get("cpu")
    return {
        "memory": max(32, memory_bytes(memory) // 2**20) if memory is not None else settings.am_memory_mb,
        "vCores": max(1, math.ceil(cpu_nanos(cpu) / 1e9)) if cpu is not None else 1,
    }


def submission(
    app_id: str,
    request: KernelRequest,
    options: YarnOptions,
    settings: YarnSettings,
    args: Sequence[str],
    token: str,
) -> dict[str, Any]:
    """The REST body that submits a plain kernel. Pure."""
    env = dict(request.env)
    env["CLASSPATH"] = f"{settings.am_classpath}<CPS>{settings.am_jar}"
    body: dict[str, Any] = {
        "application-id": app_id,
        "application-name": f"{request.namespace}/{request.name}",
        "application-type": APPLICATION_TYPE,
        "application-tags": {"tag": application_tags(request)},
        "queue": options.queue,
        "max-app-attempts": 1,  # a second attempt would be a new kernel nobody is connected to
        "keep-containers-across-application-attempts": False,
        "unmanaged-AM": False,
        "resource": am_resource(request, settings),
        "am-container-spec": {
            "commands": {"command": am_command(settings, args)},
            "environment": {"entry": [{"key": k, "value": v} for k, v in sorted(env.items())]},
            "credentials": {
                "secrets": {
                    "entry": [{"key": TOKEN_SECRET, "value": base64.b64encode(token.encode()).decode()}]
                }
            },
        },
    }
    if options.node_label:
        body["app-node-label-expression"] = options.node_label
        body["am-container-node-label-expression"] = options.node_label
    return body


def spark_properties(request: KernelRequest, options: YarnOptions, settings: YarnSettings) -> dict[str, str]:
    """The operator's Spark settings for a kernel, written to a 0600 properties file (the
    kernel's variables would otherwise show on spark-submit's command line)."""
    conf = {f"spark.yarn.appMasterEnv.{name}": value for name, value in sorted(request.env.items())}
    conf.update(
        {
            "spark.yarn.tags": ",".join(application_tags(request)),
            "spark.yarn.submit.waitAppCompletion": "false",
            "spark.yarn.maxAppAttempts": "1",
            "spark.pyspark.python": settings.python,
            "spark.yarn.queue": options.queue,
        }
    )
    if options.node_label:
        conf["spark.yarn.am.nodeLabelExpression"] = options.node_label
        conf["spark.yarn.executor.nodeLabelExpression"] = options.node_label
    if request.language == "scala":
        # ToreeDriver starts the launcher with this Python; Toree 0.5 needs the module opened.
        conf["spark.yarn.appMasterEnv.RKO_LAUNCHER_PYTHON"] = settings.python
        conf["spark.driver.extraJavaOptions"] = TOREE_JAVA_OPTIONS
        if options.spark_init != "eager":
            # The ApplicationMaster fails an application whose driver makes no SparkContext
            # within spark.yarn.am.waitTime (100 s); a lazy Toree makes it on first use.
            conf["spark.yarn.am.waitTime"] = "7d"
    return conf


def properties_text(conf: Mapping[str, str]) -> str:
    """A Java properties file: keys and values escaped so a value cannot start a new entry."""

    def escape(text: str) -> str:
        out = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return out.replace("=", "\\=").replace(":", "\\:").replace("#", "\\#").replace("!", "\\!")

    return "".join(f"{escape(k)}={escape(v)}\n" for k, v in conf.items())


def spark_submit_command(
    request: KernelRequest,
    options: YarnOptions,
    settings: YarnSettings,
    args: Sequence[str],
    token_file: str,
    properties_file: str,
    impersonate: bool,
) -> list[str]:
    """spark-submit's argv for a Spark kernel in cluster mode. Pure.

    The tenant's options come first and the operator's after them (spark-submit keeps the last
    of a repeated option), then the administrator's own (RKO_SPARK_OPTS, the profile's).
    """
    argv = [settings.spark_submit, *options.spark_opts]
    if options.driver_memory:
        argv += ["--driver-memory", options.driver_memory]
    if options.executor_memory:
        argv += ["--executor-memory", options.executor_memory]
    argv += [
        "--properties-file",
        properties_file,
        "--master",
        "yarn",
        "--deploy-mode",
        "cluster",
        "--name",
        f"{request.namespace}/{request.name}",
        "--queue",
        options.queue,
        "--files",
        f"{token_file}#{TOKEN_FILE}",
    ]
    if impersonate:
        argv += ["--proxy-user", options.user]
    argv += [*shlex.split(settings.spark_opts), *options.admin_spark_opts]
    if request.language == "scala":
        # Toree runs in the driver's JVM (ToreeDriver, in the operator's AM jar), which starts
        # the launcher beside it; Toree's jar goes along.
        main = ["--class", TOREE_DRIVER, "--jars", settings.toree_assembly, settings.am_jar]
    else:
        main = [SPARK_DRIVER]
    return [
        *argv,
        *main,
        *args,
        "--token-file",
        TOKEN_FILE,
        "--spark-context-initialization-mode",
        options.spark_init,
    ]


def application_state(app: Mapping[str, Any], now_ms: float, queue_wait: float) -> BackendStatus:
    """A YARN application report as the kernel's state. Pure."""
    app_id = app.get("id", "?")
    state = str(app.get("state", "NEW"))
    final = str(app.get("finalStatus", "UNDEFINED"))
    diagnostics = str(app.get("diagnostics") or "").strip() or "no diagnostics"
    if state in STARTING:
        waited = (now_ms - float(app.get("startedTime") or now_ms)) / 1000
        if state == "ACCEPTED" and not app.get("amContainerLogs") and waited >= queue_wait:
            return BackendStatus(
                "failed",
                "QueueFull",
                f"YARN application {app_id} waited {waited:.0f} s in queue {app.get('queue', '?')!r} "
                f"without room for its ApplicationMaster (yarn.queueWaitSeconds={queue_wait:g}); free "
                f"capacity there or choose another queue. YARN says: {diagnostics}",
            )
        return BackendStatus("starting")
    if state == "RUNNING":
        return BackendStatus("running")
    if state == "FINISHED" and final == "SUCCEEDED":
        return BackendStatus("succeeded", "ApplicationFinished", f"YARN application {app_id} finished.", 0)
    if state == "KILLED" or final == "KILLED":
        return BackendStatus(
            "failed", "ApplicationKilled", f"YARN application {app_id} was killed: {diagnostics}"
        )
    return BackendStatus(
        "failed", "ApplicationFailed", f"YARN application {app_id} {state.lower()} ({final}): {diagnostics}"
    )


def submitted_application_id(output: str) -> str | None:
    """The application id spark-submit printed (the last one named)."""
    found = _APP_ID.findall(output)
    return found[-1] if found else None


def base_ref(options: YarnOptions) -> BackendRef:
    """What status and stop need besides the application id: kept, so settings may change."""
    return {
        "kind": "YarnApplication",
        "endpoints": list(options.endpoints),
        "securityEnabled": options.security_enabled,
        "user": options.user,
        "queueWait": options.queue_wait,
        "spark": options.spark,
    }


def _private_file(folder: str, name: str, text: str) -> str:
    path = os.path.join(folder, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


def toree_jar() -> str:
    """Apache Toree's jar beside the operator (PyPI's toree), for Scala kernels' --jars."""
    try:
        return str(toree_assembly({}))
    except KernelNotInstalled as err:
        raise SpecError(
            f"Scala kernels on YARN need Apache Toree's jar where the operator runs: set RKO_TOREE_ASSEMBLY. {err}",
            reason="YarnNotConfigured",
        ) from err


def _pyspark_home() -> str:
    """pyspark's folder, when the operator's Python has it: a complete SPARK_HOME."""
    spec = importlib.util.find_spec("pyspark")
    return str(Path(spec.origin).parent) if spec is not None and spec.origin else ""


def _operator_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container with an arbitrary uid)
        return "remote-kernel-operator"


ClientFactory = Callable[[Sequence[str], float, bool], ResourceManagerClient]


class YarnBackend:
    name = "yarn"

    def __init__(self, settings: YarnSettings, client_factory: ClientFactory = ResourceManagerClient) -> None:
        self.settings = settings
        self._client = client_factory
        # One client per ResourceManager pair, so the active one is found once, not per poll.
        self._clients: dict[tuple[tuple[str, ...], bool], ResourceManagerClient] = {}
        self.operator_user = settings.user or _operator_user()
        self._threads = BlockingPool("yarn", YARN_THREADS)
        self._statuses: Batcher[
            tuple[tuple[str, ...], bool], BackendRef, BackendStatus | BackendUnavailable
        ] = Batcher(self._status_batch)

    def client_for(self, ref: Mapping[str, Any]) -> ResourceManagerClient:
        key = (tuple(ref.get("endpoints") or ()), bool(ref.get("securityEnabled")))
        if key not in self._clients:
            self._clients[key] = self._client(list(key[0]), self.settings.request_timeout, key[1])
        return self._clients[key]

    def adopt(self, ref: BackendRef) -> None:
        """Nothing to rebuild: the ResourceManager and the application's tag are the record."""

    def release(self, ref: BackendRef) -> None:
        """Nothing to release."""

    def options(self, request: KernelRequest) -> YarnOptions:
        return yarn_options(request, self.settings, self.operator_user)

    async def launch(self, plan: LaunchPlan) -> BackendRef:
        request = plan.request
        options = self.options(request)
        if options.security_enabled:
            kerberos_auth()  # fail now, with what to install, rather than at the first request
        args = [
            *launcher_args(request, plan.response_address, plan.public_key, self.settings.kernel_ip, RUN_DIR),
            # A container whose JVM ended on its own is not cleaned up by the NodeManager.
            "--exit-with-parent",
        ]
        ref = base_ref(options)
        client = self.client_for(ref)
        if options.spark:
            app_id = await self._spark_submit(request, options, args, plan.token, client)
        else:
            if not self.settings.am_jar:
                raise SpecError(
                    "The yarn backend needs its ApplicationMaster for non-Spark kernels: set "
                    "RKO_YARN_AM_JAR to rko-yarn-am.jar's path on the NodeManagers (make yarn builds it).",
                    reason="YarnNotConfigured",
                )
            app_id = await self._threads.run(self._submit, client, request, options, args, plan.token)
        return {**ref, "applicationId": app_id}

    def _submit(
        self,
        client: ResourceManagerClient,
        request: KernelRequest,
        options: YarnOptions,
        args: Sequence[str],
        token: str,
    ) -> str:
        app_id = client.new_application(options.user)
        client.submit(submission(app_id, request, options, self.settings, args, token), options.user)
        return app_id

    async def _spark_submit(
        self,
        request: KernelRequest,
        options: YarnOptions,
        args: Sequence[str],
        token: str,
        client: ResourceManagerClient,
    ) -> str:
        settings = self.settings
        if request.language == "scala" and not settings.toree_assembly:
            settings = dataclasses.replace(settings, toree_assembly=toree_jar())
        with tempfile.TemporaryDirectory(prefix="rko-spark-") as folder:
            token_file = _private_file(folder, "token", token)
            properties = _private_file(
                folder, "spark.properties", properties_text(spark_properties(request, options, self.settings))
            )
            argv = spark_submit_command(
                request,
                options,
                settings,
                args,
                token_file,
                properties,
                impersonate=request.run_as is not None,
            )
            code, output = await self.run_spark_submit(argv, options)
        app_id = submitted_application_id(output)
        if app_id is None and code == 0:
            found = await self._threads.run(client.find_by_tag, owner_tag(request.uid))
            app_id = str(found["id"]) if found else None
        if code != 0 or app_id is None:
            tail = output.strip()[-1500:]
            raise BackendError(
                f"spark-submit did not submit the kernel (exit code {code}). End of its output:\n{tail}",
                reason="SparkSubmitFailed",
            )
        return app_id

    async def run_spark_submit(self, argv: list[str], options: YarnOptions) -> tuple[int, str]:
        """Run spark-submit; returns its exit code and output. The seam unit tests replace."""
        env = dict(os.environ)
        spark_home = self.settings.spark_home or _pyspark_home()
        if spark_home:
            env["SPARK_HOME"] = spark_home
        if self.settings.hadoop_conf_dir:
            env["HADOOP_CONF_DIR"] = self.settings.hadoop_conf_dir
        if options.user and not options.security_enabled:
            # Simple auth: the submitting user; with --proxy-user it is the one acting for the kernel's.
            env["HADOOP_USER_NAME"] = self.operator_user
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
        except OSError as err:
            raise BackendError(
                f"Cannot run spark-submit ({argv[0]}): {err}. Install pyspark or Spark beside the operator "
                "and set RKO_SPARK_SUBMIT.",
                reason="SparkSubmitFailed",
            ) from err
        try:
            out, _ = await asyncio.wait_for(process.communicate(), self.settings.submit_timeout)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
            raise BackendError(
                f"spark-submit did not finish within {self.settings.submit_timeout:g} s "
                "(RKO_SPARK_SUBMIT_TIMEOUT).",
                reason="SparkSubmitFailed",
            ) from None
        return int(process.returncode or 0), out.decode(errors="replace")

    async def find(self, request: KernelRequest) -> BackendRef | None:
        ref = base_ref(self.options(request))
        found = await self._threads.run(self.client_for(ref).find_by_tag, owner_tag(request.uid))
        return {**ref, "applicationId": str(found["id"])} if found else None

    async def status(self, ref: BackendRef) -> BackendStatus:
        # Every kernel of one ResourceManager asking meanwhile is answered by one list.
        key = (tuple(ref.get("endpoints") or ()), bool(ref.get("securityEnabled")))
        answer = await self._statuses.ask(key, ref)
        if isinstance(answer, BackendUnavailable):
            raise answer
        return answer

    async def _status_batch(
        self, key: tuple[tuple[str, ...], bool], refs: list[BackendRef]
    ) -> list[BackendStatus | BackendUnavailable]:
        return await self._threads.run(self._statuses_of, refs)

    def _statuses_of(self, refs: list[BackendRef]) -> list[BackendStatus | BackendUnavailable]:
        """One list of the live applications; only one that is not live is reported alone."""
        live = self.client_for(refs[0]).live_applications((APPLICATION_TYPE, "SPARK"))
        now = time.time() * 1000
        answers: list[BackendStatus | BackendUnavailable] = []
        for ref in refs:
            app = live.get(str(ref["applicationId"]))
            if app is not None:
                answers.append(
                    application_state(app, now, float(ref.get("queueWait") or self.settings.queue_wait))
                )
                continue
            try:
                answers.append(self._status(ref))
            except BackendUnavailable as err:
                answers.append(err)
        return answers

    def _status(self, ref: BackendRef) -> BackendStatus:
        app_id = str(ref["applicationId"])
        app = self.client_for(ref).application(app_id)
        if app is None:
            # Not "gone" at once: around a restart a ResourceManager answers before it has
            # recovered its applications (and a stopping one may answer with none), so an
            # unknown application gets the unreachable grace before the kernel fails.
            raise BackendUnavailable(
                f"The ResourceManager does not know YARN application {app_id}: it is restarting or "
                "recovering, or it restarted without recovery and lost the application.",
                reason="ApplicationUnknown",
            )
        return application_state(
            app, time.time() * 1000, float(ref.get("queueWait") or self.settings.queue_wait)
        )

    @staticmethod
    def _application(client: ResourceManagerClient, app_id: str) -> dict[str, Any] | None:
        """The application's report for stopping it; None when it is not there to kill, unless
        the ResourceManager restarted so recently that it may still recover it."""
        app = client.application(app_id)
        if app is None and time.time() * 1000 - client.started_on() < RECOVERY_SECONDS * 1000:
            raise BackendUnavailable(
                f"The ResourceManager restarted recently and does not know YARN application {app_id} "
                "yet; it may still be recovering its applications.",
                reason="ResourceManagerRecovering",
            )
        return app

    async def stop(self, ref: BackendRef, owner: str) -> None:
        """Kill the application and wait until YARN reports it ended (its containers with it).

        Only an application tagged with the RemoteKernel's uid is killed: an id in status naming
        another application is left alone. The wait sleeps on the event loop, not in a thread.
        """
        client = self.client_for(ref)
        app_id = str(ref["applicationId"])
        tag = owner_tag(owner)
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        killed = False
        while True:
            app = await self._threads.run(self._application, client, app_id)
            if app is None or app.get("state") in FINAL_STATES:
                return
            if tag not in str(app.get("applicationTags") or "").split(","):
                log.warning("Not killing YARN application %s: it is not tagged %s.", app_id, tag)
                return
            if not killed:
                await self._threads.run(client.kill, app_id, str(ref.get("user") or self.operator_user))
                killed = True
            if time.monotonic() > deadline:
                raise BackendUnavailable(
                    f"YARN application {app_id} is still {app.get('state')} {STOP_WAIT_SECONDS:g} s after "
                    "it was killed; deleting the kernel will try again.",
                    reason="StopPending",
                )
            await asyncio.sleep(0.2)
