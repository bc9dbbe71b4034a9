"""Operator settings: one frozen dataclass, read once from RKO_* environment variables."""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from kernel_launchers.ports import PortRangeError, parse_port_range

from .errors import SettingsError

ENCRYPTION_POLICIES = ("disabled", "auto", "required")
LOAD_BALANCING = ("round-robin", "least-connection")


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _number(
    env: Mapping[str, str], name: str, default: float, minimum: float = 0, maximum: float | None = None
) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as err:
        raise SettingsError(f"{name}={raw!r} is not a number.") from err
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum}.")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name}={raw!r} must be at most {maximum}.")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (true or false).")


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in allowed:
        raise SettingsError(f"{name}={raw!r} must be one of {', '.join(allowed)}.")
    return raw


def _address(value: str, name: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise SettingsError(f"{name}={value!r} is not HOST:PORT.")
    return host.strip("[]") or "0.0.0.0", int(port)


def _cluster_role(name: str) -> str:
    if name == "cluster-admin":
        raise SettingsError(
            "RKO_KERNEL_CLUSTER_ROLE=cluster-admin would give every kernel full control of the "
            "cluster; name a role with only what kernels need."
        )
    return name


# A DNS label: it names a label value, a finalizer and kopf's annotation prefix.
_CLASS = re.compile(r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?$")


def _operator_class(value: str) -> str:
    if not _CLASS.match(value):
        raise SettingsError(
            f"RKO_OPERATOR_CLASS={value!r} must be a DNS label (a Kubernetes label value too): up "
            "to 63 lowercase letters, digits or '-', starting and ending with a letter or digit."
        )
    return value


def operator_class_from_env(env: Mapping[str, str] | None = None) -> str:
    """RKO_OPERATOR_CLASS alone: kopf's handler filters need it when the handlers are defined."""
    return _operator_class((os.environ if env is None else env).get("RKO_OPERATOR_CLASS", ""))


@dataclass(frozen=True)
class SshSettings:
    """How the ssh backend reaches its hosts."""

    hosts: tuple[str, ...] = ()  # profiles name their hosts; these serve profiles that do not
    load_balancing: str = "round-robin"
    user: str = ""
    port: int = 22
    key_file: str = ""
    known_hosts: str = ""
    allow_unknown_hosts: bool = False
    python: str = "python3"  # on the hosts; RKO_SSH_PYTHON defaults to the operator's own
    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    # Hosts launched as the operator's own child processes, without ssh: none unless enabled
    # (they would run with the operator's account and files).
    local_hosts: tuple[str, ...] = ()
    secret: str = ""  # a Secret in the operator's namespace with ssh-privatekey, known_hosts
    password_auth: bool = False
    host_retry_seconds: float = 30.0  # how long a host that failed is tried last
    # sshd's MaxSessions is 10 by default: commands share a connection up to this many at once,
    # then use another; at most ``connections_per_host`` (new ones one at a time, under sshd's
    # MaxStartups), then commands wait for a free channel.
    channels_per_connection: int = 8
    connections_per_host: int = 4
    threads: int = 32  # for paramiko's blocking calls, apart from every other backend's


@dataclass(frozen=True)
class DockerSettings:
    """How the docker backends reach their engine."""

    host: str = "unix:///var/run/docker.sock"
    tls_verify: bool = False
    cert_path: str = ""
    network: str = "host"
    kernel_ip: str = "0.0.0.0"
    kernel_image: str = ""
    stop_timeout: int = 5
    api_version: str = "1.41"  # Docker 20.10's; later engines accept it


# YARN's cross-platform default application classpath, with {{VAR}} expanded by the NodeManager.
YARN_DEFAULT_CLASSPATH = "<CPS>".join(
    [
        "{{HADOOP_CONF_DIR}}",
        "{{HADOOP_COMMON_HOME}}/share/hadoop/common/*",
        "{{HADOOP_COMMON_HOME}}/share/hadoop/common/lib/*",
        "{{HADOOP_YARN_HOME}}/share/hadoop/yarn/*",
        "{{HADOOP_YARN_HOME}}/share/hadoop/yarn/lib/*",
    ]
)


@dataclass(frozen=True)
class YarnSettings:
    """How the yarn backend reaches its ResourceManager and starts kernels on YARN."""

    endpoint: str = ""  # the ResourceManager's web address, e.g. http://rm:8088
    alt_endpoint: str = ""  # the other ResourceManager of an HA pair
    allowed_endpoints: tuple[str, ...] = ()  # what a spec may name; defaults to the two above
    security_enabled: bool = False  # SPNEGO (Kerberos) to the ResourceManager
    user: str = ""  # who submits when not impersonating (simple auth's user.name)
    queue: str = "default"
    queue_wait: float = 60.0  # how long an application may wait for room before it fails
    python: str = "python3"  # on the NodeManagers; RKO_YARN_PYTHON defaults to the operator's own
    java: str = "{{JAVA_HOME}}/bin/java"
    am_jar: str = ""  # rko-yarn-am.jar on the NodeManagers
    am_classpath: str = YARN_DEFAULT_CLASSPATH
    am_memory_mb: int = 256
    kernel_ip: str = "0.0.0.0"
    request_timeout: float = 10.0
    spark_submit: str = "spark-submit"  # for spark kernels; RKO_SPARK_SUBMIT
    spark_home: str = ""  # SPARK_HOME for spark-submit; defaults to the operator's pyspark
    spark_opts: str = ""  # the operator's own spark-submit options (e.g. spark.yarn.archive)
    hadoop_conf_dir: str = ""  # HADOOP_CONF_DIR for spark-submit
    submit_timeout: float = 120.0  # how long spark-submit may take to hand the application over
    toree_assembly: str = ""  # Apache Toree's jar for Scala kernels; defaults to the operator's toree


@dataclass(frozen=True)
class OperatorSettings:
    """Everything configurable about the operator (see the README's settings table)."""

    namespace: str = "remote-kernel-operator"
    key_secret: str = "remote-kernel-operator-keys"
    watch_namespaces: tuple[str, ...] = ()
    launch_timeout: float = 30.0
    # Launches between Launching and the kernel's report at once; more wait in Pending, so each
    # launch runs at full speed and its timeout counts from when it really starts.
    max_concurrent_launches: int = 16
    # Seconds a pool waits after a claim before it refills, while it still has a ready kernel:
    # the claimed kernel's first requests get the CPU that the refill's launches would take.
    pool_refill_delay: float = 1.0
    authorized_users: frozenset[str] = frozenset()
    unauthorized_users: frozenset[str] = frozenset({"root"})
    port_range: tuple[int, int] = (0, 0)
    port_range_text: str = "0..0"
    transport_encryption: str = "disabled"
    response_bind: tuple[str, int] = ("0.0.0.0", 8877)
    response_address: str = ""
    response_reuse_port: bool = False  # replicas on one host share the listener's port
    # The Service in front of the replicas: launches also name its other ready endpoints.
    peer_service: str = ""
    monitor_interval: float = 1.0
    watch_server_timeout: float = 60.0
    watch_client_timeout: float = 90.0
    kernel_image: str = ""
    pod_grace_seconds: int = 5
    shared_namespace: bool = True
    check_nodes: bool = True  # read a kernel pod's Node (a cluster-wide right)
    kernel_cluster_role: str = "remote-kernel"
    impersonation: bool = False
    operator_class: str = ""
    unreachable_grace: float = 30.0
    stop_give_up: float = 600.0
    track_activity: bool = True
    ttl_after_finished: float | None = None  # finished RemoteKernels are kept unless set
    profile_cache_seconds: float = 1.0  # profiles and namespace labels are re-read after this
    # Several replicas: one leads (holds the Lease), the others stand by (see leadership.py).
    leader_election: bool = False
    lease_name: str = "remote-kernel-operator-leader"
    lease_duration: float = 10.0
    lease_renew_deadline: float = 7.0
    lease_retry_period: float = 1.0
    identity: str = ""  # this replica's name in the Lease: its pod's name
    # After a stop signal: how long a replica keeps taking launch reports for kernels still
    # Launching (its launchers know its address), once it no longer leads.
    drain_seconds: float = 20.0
    http_bind: tuple[str, int] | None = None  # probes and /metrics; off unless set
    memory_trim_seconds: float = 30.0  # freed heap pages go back to the system this often (0: never)
    log_format: str = "text"
    ssh: SshSettings = field(default_factory=SshSettings)
    docker: DockerSettings = field(default_factory=DockerSettings)
    yarn: YarnSettings = field(default_factory=YarnSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if env is None else env
        port_text = env.get("RKO_PORT_RANGE", "0..0")
        try:
            port_range = parse_port_range(port_text)
        except PortRangeError as err:
            raise SettingsError(f"RKO_PORT_RANGE: {err}") from err
        encryption = env.get("RKO_TRANSPORT_ENCRYPTION", "disabled").lower()
        if encryption not in ENCRYPTION_POLICIES:
            raise SettingsError(
                f"RKO_TRANSPORT_ENCRYPTION={encryption!r} must be one of {', '.join(ENCRYPTION_POLICIES)}."
            )
        balancing = env.get("RKO_SSH_LOAD_BALANCING", "round-robin")
        if balancing not in LOAD_BALANCING:
            raise SettingsError(
                f"RKO_SSH_LOAD_BALANCING={balancing!r} must be one of {', '.join(LOAD_BALANCING)}."
            )
        hosts = _list(env.get("RKO_SSH_HOSTS", ""))
        ssh = SshSettings(
            hosts=hosts,
            load_balancing=balancing,
            user=env.get("RKO_SSH_USER", ""),
            port=int(_number(env, "RKO_SSH_PORT", 22, 1)),
            key_file=env.get("RKO_SSH_KEY_FILE", ""),
            known_hosts=env.get("RKO_SSH_KNOWN_HOSTS", ""),
            allow_unknown_hosts=_flag(env, "RKO_SSH_ALLOW_UNKNOWN_HOSTS", False),
            python=env.get("RKO_SSH_PYTHON", sys.executable),
            connect_timeout=_number(env, "RKO_SSH_CONNECT_TIMEOUT", 5.0, 0.1),
            command_timeout=_number(env, "RKO_SSH_COMMAND_TIMEOUT", 10.0, 0.1),
            local_hosts=_list(env.get("RKO_SSH_LOCAL_HOSTS", "")),
            secret=env.get("RKO_SSH_SECRET", ""),
            password_auth=_flag(env, "RKO_SSH_PASSWORD_AUTH", False),
            host_retry_seconds=_number(env, "RKO_SSH_HOST_RETRY_SECONDS", 30.0, 0),
            channels_per_connection=int(_number(env, "RKO_SSH_CHANNELS_PER_CONNECTION", 8, 1)),
            connections_per_host=int(_number(env, "RKO_SSH_CONNECTIONS_PER_HOST", 4, 1)),
            threads=int(_number(env, "RKO_SSH_THREADS", 32, 1)),
        )
        yarn_endpoint = env.get("RKO_YARN_ENDPOINT", "").rstrip("/")
        yarn_alt = env.get("RKO_YARN_ALT_ENDPOINT", "").rstrip("/")
        yarn = YarnSettings(
            endpoint=yarn_endpoint,
            alt_endpoint=yarn_alt,
            allowed_endpoints=tuple(e.rstrip("/") for e in _list(env.get("RKO_YARN_ALLOWED_ENDPOINTS", "")))
            or tuple(e for e in (yarn_endpoint, yarn_alt) if e),
            security_enabled=_flag(env, "RKO_YARN_SECURITY_ENABLED", False),
            user=env.get("RKO_YARN_USER", ""),
            queue=env.get("RKO_YARN_QUEUE", "default"),
            queue_wait=_number(env, "RKO_YARN_QUEUE_WAIT_SECONDS", 60.0, 1),
            python=env.get("RKO_YARN_PYTHON", sys.executable),
            java=env.get("RKO_YARN_JAVA", "{{JAVA_HOME}}/bin/java"),
            am_jar=env.get("RKO_YARN_AM_JAR", ""),
            am_classpath=env.get("RKO_YARN_AM_CLASSPATH", YARN_DEFAULT_CLASSPATH),
            am_memory_mb=int(_number(env, "RKO_YARN_AM_MEMORY_MB", 256, 32)),
            kernel_ip=env.get("RKO_YARN_KERNEL_IP", "0.0.0.0"),
            request_timeout=_number(env, "RKO_YARN_TIMEOUT", 10.0, 0.1),
            spark_submit=env.get("RKO_SPARK_SUBMIT", "spark-submit"),
            spark_home=env.get("RKO_SPARK_HOME") or env.get("SPARK_HOME", ""),
            spark_opts=env.get("RKO_SPARK_OPTS", ""),
            hadoop_conf_dir=env.get("RKO_HADOOP_CONF_DIR") or env.get("HADOOP_CONF_DIR", ""),
            submit_timeout=_number(env, "RKO_SPARK_SUBMIT_TIMEOUT", 120.0, 1),
            toree_assembly=env.get("RKO_TOREE_ASSEMBLY", ""),
        )
        return cls(
            namespace=env.get("RKO_NAMESPACE", "remote-kernel-operator"),
            key_secret=env.get("RKO_KEY_SECRET", "remote-kernel-operator-keys"),
            watch_namespaces=_list(env.get("RKO_WATCH_NAMESPACES", "")),
            launch_timeout=_number(env, "RKO_LAUNCH_TIMEOUT", 30.0, 1),
            max_concurrent_launches=int(_number(env, "RKO_MAX_CONCURRENT_LAUNCHES", 16, 1)),
            pool_refill_delay=_number(env, "RKO_POOL_REFILL_DELAY_SECONDS", 1.0, 0, 60),
            authorized_users=frozenset(_list(env.get("RKO_AUTHORIZED_USERS", ""))),
            unauthorized_users=frozenset(_list(env.get("RKO_UNAUTHORIZED_USERS", "root"))),
            port_range=port_range,
            port_range_text=port_text,
            transport_encryption=encryption,
            response_bind=_address(env.get("RKO_RESPONSE_BIND", "0.0.0.0:8877"), "RKO_RESPONSE_BIND"),
            response_address=env.get("RKO_RESPONSE_ADDRESS", ""),
            response_reuse_port=_flag(env, "RKO_RESPONSE_REUSE_PORT", False),
            peer_service=env.get("RKO_PEER_SERVICE", ""),
            monitor_interval=_number(env, "RKO_MONITOR_INTERVAL", 1.0, 0.05),
            watch_server_timeout=_number(env, "RKO_WATCH_SERVER_TIMEOUT", 60.0, 1),
            watch_client_timeout=_number(env, "RKO_WATCH_CLIENT_TIMEOUT", 90.0, 1),
            kernel_image=env.get("RKO_KERNEL_IMAGE", ""),
            pod_grace_seconds=int(_number(env, "RKO_POD_GRACE_SECONDS", 5, 0)),
            shared_namespace=_flag(env, "RKO_SHARED_NAMESPACE", True),
            check_nodes=_flag(env, "RKO_CHECK_NODES", True),
            kernel_cluster_role=_cluster_role(env.get("RKO_KERNEL_CLUSTER_ROLE", "remote-kernel")),
            impersonation=_flag(env, "RKO_IMPERSONATION", False),
            operator_class=_operator_class(env.get("RKO_OPERATOR_CLASS", "")),
            unreachable_grace=_number(env, "RKO_UNREACHABLE_GRACE_SECONDS", 30.0, 0),
            ttl_after_finished=(
                _number(env, "RKO_TTL_SECONDS_AFTER_FINISHED", 0.0, 0)
                if env.get("RKO_TTL_SECONDS_AFTER_FINISHED", "").strip()
                else None
            ),
            stop_give_up=_number(env, "RKO_STOP_GIVE_UP_SECONDS", 600.0, 0),
            profile_cache_seconds=_number(env, "RKO_PROFILE_CACHE_SECONDS", 1.0, 0),
            track_activity=_flag(env, "RKO_TRACK_ACTIVITY", True),
            leader_election=_flag(env, "RKO_LEADER_ELECTION", False),
            lease_name=env.get("RKO_LEADER_LEASE", "")
            or "remote-kernel-operator-leader"
            + (f"-{env['RKO_OPERATOR_CLASS']}" if env.get("RKO_OPERATOR_CLASS") else ""),
            lease_duration=_number(env, "RKO_LEASE_DURATION_SECONDS", 10.0, 1),
            lease_renew_deadline=_number(env, "RKO_LEASE_RENEW_DEADLINE_SECONDS", 7.0, 0.5),
            lease_retry_period=_number(env, "RKO_LEASE_RETRY_SECONDS", 1.0, 0.1),
            identity=env.get("RKO_POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
            # A lone replica restarted in place must free its port at once: no drain by default.
            drain_seconds=_number(
                env, "RKO_DRAIN_SECONDS", 20.0 if _flag(env, "RKO_LEADER_ELECTION", False) else 0.0, 0
            ),
            http_bind=(
                _address(env["RKO_HTTP_BIND"], "RKO_HTTP_BIND")
                if env.get("RKO_HTTP_BIND", "").strip()
                else None
            ),
            log_format=_choice(env, "RKO_LOG_FORMAT", "text", ("text", "json")),
            memory_trim_seconds=_number(env, "RKO_MEMORY_TRIM_SECONDS", 30.0, 0),
            ssh=ssh,
            docker=DockerSettings(
                host=env.get("RKO_DOCKER_HOST") or env.get("DOCKER_HOST") or "unix:///var/run/docker.sock",
                tls_verify=_flag(env, "RKO_DOCKER_TLS_VERIFY", False),
                cert_path=env.get("RKO_DOCKER_CERT_PATH", ""),
                network=env.get("RKO_DOCKER_NETWORK", "host"),
                kernel_ip=env.get("RKO_DOCKER_KERNEL_IP", "0.0.0.0"),
                kernel_image=env.get("RKO_KERNEL_IMAGE", ""),
                stop_timeout=int(_number(env, "RKO_DOCKER_STOP_TIMEOUT", 5, 0)),
                api_version=env.get("RKO_DOCKER_API_VERSION", "1.41"),
            ),
            yarn=yarn,
        )
