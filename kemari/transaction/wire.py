"""Wire format of Kemari's ft-transaction protocol: frames, payloads, encoder, decoder.

A frame is a fixed 36-byte big-endian header followed by its payload
(docs/protocol.md has the table)::

    magic "KMRI" | version u8 | type u8 | flags u16 | epoch u64 | sequence u64
    | payload length u32 | payload crc32 u32 | header crc32 u32

The header checksum covers the 32 bytes before it, so a corrupted length is caught
before anything is allocated for the payload; on sessions that negotiated
:data:`NO_PAYLOAD_CRC` (TLS only) the payload crc32 is sent as 0 and not checked.
Sequence numbers start at 0 and grow by exactly one per frame in each direction of a
session; the decoder rejects gaps and replays.  Transaction frames carry their
transaction's epoch in the header; session frames (hello, heartbeat, goodbye) carry
epoch 0.

Everything here is pure (no I/O).  Page data travels as one buffer per batch and
page indices as one ``array`` per batch: no Python object per page.
"""

from __future__ import annotations

import enum
import struct
import sys
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

import zstandard

from kemari.errors import EventTapError, TransactionError
from kemari.outputs import Output, OutputKind
from kemari.stream.format import PAGE_SIZE

MAGIC = b"KMRI"
WIRE_VERSION = 1
# Semantics of the session (handshake, transaction rules), negotiated in HELLO.
# 2: HELLO / HELLO_ACK carry a nonce and the run identity, and CONFIRM binds both nonces.
PROTOCOL_VERSION = 2

HEADER = struct.Struct(">4sBBHQQIII")
HEADER_SIZE = HEADER.size
# The header checksum covers every header byte before it.
_HEADER_CRC_SPAN = HEADER_SIZE - 4
MAX_PAYLOAD = 64 << 20

CONFIG_DIGEST_LEN = 32
NONCE_LEN = 32
RUN_ID_LEN = 16
BINDING_LEN = 32
MAX_NAME_LEN = 255
MAX_CAPABILITIES = 32
MAX_RAM_BLOCKS = 1024
# Page indices are u32, so a block holds at most 2**32 pages (16 TiB).
MAX_BLOCK_SIZE = PAGE_SIZE << 32

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_PAGES_HEAD = struct.Struct(">HII")  # block index, data page count, zero page count
_COMMIT = struct.Struct(">QQQQQ")
_OUTPUTS_HEAD = struct.Struct(">I")  # output count
_OUTPUT_HEAD = struct.Struct(">BHQI")  # kind, device index, offset, data length
_REFUSE_HEAD = struct.Struct(">H")

# The session capability that allows RAM_PAGES_ZSTD frames (docs/protocol.md, "Page
# compression"); the primary offers it when its page_compression setting is zstd.
ZSTD_PAGES = "zstd-pages"
# The session capability that drops the payload crc32 (docs/protocol.md, "Payload
# checksums"): offered and accepted only on TLS sessions, where TLS 1.3's AEAD already
# authenticates every byte; the session handshake adds it, never the configuration.
NO_PAYLOAD_CRC = "no-payload-crc"
# zstd level -1..1 compresses guest pages at 2-4 GB/s here; higher levels gain a few
# percent of size for several times the CPU, inside the guest's pause.
ZSTD_LEVEL = 1
# A RAM_PAGES_ZSTD frame decompresses to at most MAX_PAYLOAD bytes; no legitimate frame
# needs a larger window, and a hostile one must not make the standby reserve more.
_ZSTD_MAX_WINDOW = 1 << 26
_ZSTD_COMPRESSOR = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False)
_ZSTD_DECOMPRESSOR = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)

_INDEX_TYPECODE = "I"
if array(_INDEX_TYPECODE).itemsize != 4:
    raise ImportError("kemari.transaction.wire needs a 4-byte array('I') for page indices")
_NATIVE_IS_BIG = sys.byteorder == "big"

Buffer = bytes | bytearray | memoryview


class FrameType(enum.IntEnum):
    """The ``type`` byte of the header."""

    HELLO = 0x01
    HELLO_ACK = 0x02
    REFUSE = 0x03
    GOODBYE = 0x04
    CONFIRM = 0x05
    HEARTBEAT = 0x08
    HEARTBEAT_ACK = 0x09
    BEGIN = 0x10
    RAM_BLOCKS = 0x11
    RAM_PAGES = 0x12
    DEVICE_STATE = 0x13
    COMMIT = 0x14
    COMMIT_ACK = 0x15
    ABORT = 0x16
    VM_DESCRIPTION = 0x17
    RAM_PAGES_ZSTD = 0x18
    OUTPUT = 0x20


class Role(enum.IntEnum):
    """Who sends a HELLO / HELLO_ACK."""

    PRIMARY = 1
    STANDBY = 2


