"""Incremental push parser for the migration stream a QEMU 7.2 x-colo primary sends.

``feed()`` accepts chunks of any size and returns the events of every item that became
complete.  Each item (header, configuration, command, section header, RAM record, footer,
device-state buffer, COLO message) is read in full and validated before any state
changes or any event is produced, so a partial or invalid item never yields an event.
After an error the parser is dead: the stream has lost framing and cannot resume.

The grammar, with its source pointers in QEMU 7.2, is documented in docs/stream.md.
"""

import enum
import json
import struct
from array import array
from dataclasses import dataclass

from kemari.stream.events import (
    ColoEvent,
    Command,
    Configuration,
    DeviceState,
    Header,
    LiveStateEnd,
    RamBlock,
    RamBlockList,
    RamPageRun,
    SectionEnd,
    StreamEvent,
    VmDescription,
)
from kemari.stream.format import (
    CAPABILITY_IGNORE_SHARED,
    FILE_MAGIC,
    FILE_VERSION,
    MAX_CAPABILITIES,
    MAX_DEVICE_STATE_LEN,
    MAX_MACHINE_TYPE_LEN,
    MAX_RAM_BLOCKS,
    MAX_VMDESC_LEN,
    PAGE_BITS,
    PAGE_MASK,
    PAGE_SIZE,
    RAM_IDSTR,
    RAM_INSTANCE_ID,
    RAM_VERSION_ID,
    SUPPORTED_COMMAND_LENGTHS,
    UNSUPPORTED_RAM_FLAGS,
    UUID_LEN,
    ColoMessage,
    IncompleteStreamError,
    MalformedStreamError,
    RamFlag,
    SectionType,
    UnsupportedStreamError,
    VmCommand,
)

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_KNOWN_RAM_FLAGS = RamFlag.ZERO | RamFlag.MEM_SIZE | RamFlag.PAGE | RamFlag.EOS | RamFlag.CONTINUE
# Plain ints for the per-page hot path: every IntFlag operation builds an enum member,
# which costs microseconds per page record.
_UNSUPPORTED = int(UNSUPPORTED_RAM_FLAGS)
_UNKNOWN = PAGE_MASK & ~int(_KNOWN_RAM_FLAGS)
_ZERO = int(RamFlag.ZERO)
_MEM_SIZE = int(RamFlag.MEM_SIZE)
_PAGE = int(RamFlag.PAGE)
_EOS = int(RamFlag.EOS)
_CONTINUE = int(RamFlag.CONTINUE)
_CONTINUE_PAGE = _CONTINUE | _PAGE
_CONTINUE_ZERO = _CONTINUE | _ZERO
_VMDESC_TRAILER_HEAD = 6  # QEMU_VM_EOF byte, QEMU_VM_VMDESCRIPTION byte, be32 length
_VMDESC_MARK = bytes([SectionType.EOF, SectionType.VMDESCRIPTION])
_FOOTER_LEN = 5  # QEMU_VM_SECTION_FOOTER byte, be32 section id
# What _stitch joins of the next input to finish a straddling item: two page records.
_STITCH_BYTES = 2 * (8 + 1 + 255 + 4096)


class ParserState(enum.Enum):
    """Where the parser is in the stream; each state accepts a fixed set of items."""

    HEADER = "header"  # expecting magic + version
    MIGRATION = "migration"  # initial precopy: configuration, commands, RAM sections
    DEVICE_STATE = "device-state"  # initial device sections up to EOF + vmdesc
    COLO_IDLE = "colo-idle"  # waiting for CHECKPOINT_REQUEST
    COLO_REQUESTED = "colo-requested"  # REQUEST seen, waiting for VMSTATE_SEND
    CHECKPOINT_SECTIONS = "checkpoint-sections"  # RAM END sections until EOF
    CHECKPOINT_SIZE = "checkpoint-size"  # waiting for VMSTATE_SIZE
    CHECKPOINT_BUFFER = "checkpoint-buffer"  # reading the device-state buffer
    DONE = "done"  # plain (non-COLO) migration ended after vmdesc
    FAILED = "failed"  # an error was raised; nothing more is accepted


