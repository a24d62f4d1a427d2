"""Stream codec: handcrafted QEMU 7.2 x-colo streams, failover stream, property tests."""

import struct
from pathlib import Path

import pytest
from fuzz.fuzz_stream import TestOneInput
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stream_model import (
    RAM_SECTION_ID,
    Device,
    Expected,
    Model,
    Record,
    build,
    device_bytes,
    models,
    normalize,
    vmdesc_json,
)

from kemari.errors import KemariError, StreamError
from kemari.stream import (
    ColoMessage,
    DeviceState,
    FailoverPage,
    IncompleteStreamError,
    MalformedStreamError,
    ParserState,
    RamBlock,
    RamBlockList,
    RamPageRun,
    StreamParser,
    UnsupportedStreamError,
    VmDescription,
    encode_colo_message,
    failover_stream,
)
from kemari.stream.format import PAGE_SIZE, RamFlag, SectionType, VmCommand
from kemari.stream.writer import (
    encode_block_list,
    encode_command,
    encode_configuration,
    encode_eos,
    encode_header,
    encode_section_footer,
    encode_section_header,
)

PC_RAM = RamBlock("pc.ram", 4 * PAGE_SIZE)
ROM = RamBlock("/rom@etc/acpi/tables", PAGE_SIZE)


def simple_model() -> Model:
    page = bytes(range(256)) * (PAGE_SIZE // 256)
    return Model(
        machine_type="pc-i440fx-7.2",
        ignore_shared=False,
        blocks=[PC_RAM, ROM],
        iterations=[
            [
                Record("pc.ram", 0, page),
                Record("pc.ram", PAGE_SIZE, None),
                Record(ROM.name, 0, None),
            ],
            [Record("pc.ram", 3 * PAGE_SIZE, page)],
        ],
        devices=[Device(3, "timer", 0, b"\x01\x02"), Device(4, "cpu", 0, b"\x00" * 9)],
        checkpoints=[([Record("pc.ram", 2 * PAGE_SIZE, page)], [Device(3, "timer", 0, b"\x07")])],
    )


def ram_start(blocks: list[RamBlock], *, ignore_shared: bool = False) -> bytes:
    caps = ("x-ignore-shared",) if ignore_shared else ()
    return (
        encode_header()
        + encode_configuration("pc-i440fx-7.2", caps)
        + encode_section_header(SectionType.START, RAM_SECTION_ID)
        + encode_block_list(blocks, ignore_shared=ignore_shared)
        + encode_eos()
        + encode_section_footer(RAM_SECTION_ID)
    )


def part(records: bytes) -> bytes:
    return (
        encode_section_header(SectionType.PART, RAM_SECTION_ID)
        + records
        + encode_eos()
        + encode_section_footer(RAM_SECTION_ID)
    )


def record(flags: int, offset: int = 0, block: str | None = "pc.ram") -> bytes:
    head = struct.pack(">Q", offset | flags)
    if block is None:
        return head
    return head + bytes([len(block)]) + block.encode()


def feed_two_phase(parser: StreamParser, data: bytes, split: int) -> list[Expected]:
    """Feed ``data`` as two bursts, like a primary that pauses after the initial vmdesc;
    return the events normalized."""
    return normalize(parser.feed(data[:split])) + normalize(parser.feed(data[split:]))


def parse_all(data: bytes) -> list[Expected]:
    parser = StreamParser()
    return normalize(parser.feed(data))


def test_handcrafted_colo_stream_yields_every_event_in_order() -> None:
    initial, colo, expected = build(simple_model())
    parser = StreamParser()
    events = parser.feed(initial)
    assert parser.state is ParserState.COLO_IDLE
    events += parser.feed(colo)
    parser.finish()
    assert normalize(events) == normalize(expected)
    assert parser.blocks == {"pc.ram": PC_RAM, ROM.name: ROM}
    assert parser.colo_enabled and not parser.ignore_shared


def test_page_data_is_a_view_into_the_input_chunk() -> None:
    page = b"\xab" * PAGE_SIZE
    data = ram_start([PC_RAM]) + part(record(RamFlag.PAGE, 2 * PAGE_SIZE) + page)
    events = StreamParser().feed(data)
    (run,) = [e for e in events if isinstance(e, RamPageRun)]
    assert list(run.data_pages) == [2] and not run.zero_pages
    assert run.data[0].obj is data and run.data[0] == page


def test_a_pass_over_one_block_is_one_run_and_a_repeat_starts_another() -> None:
    big = RamBlock("pc.ram", 64 * PAGE_SIZE)
    page = b"\xcd" * PAGE_SIZE
    records = record(RamFlag.PAGE, 0) + page
    for n in range(1, 40):  # QEMU's bitmap walk: increasing pages, CONTINUE records
        if n % 3:
            records += record(RamFlag.PAGE | RamFlag.CONTINUE, n * PAGE_SIZE, None) + page
        else:
            records += record(RamFlag.ZERO | RamFlag.CONTINUE, n * PAGE_SIZE, None) + b"\x00"
    records += record(RamFlag.ZERO | RamFlag.CONTINUE, 5 * PAGE_SIZE, None) + b"\x00"
    events = StreamParser().feed(ram_start([big]) + part(records))
    first, second = [e for e in events if isinstance(e, RamPageRun)]
    assert list(first.data_pages) == [n for n in range(40) if n % 3 or n == 0]
    assert list(first.zero_pages) == [n for n in range(1, 40) if not n % 3]
    assert len(first.data) == len(first.data_pages) and first.page_count == 40
    assert list(second.zero_pages) == [5] and not second.data_pages


def test_a_zero_page_with_another_fill_byte_is_refused() -> None:
    data = ram_start([PC_RAM]) + part(record(RamFlag.ZERO, PAGE_SIZE) + b"\x07")
    with pytest.raises(UnsupportedStreamError, match="fill byte 0x07"):
        StreamParser().feed(data)
    continued = (
        record(RamFlag.ZERO, 0) + b"\x00" + record(RamFlag.ZERO | RamFlag.CONTINUE, PAGE_SIZE, None)
    )
    with pytest.raises(UnsupportedStreamError, match="fill byte 0xff"):
        StreamParser().feed(ram_start([PC_RAM]) + part(continued + b"\xff"))


def test_ignore_shared_block_list_carries_gpas() -> None:
    blocks = [RamBlock("pc.ram", 2 * PAGE_SIZE, 0), RamBlock("pc.bios", PAGE_SIZE, 0xFFFC0000)]
    events = StreamParser().feed(ram_start(blocks, ignore_shared=True))
    assert RamBlockList(RAM_SECTION_ID, tuple(blocks)) in events


def test_failover_stream_round_trips_through_the_parser() -> None:
    blocks = [RamBlock("pc.ram", 4 * PAGE_SIZE, 0), RamBlock("vga.vram", 2 * PAGE_SIZE, 0)]
    devices = [Device(5, "cpu", 0, b"regs"), Device(6, "apic", 0, b"x")]
    device = device_bytes(devices)
    vram = b"\x11" * PAGE_SIZE
    chunks = failover_stream(
        machine_type="pc-q35-7.2",
        ram_section_id=RAM_SECTION_ID,
        blocks=blocks,
        device_state=device,
        vmdesc=vmdesc_json(devices),
        pages=[FailoverPage("vga.vram", PAGE_SIZE, vram)],
    )
    parser = StreamParser()
    events: list[object] = []
    for chunk in chunks:
        events += normalize(parser.feed(chunk))
    parser.finish()
    assert parser.state is ParserState.DONE and parser.ignore_shared
    assert RamBlockList(RAM_SECTION_ID, tuple(blocks)) in events
    assert ("page", "vga.vram", PAGE_SIZE, vram) in events
    assert events[-2:] == [DeviceState(device), VmDescription(vmdesc_json(devices))]


def test_failover_stream_rejects_pages_outside_the_blocks() -> None:
    with pytest.raises(MalformedStreamError):
        list(
            failover_stream(
                machine_type="pc",
                ram_section_id=1,
                blocks=[RamBlock("pc.ram", PAGE_SIZE, 0)],
                device_state=b"",
                vmdesc=vmdesc_json([]),
                pages=[FailoverPage("pc.ram", PAGE_SIZE, bytes(PAGE_SIZE))],
            )
        )


@pytest.mark.parametrize(
    ("flag", "error"),
    [
        (RamFlag.XBZRLE, UnsupportedStreamError),
        (RamFlag.COMPRESS_PAGE, UnsupportedStreamError),
        (RamFlag.HOOK, UnsupportedStreamError),
        (RamFlag.FULL, MalformedStreamError),
        (RamFlag.ZERO | RamFlag.PAGE, MalformedStreamError),
        (RamFlag.MEM_SIZE, MalformedStreamError),
        (0x200, MalformedStreamError),
        (0, MalformedStreamError),
    ],
)
def test_bad_ram_flags_raise_typed_errors(flag: int, error: type[StreamError]) -> None:
    parser = StreamParser()
    parser.feed(ram_start([PC_RAM]))
    with pytest.raises(error):
        parser.feed(part(record(flag) + bytes(PAGE_SIZE + 1)))
    assert parser.state is ParserState.FAILED
    with pytest.raises(MalformedStreamError):
        parser.feed(b"")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (record(RamFlag.PAGE, 0, "nope") + bytes(PAGE_SIZE), "unknown block"),
        (record(RamFlag.ZERO, 4 * PAGE_SIZE) + b"\x00", "beyond block"),
        (record(RamFlag.ZERO | RamFlag.CONTINUE, 0, None) + b"\x00", "without a previous block"),
        (record(RamFlag.ZERO, 0, "pc.r\x00m") + b"\x00", "control characters"),
        (record(RamFlag.EOS, PAGE_SIZE, None), "invalid RAM record"),
    ],
)
def test_invalid_page_records_are_rejected(payload: bytes, message: str) -> None:
    parser = StreamParser()
    parser.feed(ram_start([PC_RAM]))
    with pytest.raises(MalformedStreamError, match=message):
        parser.feed(part(payload))