class RefuseReason(enum.IntEnum):
    """Why a standby refuses a primary's HELLO."""

    PROTOCOL_VERSION = 1
    ROLE = 2
    VM_NAME = 3
    CONFIG_DIGEST = 4
    BUSY = 5
    # The session would replace the replica with an older epoch of the same run.
    STALE_RUN = 6
    # A new run may replace a committed replica only over authenticated TLS.
    UNAUTHENTICATED = 7


class _Cursor:
    """Reads big-endian fields from a payload; running short or past the end is an error."""

    def __init__(self, payload: memoryview, what: str) -> None:
        self._payload = payload
        self._pos = 0
        self._what = what

    def take(self, size: int) -> memoryview:
        end = self._pos + size
        if end > len(self._payload):
            raise TransactionError(f"{self._what} payload is truncated")
        view = self._payload[self._pos : end]
        self._pos = end
        return view

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        values: tuple[int, ...] = fmt.unpack(self.take(fmt.size))
        return values

    def u8(self) -> int:
        return self.unpack(_U8)[0]

    def u16(self) -> int:
        return self.unpack(_U16)[0]

    def u64(self) -> int:
        return self.unpack(_U64)[0]

    def text(self, length: int) -> str:
        try:
            return str(self.take(length), "utf-8")
        except UnicodeDecodeError as exc:
            raise TransactionError(f"{self._what} payload has invalid UTF-8 text") from exc

    @property
    def remaining(self) -> int:
        return len(self._payload) - self._pos

    def finish(self) -> None:
        if self._pos != len(self._payload):
            raise TransactionError(
                f"{self._what} payload has {len(self._payload) - self._pos} trailing bytes"
            )


def _check_wire_name(name: str, what: str) -> None:
    """Machine types and RAM block names are printable ASCII, as QEMU's stream carries
    them (kemari.stream.parser refuses anything else); the replica stores them in file
    names and JSON, and the failover stream sends them back to QEMU."""
    if not name.isascii() or not name.isprintable():
        raise TransactionError(f"{what} {name!r} is not printable ASCII")


def _name_bytes(name: str, what: str) -> bytes:
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= MAX_NAME_LEN:
        raise TransactionError(f"{what} {name!r} must be 1-{MAX_NAME_LEN} bytes of UTF-8")
    return raw


def _message_bytes(message: str) -> bytes:
    raw = message.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise TransactionError("message text is longer than 65535 bytes")
    return _U16.pack(len(raw)) + raw


def _check_capability(name: str) -> None:
    if not (1 <= len(name) <= 32 and name.isascii() and name.replace("-", "").isalnum()):
        raise TransactionError(f"capability {name!r} must be 1-32 ASCII letters, digits or '-'")


# --- payloads ---------------------------------------------------------------------------
# Each payload class knows its frame type, encodes to a list of buffers (large page data
# is never copied into a joined payload) and decodes from a memoryview of the payload.


@dataclass(frozen=True, slots=True)
class Hello:
    """A primary introduces itself; the standby checks every field before accepting.

    ``nonce`` is fresh random bytes per session from each side (CONFIRM binds both);
    ``run_id`` names the VM's run (chosen at its first boot, kept across failovers) and
    ``run_epoch`` says where in that run this session starts: in HELLO, the run epoch of
    the session's epoch 0; in HELLO_ACK, the run epoch of the standby's committed
    replica (``run_id`` all zero when it holds none).
    """

    TYPE: ClassVar[FrameType] = FrameType.HELLO

    role: Role
    vm_name: str
    config_digest: bytes
    capabilities: tuple[str, ...] = ()
    protocol_version: int = PROTOCOL_VERSION
    nonce: bytes = bytes(NONCE_LEN)
    run_id: bytes = bytes(RUN_ID_LEN)
    run_epoch: int = 0

    def encode(self) -> list[Buffer]:
        if len(self.config_digest) != CONFIG_DIGEST_LEN:
            raise TransactionError(f"config digest must be {CONFIG_DIGEST_LEN} bytes")
        if len(self.nonce) != NONCE_LEN or len(self.run_id) != RUN_ID_LEN:
            raise TransactionError(f"nonce must be {NONCE_LEN} bytes, run id {RUN_ID_LEN}")
        if len(self.capabilities) > MAX_CAPABILITIES:
            raise TransactionError(f"more than {MAX_CAPABILITIES} capabilities")
        if len(set(self.capabilities)) != len(self.capabilities):
            raise TransactionError("capabilities are listed twice")
        name = _name_bytes(self.vm_name, "VM name")
        parts = [
            _U16.pack(self.protocol_version),
            _U8.pack(self.role),
            _U8.pack(len(name)),
            name,
            self.config_digest,
            _U8.pack(len(self.capabilities)),
        ]
        for capability in self.capabilities:
            _check_capability(capability)
            parts += [_U8.pack(len(capability)), capability.encode("ascii")]
        parts += [self.nonce, self.run_id, _U64.pack(self.run_epoch)]
        return [b"".join(parts)]

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> Self:
        del epoch  # session frame: the header epoch is checked to be 0
        cursor = _Cursor(payload, cls.TYPE.name)
        version = cursor.u16()
        try:
            role = Role(cursor.u8())
        except ValueError as exc:
            raise TransactionError(f"{cls.TYPE.name} has an unknown role") from exc
        name = cursor.text(cursor.u8())
        if not name:
            raise TransactionError(f"{cls.TYPE.name} has an empty VM name")
        digest = bytes(cursor.take(CONFIG_DIGEST_LEN))
        count = cursor.u8()
        if count > MAX_CAPABILITIES:
            raise TransactionError(
                f"{cls.TYPE.name} lists more than {MAX_CAPABILITIES} capabilities"
            )
        capabilities = tuple(cursor.text(cursor.u8()) for _ in range(count))
        for capability in capabilities:
            _check_capability(capability)
        if len(set(capabilities)) != count:
            raise TransactionError(f"{cls.TYPE.name} lists a capability twice")
        nonce, run_id, run_epoch = bytes(NONCE_LEN), bytes(RUN_ID_LEN), 0
        # A version 1 peer sends no nonce and no run: decoded, then refused by version.
        if version >= 2 or cursor.remaining:
            nonce = bytes(cursor.take(NONCE_LEN))
            run_id = bytes(cursor.take(RUN_ID_LEN))
            run_epoch = cursor.u64()
        cursor.finish()
        return cls(role, name, digest, capabilities, version, nonce, run_id, run_epoch)


