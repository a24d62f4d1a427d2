"""Manual failover from the standby's replica, end to end on real TCG guests (no network).

One Linux guest running the ``ticks`` workload (``tick N`` every 200 ms on ttyS0) is booted
once.  Each round protects the running guest with a CheckpointSource whose sink is a
ReplicaApplier (in-process), lets it run with periodic and on-demand checkpoints, kills the
guest's QEMU with SIGKILL at a random moment, and fails over from the replica.  The QEMU
started by the failover is the primary of the next round, so every round also re-syncs a
new replica generation while an older (handed-over) one exists.

What a round checks on the failover QEMU's own serial log:
- no reboot: neither the kernel's banner nor any ``kemari-guest:`` init line appears;
- the first tick follows the last tick L the primary printed before the checkpoint it
  resumed from was taken: L+1, or L+2 if that checkpoint caught L+1 half printed (the
  counter never goes back behind a committed checkpoint and skips nothing the checkpoint
  did not hold), and never beyond the last tick the primary printed at all, plus one;
- the counter then goes on one by one;
- ``fail_over`` reports exactly the epoch the replica had committed.

Needs Kemari's patched QEMU (``kemari qemu build``) and the guest image
(``kemari image build``); without them the tests fail with that fix, they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from support import prerequisites
from ticker_rom import ticker_rom

from kemari.checkpoint import CheckpointSource, CheckpointTrigger, PageBatch, SourceState
from kemari.errors import FailoverError, KemariError
from kemari.failover import fail_over
from kemari.image.builder import GuestImage
from kemari.qemu.cmdline import MachineSpec
from kemari.qemu.machine import QemuMachine
from kemari.replica.applier import ApplierState, ReplicaApplier
from kemari.stream import Configuration, RamBlockList
from kemari.testbed.wait import async_wait_for

pytestmark = pytest.mark.guest

MEMORY_MIB = 128
TICKER_MEMORY_MIB = 64
APPEND = "console=ttyS0 kemari.workload=ticks"
EPOCH_MS = 100
TICK_RE = re.compile(rb"^tick (\d+)\r?$", re.MULTILINE)  # the tty sends \r\n
BOOT_MARKERS = (b"Linux version", b"kemari-guest:")
ROUND_TIMEOUT_S = 120.0
POLL_S = 0.02


def serial_ticks(path: Path) -> list[int]:
    """Every complete ``tick N`` line of a serial log, in order."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    # A line still being printed has no newline yet: only count finished lines.
    data = data[: data.rfind(b"\n") + 1]
    return [int(match) for match in TICK_RE.findall(data)]


def tick_reached(path: Path) -> int:
    """The last tick a serial log shows begun: its last complete ``tick N`` line, or N+1
    when a line after it was being printed (a QEMU killed mid-line leaves a fragment)."""
    data = path.read_bytes()
    ticks = serial_ticks(path)
    return ticks[-1] + (0 if data.endswith(b"\n") else 1)


async def wait_ticks(path: Path, count: int, timeout_s: float = 60.0) -> list[int]:
    """Wait until ``path`` holds at least ``count`` complete tick lines; return them."""

    def enough() -> list[int] | None:
        ticks = serial_ticks(path)
        return ticks if len(ticks) >= count else None

    return await async_wait_for(enough, f"{count} ticks in {path.name}", timeout_s, POLL_S)