def test_block_list_lengths_must_add_up_to_the_total() -> None:
    bad = (
        struct.pack(">Q", PAGE_SIZE | RamFlag.MEM_SIZE)
        + b"\x06pc.ram"
        + struct.pack(">Q", 2 * PAGE_SIZE)
    )
    start = (
        encode_header() + encode_configuration("pc") + encode_section_header(SectionType.START, 1)
    )
    with pytest.raises(MalformedStreamError, match="length"):
        StreamParser().feed(start + bad)


def test_section_start_must_begin_with_the_block_list() -> None:
    start = encode_header() + encode_section_header(SectionType.START, 1)
    with pytest.raises(MalformedStreamError, match="block list"):
        StreamParser().feed(start + record(RamFlag.ZERO) + b"\x00")


def test_footer_must_match_the_section() -> None:
    data = ram_start([PC_RAM]) + encode_section_header(SectionType.PART, RAM_SECTION_ID)
    with pytest.raises(MalformedStreamError, match="footer"):
        StreamParser().feed(data + encode_eos() + encode_section_footer(RAM_SECTION_ID + 1))


def test_bad_magic_version_and_unsupported_commands() -> None:
    with pytest.raises(MalformedStreamError, match="magic"):
        StreamParser().feed(b"QEVN\x00\x00\x00\x03")
    with pytest.raises(UnsupportedStreamError, match="version"):
        StreamParser().feed(b"QEVM\x00\x00\x00\x02")
    with pytest.raises(UnsupportedStreamError, match="POSTCOPY_ADVISE"):
        StreamParser().feed(encode_header() + encode_command(VmCommand.POSTCOPY_ADVISE, bytes(16)))
    with pytest.raises(MalformedStreamError, match="length"):
        StreamParser().feed(encode_header() + encode_command(VmCommand.PING, b"\x00"))


