"""How long the provisioner waits for a kernel the operator has taken up."""

from __future__ import annotations

from typing import Any


def test_a_kernel_queued_or_launching_by_the_operator_is_waited_for_and_one_never_taken_up_is_not() -> None:
    """In a burst, kernels wait their turn in Pending (RKO_MAX_CONCURRENT_LAUNCHES) and the
    operator's launch deadline counts from when its launch begins: the client gave up on the
    last 24 of 100 after 45 s while the operator was still starting them."""
    from remote_kernel_provisioner.provisioner import QUEUED_MAX_SECONDS, more_time

    def kernel(phase: str) -> dict[str, Any]:
        return {"status": {"phase": phase}} if phase else {}

    assert more_time(kernel("Pending"), 45, 45) == 45
    assert more_time(kernel("Launching"), 45, 90) == 45
    assert more_time(kernel(""), 45, 45) is None  # no operator took it up
    assert more_time(None, 45, 45) is None  # deleted meanwhile
    assert more_time(kernel("Pending"), 45, QUEUED_MAX_SECONDS) is None  # queued for too long
    assert more_time(kernel("Launching"), 45, QUEUED_MAX_SECONDS + 45) is None
