"""Cutting page batches into RAM_PAGES frames: order-preserving, validated."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kemari.checkpoint.sender import PAGES_PER_FRAME, page_frames
from kemari.errors import CheckpointError
from kemari.stream import RamPage, RamZeroPage
from kemari.stream.format import PAGE_SIZE

BLOCKS = {"pc.ram": 0, "vga.vram": 1}
BLOCK_PAGES = [64, 8]


def apply_records(records: list[RamPage | RamZeroPage]) -> dict[tuple[int, int], bytes]:
    memory: dict[tuple[int, int], bytes] = {}
    for record in records:
        key = (BLOCKS[record.block], record.offset // PAGE_SIZE)
        memory[key] = bytes(record.data) if isinstance(record, RamPage) else bytes(PAGE_SIZE)
    return memory


def apply_frames(records: list[RamPage | RamZeroPage]) -> dict[tuple[int, int], bytes]:
    memory: dict[tuple[int, int], bytes] = {}
    for frame in page_frames(7, records, BLOCKS, BLOCK_PAGES):
        assert frame.epoch == 7
        for page in frame.zero_pages:  # zero pages first, as the receiver applies them
            memory[(frame.block_index, page)] = bytes(PAGE_SIZE)
        for n, page in enumerate(frame.data_pages):
            memory[(frame.block_index, page)] = bytes(frame.page(n))
        assert frame.page_count <= PAGES_PER_FRAME
    return memory


record_strategy = st.one_of(
    st.builds(
        lambda page, fill: RamPage(
            "pc.ram", page * PAGE_SIZE, memoryview(bytes([fill]) * PAGE_SIZE)
        ),
        st.integers(0, 63),
        st.integers(1, 255),
    ),
    st.builds(lambda page: RamZeroPage("pc.ram", page * PAGE_SIZE, 0), st.integers(0, 63)),
    st.builds(
        lambda page: RamPage("vga.vram", page * PAGE_SIZE, memoryview(b"\x07" * PAGE_SIZE)),
        st.integers(0, 7),
    ),
)


@given(st.lists(record_strategy, max_size=80))
def test_frames_have_the_same_effect_as_the_records_in_order(records) -> None:
    assert apply_frames(records) == apply_records(records)


def test_large_batches_are_split() -> None:
    count = PAGES_PER_FRAME * 2 + 5
    records = [RamZeroPage("pc.ram", i * PAGE_SIZE, 0) for i in range(count)]
    frames = list(page_frames(1, records, BLOCKS, [count, 8]))
    assert [frame.page_count for frame in frames] == [PAGES_PER_FRAME, PAGES_PER_FRAME, 5]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (RamZeroPage("nope", 0, 0), "unknown RAM block"),
        (RamZeroPage("pc.ram", 64 * PAGE_SIZE, 0), "outside pc.ram"),
        (RamZeroPage("pc.ram", 100, 0), "outside pc.ram"),
        (RamZeroPage("pc.ram", 0, 0xFF), "not supported"),
    ],
)
def test_invalid_records_are_refused(record: RamZeroPage, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        list(page_frames(1, [record], BLOCKS, BLOCK_PAGES))
