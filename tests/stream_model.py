"""Test helper: builds well-formed x-colo streams from a model and the events they must yield.

The bytes come from kemari.stream.writer's item encoders (which mirror QEMU 7.2's
savevm.c / ram.c / colo.c); the expected events are derived from the model directly, so
the parser is checked against an independent description of the same stream.
"""

from dataclasses import dataclass, field

from hypothesis import strategies as st

from kemari.stream import (
    ColoEvent,
    ColoMessage,
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
from kemari.stream.format import PAGE_SIZE, SectionType, VmCommand
from kemari.stream.writer import (
    PageEncoder,
    encode_block_list,
    encode_colo_device_state,
    encode_colo_message,
    encode_command,
    encode_configuration,
    encode_eos,
    encode_header,
    encode_section_footer,
    encode_section_header,
    encode_vmdesc_trailer,
)

RAM_SECTION_ID = 2


@dataclass
class Record:
    """One page record: ``data`` is a full page, or None for a zero page."""

    block: str
    offset: int
    data: bytes | None


@dataclass
class Device:
    section_id: int
    name: str
    instance_id: int
    payload: bytes


@dataclass
class Model:
    machine_type: str
    ignore_shared: bool
    blocks: list[RamBlock]
    iterations: list[list[Record]]  # PART sections; the last list is the END section
    devices: list[Device]
    checkpoints: list[tuple[list[Record], list[Device]]] = field(default_factory=list)


def device_bytes(devices: list[Device]) -> bytes:
    out = bytearray()
    for dev in devices:
        raw = dev.name.encode()
        out += bytes([SectionType.FULL]) + dev.section_id.to_bytes(4, "big")
        out += bytes([len(raw)]) + raw + dev.instance_id.to_bytes(4, "big") + (1).to_bytes(4, "big")
        out += dev.payload + encode_section_footer(dev.section_id)
    return bytes(out)


def vmdesc_json(devices: list[Device]) -> bytes:
    parts = ",".join(f'{{"name":"{d.name}","instance_id":{d.instance_id}}}' for d in devices)
    return f'{{"page_size":{PAGE_SIZE},"devices":[{parts}]}}'.encode()


# What :func:`normalize` turns each page record into: ("page", block, offset, data) or
# ("zero", block, offset); every other event stays itself.
Expected = StreamEvent | tuple[str, str, int] | tuple[str, str, int, bytes]


def _section(section_type: SectionType, records: list[Record]) -> tuple[bytes, list[Expected]]:
    out = bytearray(encode_section_header(section_type, RAM_SECTION_ID))
    events: list[Expected] = []
    encoder = PageEncoder()
    for rec in records:
        if rec.data is None:
            out += encoder.zero(rec.block, rec.offset)
            events.append(("zero", rec.block, rec.offset))
        else:
            for part in encoder.page(rec.block, rec.offset, rec.data):
                out += part
            events.append(("page", rec.block, rec.offset, rec.data))
    out += encode_eos() + encode_section_footer(RAM_SECTION_ID)
    events.append(SectionEnd(section_type, RAM_SECTION_ID))
    return bytes(out), events


def section_bytes(records: list[Record]) -> bytes:
    """The bytes of a RAM END section holding ``records`` (as a checkpoint sends it)."""
    return _section(SectionType.END, records)[0]


def build(model: Model) -> tuple[bytes, bytes, list[Expected]]:
    """(initial migration bytes, COLO phase bytes, every event in order, normalized)."""
    caps = ("x-ignore-shared",) if model.ignore_shared else ()
    initial = bytearray(encode_header())
    initial += encode_configuration(model.machine_type, caps)
    initial += encode_command(VmCommand.ENABLE_COLO)
    initial += encode_section_header(SectionType.START, RAM_SECTION_ID)
    initial += encode_block_list(model.blocks, ignore_shared=model.ignore_shared)
    initial += encode_eos() + encode_section_footer(RAM_SECTION_ID)
    events: list[Expected] = [
        Header(3),
        Configuration(model.machine_type, caps),
        Command(VmCommand.ENABLE_COLO),
        RamBlockList(RAM_SECTION_ID, tuple(model.blocks)),
        SectionEnd(SectionType.START, RAM_SECTION_ID),
    ]
    for index, records in enumerate(model.iterations):
        last = index == len(model.iterations) - 1
        raw, evs = _section(SectionType.END if last else SectionType.PART, records)
        initial += raw
        events += evs
    device = device_bytes(model.devices)
    vmdesc = vmdesc_json(model.devices)
    initial += device + encode_vmdesc_trailer(vmdesc)
    events += [DeviceState(device), VmDescription(vmdesc)]
    colo = bytearray()
    for records, devices in model.checkpoints:
        colo += encode_colo_message(ColoMessage.CHECKPOINT_REQUEST)
        colo += encode_colo_message(ColoMessage.VMSTATE_SEND)
        events += [ColoEvent(ColoMessage.CHECKPOINT_REQUEST), ColoEvent(ColoMessage.VMSTATE_SEND)]
        if records:
            raw, evs = _section(SectionType.END, records)
            colo += raw
            events += evs
        colo += bytes([SectionType.EOF])
        state = device_bytes(devices)
        colo += encode_colo_device_state(state)
        events += [
            LiveStateEnd(),
            ColoEvent(ColoMessage.VMSTATE_SIZE, len(state) + 1),
            DeviceState(state),
        ]
    return bytes(initial), bytes(colo), events


def run_records(run: RamPageRun) -> list[Expected]:
    """The page records a run stands for, in stream order: a run's pages increase."""
    data = {page: bytes(view) for page, view in zip(run.data_pages, run.data, strict=True)}
    pages = sorted([*run.data_pages, *run.zero_pages])
    assert len(set(pages)) == len(pages) == run.page_count, f"a page twice in {run}"
    return [
        ("page", run.block, page * PAGE_SIZE, data[page])
        if page in data
        else ("zero", run.block, page * PAGE_SIZE)
        for page in pages
    ]


def normalize(events: list[StreamEvent] | list[Expected]) -> list[Expected]:
    """Events with every page run expanded into its records, for equality checks."""
    out: list[Expected] = []
    for event in events:
        if isinstance(event, RamPageRun):
            out += run_records(event)
        else:
            out.append(event)
    return out


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789./@:-_", min_size=1, max_size=24)


@st.composite
def models(draw: st.DrawFn, max_pages: int = 6) -> Model:
    ignore_shared = draw(st.booleans())
    names = draw(st.lists(_names, min_size=1, max_size=3, unique=True))
    blocks = [
        RamBlock(
            n,
            draw(st.integers(1, 8)) * PAGE_SIZE,
            draw(st.integers(0, 2**40)) & ~(PAGE_SIZE - 1) if ignore_shared else None,
        )
        for n in names
    ]

    def records(max_size: int) -> list[Record]:
        out = []
        for _ in range(draw(st.integers(0, max_size))):
            block = draw(st.sampled_from(blocks))
            offset = draw(st.integers(0, block.used_length // PAGE_SIZE - 1)) * PAGE_SIZE
            if draw(st.booleans()):
                out.append(Record(block.name, offset, None))
            else:
                seed = draw(st.binary(min_size=1, max_size=8))
                out.append(Record(block.name, offset, (seed * PAGE_SIZE)[:PAGE_SIZE]))
        return out

    def devices() -> list[Device]:
        return [
            Device(
                draw(st.integers(0, 2**32 - 1)),
                draw(_names),
                draw(st.integers(0, 3)),
                draw(st.binary(max_size=40)),
            )
            for _ in range(draw(st.integers(0, 3)))
        ]

    iterations = [records(max_pages) for _ in range(draw(st.integers(1, 3)))]
    initial_devices = devices()
    checkpoints = [(records(max_pages), devices()) for _ in range(draw(st.integers(0, 2)))]
    return Model(
        draw(st.sampled_from(["pc-i440fx-7.2", "pc-q35-7.2", "microvm"])),
        ignore_shared,
        blocks,
        iterations,
        initial_devices,
        checkpoints,
    )
