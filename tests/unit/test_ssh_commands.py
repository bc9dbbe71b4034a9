"""The ssh backend's shell commands, run for real by /bin/sh against real processes, and its
pure helpers (host keys, keys from a Secret, host choice, the error when no host is left)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest

from kernel_operator.backends.ssh import _no_host_left, host_keys_from_text, private_key_from_text
from kernel_operator.balancer import HostBalancer
from kernel_operator.errors import BackendError, BackendUnavailable
from kernel_operator.handlers import class_selector
from kernel_operator.launch_command import (
    EXIT_NO_ACCOUNT,
    EXIT_UID_ZERO,
    LAUNCHER_MODULE,
    as_user,
    launch_file,
    remote_find_command,
    remote_signal_command,
    remote_start_command,
    remote_status_batch_command,
    remote_status_command,
    remote_stop_command,
    run_dir_for,
    run_dir_is_for,
    split_status_batch,
)


def sh(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=20)


def sleeper(run_dir: Path) -> subprocess.Popen[bytes]:
    """A process whose command line names ``run_dir``, as a launcher's and a kernel's do."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(run_dir)])


def test_status_reports_running_orphaned_exited_and_gone(tmp_path: Path) -> None:
    run_dir = tmp_path / "rko-k1"
    run_dir.mkdir()
    launcher, kernel = sleeper(run_dir), sleeper(run_dir)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert sh(remote_status_command(launcher.pid, kernel.pid, str(run_dir))).stdout.strip() == "running"
        launcher.kill()
        launcher.wait()
        # The launcher is gone, its kernel is not: still a live kernel.
        assert sh(remote_status_command(launcher.pid, kernel.pid, str(run_dir))).stdout.strip() == "orphaned"
        # A live pid that is not this kernel's (a recycled pid) does not count.
        assert sh(remote_status_command(stranger.pid, 0, str(run_dir))).stdout.strip() == "gone"
        (run_dir / "exit_status").write_text('{"code": 3, "message": ""}')
        assert (
            sh(remote_status_command(launcher.pid, kernel.pid, str(run_dir))).stdout
            == '{"code": 3, "message": ""}'
        )
    finally:
        for proc in (launcher, kernel, stranger):
            proc.kill()
            proc.wait()


def test_the_signal_command_reaches_only_this_kernels_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "rko-k2"
    kernel = sleeper(run_dir)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert sh(remote_signal_command(kernel.pid, signal.SIGTERM, str(run_dir))).returncode == 0
        assert kernel.wait(10) == -signal.SIGTERM
        refused = sh(remote_signal_command(stranger.pid, signal.SIGTERM, str(run_dir)))
        assert refused.returncode == 1 and "gone" in refused.stderr
        assert stranger.poll() is None
    finally:
        for proc in (kernel, stranger):
            proc.kill()
            proc.wait()


def test_the_user_switch_refuses_unknown_accounts_and_uid_zero() -> None:
    missing = sh(as_user("no-such-account-rko", "echo hi"))
    assert missing.returncode == EXIT_NO_ACCOUNT and "no account no-such-account-rko" in missing.stderr
    root = sh(as_user("root", "echo hi"))
    assert root.returncode == EXIT_UID_ZERO and "uid 0" in root.stderr
    assert sh(as_user(None, "echo hi")).stdout == "hi\n"


@pytest.mark.skipif(os.getuid() != 0, reason="switching users needs root (runuser)")
def test_the_user_switch_runs_the_script_as_that_account() -> None:
    result = sh(as_user("nobody", "id -un"))
    assert result.returncode == 0 and result.stdout.strip() == "nobody"


def test_an_impersonated_start_logs_in_as_the_user_and_quotes_everything() -> None:
    command = remote_start_command("python3", ["--x", "a b"], "/tmp/rko-k", None, "alice", launch_bytes=1)
    assert "runuser -u alice" in command and "sudo -n -H -u alice" in command
    assert 'cd "$HOME"' in command  # the user's home, not the ssh login's directory
    plain = remote_start_command("python3", [], "/tmp/rko-k", "/work", None, launch_bytes=1)
    assert "runuser" not in plain and "cd /work" in plain


