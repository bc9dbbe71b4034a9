"""``remote-kernel-operator`` / ``python -m kernel_operator``: run one replica of the operator."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any

# Client libraries the operator does not use: kopf imports any it finds (to recognise their
# objects and to log in through them), and together they cost ~60 MB of the operator's memory.
# The operator logs in itself (kube_auth) and speaks plain JSON (kube_http).
UNUSED_CLIENTS = ("kubernetes", "kubernetes_asyncio", "pykube")


def skip_unused_clients() -> None:
    """Make importing UNUSED_CLIENTS fail in this process (before kopf is imported)."""
    for name in UNUSED_CLIENTS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: "import fails"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="remote-kernel-operator", description="Run the Remote Kernel Operator."
    )
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=None,
        help="watch only this namespace (repeatable; default RKO_WATCH_NAMESPACES, else all)",
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("RKO_LIVENESS_ENDPOINT"),
        help="kopf's own liveness endpoint, e.g. http://0.0.0.0:8080/healthz (the leader only; "
        "RKO_HTTP_BIND serves probes and metrics on every replica)",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    from .memory import limit_malloc_arenas

    limit_malloc_arenas()  # before any thread starts
    skip_unused_clients()
    import kopf

    from . import handlers
    from .log_format import use_json_logs
    from .settings import OperatorSettings

    if args.namespace:
        # One source for the handlers too: they read the settings from the environment.
        os.environ["RKO_WATCH_NAMESPACES"] = ",".join(args.namespace)
    cfg = OperatorSettings.from_env()
    kopf.configure(verbose=args.verbose)
    if cfg.log_format == "json":
        use_json_logs()
    slow_ms = float(os.environ.get("RKO_LOOP_SLOW_CALLBACK_MS") or 0)
    asyncio.run(_watched(_replica(cfg, args.liveness, handlers), slow_ms), debug=slow_ms > 0)
    return 0


async def _replica(cfg: Any, liveness: str | None, handlers: Any) -> None:
    import kopf

    from .runtime import run_replica, start_replica

    replica = await start_replica(cfg, handlers.class_selector(handlers.OPERATOR_CLASS), handlers.KOPF_PREFIX)
    namespaces = list(cfg.watch_namespaces)

    async def operator(stop: asyncio.Event) -> None:
        await kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=liveness,
            standalone=True,  # one replica leads at a time (the Lease); kopf's peering is not used
            memo=kopf.Memo(ctx=replica.ctx, stop=stop),
            stop_flag=stop,
        )

    await run_replica(replica, operator)


async def _watched(operator: Coroutine[Any, Any, None], slow_ms: float) -> None:
    """Run ``operator``; with ``slow_ms``, asyncio's debug mode reports (as a warning of the
    ``asyncio`` logger) every callback that holds the event loop longer than that."""
    if slow_ms > 0:
        asyncio.get_running_loop().slow_callback_duration = slow_ms / 1000
        logging.getLogger("asyncio").setLevel(logging.WARNING)
    await operator


if __name__ == "__main__":
    sys.exit(main())
