"""The test YARN's Python side: how a failed start is reported (no Java, no servers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from localcluster.yarn import MiniYarn


def _printing(*lines: str) -> subprocess.Popen[str]:
    code = "".join(f"print({line!r})\n" for line in lines)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_a_cluster_that_fails_to_start_says_why(tmp_path: Path) -> None:
    yarn = MiniYarn(work_dir=tmp_path, jars=tmp_path)
    yarn.proc = _printing("RM_WEB http://127.0.0.1:1", "FAILED the NodeManager is unhealthy: disks full")
    with pytest.raises(
        RuntimeError, match="MiniYARNCluster failed: the NodeManager is unhealthy: disks full"
    ):
        yarn._await_line("READY", timeout=30)
    yarn.proc.wait()


def test_a_cluster_that_ends_without_a_word_points_at_its_log(tmp_path: Path) -> None:
    yarn = MiniYarn(work_dir=tmp_path, jars=tmp_path)
    yarn.proc = _printing("RM_WEB http://127.0.0.1:1")
    with pytest.raises(RuntimeError, match=r"did not print READY; see .*yarn\.log"):
        yarn._await_line("READY", timeout=30)
    yarn.proc.wait()
    assert yarn.web == "http://127.0.0.1:1"
