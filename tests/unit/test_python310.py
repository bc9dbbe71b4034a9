"""Python 3.10 (allowed by pyproject) is not run here, so its one trap is checked in the source:
before 3.11, ``asyncio.wait_for`` raises ``asyncio.TimeoutError``, which ``except TimeoutError``
does not catch. Every handler of a ``try`` that awaits ``asyncio.wait_for`` must name
``asyncio.TimeoutError`` (the same class on 3.11 and later)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("operator", "provisioner_client", "launchers")


def _calls_wait_for(nodes: list[ast.stmt]) -> bool:
    for node in nodes:
        for sub in ast.walk(node):
            if (
                isinstance(sub, ast.Call)
                and isinstance(sub.func, ast.Attribute)
                and sub.func.attr == "wait_for"
                and isinstance(sub.func.value, ast.Name)
                and sub.func.value.id == "asyncio"
            ):
                return True
    return False


def _names_bare_timeout(handler: ast.ExceptHandler) -> bool:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id == "TimeoutError" for t in types if t is not None)


def bare_timeout_handlers(source: str) -> list[int]:
    """Lines of handlers catching the builtin TimeoutError around an asyncio.wait_for."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Try) and _calls_wait_for(node.body):
            lines += [h.lineno for h in node.handlers if _names_bare_timeout(h)]
    return lines


def test_the_check_finds_the_trap() -> None:
    trap = "import asyncio\nasync def f():\n    try:\n        await asyncio.wait_for(g(), 1)\n    except TimeoutError:\n        pass\n"
    assert bare_timeout_handlers(trap) == [5]
    assert not bare_timeout_handlers(trap.replace("except TimeoutError", "except asyncio.TimeoutError"))


def scan() -> dict[str, list[int]]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            lines = bare_timeout_handlers(path.read_text())
            if lines:
                found[str(path.relative_to(ROOT))] = lines
    return found


def test_no_handler_misses_asyncio_timeouts_on_python_310() -> None:
    # In a fresh interpreter: CPython 3.11's parser can trip on its own recursion bookkeeping
    # ("AST constructor recursion depth mismatch") late in a long test session.
    out = subprocess.run(
        [sys.executable, "-c", "import json, tests.unit.test_python310 as t; print(json.dumps(t.scan()))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = json.loads(out)
    assert not found, f"use asyncio.TimeoutError (Python 3.10 raises it from wait_for): {found}"
