"""The one place the yarn backend talks to a ResourceManager: its REST API, via yarn-api-client.

Synchronous (yarn-api-client uses requests); the backend calls it in a thread. The active
ResourceManager of the configured pair is found once and kept; a call it does not answer finds
the active one again and is retried once, so an HA failover is followed without a restart.
Errors become BackendUnavailable (cannot reach any) or BackendError (refused).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import requests
from yarn_api_client.errors import APIError
from yarn_api_client.resource_manager import ResourceManager

from ..errors import BackendError, BackendUnavailable, SpecError

# yarn-api-client logs a warning for every endpoint it finds down; our errors say it once.
logging.getLogger("yarn_api_client").setLevel(logging.ERROR)

LIVE_STATES = ("NEW", "NEW_SAVING", "SUBMITTED", "ACCEPTED", "RUNNING")
FINAL_STATES = ("FINISHED", "FAILED", "KILLED")


def kerberos_auth() -> Any:
    """SPNEGO for a secured ResourceManager; requests-kerberos is an optional dependency."""
    try:
        from requests_kerberos import OPTIONAL, HTTPKerberosAuth  # type: ignore[import-not-found]
    except ImportError as err:
        raise SpecError(
            "yarn.securityEnabled needs SPNEGO (Kerberos) support: install requests-kerberos in the "
            "operator's environment (pip install requests-kerberos) and give it a keytab.",
            reason="KerberosUnavailable",
        ) from err
    return HTTPKerberosAuth(mutual_authentication=OPTIONAL)


class ResourceManagerClient:
    """REST calls to the active ResourceManager among ``endpoints``."""

    def __init__(self, endpoints: Sequence[str], timeout: float, security_enabled: bool) -> None:
        self.endpoints = [e for e in endpoints if e]
        self.timeout = timeout
        self.security_enabled = security_enabled
        self._rm: ResourceManager | None = None  # the active one, once found

    def _active(self) -> ResourceManager:
        if self._rm is not None:
            return self._rm
        auth = kerberos_auth() if self.security_enabled else None
        try:
            rm = ResourceManager(service_endpoints=self.endpoints, timeout=self.timeout, auth=auth)
        except Exception as err:  # yarn-api-client raises a bare Exception when none answers
            raise BackendUnavailable(
                f"No ResourceManager answered at {', '.join(self.endpoints)}: {err}",
                reason="ResourceManagerUnreachable",
            ) from err
        rm.session.trust_env = False  # never through a proxy from the environment
        self._rm = rm
        return rm

    def _call(self, what: str, path: str, method: str = "GET", **kwargs: Any) -> dict[str, Any]:
        known = self._rm is not None
        rm = self._active()
        try:
            return dict(rm.request(path, method, **kwargs).data)
        except requests.RequestException as err:
            if isinstance(err, requests.ConnectionError):
                self._rm = None  # it went away (or failed over): look for the active one again
                if known:
                    return self._call(what, path, method, **kwargs)
            raise BackendUnavailable(
                f"The ResourceManager at {rm.get_active_endpoint()} did not answer ({what}): {err}",
                reason="ResourceManagerUnreachable",
            ) from err
        except APIError as err:
            raise BackendError(
                f"The ResourceManager at {rm.get_active_endpoint()} refused to {what}: {err}",
                reason="YarnRequestRefused",
            ) from err

    def _user_params(self, user: str) -> dict[str, str]:
        if not user:
            return {}
        # Kerberos: the operator's principal acts for the user (it must be a proxy user).
        return {"doAs": user} if self.security_enabled else {"user.name": user}

    def new_application(self, user: str) -> str:
        data = self._call(
            "create an application",
            "/ws/v1/cluster/apps/new-application",
            "POST",
            params=self._user_params(user),
        )
        return str(data["application-id"])

    def submit(self, body: Mapping[str, Any], user: str) -> None:
        self._call(
            "accept the application", "/ws/v1/cluster/apps", "POST", json=body, params=self._user_params(user)
        )

    def application(self, app_id: str) -> dict[str, Any] | None:
        """The application's report, or None when the ResourceManager does not know it."""
        try:
            data = self._call("report the application", f"/ws/v1/cluster/apps/{app_id}")
        except BackendError as err:
            if isinstance(err, BackendUnavailable) or "404" not in str(err):
                raise
            return None
        return dict(data.get("app") or {}) or None

    def live_applications(self, types: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The applications of ``types`` not yet finished, by id: one request for all of them."""
        data = self._call(
            "list applications",
            "/ws/v1/cluster/apps",
            params={"states": ",".join(LIVE_STATES), "applicationTypes": ",".join(types)},
        )
        return {str(a.get("id")): dict(a) for a in (data.get("apps") or {}).get("app") or []}

    def started_on(self) -> float:
        """When the active ResourceManager started (ms since the epoch)."""
        info = self._call("describe the cluster", "/ws/v1/cluster/info").get("clusterInfo") or {}
        return float(info.get("startedOn") or 0)

    def find_by_tag(self, tag: str) -> dict[str, Any] | None:
        """The newest application carrying ``tag``, or None."""
        data = self._call("list applications", "/ws/v1/cluster/apps", params={"applicationTags": tag})
        apps = (data.get("apps") or {}).get("app") or []
        tagged = [a for a in apps if tag in str(a.get("applicationTags", "")).split(",")]
        return max(tagged, key=lambda a: int(a.get("startedTime", 0))) if tagged else None

    def kill(self, app_id: str, user: str) -> None:
        self._call(
            "kill the application",
            f"/ws/v1/cluster/apps/{app_id}/state",
            "PUT",
            json={"state": "KILLED"},
            params=self._user_params(user),
        )
