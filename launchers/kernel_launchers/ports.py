"""Port ranges as gateway_provisioners defines them, and free ports within them."""

from __future__ import annotations

import os
import random
import socket

MIN_RANGE_SIZE = 1000  # the seed refuses narrower ranges: five ports per kernel, many kernels


class PortRangeError(ValueError):
    """A port range is malformed or too narrow."""


def parse_port_range(text: str) -> tuple[int, int]:
    """``"lower..upper"`` as a pair; ``(0, 0)`` (or lower == upper) means any port.

    Follows the seed: bounds separated by ``..``, a zero-width range disables enforcement,
    otherwise the range must hold at least 1000 ports and stay within 1024..65535.
    """
    parts = text.strip().split("..")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise PortRangeError(
            f"Port range {text!r} is not of the form 'lower..upper' (e.g. '40000..41000'); "
            "use '0..0' to allow any port."
        )
    lower, upper = int(parts[0]), int(parts[1])
    if lower == upper:
        return (0, 0)
    if lower > upper:
        raise PortRangeError(f"Port range {text!r} has its lower bound above its upper bound.")
    if lower < 1024 or upper > 65535:
        raise PortRangeError(f"Port range {text!r} must lie within 1024..65535.")
    if upper - lower < MIN_RANGE_SIZE:
        raise PortRangeError(
            f"Port range {text!r} holds {upper - lower} ports; it must hold at least {MIN_RANGE_SIZE}."
        )
    return (lower, upper)


def bind_free_port(sock: socket.socket, ip: str, port_range: tuple[int, int], tries: int = 200) -> int:
    """Bind ``sock`` to a free port on ``ip`` within the range (any port for ``(0, 0)``)."""
    lower, upper = port_range
    if (lower, upper) == (0, 0):
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])
    for _ in range(tries):
        port = random.randint(lower, upper)
        try:
            sock.bind((ip, port))
        except OSError:
            continue
        return port
    raise OSError(f"No free port found in {lower}..{upper} on {ip} after {tries} tries.")


def free_ports(ip: str, count: int, port_range: tuple[int, int]) -> list[int]:
    """``count`` distinct ports that are free right now (the kernel binds them just after)."""
    sockets: list[socket.socket] = []
    try:
        ports = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            ports.append(bind_free_port(sock, ip, port_range))
        return ports
    finally:
        for sock in sockets:
            sock.close()


def listening_ports(pid: int) -> set[int] | None:
    """The TCP ports process ``pid`` listens on (its own sockets, from /proc); None where /proc
    does not tell (not Linux, or not our process)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return None
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def held(ports: set[int]) -> set[int]:
    """Those of ``ports`` some socket of this network namespace holds now (any state but
    TIME_WAIT), read from /proc without binding anything: a probe bind could itself take a
    port from a kernel still starting. Empty where /proc does not tell."""
    found: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/self/net/{table}") as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] != "06":  # 06: TIME_WAIT
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if port in ports:
                    found.add(port)
    return found


def in_use(ip: str, ports: list[int]) -> list[int]:
    """Those of ``ports`` another socket holds on ``ip`` right now."""
    taken = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((ip, port))
            except OSError:
                taken.append(port)
    return taken
