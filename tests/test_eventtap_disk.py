"""Disk event-tap: the overlay against a byte-array model, a real NBD client, the standby side.

The guest test (marker ``guest``) lives in tests/test_eventtap_disk_guest.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import prerequisites

from kemari.checkpoint import CheckpointSource, CheckpointTrigger, SourceState
from kemari.config import StorageMode
from kemari.errors import EventTapError, FailoverError
from kemari.eventtap.disk import OverlayBackend, hold_in
from kemari.eventtap.diskcopy import DiskCopier
from kemari.eventtap.disktap import DiskTap
from kemari.eventtap.outputs import OutputLog
from kemari.nbd.backend import RawFileBackend
from kemari.nbd.server import NbdServer
from kemari.outputs import DiskOp, DiskWrite, decode_disk_write, encode_disk_write, record_of
from kemari.replica import disks as standby_disks
from kemari.replica.disks import StandbyDisks
from kemari.testbed.wait import async_wait_for

SIZE = 64 * 1024


@pytest.fixture
def image() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="kemari-overlay-"))
    path = directory / "disk.raw"
    path.write_bytes(bytes(range(256)) * (SIZE // 256))
    try:
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class Clock:
    """The epoch writes are tagged with (what the agent derives from VMSTATE_SENDs)."""

    def __init__(self) -> None:
        self.epoch = 1

    def __call__(self) -> int:
        return self.epoch


# -- the model -------------------------------------------------------------------------

offsets = st.integers(0, SIZE - 1)
operation = st.one_of(
    st.tuples(st.just("write"), offsets, st.integers(1, 9000), st.integers(0, 255)),
    st.tuples(st.just("zero"), offsets, st.integers(1, 9000), st.booleans()),
    st.tuples(st.just("trim"), offsets, st.integers(1, 9000), st.just(0)),
    st.tuples(st.just("read"), offsets, st.integers(1, 9000), st.just(0)),
    st.tuples(st.just("epoch"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("release"), st.integers(0, 3), st.just(0), st.just(0)),
    st.tuples(st.just("race"), offsets, st.integers(1, 9000), st.just(0)),
)


def pattern(offset: int, length: int, seed: int) -> bytes:
    return bytes((seed + 7 * i) & 0xFF for i in range(offset, offset + length))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(operation, max_size=40))
def test_overlay_matches_the_model(image: Path, ops: list[tuple[str, int, int, int]]) -> None:
    """Reads equal the model with every write; the base equals the model with the
    released epochs' writes only; records go out in order with their epochs."""
    original = image.read_bytes()

    async def scenario() -> None:
        model = bytearray(original)
        writes: list[tuple[int, int, int, bytes]] = []  # epoch, offset, length, content
        emitted: list[DiskWrite] = []
        clock = Clock()
        released = 0
        async with RawFileBackend.open(image) as base:
            overlay = OverlayBackend(base)
            overlay.protect(clock, emitted.append)
            for name, offset, raw_length, arg in ops:
                length = min(raw_length, SIZE - offset)
                if name == "write":
                    data = pattern(offset, length, arg)
                    await overlay.write(offset, data, fua=bool(arg & 1))
                elif name in ("zero", "trim"):
                    data = bytes(length)
                    if name == "zero":
                        await overlay.write_zeroes(offset, length, may_trim=bool(arg), fua=False)
                    else:
                        await overlay.trim(offset, length, fua=False)
                elif name == "read":
                    assert await overlay.read(offset, length) == model[offset : offset + length]
                    continue
                elif name == "race":
                    # A read running while a release writes the base sees the same bytes.
                    target = min(released + 1, clock.epoch - 1)
                    got, _ = await asyncio.gather(
                        overlay.read(offset, length), overlay.release(target)
                    )
                    released = max(released, target)
                    assert got == model[offset : offset + length]
                    continue
                elif name == "epoch":
                    clock.epoch += 1
                    continue
                else:
                    # Only committed epochs are released: the current one never is.
                    target = min(released + offset, clock.epoch - 1)
                    await overlay.flush()
                    await overlay.release(target)
                    released = max(released, target)
                    base_model = bytearray(original)
                    for epoch, start, size, content in writes:
                        if epoch <= released:
                            base_model[start : start + size] = content
                    assert image.read_bytes() == base_model
                    continue
                model[offset : offset + length] = data
                writes.append((clock.epoch, offset, length, data))
            assert await overlay.read(0, SIZE) == model
            held = [record for record in emitted if record.op is not DiskOp.RELEASED]
            assert [(r.epoch, r.offset, r.length) for r in held] == [
                (epoch, start, size) for epoch, start, size, _ in writes
            ]
            assert overlay.held_epochs() == sorted({e for e, *_ in writes if e > released})
            await overlay.unprotect()
            assert overlay.held_writes == 0 and overlay.held_bytes == 0
        assert image.read_bytes() == model

    asyncio.run(scenario())


