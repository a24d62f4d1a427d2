"""The primary's network half of checkpointing: a :class:`CheckpointSink` over ft-transaction.

:class:`TransactionSender` receives what :class:`~kemari.checkpoint.source.CheckpointSource`
reads from QEMU and forwards it to the standby as ft-transactions on a
:class:`~kemari.transaction.session.PrimarySession`:

    initial sync   BEGIN(0), RAM_BLOCKS, RAM_PAGES…, DEVICE_STATE…, VM_DESCRIPTION,
                   COMMIT(0) → COMMIT_ACK
    checkpoint N   BEGIN(N), RAM_PAGES…, DEVICE_STATE…, OUTPUT…, COMMIT(N) → COMMIT_ACK

RAM_PAGES frames travel as RAM_PAGES_ZSTD where the session negotiated ``zstd-pages``
and compression saves at least :data:`COMPRESSION_MIN_SAVING` (docs/protocol.md).

OUTPUT frames carry the guest outputs the event-tap holds with tag N: when ``commit(N)``
is called QEMU has sent VMSTATE_SEND(N), so every output tagged N has been read
(docs/protocol.md, "Event-tap"), and none has been released yet.

``end_sync`` returns only after the standby's COMMIT_ACK of epoch 0, which is what lets
the source answer QEMU's CHECKPOINT_READY.  ``commit(N)`` only queues N's outputs and
COMMIT (the guest may resume from N at once, docs/protocol.md "Pipelined checkpoints");
``acknowledged(N)``, called in epoch order from the source's acknowledgement task, waits
for the COMMIT_ACK within ``commit_timeout_s`` of the COMMIT's send time.  Any failure
raises, which the source takes as "standby lost".
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Callable, Iterator, Sequence

from kemari import crashpoint
from kemari.checkpoint.source import PageBatch
from kemari.errors import CheckpointError
from kemari.outputs import Output
from kemari.stream import Configuration, RamBlockList, RamPageRun
from kemari.stream.format import PAGE_SIZE
from kemari.transaction.session import PrimarySession
from kemari.transaction.wire import (
    ZSTD_PAGES,
    Begin,
    DeviceState,
    Outputs,
    RamBlock,
    RamBlocks,
    RamPages,
    VmDescription,
    ZstdRamPages,
    compress_pages,
)

# Pages per RAM_PAGES frame: 1024 pages = 4 MiB, far below the frame limit, and big
# enough that per-frame costs vanish next to the copy of the page data.
PAGES_PER_FRAME = 1024
# A compressed frame is sent only when it saves at least this share of the page bytes;
# otherwise the standby's decompression would cost more than the bytes saved.
COMPRESSION_MIN_SAVING = 0.125
# Test hooks (kemari/crashpoint.py): die inside checkpoint N's transaction.
CRASH_DURING_PAGES = "during-pages"
CRASH_AFTER_DEVICE_STATE = "after-device-state"
# Device state is split into frames of at most this many bytes.
DEVICE_STATE_CHUNK = 8 << 20
# Held outputs are packed into OUTPUT frames of about this many data bytes.
OUTPUT_FRAME_BYTES = 4 << 20

OutputsOf = Callable[[int], Sequence[Output]]
log = logging.getLogger(__name__)


class TransactionSender:
    """Forwards checkpoints to the standby; one instance per protection session."""

    def __init__(
        self,
        session: PrimarySession,
        commit_timeout_s: float = 10.0,
        *,
        outputs_of: OutputsOf | None = None,
    ) -> None:
        self.session = session
        self.commit_timeout_s = commit_timeout_s
        self.outputs_of = outputs_of
        # Monotonic time just before the COMMIT of the last *acknowledged* epoch was sent
        # (no later than the send): that acknowledgement proves the standby heard from us
        # at or after it (docs/ha.md, rule 2 a).  A later COMMIT still in flight proves
        # nothing yet, so each epoch keeps its own send time until its ack.
        self.acked_commit_sent_at: float | None = None
        self._commits_sent: dict[int, float] = {}
        # Pages travel zstd-compressed when both sides negotiated it (the primary's
        # page_compression setting decides whether it offers it).
        self.compress_pages = ZSTD_PAGES in session.capabilities
        if self.compress_pages:
            log.info("page data to the standby travels zstd-compressed (%s)", ZSTD_PAGES)
        self.page_bytes = 0  # page data forwarded (4096 per data page)
        self.page_wire_bytes = 0  # what that page data took on the wire
        self._block_index: dict[str, int] = {}
        self._block_pages: list[int] = []
        self._epoch = 0

    # -- initial sync (epoch 0) -------------------------------------------

    async def begin_sync(self, configuration: Configuration, blocks: RamBlockList) -> None:
        """Open epoch 0 and announce the machine type and the RAM blocks."""
        for block in blocks.blocks:
            if block.used_length % PAGE_SIZE:
                raise CheckpointError(f"RAM block {block.name} is not a whole number of pages")
        self._block_index = {block.name: i for i, block in enumerate(blocks.blocks)}
        self._block_pages = [block.used_length // PAGE_SIZE for block in blocks.blocks]
        self._epoch = 0
        await self.session.send(Begin(0))
        wire_blocks = tuple(RamBlock(b.name, b.used_length, b.gpa or 0) for b in blocks.blocks)
        await self.session.send(
            RamBlocks(0, wire_blocks, configuration.machine_type, blocks.section_id)
        )

    async def sync_pages(self, batch: PageBatch) -> None:
        """Pages of the initial sync."""
        await self.pages(batch)

    async def end_sync(self, device_state: bytes, vmdesc: bytes) -> None:
        """Send the initial device state and VM description; wait for the commit of epoch 0."""
        await self.device_state(0, device_state)
        await self.session.send(VmDescription(0, vmdesc))
        await self.commit(0)
        await self.acknowledged(0)

    # -- checkpoints ----------------------------------------------------------

    async def begin(self, epoch: int) -> None:
        """Open checkpoint ``epoch``."""
        self._epoch = epoch
        await self.session.send(Begin(epoch))

    async def pages(self, batch: PageBatch) -> None:
        """Forward a batch of page runs as RAM_PAGES frames."""
        for frame in page_frames(
            self._epoch, batch, self._block_index, self._block_pages, compress=self.compress_pages
        ):
            self.page_bytes += len(frame.data_pages) * PAGE_SIZE
            if isinstance(frame, ZstdRamPages):
                self.page_wire_bytes += len(frame.compressed)
            else:
                self.page_wire_bytes += len(frame.data)
            await self.session.send(frame)
            if self._epoch and self._epoch == crashpoint.limit(CRASH_DURING_PAGES):
                crashpoint.kill()  # test hook: die in the middle of a transaction

    async def device_state(self, epoch: int, data: bytes) -> None:
        """Forward the device state of ``epoch`` in frames of bounded size."""
        view = memoryview(data)
        for start in range(0, len(view), DEVICE_STATE_CHUNK):
            await self.session.send(DeviceState(epoch, view[start : start + DEVICE_STATE_CHUNK]))
        if epoch and epoch == crashpoint.limit(CRASH_AFTER_DEVICE_STATE):
            crashpoint.kill()  # test hook: die before the outputs and COMMIT

    async def commit(self, epoch: int) -> None:
        """Send the epoch's held outputs and COMMIT; the acknowledgement comes later."""
        if self.outputs_of is not None:
            for frame in output_frames(epoch, self.outputs_of(epoch)):
                await self.session.send(frame)
        self._commits_sent[epoch] = time.monotonic()
        committed = await self.session.send_commit()
        if committed.epoch != epoch:
            raise CheckpointError(f"committed epoch {committed.epoch}, expected {epoch}")

    async def acknowledged(self, epoch: int) -> None:
        """Return once the standby acknowledged ``epoch`` (the oldest unacknowledged
        COMMIT); CheckpointError or TransactionError if not within the commit timeout."""
        sent_at = self._commits_sent.get(epoch)
        if sent_at is None:
            raise CheckpointError(f"no COMMIT of epoch {epoch} awaits an acknowledgement")
        remaining = sent_at + self.commit_timeout_s - time.monotonic()
        await self.session.receive_commit_ack(epoch, max(remaining, 0.0))
        del self._commits_sent[epoch]
        self.acked_commit_sent_at = sent_at