def test_the_token_and_the_env_reach_the_launcher_through_a_private_file_not_the_command_line(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "rko-k"
    secret = launch_file("the-token", {"V": "it's secret"})
    command = remote_start_command(
        "/bin/echo", ["--x"], str(run_dir), None, None, launch_bytes=len(secret.encode())
    )
    assert "the-token" not in command and "secret" not in command
    done = subprocess.run(
        ["/bin/sh", "-c", command], input=secret, capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0 and done.stdout.strip().isdigit()
    wait_for_file = run_dir / "launcher.log"
    for _ in range(50):
        if wait_for_file.exists() and wait_for_file.read_text():
            break
        time.sleep(0.05)
    assert "--launch-file" in wait_for_file.read_text()
    launch = run_dir / "launch.json"
    assert launch.read_text() == secret
    assert launch.stat().st_mode & 0o777 == 0o600 and run_dir.stat().st_mode & 0o777 == 0o700


def test_a_run_directory_planted_before_the_launch_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "rko-k"
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir()
    run_dir.symlink_to(elsewhere)  # a symlink where the run directory will be made
    command = remote_start_command("/bin/echo", [], str(run_dir), None, None, launch_bytes=1)
    done = subprocess.run(["/bin/sh", "-c", command], input="x", capture_output=True, text=True, timeout=20)
    assert done.returncode != 0 and "File exists" in done.stderr
    assert list(elsewhere.iterdir()) == []  # nothing was written through the link


def test_a_stop_kills_only_a_process_group_that_names_the_kernels_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "rko-k"
    run_dir.mkdir()
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    ours = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(run_dir)], start_new_session=True
    )
    try:
        assert sh(remote_stop_command(stranger.pid, str(run_dir), grace=0.2)).returncode == 0
        assert stranger.poll() is None  # a pgid that is not this kernel's is left alone
        assert sh(remote_stop_command(ours.pid, str(run_dir), grace=0.2)).returncode == 0
        assert ours.wait(5) != 0 and not run_dir.exists()
    finally:
        stranger.kill()
        ours.kill()
        stranger.wait()
        ours.wait()


def test_a_run_directory_is_recognised_only_for_its_own_kernel() -> None:
    uid = "0b5ad6a4-9c6e-4f51-8a3e-51d1c6f7f0aa"
    run_dir = run_dir_for("6c9c8d0e-1111-2222-3333-444455556666", uid)
    assert run_dir_is_for(run_dir, uid)
    assert not run_dir_is_for(run_dir, "another-uid")
    assert not run_dir_is_for("/home/alice", uid) and not run_dir_is_for(f"/tmp/../etc-{uid}", uid)


def test_known_hosts_text_is_read_with_plain_and_bracketed_names() -> None:
    key = private_key_from_text(_ed25519_private())  # any valid key
    line = f"{key.get_name()} {key.get_base64()}"
    keys = host_keys_from_text(f"# comment\n198.18.0.11 {line}\n[h2]:2222 {line}\ngarbage\n\n")
    assert keys.lookup("198.18.0.11") is not None and keys.lookup("[h2]:2222") is not None
    assert keys.lookup("198.18.0.12") is None


def test_a_private_key_from_a_secret_is_loaded_or_refused_clearly() -> None:
    assert isinstance(private_key_from_text(_ed25519_private()), paramiko.PKey)
    with pytest.raises(BackendError, match="not a usable private key") as info:
        private_key_from_text("not a key")
    assert info.value.reason == "SshKeyInvalid"


def _ed25519_private() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        .decode()
    )


def test_the_error_when_no_host_is_left_keeps_one_reason_or_says_no_host() -> None:
    same = _no_host_left(
        [BackendUnavailable("a: x", "UnknownUser"), BackendUnavailable("b: y", "UnknownUser")]
    )
    assert same.reason == "UnknownUser" and "a: x; b: y" in str(same)
    mixed = _no_host_left(
        [BackendUnavailable("a", "HostUnreachable"), BackendUnavailable("b", "UnknownHostKey")]
    )
    assert mixed.reason == "NoHostAvailable"


