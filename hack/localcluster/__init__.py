"""A local Kubernetes control plane for development and tests.

Runs the ``kcluster`` binary that ``hack/cluster/build.sh`` builds from the Kubernetes Go
modules; owns its PKI, processes and kubeconfigs. No mock: a real etcd and kube-apiserver.
"""

from .cluster import ClusterError, ClusterState, LocalCluster, free_port

__all__ = ["ClusterError", "ClusterState", "LocalCluster", "free_port"]
