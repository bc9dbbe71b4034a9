"""remote_kernel_provisioner: the jupyter_client kernel provisioner for RemoteKernel resources.

``resource`` builds the RemoteKernel from a kernelspec's provisioner config and the KERNEL_*
environment (pure); ``provisioner`` creates it, watches it until the kernel runs, and turns
jupyter_client's lifecycle calls (poll, signal, restart, shutdown) into operations on it.
"""

from .provisioner import RemoteKernelProvisioner

__all__ = ["RemoteKernelProvisioner"]
