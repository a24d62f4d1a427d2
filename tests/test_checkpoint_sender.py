"""Cutting the parser's page runs into RAM_PAGES frames: order-preserving, validated."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stream_model import Model, build, models

from kemari.checkpoint.sender import PAGES_PER_FRAME, page_frames
from kemari.errors import CheckpointError
from kemari.stream import RamPageRun, StreamParser
from kemari.stream.format import PAGE_SIZE
from kemari.transaction.wire import RamPages, ZstdRamPages

Memory = dict[tuple[int, int], bytes]


def apply_frames(frames: list[RamPages | ZstdRamPages], memory: Memory) -> None:
    for frame in frames:
        assert isinstance(frame, RamPages)
        assert 0 < frame.page_count <= PAGES_PER_FRAME
        for page in frame.zero_pages:  # zero pages first, as the receiver applies them
            memory[(frame.block_index, page)] = bytes(PAGE_SIZE)
        for n, page in enumerate(frame.data_pages):
            memory[(frame.block_index, page)] = bytes(frame.page(n))


def model_memory(model: Model, index: dict[str, int]) -> Memory:
    """Every page record of the model's stream applied in stream order."""
    memory: Memory = {}
    sections = [*model.iterations, *(records for records, _ in model.checkpoints)]
    for records in sections:
        for record in records:
            key = (index[record.block], record.offset // PAGE_SIZE)
            memory[key] = record.data if record.data is not None else bytes(PAGE_SIZE)
    return memory


@settings(max_examples=150, deadline=None)
@given(models(max_pages=40), st.data())
def test_frames_of_parsed_runs_have_the_effect_of_the_records_in_order(
    model: Model, data: st.DataObject
) -> None:
    initial, colo, _ = build(model)
    index = {block.name: n for n, block in enumerate(model.blocks)}
    block_pages = [block.used_length // PAGE_SIZE for block in model.blocks]
    parser = StreamParser()
    memory: Memory = {}
    # The initial migration must end a read (the primary waits for an answer there).
    for part in (initial, colo):
        cuts = sorted(data.draw(st.lists(st.integers(0, len(part)), max_size=5)))
        for start, end in zip([0, *cuts], [*cuts, len(part)], strict=True):
            runs = [e for e in parser.feed(part[start:end]) if isinstance(e, RamPageRun)]
            apply_frames(list(page_frames(7, runs, index, block_pages)), memory)
    parser.finish()
    assert memory == model_memory(model, index)


def _run(data_pages: range, zero_pages: range) -> RamPageRun:
    pages = [memoryview(page.to_bytes(4, "big") * (PAGE_SIZE // 4)) for page in data_pages]
    return RamPageRun("pc.ram", array("I", data_pages), pages, array("I", zero_pages))


def test_large_runs_are_split() -> None:
    zeros_only = _run(range(0), range(PAGES_PER_FRAME * 2 + 5))
    frames = list(page_frames(1, [zeros_only], {"pc.ram": 0}, [4096]))
    assert [frame.page_count for frame in frames] == [PAGES_PER_FRAME, PAGES_PER_FRAME, 5]
    mixed = _run(range(0, 3000, 2), range(1, 1200, 2))
    frames = list(page_frames(1, [mixed], {"pc.ram": 0}, [4096]))
    assert [(len(f.data_pages), len(f.zero_pages)) for f in frames] == [
        (PAGES_PER_FRAME, 0),
        (1500 - PAGES_PER_FRAME, 0),
        (0, 600),
    ]
    memory: Memory = {}
    apply_frames(frames, memory)
    assert memory[(0, 2998)] == (2998).to_bytes(4, "big") * (PAGE_SIZE // 4)
    assert memory[(0, 1199)] == bytes(PAGE_SIZE) and len(memory) == 2100


@pytest.mark.parametrize(
    ("run", "message"),
    [
        (RamPageRun("nope", array("I"), [], array("I", [0])), "unknown RAM block"),
        (RamPageRun("pc.ram", array("I"), [], array("I", [3, 64])), "outside pc.ram"),
        (_run(range(63, 65), range(0)), "outside pc.ram"),
    ],
)
def test_runs_outside_the_blocks_are_refused(run: RamPageRun, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        list(page_frames(1, [run], {"pc.ram": 0}, [64]))


def test_runs_that_follow_each_other_share_a_frame() -> None:
    runs = [
        _run(range(0, 10), range(10, 12)),
        _run(range(12, 20), range(0)),
        _run(range(5, 7), range(0)),
    ]
    frames = list(page_frames(1, runs, {"pc.ram": 0}, [64]))
    assert [(list(f.data_pages), list(f.zero_pages)) for f in frames] == [
        ([*range(0, 10), *range(12, 20)], [10, 11]),
        ([5, 6], []),
    ]