def test_a_host_that_failed_is_tried_last_until_it_cools_down() -> None:
    b = HostBalancer()
    hosts = ["a", "b", "c"]
    b.cool_down("a", until=100.0)
    picks = {b.pick(hosts, "round-robin", now=50.0) for _ in range(6)}
    assert picks == {"b", "c"}
    # Still tried when nothing else is left; picked again once cooled down or recovered.
    assert b.pick(hosts, "round-robin", frozenset({"b", "c"}), now=50.0) == "a"
    assert "a" in {b.pick(hosts, "round-robin", now=101.0) for _ in range(3)}
    b.cool_down("a", until=1e9)
    b.recovered("a")
    assert "a" in {b.pick(hosts, "least-connection", now=0.0) for _ in range(3)}


def test_an_operator_class_selects_its_kernels_only() -> None:
    assert class_selector("") == "!kernel-operator.io/operator-class"
    assert class_selector("hosts") == "kernel-operator.io/operator-class=hosts"


def test_a_dead_launchers_log_ends_up_in_the_failure_message(tmp_path: Path) -> None:
    from kernel_operator.backends.ssh import _exit_status

    run_dir = tmp_path / "rko-k3"
    run_dir.mkdir()
    (run_dir / "launcher.log").write_text("x" * 5000 + "\nerror: --kernel-id is required\n")
    out = sh(remote_status_command(2**22 + 7, 0, str(run_dir))).stdout
    assert out.startswith("gone\n") and out.endswith("error: --kernel-id is required\n")
    assert len(out) < 1600  # only the end of a long log
    status = _exit_status(out, {"host": "h1", "pid": 12})
    assert status.state == "gone" and status.reason == "ProcessGone"
    assert status.message.endswith("Its log ends: " + out[5:].strip())
    assert _exit_status("gone\n", {"host": "h1", "pid": 12}).message == "The launcher on h1 (pid 12) is gone."


async def test_a_signal_reaches_only_a_process_of_the_kernels_own_run_directory(tmp_path: Path) -> None:
    """The ssh backend's own signal path (the launcher gone): a status naming another kernel's
    pid and run directory gets nothing signalled."""
    import asyncio
    import signal as signals

    from kernel_operator.backends.ssh import SshBackend
    from kernel_operator.settings import SshSettings

    owner, other = "0b5ad6a4-9c6e-4f51-8a3e-51d1c6f7f0aa", "9f0c2a11-1111-4c4c-8d8d-222233334444"
    kernel_id = "6c9c8d0e-1111-2222-3333-444455556666"
    victim_dir = Path(run_dir_for(kernel_id, other))
    victim_dir.mkdir()
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(victim_dir)])
    backend = SshBackend(SshSettings(local_hosts=("localhost",)))
    try:
        forged = {"host": "localhost", "local": True, "pid": victim.pid, "runDir": str(victim_dir)}
        with pytest.raises(BackendError, match="not this kernel's"):
            await backend.signal(forged, signals.SIGTERM, owner)
        await asyncio.sleep(0.2)
        assert victim.poll() is None  # untouched
        await backend.signal(forged, signals.SIGTERM, other)  # its own kernel's: delivered
        assert victim.wait(5) != 0
    finally:
        victim.kill()
        victim.wait()
        victim_dir.rmdir()


