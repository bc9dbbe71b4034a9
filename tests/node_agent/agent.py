"""A small node agent: a stand-in kubelet that runs the pods bound to its node as Docker containers.

It registers a Ready Node with the node's own credentials (system:node:<name>, so Node
authorization and NodeRestriction apply), renews its Lease, runs each pod bound to it as a
container on the host network (image, command, args, env, workingDir, user, cpu and memory
limits), and reports pod status as a kubelet does: Pending/ContainerCreating, ErrImagePull and
ImagePullBackOff for an image that is not present, Running with podIP and containerStatuses,
Failed/Succeeded with exit codes. A deleted pod's container is stopped, then the pod is removed.
Only the first container of a pod is run (kernel pods have one); restartPolicy is Never.

Enough of the kubelet for an in-cluster client: emptyDir volumes, and the projected volume the
ServiceAccount admission plugin adds (a pod-bound token from the TokenRequest API, the cluster's
CA from the kube-root-ca.crt ConfigMap, the namespace), with KUBERNETES_SERVICE_HOST/PORT naming
the API server itself, since there is no service proxy. The container's securityContext is
applied (user, read-only root filesystem, dropped capabilities, no privilege escalation,
runAsNonRoot checked against the image). Not done: token renewal (tokens last an hour, longer
than any test), probes, restarts, other volume types (the pod fails with a clear reason).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import urllib3
from docker.errors import APIError, ImageNotFound, NotFound
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from kernel_operator.quantities import cpu_nanos, memory_bytes

log = logging.getLogger("node-agent")
LABEL_UID = "node-agent.kernel-operator.io/pod-uid"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion in command and args ($$ is a literal $)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, text)


class NodeAgent:
    def __init__(self, api: client.ApiClient, node_name: str, address: str, docker_host: str) -> None:
        self.core = client.CoreV1Api(api)
        server = urlsplit(api.configuration.host)
        self.api_host, self.api_port = server.hostname or "127.0.0.1", str(server.port or 443)
        self.volumes_dir = Path(tempfile.mkdtemp(prefix="node-agent-volumes-"))
        self.coordination = client.CoordinationV1Api(api)
        self.node = node_name
        self.address = address
        self.docker = docker.DockerClient(base_url=docker_host)
        self.stopping = threading.Event()
        self.known: dict[str, dict[str, Any]] = {}  # pod uid -> {namespace, name, container id}
        self.lock = threading.Lock()

    # -- the node -------------------------------------------------------------------------------
    def register(self) -> None:
        capacity = {"cpu": str(os.cpu_count() or 2), "memory": "16Gi", "pods": "110"}
        body = {
            "metadata": {
                "name": self.node,
                "labels": {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux"},
            },
            "spec": {},
        }
        try:
            self.core.create_node(body)
        except ApiException as err:
            if err.status != 409:
                raise
        self.core.patch_node_status(
            self.node,
            {
                "status": {
                    "capacity": capacity,
                    "allocatable": capacity,
                    "addresses": [
                        {"type": "InternalIP", "address": self.address},
                        {"type": "Hostname", "address": self.node},
                    ],
                    "conditions": [self._ready_condition()],
                    "nodeInfo": {
                        "kubeletVersion": "v1.37.2",
                        "containerRuntimeVersion": "docker://" + self.docker.version().get("Version", "?"),
                        "operatingSystem": "linux",
                        "architecture": "amd64",
                        "machineID": "",
                        "systemUUID": "",
                        "bootID": "",
                        "kernelVersion": os.uname().release,
                        "osImage": "node-agent",
                        "kubeProxyVersion": "",
                    },
                }
            },
        )
        log.info("Registered node %s.", self.node)

    def _ready_condition(self) -> dict[str, str]:
        stamp = now()
        return {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "node agent is posting ready status",
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }

    def heartbeat(self) -> None:
        while not self.stopping.wait(5):
            try:
                self.core.patch_node_status(self.node, {"status": {"conditions": [self._ready_condition()]}})
                self._renew_lease()
            except ApiException as err:
                log.warning("Heartbeat failed: %s", err.reason)
            except (urllib3.exceptions.HTTPError, OSError) as err:
                log.warning("Heartbeat failed: %s", err)

    def _renew_lease(self) -> None:
        spec = {
            "holderIdentity": self.node,
            "leaseDurationSeconds": 40,
            "renewTime": dt.datetime.now(dt.timezone.utc),
        }
        try:
            self.coordination.patch_namespaced_lease(self.node, "kube-node-lease", {"spec": spec})
        except ApiException as err:
            if err.status != 404:
                raise
            self.coordination.create_namespaced_lease(
                "kube-node-lease", {"metadata": {"name": self.node}, "spec": spec}
            )

    # -- pods -----------------------------------------------------------------------------------
    def watch_pods(self) -> None:
        while not self.stopping.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=f"spec.nodeName={self.node}",
                    timeout_seconds=30,
                ):
                    if self.stopping.is_set():
                        break
                    pod = event["object"]
                    try:
                        self.sync(pod, deleted=event["type"] == "DELETED")
                    except Exception:  # one bad pod must not stop the node
                        log.exception("Syncing pod %s/%s failed.", pod.metadata.namespace, pod.metadata.name)
            except ApiException as err:
                log.warning("The pod watch failed (%s); watching again.", err.reason)
                time.sleep(1)
            except (urllib3.exceptions.HTTPError, OSError) as err:
                # The API server went away (a restart, as a kubelet sees them): watch again.
                log.warning("The pod watch was cut (%s); watching again.", err)
                time.sleep(1)
            finally:
                stream.stop()

    def sync(self, pod: client.V1Pod, deleted: bool = False) -> None:
        uid = pod.metadata.uid
        if deleted or pod.metadata.deletion_timestamp:
            self.remove(pod)
            return
        with self.lock:
            if uid in self.known:
                return
            self.known[uid] = {
                "namespace": pod.metadata.namespace,
                "name": pod.metadata.name,
                "container": None,
            }
        threading.Thread(target=self.start_pod, args=(pod,), daemon=True).start()

    def set_status(self, pod: client.V1Pod, status: dict[str, Any]) -> None:
        try:
            self.core.patch_namespaced_pod_status(
                pod.metadata.name, pod.metadata.namespace, {"status": status}
            )
        except ApiException as err:
            if err.status != 404:
                log.warning("Updating pod %s status failed: %s", pod.metadata.name, err.reason)

    def pod_status(
        self,
        pod: client.V1Pod,
        phase: str,
        state: dict[str, Any],
        container_id: str | None = None,
        ready_reason: str = "",
        image_id: str = "",
        **extra: Any,
    ) -> dict[str, Any]:
        """A pod status as a kubelet writes it, for a pod's one container in ``state``."""
        container = pod.spec.containers[0]
        ready = "running" in state
        ready_condition: dict[str, str] = {"type": "Ready", "status": "True" if ready else "False"}
        if ready_reason:
            ready_condition["reason"] = ready_reason
        container_status: dict[str, Any] = {
            "name": container.name,
            "image": container.image,
            "imageID": image_id,
            "ready": ready,
            "restartCount": 0,
            "state": state,
        }
        if ready:
            container_status["started"] = True
        if container_id:
            container_status["containerID"] = f"docker://{container_id}"
        return {
            "phase": phase,
            "hostIP": self.address,
            "conditions": [{"type": "PodScheduled", "status": "True"}, ready_condition],
            "containerStatuses": [container_status],
            **extra,
        }

    def _waiting(self, pod: client.V1Pod, reason: str, message: str = "") -> None:
        waiting = {"waiting": {"reason": reason, "message": message}}
        self.set_status(pod, self.pod_status(pod, "Pending", waiting, ready_reason="ContainersNotReady"))

    def _fields(self, pod: client.V1Pod) -> dict[str, str]:
        """What the downward API may name, for env variables and volume files alike."""
        return {
            "metadata.name": pod.metadata.name,
            "metadata.namespace": pod.metadata.namespace,
            "metadata.uid": pod.metadata.uid,
            "spec.nodeName": self.node,
            "spec.serviceAccountName": pod.spec.service_account_name or "default",
            "status.podIP": self.address,
            "status.hostIP": self.address,
        }

    def _env(self, pod: client.V1Pod, container: client.V1Container) -> dict[str, str]:
        env: dict[str, str] = {}
        fields = self._fields(pod)
        for var in container.env or []:
            if var.value_from is None:
                env[var.name] = var.value or ""
            elif var.value_from.field_ref is not None:
                env[var.name] = fields.get(var.value_from.field_ref.field_path, "")
            elif var.value_from.secret_key_ref is not None:
                ref = var.value_from.secret_key_ref
                secret = self.core.read_namespaced_secret(ref.name, pod.metadata.namespace)
                import base64

                env[var.name] = base64.b64decode((secret.data or {})[ref.key]).decode()
        return env

    # -- volumes ---------------------------------------------------------------------------------
    def _project(self, pod: client.V1Pod, projected: Any, target: Path) -> None:
        """Write a projected volume's files: service-account token, ConfigMap keys, downward API."""
        target.mkdir(parents=True, exist_ok=True)
        for source in projected.sources or []:
            if source.service_account_token is not None:
                spec = source.service_account_token
                request = client.AuthenticationV1TokenRequest(
                    spec=client.V1TokenRequestSpec(
                        audiences=[spec.audience] if spec.audience else [],
                        expiration_seconds=spec.expiration_seconds or 3600,
                        bound_object_ref=client.V1BoundObjectReference(
                            api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
                        ),
                    )
                )
                token = self.core.create_namespaced_service_account_token(
                    pod.spec.service_account_name or "default", pod.metadata.namespace, request
                )
                (target / spec.path).write_text(token.status.token)
            elif source.config_map is not None:
                data = (
                    self.core.read_namespaced_config_map(source.config_map.name, pod.metadata.namespace).data
                    or {}
                )
                for item in source.config_map.items or [client.V1KeyToPath(key=k, path=k) for k in data]:
                    (target / item.path).write_text(data[item.key])
            elif source.downward_api is not None:
                fields = self._fields(pod)
                for item in source.downward_api.items or []:
                    (target / item.path).write_text(fields[item.field_ref.field_path])
        for path in target.iterdir():
            path.chmod(0o644)  # the kubelet's default mode; the container's user reads them

    def _mounts(self, pod: client.V1Pod, container: client.V1Container) -> dict[str, dict[str, str]]:
        """Host directories for the container's volume mounts, as Docker bind mounts."""
        volumes = {v.name: v for v in pod.spec.volumes or []}
        binds: dict[str, dict[str, str]] = {}
        for mount in container.volume_mounts or []:
            volume = volumes[mount.name]
            path = self.volumes_dir / pod.metadata.uid / mount.name
            if volume.empty_dir is not None:
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o1777)  # any user the pod runs as may write, as on a real node
            elif volume.projected is not None:
                self._project(pod, volume.projected, path)
            else:
                raise ValueError(f"volume {mount.name}: only emptyDir and projected volumes are supported")
            mode = "ro" if mount.read_only or volume.projected is not None else "rw"
            binds[str(path)] = {"bind": mount.mount_path, "mode": mode}
        return binds

    def _security(self, pod: client.V1Pod, container: client.V1Container) -> dict[str, Any]:
        """Docker options for the pod's and container's securityContext (the container's wins)."""
        pod_sc = pod.spec.security_context or client.V1PodSecurityContext()
        sc = container.security_context or client.V1SecurityContext()
        uid = sc.run_as_user if sc.run_as_user is not None else pod_sc.run_as_user
        gid = sc.run_as_group if sc.run_as_group is not None else pod_sc.run_as_group
        non_root = sc.run_as_non_root if sc.run_as_non_root is not None else pod_sc.run_as_non_root
        if non_root:
            image_user = (self.docker.images.get(container.image).attrs["Config"].get("User") or "").split(
                ":"
            )[0]
            effective = str(uid) if uid is not None else image_user
            if effective in ("", "0", "root"):
                raise ValueError("container has runAsNonRoot and image will run as root")
        options: dict[str, Any] = {
            "user": None if uid is None else f"{uid}:{gid if gid is not None else uid}",
            "read_only": bool(sc.read_only_root_filesystem),
        }
        if sc.capabilities is not None:
            options["cap_drop"] = sc.capabilities.drop or None
            options["cap_add"] = sc.capabilities.add or None
        if sc.allow_privilege_escalation is False:
            options["security_opt"] = ["no-new-privileges"]
        return options

    def start_pod(self, pod: client.V1Pod) -> None:
        container = pod.spec.containers[0]
        self._waiting(pod, "ContainerCreating")
        try:
            self.docker.images.get(container.image)
        except ImageNotFound:
            # No registry is reachable from here: an image that is not present cannot be pulled.
            message = f'Failed to pull image "{container.image}": not present on the node and no registry is reachable'
            self._waiting(pod, "ErrImagePull", message)
            time.sleep(1)
            self._waiting(pod, "ImagePullBackOff", f'Back-off pulling image "{container.image}"')
            return
        limits = (container.resources.limits if container.resources else None) or {}
        env = {
            # No service proxy here: the in-cluster client talks to the API server directly.
            "KUBERNETES_SERVICE_HOST": self.api_host,
            "KUBERNETES_SERVICE_PORT": self.api_port,
            **self._env(pod, container),
        }
        try:
            security = self._security(pod, container)
            mounts = self._mounts(pod, container)
        except (ValueError, ApiException, KeyError) as err:
            self._waiting(pod, "CreateContainerConfigError", str(err))
            return
        try:
            created = self.docker.containers.create(
                container.image,
                entrypoint=[expand(c, env) for c in container.command] if container.command else None,
                command=[expand(a, env) for a in container.args] if container.args else None,
                environment=env,
                working_dir=container.working_dir,
                network_mode="host",
                volumes=mounts,
                **security,
                labels={LABEL_UID: pod.metadata.uid, "io.kubernetes.pod.name": pod.metadata.name},
                name=f"k8s_{pod.metadata.namespace}_{pod.metadata.name}_{pod.metadata.uid[:8]}",
                nano_cpus=cpu_nanos(str(limits["cpu"])) if "cpu" in limits else None,
                mem_limit=memory_bytes(str(limits["memory"])) if "memory" in limits else None,
            )
            created.start()
        except APIError as err:
            self._waiting(pod, "CreateContainerError", str(err.explanation or err))
            return
        with self.lock:
            entry = self.known.get(pod.metadata.uid)
            if entry is None:  # deleted meanwhile
                created.remove(force=True)
                return
            entry["container"] = created.id
        started = now()
        running = {"running": {"startedAt": started}}
        status = self.pod_status(
            pod,
            "Running",
            running,
            created.id,
            image_id=created.image.id,
            podIP=self.address,
            podIPs=[{"ip": self.address}],
            startTime=started,
        )
        self.set_status(pod, status)
        log.info(
            "Pod %s/%s runs as container %s.", pod.metadata.namespace, pod.metadata.name, created.short_id
        )
        self._wait_exit(pod, created)

    def _wait_exit(self, pod: client.V1Pod, created: Any) -> None:
        try:
            result = created.wait()
        except (APIError, NotFound):
            return
        with self.lock:
            if pod.metadata.uid not in self.known:
                return  # stopped because the pod was deleted: nothing to report
        code = int(result.get("StatusCode", 1))
        terminated = {
            "terminated": {
                "exitCode": code,
                "reason": "Completed" if code == 0 else "Error",
                "finishedAt": now(),
            }
        }
        phase = "Succeeded" if code == 0 else "Failed"
        self.set_status(pod, self.pod_status(pod, phase, terminated, created.id, ready_reason="PodCompleted"))

    def remove(self, pod: client.V1Pod) -> None:
        with self.lock:
            entry = self.known.pop(pod.metadata.uid, None)
        for found in self.docker.containers.list(
            ignore_removed=True, all=True, filters={"label": f"{LABEL_UID}={pod.metadata.uid}"}
        ):
            try:
                found.stop(timeout=min(int(pod.metadata.deletion_grace_period_seconds or 5), 10))
                found.remove(force=True)
            except (APIError, NotFound):
                pass
        shutil.rmtree(self.volumes_dir / pod.metadata.uid, ignore_errors=True)
        if entry is not None or pod.metadata.deletion_timestamp:
            # As the kubelet does: confirm the graceful deletion once the containers are gone.
            log.info(
                "Pod %s/%s is deleted; its containers are stopped.", pod.metadata.namespace, pod.metadata.name
            )
            try:
                # Grace 0 in the body: with a body, the API server ignores the query parameter.
                self.core.delete_namespaced_pod(
                    pod.metadata.name,
                    pod.metadata.namespace,
                    body=client.V1DeleteOptions(
                        grace_period_seconds=0, preconditions=client.V1Preconditions(uid=pod.metadata.uid)
                    ),
                )
            except ApiException as err:
                if err.status != 404:
                    log.warning(
                        "Confirming the deletion of pod %s failed: %s %s",
                        pod.metadata.name,
                        err.status,
                        err.body,
                    )

    def shutdown(self) -> None:
        """Stop every container this node runs (a node going away)."""
        self.stopping.set()
        for found in self.docker.containers.list(ignore_removed=True, all=True, filters={"label": LABEL_UID}):
            with contextlib.suppress(APIError, NotFound):
                found.remove(force=True)
        shutil.rmtree(self.volumes_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--docker-host", default=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s node-agent %(levelname)s %(message)s")
    api = config.new_client_from_config(config_file=args.kubeconfig)
    agent = NodeAgent(api, args.node_name, args.address, args.docker_host)
    agent.register()
    signal.signal(signal.SIGTERM, lambda *_: agent.stopping.set())
    threading.Thread(target=agent.heartbeat, daemon=True).start()
    threading.Thread(target=agent.watch_pods, daemon=True).start()
    agent.stopping.wait()
    agent.shutdown()
    log.info("Node agent %s stopped.", args.node_name)


if __name__ == "__main__":
    main()
