"""The Python launcher's arguments and builders, and how it treats a kernel it starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kernel_launchers import protocol
from kernel_launchers.python_launcher import build_connection_file, kernel_command, parse_args

KEY = protocol.encode_key(b"k" * 32)
BASE = [
    "--kernel-id",
    "6c9c8d0e-1111-2222-3333-444455556666",
    "--response-address",
    "10.0.0.1:8877",
    "--public-key",
    KEY,
]


def test_the_seed_arguments_are_accepted() -> None:
    args = parse_args(
        [*BASE, "--port-range", "40000..41000", "--kernel-class-name", "my.Kernel"], {"RKO_LAUNCH_TOKEN": "t"}
    )
    assert args.response_address == ("10.0.0.1", 8877)
    assert args.port_range == (40000, 41000)
    assert args.token == "t" and args.kernel_class_name == "my.Kernel"
    assert str(args.run_dir).endswith("6c9c8d0e-1111-2222-3333-444455556666")


def test_the_token_can_come_from_a_file_that_is_then_deleted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    token_file = tmp_path / "token"
    token_file.write_text("secret-token\n")
    args = parse_args([*BASE, "--token-file", str(token_file)], {})
    assert args.token == "secret-token" and not token_file.exists()


@pytest.mark.parametrize(
    ("extra", "env", "words"),
    [
        ([], {}, "launch token is required"),
        (["--port-range", "1..2"], {"RKO_LAUNCH_TOKEN": "t"}, "1024..65535"),
        (["--transport-encryption", "maybe"], {"RKO_LAUNCH_TOKEN": "t"}, "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_a_usage_error(
    extra: list[str], env: dict[str, str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as err:
        parse_args([*BASE, *extra], env)
    assert err.value.code == 2
    assert words in capsys.readouterr().err


def test_a_bad_key_or_kernel_id_or_address_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, words in [
        (["--kernel-id", "x", "--response-address", "h:1", "--public-key", KEY], "not a kernel id"),
        (["--kernel-id", BASE[1], "--response-address", "h:1", "--public-key", "c2hvcnQ="], "32 bytes"),
        (["--kernel-id", BASE[1], "--response-address", "nohostport", "--public-key", KEY], "HOST:PORT"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(argv, {"RKO_LAUNCH_TOKEN": "t"})
        assert words in capsys.readouterr().err


def test_connection_file_and_command() -> None:
    info = build_connection_file("127.0.0.1", [1, 2, 3, 4, 5], "key", ("PUB", "SEC"))
    assert info["shell_port"] == 1 and info["hb_port"] == 5 and info["signature_scheme"] == "hmac-sha256"
    assert info["curve_publickey"] == "PUB" and info["curve_secretkey"] == "SEC"
    assert "curve_publickey" not in build_connection_file("127.0.0.1", [1, 2, 3, 4, 5], "key", None)
    cmd = kernel_command(__import__("pathlib").Path("/tmp/k.json"), "my.Kernel")
    assert cmd[1:5] == ["-m", "ipykernel_launcher", "-f", "/tmp/k.json"]
    assert cmd[-1] == "--IPKernelApp.kernel_class=my.Kernel"


def test_control_requests_signal_and_stop_the_kernel_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from kernel_launchers.python_launcher import Launcher

    launcher = Launcher(parse_args([*BASE, "--run-dir", str(tmp_path)], {"RKO_LAUNCH_TOKEN": "t"}))
    launcher.kernel = subprocess.Popen(["sleep", "30"])  # stands in for the kernel process
    try:
        assert launcher.handle_control({"request": "signal", "signum": 0}) == {"ok": True, "alive": True}
        assert launcher.handle_control({"request": "signal", "signum": 999})["ok"] is False
        assert launcher.handle_control({"request": "reboot"})["ok"] is False
        assert launcher.handle_control({"request": "signal", "signum": 15}) == {"ok": True}
        assert launcher.kernel.wait(5) == -15
        launcher.kernel = subprocess.Popen(["sleep", "30"])
        assert launcher.handle_control({"request": "shutdown"}) == {"ok": True}
        assert launcher.kernel.wait(5) == -15
        assert launcher.shutting_down.is_set()
    finally:
        if launcher.kernel.poll() is None:
            launcher.kernel.kill()


def test_the_launch_id_is_the_operators_else_the_kernel_id() -> None:
    default = parse_args(BASE, {"RKO_LAUNCH_TOKEN": "t"})
    assert default.launch_id == default.kernel_id
    uid = "0B5AD6A4-9C6E-4F51-8A3E-51D1C6F7F0AA"
    given = parse_args([*BASE, "--launch-id", uid], {"RKO_LAUNCH_TOKEN": "t"})
    assert given.launch_id == uid.lower() and given.kernel_id == "6c9c8d0e-1111-2222-3333-444455556666"
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--launch-id", "not-a-uuid"], {"RKO_LAUNCH_TOKEN": "t"})


def test_a_port_taken_before_the_kernel_binds_it_is_not_mistaken_for_the_kernel(  # type: ignore[no-untyped-def]
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ports are chosen free and released for the kernel to bind: another process can take one
    in between. Something else answering on the shell port is not our kernel listening; the
    kernel, unable to bind, is started again on other ports, and ends up owning all five."""
    import socket

    from kernel_launchers import python_launcher
    from kernel_launchers.ports import listening_ports

    thief = socket.socket()
    thief.bind(("127.0.0.1", 0))
    thief.listen(1)
    taken = thief.getsockname()[1]
    real_free_ports = python_launcher.free_ports
    calls = []

    def first_collides(ip: str, count: int, port_range: tuple[int, int]) -> list[int]:
        ports = real_free_ports(ip, count, port_range)
        calls.append(ports)
        return [taken, *ports[1:]] if len(calls) == 1 else ports

    monkeypatch.setattr(python_launcher, "free_ports", first_collides)
    args = parse_args(
        [*BASE, "--ip", "127.0.0.1", "--run-dir", str(tmp_path / "run")], {"RKO_LAUNCH_TOKEN": "t"}
    )
    launcher = python_launcher.Launcher(args)
    try:
        info = launcher.start_listening_kernel()
        assert len(calls) == 2 and info["shell_port"] != taken
        assert launcher.kernel is not None
        own = listening_ports(launcher.kernel.pid)
        assert own is not None and {info[n] for n in python_launcher.PORT_NAMES} <= own
    finally:
        thief.close()
        if launcher.kernel is not None and launcher.kernel.poll() is None:
            launcher.kernel.kill()
            launcher.kernel.wait()


