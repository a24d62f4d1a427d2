"""CheckpointSource and CheckpointTrigger against a real TCG QEMU running the ticker firmware.

The sink here is a real consumer: it keeps a replica of guest RAM (initial sync, then each
committed checkpoint applied as a whole) and records every protocol violation it sees.
The ticker guest stores its counter into pages from 1 MiB on and prints ``tick N`` on
COM1 after storing, so a committed replica must hold a counter at least as large as the
last tick printed before the checkpoint was requested.

Checkpoints need Kemari's patched QEMU (``kemari qemu build``): stock 7.2 deadlocks at the
first checkpoint under TCG, and these tests run TCG on every host, so without it they fail
(``patched_qemu_binary``), never skip.  The initial-sync failure test runs on Debian's QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from stream_model import normalize
from support import prerequisites
from support.pause_order import PAUSE_MILESTONES
from ticker_rom import ticker_rom, ticks

from kemari.checkpoint import CheckpointSource, CheckpointTrigger, PageBatch, SourceState
from kemari.errors import CheckpointError
from kemari.qemu.cmdline import MachineSpec, MemoryFile
from kemari.qemu.machine import QemuMachine
from kemari.stream import Configuration, RamBlock, RamBlockList
from kemari.stream.format import PAGE_SIZE
from kemari.testbed.wait import async_wait_for

pytestmark = pytest.mark.guest

MEMORY_MIB = 64
TICKER_BASE = 1 << 20  # where the ticker stores its counter (pc.ram offset = GPA here)
TICKER_PAGES = 16
TIMEOUT_S = 60.0

Key = tuple[str, int]


class ReplicaSink:
    """Keeps a replica of guest RAM and checks the order and content of every call."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.configuration: Configuration | None = None
        self.blocks: dict[str, RamBlock] = {}
        self.synced = False
        self.sync_offsets: dict[str, set[int]] = {}
        self.initial_device_state = b""
        self.vmdesc: dict[str, object] = {}
        self.replica: dict[Key, bytes] = {}
        self.open_epoch: int | None = None
        self.staged: dict[Key, bytes] = {}
        self.staged_device = b""
        self.committed: list[int] = []
        self.checkpoint_pages: dict[int, int] = {}
        # Hooks a test can set to make commit slow or failing at one epoch.
        self.on_commit: Callable[[int], Awaitable[None]] | None = None

    def _check(self, ok: bool, what: str) -> None:
        if not ok:
            self.violations.append(what)
            raise AssertionError(what)

    def _take(self, batch: PageBatch, into: dict[Key, bytes]) -> None:
        for record in normalize(list(batch)):
            assert isinstance(record, tuple)
            name, offset = record[1], record[2]
            block = self.blocks.get(name)
            self._check(block is not None, f"page of unknown block {name}")
            assert block is not None
            self._check(
                offset % PAGE_SIZE == 0 and offset < block.used_length,
                f"page {name}+{offset:#x} outside its block",
            )
            if record[0] == "page":
                data = record[3]
                self._check(len(data) == PAGE_SIZE, "short page")
                into[name, offset] = data
            else:
                into[name, offset] = bytes(PAGE_SIZE)

    async def begin_sync(self, configuration: Configuration, blocks: RamBlockList) -> None:
        self._check(self.configuration is None, "second begin_sync")
        self.configuration = configuration
        self.blocks = {block.name: block for block in blocks.blocks}

    async def sync_pages(self, batch: PageBatch) -> None:
        self._check(self.configuration is not None and not self.synced, "sync pages out of order")
        self._take(batch, self.replica)
        for run in batch:
            pages = [*run.data_pages, *run.zero_pages]
            self.sync_offsets.setdefault(run.block, set()).update(p * PAGE_SIZE for p in pages)

    async def end_sync(self, device_state: bytes, vmdesc: bytes) -> None:
        self._check(not self.synced and bool(device_state), "end_sync out of order or empty")
        self.initial_device_state = device_state
        self.vmdesc = json.loads(vmdesc)
        self.synced = True

    async def begin(self, epoch: int) -> None:
        last = self.committed[-1] if self.committed else 0
        self._check(self.synced and self.open_epoch is None, f"begin({epoch}) out of order")
        self._check(epoch == last + 1, f"epoch {epoch} after {last}")
        self.open_epoch = epoch
        self.staged = {}
        self.staged_device = b""

    async def pages(self, batch: PageBatch) -> None:
        self._check(self.open_epoch is not None, "checkpoint pages outside a checkpoint")
        self._take(batch, self.staged)

    async def device_state(self, epoch: int, data: bytes) -> None:
        self._check(epoch == self.open_epoch and bool(data), f"device_state({epoch}) invalid")
        self.staged_device = data

    async def commit(self, epoch: int) -> None:
        self._check(epoch == self.open_epoch and bool(self.staged_device), f"commit({epoch})")
        if self.on_commit is not None:
            await self.on_commit(epoch)
        # A checkpoint is applied whole, only here: the replica never mixes two epochs.
        self.replica.update(self.staged)
        self.checkpoint_pages[epoch] = len(self.staged)
        self.committed.append(epoch)
        self.open_epoch = None

    async def acknowledged(self, epoch: int) -> None:
        self._check(epoch in self.committed, f"acknowledged({epoch}) before its commit")

    def counter(self) -> int:
        """The ticker's counter in the committed replica."""
        (value,) = struct.unpack_from("<I", self.replica["pc.ram", TICKER_BASE])
        return int(value)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(TIMEOUT_S):
            await scenario()

    asyncio.run(bounded())


