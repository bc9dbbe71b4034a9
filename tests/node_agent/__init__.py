"""The test node agent: runs the pods bound to its node as Docker containers (see agent.py)."""

from __future__ import annotations

import sys
from pathlib import Path


def node_agent_command(kubeconfig: Path, node_name: str, docker_host: str) -> list[str]:
    """The command that runs a node agent (from the repository's root folder)."""
    return [
        sys.executable,
        "-m",
        "tests.node_agent",
        "--kubeconfig",
        str(kubeconfig),
        "--node-name",
        node_name,
        "--docker-host",
        docker_host,
    ]