@dataclass(frozen=True, slots=True)
class HelloAck(Hello):
    """The standby accepts: its own identity and the capabilities both sides have."""

    TYPE: ClassVar[FrameType] = FrameType.HELLO_ACK


@dataclass(frozen=True, slots=True)
class Refuse:
    """The standby refuses the primary; the connection closes after this frame."""

    TYPE: ClassVar[FrameType] = FrameType.REFUSE

    reason: RefuseReason
    message: str

    def encode(self) -> list[Buffer]:
        return [_REFUSE_HEAD.pack(self.reason) + _message_bytes(self.message)]

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> Refuse:
        del epoch
        cursor = _Cursor(payload, cls.TYPE.name)
        try:
            reason = RefuseReason(cursor.u16())
        except ValueError as exc:
            raise TransactionError("REFUSE has an unknown reason code") from exc
        message = cursor.text(cursor.u16())
        cursor.finish()
        return cls(reason, message)


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Orderly end of the session: the sender closes after this frame."""

    TYPE: ClassVar[FrameType] = FrameType.GOODBYE

    message: str = ""

    def encode(self) -> list[Buffer]:
        return [_message_bytes(self.message)]

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> Goodbye:
        del epoch
        cursor = _Cursor(payload, cls.TYPE.name)
        message = cursor.text(cursor.u16())
        cursor.finish()
        return cls(message)


@dataclass(frozen=True, slots=True)
class Confirm:
    """The primary's first frame after HELLO_ACK: the session binding
    (:func:`kemari.transaction.session.session_binding` of both nonces and the run), so
    a recorded session, whose HELLO_ACK had another nonce, cannot be replayed."""

    TYPE: ClassVar[FrameType] = FrameType.CONFIRM

    binding: bytes

    def encode(self) -> list[Buffer]:
        if len(self.binding) != BINDING_LEN:
            raise TransactionError(f"session binding must be {BINDING_LEN} bytes")
        return [self.binding]

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> Confirm:
        del epoch
        cursor = _Cursor(payload, cls.TYPE.name)
        binding = bytes(cursor.take(BINDING_LEN))
        cursor.finish()
        return cls(binding)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness probe; ``timestamp_ns`` is the sender's monotonic clock, echoed back."""

    TYPE: ClassVar[FrameType] = FrameType.HEARTBEAT

    timestamp_ns: int

    def encode(self) -> list[Buffer]:
        return [_U64.pack(self.timestamp_ns)]

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> Self:
        del epoch
        cursor = _Cursor(payload, cls.TYPE.name)
        timestamp = cursor.u64()
        cursor.finish()
        return cls(timestamp)


@dataclass(frozen=True, slots=True)
class HeartbeatAck(Heartbeat):
    """Answer to a HEARTBEAT carrying its timestamp unchanged (the sender measures RTT)."""

    TYPE: ClassVar[FrameType] = FrameType.HEARTBEAT_ACK


@dataclass(frozen=True, slots=True)
class Begin:
    """Opens transaction ``epoch``; epochs grow strictly within a session."""

    TYPE: ClassVar[FrameType] = FrameType.BEGIN

    epoch: int

    def encode(self) -> list[Buffer]:
        return []

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> Begin:
        _Cursor(payload, cls.TYPE.name).finish()
        return cls(epoch)


@dataclass(frozen=True, slots=True)
class RamBlock:
    """A guest RAM block: QEMU's block name, its size in bytes (a page multiple) and the
    guest-physical address QEMU reports for it (the failover stream repeats it)."""

    name: str
    size: int
    gpa: int = 0


