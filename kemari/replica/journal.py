"""The replica's redo journal: one checkpoint's page frames and device state, then a commit record.

File layout (little-endian; one file, reused and overwritten in place, never truncated, so
tmpfs keeps its pages allocated and a journal write is a plain memory copy)::

    0      header, 64 bytes   magic "KMRJ", state, version, frame count, nonce, epoch,
                              base epoch, commit time, device-state length, data page count
    64     frame table        frame count x 16 bytes: block index, fill byte, zero count,
                              data count (u32 each)
    ..     page numbers       per frame, its zero then its data page numbers (u32 each)
    P      pages              data page count x 4096: every frame's data back to back
                              (P = first 4096-aligned byte after the page numbers)
    ..     device state       device-state length bytes
    R      commit record      magic "KMRC", crc32, nonce, R (24 bytes)

A frame is a RAM_PAGES batch as the standby received it (kemari.replica.frames): the
table, the page numbers and the data are written a frame at a time, straight from the
frame's arrays (``tobytes``) and buffer, and a redo applies the frames in order (zero
pages, then data pages), so a page given twice ends with its last content.

The crc32 covers header bytes 8..64, the frame table, the page numbers, the device state
and the record's nonce and offset.  Page bytes are not in the checksum (hashing 4 MiB per
checkpoint would cost more than writing it); they are protected by ordering instead: the
record is stored after every page, so a process crash that leaves a complete record left
every page before it, and on persistent storage the pages are msync'ed before the record
is written.  The random nonce, present in the header and in the record, means a record
left over from an earlier checkpoint at the same place can never complete a newer,
half-written journal.

``state`` (bytes 4..8, outside the checksum) says whether the journal still has to be
applied: WRITING (set before anything else is written), APPLIED or DROPPED.  A journal in
state WRITING is complete if and only if its record checks out; that is the commit point.

This file is not a kemari.persist frame: it is rewritten in place through a mapping (an
atomic replace per checkpoint would cost a fresh file and a copy of every page), and its
own header and commit record do the frame's work.  Its version is bound to the replica
layout's (``replica.json``, a persist frame read first): a replica whose layout this build
reads has a journal in this layout, so a header with another magic or version is damage
or a write cut short, and is dropped like any incomplete journal, never applied.  A new
journal layout must bump the layout format's version (version 1 kept a table entry per
page; version 2 keeps the frames).
"""

import array
import enum
import mmap
import os
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kemari import crashpoint
from kemari.errors import ReplicaError
from kemari.replica.frames import PAGE_NUMBER_TYPECODE, PageFrame
from kemari.replica.ramfile import PAGE_SIZE, reserve

HEADER_MAGIC = b"KMRJ"
RECORD_MAGIC = b"KMRC"
VERSION = 2
_HEADER = struct.Struct("<4sIIIQQQdQI4x")
_FRAME = struct.Struct("<IIII")  # block index, fill, zero count, data count
_RECORD = struct.Struct("<4sIQQ")
_STATE = struct.Struct("<I")
_STATE_OFFSET = 4
_GROWTH = 1 << 20
_BIG_ENDIAN = sys.byteorder == "big"


class JournalState(enum.IntEnum):
    """Bytes 4..8 of the header."""

    WRITING = 1
    APPLIED = 2
    DROPPED = 3


class ScanResult(enum.Enum):
    """What :meth:`Journal.scan` found."""

    NOTHING = "nothing"  # no journal, or one already applied or dropped
    COMPLETE = "complete"  # committed but maybe not (fully) applied: redo it
    INCOMPLETE = "incomplete"  # cut short before its commit record: drop it


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """One checkpoint as journaled: what a redo needs and nothing else."""

    epoch: int
    base_epoch: int
    committed_at: float
    device_state: bytes
    frames: Sequence[PageFrame]


def _round_up(value: int, unit: int) -> int:
    return (value + unit - 1) // unit * unit


def _little_endian(numbers: "array.array[int]") -> bytes:
    if _BIG_ENDIAN:
        numbers = array.array(numbers.typecode, numbers)
        numbers.byteswap()
    return numbers.tobytes()


