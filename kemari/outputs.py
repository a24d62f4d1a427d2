"""Guest outputs as both roles and the wire see them: plain, validated values.

An :class:`Output` is one thing the guest did to the outside world: a network frame
sent on NIC *i*, or a disk record of disk *i*.  A disk output's data is an encoded
:class:`DiskWrite` (a write, a zeroed or trimmed range, or a marker), so whoever
replays disk outputs decodes them with :func:`record_of`.  The active host's event-tap
holds outputs (kemari/eventtap/), the ft-transaction carries them (kemari/transaction/),
and the standby keeps and replays them (kemari/replica/, kemari/failover/).
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from kemari.errors import EventTapError

MAX_DEVICE = 0xFFFF
MAX_OFFSET = (1 << 64) - 1


class OutputKind(enum.IntEnum):
    """Where an output goes (the value is the wire code of the OUTPUT frame)."""

    NET = 1  # an Ethernet frame the guest sent on NIC ``device``
    DISK = 2  # bytes the guest wrote at ``offset`` of disk ``device``


@dataclasses.dataclass(frozen=True, slots=True)
class Output:
    """One guest output; ``offset`` is 0 for network frames."""

    kind: OutputKind
    device: int
    data: bytes
    offset: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.device <= MAX_DEVICE:
            raise EventTapError(f"output device index {self.device} is not a u16")
        if not 0 <= self.offset <= MAX_OFFSET:
            raise EventTapError(f"output offset {self.offset} is not a u64")
        if self.kind is OutputKind.NET and self.offset:
            raise EventTapError("a network output has no offset")
        if not self.data:
            raise EventTapError(f"empty {self.kind.name.lower()} output")


MAX_DISKS = 0xFFFF
# A single NBD request carries at most 32 MiB; copy chunks are smaller still.
MAX_RECORD_DATA = 32 << 20

_RECORD_HEAD = struct.Struct(">BHBQQ")  # op, disk, flags, offset, length
RECORD_HEAD_SIZE = _RECORD_HEAD.size


class DiskOp(enum.IntEnum):
    """What a :class:`DiskWrite` does to the image."""

    WRITE = 1  # data at offset
    ZERO = 2  # read as zeroes, stay allocated (WRITE_ZEROES with NO_HOLE)
    PUNCH = 3  # read as zeroes, may be deallocated (WRITE_ZEROES)
    TRIM = 4  # discard (the overlay and Kemari's backends make it read as zeroes)
    RELEASED = 5  # marker: the primary's base holds every write up to epoch ``offset``
    SYNCED = 6  # marker: the initial disk copy is complete (replicated storage)


@dataclasses.dataclass(frozen=True, slots=True)
class DiskWrite:
    """One guest write (or a copy chunk, or a release marker) of disk ``disk``.

    ``length`` is ``len(data)`` for WRITE; for RELEASED, ``offset`` is the epoch whose
    writes (and every earlier one) are durable in the primary's base and ``length`` 0.
    """

    epoch: int
    disk: int
    op: DiskOp
    offset: int
    length: int
    data: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.disk <= MAX_DISKS:
            raise EventTapError(f"disk index {self.disk} is not a u16")
        if not 0 <= self.offset < 1 << 64 or not 0 <= self.length <= MAX_RECORD_DATA:
            raise EventTapError(f"disk record offset {self.offset} / length {self.length}")
        if self.op is DiskOp.WRITE:
            if len(self.data) != self.length or not self.length:
                raise EventTapError(f"WRITE record of {self.length} bytes has {len(self.data)}")
        elif self.data:
            raise EventTapError(f"{self.op.name} record carries data")
        if self.op in (DiskOp.RELEASED, DiskOp.SYNCED) and self.length:
            raise EventTapError(f"{self.op.name} marker with a length")

    @property
    def end(self) -> int:
        return self.offset + self.length


def encode_disk_write(record: DiskWrite) -> bytes:
    """``op u8 | disk u16 | flags u8 (0) | offset u64 | length u64 | data`` (big-endian)."""
    head = _RECORD_HEAD.pack(record.op, record.disk, 0, record.offset, record.length)
    return head + record.data


def decode_disk_write(epoch: int, payload: bytes | memoryview) -> DiskWrite:
    """Parse and validate one encoded record; :class:`EventTapError` on anything wrong."""
    if len(payload) < RECORD_HEAD_SIZE:
        raise EventTapError(f"disk record of {len(payload)} bytes is truncated")
    op_byte, disk, flags, offset, length = _RECORD_HEAD.unpack_from(payload)
    try:
        op = DiskOp(op_byte)
    except ValueError as exc:
        raise EventTapError(f"unknown disk record op {op_byte}") from exc
    if flags:
        raise EventTapError(f"disk record has unknown flags 0x{flags:02x}")
    data = bytes(payload[RECORD_HEAD_SIZE:])
    expected = length if op is DiskOp.WRITE else 0
    if len(data) != expected:
        raise EventTapError(f"{op.name} record announces {length} bytes, carries {len(data)}")
    return DiskWrite(epoch, disk, op, offset, length, data)


def disk_output(record: DiskWrite) -> Output:
    """``record`` as an event-tap :class:`Output` (kind DISK, data = the encoded record).

    The data is the whole encoded record, not raw sector bytes: whoever replays disk
    outputs must decode them (:func:`record_of`), since zeroes, trims and markers carry
    no data of their own.
    """
    return Output(OutputKind.DISK, record.disk, encode_disk_write(record), record.offset)


def record_of(epoch: int, output: Output) -> DiskWrite:
    """The :class:`DiskWrite` a DISK output of transaction ``epoch`` carries."""
    if output.kind is not OutputKind.DISK:
        raise EventTapError(f"{output.kind.name} output is not a disk record")
    record = decode_disk_write(epoch, output.data)
    if record.disk != output.device or record.offset != output.offset:
        raise EventTapError("disk output header disagrees with its record")
    return record