@contextlib.asynccontextmanager
async def ticker_primary(
    tmp_path: Path, binary: Path, *, flush_tlb: bool = True
) -> AsyncIterator[QemuMachine]:
    spec = MachineSpec(
        name="primary",
        accel="tcg",
        qmp_socket=tmp_path / "qmp.sock",
        memory_mib=MEMORY_MIB,
        bios=ticker_rom(
            tmp_path / "ticker.rom",
            pages=TICKER_PAGES,
            delay_tsc=50_000_000,
            flush_tlb=flush_tlb,
        ),
        serial_log=tmp_path / "serial.log",
        memory_file=MemoryFile(tmp_path / "ram"),
    )
    async with QemuMachine(spec, binary) as machine:
        yield machine


def state_of(source: CheckpointSource) -> SourceState:
    """The state read through a call, so the type checker does not pin it between awaits."""
    return source.state


async def wait_state(source: CheckpointSource, *states: SourceState) -> None:
    while source.state not in states:
        await source.wait_progress(1.0)


async def ticks_advance(serial: Path, timeout: float = 30.0) -> None:
    """Return once the guest printed a new tick."""
    before = ticks(serial)[-1:]

    def advanced() -> bool:
        now = ticks(serial)[-1:]
        return bool(now) and now != before

    await async_wait_for(advanced, f"a tick after {before} on {serial.name}", timeout, 0.02)


async def assert_pause_timelines(source: CheckpointSource) -> None:
    """Each committed checkpoint's timeline has every milestone, in causal order.

    QEMU's STOP and RESUME come on the QMP socket, so the last RESUME may still be on
    its way when the commit is seen; it is waited for, not assumed.
    """

    def resumes_placed() -> bool:
        return all(r.timeline.resume_ms is not None for r in source.recent())

    await async_wait_for(resumes_placed, "QEMU's RESUME placed on every checkpoint", 10.0, 0.01)
    for record in source.recent():
        milestones = record.timeline.milestones()
        # A checkpoint that carried no page has no first page.
        expected = [m for m in PAUSE_MILESTONES if record.pages or m != "first_page"]
        assert [name for name, _ in milestones] == expected, record
        offsets = [at for _, at in milestones]
        assert offsets == sorted(offsets), milestones
        pause = record.timeline.qemu_pause_ms
        assert pause is not None and pause > 0