class Journal:
    """The journal file of one replica, mapped shared; one writer (the replica's owner)."""

    def __init__(self, path: Path, *, durable: bool) -> None:
        self.path = path
        self.durable = durable
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ReplicaError(f"cannot open journal {path}: {exc}") from exc
        self._capacity = os.fstat(self._fd).st_size
        self._map: mmap.mmap | None = None
        if self._capacity:
            self._map = mmap.mmap(self._fd, self._capacity)

    def _ensure_capacity(self, size: int) -> mmap.mmap:
        if self._map is not None and size <= self._capacity:
            return self._map
        capacity = _round_up(max(size, self._capacity * 2), _GROWTH)
        reserve(self._fd, capacity, f"journal {self.path}")
        if self._map is not None:
            self._map.close()
        self._map = mmap.mmap(self._fd, capacity)
        self._capacity = capacity
        return self._map

    def write(self, record: JournalRecord) -> None:
        """Write ``record`` and its commit record; when this returns, the checkpoint is committed.

        Ordering: state WRITING first (an interrupted write is never mistaken for the
        previous, applied journal), then header, frame table, page numbers, pages, device
        state, and the commit record last.  On persistent storage everything before the
        record is msync'ed before the record is written, and the record after.  Each
        frame's page numbers and data go in with one copy each.
        """
        frames = record.frames
        table = b"".join(
            [
                _FRAME.pack(frame.block, frame.fill, len(frame.zero_pages), len(frame.data_pages))
                for frame in frames
            ]
        )
        numbers = [
            _little_endian(pages)
            for frame in frames
            for pages in (frame.zero_pages, frame.data_pages)
        ]
        numbers_size = sum(len(piece) for piece in numbers)
        page_count = sum(len(frame.data_pages) for frame in frames)
        numbers_at = _HEADER.size + len(table)
        pages_at = _round_up(numbers_at + numbers_size, PAGE_SIZE)
        device_at = pages_at + page_count * PAGE_SIZE
        record_at = device_at + len(record.device_state)
        total = record_at + _RECORD.size
        nonce = int.from_bytes(os.urandom(8), "little")
        header = _HEADER.pack(
            HEADER_MAGIC,
            JournalState.WRITING,
            VERSION,
            len(frames),
            nonce,
            record.epoch,
            record.base_epoch,
            record.committed_at,
            len(record.device_state),
            page_count,
        )
        crc = zlib.crc32(table, zlib.crc32(header[8:]))
        for piece in numbers:
            crc = zlib.crc32(piece, crc)
        crc = zlib.crc32(record.device_state, crc)
        crc = zlib.crc32(struct.pack("<QQ", nonce, record_at), crc)
        commit = _RECORD.pack(RECORD_MAGIC, crc, nonce, record_at)

        pieces: list[tuple[int, bytes | memoryview]] = [(0, header), (_HEADER.size, table)]
        position = numbers_at
        for piece in numbers:
            pieces.append((position, piece))
            position += len(piece)
        position = pages_at
        for frame in frames:
            if frame.data_pages:
                pieces.append((position, frame.data))
                position += len(frame.data)
        pieces.append((device_at, record.device_state))

        journal = self._ensure_capacity(total)
        journal[_STATE_OFFSET : _STATE_OFFSET + _STATE.size] = _STATE.pack(JournalState.WRITING)
        byte_limit = crashpoint.limit("journal-bytes")
        if byte_limit is not None:
            self._write_until_crash(journal, [*pieces, (record_at, commit)], byte_limit)
        for position, data in pieces:
            journal[position : position + len(data)] = data
        if self.durable:
            journal.flush(0, record_at)
        journal[record_at:total] = commit
        if self.durable:
            journal.flush(0, total)
        crashpoint.reached("journal-complete")

    @staticmethod
    def _write_until_crash(
        journal: mmap.mmap, pieces: list[tuple[int, bytes | memoryview]], byte_limit: int
    ) -> None:
        """Crash hook: write the first ``byte_limit`` journal bytes in order, then SIGKILL."""
        written = 0
        for position, data in pieces:
            take = min(len(data), byte_limit - written)
            journal[position : position + take] = bytes(data[:take])
            written += take
            if written >= byte_limit:
                crashpoint.kill()

    def scan(self) -> tuple[ScanResult, JournalRecord | None]:
        """Find whether a committed checkpoint still has to be (re)applied.

        Every length is checked against the file before use; anything that does not add
        up is an incomplete journal.  Page data are copied out of the mapping, a frame at
        a time.
        """
        journal = self._map
        if journal is None or self._capacity < _HEADER.size:
            return ScanResult.NOTHING, None
        (
            magic,
            state,
            version,
            frame_count,
            nonce,
            epoch,
            base_epoch,
            committed_at,
            device_length,
            page_count,
        ) = _HEADER.unpack_from(journal, 0)
        if magic != HEADER_MAGIC or state in (JournalState.APPLIED, JournalState.DROPPED):
            return (ScanResult.NOTHING if magic == HEADER_MAGIC else ScanResult.INCOMPLETE), None
        if state != JournalState.WRITING or version != VERSION:
            return ScanResult.INCOMPLETE, None
        numbers_at = _HEADER.size + _FRAME.size * frame_count
        if numbers_at > self._capacity:
            return ScanResult.INCOMPLETE, None
        table = journal[_HEADER.size : numbers_at]
        counts = _numbers(table)
        zero_total, data_total = sum(counts[2::4]), sum(counts[3::4])
        numbers_end = numbers_at + 4 * (zero_total + data_total)
        if data_total != page_count or numbers_end > self._capacity:
            return ScanResult.INCOMPLETE, None
        pages_at = _round_up(numbers_end, PAGE_SIZE)
        device_at = pages_at + page_count * PAGE_SIZE
        record_at = device_at + device_length
        if record_at + _RECORD.size > self._capacity:
            return ScanResult.INCOMPLETE, None
        record_magic, record_crc, record_nonce, record_offset = _RECORD.unpack_from(
            journal, record_at
        )
        if record_magic != RECORD_MAGIC or record_nonce != nonce or record_offset != record_at:
            return ScanResult.INCOMPLETE, None
        page_numbers = journal[numbers_at:numbers_end]
        device_state = journal[device_at:record_at]
        crc = zlib.crc32(journal[8 : _HEADER.size])
        crc = zlib.crc32(table, crc)
        crc = zlib.crc32(page_numbers, crc)
        crc = zlib.crc32(device_state, crc)
        crc = zlib.crc32(struct.pack("<QQ", nonce, record_at), crc)
        if crc != record_crc:
            return ScanResult.INCOMPLETE, None
        numbers = _numbers(page_numbers)
        frames: list[PageFrame] = []
        number_at = data_at = 0
        for at in range(0, len(counts), 4):
            block, fill, zeros, datas = counts[at : at + 4]
            if fill > 0xFF:
                raise ReplicaError(f"journal {self.path} is committed but a fill {fill} is no byte")
            data_end = data_at + datas * PAGE_SIZE
            frames.append(
                PageFrame(
                    block,
                    fill,
                    numbers[number_at : number_at + zeros],
                    numbers[number_at + zeros : number_at + zeros + datas],
                    journal[pages_at + data_at : pages_at + data_end],
                )
            )
            number_at += zeros + datas
            data_at = data_end
        return ScanResult.COMPLETE, JournalRecord(
            epoch, base_epoch, committed_at, device_state, frames
        )

    def mark(self, state: JournalState) -> None:
        """Set the header's state (APPLIED after a redo, DROPPED for an incomplete journal)."""
        if self._map is None:
            return
        # The magic is written too: a journal cut short inside its header is dropped for good.
        self._map[0 : _STATE_OFFSET + _STATE.size] = HEADER_MAGIC + _STATE.pack(state)
        if self.durable:
            self._map.flush(0, _HEADER.size)

    def close(self) -> None:
        """Unmap and close; idempotent."""
        if self._fd < 0:
            return
        if self._map is not None:
            self._map.close()
            self._map = None
        os.close(self._fd)
        self._fd = -1


def _numbers(data: bytes) -> "array.array[int]":
    """Little-endian u32s as an array of this host's order."""
    numbers = array.array(PAGE_NUMBER_TYPECODE, data)
    if _BIG_ENDIAN:
        numbers.byteswap()
    return numbers
