"""Pure builders of the launcher's command line and of the ssh backend's shell commands."""

from __future__ import annotations

import json
import re
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
        # The operator waits for this launch under the RemoteKernel's uid, not the kernel id a
        # spec could share with another's.
        "--launch-id",
        request.uid,
        "--response-address",
        response_address,
        # One argument: a key's URL-safe base64 may begin with "-", which argparse would take
        # for an option ("--public-key: expected one argument", every launch of that operator).
        f"--public-key={encode_key(public_key)}",
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
    if request.language != "python":
        args += ["--kernel-language", request.language]
    return args


def run_dir_for(kernel_id: str, uid: str) -> str:
    """The launcher's run directory: unique per RemoteKernel (its uid), so processes found by it
    are this kernel's and no other's."""
    return f"/tmp/rko-{kernel_id}-{uid}"


# Exit codes of the user switch (as_user), told apart from the launcher's own.
EXIT_NO_ACCOUNT = 91
EXIT_UID_ZERO = 92


def as_user(user: str | None, script: str) -> str:
    """``script`` run by ``/bin/sh`` as ``user`` (impersonation), or unchanged when None.

    Refuses an account with uid 0 whatever its name; an ssh login as root switches with
    runuser, any other login with ``sudo -n`` (which needs a sudoers rule for it).
    """
    if user is None:
        return script
    q = shlex.quote
    u = q(user)
    return (
        f"uid=$(id -u {u} 2>/dev/null) || {{ printf 'no account %s on this host\\n' {u} >&2; exit {EXIT_NO_ACCOUNT}; }}; "
        f"if [ \"$uid\" = 0 ]; then printf 'refusing to run a kernel as %s: uid 0\\n' {u} >&2; exit {EXIT_UID_ZERO}; fi; "
        f'if [ "$(id -u)" = 0 ]; then exec runuser -u {u} -- /bin/sh -c {q(script)}; '
        f"else exec sudo -n -H -u {u} -- /bin/sh -c {q(script)}; fi"
    )


LAUNCH_FILE = "launch.json"
LAUNCHER_LOG = "launcher.log"  # the launcher's output, in its run directory
# Run directories are made by the operator under this pattern and nowhere else; one named in a
# status is used only if it matches it, with the RemoteKernel's uid at its end.
_RUN_DIR = re.compile(
    r"^/tmp/rko-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-([A-Za-z0-9-]+)$"
)


def launch_file(token: str, env: Mapping[str, str]) -> str:
    """What the launcher reads from its 0600 launch file: the token and the kernel's variables,
    so that neither appears on a command line or in a process's visible arguments."""
    return json.dumps({"token": token, "env": dict(env)})


def run_dir_is_for(run_dir: str, owner: str) -> bool:
    """Whether ``run_dir`` is a run directory the operator made for RemoteKernel ``owner``."""
    match = _RUN_DIR.match(run_dir)
    return bool(match and match.group(1) == owner)


