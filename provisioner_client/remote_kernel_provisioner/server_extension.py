"""A Jupyter Server extension: a restarted server gets its running remote kernels back.

Enable it with ``--ServerApp.jpserver_extensions=remote_kernel_provisioner=True`` (or
the same in jupyter_server_config). At start-up it lists the RemoteKernels labelled with this
server's name (``JUPYTER_SERVER_NAME``, else the host name; the provisioner sets the label) in
the namespaces its remote kernelspecs use, and starts each running one again by its kernel id:
the provisioner then attaches instead of launching, so /api/kernels lists it, its websocket
works, and restart and shutdown behave as for any kernel. Public APIs only: jupyter_server's
kernel manager ``start_kernel(kernel_id=…)`` and the provisioner's own attach. At load it also
makes the process's key for sealed connections, so the server's first kernel needs no Secret
read, and turns Nagle's delay off on kernel websockets (websocket.py) unless the server names a
websocket connection class of its own.

A server stopped gracefully shuts its kernels down first (jupyter_server's behaviour); one
that crashed, was killed or lost its pod leaves them running, and they come back here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager

from .client_key import PROCESS_KEY
from .cluster import ClusterError, RemoteKernels
from .resource import KERNEL_NAME_LABEL, SERVER_LABEL, label_value, server_name_from_env

PROVISIONER = "remote-kernel"


def remote_targets(specs: dict[str, Any]) -> set[tuple[str, str | None]]:
    """(namespace, kubeconfig) of every kernelspec that uses our provisioner."""
    targets = set()
    for spec in specs.values():
        provisioner = (spec.get("spec", {}).get("metadata") or {}).get("kernel_provisioner") or {}
        if provisioner.get("provisioner_name") != PROVISIONER:
            continue
        config = provisioner.get("config") or {}
        namespace = config.get("namespace") or os.environ.get("KERNEL_NAMESPACE", "default")
        targets.add((str(namespace), config.get("kubeconfig")))
    return targets


def kernels_to_attach(items: Iterable[dict[str, Any]], known: set[str]) -> list[tuple[str, str, str]]:
    """(kernel id, kernel name, user) of each running RemoteKernel the server does not know yet."""
    found = []
    for item in items:
        meta, spec, status = item["metadata"], item.get("spec") or {}, item.get("status") or {}
        kernel_id = str(spec.get("kernelId", ""))
        name = (meta.get("labels") or {}).get(KERNEL_NAME_LABEL)
        if (
            status.get("phase") != "Running"
            or meta.get("deletionTimestamp")
            or not name
            or kernel_id in known
        ):
            continue
        found.append((kernel_id, str(name), str(spec.get("username", ""))))
    return found


async def reattach_kernels(serverapp: Any, server_name: str | None = None) -> list[str]:
    """Start every running RemoteKernel of this server again by id; returns the ids attached."""
    kernel_manager, log = serverapp.kernel_manager, serverapp.log
    selector = f"{SERVER_LABEL}={label_value(server_name or server_name_from_env())}"
    attached: list[str] = []
    for namespace, kubeconfig in sorted(remote_targets(KernelSpecManager().get_all_specs()), key=str):
        api = await RemoteKernels.connect(namespace, kubeconfig)
        try:
            items = await api.list(selector)
        except ClusterError as err:
            log.warning("Cannot list the remote kernels in %s to re-attach them: %s", namespace, err)
            continue
        finally:
            await api.close()
        found = kernels_to_attach(items, set(kernel_manager.list_kernel_ids()))
        log.info(
            "Found %d running remote kernel(s) of this server (%s) in %s.", len(found), selector, namespace
        )
        for kernel_id, kernel_name, user in found:
            env = {**os.environ, "KERNEL_USERNAME": user}
            try:
                await kernel_manager.start_kernel(kernel_id=kernel_id, kernel_name=kernel_name, env=env)
            except Exception as err:  # one kernel that cannot come back must not stop the others
                log.warning("Could not re-attach remote kernel %s (%s): %s", kernel_id, kernel_name, err)
                continue
            log.info("Re-attached the running remote kernel %s (%s, user %s).", kernel_id, kernel_name, user)
            attached.append(kernel_id)
    return attached


def use_nodelay_websockets(serverapp: Any) -> bool:
    """Serve kernel websockets with NoDelayKernelConnection, if the server uses jupyter_server's
    own connection class and its configuration does not name one; True if it does now."""
    from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

    from .websocket import NoDelayKernelConnection

    configured = "kernel_websocket_connection_class" in (serverapp.config.get("ServerApp") or {})
    settings = serverapp.web_app.settings
    if configured or settings.get("kernel_websocket_connection_class") is not ZMQChannelsWebsocketConnection:
        return False
    settings["kernel_websocket_connection_class"] = NoDelayKernelConnection
    serverapp.kernel_websocket_connection_class = NoDelayKernelConnection
    return True


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Make this process's key for sealed connections (client_key.py) before the server
    serves, so even its first kernel reads no Secret; the re-attaching is in the start hook.

    Made here, not in a background thread: on a loaded machine a thread could still be making
    it when the first kernel is asked for (seen in CI), and ~20 ms once at server start-up is
    cheaper than one Secret read on a kernel's path."""
    if PROCESS_KEY.wait(timeout=10.0) is None:
        serverapp.log.warning(
            "No key for sealed connections: kernels' connections will be read from Secrets."
        )
    if use_nodelay_websockets(serverapp):
        serverapp.log.info("Kernel websockets send each message at once (TCP_NODELAY).")


async def _start_jupyter_server_extension(serverapp: Any) -> None:
    """Runs once the server's event loop is up (jupyter_server's start hook)."""
    try:
        await reattach_kernels(serverapp)
    except Exception as err:  # never take the server down over it
        serverapp.log.error("Re-attaching remote kernels failed: %s", err)
