"""A checkpoint's pages as the standby keeps them: one frame per RAM_PAGES batch, whole.

A frame holds pages of one RAM block: its zero pages (every byte ``fill``) first, then
its data pages, whose 4096-byte contents lie back to back in one buffer.  Frames apply
in order, so a page given twice ends with its last content.  Writing a frame into a
block's mapping costs one slice assignment per run of consecutive page numbers, not a
call per page; the page numbers are ``array('I')`` (u32, like RAM_PAGES' indices) and
go into the journal as they are (``tobytes``).
"""

import array
import mmap
from dataclasses import dataclass

from kemari.replica.ramfile import PAGE_SIZE

PAGE_NUMBER_TYPECODE = "I"
# Zero runs are written from one shared buffer of this many pages (bigger runs: a loop).
_FILL_PAGES = 64
_ZEROS = memoryview(bytes(_FILL_PAGES * PAGE_SIZE))
NO_PAGES: "array.array[int]" = array.array(PAGE_NUMBER_TYPECODE)


@dataclass(frozen=True, slots=True)
class PageFrame:
    """Pages of block number ``block``: ``zero_pages`` filled with ``fill``, then ``data_pages``.

    ``data`` holds ``len(data_pages)`` pages back to back and is immutable (bytes or a
    view of bytes); the arrays belong to the frame (nobody else changes them).
    """

    block: int
    fill: int
    zero_pages: "array.array[int]"
    data_pages: "array.array[int]"
    data: bytes | memoryview

    @property
    def page_count(self) -> int:
        """Zero and data pages together (a page given twice counts twice)."""
        return len(self.zero_pages) + len(self.data_pages)


def page_runs(numbers: "array.array[int]") -> list[tuple[int, int, int]]:
    """(first page number, its position in ``numbers``, length) of each run of
    consecutive page numbers, in order: ``[3, 4, 5, 9, 4]`` gives
    ``[(3, 0, 3), (9, 3, 1), (4, 4, 1)]``."""
    runs: list[tuple[int, int, int]] = []
    first = position = 0
    expected = -1
    for index, number in enumerate(numbers):
        if number != expected:
            if index:
                runs.append((first, position, index - position))
            first, position = number, index
        expected = number + 1
    if numbers:
        runs.append((first, position, len(numbers) - position))
    return runs


def write_frame(target: mmap.mmap, frame: PageFrame) -> None:
    """Write ``frame`` into ``target`` (its block's mapping): zero pages, then data pages."""
    fill = (
        _ZEROS if frame.fill == 0 else memoryview(bytes([frame.fill]) * (_FILL_PAGES * PAGE_SIZE))
    )
    for first, _, count in page_runs(frame.zero_pages):
        start, end = first * PAGE_SIZE, (first + count) * PAGE_SIZE
        while start < end:
            step = min(end - start, len(fill))
            target[start : start + step] = fill[:step]
            start += step
    data = memoryview(frame.data)
    for first, position, count in page_runs(frame.data_pages):
        target[first * PAGE_SIZE : (first + count) * PAGE_SIZE] = data[
            position * PAGE_SIZE : (position + count) * PAGE_SIZE
        ]
