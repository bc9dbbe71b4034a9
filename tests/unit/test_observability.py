"""What the operator shows: next steps for every failure reason, JSON logs, metrics, the Ready
condition's generation, and the chart's dashboard against the metrics exported."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from kernel_operator.log_format import FIELDS, JsonFormatter, KernelLogger
from kernel_operator.metrics import Metrics
from kernel_operator.next_steps import DEFAULT, NEXT_STEPS, next_step, with_next_step
from kernel_operator.status import Phase, phase_patch

OPERATOR = Path(__file__).resolve().parents[2] / "operator" / "kernel_operator"
CHART = Path(__file__).resolve().parents[2] / "charts" / "remote-kernel-operator"
# Every way the code names a failure reason: error types' reason=, Failed phases, backend states.
REASON_PATTERNS = (
    r'reason="([A-Z][A-Za-z]+)"',
    r'Phase\.FAILED,\s*"([A-Z][A-Za-z]+)"',
    r'BackendStatus\(\s*"(?:failed|gone|succeeded)",\s*"([A-Z][A-Za-z]+)"',
    r'\.reason or "([A-Z][A-Za-z]+)"',
    r'emit\(\s*"Warning",\s*"([A-Z][A-Za-z]+)"',
    r'with_next_step\("([A-Z][A-Za-z]+)"',
)


def reasons_in_code() -> set[str]:
    found: set[str] = set()
    for path in OPERATOR.rglob("*.py"):
        text = path.read_text()
        for pattern in REASON_PATTERNS:
            found.update(re.findall(pattern, text))
    return found


def test_every_failure_reason_the_operator_writes_has_a_next_step() -> None:
    found = reasons_in_code()
    assert len(found) > 40, found  # the patterns still find the reasons
    assert not found - set(NEXT_STEPS), sorted(found - set(NEXT_STEPS))


def test_a_next_step_follows_the_cause_and_unknown_reasons_get_the_default() -> None:
    text = with_next_step("ProfileNotFound", "RemoteKernelProfile gpu does not exist.")
    assert text.startswith("RemoteKernelProfile gpu does not exist. Next: ")
    assert "kubectl get rkprofiles" in text
    assert next_step("OOMKilled") == DEFAULT  # a pod's reason: not ours to enumerate


def test_json_logs_have_one_field_set_with_the_kernels_fields() -> None:
    formatter = JsonFormatter()
    base = logging.getLogger("test.json")
    kopf_like = logging.LoggerAdapter(base, {"k8s_ref": {"namespace": "ns", "name": "k", "uid": "u-1"}})
    fields = {"kernel_id": "kid", "backend": "ssh", "phase": "Launching", "uid": "u-1"}
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    base.addHandler(Keep())
    base.setLevel(logging.INFO)
    KernelLogger(kopf_like, lambda: fields).info("Launching the kernel.")
    base.info("A line about no kernel.")
    docs = [json.loads(formatter.format(r)) for r in records]
    assert all(set(FIELDS) <= set(d) for d in docs)
    assert docs[0]["namespace"] == "ns" and docs[0]["kernel_id"] == "kid" and docs[0]["phase"] == "Launching"
    assert docs[0]["message"] == "Launching the kernel." and docs[0]["level"] == "INFO"
    assert docs[1]["uid"] == "" and docs[1]["backend"] == ""


def test_the_ready_condition_carries_the_generation_and_the_phase_its_start() -> None:
    first = phase_patch({}, Phase.LAUNCHING, "Launching", "m", "t1", generation=3)
    assert first["conditions"][0]["observedGeneration"] == 3 and first["phaseSince"] == "t1"
    same = phase_patch({**first, "phase": "Launching"}, Phase.LAUNCHING, "Still", "m", "t2", generation=3)
    assert same["phaseSince"] == "t1"  # the same phase: its start stays
    running = phase_patch(
        {**same, "phase": "Launching"}, Phase.RUNNING, "KernelReady", "m", "t3", generation=4
    )
    assert running["phaseSince"] == "t3" and running["conditions"][0]["observedGeneration"] == 4


def test_metrics_export_the_documented_names_and_count_kernels_by_phase() -> None:
    metrics = Metrics()
    metrics.kernels.set("a", "Running", "ssh")
    metrics.kernels.set("b", "Running", "ssh")
    metrics.kernels.set("c", "Failed", "kubernetes")
    metrics.kernels.forget("b")
    text = metrics.exposition().decode()
    assert 'rko_kernels{backend="ssh",phase="Running"} 1.0' in text
    assert 'rko_kernels{backend="kubernetes",phase="Failed"} 1.0' in text
    assert "_created" not in text
    names = metrics.names()
    for name in (
        "rko_launches_total",
        "rko_launch_duration_seconds_bucket",
        "rko_stops_total",
        "rko_stop_duration_seconds_count",
        "rko_idle_culls_total",
        "rko_listener_rejections_total",
        "rko_pool_members",
        "rko_pool_claims_total",
        "rko_leader",
        "rko_kernels",
    ):
        assert name in names, name
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"`(rko_[a-z_]+)`", readme))
    exported = {n for n in names if n.startswith("rko_")}
    assert documented and documented <= exported, documented - exported
    families = {n.removesuffix("_total") for n in exported if not n.endswith(("_bucket", "_count", "_sum"))}
    assert {n for n in families if n + "_total" in exported or n in exported} - {
        d.removesuffix("_total") for d in documented
    } == set(), "every metric family is in the chart's README"


@pytest.mark.parametrize("path", sorted((CHART / "dashboards").glob("*.json")) or [None])
def test_every_dashboard_query_names_a_metric_the_operator_exports(path: Path | None) -> None:
    assert path is not None, "the chart ships a Grafana dashboard in dashboards/"
    dashboard = json.loads(path.read_text())
    exported = Metrics().names()
    queries = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    assert len(queries) >= 6
    for query in queries:
        named = set(re.findall(r"\b((?:rko|process)_[a-z_]+)\b", query))
        assert named, query
        assert named <= exported, (query, named - exported)
