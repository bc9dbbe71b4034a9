"""Where a machine's CPU goes while something runs: the CPU seconds of every process on this
machine, sampled from /proc and summed by the part it plays (kernel, launcher, operator, API
server, etcd, sshd, node, this bench). What no sample saw (processes that lived between two
samples, the kernel's own work) is "unattributed"."""

from __future__ import annotations

import os
import threading
from pathlib import Path

CLK = os.sysconf("SC_CLK_TCK")

# The local cluster's one binary names its component in its first argument.
KCLUSTER = {
    "etcd": "etcd",
    "apiserver": "API server",
    "controller-manager": "controllers",
    "scheduler": "controllers",
}
# Otherwise the first rule whose word is in a process's command line names its part.
PARTS: tuple[tuple[str, str], ...] = (
    ("ipykernel", "kernels"),
    ("toree", "kernels"),
    ("kernel_launchers", "launchers"),
    ("kernel_operator", "operator"),
    ("sshd", "sshd"),
    ("kubelet", "node (kubelet, containerd)"),
    ("containerd", "node (kubelet, containerd)"),
    ("runc", "node (kubelet, containerd)"),
    ("dockerd", "node (kubelet, containerd)"),
)


def _part(pid: int, own: int) -> str:
    if pid == own:
        return "this bench"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "other"
    if os.path.basename(argv[0]) == "kcluster" and len(argv) > 1:
        return KCLUSTER.get(argv[1], "other")
    cmd = " ".join(argv)
    for word, part in PARTS:
        if word in cmd:
            return part
    return "other"


def _ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which may hold spaces: utime is the 14th, stime the 15th.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def machine_cpu() -> float:
    """CPU seconds the whole machine spent busy so far (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK


class CpuSplit:
    """Samples every process's CPU time from start() to stop(); ``parts()`` sums the growth by part."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._part: dict[int, str] = {}
        self._born: set[int] = set()  # first seen after the start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._machine0 = self._machine1 = 0.0
        self._new_since_start = False

    def _sample(self) -> None:
        own = os.getpid()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            ticks = _ticks(pid)
            if ticks is None:
                continue
            if pid not in self._first:
                # A process born after the start counts from zero; one alive before, from now.
                self._first[pid] = 0 if self._new_since_start else ticks
                if self._new_since_start:
                    self._born.add(pid)
                self._part[pid] = _part(pid, own)
            self._last[pid] = ticks

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> CpuSplit:
        self._machine0 = machine_cpu()
        self._sample()
        self._new_since_start = True
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._machine1 = machine_cpu()

    def started(self) -> dict[str, int]:
        """How many processes of each part started while sampling (a kernel started twice, or a
        launcher retried, shows here as more processes than kernels)."""
        out: dict[str, int] = {}
        for pid in self._born:
            out[self._part[pid]] = out.get(self._part[pid], 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def parts(self) -> dict[str, float]:
        """CPU seconds by part, with "unattributed" for the machine's rest."""
        out: dict[str, float] = {}
        for pid, first in self._first.items():
            grown = (self._last[pid] - first) / CLK
            if grown:
                out[self._part[pid]] = out.get(self._part[pid], 0.0) + grown
        out["unattributed"] = max(0.0, self._machine1 - self._machine0 - sum(out.values()))
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))