def remote_start_command(
    python: str,
    args: list[str],
    run_dir: str,
    working_dir: str | None,
    user: str | None = None,
    *,
    launch_bytes: int,
) -> str:
    """A POSIX shell command that starts the launcher detached and prints its pid.

    The launch file (token and environment, see ``launch_file``) arrives on the command's
    stdin and is written into a run directory made for this launch alone: ``mkdir`` without
    ``-p`` fails on anything already there (a planted directory or symlink), and the file is
    0600. Unless all ``launch_bytes`` of it arrived (an operator stopped while sending it leaves
    a short file, and a launcher started on that fails the kernel), nothing is started and the
    directory is removed, so the next operator finds no launch and launches again. An earlier
    attempt of this same launch (its status write failed, say) is stopped and its directory
    removed first, but only a real directory owned by this account, mode 0700: anything else
    stays, and ``mkdir`` refuses it. With ``user``, everything runs as that account, with its
    own HOME.
    """
    q = shlex.quote
    path = f"{run_dir}/{LAUNCH_FILE}"
    launcher = " ".join([q(python), "-m", LAUNCHER_MODULE, *map(q, args), "--launch-file", q(path)])
    cd = f"cd {q(working_dir)} && " if working_dir else ('cd "$HOME" && ' if user else "")
    login = (
        'me=$(id -un) && export USER="$me" LOGNAME="$me" HOME="$(getent passwd "$me" | cut -d: -f6)" && '
        if user
        else ""
    )
    incomplete = q(
        "The launch file arrived incomplete (the operator stopped while sending it?); nothing was started."
    )
    received = (
        f'{{ cat > {q(path)} && [ "$(wc -c < {q(path)})" -eq {int(launch_bytes)} ] || '
        f"{{ rm -rf -- {q(run_dir)}; echo {incomplete} >&2; exit 3; }}; }}"
    )
    # Only the launcher is put in the background: an asynchronous list's stdin is /dev/null,
    # and the launch file must be read from ours first.
    script = (
        f"{login}{_clear_earlier_attempt(run_dir)}umask 077 && mkdir -m 700 -- {q(run_dir)} && {received} && {cd}"
        f"{{ setsid {launcher} > {q(f'{run_dir}/{LAUNCHER_LOG}')} 2>&1 < /dev/null & "
        "echo $!; }"
    )
    return as_user(user, script)


def _clear_earlier_attempt(run_dir: str) -> str:
    """Shell steps: if ``run_dir`` is an earlier attempt's (a directory, not a link, owned by
    us, 0700), kill the process groups that name it (never this shell's own) and remove it."""
    d = shlex.quote(run_dir)
    return (
        f'if [ ! -L {d} ] && [ -d {d} ] && [ -O {d} ] && [ "$(stat -c %a -- {d})" = 700 ]; then '
        "me=$(ps -o pgid= -p $$ | tr -d ' '); "
        "for x in /proc/[0-9]*; do p=${x#/proc/}; "
        f"if {_is_ours('p', run_dir)}; then g=$(ps -o pgid= -p $p | tr -d ' '); "
        '[ -n "$g" ] && [ "$g" != "$me" ] && kill -KILL -"$g" 2>/dev/null; fi; done; '
        f"rm -rf -- {d}; fi; "
    )


def _is_ours(pid_var: str, run_dir: str) -> str:
    """A shell test: process ``$pid_var`` is alive and one of its arguments names ``run_dir``:
    is it, is a path in it, or ends an option as ``=<run_dir>[/...]``.

    The run dir (unique per kernel) guards against a recycled pid; a zombie's command line is
    empty, so it does not count as alive. Whole arguments, not a substring of the command line:
    the shell running one of these scripts holds the run dir inside its script text, and must
    not take itself (or its parents) for the kernel's launcher. The run dir reaches awk through
    the environment, so awk's own arguments do not name it either.
    """
    return (
        f"[ -r /proc/${pid_var}/cmdline ] && tr '\\0' '\\n' < /proc/${pid_var}/cmdline "
        f"| RKO_RUN_DIR={shlex.quote(run_dir)} awk {shlex.quote(_NAMES_RUN_DIR)}"
    )


# Reads one argument per line; exits 0 if one names $RKO_RUN_DIR (see _is_ours).
_NAMES_RUN_DIR = (
    'BEGIN { d = ENVIRON["RKO_RUN_DIR"]; n = length(d) } '
    '$0 == d || index($0, d "/") == 1 || index($0, "=" d "/") > 0 '
    '|| (length($0) > n && substr($0, length($0) - n) == "=" d) { f = 1 } '
    "END { exit !f }"
)


