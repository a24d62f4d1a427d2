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
from kemari.stream import Configuration, RamBlockList, RamPage
from kemari.stream.format import PAGE_BITS, PAGE_MASK, PAGE_SIZE
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
        """Forward a batch of page records as RAM_PAGES frames, grouped by block."""
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
    """Cut ``batch`` into RAM_PAGES frames, preserving the effect of its order.

    A frame applies its zero pages before its data pages, so a frame never holds
    one page twice: a repeated page (QEMU may resend a page within one read during
    the initial sync) or a change of block starts a new frame.  With ``compress``, a
    frame's data pages travel as one zstd frame (RAM_PAGES_ZSTD) when that saves at
    least :data:`COMPRESSION_MIN_SAVING` of their bytes.  Page data is never copied
    here: a frame's pages are the batch's memoryviews, joined (or compressed) once.
    """
    frame = _FrameBuilder(epoch, -1, compress)
    # The loop runs once per dirty page: locals only, the frame's fields inlined.
    pages: set[int] = frame.pages
    block_name = ""
    index = -1
    limit = 0
    for record in batch:
        if record.block != block_name:
            found = block_index.get(record.block)
            if found is None:
                raise CheckpointError(f"page of unknown RAM block {record.block!r}")
            block_name, index, limit = record.block, found, block_pages[found]
        offset = record.offset
        page = offset >> PAGE_BITS
        if offset & PAGE_MASK or not 0 <= page < limit:
            raise CheckpointError(f"page offset {offset:#x} outside {record.block}")
        if index != frame.block_index or page in pages or len(pages) >= PAGES_PER_FRAME:
            if pages:
                yield frame.build()
            frame = _FrameBuilder(epoch, index, compress)
            pages = frame.pages
        pages.add(page)
        if isinstance(record, RamPage):
            frame.data_pages.append(page)
            frame.data.append(record.data)
        elif record.fill == 0:
            frame.zero_pages.append(page)
        else:
            # QEMU 7.2 only sends zero-filled pages; anything else is not ours to guess.
            raise CheckpointError(f"fill page with byte {record.fill:#x} is not supported")
    if pages:
        yield frame.build()


class _FrameBuilder:
    """Collects the pages of one RAM_PAGES frame."""

    __slots__ = ("block_index", "compress", "data", "data_pages", "epoch", "pages", "zero_pages")

    def __init__(self, epoch: int, block_index: int, compress: bool) -> None:
        self.epoch = epoch
        self.block_index = block_index
        self.compress = compress
        self.pages: set[int] = set()
        self.data_pages = array("I")
        self.zero_pages = array("I")
        self.data: list[memoryview] = []

    def build(self) -> RamPages | ZstdRamPages:
        if self.compress and self.data:
            compressed = compress_pages(self.data)
            if len(compressed) <= len(self.data) * PAGE_SIZE * (1 - COMPRESSION_MIN_SAVING):
                return ZstdRamPages(
                    self.epoch, self.block_index, self.data_pages, self.zero_pages, compressed
                )
        return RamPages(
            self.epoch, self.block_index, self.data_pages, self.zero_pages, b"".join(self.data)
        )
