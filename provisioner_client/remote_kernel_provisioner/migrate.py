"""Pure translation of gateway_provisioners' and Enterprise Gateway's kernelspecs into ours.

``migrate_kernelspec`` reads one kernel.json written by gateway_provisioners' installers
(``metadata.kernel_provisioner.provisioner_name`` one of its provisioners) or by Enterprise
Gateway (``metadata.process_proxy.class_name``) and returns the equivalent kernelspec for the
remote-kernel provisioner, the RemoteKernelProfile an administrator would apply for it, and a
list of what could not be carried over, each with the reason. Nothing here reads or writes
files: ``cli`` does.

The split follows tenancy: what decides where and as whom kernels run (hosts, the YARN
endpoint, impersonation, Spark's master and deploy mode) goes to the profile, which only an
administrator writes; what a user may choose within it (an image among the allowed ones, a
host among the profile's, Spark options the profile allows) stays in the kernelspec.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .kernelspec import SCALA_BACKENDS, SpecOptionError, SpecOptions, build_kernelspec

# gateway_provisioners 0.5's provisioner names (its entry points) -> our backend.
GP_PROVISIONERS = {
    "kubernetes-provisioner": "kubernetes",
    "docker-provisioner": "docker",
    "docker-swarm-provisioner": "dockerSwarm",
    "yarn-provisioner": "yarn",
    "distributed-provisioner": "ssh",
    "spark-operator-provisioner": "sparkApplication",
    "custom-resource-provisioner": "customResource",
}
# Enterprise Gateway's process proxies (the last two parts of their class names).
EG_PROCESS_PROXIES = {
    "k8s.KubernetesProcessProxy": "kubernetes",
    "docker_swarm.DockerProcessProxy": "docker",
    "docker_swarm.DockerSwarmProcessProxy": "dockerSwarm",
    "yarn.YarnClusterProcessProxy": "yarn",
    "distributed.DistributedProcessProxy": "ssh",
    "spark_operator.SparkOperatorProcessProxy": "sparkApplication",
    "crd.CustomResourceProcessProxy": "customResource",
}
GP_DEFAULTS = {"launch_timeout": 30, "port_range": "0..0"}  # what GP's installers write unasked
DEFAULT_KERNEL_CLASS = "ipykernel.ipkernel.IPythonKernel"
LANGUAGES = {"python": "python", "r": "r", "scala": "scala"}
# Launcher arguments whose values are templates the provisioner filled in: ours fills its own.
TEMPLATED_ARGS = frozenset(
    {"--kernel-id", "--port-range", "--response-address", "--public-key", "--transport-encryption"}
)
# gateway_provisioners' / Enterprise Gateway's variables read by the server, and where each went.
SERVER_VARIABLES = {
    "GP_LAUNCH_TIMEOUT": "launch_timeout",
    "EG_KERNEL_LAUNCH_TIMEOUT": "launch_timeout",
    "GP_PORT_RANGE": "port_range",
    "EG_PORT_RANGE": "port_range",
    "GP_IMAGE_NAME": "image_name",
    "GP_EXECUTOR_IMAGE_NAME": "executor_image_name",
    "GP_AUTHORIZED_USERS": "authorized_users",
    "EG_AUTHORIZED_USERS": "authorized_users",
    "GP_UNAUTHORIZED_USERS": "unauthorized_users",
    "EG_UNAUTHORIZED_USERS": "unauthorized_users",
    "GP_REMOTE_HOSTS": "remote_hosts",
    "EG_REMOTE_HOSTS": "remote_hosts",
    "GP_LOAD_BALANCING_ALGORITHM": "load_balancing_algorithm",
    "EG_LOAD_BALANCING_ALGORITHM": "load_balancing_algorithm",
    "GP_YARN_ENDPOINT": "yarn_endpoint",
    "EG_YARN_ENDPOINT": "yarn_endpoint",
    "GP_ALT_YARN_ENDPOINT": "alt_yarn_endpoint",
    "EG_ALT_YARN_ENDPOINT": "alt_yarn_endpoint",
    "GP_YARN_ENDPOINT_SECURITY_ENABLED": "yarn_endpoint_security_enabled",
    "EG_YARN_ENDPOINT_SECURITY_ENABLED": "yarn_endpoint_security_enabled",
    "GP_IMPERSONATION_ENABLED": "impersonation_enabled",
    "EG_IMPERSONATION_ENABLED": "impersonation_enabled",
}
# spark-submit options the yarn backend sets itself (where, as whom, how the driver reports).
OPERATOR_SPARK_FLAGS = frozenset({"--master", "--deploy-mode", "--name", "--queue", "--proxy-user"})
OPERATOR_SPARK_CONF = re.compile(
    r"^spark\.(yarn\.submit\.waitAppCompletion|yarn\.appMasterEnv\.(PYTHON.*|PATH)|pyspark\..*|"
    r"kubernetes\.(namespace|driver\.label\..*|executor\.label\..*|driver\.container\.image|"
    r"executor\.container\.image|authenticate\..*|submission\.waitAppCompletion|pyspark\..*))$"
)
_DNS = re.compile(r"[^a-z0-9.-]+")


class MigrationError(ValueError):
    """The kernelspec is not one this tool migrates; the message says why."""


@dataclass
class Migrated:
    """One kernelspec's translation."""

    kernelspec: dict[str, Any]
    profile: dict[str, Any]  # a RemoteKernelProfile manifest
    source: str  # e.g. "gateway_provisioners distributed-provisioner"
    dropped: list[str] = field(default_factory=list)  # what was not carried over, and why
    moved: list[str] = field(default_factory=list)  # what went to the profile (administrator's)


