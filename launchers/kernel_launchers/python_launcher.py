"""The kernel launcher: picks ports, starts ipykernel (or IRkernel), sends the connection info home.

Runs beside the kernel (in a pod, container, YARN container or on an ssh host) and needs no
Kubernetes library. It accepts gateway_provisioners' launcher arguments, plus the launch token
and the transport-encryption policy. It stays up as the kernel's supervisor: it serves signed
control requests (signal, shutdown) from the operator, and exits with the kernel's exit code.

    python -m kernel_launchers.python_launcher --kernel-id ID --response-address HOST:PORT \
        --public-key KEY [--token TOKEN | env RKO_LAUNCH_TOKEN] [--port-range 0..0] \
        [--transport-encryption disabled|auto|required] [--kernel-class-name CLASS] [--ip IP] \
        [--kernel-language python|r]

The R launcher is this launcher with ``--kernel-language r``: the handshake, port choice,
supervision and control port are the same code, and the kernel is IRkernel (Debian's
r-cran-irkernel), started as ``R --slave -e IRkernel::main() --args <connection file>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from . import protocol
from .attached import CONNECTION_LINE, AttachedKernel
from .ports import PortRangeError, bind_free_port, free_ports, held, in_use, listening_ports, parse_port_range

if TYPE_CHECKING:
    import importlib.machinery
    import logging

    log: logging.Logger
else:

    class _LazyLogger:
        """The launcher's logger, made at first use. Every import before the kernel's process
        starts delays that kernel: logging (like dataclasses, shutil, shlex and importlib.util,
        imported where used) costs milliseconds the kernel can spend starting instead."""

        def __getattr__(self, name: str) -> Any:
            import logging

            return getattr(logging.getLogger("kernel_launchers"), name)

    log = _LazyLogger()


def configure_logging() -> None:
    """The launcher's log format (to its stderr, the run directory's launcher.log)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s launcher %(levelname)s %(message)s")


EXIT_LAUNCH_FAILED = 3  # the kernel could not be started or its info not delivered
CONTROL_CONNECTIONS = 8  # control requests served at once
CONTROL_DEADLINE = 5.0  # seconds for a whole control request, however slowly it arrives
ENCRYPTION_POLICIES = ("disabled", "auto", "required")
LANGUAGES = ("python", "r", "scala")
# Start-up time allowed before the kernel listens: a JVM with Spark takes seconds, not ms.
LISTEN_TIMEOUT = {"python": 60.0, "r": 60.0, "scala": 180.0}
KERNEL_NAMES = {"r": "IRkernel", "scala": "Apache Toree"}
TOREE_MAIN = "org.apache.toree.Main"
# Toree 0.5 reads its jar's classes by reflection, which Java 17 refuses without this.
TOREE_JAR_OPENS = "--add-opens=java.base/java.util.jar=ALL-UNNAMED"
# ... and a pooled kernel takes its user's environment late through java.util's maps.
TOREE_JAVA_OPTIONS = f"{TOREE_JAR_OPENS} --add-opens=java.base/java.util=ALL-UNNAMED"


class LaunchRefused(RuntimeError):
    """The operator answered ``NO``: the kernel must not run."""


class LauncherArgs(NamedTuple):
    kernel_id: str
    response_address: tuple[str, int]  # the first of response_addresses
    public_key: bytes
    token: str
    port_range: tuple[int, int]
    transport_encryption: str
    kernel_class_name: str | None
    ip: str
    run_dir: Path
    response_retry_seconds: float
    spark_context_initialization_mode: str
    kernel_language: str = "python"
    r_executable: str = "R"
    exit_with_parent: bool = False
    extra_env: Mapping[str, str] = MappingProxyType({})  # from the launch file, for the kernel
    launch_id: str = ""  # what the operator knows this launch by (its RemoteKernel's uid)
    # Every replica of the operator the launcher may report to, the launching one first.
    response_addresses: tuple[tuple[str, int], ...] = ()
    kernel_pid: int | None = None  # attached: the kernel is this process (see attached.py)