def test_non_ram_iterable_section_is_unsupported() -> None:
    header = bytes([SectionType.START]) + struct.pack(">I", 1) + b"\x0eblock-dirty-bm" + bytes(8)
    with pytest.raises(UnsupportedStreamError, match="only RAM"):
        StreamParser().feed(encode_header() + header)


def test_colo_messages_must_follow_the_checkpoint_order() -> None:
    initial, _, _ = build(simple_model())
    parser = StreamParser()
    parser.feed(initial)
    with pytest.raises(
        MalformedStreamError, match="VMSTATE_SEND while expecting CHECKPOINT_REQUEST"
    ):
        parser.feed(encode_colo_message(ColoMessage.VMSTATE_SEND))
    parser = StreamParser()
    parser.feed(initial)
    with pytest.raises(MalformedStreamError, match="unknown COLO message"):
        parser.feed(struct.pack(">I", 7))


def test_oversized_device_state_is_rejected_from_its_size_field() -> None:
    initial, _, _ = build(simple_model())
    parser = StreamParser(max_device_state=1 << 20)
    parser.feed(initial)
    prefix = (
        encode_colo_message(ColoMessage.CHECKPOINT_REQUEST)
        + encode_colo_message(ColoMessage.VMSTATE_SEND)
        + bytes([SectionType.EOF])
    )
    with pytest.raises(MalformedStreamError, match="size"):
        parser.feed(prefix + encode_colo_message(ColoMessage.VMSTATE_SIZE, (1 << 20) + 1))
    assert parser.state is ParserState.FAILED


