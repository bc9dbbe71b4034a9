"""``remote-kernel-operator`` / ``python -m kernel_operator``: run the operator."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any

import kopf


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
        help="e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument(
        "--peering",
        default=os.environ.get("RKO_PEERING"),
        help="a KopfPeering name for several replicas",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    from . import handlers  # noqa: F401  (registers the handlers)
    from .settings import OperatorSettings

    if args.namespace:
        # One source for the handlers too: they read the settings from the environment.
        os.environ["RKO_WATCH_NAMESPACES"] = ",".join(args.namespace)
    namespaces = list(OperatorSettings.from_env().watch_namespaces)
    kopf.configure(verbose=args.verbose)
    # The API client logs whole response bodies at DEBUG, Secrets included: never let it.
    logging.getLogger("kubernetes_asyncio").setLevel(logging.INFO)
    slow_ms = float(os.environ.get("RKO_LOOP_SLOW_CALLBACK_MS") or 0)
    asyncio.run(
        _watched(
            kopf.operator(
                clusterwide=not namespaces,
                namespaces=namespaces,
                liveness_endpoint=args.liveness,
                standalone=not args.peering,
                peering_name=args.peering,  # naming one makes peering mandatory
            ),
            slow_ms,
        ),
        debug=slow_ms > 0,
    )
    return 0


async def _watched(operator: Coroutine[Any, Any, None], slow_ms: float) -> None:
    """Run ``operator``; with ``slow_ms``, asyncio's debug mode reports (as a warning of the
    ``asyncio`` logger) every callback that holds the event loop longer than that."""
    if slow_ms > 0:
        asyncio.get_running_loop().slow_callback_duration = slow_ms / 1000
        logging.getLogger("asyncio").setLevel(logging.WARNING)
    await operator


if __name__ == "__main__":
    sys.exit(main())