def test_the_launcher_starts_without_loading_cryptography() -> None:
    """cryptography (~30 ms to import) is loaded while the kernel starts, not before it: the
    launcher's own imports are on every launch's critical path."""
    import subprocess
    import sys

    code = "import sys, kernel_launchers.python_launcher; print(sorted(m for m in sys.modules if m.startswith(('cryptography', 'secrets'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # Nor what it needs only after the kernel's process has started (~25 ms in all). Without
    # site (-S): a development install's path hooks load some of these themselves.
    later = ("logging", "dataclasses", "shutil", "shlex")
    launchers = str(Path(__import__("kernel_launchers").__file__).parent.parent)
    code = (
        f"import sys; sys.path.insert(0, {launchers!r}); import kernel_launchers.python_launcher; "
        f"print(sorted(m for m in {later!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
    from kernel_launchers import protocol

    protocol.preload_crypto()
    assert "cryptography.hazmat.primitives.ciphers.aead" in sys.modules


@pytest.mark.parametrize("ready_pipe", [True, False], ids=["ready-pipe", "polled"])
@pytest.mark.parametrize("port_name", ["hb_port", "iopub_port", "shell_port"])
def test_a_kernel_that_lost_a_port_and_hangs_is_stopped_and_started_again(
    tmp_path, port_name, ready_pipe
) -> None:  # type: ignore[no-untyped-def]
    """ipykernel does not exit when its heartbeat or iopub port is taken (its threads keep it
    alive while its shell port answers): the launcher must not wait 60 s for it. Both ways of
    waiting: the kernel's ready pipe (Python kernels) and polling (R, Scala)."""
    import json
    import socket
    import subprocess
    import time

    from kernel_launchers.ports import free_ports
    from kernel_launchers.python_launcher import Launcher, PortTaken

    launcher = Launcher(parse_args([*BASE, "--run-dir", str(tmp_path)], {"RKO_LAUNCH_TOKEN": "t"}))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        info = build_connection_file("127.0.0.1", free_ports("127.0.0.1", 5, (0, 0)), "k", None)
        info[port_name] = holder.getsockname()[1]
        connection_file = tmp_path / "kernel.json"
        connection_file.write_text(json.dumps(info))
        if ready_pipe:
            launcher.kernel = launcher.spawn(connection_file, dict(os.environ))
            assert launcher.ready_fd is not None
        else:
            launcher.kernel = subprocess.Popen(
                kernel_command(connection_file, None), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        began = time.monotonic()
        try:
            with pytest.raises(PortTaken, match=str(info[port_name])):
                launcher.wait_kernel_listening(info, timeout=30)
        finally:
            if launcher.kernel.poll() is None:
                launcher.kernel.kill()
        assert time.monotonic() - began < 15
        assert launcher.kernel.poll() is not None  # stopped, not left behind


def test_several_response_addresses_are_tried_in_turn(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The launching replica first; when it is gone, the next replica takes the report."""
    import socket
    import threading

    from kernel_launchers.python_launcher import Launcher

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there: a lost replica
    alive = socket.socket()
    alive.bind(("127.0.0.1", 0))
    alive.listen()
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = alive.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            got.append(data)
            conn.sendall(b"OK\n")

    threading.Thread(target=serve, daemon=True).start()
    addresses = f"127.0.0.1:{dead_port},127.0.0.1:{alive.getsockname()[1]}"
    args = parse_args(
        [*BASE[:2], "--response-address", addresses, *BASE[4:], "--run-dir", str(tmp_path)],
        {"RKO_LAUNCH_TOKEN": "t"},
    )
    assert args.response_address == ("127.0.0.1", dead_port) and len(args.response_addresses) == 2
    launcher = Launcher(args)
    payload = {"kernel_id": args.kernel_id, "launch_id": args.kernel_id, "token": "t"}
    launcher.send_home(payload)  # type: ignore[arg-type]
    alive.close()
    assert got and got[0]


def test_a_malformed_address_in_the_list_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(
            [*BASE[:2], "--response-address", "10.0.0.1:8877,nohostport", *BASE[4:]],
            {"RKO_LAUNCH_TOKEN": "t"},
        )


def test_a_final_refusal_stops_the_kernel_at_once_without_retrying(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """An orphan of a relaunch (its launch replaced) is told ``NO``: it stops its kernel now,
    not after retrying until its own deadline, tries no other replica, and removes its run
    directory (nobody else will)."""
    import socket
    import threading
    import time

    from kernel_launchers.python_launcher import EXIT_LAUNCH_FAILED, Launcher

    operator = socket.socket()
    operator.bind(("127.0.0.1", 0))
    operator.listen()
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()  # a second replica: must not be asked
    other.settimeout(0.1)
    connections: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = operator.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                connections.append(data)
                conn.sendall(b"NO bad_token\n")

    threading.Thread(target=serve, daemon=True).start()
    addresses = f"127.0.0.1:{operator.getsockname()[1]},127.0.0.1:{other.getsockname()[1]}"
    public = protocol.encode_key(protocol.public_key_of(protocol.new_private_key()))
    args = parse_args(
        [
            *BASE[:2],
            "--response-address",
            addresses,
            "--public-key",
            public,
            "--run-dir",
            str(tmp_path / "run"),
        ],
        {"RKO_LAUNCH_TOKEN": "t"},
    )
    launcher = Launcher(args)
    caplog.set_level("INFO")
    began = time.monotonic()
    try:
        assert launcher.run() == EXIT_LAUNCH_FAILED
    finally:
        operator.close()
        if launcher.kernel is not None and launcher.kernel.poll() is None:
            launcher.kernel.kill()
    status = caplog.text
    assert len(connections) == 1, (connections, status)
    assert not (tmp_path / "run").exists()
    with pytest.raises(OSError):
        other.accept()
    other.close()
    assert launcher.kernel is not None and launcher.kernel.poll() is not None  # the kernel is gone
    assert time.monotonic() - began < 20  # not the retry deadline (300 s by default)
    assert "refused this launch for good (bad_token)" in status


def test_a_scala_kernel_is_toree_through_spark_submit_with_spark_eager_by_default(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kernel_launchers.python_launcher import TOREE_JAVA_OPTIONS, kernel_command

    args = parse_args([*BASE, "--kernel-language", "scala"], {"RKO_LAUNCH_TOKEN": "t"})
    assert args.spark_context_initialization_mode == "eager"  # an interrupt works from the start
    lazy = parse_args(
        [*BASE, "--kernel-language", "scala"], {"RKO_LAUNCH_TOKEN": "t", "KERNEL_SPARK_INIT_MODE": "lazy"}
    )
    assert lazy.spark_context_initialization_mode == "lazy"
    assert parse_args(BASE, {"RKO_LAUNCH_TOKEN": "t"}).spark_context_initialization_mode == "none"  # Python
    env = {
        "SPARK_HOME": "/opt/spark",
        "TOREE_ASSEMBLY": "/opt/toree.jar",
        "SPARK_OPTS": "--master local[2] --conf 'spark.app.name=a b'",
    }
    cmd = kernel_command(tmp_path / "kernel.json", None, "scala", spark_init="lazy", environ=env)
    assert cmd[0] == "/opt/spark/bin/spark-submit"
    assert cmd[3:7] == ["--master", "local[2]", "--conf", "spark.app.name=a b"]  # the profile's, quoted
    assert cmd[7:] == [
        "--driver-java-options",
        TOREE_JAVA_OPTIONS,
        "--class",
        "org.apache.toree.Main",
        "/opt/toree.jar",
        "--profile",
        str(tmp_path / "kernel.json"),
        "--spark-context-initialization-mode",
        "lazy",
    ]


def test_a_scala_kernel_without_spark_or_toree_says_what_to_install(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kernel_launchers.python_launcher import KernelNotInstalled, spark_home, toree_assembly

    def nothing(name: str) -> None:
        return None

    with pytest.raises(KernelNotInstalled, match=r"set TOREE_ASSEMBLY .* or install the toree package"):
        toree_assembly({}, find=nothing)
    with pytest.raises(KernelNotInstalled, match=r"set SPARK_HOME .* or install pyspark"):
        spark_home({}, find=nothing)
    # Found as packages beside the launcher: toree's jar in its lib/, pyspark's own Spark.
    package = tmp_path / "toree"
    (package / "lib").mkdir(parents=True)
    (package / "lib" / "toree-assembly-0.5.0-incubating.jar").write_bytes(b"")

    def found(name: str):  # type: ignore[no-untyped-def]
        import importlib.machinery

        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(tmp_path / name)]
        return spec

    assert toree_assembly({}, find=found) == package / "lib" / "toree-assembly-0.5.0-incubating.jar"
    assert spark_home({}, find=found) == tmp_path / "pyspark"


def test_an_attached_launcher_supervises_the_parent_that_runs_the_kernel(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """As ToreeDriver does on YARN (Toree in the driver's JVM): a parent starts the launcher with
    --kernel-pid <itself>, reads the connection file's path from it, and runs the kernel
    in-process on it; the launcher reports, and ends when its parent does."""
    import os
    import socket
    import subprocess
    import sys
    import textwrap
    import threading
    import time

    operator = socket.socket()
    operator.bind(("127.0.0.1", 0))
    operator.listen()
    reports: list[bytes] = []

    def serve() -> None:
        conn, _ = operator.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            reports.append(data)
            conn.sendall(b"OK\n")

    threading.Thread(target=serve, daemon=True).start()
    private = protocol.new_private_key()
    launcher_args = [
        "--kernel-id",
        "6c9c8d0e-1111-2222-3333-444455556666",
        "--response-address",
        f"127.0.0.1:{operator.getsockname()[1]}",
        f"--public-key={protocol.encode_key(protocol.public_key_of(private))}",
        "--ip",
        "127.0.0.1",
        "--run-dir",
        str(tmp_path / "run"),
        "--token",
        "t",
    ]
    parent = textwrap.dedent(
        f"""
        import os, subprocess, sys
        launcher = subprocess.Popen(
            [sys.executable, "-m", "kernel_launchers.python_launcher", *{launcher_args!r},
             "--kernel-pid", str(os.getpid())],
            stdout=subprocess.PIPE, text=True)
        line = launcher.stdout.readline()
        assert line.startswith("RKO-CONNECTION-FILE "), line
        print("launcher pid", launcher.pid, flush=True)
        from ipykernel.kernelapp import launch_new_instance
        launch_new_instance(["-f", line.split(" ", 1)[1].strip()])
        """
    )
    jvm = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        assert jvm.stdout is not None
        launcher_pid = int(jvm.stdout.readline().split()[-1])
        deadline = time.monotonic() + 30
        while not reports and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reports, "the attached launcher never reported"
        payload = protocol.open_launch_payload(reports[0][4:], private)
        assert payload["kernel_pid"] == jvm.pid and payload["pid"] == launcher_pid
    finally:
        jvm.kill()  # the kernel's process ends: the launcher sees it and ends too
        jvm.wait()
        operator.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and os.path.exists(f"/proc/{launcher_pid}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{launcher_pid}")


def test_a_kernel_can_take_sigint_though_the_launcher_was_started_with_it_ignored() -> None:
    """ssh's background start leaves SIGINT ignored, and exec keeps it ignored: Toree's JVM then
    cannot be interrupted (found over ssh: the interrupt never arrived)."""
    import signal
    import subprocess
    import sys

    from kernel_launchers.python_launcher import let_kernels_take_sigint

    probe = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"]
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background start leaves it
    try:
        assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "True"
        let_kernels_take_sigint()
        assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "False"
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_refused_launcher_keeps_a_run_directory_another_process_uses(tmp_path: Path) -> None:
    import subprocess
    import time

    from kernel_launchers.python_launcher import remove_unused_run_dir

    shared = tmp_path / "rko-k-uid"
    shared.mkdir()
    (shared / "launcher.log").write_text("the launcher of record's")
    user = subprocess.Popen(["sh", "-c", "sleep 30", str(shared)])  # names it, as the launcher of record does
    try:
        while str(shared).encode() not in Path(f"/proc/{user.pid}/cmdline").read_bytes():
            time.sleep(0.01)  # exec'd
        assert not remove_unused_run_dir(shared, own={os.getpid()})
        assert (shared / "launcher.log").exists()
    finally:
        user.kill()
        user.wait()
    assert remove_unused_run_dir(shared, own={os.getpid()}) and not shared.exists()


def test_a_python_kernel_says_when_it_listens_and_still_shows_as_ipykernel(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The launcher sleeps on the kernel's ready pipe, not in a polling loop; when it wakes, all
    five ports are bound. Process listings (and clean-up scripts) still see ipykernel_launcher,
    and never kernel_launchers (found by CI: a test took the kernel for a second launcher)."""
    import json

    from kernel_launchers.ports import free_ports, listening_ports
    from kernel_launchers.python_launcher import PORT_NAMES, Launcher

    launcher = Launcher(parse_args([*BASE, "--run-dir", str(tmp_path)], {"RKO_LAUNCH_TOKEN": "t"}))
    info = build_connection_file("127.0.0.1", free_ports("127.0.0.1", 5, (0, 0)), "k", None)
    connection_file = tmp_path / "kernel.json"
    connection_file.write_text(json.dumps(info))
    kernel = launcher.spawn(connection_file, dict(os.environ))
    launcher.kernel = kernel
    try:
        assert launcher.ready_fd is not None
        assert "ipykernel_launcher" in " ".join(kernel.args)  # type: ignore[arg-type]
        # ... and never the launcher's package: launchers are told from kernels by that.
        assert "kernel_launchers" not in " ".join(kernel.args)  # type: ignore[arg-type]
        launcher.wait_kernel_listening(info, timeout=30)
        assert launcher.ready_fd is None  # the pipe was used and closed
        assert {info[name] for name in PORT_NAMES} <= (listening_ports(kernel.pid) or set())
    finally:
        kernel.kill()
        kernel.wait()


def test_a_python_kernel_that_fails_to_start_ends_the_wait_at_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A kernel that cannot start closes its ready pipe by exiting: the launcher says so at once
    instead of waiting out the listen timeout."""
    import time

    from kernel_launchers.python_launcher import Launcher

    launcher = Launcher(parse_args([*BASE, "--run-dir", str(tmp_path)], {"RKO_LAUNCH_TOKEN": "t"}))
    connection_file = tmp_path / "kernel.json"
    connection_file.write_text("{not json")
    launcher.kernel = launcher.spawn(connection_file, dict(os.environ))
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code"):
        launcher.wait_kernel_listening(
            build_connection_file("127.0.0.1", [1, 2, 3, 4, 5], "k", None), timeout=60
        )
    assert time.monotonic() - began < 15
