"""Typed events the stream parser emits, one per complete and validated stream item.

Page data is a memoryview into the immutable input chunk it arrived in (no copy when the
page lies inside one chunk); it stays valid for as long as the event is referenced.
"""

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


# RamPage and RamZeroPage are built once per page on the hot path; a frozen dataclass's
# __init__ (object.__setattr__ per field) costs about three times as much, so these two
# are plain slotted dataclasses.  Treat them as read-only like the others.
@dataclass(slots=True)
class RamPage:
    """A full page of data for ``block`` at byte ``offset`` (RAM_SAVE_FLAG_PAGE)."""

    block: str
    offset: int
    data: memoryview


@dataclass(slots=True)
class RamZeroPage:
    """A page filled with byte ``fill`` (RAM_SAVE_FLAG_ZERO; 7.2 always sends 0)."""

    block: str
    offset: int
    fill: int


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
    | RamPage
    | RamZeroPage
    | SectionEnd
    | DeviceState
    | VmDescription
    | LiveStateEnd
    | ColoEvent
)