def test_pressure_requests_a_checkpoint_and_still_answers(image: Path) -> None:
    async def scenario() -> None:
        requests: list[int] = []
        async with RawFileBackend.open(image) as base:
            overlay = OverlayBackend(
                base, max_held_bytes=8192, on_pressure=lambda: requests.append(1)
            )
            overlay.protect(Clock(), lambda record: None)
            for n in range(4):
                await overlay.write(n * 4096, b"x" * 4096, fua=True)
            assert len(requests) == 2  # the 3rd and 4th write went over 8 KiB
            assert overlay.held_bytes == 4 * 4096
            assert image.read_bytes()[:4096] != b"x" * 4096  # nothing reached the base

    asyncio.run(scenario())


def test_writes_after_unprotect_are_never_overwritten_by_older_held_ones(image: Path) -> None:
    async def scenario() -> None:
        async with RawFileBackend.open(image) as base:
            overlay = OverlayBackend(base)
            overlay.protect(Clock(), lambda record: None)
            for _ in range(50):
                await overlay.write(0, b"old" * 1000, fua=False)
            drain = asyncio.create_task(overlay.unprotect())
            await asyncio.sleep(0)  # one loop turn: the drain task starts (not a timed wait)
            await overlay.write(0, b"new" * 1000, fua=False)  # while draining
            await drain
            assert await overlay.read(0, 3000) == b"new" * 1000
        assert image.read_bytes()[:3000] == b"new" * 1000

    asyncio.run(scenario())


def test_a_decreasing_epoch_fails_the_write_instead_of_mistagging_it(image: Path) -> None:
    async def scenario() -> None:
        clock = Clock()
        async with RawFileBackend.open(image) as base:
            overlay = OverlayBackend(base)
            overlay.protect(clock, lambda record: None)
            clock.epoch = 5
            await overlay.write(0, b"a", fua=False)
            clock.epoch = 4
            with pytest.raises(OSError, match="went back"):
                await overlay.write(0, b"b", fua=False)

    asyncio.run(scenario())


# -- records ---------------------------------------------------------------------------

records = st.one_of(
    st.builds(
        lambda disk, offset, data: DiskWrite(7, disk, DiskOp.WRITE, offset, len(data), data),
        st.integers(0, 0xFFFF),
        st.integers(0, 1 << 40),
        st.binary(min_size=1, max_size=300),
    ),
    st.builds(
        lambda op, offset, length: DiskWrite(7, 0, op, offset, length),
        st.sampled_from([DiskOp.ZERO, DiskOp.PUNCH, DiskOp.TRIM]),
        st.integers(0, 1 << 40),
        st.integers(0, 1 << 25),
    ),
)


@given(record=records)
def test_record_round_trip(record: DiskWrite) -> None:
    assert decode_disk_write(7, encode_disk_write(record)) == record


@given(record=records, cut=st.integers(1, 20))
def test_truncated_or_padded_records_are_refused(record: DiskWrite, cut: int) -> None:
    encoded = encode_disk_write(record)
    with pytest.raises(EventTapError):
        decode_disk_write(7, encoded[:-cut] if cut < len(encoded) else b"")
    with pytest.raises(EventTapError):
        decode_disk_write(7, encoded + b"\0")


def test_bad_ops_and_flags_are_refused() -> None:
    good = encode_disk_write(DiskWrite(1, 0, DiskOp.TRIM, 0, 4096))
    with pytest.raises(EventTapError, match="unknown disk record op"):
        decode_disk_write(1, b"\x09" + good[1:])
    with pytest.raises(EventTapError, match="flags"):
        decode_disk_write(1, good[:3] + b"\x01" + good[4:])


# -- a real NBD client -------------------------------------------------------------------


