"""Logs people can search: JSON lines on request (RKO_LOG_FORMAT=json), text by default.

Every JSON line has the same field set, empty where a field does not apply: ``time``,
``level``, ``logger``, ``message``, and the kernel's ``uid``, ``namespace``, ``name``,
``kernel_id``, ``backend`` and ``phase``; ``exception`` is added when there is one. The object
fields come from kopf's per-object logger (``k8s_ref``) and from ``KernelLogger`` (``rko``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

FIELDS = ("time", "level", "logger", "message", "uid", "namespace", "name", "kernel_id", "backend", "phase")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ref: Mapping[str, Any] = getattr(record, "k8s_ref", None) or {}
        kernel: Mapping[str, Any] = getattr(record, "rko", None) or {}
        moment = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
        doc: dict[str, Any] = {
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "uid": str(ref.get("uid") or kernel.get("uid") or ""),
            "namespace": str(ref.get("namespace") or kernel.get("namespace") or ""),
            "name": str(ref.get("name") or kernel.get("name") or ""),
            "kernel_id": str(kernel.get("kernel_id") or ""),
            "backend": str(kernel.get("backend") or ""),
            "phase": str(kernel.get("phase") or ""),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


class KernelLogger(logging.LoggerAdapter[Any]):
    """The logger a handler is given, with the kernel's own fields added at each call (the
    phase changes as the kernel goes). An adapter given is unwrapped and its extra fields kept
    (kopf's carry the object reference its Events are posted with): a plain LoggerAdapter would
    replace ours with its own."""

    def __init__(
        self, inner: logging.Logger | logging.LoggerAdapter[Any], fields: Callable[[], dict[str, str]]
    ) -> None:
        if isinstance(inner, logging.LoggerAdapter):
            super().__init__(inner.logger, dict(inner.extra or {}))
        else:
            super().__init__(inner, {})
        self.fields = fields

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {}), "rko": self.fields()}
        return msg, kwargs


def use_json_logs() -> None:
    """Give every root handler (kopf's included) the JSON formatter."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter())
