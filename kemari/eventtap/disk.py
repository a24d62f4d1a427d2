"""Disk event-tap: the overlay that holds guest writes until their checkpoint commits.

:class:`OverlayBackend` is an NBD :class:`~kemari.nbd.backend.Backend` in front of the
image's backend.  Unprotected, it passes every request through.  Protected
(:meth:`OverlayBackend.protect`), a WRITE, WRITE_ZEROES or TRIM is answered at once from
memory: it joins an in-memory overlay that reads see (merged with the base), is tagged
with the checkpoint epoch that will contain it, is handed to the output path (so it
travels to the standby inside that epoch's transaction), and reaches the base only when
:meth:`OverlayBackend.release` is told its epoch committed.  docs/storage.md gives the
argument for every rule; the ones the code relies on:

* **Never wait.**  No request waits for a checkpoint, a peer or a commit: QEMU drains
  block I/O when it stops the VM for a checkpoint, so a request waiting for the
  checkpoint would deadlock it.  FLUSH and FUA are answered at once while protected.
* **Exact tags.**  A write's epoch is read from ``epoch_of_write()`` when the request is
  executed, before it is answered.  QEMU answers VMSTATE_SEND of checkpoint N only after
  the VM stopped and its block I/O drained, so a write answered before the stop is
  tagged before Kemari parsed that VMSTATE_SEND: the rule "epoch = VMSTATE_SENDs seen
  + 1" (0 during the initial sync) puts every write into the checkpoint whose state has
  seen it complete.  Tags never decrease, so the held log is sorted by epoch.
* **Order.**  Held writes reach the base in the order they were answered; extents in
  the overlay carry the sequence number of the write that produced them, and leave the
  overlay only once that write is in the base.
* **Bounded memory, never blocking.**  Past ``max_held_bytes`` the overlay asks for a
  checkpoint (``on_pressure``) on every further write, and still answers at once.

Held writes and the records sent to the standby are :class:`DiskWrite` values; their
byte encoding (:func:`encode_disk_write`) is the payload of a disk output on the wire.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import errno
import logging
from collections.abc import Awaitable, Callable

from kemari.errors import EventTapError
from kemari.eventtap.outputs import OutputLog
from kemari.nbd.backend import Backend
from kemari.outputs import DiskOp, DiskWrite, disk_output

log = logging.getLogger(__name__)

DEFAULT_MAX_HELD_BYTES = 64 << 20


def hold_in(log: OutputLog) -> Callable[[DiskWrite], None]:
    """An ``emit`` for :meth:`OverlayBackend.protect` that holds records in ``log``."""

    def emit(record: DiskWrite) -> None:
        log.hold(disk_output(record), record.epoch)

    return emit


@dataclasses.dataclass(slots=True)
class _Extent:
    """A range of the overlay: bytes ``data[skip : skip + end - start]``, or zeroes."""

    start: int
    end: int
    seq: int  # the held write that produced it
    data: memoryview | None  # None: zeroes
    skip: int = 0

    def cut(self, start: int, end: int) -> _Extent:
        """The part of this extent inside [start, end)."""
        skip = self.skip + start - self.start
        return _Extent(start, end, self.seq, self.data, skip)

    def bytes_at(self, start: int, end: int) -> bytes | memoryview:
        if self.data is None:
            return bytes(end - start)
        skip = self.skip + start - self.start
        return self.data[skip : skip + end - start]


@dataclasses.dataclass(frozen=True, slots=True)
class _Held:
    seq: int
    record: DiskWrite
    may_trim: bool


class OverlayBackend:
    """Holds writes of uncommitted checkpoints in memory in front of ``base``.

    ``on_pressure`` (e.g. ``CheckpointTrigger.request_checkpoint``) is called, and must
    return at once, whenever a write leaves more than ``max_held_bytes`` held.
    """

    def __init__(
        self,
        base: Backend,
        *,
        disk: int = 0,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
        on_pressure: Callable[[], object] | None = None,
    ) -> None:
        if max_held_bytes <= 0:
            raise EventTapError(f"max_held_bytes {max_held_bytes} must be positive")
        self.base = base
        self.disk = disk
        self.max_held_bytes = max_held_bytes
        self.on_pressure = on_pressure
        self.pressure_requests = 0  # times on_pressure was called
        self._epoch_of_write: Callable[[], int | None] | None = None
        self._emit: Callable[[DiskWrite], None] | None = None
        # Holding outlives _emit while unprotect() drains: a write passing through
        # before older held writes reached the base would be overwritten by them.
        self._holding = False
        # After discard(): this host must never write the image again (docs/storage.md).
        # Automatic failover: True while a write that would reach the base must be held
        # instead (the release permit refuses); held writes leave at unprotect().
        self.withhold: Callable[[], bool] = lambda: False
        self._fenced = False
        self._starts: list[int] = []  # extent starts, sorted (parallel to _extents)
        self._extents: list[_Extent] = []
        self._log: collections.deque[_Held] = collections.deque()
        self._next_seq = 0
        self._last_epoch = 0
        self._held_bytes = 0
        self._released_epoch: int | None = None
        self._release_lock = asyncio.Lock()
        # Base writes started / finished (releases and pass-through alike): a read of
        # the base is a snapshot only if none ran while it was in progress.
        self._base_writes_started = 0
        self._base_writes_done = 0

    # -- the Backend protocol ------------------------------------------------------

    @property
    def size(self) -> int:
        return self.base.size

    @property
    def read_only(self) -> bool:
        return self.base.read_only

    async def read(self, offset: int, length: int) -> bytes:
        """The base merged with every held write overlapping the range."""
        # Snapshot the overlapping extents first: a release running during the base
        # read only writes ranges these extents cover, so they decide those bytes.
        pieces = self._overlapping(offset, offset + length)
        covered = sum(piece.end - piece.start for piece in pieces)
        if covered == length:
            buffer = bytearray(length)
        else:
            buffer = bytearray(await self.base.read(offset, length))
        for piece in pieces:
            buffer[piece.start - offset : piece.end - offset] = piece.bytes_at(
                piece.start, piece.end
            )
        return bytes(buffer)

    async def write(self, offset: int, data: bytes, *, fua: bool) -> None:
        """Hold ``data`` (protected: answered at once; FUA: see docs/storage.md)."""
        if self._passes_through():
            await self._base_write(self.base.write(offset, data, fua=fua))
            return
        self._hold(DiskOp.WRITE, offset, len(data), data, may_trim=False)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fua: bool) -> None:
        """Hold a zeroed range (read as zeroes at once)."""
        if self._passes_through():
            await self._base_write(
                self.base.write_zeroes(offset, length, may_trim=may_trim, fua=fua)
            )
            return
        op = DiskOp.PUNCH if may_trim else DiskOp.ZERO
        self._hold(op, offset, length, b"", may_trim=may_trim)

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        """Hold a discard (the overlay reads it as zeroes, as Kemari's base does)."""
        if self._passes_through():
            await self._base_write(self.base.trim(offset, length, fua=fua))
            return
        self._hold(DiskOp.TRIM, offset, length, b"", may_trim=True)

    async def flush(self) -> None:
        """Unprotected: flush the base.  Protected: nothing to wait for (docs/storage.md):
        every completed write is part of its checkpoint's transaction, committed on the
        standby before the guest can show anyone that this flush completed."""
        if self._passes_through():
            await self.base.flush()

    # -- protection -------------------------------------------------------------------

    @property
    def protected(self) -> bool:
        """True while writes are held and sent to the standby."""
        return self._emit is not None

    @property
    def held_bytes(self) -> int:
        """Payload bytes of held WRITEs (zeroes and trims count nothing)."""
        return self._held_bytes

    @property
    def held_writes(self) -> int:
        return len(self._log)

    @property
    def released_epoch(self) -> int | None:
        """The last epoch whose writes are all in the base and flushed (None: none yet)."""
        return self._released_epoch

    def held_epochs(self) -> list[int]:
        """The distinct epochs of held writes, oldest first."""
        return sorted({held.record.epoch for held in self._log})

    def protect(
        self, epoch_of_write: Callable[[], int | None], emit: Callable[[DiskWrite], None]
    ) -> None:
        """Start holding: every write is tagged ``epoch_of_write()`` and given to ``emit``.

        ``epoch_of_write`` returns None while no checkpoint covers outputs (the initial
        sync has not ended, e.g. ``CheckpointSource.output_epoch``): writes then pass
        through to the base, since epoch 0's state is taken after them.  ``emit`` must
        take the record at once (it is called while the request executes) and deliver
        records to the standby in call order, each inside the transaction of its epoch.
        """
        if self._emit is not None:
            raise EventTapError("the overlay is already protected")
        if self._holding:
            raise EventTapError("the overlay is still draining the previous protection")
        self._epoch_of_write = epoch_of_write
        self._emit = emit
        self._holding = True
        self._last_epoch = 0
        self._released_epoch = None

    async def release(self, committed_epoch: int) -> int:
        """Write every held write of an epoch <= ``committed_epoch`` to the base, in order,
        flush the base, then drop them from the overlay.  Returns how many were written.

        Releases are serialized.  If the base fails, the failed write and all after it
        stay held (reads remain right) and the OSError propagates; the next release
        retries them.
        """
        async with self._release_lock:
            written, fenced = await self._write_held(committed_epoch)
            if fenced:
                return written
            if written:
                await self.base.flush()
            if self._released_epoch is None or committed_epoch > self._released_epoch:
                self._released_epoch = committed_epoch
                if self._emit is not None and written:
                    # EventTapError: no epoch covers outputs any more (protection is
                    # ending), so there is no standby to tell.
                    with contextlib.suppress(EventTapError):
                        self.emit_marker(DiskOp.RELEASED, committed_epoch)
            return written

    async def _write_held(self, through_epoch: int | None) -> tuple[int, bool]:
        """Write the held writes of an epoch <= ``through_epoch`` (all when None) to the
        base, oldest first, dropping each once written.  Returns how many were written and
        whether discard() fenced the overlay meanwhile.  Call with the release lock held."""
        written = 0
        while self._log and (through_epoch is None or self._log[0].record.epoch <= through_epoch):
            held = self._log[0]
            await self._apply_to_base(held)
            if self._fenced:  # discard() ran meanwhile
                return written, True
            self._log.popleft()
            self._forget(held)
            written += 1
        return written, False

    async def unprotect(self) -> int:
        """Protection ended: the guest goes on here, so every held write goes to the base
        (committed or not), in order; then requests pass through again.

        Writes arriving meanwhile are still held (not emitted) and drained too."""
        self._emit = None
        self._epoch_of_write = None
        async with self._release_lock:
            written, fenced = await self._write_held(None)
            if fenced:
                return written
            # Same event-loop step as the empty check: no write can slip in between.
            self._holding = False
            await self.base.flush()
            return written

    def discard(self) -> int:
        """The guest died before its held writes committed (protection FAILED): forget them
        all and fence the disk, so nothing from this host reaches the image any more (the
        standby resumes from the last commit and replays committed writes itself)."""
        dropped = len(self._log)
        self._fenced = True
        self._emit = None
        self._epoch_of_write = None
        self._log.clear()
        self._extents.clear()
        self._starts.clear()
        self._held_bytes = 0
        return dropped

    async def snapshot_read(self, offset: int, length: int) -> bytes:
        """What a read returns, valid at the moment this call returns (for the disk copy).

        The caller may emit the result as a record with no ``await`` in between: it then
        sits in the output order exactly where its content is current.  Retries while
        base writes overlap the base read (rare: releases run once per checkpoint).
        """
        while True:
            started = self._base_writes_started
            quiet = started == self._base_writes_done
            data = await self.base.read(offset, length)
            if quiet and self._base_writes_started == started:
                break
            await asyncio.sleep(0)
        buffer = bytearray(data)
        for piece in self._overlapping(offset, offset + length):
            buffer[piece.start - offset : piece.end - offset] = piece.bytes_at(
                piece.start, piece.end
            )
        return bytes(buffer)

    def emit_copy(self, offset: int, data: bytes) -> DiskWrite:
        """Send ``data`` (from :meth:`snapshot_read`, same event-loop step) to the standby
        as a WRITE of the current epoch; the base already holds it, so it is not held."""
        epoch = self._tag() if self._emit is not None else None
        if self._emit is None or epoch is None:
            raise EventTapError("the disk copy needs a protected overlay past the initial sync")
        record = DiskWrite(epoch, self.disk, DiskOp.WRITE, offset, len(data), data)
        self._emit(record)
        return record

    def emit_marker(self, op: DiskOp, value: int = 0) -> DiskWrite:
        """Send a RELEASED (``value`` = epoch) or SYNCED marker in the current epoch."""
        if op not in (DiskOp.RELEASED, DiskOp.SYNCED):
            raise EventTapError(f"{op.name} is not a marker")
        epoch = self._tag() if self._emit is not None else None
        if self._emit is None or epoch is None:
            raise EventTapError("markers need a protected overlay past the initial sync")
        record = DiskWrite(epoch, self.disk, op, value, 0)
        self._emit(record)
        return record

    # -- internals ------------------------------------------------------------------

    def _passes_through(self) -> bool:
        """True when a request goes straight to the base: not holding, or nothing held
        and no checkpoint covers outputs yet (held writes keep every later one behind)."""
        if self._fenced:
            raise OSError(errno.EIO, "the disk was fenced: the guest died uncommitted")
        if self._log:
            return False
        if self.withhold():
            return False  # the release permit says no (docs/ha.md rule 2): hold it
        if not self._holding:
            return True
        return self._epoch_of_write is None or self._epoch_of_write() is None

    def _tag(self) -> int | None:
        """The epoch of a write executed now; None: hold it without emitting (protection
        ended or not begun, older writes still held)."""
        epoch = None if self._epoch_of_write is None else self._epoch_of_write()
        if epoch is None:
            return None
        if epoch < self._last_epoch:
            # A smaller tag would put a write into a checkpoint that already passed.
            raise EventTapError(f"write epoch went back from {self._last_epoch} to {epoch}")
        if self._released_epoch is not None and epoch <= self._released_epoch:
            raise EventTapError(
                f"write tagged {epoch}, but epoch {self._released_epoch} was released"
            )
        self._last_epoch = epoch
        return epoch

    def _hold(self, op: DiskOp, offset: int, length: int, data: bytes, *, may_trim: bool) -> None:
        try:
            tag = self._tag()
        except EventTapError as exc:
            raise OSError(errno.EIO, str(exc)) from exc
        epoch = self._last_epoch if tag is None else tag
        record = DiskWrite(epoch, self.disk, op, offset, length, bytes(data))
        seq = self._next_seq
        self._next_seq += 1
        # Ordering: overlay and log first (reads see the write), then the output path.
        view = memoryview(record.data) if op is DiskOp.WRITE else None
        self._insert(_Extent(offset, offset + length, seq, view))
        self._log.append(_Held(seq, record, may_trim))
        self._held_bytes += len(record.data)
        if self._emit is not None and tag is not None:
            self._emit(record)
        if self._held_bytes > self.max_held_bytes and self.on_pressure is not None:
            self.pressure_requests += 1
            self.on_pressure()

    async def _base_write(self, operation: Awaitable[None]) -> None:
        self._base_writes_started += 1
        try:
            await operation
        finally:
            self._base_writes_done += 1

    async def _apply_to_base(self, held: _Held) -> None:
        record = held.record
        if record.op is DiskOp.WRITE:
            await self._base_write(self.base.write(record.offset, record.data, fua=False))
        elif record.op is DiskOp.TRIM:
            await self._base_write(self.base.trim(record.offset, record.length, fua=False))
        else:
            await self._base_write(
                self.base.write_zeroes(
                    record.offset, record.length, may_trim=held.may_trim, fua=False
                )
            )

    def _forget(self, held: _Held) -> None:
        """Drop the extents ``held`` produced: the base holds their content now."""
        self._held_bytes -= len(held.record.data)
        start, end = held.record.offset, held.record.end
        first = max(bisect.bisect_right(self._starts, start) - 1, 0)
        index = first
        while index < len(self._extents) and self._extents[index].start < end:
            extent = self._extents[index]
            # Later writes replaced what earlier ones left, so seq <= held.seq here
            # means exactly this write's (or an already written earlier write's) bytes.
            if extent.end > start and extent.seq <= held.seq:
                del self._extents[index]
                del self._starts[index]
            else:
                index += 1

    def _overlapping(self, start: int, end: int) -> list[_Extent]:
        """The parts of extents inside [start, end), in offset order."""
        index = max(bisect.bisect_right(self._starts, start) - 1, 0)
        result = []
        while index < len(self._extents) and self._extents[index].start < end:
            extent = self._extents[index]
            if extent.end > start:
                result.append(extent.cut(max(extent.start, start), min(extent.end, end)))
            index += 1
        return result

    def _insert(self, new: _Extent) -> None:
        """Put ``new`` over whatever the overlay held in its range."""
        start, end = new.start, new.end
        index = max(bisect.bisect_right(self._starts, start) - 1, 0)
        replaced: list[_Extent] = []
        first = index
        while index < len(self._extents) and self._extents[index].start < end:
            extent = self._extents[index]
            if extent.end <= start:
                first = index + 1
            else:
                replaced.append(extent)
            index += 1
        keep: list[_Extent] = []
        if replaced:
            head, tail = replaced[0], replaced[-1]
            if head.start < start:
                keep.append(head.cut(head.start, start))
            keep.append(new)
            if tail.end > end:
                keep.append(tail.cut(end, tail.end))
        else:
            keep.append(new)
        self._extents[first : first + len(replaced)] = keep
        self._starts[first : first + len(replaced)] = [extent.start for extent in keep]