def _status_script(pid: int, kernel_pid: int, run_dir: str) -> str:
    status_file = shlex.quote(run_dir + "/exit_status")
    return (
        f"p={int(pid)}; k={int(kernel_pid)}; "
        f"if [ -f {status_file} ]; then cat {status_file}; "
        f"elif {_is_ours('p', run_dir)}; then echo running; "
        f"elif [ $k -gt 0 ] && {_is_ours('k', run_dir)}; then echo orphaned; "
        f"else echo gone; tail -c 1500 {shlex.quote(f'{run_dir}/{LAUNCHER_LOG}')} 2>/dev/null; fi"
    )


def remote_status_command(pid: int, kernel_pid: int, run_dir: str, user: str | None = None) -> str:
    """Prints the launcher's exit_status JSON, 'running', 'orphaned' (the launcher is gone but
    its kernel runs) or 'gone' followed by the end of the launcher's log.

    exit_status first: the launcher writes it as the kernel ends, just before it exits itself.
    """
    return as_user(user, _status_script(pid, kernel_pid, run_dir))


STATUS_MARK = "@@rko-status"


def remote_status_batch_command(items: list[tuple[int, int, str]], user: str | None = None) -> str:
    """``remote_status_command`` for several kernels of one host and user, in one command:
    each answer follows a line ``@@rko-status <index>`` (see ``split_status_batch``).

    One ``ps`` and one ``awk`` answer for every process at once: a host with hundreds of
    kernels is asked about all of them every monitor interval, and two processes forked per
    kernel (as the single command does) cost its CPU more than the kernels' own start-ups in a
    burst. Only a kernel that has ended costs a ``cat`` or ``tail``. The snapshot is taken
    before the exit files are read: a launcher writes its exit_status, then exits.
    """
    listed = "\n".join(
        f"{i} {int(pid)} {int(kpid)} {run_dir}" for i, (pid, kpid, run_dir) in enumerate(items)
    )
    script = (
        f"RKO_ITEMS={shlex.quote(listed)}; export RKO_ITEMS; "
        f"ps -ww -e -o pid=,args= | awk {shlex.quote(_LIVE_IN_PS)} | "
        "while read -r i state d; do "
        f"printf '\\n{STATUS_MARK} %s\\n' \"$i\"; "
        'if [ -f "$d/exit_status" ]; then cat "$d/exit_status"; '
        'elif [ "$state" != gone ]; then echo "$state"; '
        f'else echo gone; tail -c 1500 "$d/{LAUNCHER_LOG}" 2>/dev/null; fi; done'
    )
    return as_user(user, script)


# Reads `ps -o pid=,args=`; for each "<index> <launcher pid> <kernel pid> <run dir>" line of
# $RKO_ITEMS prints "<index> running|orphaned|gone <run dir>": the launcher, else its kernel,
# alive and naming the run dir in a whole argument (see _is_ours).
_LIVE_IN_PS = """
function names(args, d,   s) {
    s = " " args " "
    return index(s, " " d " ") || index(s, " " d "/") || index(s, "=" d " ") || index(s, "=" d "/")
}
BEGIN {
    n = split(ENVIRON["RKO_ITEMS"], lines, "\\n")
    for (j = 1; j <= n; j++) {
        split(lines[j], f, " ")
        index_of[j] = f[1]; launcher[j] = f[2]; kernel[j] = f[3]; dir[j] = f[4]
        wanted[f[2]] = wanted[f[2]] " " j
        if (f[3] > 0) wanted[f[3]] = wanted[f[3]] " " j
    }
}
{
    pid = $1
    if (!(pid in wanted)) next
    args = $0
    sub(/^[ ]*[0-9]+[ ]+/, "", args)
    m = split(wanted[pid], js, " ")
    for (x = 1; x <= m; x++) {
        j = js[x]
        if (!names(args, dir[j])) continue
        if (pid == launcher[j]) up[j] = 1
        else if (pid == kernel[j]) orphan[j] = 1
    }
}
END {
    for (j = 1; j <= n; j++)
        print index_of[j], (up[j] ? "running" : (orphan[j] ? "orphaned" : "gone")), dir[j]
}
"""


