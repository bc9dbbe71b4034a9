"""PID 1 of the test node: private mounts, containerd, the kubelet, and reaping.

Runs inside the node's own network, PID and mount namespaces (``nsenter --net … unshare``).
Standard library only. The mounts give the kubelet and containerd what they expect at fixed
host paths (/var/lib/kubelet, /run/containerd, /var/lib/cni, /run/netns, the log folders)
from the node's own folder, and the kernel settings the kubelet wants to write
(/proc/sys/vm/overcommit_memory, kernel.panic, ...) as plain files holding the values it wants,
so the machine's own settings are never touched. Every mount vanishes with the namespace; when
this process exits the kernel kills everything left in the PID namespace (containerd's shims
and every container), which is what a powered-off machine does.

Signals: TERM stops the node; USR1 stops the kubelet (the node is lost to the control plane:
its containers go on running, as on a partitioned node); USR2 starts it again.
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
    binds = config["binds"]
    assert isinstance(binds, dict)
    for source, target in binds.items():
        mount("--bind", str(source), str(target))
    sysctls = config["sysctls"]
    assert isinstance(sysctls, dict)
    for name, path in sysctls.items():
        mount("--bind", str(path), "/proc/sys/" + str(name).replace(".", "/"))
    # Per network namespace: the node routes between its pods' bridge and the machine.
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")


class Init:
    def __init__(self, config: dict[str, object]) -> None:
        self.containerd_command = [str(c) for c in config["containerd_command"]]  # type: ignore[attr-defined]
        self.kubelet_command = [str(c) for c in config["kubelet_command"]]  # type: ignore[attr-defined]
        self.kubelet_env = {**os.environ, **config["kubelet_env"]}  # type: ignore[dict-item]
        self.log_dir = Path(str(config["log_dir"]))
        self.socket = Path(str(config["containerd_socket"]))
        self.containerd: subprocess.Popen[bytes] | None = None
        self.kubelet: subprocess.Popen[bytes] | None = None

    def _spawn(
        self, name: str, command: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            return subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)

    def start_containerd(self) -> None:
        self.containerd = self._spawn("containerd", self.containerd_command)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.containerd.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"containerd did not start; see {self.log_dir / 'containerd.log'}")
            time.sleep(0.05)

    def start_kubelet(self, *_: object) -> None:
        if self.kubelet is None or self.kubelet.poll() is not None:
            self.kubelet = self._spawn("kubelet", self.kubelet_command, self.kubelet_env)

    def stop_kubelet(self, *_: object) -> None:
        if self.kubelet is not None and self.kubelet.poll() is None:
            self.kubelet.terminate()

    def exit(self, signum: int, frame: FrameType | None) -> None:
        self.stop_kubelet()
        if self.containerd is not None and self.containerd.poll() is None:
            self.containerd.terminate()
        sys.exit(0)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.exit)
        signal.signal(signal.SIGUSR1, self.stop_kubelet)
        signal.signal(signal.SIGUSR2, self.start_kubelet)
        self.start_containerd()
        self.start_kubelet()
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.2)
                continue
            for proc in (self.containerd, self.kubelet):
                if proc is not None and pid == proc.pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    prepare(config)
    Init(config).run()


if __name__ == "__main__":
    main()
