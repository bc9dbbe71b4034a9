"""gateway_provisioners from PyPI in a venv of its own: the system we replace, for comparison
(``make bench``) and for its real kernelspec installers (the migration tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .cluster import REPO_ROOT

GP_VERSION = "0.5.0"
GP_VENV = REPO_ROOT / ".cache" / "bench" / f"gp-{GP_VERSION}"
INSTALLERS = ("jupyter-k8s-spec", "jupyter-docker-spec", "jupyter-yarn-spec", "jupyter-ssh-spec")


def gp_venv(venv: Path = GP_VENV) -> Path:
    """The venv's python, gateway_provisioners[yarn] and ipykernel installed (once, cached)."""
    python = venv / "bin" / "python"
    # Its YarnProvisioner needs the yarn extra (yarn-api-client); older caches lack it.
    has_yarn = (venv / "lib").exists() and any((venv / "lib").glob("python3*/site-packages/yarn_api_client"))
    if not all((venv / "bin" / name).exists() for name in INSTALLERS) or not has_yarn:
        print(f"==> Installing gateway_provisioners {GP_VERSION} into {venv}...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                f"gateway_provisioners[yarn]=={GP_VERSION}",
                "ipykernel",
            ],
            check=True,
        )
    return python


def gp_install(installer: str, prefix: Path, kernel_name: str, *options: str, venv: Path = GP_VENV) -> None:
    """Run one of gateway_provisioners' installers (``jupyter-ssh-spec install ...``) into
    ``prefix``, as an administrator would; raises with its output when it fails."""
    done = subprocess.run(
        [
            str(venv / "bin" / installer),
            "install",
            "--prefix",
            str(prefix),
            "--kernel-name",
            kernel_name,
            *options,
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{installer} install {' '.join(options)} failed: {done.stderr[-2000:]}")