def test_qemu_io_sees_writes_at_once_and_the_image_only_after_release(image: Path) -> None:
    """qemu-io writes through Kemari's NBD server; it reads its own data back at once,
    the image file gets it only after release of its epoch, and a flush does not wait."""
    qemu_io_program = str(prerequisites.tool("qemu-io", "qemu-utils"))
    socket_path = image.parent / "nbd.sock"
    uri = f"nbd+unix:///disk?socket={socket_path}"

    def qemu_io(*commands: str) -> str:
        argv = [qemu_io_program, "-f", "raw"]
        for command in commands:
            argv += ["-c", command]
        done = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "error" not in done.stdout.lower(), done.stdout
        return done.stdout

    async def scenario() -> None:
        clock = Clock()
        emitted: list[DiskWrite] = []
        async with RawFileBackend.open(image) as base:
            overlay = OverlayBackend(base)
            overlay.protect(clock, emitted.append)
            async with NbdServer(overlay, socket_path):
                out = await asyncio.to_thread(
                    qemu_io,
                    "write -P 0xab 4096 8192",
                    "write -z 16384 4096",
                    "flush",
                    "write -P 0xcd -f 20480 512",  # FUA
                    "read -P 0xab 4096 8192",
                    "read -P 0 16384 4096",
                    "read -P 0xcd 20480 512",
                )
                assert out.count("read ") == 3 and "Pattern verification failed" not in out
                on_disk = image.read_bytes()
                assert on_disk[4096:12288] != b"\xab" * 8192
                assert on_disk[20480:20992] != b"\xcd" * 512
                clock.epoch = 2
                await asyncio.to_thread(qemu_io, "write -P 0xee 4096 512")
                await overlay.release(1)
                on_disk = image.read_bytes()
                assert on_disk[4608:12288] == b"\xab" * 7680
                assert on_disk[16384:20480] == bytes(4096)
                assert on_disk[20480:20992] == b"\xcd" * 512
                assert on_disk[4096:4608] == b"\xab" * 512  # epoch 2 not released
                out = await asyncio.to_thread(qemu_io, "read -P 0xee 4096 512")
                assert "Pattern verification failed" not in out
                clock.epoch = 3
                await overlay.release(2)
                assert image.read_bytes()[4096:4608] == b"\xee" * 512
        epochs = [(r.epoch, r.op) for r in emitted]
        assert epochs[:3] == [(1, DiskOp.WRITE), (1, DiskOp.ZERO), (1, DiskOp.WRITE)] or epochs[
            :3
        ] == [(1, DiskOp.WRITE), (1, DiskOp.PUNCH), (1, DiskOp.WRITE)]
        assert (2, DiskOp.WRITE) in epochs
        assert os.path.getsize(image) == SIZE

    asyncio.run(scenario())


# -- transactions to a standby (in-process, through the event-tap's output log) ----------


class Primary:
    """An overlay on a real image whose records go through an OutputLog, as in the agent,
    with checkpoints simulated as the source orders them (VMSTATE_SEND, commit, release)."""

    def __init__(self, overlay: OverlayBackend, standby: StandbyDisks) -> None:
        self.overlay = overlay
        self.standby = standby
        self.log = OutputLog()
        self.epoch: int | None = None  # None: initial sync not ended
        self.committed = 0
        self.commit_event = asyncio.Event()
        overlay.protect(lambda: self.epoch, hold_in(self.log))

    def end_sync(self) -> None:
        self.epoch = 1

    async def checkpoint(self, *, release: bool = True) -> int:
        assert self.epoch is not None
        epoch = self.epoch
        self.epoch += 1  # VMSTATE_SEND: later writes belong to the next checkpoint
        await self.standby.committed_outputs(epoch, self.log.outputs_of(epoch))
        self.log.release(epoch)
        self.committed = epoch
        self.commit_event.set()
        self.commit_event = asyncio.Event()
        if release:
            await self.overlay.release(epoch)
        return epoch

    async def wait_committed(self, epoch: int) -> None:
        while self.committed < epoch:
            await self.commit_event.wait()


def random_image(path: Path, size: int, seed: int) -> None:
    path.write_bytes(random.Random(seed).randbytes(size))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32), chunk=st.sampled_from([4096, 16384, 65536]))