def test_one_batched_status_command_answers_as_one_command_per_kernel_would(tmp_path: Path) -> None:
    """Every kernel of a host used to cost one ssh command a second; one command answers all
    (with one ps for all of them). A process naming a longer run directory that begins like
    this kernel's is not this kernel's."""
    dirs = [tmp_path / f"rko-k{i}" for i in range(5)]
    for d in dirs:
        d.mkdir()
    running, orphan_kernel = sleeper(dirs[0]), sleeper(dirs[1])
    lookalike = sleeper(Path(f"{dirs[4]}-other"))
    (dirs[2] / "exit_status").write_text('{"code": 0, "message": ""}')
    (dirs[3] / "launcher.log").write_text("Traceback: no module named ipykernel")  # no newline at the end
    items = [(running.pid, 0, str(dirs[0])), (2**22 + 5, orphan_kernel.pid, str(dirs[1]))]
    items += [(2**22 + 6, 0, str(dirs[2])), (2**22 + 7, 0, str(dirs[3])), (lookalike.pid, 0, str(dirs[4]))]
    try:
        batched = split_status_batch(sh(remote_status_batch_command(items)).stdout, len(items))
        single = [sh(remote_status_command(*item)).stdout.strip() for item in items]
        assert batched == single
        assert batched[:3] == ["running", "orphaned", '{"code": 0, "message": ""}']
        assert batched[3].startswith("gone") and "no module named ipykernel" in batched[3]
        assert batched[4] == "gone"
    finally:
        for proc in (running, orphan_kernel, lookalike):
            proc.kill()
            proc.wait()


async def test_a_relaunch_clears_what_an_earlier_attempt_of_the_same_launch_left(tmp_path: Path) -> None:
    """The launch started, then its status write failed (the API server went down): the retry
    finds the run directory. Ours (our user, private) is cleared, its launcher stopped; a
    directory anyone else could have made is left, so the launch fails with a clear reason."""
    import asyncio
    import subprocess
    import sys

    from kernel_operator.backends.ssh import _clear_earlier_attempt

    run_dir = tmp_path / "rko-run"
    run_dir.mkdir(mode=0o700)
    earlier = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(run_dir)], start_new_session=True
    )
    try:
        await _clear_earlier_attempt(run_dir)
        assert not run_dir.exists()
        assert await asyncio.to_thread(earlier.wait, 10) is not None
    finally:
        if earlier.poll() is None:
            earlier.kill()
    foreign = tmp_path / "rko-foreign"
    foreign.mkdir(mode=0o755)
    foreign.chmod(0o755)
    await _clear_earlier_attempt(foreign)
    assert foreign.exists()


def test_a_relaunch_stops_an_earlier_attempt_and_makes_the_run_directory_again(tmp_path: Path) -> None:
    """The remote twin of the local relaunch: the first attempt started, its status write
    failed, and the same launch runs again on the same host."""
    run_dir = tmp_path / "rko-k"
    run_dir.mkdir(mode=0o700)
    (run_dir / "launch.json").write_text("old")
    earlier = subprocess.Popen(["sh", "-c", "sleep 60", str(run_dir)], start_new_session=True)
    stranger = subprocess.Popen(["sh", "-c", "sleep 60", str(tmp_path / "rko-other")], start_new_session=True)
    try:
        command = remote_start_command("/bin/echo", [], str(run_dir), None, None, launch_bytes=3)
        done = subprocess.run(
            ["/bin/sh", "-c", command], input="new", capture_output=True, text=True, timeout=20
        )
        assert done.returncode == 0, done.stderr
        assert earlier.wait(10) == -9  # killed with its group
        assert stranger.poll() is None  # another kernel's process is not touched
        assert (run_dir / "launch.json").read_text() == "new"
    finally:
        for proc in (earlier, stranger):
            proc.kill()
            proc.wait()


def test_a_run_directory_that_is_not_private_is_not_cleared(tmp_path: Path) -> None:
    run_dir = tmp_path / "rko-k"
    run_dir.mkdir(mode=0o755)
    run_dir.chmod(0o755)
    (run_dir / "keep").write_text("x")
    command = remote_start_command("/bin/echo", [], str(run_dir), None, None, launch_bytes=1)
    done = subprocess.run(["/bin/sh", "-c", command], input="x", capture_output=True, text=True, timeout=20)
    assert done.returncode != 0 and "File exists" in done.stderr
    assert (run_dir / "keep").exists()