class ObservedApplier:
    """A CheckpointSink that forwards to a ReplicaApplier and notes the primary's last tick.

    The source runs the synchronous protocol (a window of 0): the sink gets each
    checkpoint before LOADED, so at each commit the primary's VM is stopped (since
    before ``begin``) and every tick in its serial log was printed before the
    checkpoint's state was taken.  (Pipelined, the sink gets it after the guest resumed;
    those kills are in test_protocol_phases.py.)
    """

    def __init__(
        self, applier: ReplicaApplier, primary_log: Path, standby: MachineSpec, qemu: Path
    ) -> None:
        self.applier = applier
        self.primary_log = primary_log
        self.standby = standby
        self.qemu = qemu
        self.tick_at_commit: dict[int, int] = {}
        self.refusal: str | None = None

    def _note(self, epoch: int) -> None:
        ticks = serial_ticks(self.primary_log)
        self.tick_at_commit[epoch] = ticks[-1] if ticks else 0

    async def begin_sync(self, configuration: Configuration, blocks: RamBlockList) -> None:
        await self.applier.begin_sync(configuration, blocks)

    async def sync_pages(self, batch: PageBatch) -> None:
        await self.applier.sync_pages(batch)
        if self.refusal is None:
            # In the middle of the initial sync: nothing is committed, failover must refuse.
            try:
                await fail_over(self.applier, self.standby, self.qemu)
            except FailoverError as exc:
                self.refusal = str(exc)
            else:
                self.refusal = "failover during the initial sync was not refused"

    async def end_sync(self, device_state: bytes, vmdesc: bytes) -> None:
        await self.applier.end_sync(device_state, vmdesc)
        self._note(0)

    async def begin(self, epoch: int) -> None:
        await self.applier.begin(epoch)

    async def pages(self, batch: PageBatch) -> None:
        await self.applier.pages(batch)

    async def device_state(self, epoch: int, data: bytes) -> None:
        await self.applier.device_state(epoch, data)

    async def commit(self, epoch: int) -> None:
        await self.applier.commit(epoch)
        self._note(epoch)

    async def acknowledged(self, epoch: int) -> None:
        await self.applier.acknowledged(epoch)


