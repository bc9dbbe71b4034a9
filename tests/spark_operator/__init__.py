"""A stand-in for the Kubeflow spark-operator, following its documented behaviour (see controller.py)."""

from __future__ import annotations

import sys
from pathlib import Path

CRD = Path(__file__).with_name("sparkapplications.sparkoperator.k8s.io.yaml")


def controller_command(kubeconfig: Path) -> list[str]:
    """The command that runs the controller (from the repository's root folder)."""
    return [sys.executable, "-m", "tests.spark_operator", "--kubeconfig", str(kubeconfig)]
