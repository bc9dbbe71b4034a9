"""The operator's exception types. Handlers map them to kopf's permanent or temporary errors."""

from __future__ import annotations


class OperatorError(Exception):
    """Base of every error the operator raises on purpose."""


class SpecError(OperatorError):
    """The RemoteKernel's spec is invalid or not allowed; retrying cannot help."""

    def __init__(self, message: str, reason: str = "InvalidSpec") -> None:
        super().__init__(message)
        self.reason = reason


class BackendError(OperatorError):
    """A backend failed to launch, inspect or stop a kernel."""

    def __init__(self, message: str, reason: str = "BackendError") -> None:
        super().__init__(message)
        self.reason = reason


class BackendUnavailable(BackendError):
    """A backend is unreachable for now; the operation may succeed later."""

    def __init__(self, message: str, reason: str = "BackendUnavailable") -> None:
        super().__init__(message, reason)


class CommandUnanswered(BackendUnavailable):
    """A command was sent to a host that did not answer: it may have run all the same (a start
    delivered before a link was cut runs once the link is back)."""


class ControlUnanswered(BackendError):
    """A control request reached the launcher, which did not answer: it may have been carried
    out, so it must not be repeated another way (a signal delivered twice is two interrupts)."""

    def __init__(self, message: str, reason: str = "ControlUnanswered") -> None:
        super().__init__(message, reason)


class SettingsError(OperatorError):
    """An RKO_* setting is malformed; the operator cannot start."""