@dataclass(frozen=True, slots=True)
class RamBlocks:
    """The first transaction's machine description; pages name blocks by index.

    ``machine_type`` and ``ram_section_id`` are what QEMU's configuration and RAM
    section said; the standby needs them to rebuild an incoming stream at failover.
    """

    TYPE: ClassVar[FrameType] = FrameType.RAM_BLOCKS

    epoch: int
    blocks: tuple[RamBlock, ...]
    machine_type: str = "pc"
    ram_section_id: int = 0

    def __post_init__(self) -> None:
        if not 1 <= len(self.blocks) <= MAX_RAM_BLOCKS:
            raise TransactionError(f"RAM_BLOCKS must list 1-{MAX_RAM_BLOCKS} blocks")
        if len({block.name for block in self.blocks}) != len(self.blocks):
            raise TransactionError("RAM_BLOCKS lists a block name twice")
        if not self.machine_type:
            raise TransactionError("RAM_BLOCKS has an empty machine type")
        _check_wire_name(self.machine_type, "RAM_BLOCKS machine type")
        if not 0 <= self.ram_section_id < 1 << 32:
            raise TransactionError(f"RAM section id {self.ram_section_id} is not a u32")
        for block in self.blocks:
            _check_wire_name(block.name, "RAM block name")
            if not 0 < block.size <= MAX_BLOCK_SIZE or block.size % PAGE_SIZE:
                raise TransactionError(
                    f"RAM block {block.name!r} size {block.size} is not a positive multiple "
                    f"of {PAGE_SIZE} up to {MAX_BLOCK_SIZE}"
                )
            if not 0 <= block.gpa < 1 << 64:
                raise TransactionError(f"RAM block {block.name!r} address is not a u64")

    def encode(self) -> list[Buffer]:
        machine = _name_bytes(self.machine_type, "machine type")
        parts = [
            _U8.pack(len(machine)),
            machine,
            _U64.pack(self.ram_section_id),
            _U16.pack(len(self.blocks)),
        ]
        for block in self.blocks:
            name = _name_bytes(block.name, "RAM block name")
            parts += [_U8.pack(len(name)), name, _U64.pack(block.size), _U64.pack(block.gpa)]
        return [b"".join(parts)]

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> RamBlocks:
        cursor = _Cursor(payload, cls.TYPE.name)
        machine_type = cursor.text(cursor.u8())
        section_id = cursor.u64()
        count = cursor.u16()
        blocks = []
        for _ in range(count):
            name = cursor.text(cursor.u8())
            blocks.append(RamBlock(name, cursor.u64(), cursor.u64()))
        cursor.finish()
        if any(not block.name for block in blocks):
            raise TransactionError("RAM_BLOCKS has an empty block name")
        return cls(epoch, tuple(blocks), machine_type, section_id)


@dataclass(frozen=True, slots=True)
class VmDescription:
    """QEMU's VM description (JSON) from the end of the initial sync; first transaction only.

    QEMU's incoming side reads it after the device state, so the failover stream needs it.
    """

    TYPE: ClassVar[FrameType] = FrameType.VM_DESCRIPTION

    epoch: int
    data: Buffer

    def __post_init__(self) -> None:
        if not self.data:
            raise TransactionError("VM_DESCRIPTION frame is empty")

    def encode(self) -> list[Buffer]:
        return [self.data]

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> VmDescription:
        return cls(epoch, payload)


def page_indices(values: Sequence[int]) -> array[int]:
    """An index array for :class:`RamPages` (u32 page numbers within a block)."""
    try:
        return array(_INDEX_TYPECODE, values)
    except OverflowError as exc:
        raise TransactionError("a page index does not fit in 32 bits") from exc


@dataclass(frozen=True, slots=True)
class RamPages:
    """A batch of pages of one block.

    ``data`` holds ``len(data_pages)`` pages of 4096 bytes back to back, the n-th for page
    index ``data_pages[n]``; ``zero_pages`` are filled with zeros.  Applying a batch fills
    its zero pages first, then writes its data pages; batches apply in sequence order,
    so a page sent twice in a transaction ends with its last content.

    Payload: block index u16, data count u32, zero count u32, data then zero page
    indices (u32 each), page data.
    """

    TYPE: ClassVar[FrameType] = FrameType.RAM_PAGES

    epoch: int
    block_index: int
    data_pages: array[int]
    zero_pages: array[int]
    data: Buffer

    def __post_init__(self) -> None:
        if not self.data_pages and not self.zero_pages:
            raise TransactionError("RAM_PAGES batch holds no page")
        if len(self.data) != PAGE_SIZE * len(self.data_pages):
            raise TransactionError(
                f"RAM_PAGES data is {len(self.data)} bytes for {len(self.data_pages)} pages"
            )

    @property
    def page_count(self) -> int:
        """Data and zero pages together."""
        return len(self.data_pages) + len(self.zero_pages)

    def page(self, n: int) -> memoryview:
        """The data of the n-th data page (page index ``data_pages[n]``)."""
        return memoryview(self.data)[n * PAGE_SIZE : (n + 1) * PAGE_SIZE]

    def encode(self) -> list[Buffer]:
        return [_pages_head(self.block_index, self.data_pages, self.zero_pages), self.data]

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> RamPages:
        block_index, data_pages, zero_pages, data = _split_pages(payload, cls.TYPE)
        if len(data) != PAGE_SIZE * len(data_pages):
            raise TransactionError(
                f"RAM_PAGES payload is {len(payload)} bytes, its counts "
                f"({len(data_pages)} data, {len(zero_pages)} zero) need "
                f"{len(payload) - len(data) + PAGE_SIZE * len(data_pages)}"
            )
        return cls(epoch, block_index, data_pages, zero_pages, data)


