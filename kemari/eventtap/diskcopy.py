"""Initial disk copy for ``replicated`` storage: the whole image to the standby, guest running.

:class:`DiskCopier` reads the image through the protected overlay in chunks and sends
each chunk as an ordinary WRITE record of the current epoch
(:meth:`~kemari.eventtap.disk.OverlayBackend.snapshot_read` then ``emit_copy`` in the
same event-loop step).  So a chunk sits in the output order exactly where its content is
current: every guest write answered before it is inside it, every write after it
follows it in the same or a later transaction and is applied after it on the standby.
Blocks written during the copy therefore need no separate tracking: the writes
themselves travel after the chunk and re-send those blocks.  By induction over the
records, the standby's image equals the primary's at every committed epoch once the
SYNCED marker (sent after the last chunk) is committed.

Memory: chunks wait in the output log until their epoch commits; at most
``max_in_flight`` bytes of chunks are uncommitted at a time (the copier waits for the
commit of the epoch its oldest pending chunk belongs to, and asks for a checkpoint).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable

from kemari.errors import EventTapError
from kemari.eventtap.disk import OverlayBackend
from kemari.outputs import DiskOp, DiskWrite

DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_IN_FLIGHT = 16 << 20
_WAIT_FOR_TAGGING_S = 0.01


@dataclasses.dataclass(frozen=True, slots=True)
class CopyProgress:
    """How far the copy is: bytes sent and committed of ``total`` bytes."""

    sent: int
    committed: int
    total: int
    elapsed_s: float

    @property
    def fraction(self) -> float:
        return self.committed / self.total if self.total else 1.0

    def line(self) -> str:
        """One human line, e.g. for ``info status``."""
        rate = self.sent / self.elapsed_s / 2**20 if self.elapsed_s > 0 else 0.0
        return (
            f"disk copy {self.fraction:.0%}: {self.committed >> 20} of {self.total >> 20} MiB "
            f"committed, {self.sent >> 20} MiB sent, {rate:.0f} MiB/s"
        )

    def as_dict(self) -> dict[str, float | int | str]:
        """Plain data for ``info status``."""
        return {
            "committed_bytes": self.committed,
            "sent_bytes": self.sent,
            "total_bytes": self.total,
            "elapsed_s": round(self.elapsed_s, 3),
            "line": self.line(),
        }


class DiskCopier:
    """Copies one protected disk to the standby (``await run()``; cancel to abandon).

    ``wait_committed(epoch)`` returns once that epoch is committed (raises when
    protection ends); ``request_checkpoint()`` asks for one without waiting.
    """

    def __init__(
        self,
        overlay: OverlayBackend,
        *,
        wait_committed: Callable[[int], Awaitable[None]],
        request_checkpoint: Callable[[], object],
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if chunk_bytes <= 0 or max_in_flight < chunk_bytes:
            raise EventTapError(f"copy chunk {chunk_bytes} / in flight {max_in_flight}")
        self.overlay = overlay
        self.wait_committed = wait_committed
        self.request_checkpoint = request_checkpoint
        self.chunk_bytes = chunk_bytes
        self.max_in_flight = max_in_flight
        self.total = overlay.size
        self.sent = 0
        self.committed = 0
        self.done = False
        self._started = time.monotonic()

    def progress(self) -> CopyProgress:
        return CopyProgress(self.sent, self.committed, self.total, time.monotonic() - self._started)

    async def run(self) -> None:
        """Copy everything, send SYNCED, and return once that is committed."""
        self._started = time.monotonic()
        pending: collections.deque[DiskWrite] = collections.deque()
        offset = 0
        while offset < self.total:
            length = min(self.chunk_bytes, self.total - offset)
            data = await self.overlay.snapshot_read(offset, length)
            # No await between the read's return and the emission (see module docstring).
            try:
                record = self.overlay.emit_copy(offset, data)
            except EventTapError:
                # The initial RAM sync has not ended yet: nothing is tagged; wait.
                await asyncio.sleep(_WAIT_FOR_TAGGING_S)
                continue
            pending.append(record)
            self.sent += length
            offset += length
            while self.sent - self.committed >= self.max_in_flight:
                await self._commit_oldest(pending)
        marker = self.overlay.emit_marker(DiskOp.SYNCED)
        while pending:
            await self._commit_oldest(pending)
        self.request_checkpoint()
        await self.wait_committed(marker.epoch)
        self.done = True

    async def _commit_oldest(self, pending: collections.deque[DiskWrite]) -> None:
        epoch = pending[0].epoch
        self.request_checkpoint()
        await self.wait_committed(epoch)
        while pending and pending[0].epoch <= epoch:
            self.committed += pending.popleft().length
