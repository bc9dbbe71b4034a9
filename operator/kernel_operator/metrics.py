"""Prometheus metrics: what the operator counts, and the one registry they are served from.

Every name here is listed in the chart's README and used by its Grafana dashboard (a test keeps
the dashboard's queries to these names). Labels are bounded by what administrators define
(backends, profiles) or by objects that exist (pools); never by kernel ids or users.

The counters are process-wide and restart at zero with the process, as Prometheus expects
(``rate()`` handles resets). Gauges of kernels by phase are computed at scrape time from the
phases this replica last wrote or saw, so a standby (which acts on nothing) reports none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

PREFIX = "rko"
DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Why the listener turned a connection away (the label's whole vocabulary).
REJECTION_CAUSES = ("busy", "unknown_launch", "bad_token", "other_launcher", "bad_frame", "timeout", "error")


class KernelPhases(Collector):
    """``rko_kernels{phase,backend}`` from a live map of uid -> (phase, backend)."""

    def __init__(self) -> None:
        self.phases: dict[str, tuple[str, str]] = {}

    def set(self, uid: str, phase: str, backend: str) -> None:
        self.phases[uid] = (phase, backend)

    def forget(self, uid: str) -> None:
        self.phases.pop(uid, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            f"{PREFIX}_kernels",
            "RemoteKernels this replica follows, by phase and backend.",
            labels=["phase", "backend"],
        )
        counts: dict[tuple[str, str], int] = {}
        for phase, backend in self.phases.values():
            counts[(phase, backend)] = counts.get((phase, backend), 0) + 1
        for (phase, backend), count in sorted(counts.items()):
            family.add_metric([phase, backend], count)
        yield family


class Metrics:
    """The operator's metrics in a registry of their own (plus the process's CPU and memory)."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series are noise
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.launches = Counter(
            f"{PREFIX}_launches",
            "Launches finished, by backend, profile and outcome (running, claimed from a pool, failed).",
            ["backend", "profile", "outcome"],
            registry=r,
        )
        self.launch_duration = Histogram(
            f"{PREFIX}_launch_duration_seconds",
            "From the RemoteKernel's creation to Running, by backend.",
            ["backend"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.stops = Counter(
            f"{PREFIX}_stops",
            "Kernels stopped on their backend, by backend and outcome.",
            ["backend", "outcome"],
            registry=r,
        )
        self.stop_duration = Histogram(
            f"{PREFIX}_stop_duration_seconds",
            "How long stopping a kernel on its backend took, by backend.",
            ["backend"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.culls = Counter(
            f"{PREFIX}_idle_culls", "Kernels deleted for being idle, by backend.", ["backend"], registry=r
        )
        self.rejections = Counter(
            f"{PREFIX}_listener_rejections",
            "Connections the response listener turned away, by cause.",
            ["cause"],
            registry=r,
        )
        self.reports = Counter(
            f"{PREFIX}_listener_reports",
            "Launch reports taken for a launch another replica awaited (how: for_another_replica), or "
            "acknowledged again for a kernel taken before (how: repeat).",
            ["how"],
            registry=r,
        )
        self.pool_members = Gauge(
            f"{PREFIX}_pool_members",
            "Members of each RemoteKernelPool, by state (ready, launching) and the pool's desired size.",
            ["namespace", "pool", "state"],
            registry=r,
        )
        # No pool label: tenants make and delete pools, and a counter's series outlive them.
        self.pool_claims = Counter(
            f"{PREFIX}_pool_claims",
            "Claims on pools, by namespace and outcome (claimed, empty, failed).",
            ["namespace", "outcome"],
            registry=r,
        )
        self.leader = Gauge(
            f"{PREFIX}_leader", "1 while this replica holds the leader Lease, else 0.", registry=r
        )
        self.leader_transitions = Counter(
            f"{PREFIX}_leader_transitions", "Times this replica became the leader.", registry=r
        )
        self.kernels = KernelPhases()
        r.register(self.kernels)
        for cause in REJECTION_CAUSES:
            self.rejections.labels(cause)  # present at zero, so rate() has a series from the start

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return bytes(generate_latest(self.registry))

    def names(self) -> set[str]:
        """Every sample name this registry can export (counters with their _total etc.)."""
        found: set[str] = set()
        for family in self.registry.collect():
            found.add(family.name)
            found.update(sample.name for sample in family.samples)
            if family.type == "counter":
                found.add(f"{family.name}_total")
            if family.type == "histogram":
                found.update(f"{family.name}_{suffix}" for suffix in ("bucket", "count", "sum"))
        return found


def forget_pool(metrics: Metrics, namespace: str, pool: str) -> None:
    """Drop a deleted pool's gauges (its counters stay until the process restarts)."""
    for state in ("ready", "launching", "desired"):
        with contextlib.suppress(KeyError):
            metrics.pool_members.remove(namespace, pool, state)
