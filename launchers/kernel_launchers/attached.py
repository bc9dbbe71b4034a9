"""A kernel the launcher did not start: its parent, a JVM that runs the kernel in-process.

Apache Toree on YARN runs inside the Spark driver (the cluster-mode ApplicationMaster's JVM), as
the seed's Scala launcher had it: the JVM starts the launcher, reads the connection file's path
from it, and runs Toree on that file. The launcher still picks the ports, reports, serves the
control port and supervises; this class gives it the same handle a started kernel has
(``subprocess.Popen``'s pid, poll, wait, send_signal, terminate, kill), on a process it cannot
wait for (the kernel is its parent): the kernel is gone once the launcher is re-parented.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

CONNECTION_LINE = "RKO-CONNECTION-FILE"  # the line on stdout the JVM waits for


class AttachedKernel:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and (os.getppid() != self.pid or not os.path.exists(f"/proc/{self.pid}")):
            self.returncode = 0  # its exit status is its own parent's to read, not ours
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            time.sleep(0.1)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