@dataclass(frozen=True, slots=True)
class ZstdRamPages:
    """RAM_PAGES whose page data travels as one zstd frame (capability ``zstd-pages``).

    Payload: as RAM_PAGES, but after the indices comes a single zstd frame that declares
    its content size, which must be exactly ``4096 * data count``.  The standby decodes
    it into a plain :class:`RamPages`: nothing after the wire sees compression.  The
    decoder never inflates more than the frame's page count allows (a frame declaring
    any other size, or holding anything after its zstd frame, is refused unread).
    """

    TYPE: ClassVar[FrameType] = FrameType.RAM_PAGES_ZSTD

    epoch: int
    block_index: int
    data_pages: array[int]
    zero_pages: array[int]
    compressed: Buffer

    def __post_init__(self) -> None:
        if not self.data_pages:
            raise TransactionError("RAM_PAGES_ZSTD batch holds no data page")

    @property
    def page_count(self) -> int:
        """Data and zero pages together."""
        return len(self.data_pages) + len(self.zero_pages)

    def encode(self) -> list[Buffer]:
        return [_pages_head(self.block_index, self.data_pages, self.zero_pages), self.compressed]

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> RamPages:
        block_index, data_pages, zero_pages, compressed = _split_pages(payload, cls.TYPE)
        data = decompress_pages(compressed, len(data_pages))
        return RamPages(epoch, block_index, data_pages, zero_pages, data)


def compress_pages(pages: Sequence[Buffer]) -> bytes:
    """One zstd frame (content size declared, no checksum) of ``pages`` back to back."""
    size = sum(len(page) for page in pages)
    stream = _ZSTD_COMPRESSOR.compressobj(size=size)
    parts = [stream.compress(page) for page in pages]
    parts.append(stream.flush())
    return b"".join(parts)


def decompress_pages(compressed: Buffer, count: int) -> bytes:
    """The ``count`` pages of a RAM_PAGES_ZSTD frame; TransactionError unless the zstd
    frame declares exactly ``count`` pages, inflates to them and is all there is."""
    expected = count * PAGE_SIZE
    if expected > MAX_PAYLOAD:
        raise TransactionError(
            f"RAM_PAGES_ZSTD frame of {count} pages would inflate beyond {MAX_PAYLOAD} bytes"
        )
    try:
        declared = zstandard.frame_content_size(compressed)
    except zstandard.ZstdError as exc:
        raise TransactionError(f"RAM_PAGES_ZSTD data is not a zstd frame: {exc}") from exc
    if declared != expected:
        raise TransactionError(
            f"RAM_PAGES_ZSTD frame declares {declared} bytes for {count} pages ({expected})"
        )
    # The declared size was checked above and zstd refuses output beyond it, so at most
    # ``expected`` bytes are ever produced.
    stream = _ZSTD_DECOMPRESSOR.decompressobj()
    try:
        data = stream.decompress(compressed)
    except zstandard.ZstdError as exc:
        raise TransactionError(f"RAM_PAGES_ZSTD data does not decompress: {exc}") from exc
    if len(data) != expected or not stream.eof or stream.unused_data:
        raise TransactionError(
            f"RAM_PAGES_ZSTD data inflates to {len(data)} bytes for {count} pages, "
            f"{'with trailing bytes' if stream.unused_data else 'complete'}"
        )
    return data


def _pages_head(block_index: int, data_pages: array[int], zero_pages: array[int]) -> bytes:
    indices = data_pages + zero_pages
    if not _NATIVE_IS_BIG:
        indices.byteswap()
    return _PAGES_HEAD.pack(block_index, len(data_pages), len(zero_pages)) + indices.tobytes()