class _NeedMore(Exception):
    """The current item is not complete in the buffer yet (internal control flow)."""


class _Reader:
    """Bounds-checked big-endian reads from an immutable buffer, starting at ``pos``."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf = buf
        self.pos = pos

    def _need(self, count: int) -> None:
        if self.pos + count > len(self.buf):
            raise _NeedMore

    def peek_u8(self) -> int:
        self._need(1)
        return self.buf[self.pos]

    def u8(self) -> int:
        self._need(1)
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def be16(self) -> int:
        self._need(2)
        (value,) = _BE16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(value)

    def be32(self) -> int:
        self._need(4)
        (value,) = _BE32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def be64(self) -> int:
        self._need(8)
        (value,) = _BE64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(value)

    def raw(self, count: int) -> memoryview:
        self._need(count)
        view = memoryview(self.buf)[self.pos : self.pos + count]
        self.pos += count
        return view

    def name(self, what: str) -> str:
        """A u8-length-prefixed identifier (idstr, block name, capability)."""
        length = self.u8()
        data = bytes(self.raw(length))
        if length == 0:
            raise MalformedStreamError(f"empty {what}")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError as exc:
            raise MalformedStreamError(f"{what} is not ASCII: {data!r}") from exc
        if not text.isprintable():
            raise MalformedStreamError(f"{what} has control characters: {data!r}")
        return text


@dataclass(slots=True)
class _OpenSection:
    """A RAM section whose header was read and whose footer is still to come."""

    section_type: SectionType
    section_id: int
    saw_eos: bool = False


class StreamParser:
    """Push parser: ``feed()`` bytes as they arrive, act on the returned events."""

    def __init__(
        self,
        *,
        max_device_state: int = MAX_DEVICE_STATE_LEN,
        max_vmdesc: int = MAX_VMDESC_LEN,
    ) -> None:
        self._max_device_state = max_device_state
        self._max_vmdesc = max_vmdesc
        self._state = ParserState.HEADER
        self._buf = b""
        self._pos = 0
        # Bytes of the initial device state / a checkpoint's device buffer; they are
        # consumed from the input as they arrive (the item's length is unknown or large).
        self._blob = bytearray()
        self._blob_target = 0
        self._configuration_allowed = False
        self._commands_allowed = False
        self._ignore_shared = False
        self._colo_enabled = False
        self._blocks: dict[str, RamBlock] = {}
        self._ram_section_id: int | None = None
        self._ram_ended = False
        self._section: _OpenSection | None = None
        self._last_block: RamBlock | None = None

    @property
    def state(self) -> ParserState:
        return self._state

    @property
    def blocks(self) -> dict[str, RamBlock]:
        """The RAM blocks announced by MEM_SIZE, by name (empty before the block list)."""
        return dict(self._blocks)

    @property
    def ram_section_id(self) -> int | None:
        return self._ram_section_id

    @property
    def ignore_shared(self) -> bool:
        return self._ignore_shared

    @property
    def colo_enabled(self) -> bool:
        return self._colo_enabled

    @property
    def buffered(self) -> int:
        """Input bytes held that do not yet form a complete item."""
        return len(self._buf) - self._pos + len(self._blob)

    def feed(self, data: bytes | bytearray | memoryview) -> list[StreamEvent]:
        """Consume ``data``; return the events of every item it completed, in order.

        Raises a StreamError subclass on malformed or unsupported input; the events of
        this call are then dropped and the parser stays FAILED.
        """
        if self._state is ParserState.FAILED:
            raise MalformedStreamError("the stream already failed; no more input accepted")
        chunk = bytes(data)
        events: list[StreamEvent] = []
        try:
            leftover = len(self._buf) - self._pos
            if leftover:
                self._stitch(chunk, leftover, events)
            else:
                self._buf, self._pos = chunk, 0
            self._pos = self._items(self._buf, self._pos, len(self._buf), events)
        except Exception:
            self._state = ParserState.FAILED
            raise
        return events

    def _stitch(self, chunk: bytes, leftover: int, events: list[StreamEvent]) -> None:
        """Finish the items that straddle the previous input and ``chunk``.

        They are completed from the leftover plus the start of ``chunk`` (a page record
        is at most ~4.4 KiB), so the chunk itself is not copied and its pages stay views
        into it; only an item longer than that (or the initial device state) makes the
        whole chunk be joined.
        """
        head = self._buf[self._pos :] + chunk[:_STITCH_BYTES]
        pos = self._items(head, 0, leftover, events, stitching=True)
        if pos >= leftover:
            self._buf, self._pos = chunk, pos - leftover
        elif len(head) == leftover + len(chunk):
            self._buf, self._pos = head, pos
        else:
            self._buf, self._pos = head[pos:] + chunk[_STITCH_BYTES:], 0

    def _items(
        self,
        buf: bytes,
        pos: int,
        until: int,
        events: list[StreamEvent],
        *,
        stitching: bool = False,
    ) -> int:
        """Parse the complete items of ``buf`` from ``pos`` until one ends at or after
        ``until``; add their events and return where the next item starts.

        When ``stitching``, the initial device state is left alone: its end can only be
        recognised at the end of an input (see :meth:`_initial_device_state`).
        """
        while pos < until and not (stitching and self._state is ParserState.DEVICE_STATE):
            reader = _Reader(buf, pos)
            try:
                produced = self._step(reader)
            except _NeedMore:
                break
            # Commit point: the item was complete and valid.
            pos = reader.pos
            events.extend(produced)
        return pos

    def finish(self) -> None:
        """Declare the end of input; raise IncompleteStreamError unless at an item boundary
        where the primary may legitimately stop (end of migration, or between checkpoints)."""
        if self.buffered or self._state not in (ParserState.DONE, ParserState.COLO_IDLE):
            raise IncompleteStreamError(
                f"stream ended in state {self._state.value} with {self.buffered} bytes pending"
            )

    # -- dispatch ---------------------------------------------------------------------

    def _step(self, reader: _Reader) -> list[StreamEvent]:
        state = self._state
        if self._section is not None:
            return self._ram_section_item(reader, self._section)
        if state is ParserState.HEADER:
            return self._header(reader)
        if state is ParserState.MIGRATION:
            return self._migration_item(reader)
        if state is ParserState.DEVICE_STATE:
            return self._initial_device_state(reader)
        if state in (
            ParserState.COLO_IDLE,
            ParserState.COLO_REQUESTED,
            ParserState.CHECKPOINT_SIZE,
        ):
            return self._colo_message(reader)
        if state is ParserState.CHECKPOINT_SECTIONS:
            return self._checkpoint_item(reader)
        if state is ParserState.CHECKPOINT_BUFFER:
            return self._checkpoint_buffer(reader)
        raise MalformedStreamError(f"unexpected data after the end of the stream ({state.value})")

    # -- initial migration ------------------------------------------------------------

    def _header(self, reader: _Reader) -> list[StreamEvent]:
        magic = reader.be32()
        version = reader.be32()
        if magic != FILE_MAGIC:
            raise MalformedStreamError(f"bad file magic {magic:#010x}")
        if version != FILE_VERSION:
            raise UnsupportedStreamError(f"stream version {version}, expected {FILE_VERSION}")
        self._state = ParserState.MIGRATION
        self._configuration_allowed = True
        self._commands_allowed = True
        return [Header(version)]

    def _migration_item(self, reader: _Reader) -> list[StreamEvent]:
        kind = reader.peek_u8()
        if kind == SectionType.CONFIGURATION and self._configuration_allowed:
            reader.u8()
            return [self._configuration(reader)]
        if kind == SectionType.COMMAND and self._commands_allowed:
            reader.u8()
            return [self._command(reader)]
        if kind in (SectionType.START, SectionType.PART, SectionType.END):
            reader.u8()
            section_type = SectionType(kind)
            if section_type is SectionType.START:
                if self._ram_section_id is not None:
                    raise MalformedStreamError("second SECTION_START")
                section_id = self._ram_section_start(reader)
            else:
                if self._ram_ended:
                    raise MalformedStreamError(f"RAM {section_type.name} after the RAM END")
                section_id = self._ram_section_continue(reader, section_type)
            self._configuration_allowed = False
            self._commands_allowed = False
            self._section = _OpenSection(section_type, section_id)
            return []
        if kind in (SectionType.FULL, SectionType.EOF) and self._ram_ended:
            # Device sections are not length-prefixed; their end is found from the
            # vmdesc trailer (see _initial_device_state).  Nothing is consumed here.
            self._state = ParserState.DEVICE_STATE
            return []
        raise MalformedStreamError(f"unexpected byte {kind:#04x} in the migration stream")

    def _configuration(self, reader: _Reader) -> Configuration:
        length = reader.be32()
        if not 0 < length <= MAX_MACHINE_TYPE_LEN:
            raise MalformedStreamError(f"machine type length {length}")
        raw = bytes(reader.raw(length))
        try:
            machine_type = raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise MalformedStreamError(f"machine type is not ASCII: {raw!r}") from exc
        if not machine_type.isprintable():
            raise MalformedStreamError(f"machine type has control characters: {raw!r}")
        capabilities: tuple[str, ...] = ()
        page_bits: int | None = None
        uuid: bytes | None = None
        seen: set[str] = set()
        # vmstate.c vmstate_subsection_load: subsections follow while the next byte is
        # QEMU_VM_SUBSECTION, so the configuration only ends when the next item starts.
        while reader.peek_u8() == SectionType.SUBSECTION:
            reader.u8()
            name = reader.name("subsection name")
            version = reader.be32()
            if name in seen:
                raise MalformedStreamError(f"subsection {name} repeated")
            seen.add(name)
            if version != 1:
                raise UnsupportedStreamError(f"subsection {name} version {version}")
            if name == "configuration/target-page-bits":
                page_bits = reader.be32()
                if page_bits != PAGE_BITS:
                    raise UnsupportedStreamError(f"target page bits {page_bits}")
            elif name == "configuration/capabilities":
                count = reader.be32()
                if count > MAX_CAPABILITIES:
                    raise MalformedStreamError(f"{count} capabilities")
                names = tuple(reader.name("capability") for _ in range(count))
                if len(set(names)) != len(names):
                    raise MalformedStreamError(f"repeated capability in {names}")
                capabilities = names
            elif name == "configuration/uuid":
                uuid = bytes(reader.raw(UUID_LEN))
            else:
                raise MalformedStreamError(f"unknown configuration subsection {name}")
        self._configuration_allowed = False
        self._ignore_shared = CAPABILITY_IGNORE_SHARED in capabilities
        return Configuration(machine_type, capabilities, page_bits, uuid)

    def _command(self, reader: _Reader) -> Command:
        number = reader.be16()
        length = reader.be16()
        try:
            command = VmCommand(number)
        except ValueError as exc:
            raise MalformedStreamError(f"unknown command {number}") from exc
        expected = SUPPORTED_COMMAND_LENGTHS.get(command)
        if expected is None:
            raise UnsupportedStreamError(f"command {command.name} is not supported")
        if length != expected:
            raise MalformedStreamError(f"command {command.name} with length {length}")
        payload = bytes(reader.raw(length))
        self._configuration_allowed = False
        if command is VmCommand.ENABLE_COLO:
            self._colo_enabled = True
        return Command(command, payload)

    def _ram_section_start(self, reader: _Reader) -> int:
        section_id = reader.be32()
        idstr = reader.name("section idstr")
        instance_id = reader.be32()
        version_id = reader.be32()
        if idstr != RAM_IDSTR:
            raise UnsupportedStreamError(f"iterable section {idstr!r} (only RAM is supported)")
        if instance_id != RAM_INSTANCE_ID or version_id != RAM_VERSION_ID:
            raise UnsupportedStreamError(f"RAM section instance {instance_id} version {version_id}")
        self._ram_section_id = section_id
        return section_id

    def _ram_section_continue(self, reader: _Reader, section_type: SectionType) -> int:
        section_id = reader.be32()
        if self._ram_section_id is None or not self._blocks:
            raise MalformedStreamError(f"{section_type.name} before the RAM block list")
        if section_id != self._ram_section_id:
            raise MalformedStreamError(f"{section_type.name} for unknown section {section_id}")
        return section_id

    def _initial_device_state(self, reader: _Reader) -> list[StreamEvent]:
        # Everything from the first FULL section to the end of the vmdesc JSON.  The
        # primary sends nothing after the JSON until the receiver answers, so the
        # trailer "EOF, VMDESCRIPTION, be32 length, JSON" ends exactly at the end of the
        # data received so far; it is validated strictly before it is accepted.
        data = reader.raw(len(reader.buf) - reader.pos)
        limit = self._max_device_state + _VMDESC_TRAILER_HEAD + self._max_vmdesc
        if len(self._blob) + len(data) > limit:
            raise MalformedStreamError("initial device state has no vmdesc trailer within limits")
        self._blob += data
        cut = self._find_vmdesc_trailer(self._blob)
        if cut is None:
            return []
        device = bytes(self._blob[:cut])
        vmdesc = bytes(self._blob[cut + _VMDESC_TRAILER_HEAD :])
        self._blob = bytearray()
        self._state = ParserState.COLO_IDLE if self._colo_enabled else ParserState.DONE
        return [DeviceState(device), VmDescription(vmdesc)]

    def _find_vmdesc_trailer(self, blob: bytearray) -> int | None:
        if not blob.endswith(b"}"):
            return None
        # Only where a whole trailer head (00 06 be32) fits before the end: a "00 06"
        # among the last 5 bytes cannot start one.  Clamped at 0, because a negative
        # ``end`` would count from the end of the blob.
        end = max(len(blob) - _VMDESC_TRAILER_HEAD + len(_VMDESC_MARK), 0)
        while True:
            at = blob.rfind(_VMDESC_MARK, 0, end)
            if at < 0 or len(blob) - at - _VMDESC_TRAILER_HEAD > self._max_vmdesc:
                return None
            (length,) = _BE32.unpack_from(blob, at + 2)
            if at + _VMDESC_TRAILER_HEAD + length == len(blob) and self._trailer_matches(blob, at):
                if at > self._max_device_state:
                    raise MalformedStreamError(f"initial device state of {at} bytes")
                return at
            end = at + 1

    @staticmethod
    def _trailer_matches(blob: bytearray, at: int) -> bool:
        """The JSON is a vmdesc and agrees with the first device section's header."""
        try:
            desc = json.loads(bytes(blob[at + _VMDESC_TRAILER_HEAD :]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            # RecursionError: nesting deeper than the interpreter's limit (a vmdesc is a
            # few levels deep), which json raises instead of a ValueError.
            return False
        if not isinstance(desc, dict) or desc.get("page_size") != PAGE_SIZE:
            return False
        devices = desc.get("devices")
        if not isinstance(devices, list):
            return False
        if not devices:
            return at == 0
        first = devices[0]
        if not isinstance(first, dict):
            return False
        return _device_state_shape_ok(bytes(blob[:at]), first.get("name"), first.get("instance_id"))

    # -- RAM section payload ----------------------------------------------------------

    def _ram_section_item(self, reader: _Reader, section: _OpenSection) -> list[StreamEvent]:
        if section.saw_eos:
            marker = reader.u8()
            section_id = reader.be32()
            if marker != SectionType.FOOTER or section_id != section.section_id:
                raise MalformedStreamError(
                    f"bad section footer {marker:#04x}/{section_id} for section "
                    f"{section.section_id}"
                )
            self._section = None
            if section.section_type is SectionType.END and self._state is ParserState.MIGRATION:
                self._ram_ended = True
            return [SectionEnd(section.section_type, section_id)]
        word = reader.be64()
        flags = word & PAGE_MASK
        address = word & ~PAGE_MASK
        if flags & _UNSUPPORTED:
            raise UnsupportedStreamError(f"RAM record flags {RamFlag(flags)!r} are not supported")
        if flags & _UNKNOWN:
            raise MalformedStreamError(f"unknown RAM record flags {flags:#x}")
        base = flags & ~_CONTINUE
        if section.section_type is SectionType.START and not self._blocks and base != _MEM_SIZE:
            raise MalformedStreamError("RAM SECTION_START does not begin with the block list")
        if base == _MEM_SIZE and not flags & _CONTINUE:
            return [self._block_list(reader, section, address)]
        if base in (_ZERO, _PAGE):
            return [self._page_run(reader, flags, address)]
        if flags == _EOS and address == 0:
            section.saw_eos = True
            return []
        raise MalformedStreamError(f"invalid RAM record {word:#018x}")

    def _block_list(self, reader: _Reader, section: _OpenSection, total: int) -> RamBlockList:
        if section.section_type is not SectionType.START or self._blocks:
            raise MalformedStreamError("RAM block list outside the SECTION_START")
        if total == 0:
            raise MalformedStreamError("RAM block list with no memory")
        blocks: dict[str, RamBlock] = {}
        remaining = total
        # ram.c ram_load_precopy: entries follow until their lengths add up to the total.
        while remaining:
            if len(blocks) >= MAX_RAM_BLOCKS:
                raise MalformedStreamError(f"more than {MAX_RAM_BLOCKS} RAM blocks")
            name = reader.name("RAM block name")
            length = reader.be64()
            gpa = reader.be64() if self._ignore_shared else None
            if name in blocks:
                raise MalformedStreamError(f"RAM block {name} listed twice")
            if length == 0 or length & PAGE_MASK or length > remaining:
                raise MalformedStreamError(f"RAM block {name} length {length:#x}")
            blocks[name] = RamBlock(name, length, gpa)
            remaining -= length
        self._blocks = blocks
        return RamBlockList(section.section_id, tuple(blocks.values()))

    def _page_run(self, reader: _Reader, flags: int, offset: int) -> RamPageRun:
        """The page record whose word was just read, and the records that extend its run."""
        if flags & _CONTINUE:
            block = self._last_block
            if block is None:
                raise MalformedStreamError("RAM CONTINUE record without a previous block")
        else:
            name = reader.name("RAM block name")
            found = self._blocks.get(name)
            if found is None:
                raise MalformedStreamError(f"RAM record for unknown block {name!r}")
            block = found
        if offset >= block.used_length:
            raise MalformedStreamError(
                f"RAM offset {offset:#x} beyond block {block.name} of {block.used_length:#x}"
            )
        page = offset >> PAGE_BITS
        run = RamPageRun(block.name, array("I"), [], array("I"))
        if flags & _ZERO:
            fill = reader.u8()
            if fill:
                # ram.c save_zero_page_to_file always writes 0; a replica has no use for
                # any other fill, so the stream is refused here, at its edge.
                raise UnsupportedStreamError(f"zero page record with fill byte {fill:#04x}")
            run.zero_pages.append(page)
        else:
            run.data_pages.append(page)
            run.data.append(reader.raw(PAGE_SIZE))
        self._last_block = block
        self._extend_run(reader, run, page, block.used_length)
        return run

    @staticmethod
    def _extend_run(reader: _Reader, run: RamPageRun, last: int, limit: int) -> None:
        """The hot path: add the CONTINUE records that follow, complete in the buffer.

        A record joins the run only if it passes the checks of :meth:`_page_run` and its
        page comes after the run's last one; the first record that does not (or is
        incomplete) is left to the general path, which starts a new run or raises.
        """
        buf, pos, end = reader.buf, reader.pos, len(reader.buf)
        view = memoryview(buf)
        unpack_from = _BE64.unpack_from
        add_data_page = run.data_pages.append
        add_data = run.data.append
        add_zero_page = run.zero_pages.append
        while pos + 8 <= end:
            (word,) = unpack_from(buf, pos)
            flags = word & PAGE_MASK
            offset = word ^ flags
            page = offset >> PAGE_BITS
            if offset >= limit or page <= last:
                break
            if flags == _CONTINUE_PAGE:
                if pos + 8 + PAGE_SIZE > end:
                    break
                add_data_page(page)
                add_data(view[pos + 8 : pos + 8 + PAGE_SIZE])
                pos += 8 + PAGE_SIZE
            elif flags == _CONTINUE_ZERO:
                if pos + 9 > end or buf[pos + 8]:
                    break
                add_zero_page(page)
                pos += 9
            else:
                break
            last = page
        reader.pos = pos

    # -- COLO phase -------------------------------------------------------------------

    def _colo_message(self, reader: _Reader) -> list[StreamEvent]:
        number = reader.be32()
        try:
            message = ColoMessage(number)
        except ValueError as exc:
            raise MalformedStreamError(f"unknown COLO message {number}") from exc
        expected = {
            ParserState.COLO_IDLE: ColoMessage.CHECKPOINT_REQUEST,
            ParserState.COLO_REQUESTED: ColoMessage.VMSTATE_SEND,
            ParserState.CHECKPOINT_SIZE: ColoMessage.VMSTATE_SIZE,
        }[self._state]
        if message is not expected:
            raise MalformedStreamError(
                f"COLO {message.name} while expecting {expected.name} ({self._state.value})"
            )
        if message is ColoMessage.CHECKPOINT_REQUEST:
            self._state = ParserState.COLO_REQUESTED
            return [ColoEvent(message)]
        if message is ColoMessage.VMSTATE_SEND:
            self._state = ParserState.CHECKPOINT_SECTIONS
            return [ColoEvent(message)]
        size = reader.be64()
        # The buffer always holds at least the EOF byte (savevm.c qemu_save_device_state).
        if not 0 < size <= self._max_device_state:
            raise MalformedStreamError(f"COLO device state size {size}")
        self._blob_target = size
        self._state = ParserState.CHECKPOINT_BUFFER
        return [ColoEvent(message, size)]

    def _checkpoint_item(self, reader: _Reader) -> list[StreamEvent]:
        kind = reader.u8()
        if kind == SectionType.EOF:
            self._state = ParserState.CHECKPOINT_SIZE
            return [LiveStateEnd()]
        if kind == SectionType.END:
            section_id = self._ram_section_continue(reader, SectionType.END)
            self._section = _OpenSection(SectionType.END, section_id)
            return []
        raise MalformedStreamError(f"unexpected byte {kind:#04x} in a checkpoint's RAM part")

    def _checkpoint_buffer(self, reader: _Reader) -> list[StreamEvent]:
        wanted = self._blob_target - len(self._blob)
        self._blob += reader.raw(min(wanted, len(reader.buf) - reader.pos))
        if len(self._blob) < self._blob_target:
            return []
        buffer = bytes(self._blob)
        self._blob = bytearray()
        if buffer[-1] != SectionType.EOF or not _device_state_shape_ok(buffer[:-1], None, None):
            raise MalformedStreamError("COLO device state buffer is not FULL sections + EOF")
        self._state = ParserState.COLO_IDLE
        return [DeviceState(buffer[:-1])]


def _device_state_shape_ok(data: bytes, first_name: object, first_instance: object) -> bool:
    """Cheap structural check of opaque device state: empty, or it starts with a FULL
    section header (matching the vmdesc's first device when given) and ends with a footer."""
    if not data:
        return first_name is None
    reader = _Reader(data, 0)
    try:
        if reader.u8() != SectionType.FULL:
            return False
        reader.be32()
        name = reader.name("section idstr")
        instance = reader.be32()
        reader.be32()
    except (_NeedMore, MalformedStreamError):
        return False
    if first_name is not None and (name != first_name or instance != first_instance):
        return False
    return len(data) >= reader.pos + _FOOTER_LEN and data[-_FOOTER_LEN] == SectionType.FOOTER
