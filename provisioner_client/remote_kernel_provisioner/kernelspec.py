"""Pure builders of kernelspecs that name our provisioner, and of the image bootstrap script.

What gateway_provisioners' jupyter-k8s-spec, -docker-spec, -yarn-spec, -ssh-spec and
jupyter-image-bootstrap wrote, as data. One rule the seed breaks: a value goes into the
kernelspec only when the installer was given it. gateway_provisioners writes its defaults
(``launch_timeout: 30``, the port range, the user lists) into every kernel.json, and since
a kernelspec's provisioner config wins over the server's configuration, those defaults later
override whatever the server or the operator is set to, silently.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("kubernetes", "docker", "dockerSwarm", "yarn", "ssh", "sparkApplication", "customResource")
LANGUAGES = ("python", "r", "scala")
LANGUAGE_NAMES = {"python": "python", "r": "R", "scala": "scala"}  # kernel.json's "language"
KERNEL_NAMES = {"r": "IRkernel", "scala": "Apache Toree"}
SCALA_BACKENDS = ("ssh", "kubernetes", "docker", "dockerSwarm", "yarn")  # as the operator's spec.py says
ENCRYPTION = ("disabled", "auto", "required")
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what jupyter_client accepts as a kernel name
_PORT_RANGE = re.compile(r"^\d+\.\.\d+$")


class SpecOptionError(ValueError):
    """An installer option is invalid; the message says which and what is allowed."""


@dataclass(frozen=True)
class SpecOptions:
    """What the installer was asked for. ``None`` / empty means "not given": left out."""

    backend: str | None = None  # the profile's backend, for backend options (the profile decides)
    profile: str | None = None
    language: str = "python"
    kernel_name: str = ""
    display_name: str = ""
    namespace: str | None = None
    image_name: str | None = None
    executor_image_name: str | None = None
    authorized_users: Sequence[str] = ()
    unauthorized_users: Sequence[str] | None = None
    port_range: str | None = None
    launch_timeout: int | None = None
    idle_timeout: int | None = None
    transport_encryption: str | None = None
    remote_hosts: Sequence[str] = ()
    load_balancing_algorithm: str | None = None
    operator_class: str | None = None
    kernel_class_name: str | None = None
    backend_config: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)


def default_kernel_name(options: SpecOptions) -> str:
    which = options.profile or options.backend or "default"
    return f"remote_{which.lower()}_{options.language}"


def _check(options: SpecOptions) -> None:
    if options.backend is not None and options.backend not in BACKENDS:
        raise SpecOptionError(f"--backend {options.backend!r} must be one of {', '.join(BACKENDS)}.")
    if options.profile is not None and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", options.profile):
        raise SpecOptionError(f"--profile {options.profile!r} is not a RemoteKernelProfile name.")
    if options.language not in LANGUAGES:
        raise SpecOptionError(f"--language {options.language!r} must be python, r or scala.")
    if options.language == "scala" and options.backend not in (None, *SCALA_BACKENDS):
        raise SpecOptionError(
            f"Scala kernels run on the {', '.join(SCALA_BACKENDS)} backends, not {options.backend}."
        )
    if options.kernel_name and not _NAME.match(options.kernel_name):
        raise SpecOptionError(
            f"--kernel-name {options.kernel_name!r} may hold only letters, digits, '.', '_' and '-'."
        )
    if options.port_range is not None:
        if not _PORT_RANGE.match(options.port_range):
            raise SpecOptionError(
                f"--port-range {options.port_range!r} must be 'lower..upper', e.g. 40000..41999."
            )
        lower, upper = (int(p) for p in options.port_range.split(".."))
        if (lower, upper) != (0, 0) and not (lower >= 1024 and upper <= 65535 and upper - lower >= 999):
            raise SpecOptionError(
                f"--port-range {options.port_range!r} must be 0..0 (any port) or span at least 1000 "
                "ports within 1024..65535."
            )
    for name, value in (
        ("--launch-timeout", options.launch_timeout),
        ("--idle-timeout", options.idle_timeout),
    ):
        if value is not None and value < (1 if name == "--launch-timeout" else 0):
            raise SpecOptionError(
                f"{name} {value} must be {'positive' if name == '--launch-timeout' else '0 or more'}."
            )
    if options.transport_encryption is not None:
        if options.transport_encryption not in ENCRYPTION:
            raise SpecOptionError(f"--transport-encryption must be one of {', '.join(ENCRYPTION)}.")
        if options.language != "python" and options.transport_encryption == "required":
            raise SpecOptionError(
                f"{options.language.capitalize()} kernels ({KERNEL_NAMES[options.language]}) do not support "
                "CurveZMQ: --transport-encryption required cannot work."
            )
    if options.remote_hosts and options.backend not in (None, "ssh"):
        raise SpecOptionError("--remote-hosts applies to the ssh backend only.")
    container = options.backend in (
        None,
        "kubernetes",
        "docker",
        "dockerSwarm",
        "sparkApplication",
        "customResource",
    )
    if options.image_name is not None and not container:
        raise SpecOptionError(f"--image-name applies to container backends, not {options.backend}.")
    if options.backend_config and options.backend not in ("ssh", "yarn"):
        raise SpecOptionError(
            "--backend-config and --extra-spark-opts are a tenant's ssh or yarn choices: give --backend "
            "ssh or yarn (the profile's backend)."
        )


def build_kernelspec(options: SpecOptions) -> dict[str, Any]:
    """kernel.json for ``options``. Raises SpecOptionError for a bad option."""
    _check(options)
    config: dict[str, Any] = {}
    given: dict[str, Any] = {
        "profile": options.profile,
        "backend": options.backend,
        "namespace": options.namespace,
        "image_name": options.image_name,
        "executor_image_name": options.executor_image_name,
        "authorized_users": list(options.authorized_users) or None,
        "unauthorized_users": list(options.unauthorized_users)
        if options.unauthorized_users is not None
        else None,
        "port_range": options.port_range,
        "launch_timeout": options.launch_timeout,
        "idle_timeout": options.idle_timeout,
        "transport_encryption": options.transport_encryption,
        "remote_hosts": list(options.remote_hosts) or None,
        "load_balancing_algorithm": options.load_balancing_algorithm,
        "operator_class": options.operator_class,
        "kernel_class_name": options.kernel_class_name,
        "backend_config": dict(options.backend_config) or None,
    }
    config.update({key: value for key, value in given.items() if value is not None})
    python = options.language == "python"
    metadata: dict[str, Any] = {
        "kernel_provisioner": {"provisioner_name": "remote-kernel", "config": config},
    }
    if python:
        # ipykernel speaks CurveZMQ through our launcher and has a debugger; IRkernel and Toree
        # neither.
        metadata["supported_encryption"] = ["curve"]
        metadata["debugger"] = True
    language = LANGUAGE_NAMES[options.language]
    return {
        # The operator builds the launcher's command; argv is what jupyter_client requires a
        # kernelspec to have, and documents which launcher runs.
        "argv": ["python", "-m", "kernel_launchers.python_launcher", "--kernel-language", options.language],
        "display_name": options.display_name
        or f"{language.capitalize() if language == 'scala' else language} on "
        f"{options.profile or options.backend or 'the default profile'} (remote)",
        "language": language,
        # IRkernel and Toree cannot be interrupted by a control message; a signal (SIGINT, which
        # Toree turns into interrupting the cell) reaches them through the operator and the launcher.
        "interrupt_mode": "message" if python else "signal",
        "env": dict(options.env),
        "metadata": metadata,
    }


def bootstrap_script(python: str) -> str:
    """``bootstrap-kernel.sh`` for a kernel image: the stable entry point the seed's images had.

    It runs our launcher with the image's Python; KERNEL_LANGUAGE picks the kernel.
    """
    return (
        "#!/bin/sh\n"
        "# Installed by `remote-kernel-spec bootstrap`: starts a kernel through the Remote Kernel\n"
        "# Operator's launcher (python or R, from KERNEL_LANGUAGE).\n"
        "set -e\n"
        f'exec {python} -m kernel_launchers.python_launcher --kernel-language "${{KERNEL_LANGUAGE:-python}}" "$@"\n'
    )
