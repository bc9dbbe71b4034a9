"""Pure builders: status patches, host balancing, launcher command lines, port ranges."""

from __future__ import annotations

import shlex
import uuid

import pytest

from kernel_launchers.ports import PortRangeError, free_ports, parse_port_range
from kernel_operator.balancer import HostBalancer, NoHostLeft
from kernel_operator.launch_command import launcher_args, remote_start_command, remote_stop_command
from kernel_operator.settings import OperatorSettings
from kernel_operator.status import Phase, phase_patch, set_condition
from tests.unit.requests import request_from


def test_conditions_keep_their_transition_time_until_status_changes() -> None:
    first = set_condition(None, "Ready", "False", "Launching", "m", "t1")
    assert first == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "Launching",
            "message": "m",
            "lastTransitionTime": "t1",
        }
    ]
    same = set_condition(first, "Ready", "False", "Still", "m2", "t2")
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["reason"] == "Still"
    changed = set_condition(same, "Ready", "True", "KernelReady", "m3", "t3")
    assert changed[0]["lastTransitionTime"] == "t3"
    other = set_condition(changed, "Launched", "True", "r", "m", "t4")
    assert [c["type"] for c in other] == ["Ready", "Launched"]


def test_phase_patch_sets_ready_only_when_running() -> None:
    assert phase_patch({}, Phase.RUNNING, "r", "m", "t")["conditions"][0]["status"] == "True"
    for phase in (Phase.PENDING, Phase.LAUNCHING, Phase.FAILED, Phase.SUCCEEDED, Phase.TERMINATING):
        patch = phase_patch({}, phase, "r", "m", "t")
        assert patch["phase"] == phase.value and patch["conditions"][0]["status"] == "False"


def test_round_robin_cycles_and_skips_excluded_hosts() -> None:
    b = HostBalancer()
    hosts = ["a", "b", "c"]
    assert [b.pick(hosts, "round-robin") for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert b.pick(hosts, "round-robin", frozenset({"a"})) in {"b", "c"}
    with pytest.raises(NoHostLeft):
        b.pick(hosts, "round-robin", frozenset(hosts))


def test_least_connection_picks_the_emptiest_host_and_follows_releases() -> None:
    b = HostBalancer()
    hosts = ["a", "b", "c"]
    placed = []
    for _ in range(9):
        host = b.pick(hosts, "least-connection")
        b.add(host)
        placed.append(host)
    assert sorted(placed.count(h) for h in hosts) == [3, 3, 3]
    b.remove("b")
    b.remove("b")
    assert b.pick(hosts, "least-connection") == "b"
    b.remove("zzz")  # releasing an unknown host is harmless
    assert b.counts["zzz"] == 0


def test_least_connection_counts_rebuilt_by_adoption_steer_new_kernels() -> None:
    b = HostBalancer()
    for host in ["a", "a", "b"]:  # what a restarted operator adopts from statuses
        b.add(host)
    assert b.pick(["a", "b", "c"], "least-connection") == "c"


def _request():  # type: ignore[no-untyped-def]
    spec = {"kernelId": str(uuid.uuid4()), "username": "alice", "backend": "ssh", "env": {"V": "it's"}}
    return request_from(spec, OperatorSettings.from_env({}), name="k", uid="uid")


def test_launcher_args_carry_the_seed_arguments_but_no_token() -> None:
    req = _request()
    args = launcher_args(req, "10.0.0.1:8877", b"k" * 32, "127.0.0.1", "/tmp/run")
    assert args[args.index("--kernel-id") + 1] == req.kernel_id
    assert args[args.index("--launch-id") + 1] == req.uid  # what the operator waits for
    assert args[args.index("--response-address") + 1] == "10.0.0.1:8877"
    assert args[args.index("--port-range") + 1] == "0..0"
    assert "--token" not in args


def test_remote_start_command_quotes_everything_and_reads_the_launch_file_from_stdin() -> None:
    cmd = remote_start_command("/opt/py thon", ["--a", "x y"], "/tmp/r", "/work dir", launch_bytes=42)
    assert "'/opt/py thon'" in cmd and "'x y'" in cmd and "cd '/work dir'" in cmd
    assert "mkdir -m 700 -- /tmp/r" in cmd and "mkdir -p" not in cmd  # a planted directory fails it
    assert "cat > /tmp/r/launch.json" in cmd and "--launch-file /tmp/r/launch.json" in cmd
    assert '[ "$(wc -c < /tmp/r/launch.json)" -eq 42 ]' in cmd  # all of it, or nothing starts
    shlex.split(cmd)  # well-formed for a POSIX shell


def test_remote_stop_command_kills_the_group_and_removes_files() -> None:
    cmd = remote_stop_command(4242, "/tmp/rko-x")
    assert "kill -TERM -4242" in cmd and "kill -KILL -4242" in cmd and "rm -rf -- /tmp/rko-x" in cmd


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0..0", (0, 0)),
        ("5000..5000", (0, 0)),
        ("40000..41000", (40000, 41000)),
        (" 2000..9000 ", (2000, 9000)),
    ],
)
def test_port_ranges_as_the_seed_defines_them(text: str, expected: tuple[int, int]) -> None:
    assert parse_port_range(text) == expected


@pytest.mark.parametrize(
    "text", ["", "1000", "a..b", "1..2..3", "-1..5", "40000..40500", "100..2000", "60000..70000"]
)
def test_bad_port_ranges_are_refused(text: str) -> None:
    with pytest.raises(PortRangeError):
        parse_port_range(text)


def test_free_ports_lie_in_the_range_and_are_distinct() -> None:
    ports = free_ports("127.0.0.1", 5, (45000, 46000))
    assert len(set(ports)) == 5 and all(45000 <= p <= 46000 for p in ports)


def test_a_public_key_whose_text_begins_with_a_dash_reaches_the_launcher() -> None:
    """A CI run's operator key encoded to "-..." and every launch failed with argparse's
    "argument --public-key: expected one argument"."""
    from kernel_launchers.protocol import encode_key
    from kernel_launchers.python_launcher import parse_args

    key = next(bytes([i]) * 32 for i in range(256) if encode_key(bytes([i]) * 32).startswith("-"))
    args = launcher_args(_request(), "10.0.0.1:8877", key, "0.0.0.0", "/tmp/rko-x")
    args[args.index("--launch-id") + 1] = str(uuid.uuid4())  # a real uid, as the operator passes
    parsed = parse_args([*args, "--token", "t"])
    assert encode_key(key).startswith("-") and parsed.public_key == key