def profile_name_for(kernel_name: str) -> str:
    """A RemoteKernelProfile name (DNS subdomain) from a kernel name."""
    name = _DNS.sub("-", kernel_name.lower().replace("_", "-")).strip("-.")
    return (name or "migrated")[:63]


def source_of(spec: Mapping[str, Any]) -> tuple[str, str]:
    """(backend, a description of the source) for a gateway_provisioners or EG kernelspec."""
    metadata = spec.get("metadata") or {}
    provisioner = (metadata.get("kernel_provisioner") or {}).get("provisioner_name")
    if provisioner == "remote-kernel":
        raise MigrationError("it already uses the remote-kernel provisioner.")
    if provisioner in GP_PROVISIONERS:
        return GP_PROVISIONERS[str(provisioner)], f"gateway_provisioners {provisioner}"
    class_name = str((metadata.get("process_proxy") or {}).get("class_name") or "")
    tail = ".".join(class_name.split(".")[-2:])
    if tail in EG_PROCESS_PROXIES:
        return EG_PROCESS_PROXIES[tail], f"Enterprise Gateway {tail.split('.')[-1]}"
    if class_name.endswith("ConductorClusterProcessProxy"):
        raise MigrationError(
            "IBM Spectrum Conductor (ConductorClusterProcessProxy) has no backend here; run such kernels "
            "on YARN or Kubernetes."
        )
    if provisioner or class_name:
        raise MigrationError(
            f"its provisioner {provisioner or class_name!r} is neither gateway_provisioners' nor "
            "Enterprise Gateway's."
        )
    raise MigrationError("it is a local kernelspec (no remote provisioner or process proxy): nothing to do.")


def _spark_options(opts: str, dropped: list[str]) -> tuple[str, dict[str, str]]:
    """SPARK_OPTS split into what a profile may carry (the rest) and what the backend sets."""
    try:
        words = shlex.split(opts)
    except ValueError:
        dropped.append(
            f"SPARK_OPTS could not be parsed ({opts!r}); give the profile's yarn.sparkOpts by hand."
        )
        return "", {}
    kept: list[str] = []
    conf: dict[str, str] = {}
    operator_set: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        value = words[i + 1] if i + 1 < len(words) else ""
        if word.startswith("${") or word.startswith("$"):
            # ${KERNEL_EXTRA_SPARK_OPTS}: a user's options, which arrive as spec.yarn.sparkOpts
            i += 1
            continue
        if word in OPERATOR_SPARK_FLAGS:
            operator_set.append(f"{word} {value}")
            i += 2
            continue
        if word == "--conf":
            key, _, val = value.partition("=")
            if OPERATOR_SPARK_CONF.match(key):
                operator_set.append(f"--conf {key}")
            elif "$" in val:
                dropped.append(f"SPARK_OPTS --conf {key}={val}: a value naming variables cannot carry over.")
            else:
                conf[key] = val
                kept += ["--conf", f"{key}={val}"]
            i += 2
            continue
        kept.append(word)
        i += 1
    if operator_set:
        dropped.append(
            "SPARK_OPTS options the operator sets itself (master, deploy mode, name, queue, labels, "
            f"images, the driver's Python): {', '.join(operator_set)}."
        )
    return shlex.join(kept), conf


