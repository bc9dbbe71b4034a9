"""What a user does next, for every reason a kernel fails (shown in its Warning Events, so
``kubectl describe rk`` says it beside the cause). A unit test keeps every reason the operator
can write listed here; reasons that come from elsewhere (a pod's, say) get the default."""

from __future__ import annotations

ASK_ADMIN = "Ask the cluster administrator"
RECREATE = "then delete the RemoteKernel and create it again (or restart the kernel in Jupyter)"

NEXT_STEPS: dict[str, str] = {
    # The request itself: the tenant fixes it.
    "InvalidSpec": f"Fix the field the message names, {RECREATE}.",
    "InvalidMemory": f"Give the memory as a Kubernetes quantity (e.g. 2Gi), {RECREATE}.",
    "InvalidPortRange": f"Give the port range as LOW..HIGH inside the profile's range, {RECREATE}.",
    "InvalidQueue": f"Name a YARN queue the profile allows, {RECREATE}.",
    "InvalidNodeLabel": f"Name a YARN node label the profile allows, {RECREATE}.",
    "InvalidSparkOptions": f"Drop the Spark options the message names (the profile owns them), {RECREATE}.",
    "InvalidTemplate": f"{ASK_ADMIN} to fix the profile's template the message names, {RECREATE}.",
    "ExceedsProfile": f"Ask for no more than the profile's maxima (kubectl get rkprofile -o yaml), {RECREATE}.",
    "EnvNotAllowed": f"Remove the variables the profile does not allow from spec.env, {RECREATE}.",
    "ImageNotAllowed": f"Use an image the profile allows, or none (the profile's), {RECREATE}.",
    "HostNotAllowed": f"Use a host the profile lists, or none (the operator picks one), {RECREATE}.",
    "QueueNotAllowed": f"Use a queue the profile allows, {RECREATE}.",
    "EndpointNotAllowed": f"Use no endpoint (the profile's) or one the operator allows, {RECREATE}.",
    "LanguageNotSupported": f"Use a language the backend runs (python, r), {RECREATE}.",
    "Unauthorized": "This user may not run kernels here; use your own username, or ask the administrator to allow it.",
    "UnknownUser": "The user does not exist on the backend's hosts; ask the administrator to create it there.",
    "EncryptionRequired": "Start the kernel from a client that supports CurveZMQ (a jupyter_client with pyzmq and libsodium).",
    "KernelIdInUse": "Use a new kernel id (another RemoteKernel holds this one).",
    # Profiles: the administrator's objects.
    "ProfileNotFound": f"Name an existing RemoteKernelProfile (kubectl get rkprofiles), {RECREATE}.",
    "ProfileNotAllowed": f"Name a profile that serves this namespace, or {ASK_ADMIN.lower()} to extend its namespaceSelector.",
    "ProfileAmbiguous": f"Name a profile in spec.profile (several defaults serve this namespace), {RECREATE}.",
    "ProfileInvalid": f"{ASK_ADMIN} to fix the profile the message names.",
    "PoolNeedsUser": f"{ASK_ADMIN} to give the pool a username (kernels run as their user on this backend).",
    "ImpersonationRefused": f"{ASK_ADMIN}: the profile does not allow running kernels as their users.",
    "ImpersonationUnsupported": f"{ASK_ADMIN}: this backend cannot run kernels as their users here.",
    "BackendNotAvailable": f"{ASK_ADMIN} to configure the backend the profile names, or use another profile.",
    "YarnNotConfigured": f"{ASK_ADMIN} to set RKO_YARN_ENDPOINT for the operator.",
    "KerberosUnavailable": f"{ASK_ADMIN} to provide the operator's Kerberos credentials for YARN.",
    "SshSecretMissing": f"{ASK_ADMIN} to create the ssh Secret the operator is configured with.",
    "SshKeyInvalid": f"{ASK_ADMIN} to fix the private key in the operator's ssh Secret.",
    "SshAuthFailed": f"{ASK_ADMIN}: the operator's key is not authorized on the host.",
    "UnknownHostKey": f"{ASK_ADMIN} to add the host's key to the operator's known_hosts.",
    "HostKeyMismatch": f"{ASK_ADMIN}: the host's key changed; check the host before trusting its new key.",
    "PodSecurityViolation": f"{ASK_ADMIN} to fix the profile's pod template for the namespace's Pod Security level.",
    "ImageMissing": f"{ASK_ADMIN} to set a kernel image in the profile (or RKO_KERNEL_IMAGE).",
    "NamespaceFailed": f"{ASK_ADMIN}: the kernel's own namespace could not be made (see the message), {RECREATE}.",
    # The backend, at launch: often transient.
    "HostUnreachable": f"Check that the host is up and reachable from the operator, {RECREATE}.",
    "HostBusy": f"Wait for kernels on the hosts to finish, or {ASK_ADMIN.lower()} to add hosts; {RECREATE}.",
    "NoHostAvailable": f"Wait until a host is back, or {ASK_ADMIN.lower()} to add hosts; {RECREATE}.",
    "RunDirUnavailable": f"{ASK_ADMIN} to remove the run directory the message names on the host, {RECREATE}.",
    "LaunchFailed": f"Read the message (and the launcher's log on the backend), {RECREATE}.",
    "LaunchTimeout": (
        "Check the launcher's log (the message ends with it) and that the backend reaches the operator's "
        f"response address; raise spec.launchTimeoutSeconds for slow backends, {RECREATE}."
    ),
    "LaunchLost": f"{RECREATE[0].upper()}{RECREATE[1:]}.",
    "PodCreateFailed": f"Read the API server's reason in the message (quota, admission, RBAC), {RECREATE}.",
    "PodListFailed": f"{ASK_ADMIN} to check the operator's rights on pods, {RECREATE}.",
    "ObjectReadFailed": f"{ASK_ADMIN} to check the operator's rights on the custom object, {RECREATE}.",
    "ImageNotFound": f"Use an image the nodes have or can pull, {RECREATE}.",
    "SparkSubmitFailed": f"Read spark-submit's output in the message, {RECREATE}.",
    "YarnRequestRefused": f"Read the ResourceManager's reason in the message (queue, memory, user), {RECREATE}.",
    "ResourceManagerUnreachable": f"Check that the YARN ResourceManager is up and reachable, {RECREATE}.",
    "ResourceManagerRecovering": "Wait for the ResourceManager to finish recovering; the operator retries.",
    "ApplicationUnknown": f"The YARN application is gone (the ResourceManager lost it), {RECREATE}.",
    "BackendUnavailable": f"The backend could not be reached; check it, {RECREATE}.",
    "BackendError": f"Read the message, {RECREATE}.",
    "BackendRefIncomplete": f"The kernel's record was cut short (the operator stopped mid-launch), {RECREATE}.",
    # The kernel, once running.
    "KernelFailed": f"The kernel process ended with an error; check your code's memory and the message, {RECREATE}.",
    "KernelExited": "The kernel exited (a shutdown or exit()); start a new one when needed.",
    "PodDeleted": f"The kernel's pod was deleted (or its node was lost), {RECREATE}.",
    "ContainerGone": f"The kernel's container was removed, {RECREATE}.",
    "ServiceGone": f"The kernel's Swarm service was removed, {RECREATE}.",
    "ObjectDeleted": f"The kernel's custom object was deleted, {RECREATE}.",
    "ApplicationDeleted": f"The kernel's YARN application was killed or removed, {RECREATE}.",
    "ApplicationFinished": "The YARN application finished; start a new kernel when needed.",
    "ApplicationCompleted": "The YARN application completed; start a new kernel when needed.",
    "ApplicationFailed": f"The YARN application failed; read its diagnostics in the message, {RECREATE}.",
    "ApplicationKilled": f"The YARN application was killed (by a user or the ResourceManager), {RECREATE}.",
    "ContainerFailed": f"The kernel's container failed; read its exit reason in the message, {RECREATE}.",
    "ObjectFailed": f"The kernel's custom object reports a failure (see the message), {RECREATE}.",
    "TaskFailed": f"The kernel's Swarm task failed; read its error in the message, {RECREATE}.",
    "ProcessGone": f"The kernel's process is gone from its host (killed, or the host rebooted), {RECREATE}.",
    "NodeLost": f"The kernel's node is lost; its pod cannot be reached, {RECREATE}.",
    "QueueFull": f"The YARN queue has no room now; wait, or use another queue the profile allows, {RECREATE}.",
    "PooledKernelUnresponsive": "Nothing to do: the pool replaces the kernel.",
    "StopFailed": "The operator retries stopping the kernel; if it keeps failing, check the backend.",
    "StopPending": "The operator retries stopping the kernel.",
    "StopAbandoned": f"{ASK_ADMIN} to stop the processes the message names on the backend by hand.",
    "MemberFailed": "Nothing to do unless it repeats: the pool launches another (see the pool's Ready condition).",
    "CreateFailed": f"{ASK_ADMIN} to check the pool's template and the operator's rights.",
}

DEFAULT = f"Read the message and the operator's log, {RECREATE} once the cause is fixed."


def next_step(reason: str) -> str:
    return NEXT_STEPS.get(reason, DEFAULT)


def with_next_step(reason: str, message: str) -> str:
    """An Event's text: the cause, then what to do."""
    return f"{message.rstrip()} Next: {next_step(reason)}"