def test_finding_a_launch_never_takes_the_finding_shell_for_its_launcher(tmp_path: Path) -> None:
    """The find command's own shell holds the run directory and the launcher's module name in
    its script text; it once answered with its own pid (or a parent's), and a stop then aimed
    at that process group while the real launcher ran on. Only whole arguments count."""
    run_dir = tmp_path / "rko-k-u"
    run_dir.mkdir()
    (run_dir / "launcher.log").write_text("")  # a launcher started here once
    assert sh(remote_find_command(str(run_dir))).stdout.split() == ["0", "0"]  # nothing runs
    kernel = sleeper(run_dir / "kernel.json")  # a kernel, named by a path in the run directory
    launcher = subprocess.Popen(
        ["sh", "-c", "sleep 60; true", "x", "-m", LAUNCHER_MODULE, f"--run-dir={run_dir}"],
        start_new_session=True,
    )
    stranger = subprocess.Popen(["sh", "-c", "sleep 60; true", "x", f"{run_dir}-other", LAUNCHER_MODULE])
    try:
        time.sleep(0.3)
        for _ in range(20):  # whatever the /proc order of the shell and the launcher
            assert sh(remote_find_command(str(run_dir))).stdout.split() == [str(launcher.pid)] * 2
        launcher.kill()
        launcher.wait()
        assert sh(remote_find_command(str(run_dir))).stdout.split()[0] == str(kernel.pid)
    finally:
        for proc in (kernel, launcher, stranger):
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sent", ["", '{"token": "t'])
def test_a_launch_file_cut_off_starts_no_launcher_and_leaves_no_run_directory(
    tmp_path: Path, sent: str
) -> None:
    """Seen in CI: an operator replica killed while it sent the launch file over ssh; the
    remote shell's ``cat`` ended at the cut, the launcher started on an empty file, failed,
    and the next replica found its run directory and failed the kernel instead of launching it
    again. A short file now starts nothing, and the directory goes (nothing for find)."""
    run_dir = tmp_path / "rko-k"
    whole = launch_file("the-token", {"V": "x"})
    command = remote_start_command(
        "/bin/echo", [], str(run_dir), None, None, launch_bytes=len(whole.encode())
    )
    done = subprocess.run(["/bin/sh", "-c", command], input=sent, capture_output=True, text=True, timeout=20)
    assert done.returncode == 3 and done.stdout == ""  # no pid: nothing was started
    assert "arrived incomplete" in done.stderr
    assert not run_dir.exists()
    assert sh(remote_find_command(str(run_dir))).stdout == ""


def test_a_run_directory_no_launcher_ever_started_in_is_not_found(tmp_path: Path) -> None:
    """A launch cut off after its directory was made but before its launcher started (its
    shell killed): find answers nothing, so the next operator launches again (and clears it)."""
    run_dir = tmp_path / "rko-k"
    run_dir.mkdir(mode=0o700)
    (run_dir / "launch.json").write_text("{")
    assert sh(remote_find_command(str(run_dir))).stdout == ""


async def test_a_local_run_directory_no_launcher_ever_started_in_is_not_found() -> None:
    """The local twin: the operator made the directory and wrote the launch file, then stopped
    before it started the launcher. Found, the kernel would fail ("the launcher is gone");
    not found, the next operator launches it again, clearing the directory first."""
    import shutil

    from kernel_operator.backends.ssh import SshBackend
    from kernel_operator.settings import SshSettings
    from tests.unit.requests import request_from

    uid = "7d2f8a10-1111-4c4c-8d8d-222233334444"
    req = request_from(
        {
            "kernelId": "6c9c8d0e-aaaa-2222-3333-444455556666",
            "username": "alice",
            "ssh": {"hosts": ["localhost"]},
        },
        uid=uid,
    )
    run_dir = Path(run_dir_for(req.kernel_id, req.uid))
    run_dir.mkdir(mode=0o700)
    try:
        (run_dir / "launch.json").write_text("{}")
        backend = SshBackend(SshSettings(local_hosts=("localhost",)))
        assert await backend.find(req) is None
        (run_dir / "launcher.log").write_text("usage: ...")  # a launcher started, and is gone
        found = await backend.find(req)
        assert found is not None and found["pid"] == 0 and found["runDir"] == str(run_dir)
    finally:
        shutil.rmtree(run_dir)
