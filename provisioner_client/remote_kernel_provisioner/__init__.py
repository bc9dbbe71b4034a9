"""remote_kernel_provisioner: the jupyter_client kernel provisioner for RemoteKernel resources.

``resource`` builds the RemoteKernel from a kernelspec's provisioner config and the KERNEL_*
environment (pure); ``provisioner`` creates it, watches it until the kernel runs, and turns
jupyter_client's lifecycle calls (poll, signal, restart, shutdown) into operations on it;
``cluster`` is its one I/O seam to Kubernetes. ``kernelspec`` and ``cli`` install kernelspecs
(``remote-kernel-spec``); ``server_extension`` lets a restarted Jupyter Server re-attach to its
running kernels.
"""

from .provisioner import RemoteKernelProvisioner

__all__ = ["RemoteKernelProvisioner"]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """Jupyter Server finds the extension here (``jpserver_extensions``)."""
    return [{"module": "remote_kernel_provisioner.server_extension"}]