def test_device_state_buffer_must_end_with_eof() -> None:
    initial, _, _ = build(simple_model())
    parser = StreamParser()
    parser.feed(initial)
    prefix = (
        encode_colo_message(ColoMessage.CHECKPOINT_REQUEST)
        + encode_colo_message(ColoMessage.VMSTATE_SEND)
        + bytes([SectionType.EOF])
    )
    with pytest.raises(MalformedStreamError, match="FULL sections"):
        parser.feed(prefix + encode_colo_message(ColoMessage.VMSTATE_SIZE, 3) + b"\x04\x00\x01")


def test_initial_device_state_without_trailer_waits_then_hits_the_limit() -> None:
    initial, _, _ = build(simple_model())
    cut = initial.rindex(b"\x00\x06")
    parser = StreamParser(max_device_state=64, max_vmdesc=64)
    events = parser.feed(initial[:cut])
    assert not any(isinstance(e, DeviceState) for e in events)
    assert parser.state is ParserState.DEVICE_STATE
    with pytest.raises(IncompleteStreamError):
        parser.finish()
    with pytest.raises(MalformedStreamError, match="trailer"):
        parser.feed(b"\x01" * 200)


def test_truncated_checkpoint_reports_incomplete() -> None:
    initial, colo, _ = build(simple_model())
    parser = StreamParser()
    parser.feed(initial)
    parser.finish()  # between checkpoints: the primary may stop here
    parser.feed(colo[:-1])
    with pytest.raises(IncompleteStreamError):
        parser.finish()


def test_stream_errors_are_kemari_errors() -> None:
    assert issubclass(MalformedStreamError, KemariError)
    assert issubclass(UnsupportedStreamError, StreamError)
    assert issubclass(IncompleteStreamError, StreamError)


# -- property tests ---------------------------------------------------------------------

_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _chunked(parser: StreamParser, data: bytes, cuts: list[int]) -> list[object]:
    events: list[object] = []
    last = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        events += normalize(parser.feed(data[last:cut]))
        last = cut
    return events


