"""Signed control requests to a running launcher (signal, shutdown). Only the operator holds
the key: the launcher made it, sent it sealed to the operator, and the operator stores it
sealed under its own key."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from kernel_launchers import protocol

from .errors import BackendError, BackendUnavailable, ControlUnanswered


async def send_control(
    host: str, port: int, key: bytes, request: dict[str, Any], timeout: float = 5.0
) -> dict[str, Any]:
    """Send one signed request and return the launcher's JSON reply."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as err:
        raise BackendUnavailable(f"The launcher's control port {host}:{port} is unreachable: {err}") from err
    try:
        writer.write(protocol.sign_control(request, key))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, asyncio.TimeoutError) as err:
        raise ControlUnanswered(
            f"The launcher at {host}:{port} took the request but did not answer within {timeout:g} s "
            f"({err or type(err).__name__}); it was not sent again, as it may have been carried out."
        ) from err
    finally:
        writer.close()
    try:
        reply = json.loads(line)
    except ValueError as err:
        raise BackendError(f"The launcher at {host}:{port} sent an unreadable reply.") from err
    if not isinstance(reply, dict):
        raise BackendError(f"The launcher at {host}:{port} sent an unreadable reply.")
    return reply