def output_frames(epoch: int, outputs: Sequence[Output]) -> Iterator[Outputs]:
    """Pack ``outputs`` in order into OUTPUT frames of about :data:`OUTPUT_FRAME_BYTES`."""
    batch: list[Output] = []
    size = 0
    for output in outputs:
        if batch and size + len(output.data) > OUTPUT_FRAME_BYTES:
            yield Outputs(epoch, tuple(batch))
            batch, size = [], 0
        batch.append(output)
        size += len(output.data)
    if batch:
        yield Outputs(epoch, tuple(batch))


def page_frames(
    epoch: int,
    batch: PageBatch,
    block_index: dict[str, int],
    block_pages: list[int],
    *,
    compress: bool = False,
) -> Iterator[RamPages | ZstdRamPages]:
    """Cut ``batch`` into RAM_PAGES frames, in its order, without a loop over its pages.

    A frame holds whole runs (their page-number arrays and memoryviews) of one block
    whose pages all come after the frame's pages so far, so no frame holds a page
    twice and its zero and data pages apply in any order; a run longer than a frame
    is sliced.  With ``compress``, a frame's data pages travel as one zstd frame
    (RAM_PAGES_ZSTD) when that saves at least :data:`COMPRESSION_MIN_SAVING` of their
    bytes.  Page data is not copied here but joined (or compressed) once per frame.
    """
    frame: list[RamPageRun] = []
    frame_index = frame_last = frame_pages = 0
    for run in batch:
        index = block_index.get(run.block)
        if index is None:
            raise CheckpointError(f"pages of unknown RAM block {run.block!r}")
        limit = block_pages[index]
        first, last = _bounds(run)
        if last >= limit:
            raise CheckpointError(f"page {last} outside {run.block} of {limit} pages")
        if frame and (
            index != frame_index
            or first <= frame_last
            or frame_pages + run.page_count > PAGES_PER_FRAME
        ):
            yield _frame(epoch, frame_index, frame, compress=compress)
            frame = []
        if run.page_count > PAGES_PER_FRAME:
            yield from _sliced(epoch, index, run, compress=compress)
            continue
        if not frame:
            frame_index, frame_pages = index, 0
        frame.append(run)
        frame_last = last
        frame_pages += run.page_count
    if frame:
        yield _frame(epoch, frame_index, frame, compress=compress)


