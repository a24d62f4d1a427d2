"""Disk event-tap: the overlay against a byte-array model, a real NBD client, the standby side.

The guest test (marker ``guest``) lives in tests/test_eventtap_disk_guest.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kemari.errors import EventTapError
from kemari.eventtap.disk import (
    DiskOp,
    DiskWrite,
    OverlayBackend,
    decode_disk_write,
    encode_disk_write,
)
from kemari.nbd.backend import RawFileBackend
from kemari.nbd.server import NbdServer

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
            await asyncio.sleep(0)
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


def _nbdsh_available() -> bool:
    return shutil.which("nbdsh") is not None


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io missing")
def test_qemu_io_sees_writes_at_once_and_the_image_only_after_release(image: Path) -> None:
    """qemu-io writes through Kemari's NBD server; it reads its own data back at once,
    the image file gets it only after release of its epoch, and a flush does not wait."""
    socket_path = image.parent / "nbd.sock"
    uri = f"nbd+unix:///disk?socket={socket_path}"

    def qemu_io(*commands: str) -> str:
        argv = ["qemu-io", "-f", "raw"]
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
