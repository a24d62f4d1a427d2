"""Compressed page frames (RAM_PAGES_ZSTD): round trip, negotiation, bounded inflation."""

from __future__ import annotations

import os
import struct
import zlib
from array import array

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from kemari.checkpoint.sender import page_frames
from kemari.errors import TransactionError
from kemari.stream import RamPageRun
from kemari.stream.format import PAGE_SIZE
from kemari.transaction.session import TransactionTracker
from kemari.transaction.wire import (
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    Begin,
    FrameDecoder,
    FrameEncoder,
    FrameType,
    RamBlock,
    RamBlocks,
    RamPages,
    ZstdRamPages,
    compress_pages,
    decompress_pages,
    page_indices,
)


def _page(seed: bytes) -> bytes:
    return (seed * (PAGE_SIZE // len(seed) + 1))[:PAGE_SIZE]


pages_data = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=16).map(_page),
        st.binary(min_size=PAGE_SIZE, max_size=PAGE_SIZE),
    ),
    min_size=1,
    max_size=6,
)


def _unsized(data: bytes) -> bytes:
    stream = zstandard.ZstdCompressor().compressobj()
    return stream.compress(data) + stream.flush()


def _decoder(zstd: bool = True) -> FrameDecoder:
    decoder = FrameDecoder()
    decoder.zstd_pages = zstd
    return decoder


def _raw_frame(payload: bytes, ftype: int = FrameType.RAM_PAGES_ZSTD) -> bytes:
    head = HEADER.pack(MAGIC, 1, ftype, 0, 1, 0, len(payload), zlib.crc32(payload), 0)[:32]
    return head + zlib.crc32(head).to_bytes(4, "big") + payload


def _zstd_payload(data_count: int, compressed: bytes, zero_count: int = 0) -> bytes:
    indices = struct.pack(f">{data_count + zero_count}I", *range(data_count + zero_count))
    return struct.pack(">HII", 0, data_count, zero_count) + indices + compressed


@given(pages_data, st.lists(st.integers(0, 1 << 20), max_size=4))
def test_compressed_frames_decode_to_the_same_pages(pages, zero_pages):
    frame = ZstdRamPages(
        5,
        2,
        page_indices(range(len(pages))),
        page_indices(zero_pages),
        compress_pages([memoryview(page) for page in pages]),
    )
    wire = b"".join(bytes(part) for part in FrameEncoder().encode(frame))
    (decoded,) = _decoder().feed(wire)
    payload = decoded.payload
    assert isinstance(payload, RamPages)
    assert (payload.epoch, payload.block_index) == (5, 2)
    assert list(payload.data_pages) == list(range(len(pages)))
    assert list(payload.zero_pages) == zero_pages
    assert bytes(payload.data) == b"".join(pages)


def test_compressed_frames_are_refused_unless_negotiated():
    frame = ZstdRamPages(1, 0, page_indices([0]), page_indices([]), compress_pages([_page(b"a")]))
    wire = b"".join(bytes(part) for part in FrameEncoder().encode(frame))
    with pytest.raises(TransactionError, match="did not negotiate 'zstd-pages'"):
        _decoder(zstd=False).feed(wire)


@pytest.mark.parametrize(
    ("compressed", "count", "message"),
    [
        # Declares more than its page count: refused before anything is inflated.
        (zstandard.ZstdCompressor().compress(bytes(3 * PAGE_SIZE)), 2, "declares 12288 bytes"),
        # Declares nothing (streamed without a size): the size cannot be checked up front.
        (_unsized(bytes(PAGE_SIZE)), 1, "declares -1"),
        (zstandard.ZstdCompressor().compress(bytes(PAGE_SIZE)) + b"tail", 1, "trailing"),
        (b"not zstd at all", 1, "not a zstd frame"),
        (zstandard.ZstdCompressor().compress(bytes(PAGE_SIZE))[:-3], 1, "decompress|inflates"),
    ],
)
def test_hostile_compressed_data_is_refused_with_one_error(compressed, count, message):
    with pytest.raises(TransactionError, match=message):
        decompress_pages(compressed, count)
    with pytest.raises(TransactionError, match=message):
        _decoder().feed(_raw_frame(_zstd_payload(count, compressed)))


def test_a_page_count_beyond_the_payload_limit_is_refused_before_inflating():
    count = MAX_PAYLOAD // PAGE_SIZE + 1
    # A tiny frame of zeros that declares a size above MAX_PAYLOAD.
    bomb = zstandard.ZstdCompressor().compress(bytes(count * PAGE_SIZE))
    assert len(bomb) < 1 << 16
    with pytest.raises(TransactionError, match="would inflate beyond"):
        decompress_pages(bomb, count)


@given(st.binary(max_size=200), st.integers(1, 4))
def test_arbitrary_bytes_never_escape_as_anything_but_a_transaction_error(data, count):
    try:
        pages = decompress_pages(data, count)
    except TransactionError:
        return
    assert len(pages) == count * PAGE_SIZE


def test_the_tracker_counts_compressed_pages_like_plain_ones():
    tracker = TransactionTracker()
    tracker.apply(Begin(0))
    tracker.apply(RamBlocks(0, (RamBlock("pc.ram", 16 * PAGE_SIZE),), "pc", 2))
    data = compress_pages([_page(b"x"), _page(b"y")])
    tracker.apply(ZstdRamPages(0, 0, page_indices([1, 2]), page_indices([3]), data))
    summary = tracker.commit_summary()
    assert (summary.data_pages, summary.zero_pages) == (2, 1)
    with pytest.raises(TransactionError, match="outside block"):
        tracker.apply(ZstdRamPages(0, 0, page_indices([16]), page_indices([]), data))


def test_the_sender_compresses_only_what_pays():
    blocks, block_pages = {"pc.ram": 0}, [64]
    compressible = [
        RamPageRun("pc.ram", page_indices(range(4)), [memoryview(_page(b"ab"))] * 4, array("I"))
    ]
    noise = [memoryview(os.urandom(PAGE_SIZE)) for _ in range(4)]
    random = [RamPageRun("pc.ram", page_indices(range(4, 8)), noise, array("I"))]
    (small,) = page_frames(1, compressible, blocks, block_pages, compress=True)
    assert isinstance(small, ZstdRamPages)
    assert len(small.compressed) < PAGE_SIZE
    frames = list(page_frames(1, random, blocks, block_pages, compress=True))
    assert all(isinstance(frame, RamPages) for frame in frames)
    zero_only = [RamPageRun("pc.ram", array("I"), [], page_indices([9]))]
    (zeros,) = page_frames(1, zero_only, blocks, block_pages, compress=True)
    assert isinstance(zeros, RamPages)