def split_status_batch(output: str, count: int) -> list[str]:
    """The ``count`` answers of a batched status command, in order ('gone' for any missing)."""
    answers = ["gone"] * count
    for section in output.split(f"\n{STATUS_MARK} ")[1:]:
        index, _, text = section.partition("\n")
        if index.strip().isdigit() and int(index) < count:
            answers[int(index)] = text.strip()
    return answers


def remote_find_command(run_dir: str, user: str | None = None) -> str:
    """Prints ``<pid> <pgid>`` of the launcher whose command line names ``run_dir`` (else of
    any process naming it, e.g. its kernel; ``0 0`` when none is left but the directory is);
    prints nothing when the run directory is not on the host, or when no launcher ever started
    there (no process and no launcher log: a launch cut off before its launcher started, which
    the next launch of the kernel clears)."""
    script = (
        f"[ -d {shlex.quote(run_dir)} ] || exit 0; found=0; any=0; "
        "for d in /proc/[0-9]*; do p=${d#/proc/}; "
        f"if {_is_ours('p', run_dir)}; then any=$p; "
        f"if tr '\\0' '\\n' < /proc/$p/cmdline | grep -qxF -- {shlex.quote(LAUNCHER_MODULE)}; then "
        "found=$p; break; fi; fi; done; "
        "[ $found = 0 ] && found=$any; "
        f"[ $found = 0 ] && {{ [ -e {shlex.quote(f'{run_dir}/{LAUNCHER_LOG}')} ] && echo 0 0; exit 0; }}; "
        "echo $found $(ps -o pgid= -p $found || echo 0)"
    )
    return as_user(user, script)


def remote_log_tail_command(run_dir: str, user: str | None = None) -> str:
    """Prints the end of the launcher's log in ``run_dir`` (nothing if there is none)."""
    return as_user(user, f"tail -c 600 {shlex.quote(f'{run_dir}/{LAUNCHER_LOG}')} 2>/dev/null; true")


def remote_signal_command(pid: int, signum: int, run_dir: str, user: str | None = None) -> str:
    """Send ``signum`` to one process of this kernel (checked to be ours); fails if it is gone."""
    script = (
        f"p={int(pid)}; if {_is_ours('p', run_dir)}; then kill -{int(signum)} $p; "
        "else echo 'the kernel process is gone' >&2; exit 1; fi"
    )
    return as_user(user, script)


def remote_stop_command(pgid: int, run_dir: str, grace: float = 3.0, user: str | None = None) -> str:
    """Terminate the launcher's process group, kill it after ``grace`` seconds, remove its files.

    The group is signalled only if one of its processes names ``run_dir`` (this kernel's), so a
    wrong pgid cannot take another process group down.
    """
    q = shlex.quote
    if pgid <= 0:  # no process known: only the files are removed
        return as_user(user, f"rm -rf -- {q(run_dir)}; true")
    steps = int(grace / 0.1)
    ours = (
        f"ours=; for p in $(ps -e -o pid=,pgid= | awk '$2 == {int(pgid)} {{ print $1 }}'); do "
        f"if {_is_ours('p', run_dir)}; then ours=1; fi; done; "
    )
    # Zombies (awaiting a reaper that may be slow) do not count as running.
    alive = (
        f"ps -e -o pgid=,stat= | awk '$1 == {int(pgid)} && $2 !~ /^Z/ {{ found = 1 }} END {{ exit !found }}'"
    )
    script = (
        f'{ours}if [ -n "$ours" ]; then kill -TERM -{int(pgid)} 2>/dev/null; '
        f"i=0; while {alive} && [ $i -lt {steps} ]; do sleep 0.1; i=$((i+1)); done; "
        f"kill -KILL -{int(pgid)} 2>/dev/null; fi; rm -rf -- {q(run_dir)}; true"
    )
    return as_user(user, script)