def _split_pages(
    payload: memoryview, frame_type: FrameType
) -> tuple[int, array[int], array[int], memoryview]:
    """Block index, data and zero page indices, and the rest of a RAM_PAGES* payload."""
    if len(payload) < _PAGES_HEAD.size:
        raise TransactionError(f"{frame_type.name} payload is truncated")
    block_index, data_count, zero_count = _PAGES_HEAD.unpack_from(payload)
    index_end = _PAGES_HEAD.size + 4 * (data_count + zero_count)
    # Compare the announced counts with the payload size before building anything.
    if len(payload) < index_end:
        raise TransactionError(
            f"{frame_type.name} payload is {len(payload)} bytes, shorter than its "
            f"{data_count + zero_count} page indices"
        )
    indices = array(_INDEX_TYPECODE)
    indices.frombytes(payload[_PAGES_HEAD.size : index_end])
    if not _NATIVE_IS_BIG:
        indices.byteswap()
    return block_index, indices[:data_count], indices[data_count:], payload[index_end:]


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Opaque QEMU device state; several frames of one transaction concatenate in order."""

    TYPE: ClassVar[FrameType] = FrameType.DEVICE_STATE

    epoch: int
    data: Buffer

    def __post_init__(self) -> None:
        if not self.data:
            raise TransactionError("DEVICE_STATE frame is empty")

    def encode(self) -> list[Buffer]:
        return [self.data]

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> DeviceState:
        return cls(epoch, payload)


def encode_outputs(outputs: Sequence[Output]) -> list[Buffer]:
    """The OUTPUT payload layout: count u32, then per output kind u8, device u16,
    offset u64, length u32 and its bytes (also the standby's on-disk format)."""
    parts: list[Buffer] = [_OUTPUTS_HEAD.pack(len(outputs))]
    for output in outputs:
        parts += [
            _OUTPUT_HEAD.pack(output.kind, output.device, output.offset, len(output.data)),
            output.data,
        ]
    return parts


def decode_outputs(payload: memoryview, what: str) -> tuple[Output, ...]:
    """Parse :func:`encode_outputs`' layout; every field is checked (TransactionError)."""
    cursor = _Cursor(payload, what)
    (count,) = cursor.unpack(_OUTPUTS_HEAD)
    # Each output takes at least its head and one byte: refuse a count that cannot fit.
    if count * (_OUTPUT_HEAD.size + 1) > len(payload):
        raise TransactionError(f"{what} announces {count} outputs in {len(payload)} bytes")
    outputs = []
    for _ in range(count):
        kind_code, device, offset, length = cursor.unpack(_OUTPUT_HEAD)
        try:
            kind = OutputKind(kind_code)
            outputs.append(Output(kind, device, bytes(cursor.take(length)), offset))
        except ValueError as exc:
            raise TransactionError(f"{what} has an output of unknown kind {kind_code}") from exc
        except EventTapError as exc:
            raise TransactionError(f"{what} has an invalid output: {exc}") from exc
    cursor.finish()
    return tuple(outputs)


@dataclass(frozen=True, slots=True)
class Outputs:
    """Guest outputs of transaction ``epoch`` (held by the primary until it commits).

    The standby keeps the outputs of its last committed epoch, so that a failover can
    release them again (the dead primary may not have).
    """

    TYPE: ClassVar[FrameType] = FrameType.OUTPUT

    epoch: int
    outputs: tuple[Output, ...]

    def __post_init__(self) -> None:
        if not self.outputs:
            raise TransactionError("OUTPUT frame holds no output")

    @property
    def data_bytes(self) -> int:
        """Bytes of output data (without the per-output heads)."""
        return sum(len(output.data) for output in self.outputs)

    def encode(self) -> list[Buffer]:
        return encode_outputs(self.outputs)

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> Outputs:
        return cls(epoch, decode_outputs(payload, cls.TYPE.name))


@dataclass(frozen=True, slots=True)
class Commit:
    """Closes transaction ``epoch`` with a summary the receiver checks against what it got."""

    TYPE: ClassVar[FrameType] = FrameType.COMMIT

    epoch: int
    data_pages: int
    zero_pages: int
    device_state_bytes: int
    outputs: int = 0
    output_bytes: int = 0

    def encode(self) -> list[Buffer]:
        return [
            _COMMIT.pack(
                self.data_pages,
                self.zero_pages,
                self.device_state_bytes,
                self.outputs,
                self.output_bytes,
            )
        ]

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> Commit:
        cursor = _Cursor(payload, cls.TYPE.name)
        data_pages, zero_pages, device_bytes, outputs, output_bytes = cursor.unpack(_COMMIT)
        cursor.finish()
        return cls(epoch, data_pages, zero_pages, device_bytes, outputs, output_bytes)


@dataclass(frozen=True, slots=True)
class CommitAck:
    """The standby holds epoch ``epoch`` as its replica (sent only after applying it)."""

    TYPE: ClassVar[FrameType] = FrameType.COMMIT_ACK

    epoch: int

    def encode(self) -> list[Buffer]:
        return []

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> CommitAck:
        _Cursor(payload, cls.TYPE.name).finish()
        return cls(epoch)


@dataclass(frozen=True, slots=True)
class Abort:
    """The primary gives up transaction ``epoch``; the standby discards what it staged."""

    TYPE: ClassVar[FrameType] = FrameType.ABORT

    epoch: int
    reason: str

    def encode(self) -> list[Buffer]:
        return [_message_bytes(self.reason)]

    @classmethod
    def decode(cls, epoch: int, payload: memoryview) -> Abort:
        cursor = _Cursor(payload, cls.TYPE.name)
        reason = cursor.text(cursor.u16())
        cursor.finish()
        return cls(epoch, reason)


SessionPayload = Hello | HelloAck | Refuse | Goodbye | Confirm | Heartbeat | HeartbeatAck
# What the primary sends inside a transaction besides COMMIT (PrimarySession.send).
TransactionContent = (
    Begin | RamBlocks | RamPages | ZstdRamPages | DeviceState | VmDescription | Outputs | Abort
)
TransactionPayload = TransactionContent | Commit | CommitAck
Payload = SessionPayload | TransactionPayload

_PAYLOAD_CLASSES: dict[FrameType, type[Payload]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        HelloAck,
        Refuse,
        Goodbye,
        Confirm,
        Heartbeat,
        HeartbeatAck,
        Begin,
        RamBlocks,
        RamPages,
        ZstdRamPages,
        DeviceState,
        VmDescription,
        Outputs,
        Commit,
        CommitAck,
        Abort,
    )
}
SESSION_TYPES = frozenset(
    {
        FrameType.HELLO,
        FrameType.HELLO_ACK,
        FrameType.REFUSE,
        FrameType.GOODBYE,
        FrameType.CONFIRM,
        FrameType.HEARTBEAT,
        FrameType.HEARTBEAT_ACK,
    }
)


