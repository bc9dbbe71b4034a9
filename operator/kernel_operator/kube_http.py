"""The HTTP transport beneath ``kube``: one aiohttp session to the API server, JSON in and out.

It knows paths, not kinds: ``kube`` builds the paths and turns statuses into our errors. The
generated Kubernetes clients were ~60 MB of the operator's memory for the few calls it makes.
Connection failures propagate as aiohttp's (transient for the caller); an HTTP error status
becomes ``ApiStatusError``. A 401 loads the credentials again once (a rotated ServiceAccount
token, an expired plugin token) and repeats the request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp

from .kube_auth import Credentials

JSON = "application/json"
# Like the client it replaces (5 per core): enough for bursts, few enough for the API server.
POOL_SIZE = 5 * (os.cpu_count() or 1)
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=10)


class ApiStatusError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.body = body


def ssl_context(creds: Credentials) -> ssl.SSLContext | bool:
    if not creds.server.startswith("https:"):
        return False
    if creds.insecure:
        return False  # the kubeconfig says so (insecure-skip-tls-verify)
    context = ssl.create_default_context(cadata=creds.ca_pem.decode() if creds.ca_pem else None)
    if creds.cert_pem and creds.key_pem:
        # ssl loads a client certificate only from files: a private folder, gone at once.
        with tempfile.TemporaryDirectory(prefix="rko-tls-") as folder:
            cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
            for path, data in ((cert, creds.cert_pem), (key, creds.key_pem)):
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                    f.write(data)
            context.load_cert_chain(cert, key)
    return context


def auth_headers(creds: Credentials) -> dict[str, str]:
    if creds.token:
        return {"Authorization": f"Bearer {creds.token}"}
    if creds.username is not None and creds.password is not None:
        pair = f"{creds.username}:{creds.password}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    return {}


class ApiClient:
    """Requests to one API server with credentials from ``load`` (blocking: run in a thread)."""

    def __init__(self, load: Callable[[], Credentials]) -> None:
        self._load = load
        self._creds: Credentials | None = None
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        async with self._lock:
            await self._renew(None)

    async def _renew(self, stale: aiohttp.ClientSession | None) -> aiohttp.ClientSession:
        """A session with fresh credentials, unless another request renewed ``stale`` already."""
        if self._session is not None and self._session is not stale:
            return self._session
        creds = await asyncio.to_thread(self._load)
        ssl_arg = await asyncio.to_thread(ssl_context, creds)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=POOL_SIZE, ssl=ssl_arg),
            headers={"Accept": JSON, **auth_headers(creds)},
            timeout=REQUEST_TIMEOUT,
        )
        old, self._creds, self._session = self._session, creds, session
        if old is not None:
            # Requests in flight on it finish first; it is closed once they had time to.
            asyncio.get_running_loop().call_later(REQUEST_TIMEOUT.total or 0, _close_later, old)
        return session

    def _url(self, path: str) -> str:
        assert self._creds is not None
        return self._creds.server + path  # the server may have a path of its own (a proxy)

    async def _current(self) -> aiohttp.ClientSession:
        creds, session = self._creds, self._session
        if session is None or (creds is not None and _expired(creds)):
            async with self._lock:
                return await self._renew(session)
        return session

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Any = None,
        content_type: str = JSON,
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body)
        headers = None if body is None else {"Content-Type": content_type}
        session = await self._current()
        for attempt in (1, 2):
            async with session.request(
                method, self._url(path), params=params, data=data, headers=headers
            ) as resp:
                if resp.status == 401 and attempt == 1:
                    async with self._lock:
                        session = await self._renew(session)
                    continue
                text = await resp.text()
                if resp.status >= 400:
                    raise ApiStatusError(resp.status, resp.reason or "", text)
                return dict(json.loads(text)) if text else {}
        raise AssertionError("unreachable")  # pragma: no cover

    async def watch(
        self, path: str, params: Mapping[str, str | int], timeout_seconds: int
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of a watch (``{"type": ..., "object": ...}``) until the server ends it."""
        session = await self._current()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_seconds + 30)
        query = {**params, "watch": "true", "timeoutSeconds": timeout_seconds}
        async with session.get(self._url(path), params=query, timeout=timeout) as resp:
            if resp.status >= 400:
                raise ApiStatusError(resp.status, resp.reason or "", await resp.text())
            pending = b""
            # Lines, whatever their length (a pod's JSON can outgrow a reader's line limit).
            async for chunk in resp.content.iter_any():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield dict(json.loads(line))
            if pending.strip():
                yield dict(json.loads(pending))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _expired(creds: Credentials) -> bool:
    if creds.expires is None:
        return False
    expires = creds.expires if creds.expires.tzinfo else creds.expires.replace(tzinfo=datetime.timezone.utc)
    return datetime.datetime.now(datetime.timezone.utc) >= expires - datetime.timedelta(seconds=30)


def _close_later(session: aiohttp.ClientSession) -> None:
    with contextlib.suppress(RuntimeError):
        asyncio.get_running_loop().create_task(session.close())