@_settings
@given(
    models(),
    st.lists(st.integers(0, 1 << 20), max_size=12),
    st.lists(st.integers(0, 1 << 20), max_size=12),
)
def test_any_chunking_yields_the_model_events(
    model: Model, cuts1: list[int], cuts2: list[int]
) -> None:
    initial, colo, expected = build(model)
    parser = StreamParser()
    # The primary is silent after the vmdesc until the receiver answers, so the initial
    # migration and the COLO phase arrive as separate bursts.
    events = _chunked(parser, initial, cuts1) + _chunked(parser, colo, cuts2)
    parser.finish()
    assert events == normalize(expected)


@_settings
@given(models(), st.data())
def test_truncated_input_yields_a_prefix_and_reports_incomplete(
    model: Model, data: st.DataObject
) -> None:
    initial, colo, expected = build(model)
    whole = initial + colo
    cut = data.draw(st.integers(0, len(whole) - 1))
    parser = StreamParser()
    events = feed_two_phase(parser, whole[:cut], len(initial))
    assert events == normalize(expected)[: len(events)]
    if cut < len(initial):
        assert len(events) < len(expected)
        with pytest.raises(IncompleteStreamError):
            parser.finish()


@_settings
@given(models(max_pages=2), st.data())
def test_bit_flips_raise_stream_errors_or_parse(model: Model, data: st.DataObject) -> None:
    initial, colo, _ = build(model)
    whole = bytearray(initial + colo)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(whole) - 1))
        whole[at] ^= 1 << data.draw(st.integers(0, 7))
    parser = StreamParser()
    try:
        feed_two_phase(parser, bytes(whole), len(initial))
        parser.finish()
    except StreamError:
        pass


@_settings
@given(models(max_pages=1), st.data())
def test_oversized_length_fields_raise_stream_errors(model: Model, data: st.DataObject) -> None:
    initial, colo, _ = build(model)
    whole = bytearray(initial + colo)
    at = data.draw(st.integers(0, len(whole) - 8))
    whole[at : at + 8] = data.draw(
        st.sampled_from([b"\xff" * 8, b"\x7f" + b"\xff" * 7, b"\x00\x00\xff\xff" * 2])
    )
    parser = StreamParser()
    try:
        feed_two_phase(parser, bytes(whole), len(initial))
        parser.finish()
    except StreamError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_target_accepts_arbitrary_bytes(blob: bytes) -> None:
    TestOneInput(blob)


@_settings
@given(models(max_pages=2), st.binary(max_size=4))
def test_fuzz_target_on_mutated_valid_streams(model: Model, noise: bytes) -> None:
    initial, colo, _ = build(model)
    TestOneInput(bytes([len(initial) % 256]) + initial + noise + colo)


@_settings
@given(models(), st.data())
def test_failover_stream_round_trip_property(model: Model, data: st.DataObject) -> None:
    blocks = [RamBlock(b.name, b.used_length, b.gpa or 0) for b in model.blocks]
    shared = data.draw(st.sets(st.sampled_from([b.name for b in blocks])))
    pages = {
        (rec.block, rec.offset): rec.data
        for records in model.iterations
        for rec in records
        if rec.data is not None and rec.block not in shared
    }
    device = device_bytes(model.devices)
    chunks = failover_stream(
        machine_type=model.machine_type,
        ram_section_id=RAM_SECTION_ID,
        blocks=blocks,
        device_state=device,
        vmdesc=vmdesc_json(model.devices),
        pages=[FailoverPage(b, o, p) for (b, o), p in pages.items()],
    )
    parser = StreamParser()
    events: list[object] = []
    for chunk in chunks:
        events += normalize(parser.feed(chunk))
    parser.finish()
    assert events[2] == RamBlockList(RAM_SECTION_ID, tuple(blocks))
    assert [e for e in events if isinstance(e, tuple)] == [
        ("page", b, o, p) for (b, o), p in pages.items()
    ]
    assert events[-2:] == [DeviceState(device), VmDescription(vmdesc_json(model.devices))]


# -- regressions found by fuzzing (inputs in tests/fuzz/corpus/stream/) ------------------

CORPUS = Path(__file__).parent / "fuzz" / "corpus" / "stream"


