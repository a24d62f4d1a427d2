"""Encoders for the migration stream, and the stream a fresh QEMU loads at failover.

The item encoders mirror what QEMU 7.2's savevm.c / ram.c / colo.c put on the wire, so
the parser can be tested against them and Kemari can answer the primary with COLO
messages.  ``failover_stream`` builds the complete incoming stream for a QEMU started
with ``-incoming`` whose guest RAM already lies in shared memory-backend-file(s) and
whose migration capability x-ignore-shared is on (layout in docs/stream.md).
"""

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kemari.stream.events import RamBlock
from kemari.stream.format import (
    CAPABILITY_IGNORE_SHARED,
    FILE_MAGIC,
    FILE_VERSION,
    MAX_CAPABILITIES,
    MAX_MACHINE_TYPE_LEN,
    MAX_VMDESC_LEN,
    PAGE_MASK,
    PAGE_SIZE,
    RAM_IDSTR,
    RAM_INSTANCE_ID,
    RAM_VERSION_ID,
    UUID_LEN,
    ColoMessage,
    MalformedStreamError,
    RamFlag,
    SectionType,
    VmCommand,
)

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def _ascii(text: str, what: str) -> bytes:
    """``text`` as ASCII; QEMU's identifiers are, and a replica's names arrive as UTF-8."""
    try:
        return text.encode("ascii")
    except UnicodeEncodeError as exc:
        raise MalformedStreamError(f"{what} {text!r} is not ASCII") from exc


def _name(text: str) -> bytes:
    raw = _ascii(text, "identifier")
    if not 0 < len(raw) <= 255:
        raise MalformedStreamError(f"identifier {text!r} must be 1..255 ASCII bytes")
    return bytes([len(raw)]) + raw


def encode_header() -> bytes:
    """Magic and version (savevm.c qemu_savevm_state_header)."""
    return _BE32.pack(FILE_MAGIC) + _BE32.pack(FILE_VERSION)


def encode_configuration(
    machine_type: str,
    capabilities: Iterable[str] = (),
    uuid: bytes | None = None,
) -> bytes:
    """QEMU_VM_CONFIGURATION with the capabilities and uuid subsections when non-empty."""
    name = _ascii(machine_type, "machine type")
    if not 0 < len(name) <= MAX_MACHINE_TYPE_LEN:
        raise MalformedStreamError(f"machine type {machine_type!r}")
    caps = tuple(capabilities)
    if len(caps) > MAX_CAPABILITIES or len(set(caps)) != len(caps):
        raise MalformedStreamError(f"capabilities {caps}")
    out = bytearray([SectionType.CONFIGURATION])
    out += _BE32.pack(len(name)) + name
    if caps:
        out += bytes([SectionType.SUBSECTION]) + _name("configuration/capabilities")
        out += _BE32.pack(1) + _BE32.pack(len(caps))
        for cap in caps:
            out += _name(cap)
    if uuid is not None:
        if len(uuid) != UUID_LEN:
            raise MalformedStreamError(f"uuid of {len(uuid)} bytes")
        out += bytes([SectionType.SUBSECTION]) + _name("configuration/uuid")
        out += _BE32.pack(1) + uuid
    return bytes(out)


def encode_command(command: VmCommand, payload: bytes = b"") -> bytes:
    """QEMU_VM_COMMAND (savevm.c qemu_savevm_command_send)."""
    return bytes([SectionType.COMMAND]) + _BE16.pack(command) + _BE16.pack(len(payload)) + payload


def encode_section_header(section_type: SectionType, section_id: int) -> bytes:
    """A RAM section header (savevm.c save_section_header); START carries the idstr."""
    out = bytes([section_type]) + _BE32.pack(section_id)
    if section_type in (SectionType.START, SectionType.FULL):
        out += _name(RAM_IDSTR) + _BE32.pack(RAM_INSTANCE_ID) + _BE32.pack(RAM_VERSION_ID)
    return out


def encode_section_footer(section_id: int) -> bytes:
    return bytes([SectionType.FOOTER]) + _BE32.pack(section_id)


def encode_block_list(blocks: Iterable[RamBlock], *, ignore_shared: bool) -> bytes:
    """MEM_SIZE record: total length, then name + used_length (+ GPA with ignore-shared)."""
    entries = tuple(blocks)
    total = sum(block.used_length for block in entries)
    if not entries or total & PAGE_MASK:
        raise MalformedStreamError("block list must be non-empty and page aligned")
    out = bytearray(_BE64.pack(total | RamFlag.MEM_SIZE))
    for block in entries:
        out += _name(block.name) + _BE64.pack(block.used_length)
        if ignore_shared:
            if block.gpa is None:
                raise MalformedStreamError(f"block {block.name} needs its GPA with ignore-shared")
            out += _BE64.pack(block.gpa)
    return bytes(out)


