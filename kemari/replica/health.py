"""Standby health: can this standby still keep its replica? (issue 10 items 7 and 8)

A standby that cannot keep its replica any more (its file system is full, its disk
image was deleted, a write to it failed) must not go on acknowledging checkpoints: the
primary would report ``protected`` while a failover would fail or resume the wrong
state.  :class:`StandbyHealth` records the first such problem; the receiver then ends
the session with the reason in its GOODBYE, so the primary drops protection with one
line that says why, and ``info status`` / ``query-status`` show ``health`` and
``health_reason``.

The committed replica stays as it was for a failover.  The next primary that connects
resets the standby: its session starts with a fresh initial sync into a new generation
(the committed one is kept until the new one commits), the standby's images are
reopened from their paths, and the health is ``ok`` again once that sync commits.  A
sync that fails again (still no space, image still missing) ends that session the same
way and changes nothing.

:func:`storage_failure` tells the host's storage failing (an ``OSError`` somewhere in
the cause chain: no space, I/O error, a missing file) from a primary breaking the
protocol, which is not a health problem.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from kemari.errors import ReplicaError

log = logging.getLogger(__name__)

OK = "ok"
FAILED = "failed"


class ReplicaHealthError(ReplicaError):
    """This standby cannot keep its replica (the message says why)."""


def storage_failure(exc: BaseException) -> bool:
    """True when ``exc`` comes from the host's storage (an OSError in its cause chain)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError | ReplicaHealthError):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


@contextlib.contextmanager
def storage(what: str) -> Iterator[None]:
    """Turn a storage failure inside the block into :class:`ReplicaHealthError`."""
    try:
        yield
    except ReplicaHealthError:
        raise
    except Exception as exc:
        if storage_failure(exc):
            raise ReplicaHealthError(f"{what}: {exc}") from exc
        raise


class StandbyHealth:
    """``ok``, or ``failed`` with the reason, since when (Unix time)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.since: float | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def state(self) -> str:
        return OK if self.reason is None else FAILED

    def fail(self, reason: str, epoch: int | None) -> None:
        """Record ``reason`` (logged once, as one line, with the epoch kept for failover)."""
        if self.reason is None:
            self.since = time.time()
        self.reason = reason
        log.error(
            "standby cannot keep its replica: %s; the committed replica stays at epoch %s for "
            "a failover; the next primary's initial sync resets the standby",
            reason,
            epoch,
        )

    def recovered(self, epoch: int | None) -> None:
        """A new initial sync committed: the standby keeps a replica again."""
        if self.reason is not None:
            log.info(
                "standby keeps its replica again (epoch %s); it had failed: %s", epoch, self.reason
            )
        self.reason = None
        self.since = None
