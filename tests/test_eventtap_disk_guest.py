"""Disk event-tap with a real guest: diskload through the overlay while checkpoints happen.

One Linux guest (workload ``diskload``: checksummed block writes with an fsync every 16)
runs on a data disk served by Kemari's NBD server over an :class:`OverlayBackend`.  It is
protected by a CheckpointSource whose sink is an in-process ReplicaApplier (as in
tests/test_failover.py) plus the standby's :class:`StandbyDisks` in ``replicated`` mode:
the disk records of each checkpoint go through the event-tap's OutputLog into the
standby's own image at commit, and the primary writes its image only after commit.

Checked:
- the guest keeps writing across many checkpoints (it never hangs at a checkpoint, the
  deadlock a waiting NBD server would cause: QEMU drains block I/O when it stops the VM);
- the initial disk copy (started while the guest writes) completes, and from then on
  the primary's and the standby's images are byte-identical (``cmp``) at every compared
  committed epoch (compared inside the commit, while the VM is stopped);
- at the end the primary's image (crash-consistent: guest stopped after protection
  ended) and the standby's (at its last committed epoch, as a failover would find it)
  replay their ext4 journal and pass ``e2fsck -fn``, and their diskload file passes the
  guest's own ``diskload-verify``.

Needs Kemari's patched QEMU (``kemari qemu build``) and the guest image.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fsck import check_diskload_disk

from kemari.checkpoint import CheckpointSource, CheckpointTrigger, PageBatch, SourceState
from kemari.config import StorageMode
from kemari.eventtap.disk import OverlayBackend, hold_in
from kemari.eventtap.diskcopy import DiskCopier
from kemari.eventtap.outputs import OutputLog
from kemari.image.builder import GuestImage
from kemari.image.disk import create_data_disk
from kemari.nbd.backend import RawFileBackend
from kemari.nbd.server import NbdServer
from kemari.outputs import record_of
from kemari.qemu.cmdline import MachineSpec, NbdDisk
from kemari.qemu.machine import QemuMachine
from kemari.replica.applier import ReplicaApplier
from kemari.replica.disks import StandbyDisks
from kemari.stream import Configuration, RamBlockList
from kemari.testbed.wait import async_wait_for

pytestmark = pytest.mark.guest

DISK_MIB = 64
EPOCH_MS = 100
COMPARED_COMMITS = 8
SYNCED_RE = re.compile(rb"diskload: seq (\d+) synced")


def synced_seqs(path: Path) -> list[int]:
    try:
        return [int(seq) for seq in SYNCED_RE.findall(path.read_bytes())]
    except FileNotFoundError:
        return []


class DiskSink:
    """ReplicaApplier for RAM plus the standby's disks fed from the output log at commit;
    the primary's overlay releases each epoch inside the commit (VM stopped)."""

    def __init__(
        self,
        applier: ReplicaApplier,
        log: OutputLog,
        standby: StandbyDisks,
        overlay: OverlayBackend,
        images: tuple[Path, Path],
    ) -> None:
        self.applier = applier
        self.log = log
        self.standby = standby
        self.overlay = overlay
        self.images = images
        self.compared: list[int] = []
        self.mismatch: list[int] = []
        self.records = 0

    async def begin_sync(self, configuration: Configuration, blocks: RamBlockList) -> None:
        await self.applier.begin_sync(configuration, blocks)

    async def sync_pages(self, batch: PageBatch) -> None:
        await self.applier.sync_pages(batch)

    async def end_sync(self, device_state: bytes, vmdesc: bytes) -> None:
        await self.applier.end_sync(device_state, vmdesc)

    async def begin(self, epoch: int) -> None:
        await self.applier.begin(epoch)

    async def pages(self, batch: PageBatch) -> None:
        await self.applier.pages(batch)

    async def device_state(self, epoch: int, data: bytes) -> None:
        await self.applier.device_state(epoch, data)

    async def commit(self, epoch: int) -> None:
        records = [record_of(epoch, output) for output in self.log.outputs_of(epoch)]
        self.records += len(records)
        # Standby side first (before the acknowledgement), then the primary may release.
        await self.standby.committed(epoch, records)
        await self.applier.commit(epoch)
        self.log.release(epoch)
        await self.overlay.release(epoch)
        if self.standby.synced and len(self.compared) < COMPARED_COMMITS:
            # The VM is stopped for this checkpoint: both images are at epoch ``epoch``.
            same = await asyncio.to_thread(
                subprocess.run, ["cmp", "-s", *map(str, self.images)], check=False
            )
            (self.compared if same.returncode == 0 else self.mismatch).append(epoch)

    async def acknowledged(self, epoch: int) -> None:
        await self.applier.acknowledged(epoch)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # tmpfs: the replica's commits skip fsync there (docs/replica.md).
    root = Path(tempfile.mkdtemp(prefix="kemari-disk-guest-", dir="/dev/shm"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_diskload_through_the_overlay_with_checkpoints_and_a_replicated_disk(
    workdir: Path, patched_qemu_binary: Path, guest_image: GuestImage
) -> None:
    image = guest_image
    primary_image, standby_image = workdir / "primary.raw", workdir / "standby.raw"
    create_data_disk(primary_image, DISK_MIB)
    with standby_image.open("wb") as handle:  # nothing in common with the primary's
        handle.truncate(DISK_MIB << 20)
    serial = workdir / "serial.log"
    spec = MachineSpec(
        name="disktap",
        accel="tcg",
        qmp_socket=workdir / "qmp.sock",
        memory_mib=128,
        kernel=image.kernel,
        initrd=image.initrd,
        append="console=ttyS0 quiet kemari.workload=diskload",
        serial_log=serial,
        disks=(NbdDisk(socket=workdir / "disk.sock", export="disk"),),
    )

    async def scenario() -> tuple[DiskSink, DiskCopier, list[int], int]:
        async with contextlib.AsyncExitStack() as stack:
            base = await stack.enter_async_context(RawFileBackend.open(primary_image))
            overlay = OverlayBackend(base, max_held_bytes=16 << 20)
            await stack.enter_async_context(NbdServer(overlay, workdir / "disk.sock"))
            machine = await stack.enter_async_context(QemuMachine(spec, patched_qemu_binary))
            await async_wait_for(lambda: synced_seqs(serial), "diskload's first sync", 120, 0.1)
            applier = stack.enter_context(ReplicaApplier(workdir / "replica"))
            standby = StandbyDisks([standby_image], StorageMode.REPLICATED)
            stack.push_async_callback(standby.close)
            log = OutputLog()
            sink = DiskSink(applier, log, standby, overlay, (primary_image, standby_image))
            source = CheckpointSource(machine, sink, epoch_ms=EPOCH_MS)
            overlay.protect(lambda: source.output_epoch, hold_in(log))
            await source.start()
            stack.push_async_callback(source.close)
            trigger = await stack.enter_async_context(CheckpointTrigger(source))
            overlay.on_pressure = trigger.request_checkpoint
            copier = DiskCopier(
                overlay,
                wait_committed=source.wait_committed,
                request_checkpoint=trigger.request_checkpoint,
                chunk_bytes=1 << 20,
                max_in_flight=8 << 20,
            )
            async with asyncio.timeout(300):
                while source.state is SourceState.SYNCING:
                    await source.wait_progress(1.0)
                assert source.state is SourceState.PROTECTED, source.reason
                seqs_protected = synced_seqs(serial)[-1]
                await copier.run()
                while len(sink.compared) + len(sink.mismatch) < COMPARED_COMMITS:
                    await trigger.checkpoint()
                    await asyncio.sleep(0.05)  # pacing: the guest writes between checkpoints
                # The guest went on writing through all those checkpoints.
                while synced_seqs(serial)[-1] < seqs_protected + 4096:
                    await source.wait_progress(1.0)
                    assert source.state is SourceState.PROTECTED, source.reason
            # No checkpoint may be in flight when protection is dropped: close() stops
            # reading QEMU's stream, and QEMU, blocked writing a large checkpoint with the
            # BQL held, would then never answer QMP.  With a one-hour epoch and the trigger
            # closed after one last checkpoint, none starts before close() (a REQUEST not
            # yet answered is harmless: QEMU sends nothing more until the REPLY).
            await source.set_epoch(3_600_000)
            await trigger.checkpoint()
            await trigger.close()
            while source.in_checkpoint:  # an extra one the trigger's retry asked for
                await source.wait_progress(1.0)
            committed = source.committed_epoch
            # Drop protection (the guest runs on unprotected), drain the overlay into the
            # primary's image, then stop the guest (QEMU drains and flushes its block I/O):
            # the primary's image is then crash-consistent, the standby's image is at the
            # last committed epoch.  (A QMP stop in COLO state would wedge QEMU.)
            await source.close()
            assert source.state is SourceState.UNPROTECTED, source.reason
            await overlay.unprotect()
            await machine.execute("stop")
            return sink, copier, synced_seqs(serial), committed

    sink, copier, seqs, committed = asyncio.run(scenario())
    assert not sink.mismatch, f"images differed at epochs {sink.mismatch}"
    assert len(sink.compared) == COMPARED_COMMITS
    assert copier.done and copier.progress().committed == DISK_MIB << 20
    assert sink.records > 0 and committed > COMPARED_COMMITS
    assert seqs == sorted(seqs)
    scratch = workdir / "check"
    scratch.mkdir()
    check_diskload_disk(primary_image, scratch, image.kguest)
    check_diskload_disk(standby_image, scratch, image.kguest)
