"""Manual failover on the standby: QEMU started from the committed replica (docs/failover.md)."""

from kemari.failover.failover import (
    FailoverResult,
    FailoverTimings,
    LoadedMachine,
    fail_over,
    failover_spec,
    hand_over_replica,
    load_replica,
    resume_guest,
    start_from_image,
    with_hand_over_time,
)

__all__ = [
    "FailoverResult",
    "FailoverTimings",
    "LoadedMachine",
    "fail_over",
    "failover_spec",
    "hand_over_replica",
    "load_replica",
    "resume_guest",
    "start_from_image",
    "with_hand_over_time",
]