def _argv_options(argv: list[str], dropped: list[str]) -> dict[str, str]:
    """The launcher options a GP/EG argv carries, other than the templated ones."""
    found: dict[str, str] = {}
    i = 1
    while i < len(argv):
        word = str(argv[i])
        if word.startswith("--"):
            name, eq, inline = word.partition("=")
            value = inline if eq else (str(argv[i + 1]) if i + 1 < len(argv) else "")
            step = 1 if eq else 2
            if name in TEMPLATED_ARGS:
                pass
            elif name == "--cluster-type" and value == "dask":
                dropped.append(
                    "a Dask cluster on YARN (dask-yarn, --cluster-type dask): kernels here get Spark or "
                    "nothing; this kernelspec now starts a plain YARN kernel."
                )
            elif name.startswith("--RemoteProcessProxy.") or name in (
                "--spark-context-initialization-mode",
                "--kernel-class-name",
                "--ipykernel-subclass-name",
            ):
                found[name.replace("--RemoteProcessProxy.", "--").replace("_", "-")] = value
            else:
                dropped.append(f"launcher argument {name} {value}: ours has no such option.")
            i += step
        else:
            i += 1
    return found


def migrate_kernelspec(
    kernel_name: str,
    spec: Mapping[str, Any],
    *,
    profile: str | None = None,
    namespace: str | None = None,
    operator_class: str | None = None,
) -> Migrated:
    """Translate one kernel.json. ``profile`` names the RemoteKernelProfile the kernelspec will
    use (default: one named after the kernel, whose manifest is returned)."""
    backend, source = source_of(spec)
    metadata = spec.get("metadata") or {}
    env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
    dropped: list[str] = []
    moved: list[str] = []
    language = str(spec.get("language") or "python").lower()
    if "${" in language:
        # gateway_provisioners 0.5.0's jupyter-yarn-spec leaves its template unfilled with
        # --yarn-endpoint, --alt-yarn-endpoint or --yarn-endpoint-security-enabled (and drops
        # those options): such a kernelspec never started. What it was meant to be shows in its env.
        if "__TOREE_SPARK_OPTS__" in env or "__TOREE_OPTS__" in env:
            language = "scala"
        elif "PYSPARK_PYTHON" in env or "supported_encryption" in metadata:
            language = "python"
        else:
            raise MigrationError(f"its language {spec.get('language')!r} is an unfilled template.")
        dropped.append(
            "the installer left its template unfilled (language, display name, paths, the options it "
            f"was given): the original kernelspec could not start; migrated as the {language} kernel it "
            "was meant to be."
        )
    if language not in LANGUAGES:
        raise MigrationError(f"its language {spec.get('language')!r} is not Python, R or Scala.")
    language = LANGUAGES[language]
    if language == "scala" and backend not in SCALA_BACKENDS:
        raise MigrationError(
            f"Scala kernels run here on the {', '.join(SCALA_BACKENDS)} backends, not {backend}; "
            "keep this kernelspec where it is, or run its kernels on one of those."
        )
    config: dict[str, Any] = dict(
        (metadata.get("kernel_provisioner") or {}).get("config")
        or (metadata.get("process_proxy") or {}).get("config")
        or {}
    )
    profile_name = profile or profile_name_for(kernel_name)
    profile_spec: dict[str, Any] = {"backend": backend, "languages": [language]}

    # Server-side variables written into the kernelspec's env: the server read them.
    for variable in sorted(set(env) & set(SERVER_VARIABLES)):
        config.setdefault(SERVER_VARIABLES[variable], env.pop(variable))
    for variable in sorted(v for v in env if v.startswith(("GP_", "EG_"))):
        dropped.append(
            f"env {variable}: a gateway_provisioners/Enterprise Gateway setting with no equivalent."
        )
        env.pop(variable)

    argv = [str(a) for a in spec.get("argv") or []]
    launcher = {k: v for k, v in _argv_options(argv, dropped).items() if "${" not in v}
    if len(argv) > 1 and ("/scripts/" in argv[1] or argv[0].endswith("/bin/run.sh")):
        moved.append(
            f"launch script {argv[1] if '/scripts/' in argv[1] else argv[0]}: replaced by our launcher."
        )

    options: dict[str, Any] = {}
    kernel_class = launcher.get("--kernel-class-name") or launcher.get("--ipykernel-subclass-name")
    if kernel_class and kernel_class != DEFAULT_KERNEL_CLASS:
        options["kernel_class_name"] = kernel_class
    backend_config: dict[str, Any] = {}
    spark_mode = launcher.get("--spark-context-initialization-mode")

    for key, default in GP_DEFAULTS.items():
        if key in config and str(config[key]) == str(default):
            config.pop(key)
            moved.append(
                f"{key} {default}: the installer's default, left out so the server's and the "
                "operator's settings apply."
            )
    for key in ("launch_timeout",):
        if key in config:
            options["launch_timeout"] = int(config.pop(key))
    if "port_range" in config:
        options["port_range"] = str(config.pop("port_range"))
    for key in ("authorized_users", "unauthorized_users"):
        if key in config:
            value = config.pop(key)
            users = [u.strip() for u in (value.split(",") if isinstance(value, str) else value) if u.strip()]
            options[key] = users
            profile_spec.setdefault("users", {})[key.split("_")[0]] = users
    image = config.pop("image_name", None)
    if image:
        options["image_name"] = str(image)
        if backend == "sparkApplication":
            profile_spec.setdefault("sparkApplication", {})["driverImage"] = str(image)
        elif backend != "yarn":
            profile_spec["image"] = str(image)
        profile_spec["images"] = [str(image)]
    executor = config.pop("executor_image_name", None)
    if executor:
        options["executor_image_name"] = str(executor)
        if backend == "sparkApplication":
            profile_spec.setdefault("sparkApplication", {})["executorImage"] = str(executor)
        else:
            profile_spec["images"] = sorted({*profile_spec.get("images", []), str(executor)})
    hosts = config.pop("remote_hosts", None)
    if hosts:
        # gateway_provisioners 0.5.0 writes --remote-hosts h1,h2 as the one item "h1,h2".
        items = [hosts] if isinstance(hosts, str) else [str(h) for h in hosts]
        host_list = [h.strip() for item in items for h in item.split(",") if h.strip()]
        profile_spec.setdefault("ssh", {})["hosts"] = host_list
        moved.append(f"remote_hosts {host_list}: the profile's ssh.hosts (a user may pick among them).")
    balancing = config.pop("load_balancing_algorithm", None)
    if balancing:
        profile_spec.setdefault("ssh", {})["loadBalancing"] = str(balancing)
        moved.append(f"load_balancing_algorithm {balancing}: the profile's ssh.loadBalancing.")
    impersonation = config.pop("impersonation_enabled", None)
    if impersonation is not None:
        on = str(impersonation).lower() in ("true", "1", "yes")
        if backend in ("ssh", "yarn"):
            profile_spec.setdefault(backend, {})["impersonation"] = on
            moved.append(f"impersonation {on}: the profile's {backend}.impersonation.")
        else:
            dropped.append(f"impersonation on the {backend} backend: containers run as the profile's user.")
    for key, target in (
        ("yarn_endpoint", "endpoint"),
        ("alt_yarn_endpoint", "altEndpoint"),
        ("yarn_endpoint_security_enabled", "securityEnabled"),
    ):
        if key in config:
            value = config.pop(key)
            if target == "securityEnabled":
                value = str(value).lower() in ("true", "1", "yes")
            profile_spec.setdefault("yarn", {})[target] = value
            moved.append(f"{key}: the profile's yarn.{target}.")
    for key, target in (("group", "group"), ("version", "version"), ("plural", "plural"), ("kind", "kind")):
        if key in config and backend == "customResource":
            profile_spec.setdefault("customResource", {})[target] = str(config.pop(key))
    for key in sorted(config):
        dropped.append(f"config {key}={config[key]!r}: no equivalent here.")

    # Spark: where the kernelspec runs spark-submit, Spark comes from the profile.
    spark_opts = env.pop("SPARK_OPTS", None) or env.pop("__TOREE_SPARK_OPTS__", None)
    env.pop("__TOREE_SPARK_OPTS__", None)
    toree_opts = env.pop("__TOREE_OPTS__", None)
    if toree_opts:
        dropped.append(
            f"Toree options {toree_opts!r}: the launcher starts Toree itself and interrupts it with SIGINT."
        )
    interpreter = env.pop("DEFAULT_INTERPRETER", None)
    if interpreter and interpreter.lower() != "scala":
        dropped.append(
            f"DEFAULT_INTERPRETER {interpreter}: Scala kernels here start Toree's Scala interpreter."
        )
    if backend == "yarn":
        spark = spark_opts is not None or spark_mode not in (None, "none")
        profile_spec.setdefault("yarn", {})["spark"] = spark
        if spark_opts:
            kept, _ = _spark_options(spark_opts, dropped)
            if kept:
                profile_spec["yarn"]["sparkOpts"] = kept
                moved.append(f"SPARK_OPTS {kept}: the profile's yarn.sparkOpts.")
        if spark and spark_mode == "eager":
            backend_config["sparkInitMode"] = "eager"
    elif spark_opts is not None:
        kept, conf = _spark_options(spark_opts, dropped)
        if backend == "kubernetes":
            dropped.append(
                "Spark on Kubernetes through spark-submit: use the sparkApplication backend (the Spark "
                "operator) for Spark kernels in pods; this kernelspec now starts a plain kernel pod."
            )
        elif conf:
            profile_spec.setdefault("sparkApplication", {})["sparkConf"] = conf
    if spark_mode == "eager" and backend == "sparkApplication":
        dropped.append(
            "--spark-context-initialization-mode eager: SparkApplication kernels start Spark lazily."
        )
    for variable in (
        "SPARK_HOME",
        "PYSPARK_PYTHON",
        "PYTHONPATH",
        "LAUNCH_OPTS",
        "DASK_YARN_EXE",
        "DASK_OPTS",
    ):
        value = env.pop(variable, None)
        if value:
            dropped.append(
                f"env {variable}: the operator's settings decide it (RKO_SPARK_HOME and the profile), not "
                "the kernelspec."
            )

    options.update(
        backend=backend if backend_config else None,
        profile=profile_name,
        language=language,
        kernel_name=kernel_name,
        display_name="" if "${" in str(spec.get("display_name")) else str(spec.get("display_name") or ""),
        namespace=namespace,
        operator_class=operator_class,
        backend_config=backend_config,
        env=env,
    )
    if "port_range" in options:
        try:
            build_kernelspec(SpecOptions(port_range=options["port_range"]))
        except SpecOptionError as err:
            dropped.append(f"port_range {options.pop('port_range')}: {err}")
    kernelspec = build_kernelspec(SpecOptions(**options))
    if env:
        passthrough = sorted(v for v in env if not v.startswith("KERNEL_"))
        if passthrough:
            kernelspec["metadata"]["kernel_provisioner"]["config"]["env_passthrough"] = passthrough
            profile_spec.setdefault("env", {})["allowed"] = passthrough
            moved.append(f"env {', '.join(passthrough)}: passed to the kernel; the profile allows them.")
    manifest = {
        "apiVersion": "kernel-operator.io/v1alpha1",
        "kind": "RemoteKernelProfile",
        "metadata": {"name": profile_name, "labels": {"kernel-operator.io/migrated-from": _label(source)}},
        "spec": profile_spec,
    }
    return Migrated(kernelspec=kernelspec, profile=manifest, source=source, dropped=dropped, moved=moved)


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-._")[:63]
