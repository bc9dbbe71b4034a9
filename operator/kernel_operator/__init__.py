"""kernel_operator: the kopf operator that reconciles RemoteKernel resources.

Layers, top to bottom (each imports only those below it):
- ``handlers``: kopf registrations; thin, they read the resource and call ``lifecycle``.
- ``lifecycle``: the phase machine of one kernel (launch, wait, watch, stop).
- ``listener``, ``keys``: the launch handshake's server side and the operator's key pair.
- ``backends``: one module per backend behind the ``Backend`` interface (ssh, kubernetes,
  docker, docker_swarm); no kopf inside. Their manifests come from pure builders
  (``pod_builder``, ``container_config``, ``service_config``).
- ``spec``, ``status``, ``launch_command``, ``balancer``, ``quantities``: pure functions
  (validation, status patches, the launcher's command line, host choice, resource units).
- ``kube``: the one I/O seam to the Kubernetes API besides kopf's own watching.
- ``settings``, ``errors``: configuration read once from the environment; exception types.
"""

GROUP = "kernel-operator.io"
VERSION = "v1alpha1"
PLURAL = "remotekernels"
KIND = "RemoteKernel"
# Which operator handles a RemoteKernel: the one whose RKO_OPERATOR_CLASS equals this label's
# value; kernels without it belong to operators without a class (like an ingress class).
CLASS_LABEL = f"{GROUP}/operator-class"
# Everything the operator creates for a kernel carries its RemoteKernel's metadata.uid here;
# stopping acts only on objects that do (status alone is never trusted to name them).
UID_LABEL = f"{GROUP}/uid"


def finalizer_for(operator_class: str) -> str:
    """The finalizer an operator of ``operator_class`` keeps on its kernels. Per class: kopf
    drops a finalizer of its own name from objects none of its handlers match, so operators of
    two classes sharing one name would strip each other's before cleaning up. Kernels created
    with it already on (pool members; the provisioner's, see its resource.finalizer_name) save
    kopf a write while they launch."""
    return f"{GROUP}/finalizer" + (f"-{operator_class}" if operator_class else "")