def test_replicated_images_are_equal_at_every_commit_after_the_copy(
    tmp_path: Path, seed: int, chunk: int
) -> None:
    """Random guest writes run during the initial copy and after it; once SYNCED is
    committed, the standby's image equals the primary's at every committed epoch."""
    rng = random.Random(seed)
    primary_path, standby_path = tmp_path / "p.raw", tmp_path / "s.raw"
    random_image(primary_path, 256 * 1024, seed)
    standby_path.write_bytes(bytes(256 * 1024))

    async def writer(overlay: OverlayBackend, count: int) -> None:
        for _ in range(count):
            offset = rng.randrange(0, overlay.size - 1)
            length = min(rng.randrange(1, 20000), overlay.size - offset)
            kind = rng.random()
            if kind < 0.7:
                await overlay.write(offset, rng.randbytes(length), fua=False)
            elif kind < 0.85:
                await overlay.write_zeroes(offset, length, may_trim=kind < 0.8, fua=False)
            else:
                await overlay.trim(offset, length, fua=False)
            await asyncio.sleep(0)  # interleave with the copier: one loop turn per write

    async def scenario() -> None:
        standby = StandbyDisks([standby_path], StorageMode.REPLICATED)
        async with RawFileBackend.open(primary_path) as base:
            overlay = OverlayBackend(base)
            primary = Primary(overlay, standby)
            await writer(overlay, 5)  # before tagging: straight to the base
            primary.end_sync()
            copier = DiskCopier(
                overlay,
                wait_committed=primary.wait_committed,
                request_checkpoint=lambda: None,
                chunk_bytes=chunk,
                max_in_flight=4 * chunk,
            )
            copy = asyncio.create_task(copier.run())
            while not copy.done():
                await writer(overlay, rng.randrange(0, 6))
                await primary.checkpoint()
            await copy
            assert standby.synced and copier.progress().fraction == 1.0
            for _ in range(5):
                await writer(overlay, rng.randrange(0, 8))
                await primary.checkpoint()
                assert standby_path.read_bytes() == primary_path.read_bytes()
        await standby.close()

    asyncio.run(scenario())


def test_shared_failover_replays_committed_writes_the_primary_never_wrote(tmp_path: Path) -> None:
    """The primary dies after commits it did not release; the standby writes them."""
    image = tmp_path / "shared.raw"
    random_image(image, 128 * 1024, 1)
    model = bytearray(image.read_bytes())

    async def scenario() -> None:
        standby = StandbyDisks([image], StorageMode.SHARED)
        base = RawFileBackend.open(image)
        overlay = OverlayBackend(base)
        primary = Primary(overlay, standby)
        primary.end_sync()
        rng = random.Random(2)
        for round_number in range(6):
            for _ in range(4):
                offset = rng.randrange(0, 120 * 1024)
                data = rng.randbytes(rng.randrange(1, 8192))
                await overlay.write(offset, data, fua=True)
                model[offset : offset + len(data)] = data
            await overlay.write_zeroes(round_number * 4096, 512, may_trim=False, fua=False)
            model[round_number * 4096 : round_number * 4096 + 512] = bytes(512)
            # The last two commits are never released by the primary.
            await primary.checkpoint(release=round_number < 4)
        # Uncommitted writes of the next epoch must not appear after failover.
        await overlay.write(0, b"uncommitted" * 100, fua=True)
        assert standby.kept_records() > 0
        await base.close()  # the primary dies: its flock goes with it
        assert image.read_bytes() != model
        done = await standby.fail_over()
        assert done[0].epochs and min(done[0].epochs) >= 4  # released epochs were dropped
        assert image.read_bytes() == model

    asyncio.run(scenario())


def test_replicated_failover_before_the_copy_completed_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        standby = StandbyDisks([tmp_path / "none.raw"], StorageMode.REPLICATED)
        with pytest.raises(FailoverError, match="initial disk copy"):
            await standby.fail_over()

    asyncio.run(scenario())


async def replicated_pair(
    tmp_path: Path,
) -> tuple[StandbyDisks, RawFileBackend, OverlayBackend, Primary]:
    """A primary image (p.raw) copied to an empty standby image (s.raw), SYNCED committed."""
    standby = StandbyDisks([tmp_path / "s.raw"], StorageMode.REPLICATED)
    primary_path = tmp_path / "p.raw"
    random_image(primary_path, 128 * 1024, 3)
    (tmp_path / "s.raw").write_bytes(bytes(128 * 1024))
    base = RawFileBackend.open(primary_path)
    overlay = OverlayBackend(base)
    primary = Primary(overlay, standby)
    primary.end_sync()
    requested = asyncio.Event()
    copier = DiskCopier(
        overlay, wait_committed=primary.wait_committed, request_checkpoint=requested.set
    )
    copy = asyncio.create_task(copier.run())
    # A checkpoint each time the copier asks for one (it asks before it waits for a commit).
    async with asyncio.timeout(60):
        while not copy.done():
            asked = asyncio.create_task(requested.wait())
            await asyncio.wait({copy, asked}, return_when=asyncio.FIRST_COMPLETED)
            asked.cancel()
            if requested.is_set():
                requested.clear()
                await primary.checkpoint()
    await copy
    return standby, base, overlay, primary