@dataclass(slots=True)
class PageEncoder:
    """Page records of one RAM section run; uses CONTINUE like ram.c save_page_header."""

    last_block: str | None = None

    def _head(self, block: str, offset: int, flag: RamFlag) -> bytes:
        if offset & PAGE_MASK:
            raise MalformedStreamError(f"offset {offset:#x} is not page aligned")
        if block == self.last_block:
            return _BE64.pack(offset | flag | RamFlag.CONTINUE)
        self.last_block = block
        return _BE64.pack(offset | flag) + _name(block)

    def page(self, block: str, offset: int, data: bytes | memoryview) -> list[bytes | memoryview]:
        if len(data) != PAGE_SIZE:
            raise MalformedStreamError(f"page of {len(data)} bytes")
        return [self._head(block, offset, RamFlag.PAGE), data]

    def zero(self, block: str, offset: int) -> bytes:
        """A zero page (ram.c save_zero_page_to_file always writes fill 0)."""
        return self._head(block, offset, RamFlag.ZERO) + b"\x00"


def encode_eos() -> bytes:
    return _BE64.pack(RamFlag.EOS)


def encode_vmdesc_trailer(vmdesc: bytes) -> bytes:
    """QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION, be32 length, JSON."""
    if len(vmdesc) > MAX_VMDESC_LEN:
        raise MalformedStreamError(f"vmdesc of {len(vmdesc)} bytes")
    return bytes([SectionType.EOF, SectionType.VMDESCRIPTION]) + _BE32.pack(len(vmdesc)) + vmdesc


def encode_colo_message(message: ColoMessage, value: int | None = None) -> bytes:
    """be32 message (+ be64 value for VMSTATE_SIZE), colo.c colo_send_message(_value)."""
    if (message is ColoMessage.VMSTATE_SIZE) != (value is not None):
        raise MalformedStreamError(f"COLO {message.name} with value {value}")
    out = _BE32.pack(message)
    return out + _BE64.pack(value) if value is not None else out


def encode_colo_device_state(device_state: bytes) -> bytes:
    """VMSTATE_SIZE + the buffer of FULL sections and EOF (colo.c checkpoint transaction)."""
    buffer = device_state + bytes([SectionType.EOF])
    return encode_colo_message(ColoMessage.VMSTATE_SIZE, len(buffer)) + buffer


@dataclass(frozen=True, slots=True)
class FailoverPage:
    """Contents for one page of a block that is NOT in shared memory (sent as RAM data)."""

    block: str
    offset: int
    data: bytes | memoryview


def failover_stream(
    *,
    machine_type: str,
    ram_section_id: int,
    blocks: Iterable[RamBlock],
    device_state: bytes,
    vmdesc: bytes,
    pages: Iterable[FailoverPage] = (),
) -> Iterator[bytes | memoryview]:
    """The incoming stream for a fresh QEMU with x-ignore-shared and shared RAM backends.

    Every RAM block of the guest is listed with its GPA (ram.c ram_load_precopy checks
    the GPA of shared blocks); pages are only sent for non-shared blocks (``pages``),
    because the shared ones already hold the replica.  ``device_state`` is the last
    committed buffer (FULL sections, no EOF); ``ram_section_id`` must be the primary's,
    so it cannot collide with the section ids inside ``device_state``.  ``vmdesc`` is the
    JSON captured at the initial sync: QEMU's loader reads and discards it after the EOF
    (savevm.c qemu_loadvm_state) and would otherwise block waiting for it.
    """
    block_list = tuple(blocks)
    sizes = {block.name: block.used_length for block in block_list}
    yield encode_header()
    yield encode_configuration(machine_type, (CAPABILITY_IGNORE_SHARED,))
    yield encode_section_header(SectionType.START, ram_section_id)
    yield encode_block_list(block_list, ignore_shared=True)
    yield encode_eos()
    yield encode_section_footer(ram_section_id)
    encoder = PageEncoder()
    body: list[bytes | memoryview] = []
    for page in pages:
        size = sizes.get(page.block)
        if size is None or not 0 <= page.offset < size:
            raise MalformedStreamError(f"page {page.block}@{page.offset:#x} outside the blocks")
        body += encoder.page(page.block, page.offset, page.data)
    # An END section always follows, as after a precopy: QEMU does not need it, but
    # the stream then has the same shape as the primary's and parses with StreamParser.
    yield encode_section_header(SectionType.END, ram_section_id)
    yield from body
    yield encode_eos()
    yield encode_section_footer(ram_section_id)
    yield device_state
    yield encode_vmdesc_trailer(vmdesc)