def _bounds(run: RamPageRun) -> tuple[int, int]:
    """The first and last page of a run (its pages increase)."""
    ends = [pages[i] for pages in (run.data_pages, run.zero_pages) if pages for i in (0, -1)]
    return min(ends), max(ends)


def _sliced(
    epoch: int, block_index: int, run: RamPageRun, *, compress: bool
) -> Iterator[RamPages | ZstdRamPages]:
    """A run longer than a frame, as frames of its data pages, then of its zero pages."""
    for start in range(0, len(run.data_pages), PAGES_PER_FRAME):
        end = start + PAGES_PER_FRAME
        part = RamPageRun(run.block, run.data_pages[start:end], run.data[start:end], array("I"))
        yield _frame(epoch, block_index, [part], compress=compress)
    for start in range(0, len(run.zero_pages), PAGES_PER_FRAME):
        zeros = run.zero_pages[start : start + PAGES_PER_FRAME]
        yield _frame(
            epoch, block_index, [RamPageRun(run.block, array("I"), [], zeros)], compress=compress
        )


def _frame(
    epoch: int, block_index: int, runs: list[RamPageRun], *, compress: bool
) -> RamPages | ZstdRamPages:
    """One frame of these runs' pages, compressed when that pays (see :func:`page_frames`)."""
    if len(runs) == 1:
        (run,) = runs
        data_pages, zero_pages, data = run.data_pages, run.zero_pages, run.data
    else:
        data_pages, zero_pages, data = array("I"), array("I"), []
        for run in runs:
            data_pages.extend(run.data_pages)
            zero_pages.extend(run.zero_pages)
            data.extend(run.data)
    if compress and data:
        compressed = compress_pages(data)
        if len(compressed) <= len(data) * PAGE_SIZE * (1 - COMPRESSION_MIN_SAVING):
            return ZstdRamPages(epoch, block_index, data_pages, zero_pages, compressed)
    return RamPages(epoch, block_index, data_pages, zero_pages, b"".join(data))