def _feed_in_steps(parser: StreamParser, data: bytes, step: int) -> None:
    for start in range(0, len(data), step):
        parser.feed(data[start : start + step])


def test_issue10_repro_is_a_stream_error_at_every_chunk_size() -> None:
    """Issue 10 item 10: ``00 06`` within the last 5 bytes made the vmdesc trailer search
    unpack a length past the end of the buffer (``struct.error``)."""
    body = (CORPUS / "issue10-vmdesc-trailer-head-in-last-5-bytes").read_bytes()[1:]
    for step in range(1, len(body) + 1):
        parser = StreamParser(max_device_state=1 << 16, max_vmdesc=1 << 12)
        _feed_in_steps(parser, body, step)
        assert parser.state is ParserState.DEVICE_STATE
        with pytest.raises(IncompleteStreamError):
            parser.finish()


@pytest.mark.parametrize("gap", [b"", b"x", b"xy", b"xyz"])
def test_trailer_head_near_the_end_waits_for_more_data(gap: bytes) -> None:
    """``00 06`` starting 3 to 6 bytes before the end: too close for a trailer head
    (``00 06`` + be32) except the last case, whose length does not fit; the parser waits."""
    model = simple_model()
    initial, _, _ = build(model)
    cut = initial.rindex(b"\x00\x06")
    device = initial[:cut]
    vmdesc = vmdesc_json(model.devices)
    parser = StreamParser()
    parser.feed(device)
    assert parser.feed(b"\x00\x06" + gap + b"}") == []
    assert parser.state is ParserState.DEVICE_STATE
    # The junk became part of the device blob: the shape check refuses a trailer after it,
    # so the stream can only end by hitting the limit or being cut; it must not crash.
    assert parser.feed(b"\x00\x06" + len(vmdesc).to_bytes(4, "big") + vmdesc) == []
    with pytest.raises(IncompleteStreamError):
        parser.finish()


@pytest.mark.parametrize("tail", [b"\x00\x06}", b"\x00\x06x}", b"\x00\x06xy}"])
def test_device_blob_shorter_than_a_trailer_head_waits(tail: bytes) -> None:
    """The whole device blob is shorter than a trailer head (no device sections)."""
    model = simple_model()
    model.devices = []
    initial, _, _ = build(model)
    parser = StreamParser()
    parser.feed(initial[: initial.rindex(b"\x00\x06")])
    assert parser.feed(tail) == []
    assert parser.state is ParserState.DEVICE_STATE


def test_deeply_nested_vmdesc_json_is_not_a_trailer() -> None:
    """json.loads raises RecursionError (not ValueError) past ~1000 levels; that JSON is
    not a vmdesc, so the parser waits and then reports the limit, never RecursionError."""
    model = simple_model()
    initial, _, _ = build(model)
    cut = initial.rindex(b"\x00\x06")
    deep = b'{"page_size":4096,"x":' + b"[" * 3000 + b"]" * 3000 + b"}"
    parser = StreamParser(max_vmdesc=1 << 13)
    events = parser.feed(initial[:cut] + b"\x00\x06" + len(deep).to_bytes(4, "big") + deep)
    assert not any(isinstance(e, DeviceState | VmDescription) for e in events)
    assert parser.state is ParserState.DEVICE_STATE
    with pytest.raises(IncompleteStreamError):
        parser.finish()


@pytest.mark.parametrize(
    "build_item",
    [
        lambda: encode_configuration("pc-é"),
        lambda: encode_configuration("pc", ("x-ïgnore-shared",)),
        lambda: encode_block_list([RamBlock("pc.rám", PAGE_SIZE)], ignore_shared=False),
    ],
)
def test_writer_refuses_non_ascii_names_with_a_stream_error(build_item) -> None:
    """The failover stream's machine type and block names come from the replica (UTF-8 on
    the ft-transaction wire); QEMU's names are ASCII, and others are a StreamError."""
    with pytest.raises(MalformedStreamError):
        build_item()
