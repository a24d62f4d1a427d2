"""Manual failover on the standby: QEMU started from the committed replica (docs/failover.md)."""

from kemari.failover.failover import (
    FailoverResult,
    FailoverTimings,
    fail_over,
    failover_spec,
    start_from_image,
)

__all__ = [
    "FailoverResult",
    "FailoverTimings",
    "fail_over",
    "failover_spec",
    "start_from_image",
]
