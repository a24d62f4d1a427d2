"""Typed events the stream parser emits, one per complete and validated stream item.

Page data is a memoryview into the immutable input chunk it arrived in (no copy when the
page lies inside one chunk); it stays valid for as long as the event is referenced.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from kemari.stream.format import ColoMessage, SectionType, VmCommand


@dataclass(frozen=True, slots=True)
class Header:
    """File magic and version (savevm.c qemu_savevm_state_header)."""

    version: int


@dataclass(frozen=True, slots=True)
class Configuration:
    """The configuration section (savevm.c vmstate_configuration and its subsections)."""

    machine_type: str
    capabilities: tuple[str, ...] = ()
    target_page_bits: int | None = None
    uuid: bytes | None = None


@dataclass(frozen=True, slots=True)
class Command:
    """A QEMU_VM_COMMAND the receiver can accept (ENABLE_COLO, OPEN_RETURN_PATH, PING)."""

    command: VmCommand
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class RamBlock:
    """One entry of the MEM_SIZE block list; ``gpa`` is sent only with x-ignore-shared."""

    name: str
    used_length: int
    gpa: int | None = None


@dataclass(frozen=True, slots=True)
class RamBlockList:
    """The RAM section's block list (ram.c ram_save_setup) and the section id it came in."""

    section_id: int
    blocks: tuple[RamBlock, ...]


@dataclass(slots=True)
class RamPageRun:
    """Consecutive page records of one RAM block with increasing page numbers.

    ``data_pages[i]`` is the page number (byte offset // 4096) whose 4096 bytes are
    ``data[i]``; ``zero_pages`` are the pages QEMU sent zero-filled (RAM_SAVE_FLAG_ZERO,
    fill 0).  No page appears twice in a run, so applying its zero pages and its data
    pages in either order has the effect of its records in stream order.  One event per
    run instead of one per page keeps the parser's per-page work to the record's checks
    and two appends (docs/stream.md, "Events").
    """

    block: str
    data_pages: array[int]
    data: list[memoryview]
    zero_pages: array[int]

    @property
    def page_count(self) -> int:
        return len(self.data_pages) + len(self.zero_pages)


@dataclass(frozen=True, slots=True)
class SectionEnd:
    """A RAM section's EOS and footer were read and match its header."""

    section_type: SectionType
    section_id: int


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Opaque non-RAM device state: FULL sections with footers, without the final EOF byte."""

    data: bytes


@dataclass(frozen=True, slots=True)
class VmDescription:
    """The JSON that ends the initial migration (savevm.c, after QEMU_VM_EOF)."""

    json: bytes


@dataclass(frozen=True, slots=True)
class LiveStateEnd:
    """The EOF byte that closes a checkpoint's RAM sections (savevm.c qemu_savevm_live_state)."""


@dataclass(frozen=True, slots=True)
class ColoEvent:
    """A COLO control message from the primary; ``value`` only for VMSTATE_SIZE."""

    message: ColoMessage
    value: int | None = None


StreamEvent = (
    Header
    | Configuration
    | Command
    | RamBlockList
    | RamPageRun
    | SectionEnd
    | DeviceState
    | VmDescription
    | LiveStateEnd
    | ColoEvent
)
