"""Test-wide setup: make the dev tools in hack/ importable; time the session fixtures' teardowns."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "hack"))

_teardowns: dict[str, float] = {}
_last_finish: list[float] = []


def pytest_fixture_post_finalizer(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> None:
    """How long each session fixture's teardown took (the time since the previous one's end):
    the servers' stops run after the last test, where --durations shows one lump."""
    now = time.monotonic()
    if fixturedef.cached_result is None:
        return  # never set up
    if fixturedef.scope == "session" and _last_finish and now - _last_finish[0] >= 1.0:
        _teardowns[fixturedef.argname] = now - _last_finish[0]
    _last_finish[:] = [now]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for name, took in _teardowns.items():
        terminalreporter.write_line(f"{name} teardown (s): {took:.2f}")