def test_replicated_images_are_flushed_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Committed writes are flushed while protected, so a failover's flush finds little."""
    monkeypatch.setattr(standby_disks, "BACKGROUND_FLUSH_INTERVAL_S", 0.0)

    async def scenario() -> None:
        standby, base, overlay, primary = await replicated_pair(tmp_path)
        for round_number in range(4):
            flushes = standby.status()[0]["background_flushes"]
            await overlay.write(round_number * 4096, b"x" * 4096, fua=False)
            await primary.checkpoint()
            # The flush runs in the backend's I/O thread.
            await async_wait_for(
                lambda flushes=flushes: standby.status()[0]["background_flushes"] > flushes,
                "a background flush",
                10,
                0.001,
            )
        [disk] = standby.status()
        assert disk["synced"] and disk["flush_error"] is None
        assert disk["background_flushes"] >= 2, disk
        await base.close()
        await standby.fail_over()
        assert (tmp_path / "s.raw").read_bytes() == (tmp_path / "p.raw").read_bytes()

    asyncio.run(scenario())


def test_a_failed_background_flush_makes_failover_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fdatasync reports a writeback error once: the image may have lost writes."""
    monkeypatch.setattr(standby_disks, "BACKGROUND_FLUSH_INTERVAL_S", 0.0)

    async def scenario() -> None:
        standby, base, overlay, primary = await replicated_pair(tmp_path)

        standby_image = tmp_path / "s.raw"
        real_flush = RawFileBackend.flush

        async def failing_flush(self: RawFileBackend) -> None:
            if self.path == standby_image:
                raise OSError(errno.EIO, "Input/output error")
            await real_flush(self)

        # Fault injection: the disk under the standby's image fails its writeback.
        monkeypatch.setattr(RawFileBackend, "flush", failing_flush)

        async def flush_failed() -> str | None:
            # A commit starts no flush while one (of the copy's writes, on the good disk)
            # still runs: commit writes until one runs into the failing disk.
            error: str | None = standby.status()[0]["flush_error"]
            if error is None:
                await overlay.write(0, b"y" * 4096, fua=False)
                await primary.checkpoint()
            return error

        error = await async_wait_for(flush_failed, "the failed background flush", 10, 0.001)
        assert "Input/output error" in error
        await base.close()
        with pytest.raises(FailoverError, match="may have lost committed writes"):
            await standby.fail_over()
        monkeypatch.undo()
        await standby.close()

    asyncio.run(scenario())


def test_pass_through_until_tagging_starts(image: Path) -> None:
    async def scenario() -> None:
        epoch: list[int | None] = [None]
        emitted: list[DiskWrite] = []
        async with RawFileBackend.open(image) as base:
            overlay = OverlayBackend(base)
            overlay.protect(lambda: epoch[0], emitted.append)
            await overlay.write(0, b"during sync", fua=False)
            assert image.read_bytes()[:11] == b"during sync" and not emitted
            epoch[0] = 1
            await overlay.write(0, b"protected!!", fua=False)
            assert image.read_bytes()[:11] == b"during sync" and len(emitted) == 1
            epoch[0] = None  # protection ends: still held (order), not emitted
            await overlay.write(100, b"after", fua=False)
            assert len(emitted) == 1 and overlay.held_writes == 2
            await overlay.unprotect()
        assert image.read_bytes()[:11] == b"protected!!"
        assert image.read_bytes()[100:105] == b"after"

    asyncio.run(scenario())


# -- DiskTap: the overlays following a protection session ---------------------------------


class SessionStub:
    """The two things DiskTap uses of a CheckpointSource and of a CheckpointTrigger."""

    def __init__(self) -> None:
        self.output_epoch: int | None = None
        self.listeners: list[object] = []
        self.requests = 0

    def add_listener(self, listener: object) -> None:
        self.listeners.append(listener)

    def request_checkpoint(self) -> int:
        self.requests += 1
        return 0


def test_disk_tap_releases_committed_epochs_drains_and_fences(tmp_path: Path) -> None:
    path = tmp_path / "tap.raw"
    random_image(path, 64 * 1024, 3)

    async def scenario() -> None:
        base = RawFileBackend.open(path)
        overlay = OverlayBackend(base, max_held_bytes=4096)
        tap = DiskTap([overlay])
        session = SessionStub()
        await tap.attach(cast(CheckpointSource, session), cast(CheckpointTrigger, session))
        assert session.listeners == [tap]
        session.output_epoch = 1
        await overlay.write(0, b"one" * 2000, fua=False)
        session.output_epoch = 2
        await overlay.write(8192, b"two" * 100, fua=False)
        assert session.requests == 2  # each write left more than 4096 bytes held
        records = [record_of(1, output) for output in tap.outputs_of(1)]
        assert [(r.op, r.offset, r.length) for r in records] == [(DiskOp.WRITE, 0, 6000)]
        tap.checkpoint_committed(1)
        await tap._drained()
        assert path.read_bytes()[:6000] == b"one" * 2000
        assert path.read_bytes()[8192:8492] != b"two" * 100
        # The RELEASED marker of epoch 1 travels in epoch 2, after epoch 2's write.
        ops = [record_of(2, output).op for output in tap.outputs_of(2)]
        assert ops == [DiskOp.WRITE, DiskOp.RELEASED]
        tap.protection_ended(SourceState.UNPROTECTED)
        await tap._drained()
        assert path.read_bytes()[8192:8492] == b"two" * 100 and not overlay.protected
        # A new session; then the guest dies uncommitted: nothing more reaches the image.
        session = SessionStub()
        await tap.attach(cast(CheckpointSource, session), cast(CheckpointTrigger, session))
        session.output_epoch = 1
        await overlay.write(0, b"lost" * 10, fua=False)
        tap.protection_ended(SourceState.FAILED)
        with pytest.raises(OSError, match="fenced"):
            await overlay.write(0, b"late", fua=False)
        await tap.close()
        await base.close()
        assert path.read_bytes()[:40] == (b"one" * 2000)[:40]

    asyncio.run(scenario())


class DiskPermit:
    """A release permit whose answers the test sets: (a) and (b) separately."""

    def __init__(self) -> None:
        self.committed = True
        self.unprotected = True

    def may_release(self, committed: bool) -> bool:
        return self.committed if committed else self.unprotected


def test_disk_tap_permit_holds_writes_until_permitted_then_fence_drops_them(
    tmp_path: Path,
) -> None:
    """docs/ha.md rule 2 for shared storage: a committed epoch's writes reach the image
    only with the permit; after protection ends unpermitted every write is held (in
    order) until release_permitted(); fence() drops what is held and fails later writes."""
    path = tmp_path / "permit.raw"
    random_image(path, 64 * 1024, 4)
    original = path.read_bytes()

    async def scenario() -> None:
        base = RawFileBackend.open(path)
        overlay = OverlayBackend(base)
        tap = DiskTap([overlay])
        permit = DiskPermit()
        tap.set_permit(permit)
        session = SessionStub()
        await tap.attach(cast(CheckpointSource, session), cast(CheckpointTrigger, session))
        session.output_epoch = 1
        await overlay.write(0, b"one" * 10, fua=False)
        permit.committed = False  # acknowledged too late: the standby may take over
        tap.checkpoint_committed(1)
        await tap._drained()
        assert path.read_bytes()[:30] == original[:30]
        permit.unprotected = False  # the record still says protected: no (b) either
        session.output_epoch = None
        tap.protection_ended(SourceState.UNPROTECTED)
        await overlay.write(100, b"after", fua=False)  # held behind the older one
        await tap._drained()
        assert path.read_bytes()[:30] == original[:30] and overlay.held_writes == 2
        assert await overlay.read(100, 5) == b"after"  # reads see held writes at once
        tap.release_permitted()  # still refused: nothing moves
        await tap._drained()
        assert overlay.held_writes == 2
        permit.unprotected = True  # drop_standby won
        tap.release_permitted()
        await tap._drained()
        assert path.read_bytes()[:30] == b"one" * 10 and path.read_bytes()[100:105] == b"after"
        assert not overlay.protected and overlay.held_writes == 0
        await overlay.write(200, b"free", fua=False)  # permitted, unprotected: straight through
        assert path.read_bytes()[200:204] == b"free"
        permit.unprotected = False  # the lease ran out: held again
        await overlay.write(300, b"held", fua=False)
        assert path.read_bytes()[300:304] == original[300:304]
        assert tap.fence() == 1
        with pytest.raises(OSError, match="fenced"):
            await overlay.write(0, b"late", fua=False)
        await tap.close()
        await base.close()
        assert path.read_bytes()[300:304] == original[300:304]

    asyncio.run(scenario())