def frame_epoch(payload: Payload) -> int:
    """The header epoch of ``payload``: its transaction's epoch, 0 for session frames."""
    if isinstance(payload, SessionPayload):
        return 0
    return payload.epoch


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded, fully validated frame."""

    sequence: int
    payload: Payload


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A validated header: the payload that follows has ``length`` bytes and, on a
    session with payload checksums, ``crc``."""

    frame_type: FrameType
    epoch: int
    sequence: int
    length: int
    crc: int


def encode_frame(payload: Payload, sequence: int, *, payload_crc: bool = True) -> list[Buffer]:
    """The buffers of one frame (header first), in order; page data is not copied.

    Without ``payload_crc`` (a :data:`NO_PAYLOAD_CRC` session) the payload checksum
    field is 0; the header checksum is always computed."""
    epoch = frame_epoch(payload)
    if not 0 <= epoch < 1 << 64:
        raise TransactionError(f"epoch {epoch} does not fit in 64 bits")
    try:
        parts = payload.encode()
        head = HEADER.pack(MAGIC, WIRE_VERSION, payload.TYPE, 0, epoch, sequence, 0, 0, 0)
    except struct.error as exc:
        raise TransactionError(f"{payload.TYPE.name} field out of range: {exc}") from exc
    length = 0
    crc = 0
    for part in parts:
        length += len(part)
        if payload_crc:
            crc = zlib.crc32(part, crc)
    if length > MAX_PAYLOAD:
        raise TransactionError(
            f"{payload.TYPE.name} payload of {length} bytes exceeds {MAX_PAYLOAD}"
        )
    head = HEADER.pack(MAGIC, WIRE_VERSION, payload.TYPE, 0, epoch, sequence, length, crc, 0)
    header = head[:_HEADER_CRC_SPAN] + zlib.crc32(head[:_HEADER_CRC_SPAN]).to_bytes(4, "big")
    return [header, *parts]


class FrameEncoder:
    """Assigns consecutive sequence numbers (from 0) to the frames of one direction."""

    def __init__(self) -> None:
        self.next_sequence = 0
        # False once the session negotiated NO_PAYLOAD_CRC.
        self.payload_crc = True

    def encode(self, payload: Payload) -> list[Buffer]:
        """The buffers of the next frame; its sequence number is used up only on success."""
        parts = encode_frame(payload, self.next_sequence, payload_crc=self.payload_crc)
        self.next_sequence += 1
        return parts


