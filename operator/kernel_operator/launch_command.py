"""Pure builders of the launcher's command line and of the ssh backend's shell commands."""

from __future__ import annotations

import shlex
from collections.abc import Mapping

from kernel_launchers.protocol import encode_key

from .spec import KernelRequest

LAUNCHER_MODULE = "kernel_launchers.python_launcher"


def launcher_args(
    request: KernelRequest, response_address: str, public_key: bytes, ip: str, run_dir: str
) -> list[str]:
    """The launcher's arguments (gateway_provisioners' names, plus ours). No token: it travels apart."""
    args = [
        "--kernel-id",
        request.kernel_id,
        "--response-address",
        response_address,
        "--public-key",
        encode_key(public_key),
        "--port-range",
        request.port_range_text,
        "--transport-encryption",
        request.transport_encryption,
        "--ip",
        ip,
        "--run-dir",
        run_dir,
        "--response-retry-seconds",
        str(int(request.launch_timeout) + 5),
    ]
    if request.class_name:
        args += ["--kernel-class-name", request.class_name]
    return args


def run_dir_for(kernel_id: str) -> str:
    return f"/tmp/rko-{kernel_id}"


def remote_start_command(
    python: str, args: list[str], env: Mapping[str, str], run_dir: str, working_dir: str | None
) -> str:
    """A POSIX shell command that starts the launcher detached and prints its pid.

    The token arrives on the command's stdin and is written to a 0600 file the launcher
    deletes after reading, so it never shows on a command line.
    """
    q = shlex.quote
    exports = " ".join(f"{name}={q(value)}" for name, value in sorted(env.items()))
    token_file = f"{run_dir}/token"
    launcher = " ".join([q(python), "-m", LAUNCHER_MODULE, *map(q, args), "--token-file", q(token_file)])
    cd = f"cd {q(working_dir)} && " if working_dir else ""
    # Only the launcher is put in the background: an asynchronous list's stdin is /dev/null,
    # and the token must be read from ours first.
    return (
        f"umask 077 && mkdir -p {q(run_dir)} && cat > {q(token_file)} && {cd}"
        f"{{ env {exports} setsid {launcher} > {q(run_dir + '/launcher.log')} 2>&1 < /dev/null & "
        "echo $!; }"
    )


def remote_status_command(pid: int, run_dir: str) -> str:
    """Prints the launcher's exit_status JSON, 'running', or 'gone'.

    exit_status first: the launcher writes it as the kernel ends, just before it exits itself.
    """
    q = shlex.quote
    status_file = q(run_dir + "/exit_status")
    return (
        f"if [ -f {status_file} ]; then cat {status_file}; "
        f"elif kill -0 {pid} 2>/dev/null; then echo running; "
        "else echo gone; fi"
    )


def remote_stop_command(pgid: int, run_dir: str, grace: float = 3.0) -> str:
    """Terminate the launcher's process group, kill it after ``grace`` seconds, remove its files."""
    q = shlex.quote
    steps = int(grace / 0.1)
    # Zombies (awaiting a reaper that may be slow) do not count as running.
    alive = f"ps -e -o pgid=,stat= | awk '$1 == {pgid} && $2 !~ /^Z/ {{ found = 1 }} END {{ exit !found }}'"
    return (
        f"kill -TERM -{pgid} 2>/dev/null; "
        f"i=0; while {alive} && [ $i -lt {steps} ]; do sleep 0.1; i=$((i+1)); done; "
        f"kill -KILL -{pgid} 2>/dev/null; rm -rf {q(run_dir)}; true"
    )