def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> LauncherArgs:
    """Read and check the launcher's arguments; exits with a usage error on bad input."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="python -m kernel_launchers.python_launcher")
    parser.add_argument("--kernel-id", required=True)
    parser.add_argument(
        "--launch-id", default=None, help="the launch the operator waits for (default: the kernel id)"
    )
    parser.add_argument(
        "--response-address",
        required=True,
        help="HOST:PORT of the operator; several, comma-separated, are tried in turn (its replicas)",
    )
    parser.add_argument("--public-key", required=True, help="the operator's public key")
    parser.add_argument("--token", default=env.get("RKO_LAUNCH_TOKEN"), help="single-use token")
    parser.add_argument("--token-file", default=None, help="read the token from this file, then delete it")
    parser.add_argument(
        "--launch-file",
        default=None,
        help="read the token and the kernel's variables from this JSON file, then delete it",
    )
    parser.add_argument("--port-range", default=env.get("KERNEL_PORT_RANGE", "0..0"))
    parser.add_argument("--transport-encryption", default="disabled", choices=ENCRYPTION_POLICIES)
    parser.add_argument("--kernel-class-name", default=None)
    parser.add_argument(
        "--kernel-language", default=env.get("KERNEL_LANGUAGE", "python"), type=str.lower, choices=LANGUAGES
    )
    parser.add_argument("--r-executable", default=env.get("RKO_R_EXECUTABLE", "R"), help="R, for R kernels")
    parser.add_argument("--ip", default="0.0.0.0", help="address the kernel binds and reports")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--response-retry-seconds", type=float, default=300.0)
    parser.add_argument(
        "--spark-context-initialization-mode",
        "--RemoteProcessProxy.spark-context-initialization-mode",
        default=env.get("KERNEL_SPARK_INIT_MODE") or None,
        type=str.lower,
        choices=("lazy", "eager", "none"),
        help="Spark in the kernel: Python kernels default to none, Scala (Toree) kernels to eager",
    )
    parser.add_argument(
        "--kernel-pid",
        type=int,
        default=None,
        help="the kernel runs in this process, the launcher's parent (Toree in a Spark driver's JVM): "
        "the launcher writes the connection file, prints its path, and supervises that process",
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop the kernel when the process that started the launcher ends (a YARN container's "
        "ApplicationMaster or Spark driver JVM), so nothing outlives its container",
    )
    ns = parser.parse_args(argv)
    try:
        kernel_id = protocol.canonical_kernel_id(ns.kernel_id)
        launch_id = protocol.canonical_kernel_id(ns.launch_id or kernel_id)
        public_key = protocol.decode_key(ns.public_key)
        port_range = parse_port_range(ns.port_range)
    except (protocol.ProtocolError, PortRangeError) as err:
        parser.error(str(err))
    addresses = []
    for item in ns.response_address.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            parser.error(f"--response-address {ns.response_address!r} is not HOST:PORT[,HOST:PORT...].")
        addresses.append((host.strip("[]"), int(port)))
    extra_env: dict[str, str] = {}
    if ns.token_file:
        try:
            ns.token = Path(ns.token_file).read_text().strip()
        except OSError as err:
            parser.error(f"cannot read --token-file: {err}")
        _remove(Path(ns.token_file))
    if ns.launch_file:
        try:
            launch = json.loads(Path(ns.launch_file).read_text())
            ns.token = str(launch["token"])
            extra_env = {str(k): str(v) for k, v in (launch.get("env") or {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            parser.error(f"cannot read --launch-file: {err}")
        _remove(Path(ns.launch_file))
    if not ns.token:
        parser.error("a launch token is required: pass --token or set RKO_LAUNCH_TOKEN.")
    run_dir = Path(ns.run_dir or f"/tmp/rko-{kernel_id}")
    return LauncherArgs(
        kernel_id=kernel_id,
        response_address=addresses[0],
        response_addresses=tuple(addresses),
        public_key=public_key,
        token=ns.token,
        port_range=port_range,
        transport_encryption=ns.transport_encryption,
        kernel_class_name=ns.kernel_class_name,
        ip=ns.ip,
        run_dir=run_dir,
        response_retry_seconds=ns.response_retry_seconds,
        spark_context_initialization_mode=ns.spark_context_initialization_mode
        # Toree 0.5's SIGINT handler starts a lazy Spark in the JVM's signal thread, which has no
        # context class loader, and fails: an interrupt before Spark's first use would be lost.
        # Eager costs ~2 s to the kernel's first reply and nothing to the first Spark result.
        or ("eager" if ns.kernel_language == "scala" else "none"),
        kernel_language=ns.kernel_language,
        r_executable=ns.r_executable,
        exit_with_parent=ns.exit_with_parent,
        kernel_pid=ns.kernel_pid,
        extra_env=extra_env,
        launch_id=launch_id,
    )


def read_line(conn: socket.socket, limit: int, deadline: float) -> bytes:
    """One line from ``conn`` within ``deadline`` seconds in all (not per byte)."""
    end = time.monotonic() + deadline
    data = b""
    while b"\n" not in data and len(data) < limit:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the peer sent no whole line in time")
        conn.settimeout(remaining)
        chunk = conn.recv(min(4096, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0] + b"\n" if b"\n" in data else data


def _remove(path: Path) -> None:
    """Delete a file the token came in; a read-only one (a Swarm secret's mount) is left."""
    try:
        path.unlink()
    except OSError as err:
        log.debug("Could not remove %s (%s); it stays where it was mounted.", path, err)


def ensure_private_dir(path: Path) -> None:
    """Make ``path`` a directory only this user can use; refuse one that is a symlink, someone
    else's, or open to others (another user could have planted it to read the kernel's files)."""
    try:
        path.mkdir(mode=0o700, parents=True)
        return
    except FileExistsError:
        pass
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise RuntimeError(
            f"The run directory {path} exists and is not a plain directory; refusing to use it."
        )
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise RuntimeError(
            f"The run directory {path} belongs to uid {info.st_uid} or is open to others "
            f"(mode {stat.S_IMODE(info.st_mode):o}); refusing to use it."
        )


def advertised_ip(bind_ip: str) -> str:
    """The address clients reach the kernel on: the bind address, or this host's address."""
    if bind_ip not in ("0.0.0.0", "::", ""):
        return bind_ip
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def curve_keys(policy: str, language: str = "python") -> tuple[str, str] | None:
    """A CurveZMQ server key pair (Z85 text) when the policy asks for one and zmq has curve."""
    if policy == "disabled":
        return None
    if language != "python":
        if policy == "required":
            raise RuntimeError(
                f"transport_encryption='required', but {KERNEL_NAMES[language]} does not support "
                f"CurveZMQ; use 'auto' or 'disabled' for {language.capitalize()} kernels."
            )
        return None  # 'auto': this kernel cannot, so it runs unencrypted
    import zmq

    if not zmq.has("curve"):
        if policy == "required":
            raise RuntimeError(
                "transport_encryption='required' but this kernel's pyzmq has no CurveZMQ "
                "support; install a pyzmq built with libsodium in the kernel image."
            )
        return None
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
PORT_ATTEMPTS = 3


# How long a kernel may take to listen on its ports before they are checked for another
# process holding them (start-up binds all five within milliseconds of each other).
PARTIAL_BIND_SECONDS = 2.0


class PortTaken(RuntimeError):
    """A port chosen for the kernel was taken by another process before the kernel bound it."""


def build_connection_file(
    ip: str, ports: list[int], key: str, curve: tuple[str, str] | None
) -> dict[str, Any]:
    """The connection file the kernel reads (server side, so it holds the Curve secret)."""
    info: dict[str, Any] = dict(zip(PORT_NAMES, ports, strict=True))
    info.update(ip=ip, transport="tcp", signature_scheme="hmac-sha256", key=key, kernel_name="")
    if curve is not None:
        info["curve_publickey"], info["curve_secretkey"] = curve
    return info


# Run by ipykernel before it serves requests (exec_lines). 'eager' blocks start-up until Spark
# is up. 'lazy' starts Spark in a thread, so the kernel answers at once; 'spark' and 'sc' are
# stand-ins that wait for it on first use and then replace themselves. Either satisfies a YARN
# cluster-mode driver, whose ApplicationMaster waits for the context.
SPARK_INIT = {
    "eager": "from pyspark.sql import SparkSession\nspark = SparkSession.builder.getOrCreate()\nsc = spark.sparkContext\n",
    "lazy": """import threading as _rko_threading


class _RkoSpark:
    \"\"\"Waits for the Spark session started at kernel start-up, then stands aside.\"\"\"

    def __init__(self, name):
        self._name = name

    def _get(self):
        _rko_spark_ready.wait()
        if "error" in _rko_spark_box:
            raise RuntimeError("Spark did not start in this kernel") from _rko_spark_box["error"]
        session = _rko_spark_box["spark"]
        globals().update(spark=session, sc=session.sparkContext)
        return session if self._name == "spark" else session.sparkContext

    def __getattr__(self, attribute):
        return getattr(self._get(), attribute)

    def __repr__(self):
        return repr(self._get())


def _rko_start_spark():
    try:
        from pyspark.sql import SparkSession

        _rko_spark_box["spark"] = SparkSession.builder.getOrCreate()
    except BaseException as err:
        _rko_spark_box["error"] = err
    finally:
        _rko_spark_ready.set()


_rko_spark_box = {}
_rko_spark_ready = _rko_threading.Event()
spark, sc = _RkoSpark("spark"), _RkoSpark("sc")
_rko_threading.Thread(target=_rko_start_spark, name="spark-init", daemon=True).start()
""",
}


class KernelNotInstalled(RuntimeError):
    """What the kernel needs is not on this host; the message says what to install or set."""


Finder = Callable[[str], "importlib.machinery.ModuleSpec | None"]


def _find_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    import importlib.util

    return importlib.util.find_spec(name)


def spark_home(environ: dict[str, str], find: Finder = _find_spec) -> Path:
    """SPARK_HOME, else the Spark that PyPI's pyspark carries (bin/spark-submit and its jars)."""
    if environ.get("SPARK_HOME"):
        return Path(environ["SPARK_HOME"])
    found = find("pyspark")
    if found is None or not found.submodule_search_locations:
        raise KernelNotInstalled(
            "Scala kernels need Spark: set SPARK_HOME (the profile's env.values) or install pyspark "
            "beside the launcher."
        )
    return Path(next(iter(found.submodule_search_locations)))


def toree_assembly(environ: dict[str, str], find: Finder = _find_spec) -> Path:
    """TOREE_ASSEMBLY, else the jar PyPI's toree package carries (toree/lib)."""
    if environ.get("TOREE_ASSEMBLY"):
        return Path(environ["TOREE_ASSEMBLY"])
    found = find("toree")
    jars = (
        sorted(Path(next(iter(found.submodule_search_locations))).glob("lib/toree-assembly-*.jar"))
        if found is not None and found.submodule_search_locations
        else []
    )
    if not jars:
        raise KernelNotInstalled(
            "Scala kernels need Apache Toree: set TOREE_ASSEMBLY to its assembly jar or install the "
            "toree package (PyPI) beside the launcher."
        )
    return jars[-1]


def toree_command(connection_file: Path, spark_init: str, environ: dict[str, str]) -> list[str]:
    """Apache Toree on the connection file, through spark-submit (as Toree's own run.sh does).

    SPARK_OPTS (the administrator's, from the profile) come first; the main class, the jar and
    Toree's options are the launcher's. Spark starts ``eager`` unless ``lazy`` (on first use of
    ``sc``/``spark``; an interrupt before that use is lost, see parse_args) or ``none`` is asked.
    """
    import shlex

    home, jar = spark_home(environ), toree_assembly(environ)
    return [
        str(home / "bin" / "spark-submit"),
        "--name",
        "Apache Toree",
        *shlex.split(environ.get("SPARK_OPTS", "")),
        "--driver-java-options",
        TOREE_JAVA_OPTIONS,
        "--class",
        TOREE_MAIN,
        str(jar),
        "--profile",
        str(connection_file),
        "--spark-context-initialization-mode",
        spark_init if spark_init in ("lazy", "eager", "none") else "eager",
    ]


# `python -m ipykernel_launcher`, plus one byte written to the file descriptor in argv[1] once
# the kernel's sockets are bound (the moment the launcher polled for): the launcher waits on a
# pipe, not in a loop that reads every socket of the host. A failed start exits at once, so the
# pipe's end tells the launcher; ipykernel's threads would otherwise keep the process alive.
READY_KERNEL_CODE = """\
# ipykernel_launcher, and one byte to its launcher once it listens
import os, sys, traceback
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]
fd = int(sys.argv.pop(1))
os.set_inheritable(fd, False)
from ipykernel.kernelapp import IPKernelApp


def ready():
    global fd
    if fd >= 0:
        os.write(fd, b"1")
        os.close(fd)
        fd = -1


class ReadyKernelApp(IPKernelApp):
    def init_heartbeat(self):
        super().init_heartbeat()
        ready()


app = ReadyKernelApp.instance()
try:
    app.initialize()
except SystemExit as stop:
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(stop.code if isinstance(stop.code, int) else 1)
except BaseException:
    traceback.print_exc(); sys.stdout.flush(); sys.stderr.flush()
    os._exit(1)
ready()
app.start()
"""


def kernel_command(
    connection_file: Path,
    kernel_class_name: str | None,
    language: str = "python",
    r_executable: str = "R",
    spark_init: str = "none",
    environ: dict[str, str] | None = None,
    ready_fd: int | None = None,
) -> list[str]:
    """The command that starts the kernel (ipykernel, IRkernel for R, Toree for Scala) on the
    connection file. A Python kernel given ``ready_fd`` writes a byte to it once it listens."""
    if language == "scala":
        return toree_command(connection_file, spark_init, dict(os.environ if environ is None else environ))
    if language == "r":
        return [
            r_executable,
            "--slave",
            "--no-restore",
            "-e",
            "IRkernel::main()",
            "--args",
            str(connection_file),
        ]
    if ready_fd is None:
        cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", str(connection_file)]
    else:
        cmd = [sys.executable, "-c", READY_KERNEL_CODE, str(ready_fd), "-f", str(connection_file)]
    if kernel_class_name:
        cmd.append(f"--IPKernelApp.kernel_class={kernel_class_name}")
    if spark_init in SPARK_INIT:
        cmd.append(f"--IPKernelApp.exec_lines={SPARK_INIT[spark_init]}")
    return cmd


def _ignore(signum: int, frame: Any) -> None:
    """The launcher's own SIGINT: nothing (interrupts are for its kernel)."""


def let_kernels_take_sigint() -> None:
    """A launcher started in the background by a shell (ssh's ``... &``) inherits SIGINT
    ignored, and an ignored signal stays ignored across exec: a JVM then cannot install
    Toree's interrupt handler, and interrupts are lost. A handler of our own is reset to the
    default on exec, so the kernel starts with SIGINT deliverable, while the launcher itself
    still ignores it."""
    signal.signal(signal.SIGINT, _ignore)


class Launcher:
    """Starts one kernel, reports it, supervises it and serves control requests."""

    def __init__(self, args: LauncherArgs) -> None:
        self.args = args
        self.kernel: subprocess.Popen[bytes] | AttachedKernel | None = None
        self.control_key = os.urandom(32)
        self.control_socket: socket.socket | None = None
        self.control_port = 0
        self.seen_nonces: dict[str, float] = {}
        self.nonce_lock = threading.Lock()
        self.shutting_down = threading.Event()
        self.ready_fd: int | None = None  # read end of the kernel's "listening" pipe

    # -- start ---------------------------------------------------------------------------
    def start_kernel(self) -> dict[str, Any]:
        args = self.args
        ensure_private_dir(args.run_dir)
        bind_ip = args.ip
        ports = free_ports(bind_ip if bind_ip else "0.0.0.0", 5, args.port_range)
        key = os.urandom(32).hex()
        curve = curve_keys(args.transport_encryption, args.kernel_language)
        info = build_connection_file(bind_ip, ports, key, curve)
        connection_file = args.run_dir / "kernel.json"
        fd = os.open(connection_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle)
        if args.kernel_pid is not None:
            # The kernel's process started us and waits for this line to start the kernel.
            self.kernel = AttachedKernel(args.kernel_pid)
            print(f"{CONNECTION_LINE} {connection_file}", flush=True)
            configure_logging()
            log.info("Kernel %s runs in pid %d, on %s.", args.kernel_id, args.kernel_pid, connection_file)
            threading.Thread(target=protocol.preload_crypto, name="preload", daemon=True).start()
            return info
        env = dict(os.environ)
        env.update(args.extra_env)
        env.pop("RKO_LAUNCH_TOKEN", None)  # the kernel's code never sees the token
        self.kernel = self.spawn(connection_file, env)
        configure_logging()  # only now: the kernel starts while logging loads
        log.info(
            "The launcher of kernel %s (pid %d) started the kernel as pid %d.",
            args.kernel_id,
            os.getpid(),
            self.kernel.pid,
        )
        # Sealing the report needs cryptography: load it while the kernel starts, not before.
        threading.Thread(target=protocol.preload_crypto, name="preload", daemon=True).start()
        return info

    def spawn(self, connection_file: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start the kernel's process; a Python kernel gets a pipe to say when it listens."""
        args = self.args
        read_end, write_end = os.pipe() if args.kernel_language == "python" else (-1, -1)
        try:
            kernel = subprocess.Popen(
                kernel_command(
                    connection_file,
                    args.kernel_class_name,
                    args.kernel_language,
                    args.r_executable,
                    args.spark_context_initialization_mode,
                    env,
                    ready_fd=write_end if write_end >= 0 else None,
                ),
                env=env,
                stdin=subprocess.DEVNULL,
                pass_fds=(write_end,) if write_end >= 0 else (),
            )
        except BaseException:
            if read_end >= 0:
                os.close(read_end)
            raise
        finally:
            if write_end >= 0:
                os.close(write_end)  # the kernel holds the only write end: its exit ends the pipe
        self.ready_fd = read_end if read_end >= 0 else None
        return kernel

    def _wait_ready(self, deadline: float) -> None:
        """Sleep until the kernel says it listens, exits, or the deadline passes (no polling:
        a hundred launchers polling the host's socket tables cost more than their kernels)."""
        fd, self.ready_fd = self.ready_fd, None
        if fd is None:
            return
        try:
            readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if readable and not os.read(fd, 1) and isinstance(self.kernel, subprocess.Popen):
                # The pipe's end without the byte: the kernel failed to start; let its exit code
                # (and the ports it could not bind) be read below.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.kernel.wait(5)
        finally:
            os.close(fd)

    def wait_kernel_listening(self, info: dict[str, Any], timeout: float = 60.0) -> None:
        """Wait until the kernel listens on all five of its ports, so 'Running' means ready.

        The ports are chosen free, then released for the kernel to bind: another process may
        take one in between. So the kernel's own sockets are checked (in /proc), not merely
        that something answers on the port; a kernel that died because a port was taken
        raises PortTaken, and is started again on other ports.
        """
        deadline = time.monotonic() + timeout
        self._wait_ready(deadline)
        host = "127.0.0.1" if info["ip"] in ("0.0.0.0", "") else info["ip"]
        wanted = {info[name] for name in PORT_NAMES}
        started = checked = time.monotonic()
        while time.monotonic() < deadline:
            assert self.kernel is not None
            if self.kernel.poll() is not None:
                taken = in_use(info["ip"] or "0.0.0.0", sorted(wanted))
                if taken:
                    raise PortTaken(f"another process took port(s) {taken} before the kernel bound them")
                raise RuntimeError(f"The kernel exited with code {self.kernel.returncode} during start-up.")
            # A connect first (cheap); /proc only once something answers: its socket tables
            # list every socket of the host, and a hundred launchers reading them every 50 ms
            # cost more CPU than their kernels' start-up.
            with socket.socket() as probe:
                probe.settimeout(0.5)
                answered = probe.connect_ex((host, info["shell_port"])) == 0
            if answered:
                own = listening_ports(self.kernel.pid)
                if own is None or wanted <= own:  # no /proc: the answer is all we can tell
                    return
            now = time.monotonic()
            if now - started > PARTIAL_BIND_SECONDS and now - checked >= 0.5:
                checked = now
                self._stop_if_a_port_was_taken(wanted)
            time.sleep(0.05)
        raise RuntimeError(f"The kernel did not listen on its ports within {timeout:.0f} s.")

    def _stop_if_a_port_was_taken(self, wanted: set[int]) -> None:
        """A kernel that lost a port to another process may not exit (ipykernel's threads keep
        it alive when its heartbeat or iopub port is taken): stop it, raise PortTaken."""
        assert self.kernel is not None
        holding = held(wanted)
        own = listening_ports(self.kernel.pid)  # after: a port the kernel binds meanwhile is its own
        if own is None:
            return
        taken = holding - own
        if taken:
            self.kernel.kill()
            self.kernel.wait(10)
            raise PortTaken(f"another process holds port(s) {sorted(taken)}; the kernel could not bind them")

    def start_listening_kernel(self) -> dict[str, Any]:
        """Start the kernel and wait until it listens; on other ports if one was taken."""
        attempts = 1 if self.args.kernel_pid is not None else PORT_ATTEMPTS  # a parent is not restarted
        for attempt in range(1, attempts + 1):
            info = self.start_kernel()
            try:
                self.wait_kernel_listening(info, LISTEN_TIMEOUT[self.args.kernel_language])
                log.info("The kernel listens on its ports.")
                return info
            except PortTaken as err:
                if attempt == attempts:
                    raise RuntimeError(f"The kernel could not bind its ports: {err}.") from err
                log.warning("The kernel could not start (%s); starting it again on other ports.", err)
        raise AssertionError("unreachable")

    def open_control_port(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.control_port = bind_free_port(sock, self.args.ip, self.args.port_range)
        sock.listen(8)
        self.control_socket = sock
        threading.Thread(target=self._serve_control, name="control", daemon=True).start()

    def payload(self, info: dict[str, Any]) -> protocol.LaunchPayload:
        assert self.kernel is not None
        connection: protocol.ConnectionInfo = {
            "ip": advertised_ip(info["ip"]),
            "transport": info["transport"],
            "signature_scheme": info["signature_scheme"],
            "key": info["key"],
            "kernel_name": "",
            "shell_port": info["shell_port"],
            "iopub_port": info["iopub_port"],
            "stdin_port": info["stdin_port"],
            "control_port": info["control_port"],
            "hb_port": info["hb_port"],
        }
        if "curve_publickey" in info:
            connection["curve_publickey"] = info["curve_publickey"]
            connection["curve_secretkey"] = info["curve_secretkey"]
        return {
            "kernel_id": self.args.kernel_id,
            "launch_id": self.args.launch_id or self.args.kernel_id,
            "token": self.args.token,
            "connection": connection,
            "pid": os.getpid(),
            "pgid": os.getpgid(0),
            "kernel_pid": self.kernel.pid,
            "hostname": socket.gethostname(),
            "control_port": self.control_port,
            "control_key": protocol.encode_key(self.control_key),
            "sent_at": time.time(),
        }

    def send_home(self, payload: protocol.LaunchPayload) -> None:
        """Deliver the sealed payload, retrying until the operator acknowledges it."""
        frame = protocol.seal_launch_payload(payload, self.args.public_key)
        deadline = time.monotonic() + self.args.response_retry_seconds
        delay = 0.1
        addresses = self.args.response_addresses or (self.args.response_address,)
        attempt = 0
        while True:
            # The launching replica first; on a failure the next (a standby, after a failover).
            address = addresses[attempt % len(addresses)]
            attempt += 1
            try:
                with socket.create_connection(address, timeout=10) as conn:
                    conn.sendall(frame)
                    conn.shutdown(socket.SHUT_WR)
                    answer = read_line(conn, 64, 10)
                if answer.startswith(b"OK"):
                    log.info("The operator accepted the connection info.")
                    return
                if answer.startswith(b"NO"):
                    # Final: this launch was replaced, stopped or deleted. Retrying would keep an
                    # unowned kernel running until the deadline.
                    cause = answer[2:].strip().decode("ascii", "replace") or "refused"
                    raise LaunchRefused(f"The operator refused this launch for good ({cause}).")
                reason = "the operator did not accept it yet"
            except OSError as err:
                reason = str(err)
            if time.monotonic() + delay > deadline:
                raise RuntimeError(f"Could not deliver the connection info: {reason}.")
            log.warning(
                "Could not deliver the connection info to %s:%d (%s); retrying in %.1f s.",
                *address,
                reason,
                delay,
            )
            if attempt % len(addresses) == 0:  # every address tried once: back off
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- control -------------------------------------------------------------------------
    def _serve_control(self) -> None:
        """Accept control connections; each is served in its own thread (a slow client holds
        only its own), at most CONTROL_CONNECTIONS at once (more are closed unread)."""
        assert self.control_socket is not None
        slots = threading.BoundedSemaphore(CONTROL_CONNECTIONS)
        while not self.shutting_down.is_set():
            try:
                conn, peer = self.control_socket.accept()
            except OSError:
                return
            if not slots.acquire(blocking=False):
                conn.close()
                continue

            def serve(conn: socket.socket = conn, peer: Any = peer) -> None:
                try:
                    self._serve_one(conn, peer)
                finally:
                    slots.release()

            threading.Thread(target=serve, name="control-conn", daemon=True).start()

    def _serve_one(self, conn: socket.socket, peer: Any) -> None:
        with conn:
            try:
                line = read_line(conn, 8192, CONTROL_DEADLINE)
                with self.nonce_lock:  # connections are served concurrently: one replay check at a time
                    body = protocol.verify_control(line, self.control_key, self.seen_nonces)
                reply = self.handle_control(body)
            except protocol.ProtocolError as err:
                log.warning("Rejected a control request from %s: %s", peer, err)
                reply = {"ok": False, "error": "rejected"}
            except OSError as err:
                log.warning("A control connection from %s failed: %s", peer, err)
                return
            with contextlib.suppress(OSError):
                conn.settimeout(CONTROL_DEADLINE)
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def handle_control(self, body: dict[str, Any]) -> dict[str, Any]:
        request = body.get("request")
        if request == "signal":
            signum = body.get("signum")
            if not isinstance(signum, int) or (
                signum != 0 and signum not in {s.value for s in signal.Signals}
            ):
                return {"ok": False, "error": f"unknown signal {signum!r}"}
            if signum == 0:
                return {"ok": True, "alive": self.kernel is not None and self.kernel.poll() is None}
            if self.kernel is not None and self.kernel.poll() is None:
                self.kernel.send_signal(signum)
            return {"ok": True}
        if request == "shutdown":
            threading.Thread(target=self.stop_kernel, daemon=True).start()
            return {"ok": True}
        return {"ok": False, "error": f"unknown request {request!r}"}

    def stop_kernel(self, grace: float = 5.0) -> None:
        """Ask the kernel to terminate; kill it if it is still there after ``grace`` seconds.

        Never waits: it runs in signal handlers, where waiting on the child would contend with
        the main thread's own wait for it.
        """
        self.shutting_down.set()
        kernel = self.kernel
        if kernel is None or kernel.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            kernel.terminate()

        def kill_if_alive() -> None:
            if kernel.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    kernel.kill()

        timer = threading.Timer(grace, kill_if_alive)
        timer.daemon = True
        timer.start()

    # -- run -----------------------------------------------------------------------------
    def watch_parent(self, interval: float = 0.5) -> None:
        """Stop the kernel once the launcher's parent is gone (we were re-parented)."""
        parent = os.getppid()

        def watch() -> None:
            while not self.shutting_down.wait(interval):
                if os.getppid() != parent:
                    log.warning(
                        "The process that started the launcher (pid %d) ended; stopping the kernel.", parent
                    )
                    self.stop_kernel()
                    return

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop_kernel())
        let_kernels_take_sigint()
        if self.args.exit_with_parent:
            self.watch_parent()
        try:
            info = self.start_listening_kernel()
            self.open_control_port()
            self.send_home(self.payload(info))
        except Exception as err:
            configure_logging()
            log.error("The kernel launch failed: %s", err)
            self.stop_kernel()
            if self.kernel is not None:
                try:
                    self.kernel.wait(5)
                except subprocess.TimeoutExpired:
                    self.kernel.kill()
                    self.kernel.wait()
            if isinstance(err, LaunchRefused):
                # Not the kernel of record (e.g. an ssh attempt that timed out, then ran): nobody
                # will stop us or remove our run directory, so we leave nothing ourselves.
                remove_unused_run_dir(self.args.run_dir, own={os.getpid()})
            else:
                self.write_exit_status(EXIT_LAUNCH_FAILED, str(err))
            return EXIT_LAUNCH_FAILED
        assert self.kernel is not None
        while True:
            try:
                code = self.kernel.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
        self.shutting_down.set()
        if self.control_socket is not None:
            self.control_socket.close()
        log.info("Kernel %s exited with code %d.", self.args.kernel_id, code)
        self.write_exit_status(code, "")
        self.notify_exit()
        return code if code >= 0 else 128 - code

    def notify_exit(self) -> None:
        """Tell the operator to look now (best effort: it also polls)."""
        notice = protocol.exit_notice(self.args.launch_id or self.args.kernel_id, self.control_key)
        for address in self.args.response_addresses or (self.args.response_address,):
            try:
                with socket.create_connection(address, timeout=2) as conn:
                    conn.sendall(notice)
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(16)
                return
            except OSError as err:
                log.info("Could not tell the operator at %s:%d about the exit (%s).", *address, err)
        log.info("No replica of the operator took the exit notice; it will notice by polling.")

    def write_exit_status(self, code: int, message: str) -> None:
        """Leave the exit code where a backend that cannot wait on us can read it."""
        with contextlib.suppress(OSError, RuntimeError):
            ensure_private_dir(self.args.run_dir)
            (self.args.run_dir / "exit_status").write_text(json.dumps({"code": code, "message": message}))
            (self.args.run_dir / "kernel.json").unlink(missing_ok=True)


def remove_unused_run_dir(run_dir: Path, own: set[int], proc: Path = Path("/proc")) -> bool:
    """Remove ``run_dir`` unless a process other than ``own`` names it on its command line (the
    launcher of record may share the path on this host). True if it was removed."""
    needle = str(run_dir).encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes():
                return False
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    return not run_dir.exists()


def main(argv: list[str] | None = None) -> int:
    return Launcher(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