class FrameDecoder:
    """Turns any chunking of one direction's byte stream into validated frames.

    Invariants: a frame is returned only when its header checksum, its payload checksum
    (unless :attr:`payload_crc` is off: a NO_PAYLOAD_CRC session over TLS), type,
    flags, epoch rule, sequence number and payload layout all check out; the header is
    validated as soon as its 36 bytes are in, so an oversized length is refused before
    any payload byte is buffered; a wrong magic is refused from the first differing
    byte.  After a :class:`TransactionError` the decoder stays failed (the stream has no
    resynchronisation point) and frames completed earlier in the failing chunk are
    dropped with it: the session is over and its open transaction is discarded.

    Payloads decoded from a chunk that held them whole are memoryviews into that chunk:
    ``feed`` takes ownership of the chunk, which must never be modified afterwards (a
    ``bytes``, or a ``bytearray`` fresh from ``Transport.read_exactly``).  Payloads
    assembled from several chunks are copied once.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        if not 0 <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in [0, {MAX_PAYLOAD}], got {max_payload}")
        self.max_payload = max_payload
        # RAM_PAGES_ZSTD frames are accepted only once the session negotiated ZSTD_PAGES.
        self.zstd_pages = False
        # Payload checksums are checked unless the session negotiated NO_PAYLOAD_CRC.
        self.payload_crc = True
        self.next_sequence = 0
        self._buffer = bytearray()
        self._header: FrameHeader | None = None
        self._failed: TransactionError | None = None

    @property
    def at_frame_boundary(self) -> bool:
        """True when no partial frame is buffered."""
        return self._header is None and not self._buffer

    @property
    def expecting_payload(self) -> bool:
        """True once a valid header is in and its payload is awaited."""
        return self._header is not None

    @property
    def wanted(self) -> int:
        """Bytes that complete the pending header or payload (never 0)."""
        if self._header is None:
            return HEADER_SIZE - len(self._buffer)
        return self._header.length - len(self._buffer)

    def feed(self, data: bytes | bytearray) -> list[Frame]:
        """Consume ``data`` (taking ownership); return every frame it completed, in order."""
        if self._failed is not None:
            raise TransactionError(f"frame stream already failed: {self._failed}")
        try:
            return self._feed(data)
        except TransactionError as exc:
            self._failed = exc
            self._buffer.clear()
            self._header = None
            raise

    def _feed(self, data: bytes | bytearray) -> list[Frame]:
        view = memoryview(data)
        pos = 0
        frames: list[Frame] = []
        while True:
            if self._header is None:
                if pos == len(view):
                    return frames
                if not self._buffer and len(view) - pos >= HEADER_SIZE:
                    self._header = self._parse_header(view[pos : pos + HEADER_SIZE])
                    pos += HEADER_SIZE
                else:
                    take = min(HEADER_SIZE - len(self._buffer), len(view) - pos)
                    self._buffer += view[pos : pos + take]
                    pos += take
                    if len(self._buffer) < HEADER_SIZE:
                        _check_magic_prefix(self._buffer)
                        return frames
                    # A copy: no view of _buffer may outlive this call (clear() needs that).
                    self._header = self._parse_header(memoryview(bytes(self._buffer)))
                    self._buffer.clear()
            header = self._header
            if not self._buffer and len(view) - pos >= header.length:
                payload = view[pos : pos + header.length]
                pos += header.length
            else:
                take = min(header.length - len(self._buffer), len(view) - pos)
                self._buffer += view[pos : pos + take]
                pos += take
                if len(self._buffer) < header.length:
                    return frames
                payload = memoryview(bytes(self._buffer))
                self._buffer.clear()
            frames.append(_decode_payload(header, payload, self.payload_crc))
            self._header = None

    def _parse_header(self, raw: memoryview) -> FrameHeader:
        magic, version, type_byte, flags, epoch, sequence, length, crc, header_crc = HEADER.unpack(
            raw
        )
        if magic != MAGIC:
            _check_magic_prefix(raw)
        if zlib.crc32(raw[:_HEADER_CRC_SPAN]) != header_crc:
            raise TransactionError("frame header checksum mismatch (corrupted stream)")
        if version != WIRE_VERSION:
            raise TransactionError(
                f"peer speaks ft-transaction wire version {version}, this side {WIRE_VERSION}"
            )
        try:
            frame_type = FrameType(type_byte)
        except ValueError as exc:
            raise TransactionError(f"unknown frame type 0x{type_byte:02x}") from exc
        if flags:
            raise TransactionError(f"{frame_type.name} frame has unknown flags 0x{flags:04x}")
        if length > self.max_payload:
            raise TransactionError(
                f"{frame_type.name} payload length {length} exceeds the limit {self.max_payload}"
            )
        if frame_type is FrameType.RAM_PAGES_ZSTD and not self.zstd_pages:
            raise TransactionError(
                f"RAM_PAGES_ZSTD frame, but the session did not negotiate {ZSTD_PAGES!r}"
            )
        if epoch and frame_type in SESSION_TYPES:
            raise TransactionError(f"{frame_type.name} frame carries epoch {epoch}, expected 0")
        if sequence != self.next_sequence:
            problem = "replayed" if sequence < self.next_sequence else "skipped ahead"
            raise TransactionError(
                f"{frame_type.name} frame sequence {sequence} {problem}: "
                f"expected {self.next_sequence}"
            )
        self.next_sequence += 1
        return FrameHeader(frame_type, epoch, sequence, length, crc)


def _check_magic_prefix(received: Buffer) -> None:
    prefix = bytes(received[: len(MAGIC)])
    if prefix != MAGIC[: len(prefix)]:
        raise TransactionError(
            f"peer is not speaking Kemari's ft-transaction protocol: expected magic {MAGIC!r}, "
            f"got {bytes(received[:16])!r}"
        )


def _decode_payload(header: FrameHeader, payload: memoryview, check_crc: bool) -> Frame:
    if check_crc and zlib.crc32(payload) != header.crc:
        raise TransactionError(
            f"{header.frame_type.name} payload checksum mismatch (corrupted stream)"
        )
    decoded = _PAYLOAD_CLASSES[header.frame_type].decode(header.epoch, payload)
    return Frame(header.sequence, decoded)