def test_initial_sync_and_on_demand_checkpoints_track_the_guest(
    tmp_path: Path, patched_qemu_binary: Path
) -> None:
    serial = tmp_path / "serial.log"

    async def scenario() -> None:
        sink = ReplicaSink()
        async with ticker_primary(tmp_path, patched_qemu_binary) as machine:
            # A long period: every checkpoint below is an on-demand one.
            source = CheckpointSource(machine, sink, epoch_ms=60_000)
            async with source, CheckpointTrigger(source) as trigger:
                await wait_state(source, SourceState.PROTECTED, SourceState.UNPROTECTED)
                assert source.state is SourceState.PROTECTED, source.reason

                # The initial sync described every page of every block, and device state.
                assert sink.configuration is not None
                assert sink.configuration.machine_type.startswith("pc-i440fx-")
                assert sink.blocks["pc.ram"].used_length == MEMORY_MIB << 20
                for name, block in sink.blocks.items():
                    expected = set(range(0, block.used_length, PAGE_SIZE))
                    assert sink.sync_offsets.get(name) == expected, name
                assert b"cpu" in sink.initial_device_state
                assert sink.vmdesc["page_size"] == PAGE_SIZE
                sync = source.sync
                assert sync is not None and sync.ram_bytes >= MEMORY_MIB << 20

                for _ in range(12):
                    await ticks_advance(serial)
                    printed = ticks(serial)[-1]
                    epoch = await trigger.checkpoint()
                    assert source.committed_epoch >= epoch
                    # The ticker stores N into its pages before printing "tick N", so the
                    # committed state holds at least what the guest did before the request.
                    assert sink.counter() >= printed

                # Requests made together are served by one checkpoint.
                epochs = {trigger.request_checkpoint() for _ in range(50)}
                assert len(epochs) == 1
                await trigger.wait_committed(epochs.pop())

                assert source.state is SourceState.PROTECTED, source.reason
                assert sink.violations == []
                assert sink.committed == list(range(1, source.committed_epoch + 1))
                # Each tick dirties the ticker's pages, so checkpoints carry them.
                ticker = {("pc.ram", TICKER_BASE + i * PAGE_SIZE) for i in range(TICKER_PAGES)}
                assert ticker <= set(sink.replica)
                assert max(sink.checkpoint_pages.values()) >= TICKER_PAGES
                records = source.recent()
                assert [r.epoch for r in records] == sink.committed
                assert all(r.device_bytes > 0 and r.stream_bytes > 0 for r in records)
                await assert_pause_timelines(source)
            # Closing the source leaves the guest running, unprotected.
            assert state_of(source) is SourceState.UNPROTECTED
            assert (await machine.query_status()).running
            await ticks_advance(serial)

    run(scenario)


def test_checkpoints_carry_writes_to_tlb_resident_pages(
    tmp_path: Path, patched_qemu_binary: Path
) -> None:
    # The same ticker without invlpg: its few pages stay in the TCG TLB, writable.  Stock
    # 7.2 misses these writes; the patch's TLB flush after each dirty-log sync catches
    # them (patches/qemu-7.2-colo-tcg-bql.patch).
    serial = tmp_path / "serial.log"

    async def scenario() -> None:
        sink = ReplicaSink()
        async with ticker_primary(tmp_path, patched_qemu_binary, flush_tlb=False) as machine:
            source = CheckpointSource(machine, sink, epoch_ms=60_000)
            async with source, CheckpointTrigger(source) as trigger:
                await wait_state(source, SourceState.PROTECTED, SourceState.UNPROTECTED)
                for _ in range(5):
                    await ticks_advance(serial)
                    printed = ticks(serial)[-1]
                    await trigger.checkpoint()
                    # The ticker stores N into its pages before printing "tick N".
                    assert sink.counter() >= printed
                assert sink.violations == []

    run(scenario)


def test_the_guest_runs_while_its_checkpoint_is_forwarded(
    tmp_path: Path, patched_qemu_binary: Path
) -> None:
    """LOADED goes once the checkpoint is read and held; the sink gets it after that, so
    the guest runs (and ticks) while ``commit(N)`` has not returned, and N is reported
    committed only after it did."""

    async def scenario() -> None:
        sink = ReplicaSink()
        seen: list[tuple[int, int]] = []
        async with ticker_primary(tmp_path, patched_qemu_binary) as machine:
            source = CheckpointSource(machine, sink, epoch_ms=60_000)

            async def commit_while_the_guest_runs(epoch: int) -> None:
                await ticks_advance(tmp_path / "serial.log")
                seen.append((epoch, source.committed_epoch))

            sink.on_commit = commit_while_the_guest_runs
            async with source, CheckpointTrigger(source) as trigger:
                await wait_state(source, SourceState.PROTECTED, SourceState.UNPROTECTED)
                for expected in (1, 2, 3):
                    assert await trigger.checkpoint() == expected
                assert source.state is SourceState.PROTECTED, source.reason
        assert seen == [(1, 0), (2, 1), (3, 2)]
        assert sink.violations == []

    run(scenario)


