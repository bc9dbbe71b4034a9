"""Small helpers shared by the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.2,
    what: str = "condition",
    found: Callable[[], object] | None = None,
) -> T:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``,
    with what ``found`` returns then (e.g. the processes that stayed)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = f"; found {found()}" if found is not None else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}{seen}")
        time.sleep(interval)
