"""RawFileBackend on a real image file: contents against a byte-array model, flush elision."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kemari.nbd.backend import RawFileBackend

SIZE = 256 * 1024


def new_image(directory: Path) -> Path:
    path = directory / "disk.raw"
    path.write_bytes(bytes(range(256)) * (SIZE // 256))
    return path


def test_flush_syncs_only_when_a_write_completed_since_the_last_sync(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        syncs = []
        async with RawFileBackend.open(new_image(tmp_path)) as backend:
            await backend.flush()  # the first flush always syncs: the image may be dirty
            syncs.append(backend.syncs)
            await backend.flush()
            syncs.append(backend.syncs)
            await backend.write(0, b"a" * 4096, fua=False)
            await backend.flush()
            await backend.flush()
            syncs.append(backend.syncs)
            await backend.trim(4096, 4096, fua=False)
            await backend.flush()
            syncs.append(backend.syncs)
            await backend.write_zeroes(8192, 4096, may_trim=False, fua=False)
            await backend.flush()
            syncs.append(backend.syncs)
        return syncs

    assert asyncio.run(scenario()) == [1, 1, 2, 3, 4]


def test_a_write_completing_during_a_sync_makes_the_next_flush_sync(tmp_path: Path) -> None:
    async def scenario() -> int:
        async with RawFileBackend.open(new_image(tmp_path)) as backend:
            await backend.write(0, b"a" * 4096, fua=False)
            flushing = asyncio.create_task(backend.flush())
            await asyncio.sleep(0)  # the flush has started its fdatasync
            await backend.write(4096, b"b" * 4096, fua=False)
            await flushing
            await backend.flush()  # must cover the second write
            return backend.syncs

    assert asyncio.run(scenario()) == 2


_OFFSETS = st.integers(0, SIZE // 4096 - 1).map(lambda block: block * 4096)
_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"),
            _OFFSETS,
            st.sampled_from([512, 4096, 64 * 1024, 128 * 1024]),  # inline and threaded
            st.booleans(),
        ),
        st.tuples(st.just("zero"), _OFFSETS, st.sampled_from([4096, 16384]), st.booleans()),
        st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(False)),
    ),
    max_size=25,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_OPS)
def test_contents_and_syncs_match_a_model(
    tmp_path: Path, ops: list[tuple[str, int, int, bool]]
) -> None:
    model = bytearray(bytes(range(256)) * (SIZE // 256))
    expected_syncs = 0
    dirty = True  # the image as opened may hold unsynced data

    async def scenario() -> tuple[bytes, int]:
        nonlocal expected_syncs, dirty
        async with RawFileBackend.open(new_image(tmp_path)) as backend:
            for number, (op, offset, asked, flag) in enumerate(ops):
                length = min(asked, SIZE - offset)
                if op == "write":
                    data = bytes([number % 251 + 1]) * length
                    await backend.write(offset, data, fua=flag)
                    model[offset : offset + length] = data
                    dirty = True
                elif op == "zero":
                    await backend.write_zeroes(offset, length, may_trim=flag, fua=False)
                    model[offset : offset + length] = bytes(length)
                    dirty = True
                else:
                    await backend.flush()
                    expected_syncs += dirty
                    dirty = False
            contents = await backend.read(0, SIZE)
            return contents, backend.syncs

    contents, syncs = asyncio.run(scenario())
    assert contents == bytes(model)
    assert syncs == expected_syncs
