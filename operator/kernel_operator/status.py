"""Pure builders of status patches: phases, conditions, connection info."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from enum import Enum
from typing import Any

from kernel_launchers.protocol import ConnectionInfo


class Phase(str, Enum):
    PENDING = "Pending"
    LAUNCHING = "Launching"
    RUNNING = "Running"
    TERMINATING = "Terminating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED})


def now_iso(now: dt.datetime | None = None) -> str:
    moment = now or dt.datetime.now(dt.timezone.utc)
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[Mapping[str, Any]] | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: str,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """The condition list with one condition set; its transition time moves only on change.
    ``generation`` is the spec generation the condition was computed from (observedGeneration)."""
    result: list[dict[str, Any]] = []
    found = False
    for existing in conditions or []:
        if existing.get("type") == type_:
            found = True
            changed = existing.get("status") != status
            result.append(
                {
                    "type": type_,
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": now if changed else existing.get("lastTransitionTime", now),
                    **({"observedGeneration": generation} if generation is not None else {}),
                }
            )
        else:
            result.append(dict(existing))
    if not found:
        result.append(
            {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": now,
                **({"observedGeneration": generation} if generation is not None else {}),
            }
        )
    return result


def phase_patch(
    status: Mapping[str, Any],
    phase: Phase,
    reason: str,
    message: str,
    now: str,
    generation: int | None = None,
) -> dict[str, Any]:
    """A status merge patch moving to ``phase``, with the Ready condition to match, and
    ``phaseSince`` (the printer column's age of the phase) moved only when the phase changes."""
    ready = "True" if phase is Phase.RUNNING else "False"
    since = status.get("phaseSince") if status.get("phase") == phase.value else None
    return {
        "phase": phase.value,
        "phaseSince": since or now,
        "reason": reason,
        "message": message,
        "conditions": set_condition(
            status.get("conditions"), "Ready", ready, reason, message, now, generation
        ),
    }


def connection_status(info: ConnectionInfo, secret_name: str) -> dict[str, Any]:
    """The connection block of status: everything but the HMAC key, which stays in a Secret."""
    return {
        "ip": info["ip"],
        "transport": info["transport"],
        "signatureScheme": info["signature_scheme"],
        "kernelName": info.get("kernel_name", ""),
        "shellPort": info["shell_port"],
        "iopubPort": info["iopub_port"],
        "stdinPort": info["stdin_port"],
        "controlPort": info["control_port"],
        "hbPort": info["hb_port"],
        "transportEncryption": "curve" if info.get("curve_publickey") else "none",
        "secretRef": {"name": secret_name, "key": "key"},
    }


def secret_name(resource_name: str) -> str:
    """The Secret holding a kernel's HMAC key (and the operator's sealed control key)."""
    return f"{resource_name}-connection"