def test_a_window_of_0_keeps_the_guest_paused_until_commit_returns(
    tmp_path: Path, patched_qemu_binary: Path
) -> None:
    """``in_flight=0``, the synchronous protocol: N goes to the sink before LOADED."""

    async def scenario() -> None:
        sink = ReplicaSink()
        seen: list[tuple[int, str, bool]] = []
        async with ticker_primary(tmp_path, patched_qemu_binary) as machine:

            async def slow_commit(epoch: int) -> None:
                # QEMU is waiting for VMSTATE_LOADED: the VM must stay stopped meanwhile.
                before = await machine.query_status()
                await asyncio.sleep(0.3)  # a slow standby: the behaviour under test
                after = await machine.query_status()
                seen.append((epoch, before.status, before.running or after.running))

            sink.on_commit = slow_commit
            source = CheckpointSource(machine, sink, epoch_ms=60_000, in_flight=0)
            async with source, CheckpointTrigger(source) as trigger:
                await wait_state(source, SourceState.PROTECTED, SourceState.UNPROTECTED)
                for _ in range(3):
                    await trigger.checkpoint()
                    # Resumed only after the commit: the guest ticks again.
                    await ticks_advance(tmp_path / "serial.log")
                assert source.state is SourceState.PROTECTED, source.reason
        assert [(epoch, running) for epoch, _, running in seen] == [
            (1, False),
            (2, False),
            (3, False),
        ]
        assert {status for _, status, _ in seen} == {"colo"}

    run(scenario)


def test_standby_lost_during_a_checkpoint_leaves_the_guest_running(
    tmp_path: Path, patched_qemu_binary: Path
) -> None:
    serial = tmp_path / "serial.log"

    async def scenario() -> None:
        sink = ReplicaSink()

        async def lose_standby(epoch: int) -> None:
            if epoch == 3:
                raise ConnectionResetError("standby went away")

        sink.on_commit = lose_standby
        async with ticker_primary(tmp_path, patched_qemu_binary) as machine:
            source = CheckpointSource(machine, sink, epoch_ms=60_000)
            async with source, CheckpointTrigger(source) as trigger:
                await wait_state(source, SourceState.PROTECTED, SourceState.UNPROTECTED)
                assert await trigger.checkpoint() == 1
                assert await trigger.checkpoint() == 2
                with pytest.raises(CheckpointError, match="will not be committed"):
                    await trigger.checkpoint()
                await wait_state(source, SourceState.UNPROTECTED, SourceState.FAILED)
                assert source.state is SourceState.UNPROTECTED
                assert "standby went away" in source.reason
                assert source.committed_epoch == 2
                assert (await machine.query_status()).running
                await ticks_advance(serial)
                migration = await machine.execute("query-migrate")
                assert migration["status"] == "completed"

            # Protection can be started again on the same running guest.
            again = ReplicaSink()
            source = CheckpointSource(machine, again, epoch_ms=60_000)
            async with source, CheckpointTrigger(source) as trigger:
                await wait_state(source, SourceState.PROTECTED, SourceState.UNPROTECTED)
                assert source.state is SourceState.PROTECTED, source.reason
                await ticks_advance(serial)
                printed = ticks(serial)[-1]
                assert await trigger.checkpoint() == 1
                assert again.counter() >= printed
                assert again.violations == []
            await ticks_advance(serial)

    run(scenario)


def test_standby_lost_during_the_initial_sync_leaves_the_guest_running(tmp_path: Path) -> None:
    # Debian's QEMU is enough here: no checkpoint is ever taken.
    stock_qemu = prerequisites.stock_qemu()

    class FailingSync(ReplicaSink):
        async def sync_pages(self, batch: PageBatch) -> None:
            raise BrokenPipeError("standby closed the connection")

    async def scenario() -> None:
        async with ticker_primary(tmp_path, stock_qemu) as machine:
            source = CheckpointSource(machine, FailingSync(), epoch_ms=100)
            async with source:
                await wait_state(source, SourceState.UNPROTECTED, SourceState.FAILED)
                assert source.state is SourceState.UNPROTECTED, source.reason
                assert "standby closed the connection" in source.reason
                with pytest.raises(CheckpointError):
                    await source.wait_committed(1)
                assert (await machine.query_status()).running
                await ticks_advance(tmp_path / "serial.log")

    run(scenario)


def test_epoch_must_be_a_positive_u32() -> None:
    for bad in (0, -5, 1 << 32):
        with pytest.raises(CheckpointError, match="epoch"):
            CheckpointSource(None, ReplicaSink(), epoch_ms=bad)  # type: ignore[arg-type]