@pytest.fixture
def replica_root() -> Iterator[Path]:
    # tmpfs: the replica's commits skip fsync there (docs/replica.md).
    root = Path(tempfile.mkdtemp(prefix="kemari-failover-", dir="/dev/shm"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def machine_spec(tmp_path: Path, name: str, image: GuestImage | None) -> MachineSpec:
    """The Linux ticks guest, or (``image`` None) the ticker firmware with TLB flushes."""
    if image is None:
        return MachineSpec(
            name=name,
            accel="tcg",
            qmp_socket=tmp_path / f"{name}.qmp",
            memory_mib=TICKER_MEMORY_MIB,
            bios=ticker_rom(
                tmp_path / "ticker.rom", pages=16, delay_tsc=50_000_000, flush_tlb=True
            ),
            serial_log=tmp_path / f"{name}.log",
        )
    return MachineSpec(
        name=name,
        accel="tcg",
        qmp_socket=tmp_path / f"{name}.qmp",
        memory_mib=MEMORY_MIB,
        kernel=image.kernel,
        initrd=image.initrd,
        append=APPEND,
        serial_log=tmp_path / f"{name}.log",
    )


@contextlib.asynccontextmanager
async def booted_primary(spec: MachineSpec, qemu: Path) -> AsyncIterator[QemuMachine]:
    async with QemuMachine(spec, qemu) as machine:
        assert spec.serial_log is not None
        await wait_ticks(spec.serial_log, 2)
        yield machine


async def wait_protected(source: CheckpointSource) -> None:
    async with asyncio.timeout(60):
        while source.state is SourceState.SYNCING:
            await source.wait_progress(1.0)
    assert source.state is SourceState.PROTECTED, source.reason


async def on_demand_loop(trigger: CheckpointTrigger, pause_s: float) -> None:
    """Checkpoint on demand until protection ends; ``pause_s`` 0 means back to back."""
    with contextlib.suppress(KemariError):
        while True:
            await trigger.checkpoint()
            await asyncio.sleep(pause_s)  # pacing: the checkpoint rate under test


async def protect_then_kill(
    primary: QemuMachine,
    primary_log: Path,
    applier: ReplicaApplier,
    standby: MachineSpec,
    run_s: float,
    on_demand_pause_s: float,
    qemu: Path,
) -> ObservedApplier:
    """Protect ``primary`` into ``applier``, run ``run_s`` seconds, then SIGKILL its QEMU."""
    observed = ObservedApplier(applier, primary_log, standby, qemu)
    source = CheckpointSource(primary, observed, epoch_ms=EPOCH_MS, in_flight=0)
    await source.start()
    try:
        await wait_protected(source)
        async with CheckpointTrigger(source) as trigger:
            loop = asyncio.create_task(on_demand_loop(trigger, on_demand_pause_s))
            await asyncio.sleep(run_s)  # the kill comes at a random moment: what is tested
            assert primary.pid is not None
            os.kill(primary.pid, signal.SIGKILL)
            await primary.wait()
            await asyncio.wait_for(loop, 30)
    finally:
        await source.close()
    assert source.committed_epoch >= 1, "no checkpoint was committed before the kill"
    assert observed.refusal is not None and "no committed replica" in observed.refusal
    assert not standby.qmp_socket.exists()  # the refused failover started no QEMU
    return observed


async def fail_over_and_check(
    applier: ReplicaApplier,
    observed: ObservedApplier,
    spec: MachineSpec,
    qemu: Path,
) -> QemuMachine:
    """Fail over from ``applier``; check the new serial log; return the running QEMU."""
    assert spec.serial_log is not None
    committed = applier.committed_epoch
    assert committed is not None
    primary_reached = tick_reached(observed.primary_log)
    result = await fail_over(applier, spec, qemu)
    machine = result.machine
    try:
        assert result.epoch == committed
        assert applier.state is ApplierState.HANDED_OVER
        after = await wait_ticks(spec.serial_log, 4)
        log = spec.serial_log.read_bytes()
        assert not [marker for marker in BOOT_MARKERS if marker in log], log[:400]
        # The checkpoint was taken after "tick L" was printed and before "tick L+2" could
        # start (the counter is incremented after its line is printed): the guest goes on
        # with L+1, or L+2 when it had begun printing L+1 (that line's rest then comes
        # out as a fragment).  And never beyond the tick after the last one the primary
        # itself began (it may have been killed in the middle of printing that line).
        last = observed.tick_at_commit[committed]
        assert last < after[0] <= min(last + 2, primary_reached + 1), (
            last,
            after,
            primary_reached,
        )
        assert after == list(range(after[0], after[0] + len(after))), after
    except BaseException:
        await machine.shutdown()
        raise
    return machine


@pytest.mark.parametrize("guest", ["linux", "ticker"])
def test_failover_continues_the_counter_after_kill_rounds(
    tmp_path: Path, replica_root: Path, guest: str, patched_qemu_binary: Path
) -> None:
    """Three rounds of protect → SIGKILL at a random moment → fail over; the last round
    checkpoints back to back (on demand, as fast as possible)."""
    guest_image = prerequisites.guest_image() if guest == "linux" else None
    seed = os.environ.get("KEMARI_TEST_SEED", str(time.time_ns()))
    print(f"KEMARI_TEST_SEED={seed}")  # shown on failure: replays the same kill moments
    rng = random.Random(seed)

    async def rounds() -> None:
        spec = machine_spec(tmp_path, "primary", guest_image)
        async with contextlib.AsyncExitStack() as stack:
            machine = await stack.enter_async_context(booted_primary(spec, patched_qemu_binary))
            for round_number, pause_s in enumerate((0.3, 0.1, 0.0), start=1):
                applier = stack.enter_context(ReplicaApplier(replica_root))
                assert spec.serial_log is not None
                standby = machine_spec(tmp_path, f"failover{round_number}", guest_image)
                observed = await protect_then_kill(
                    machine,
                    spec.serial_log,
                    applier,
                    standby,
                    rng.uniform(1.0, 3.0),
                    pause_s,
                    patched_qemu_binary,
                )
                spec = standby
                machine = await fail_over_and_check(applier, observed, spec, patched_qemu_binary)
                stack.push_async_callback(machine.shutdown)

    asyncio.run(asyncio.wait_for(rounds(), 3 * ROUND_TIMEOUT_S))


def test_failover_without_any_replica_is_refused(tmp_path: Path, replica_root: Path) -> None:
    """A standby that never received an initial sync refuses and starts no QEMU (not even
    a binary that does not exist: no QEMU is needed for this test)."""
    spec = MachineSpec(name="standby", accel="tcg", qmp_socket=tmp_path / "standby.qmp")

    async def scenario() -> None:
        with ReplicaApplier(replica_root) as applier:
            with pytest.raises(FailoverError, match="no committed replica"):
                await fail_over(applier, spec, Path("/nonexistent/qemu"))
            assert applier.committed_epoch is None
            assert applier.state is ApplierState.IDLE
        assert not spec.qmp_socket.exists()

    asyncio.run(scenario())
