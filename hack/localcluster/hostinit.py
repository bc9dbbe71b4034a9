"""PID 1 of one ssh test host: private mounts, sshd, and reaping.

Runs inside the host's own network, PID and mount namespaces (``ip netns exec … unshare``).
Standard library only. Gives the host what a separate machine has and the others must not
see: its own /tmp and /home, its own accounts (/etc/passwd and /etc/group), and the shared
Python environment at a path every account can reach. As PID 1 it reaps orphans (detached
launchers end up here); when it exits the kernel kills everything left in the namespace,
which is what a powered-off machine does.

Signals: TERM stops the host; USR1 stops sshd (the host then refuses ssh); USR2 starts it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def prepare(config: dict[str, object]) -> None:
    mount("--make-rprivate", "/")
    # Bind what the host needs first: its folder may sit in the machine's /tmp, hidden next.
    host_dir = str(config["host_dir_mount"])
    mount("--bind", str(config["host_dir"]), host_dir)
    mount("--bind", "-o", "ro", str(config["python_env"]), str(config["python_mount"]))
    mount("--bind", f"{host_dir}/passwd", "/etc/passwd")
    mount("--bind", f"{host_dir}/group", "/etc/group")
    mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/tmp")
    mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/home")
    homes = config["homes"]
    assert isinstance(homes, dict)
    for user, ids in homes.items():
        home = Path("/home") / user
        home.mkdir(mode=0o755)
        os.chown(home, int(ids[0]), int(ids[1]))


class Init:
    def __init__(self, sshd_command: list[str], log_path: str) -> None:
        self.sshd_command = sshd_command
        self.log_path = log_path
        self.sshd: subprocess.Popen[bytes] | None = None

    def start_sshd(self, *_: object) -> None:
        if self.sshd is None or self.sshd.poll() is not None:
            with open(self.log_path, "ab") as log:
                self.sshd = subprocess.Popen(self.sshd_command, stdout=log, stderr=log)

    def stop_sshd(self, *_: object) -> None:
        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.terminate()

    def exit(self, signum: int, frame: FrameType | None) -> None:
        self.stop_sshd()
        sys.exit(0)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.exit)
        signal.signal(signal.SIGUSR1, self.stop_sshd)
        signal.signal(signal.SIGUSR2, self.start_sshd)
        self.start_sshd()
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.2)  # nothing to reap until sshd is started again
                continue
            if self.sshd is not None and pid == self.sshd.pid:
                self.sshd.returncode = os.waitstatus_to_exitcode(status)


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    prepare(config)
    Init([str(part) for part in config["sshd_command"]], str(config["sshd_log"])).run()


if __name__ == "__main__":
    main()
