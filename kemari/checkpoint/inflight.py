"""The window of checkpoints in flight: captured (the guest may resume) but not yet acknowledged.

Pure bookkeeping, no I/O (docs/protocol.md, "Pipelined checkpoints").  The source adds
checkpoint N once it is captured (its state read, its outputs and COMMIT queued to the
standby) and removes it when the standby's COMMIT_ACK of N arrives.  Rules:

* Epochs enter in increasing order and leave in the same order: the ack of N is only
  accepted while N is the oldest in flight (the standby commits in order).
* The guest may resume from the newest checkpoint only while the window is within its
  bounds (:attr:`InflightWindow.resume_allowed`): at most ``max_count`` checkpoints, and at
  most ``max_bytes`` of their bytes unless it holds one checkpoint only (a single large
  checkpoint still goes alone).  ``max_count=0`` is the synchronous protocol: the guest
  resumes only once every checkpoint is acknowledged.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Generic, TypeVar

from kemari.config import DEFAULT_CHECKPOINTS_IN_FLIGHT
from kemari.errors import CheckpointError

# Bytes of checkpoints in flight (QEMU stream bytes) beyond which the guest waits.
MAX_IN_FLIGHT_BYTES = 32 << 20

Ticket = TypeVar("Ticket")


@dataclasses.dataclass(frozen=True, slots=True)
class InFlight(Generic[Ticket]):
    """One captured checkpoint awaiting its acknowledgement."""

    epoch: int
    size: int  # bytes it occupies until acknowledged
    ticket: Ticket  # what the owner needs back at the ack (e.g. timings)


class InflightWindow(Generic[Ticket]):
    """Captured, unacknowledged checkpoints in epoch order, with count and byte bounds."""

    def __init__(
        self, max_count: int = DEFAULT_CHECKPOINTS_IN_FLIGHT, max_bytes: int = MAX_IN_FLIGHT_BYTES
    ) -> None:
        if max_count < 0 or max_bytes < 1:
            raise CheckpointError(f"in-flight bounds {max_count}, {max_bytes} are out of range")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._entries: collections.deque[InFlight[Ticket]] = collections.deque()
        self._bytes = 0
        self._last_epoch: int | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes of all checkpoints in flight."""
        return self._bytes

    @property
    def oldest(self) -> int | None:
        """The epoch whose acknowledgement comes next (None: nothing in flight)."""
        return self._entries[0].epoch if self._entries else None

    def holds(self, epoch: int) -> bool:
        """True while ``epoch`` is captured and not acknowledged."""
        return any(entry.epoch == epoch for entry in self._entries)

    @property
    def resume_allowed(self) -> bool:
        """May the guest run past the newest checkpoint now?"""
        count = len(self._entries)
        return count <= self.max_count and (count <= 1 or self._bytes <= self.max_bytes)

    def add(self, epoch: int, size: int, ticket: Ticket) -> None:
        """Checkpoint ``epoch`` is captured; it must follow every epoch added before."""
        if self._last_epoch is not None and epoch <= self._last_epoch:
            raise CheckpointError(f"checkpoint {epoch} captured after {self._last_epoch}")
        if size < 0:
            raise CheckpointError(f"checkpoint {epoch} has negative size {size}")
        self._last_epoch = epoch
        self._entries.append(InFlight(epoch, size, ticket))
        self._bytes += size

    def acknowledge(self, epoch: int) -> InFlight[Ticket]:
        """The standby committed ``epoch``: it must be the oldest in flight; returns it."""
        if not self._entries:
            raise CheckpointError(f"acknowledgement of {epoch} with no checkpoint in flight")
        entry = self._entries[0]
        if entry.epoch != epoch:
            raise CheckpointError(f"acknowledgement of {epoch}, expected {entry.epoch}")
        self._entries.popleft()
        self._bytes -= entry.size
        return entry
