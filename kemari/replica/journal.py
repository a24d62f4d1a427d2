"""The replica's redo journal: one checkpoint's pages, fills and device state, then a commit record.

File layout (little-endian; one file, reused and overwritten in place, never truncated, so
tmpfs keeps its pages allocated and a journal write is a plain memory copy)::

    0      header, 64 bytes   magic "KMRJ", state, version, entry count, nonce, epoch,
                              base epoch, commit time, device-state length, page count
    64     offsets            entry count x u64: byte offset inside the block
    ..     descriptors        entry count x u64: block index | kind << 32 | fill << 40
    P      pages              page count x 4096 (P = first 4096-aligned byte after the table)
    ..     device state       device-state length bytes
    R      commit record      magic "KMRC", crc32, nonce, R (24 bytes)

The crc32 covers header bytes 8..64, both tables, the device state and the record's nonce
and offset.  Page bytes are not in the checksum (hashing 4 MiB per checkpoint would cost
more than writing it); they are protected by ordering instead: the record is stored after
every page, so a process crash that leaves a complete record left every page before it,
and on persistent storage the pages are msync'ed before the record is written.  The
random nonce, present in the header and in the record, means a record left over from an
earlier checkpoint at the same place can never complete a newer, half-written journal.

``state`` (bytes 4..8, outside the checksum) says whether the journal still has to be
applied: WRITING (set before anything else is written), APPLIED or DROPPED.  A journal in
state WRITING is complete if and only if its record checks out; that is the commit point.

This file is not a kemari.persist frame: it is rewritten in place through a mapping (an
atomic replace per checkpoint would cost a fresh file and a copy of every page), and its
own header and commit record do the frame's work.  Its version is bound to the replica
layout's (``replica.json``, a persist frame read first): a replica whose layout this build
reads has a journal in this layout, so a header with another magic or version is damage
or a write cut short, and is dropped like any incomplete journal, never applied.  A new
journal layout must bump the layout format's version.
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
from kemari.replica.ramfile import PAGE_SIZE, reserve

HEADER_MAGIC = b"KMRJ"
RECORD_MAGIC = b"KMRC"
VERSION = 1
_HEADER = struct.Struct("<4sIIIQQQdQI4x")
_RECORD = struct.Struct("<4sIQQ")
_STATE = struct.Struct("<I")
_STATE_OFFSET = 4
_GROWTH = 1 << 20

KIND_PAGE = 1
KIND_FILL = 2

# Page data kept by reference: immutable bytes, or a 1-D byte view of immutable bytes.
PageData = bytes | memoryview
# (block index, byte offset in the block, page data or the fill byte of a filled page)
Entry = tuple[int, int, PageData | int]


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
    entries: Sequence[Entry]


def _round_up(value: int, unit: int) -> int:
    return (value + unit - 1) // unit * unit


def _little_endian(values: "array.array[int]") -> bytes:
    if sys.byteorder != "little":
        values.byteswap()
    return values.tobytes()


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
        previous, applied journal), then header, tables, pages, device state, and the
        commit record last.  On persistent storage everything before the record is
        msync'ed before the record is written, and the record after.
        """
        entries = record.entries
        count = len(entries)
        offsets = array.array("Q", [entry[1] for entry in entries])
        descriptors = array.array(
            "Q",
            [
                index
                | (KIND_FILL << 32 | value << 40 if isinstance(value, int) else KIND_PAGE << 32)
                for index, _, value in entries
            ],
        )
        page_data = [value for _, _, value in entries if not isinstance(value, int)]
        table = _little_endian(offsets) + _little_endian(descriptors)
        pages_at = _round_up(_HEADER.size + len(table), PAGE_SIZE)
        device_at = pages_at + len(page_data) * PAGE_SIZE
        record_at = device_at + len(record.device_state)
        total = record_at + _RECORD.size
        nonce = int.from_bytes(os.urandom(8), "little")
        header = _HEADER.pack(
            HEADER_MAGIC,
            JournalState.WRITING,
            VERSION,
            count,
            nonce,
            record.epoch,
            record.base_epoch,
            record.committed_at,
            len(record.device_state),
            len(page_data),
        )
        crc = zlib.crc32(header[8:])
        crc = zlib.crc32(table, crc)
        crc = zlib.crc32(record.device_state, crc)
        crc = zlib.crc32(struct.pack("<QQ", nonce, record_at), crc)
        commit = _RECORD.pack(RECORD_MAGIC, crc, nonce, record_at)

        journal = self._ensure_capacity(total)
        journal[_STATE_OFFSET : _STATE_OFFSET + _STATE.size] = _STATE.pack(JournalState.WRITING)
        pieces: list[tuple[int, PageData]] = [(0, header), (_HEADER.size, table)]
        pieces += [(pages_at + i * PAGE_SIZE, data) for i, data in enumerate(page_data)]
        pieces.append((device_at, record.device_state))
        byte_limit = crashpoint.limit("journal-bytes")
        if byte_limit is not None:
            pieces.append((record_at, commit))
            self._write_until_crash(journal, pieces, byte_limit)
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
        journal: mmap.mmap, pieces: list[tuple[int, PageData]], byte_limit: int
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
        up is an incomplete journal.  Page data are copied out of the mapping.
        """
        journal = self._map
        if journal is None or self._capacity < _HEADER.size:
            return ScanResult.NOTHING, None
        (
            magic,
            state,
            version,
            count,
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
        table_size = 16 * count
        if page_count > count or _HEADER.size + table_size > self._capacity:
            return ScanResult.INCOMPLETE, None
        pages_at = _round_up(_HEADER.size + table_size, PAGE_SIZE)
        device_at = pages_at + page_count * PAGE_SIZE
        record_at = device_at + device_length
        if record_at + _RECORD.size > self._capacity:
            return ScanResult.INCOMPLETE, None
        record_magic, record_crc, record_nonce, record_offset = _RECORD.unpack_from(
            journal, record_at
        )
        if record_magic != RECORD_MAGIC or record_nonce != nonce or record_offset != record_at:
            return ScanResult.INCOMPLETE, None
        table = journal[_HEADER.size : _HEADER.size + table_size]
        device_state = journal[device_at:record_at]
        crc = zlib.crc32(journal[8 : _HEADER.size])
        crc = zlib.crc32(table, crc)
        crc = zlib.crc32(device_state, crc)
        crc = zlib.crc32(struct.pack("<QQ", nonce, record_at), crc)
        if crc != record_crc:
            return ScanResult.INCOMPLETE, None
        offsets = array.array("Q", table[: 8 * count])
        descriptors = array.array("Q", table[8 * count :])
        if sys.byteorder != "little":
            offsets.byteswap()
            descriptors.byteswap()
        entries: list[Entry] = []
        page_index = 0
        for offset, descriptor in zip(offsets, descriptors, strict=True):
            kind = descriptor >> 32 & 0xFF
            if kind == KIND_PAGE and page_index < page_count:
                at = pages_at + page_index * PAGE_SIZE
                entries.append((descriptor & 0xFFFFFFFF, offset, journal[at : at + PAGE_SIZE]))
                page_index += 1
            elif kind == KIND_FILL:
                entries.append((descriptor & 0xFFFFFFFF, offset, descriptor >> 40 & 0xFF))
            else:
                raise ReplicaError(
                    f"journal {self.path} is committed but entry kind {kind} is invalid"
                )
        if page_index != page_count:
            raise ReplicaError(f"journal {self.path} is committed but its page count disagrees")
        return ScanResult.COMPLETE, JournalRecord(
            epoch, base_epoch, committed_at, device_state, entries
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
