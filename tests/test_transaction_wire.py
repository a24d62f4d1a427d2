"""Unit and property tests of the ft-transaction wire format (kemari.transaction.wire)."""

from __future__ import annotations

import itertools
import struct
import zlib

import pytest
from fuzz.fuzz_transaction import TestOneInput
from hypothesis import given, settings
from hypothesis import strategies as st

from kemari.errors import TransactionError
from kemari.stream.format import PAGE_SIZE
from kemari.transaction.wire import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    Abort,
    Begin,
    Commit,
    CommitAck,
    DeviceState,
    FrameDecoder,
    FrameEncoder,
    FrameType,
    Goodbye,
    Heartbeat,
    HeartbeatAck,
    Hello,
    HelloAck,
    Payload,
    RamBlock,
    RamBlocks,
    RamPages,
    Refuse,
    RefuseReason,
    Role,
    VmDescription,
    encode_frame,
    page_indices,
)

epochs = st.integers(min_value=0, max_value=(1 << 64) - 1)
texts = st.text(max_size=40)
names = st.text(min_size=1, max_size=30).filter(lambda s: len(s.encode()) <= 255)
# Machine types and RAM block names: printable ASCII, as in QEMU's stream.
wire_names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=30)
capability_names = st.from_regex(r"[a-z0-9][a-z0-9-]{0,15}", fullmatch=True)


@st.composite
def hellos(draw: st.DrawFn) -> Hello:
    cls = draw(st.sampled_from([Hello, HelloAck]))
    return cls(
        draw(st.sampled_from(Role)),
        draw(names),
        draw(st.binary(min_size=32, max_size=32)),
        tuple(draw(st.lists(capability_names, max_size=5, unique=True))),
        draw(st.integers(min_value=0, max_value=0xFFFF)),
    )


@st.composite
def ram_pages(draw: st.DrawFn) -> RamPages:
    data_pages = draw(st.lists(st.integers(0, (1 << 32) - 1), max_size=4))
    zero_pages = draw(st.lists(st.integers(0, (1 << 32) - 1), max_size=4))
    if not data_pages and not zero_pages:
        zero_pages = [0]
    fill = draw(st.binary(min_size=1, max_size=8))
    data = (fill * (PAGE_SIZE * len(data_pages)))[: PAGE_SIZE * len(data_pages)]
    return RamPages(
        draw(epochs),
        draw(st.integers(0, 1023)),
        page_indices(data_pages),
        page_indices(zero_pages),
        data,
    )


@st.composite
def ram_blocks(draw: st.DrawFn) -> RamBlocks:
    block_names = draw(st.lists(wire_names, min_size=1, max_size=4, unique=True))
    sizes = draw(st.lists(st.integers(1, 1 << 20), min_size=len(block_names)))
    gpas = draw(st.lists(st.integers(0, (1 << 64) - 1), min_size=len(block_names)))
    blocks = tuple(
        RamBlock(n, s * PAGE_SIZE, g) for n, s, g in zip(block_names, sizes, gpas, strict=False)
    )
    machine = draw(wire_names)
    return RamBlocks(draw(epochs), blocks, machine, draw(st.integers(0, (1 << 32) - 1)))


payloads: st.SearchStrategy[Payload] = st.one_of(
    hellos(),
    st.builds(Refuse, st.sampled_from(RefuseReason), texts),
    st.builds(Goodbye, texts),
    st.builds(Heartbeat, epochs),
    st.builds(HeartbeatAck, epochs),
    st.builds(Begin, epochs),
    ram_blocks(),
    ram_pages(),
    st.builds(DeviceState, epochs, st.binary(min_size=1, max_size=300)),
    st.builds(VmDescription, epochs, st.binary(min_size=1, max_size=300)),
    st.builds(Commit, epochs, epochs, epochs, epochs),
    st.builds(CommitAck, epochs),
    st.builds(Abort, epochs, texts),
)


def _wire(frames: list[Payload], *, payload_crc: bool = True) -> bytes:
    encoder = FrameEncoder()
    encoder.payload_crc = payload_crc
    return b"".join(bytes(part) for p in frames for part in encoder.encode(p))


def _decoder(*, payload_crc: bool = True) -> FrameDecoder:
    decoder = FrameDecoder()
    decoder.payload_crc = payload_crc
    return decoder


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def test_header_is_big_endian_with_magic_version_and_checksums():
    header = bytes(encode_frame(Begin(7), sequence=3)[0])
    assert len(header) == HEADER_SIZE == 36
    magic, version, ftype, flags, epoch, sequence, length, crc, hcrc = HEADER.unpack(header)
    assert (magic, version, ftype, flags) == (MAGIC, 1, FrameType.BEGIN, 0)
    assert (epoch, sequence, length, crc) == (7, 3, 0, zlib.crc32(b""))
    assert hcrc == zlib.crc32(header[:32])


def test_ram_pages_layout_is_one_index_table_then_page_data():
    data = b"\xaa" * PAGE_SIZE + b"\xbb" * PAGE_SIZE
    parts = encode_frame(RamPages(1, 2, page_indices([5, 9]), page_indices([3]), data), 0)
    payload = b"".join(bytes(p) for p in parts[1:])
    assert payload[:22] == struct.pack(">HIIIII", 2, 2, 1, 5, 9, 3)
    assert payload[22:] == data


@given(payload=payloads)
def test_every_frame_type_round_trips(payload):
    [frame] = FrameDecoder().feed(_wire([payload]))
    assert frame.sequence == 0
    assert frame.payload == payload
    assert type(frame.payload) is type(payload)


@given(frames=st.lists(payloads, max_size=8), cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_round_trip_under_arbitrary_chunking(frames, cuts):
    wire = _wire(frames)
    decoder = FrameDecoder()
    decoded = [f for chunk in _chunks(wire, cuts) for f in decoder.feed(chunk)]
    assert [f.payload for f in decoded] == frames
    assert [f.sequence for f in decoded] == list(range(len(frames)))
    assert decoder.at_frame_boundary


@given(frames=st.lists(payloads, min_size=1, max_size=4), data=st.data())
def test_truncated_input_never_yields_the_cut_frame(frames, data):
    wire = _wire(frames)
    cut = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
    decoder = FrameDecoder()
    decoded = decoder.feed(wire[:cut])
    # Only the frames that lie wholly before the cut come out; the rest is pending.
    complete = len(_wire(frames[: len(decoded)]))
    assert complete <= cut
    assert len(decoded) < len(frames)
    assert [f.payload for f in decoded] == frames[: len(decoded)]
    assert not decoder.at_frame_boundary or complete == cut


@settings(max_examples=300)
@given(payload=payloads, data=st.data())
def test_any_single_bit_flip_is_rejected(payload, data):
    wire = bytearray(_wire([payload]))
    bit = data.draw(st.integers(min_value=0, max_value=len(wire) * 8 - 1))
    wire[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(TransactionError):
        FrameDecoder().feed(bytes(wire))


# --- sessions without payload checksum (NO_PAYLOAD_CRC, TLS only) ----------------------


def test_without_payload_crc_the_field_is_zero_and_the_header_still_checksummed():
    data = b"\x5a" * PAGE_SIZE
    pages = RamPages(3, 0, page_indices([1]), page_indices([]), data)
    header = bytes(encode_frame(pages, sequence=4, payload_crc=False)[0])
    *_, length, crc, header_crc = HEADER.unpack(header)
    assert (length, crc) == (14 + PAGE_SIZE, 0)
    assert header_crc == zlib.crc32(header[:32])


@given(frames=st.lists(payloads, max_size=8), cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_round_trip_without_payload_crc_under_arbitrary_chunking(frames, cuts):
    wire = _wire(frames, payload_crc=False)
    decoder = _decoder(payload_crc=False)
    decoded = [f for chunk in _chunks(wire, cuts) for f in decoder.feed(chunk)]
    assert [f.payload for f in decoded] == frames
    assert decoder.at_frame_boundary


@settings(max_examples=300)
@given(payload=payloads, data=st.data())
def test_without_payload_crc_any_header_bit_flip_is_still_rejected(payload, data):
    wire = bytearray(_wire([payload], payload_crc=False))
    bit = data.draw(st.integers(min_value=0, max_value=HEADER_SIZE * 8 - 1))
    wire[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(TransactionError):
        _decoder(payload_crc=False).feed(bytes(wire))


def test_a_checking_decoder_refuses_frames_sent_without_payload_crc():
    """Both ends must agree: a frame without checksum meets a checking end as corrupt."""
    wire = _wire([DeviceState(1, b"state")], payload_crc=False)
    with pytest.raises(TransactionError, match="DEVICE_STATE payload checksum mismatch"):
        FrameDecoder().feed(wire)


def test_a_decoder_without_payload_crc_ignores_the_field_but_not_the_layout():
    wire = bytearray(_wire([DeviceState(1, b"state"), Commit(1, 0, 0, 5)]))
    wire[31] ^= 0xFF  # the first frame's payload crc: not checked (its header crc is)
    wire[32:36] = zlib.crc32(wire[:32]).to_bytes(4, "big")
    assert [f.payload for f in _decoder(payload_crc=False).feed(bytes(wire))] == [
        DeviceState(1, b"state"),
        Commit(1, 0, 0, 5),
    ]
    truncated = bytearray(_wire([Commit(1, 0, 0, 5)], payload_crc=False))
    truncated[27] -= 1  # one byte shorter, header crc repaired: the payload layout is wrong
    truncated[32:36] = zlib.crc32(truncated[:32]).to_bytes(4, "big")
    with pytest.raises(TransactionError, match="COMMIT payload is truncated"):
        _decoder(payload_crc=False).feed(bytes(truncated[:-1]))


def test_wrong_magic_is_refused_from_the_first_byte():
    decoder = FrameDecoder()
    with pytest.raises(TransactionError, match="not speaking Kemari"):
        decoder.feed(b"H")
    with pytest.raises(TransactionError, match="already failed"):
        decoder.feed(_wire([Begin(0)]))


def _forged_header(length: int, sequence: int = 0, ftype: int = FrameType.DEVICE_STATE) -> bytes:
    head = HEADER.pack(MAGIC, 1, ftype, 0, 0, sequence, length, 0, 0)[:32]
    return head + zlib.crc32(head).to_bytes(4, "big")


def test_oversized_length_is_rejected_before_any_payload():
    decoder = FrameDecoder()
    with pytest.raises(TransactionError, match="exceeds the limit"):
        decoder.feed(_forged_header(MAX_PAYLOAD + 1))
    small = FrameDecoder(max_payload=1024)
    with pytest.raises(TransactionError, match="exceeds the limit 1024"):
        small.feed(_forged_header(1025))


def test_header_checksum_protects_the_length():
    header = bytearray(_forged_header(100))
    header[27] ^= 0x01  # a bit of the length field
    with pytest.raises(TransactionError, match="header checksum"):
        FrameDecoder().feed(bytes(header))


def test_unknown_type_flags_and_version_are_rejected():
    for field, value, message in ((4, 2, "wire version 2"), (5, 0x7F, "unknown frame type")):
        head = bytearray(_forged_header(0, ftype=FrameType.BEGIN)[:32])
        head[field] = value
        with pytest.raises(TransactionError, match=message):
            FrameDecoder().feed(bytes(head) + zlib.crc32(head).to_bytes(4, "big"))
    head = bytearray(_forged_header(0, ftype=FrameType.BEGIN)[:32])
    head[6] = 0x80
    with pytest.raises(TransactionError, match="unknown flags"):
        FrameDecoder().feed(bytes(head) + zlib.crc32(head).to_bytes(4, "big"))


def test_session_frame_with_an_epoch_is_rejected():
    head = HEADER.pack(MAGIC, 1, FrameType.GOODBYE, 0, 5, 0, 2, zlib.crc32(b"\0\0"), 0)[:32]
    frame = head + zlib.crc32(head).to_bytes(4, "big") + b"\0\0"
    with pytest.raises(TransactionError, match="epoch 5, expected 0"):
        FrameDecoder().feed(frame)


def test_sequence_gaps_and_replays_are_rejected():
    first = b"".join(bytes(p) for p in encode_frame(Begin(1), 0))
    again = FrameDecoder()
    again.feed(first)
    with pytest.raises(TransactionError, match="sequence 0 replayed: expected 1"):
        again.feed(first)
    gap = FrameDecoder()
    with pytest.raises(TransactionError, match="sequence 2 skipped ahead: expected 0"):
        gap.feed(b"".join(bytes(p) for p in encode_frame(Begin(1), 2)))


def test_payload_layout_errors_are_typed():
    # RAM_PAGES whose counts disagree with its size, then trailing bytes after a COMMIT.
    bad_pages = struct.pack(">HII", 0, 1, 0) + b"\0\0\0\0" + b"x" * 100
    bad_commit = struct.pack(">QQQQQ", 1, 2, 3, 0, 0) + b"!"
    for ftype, payload, message in (
        (FrameType.RAM_PAGES, bad_pages, "counts"),
        (FrameType.COMMIT, bad_commit, "trailing"),
        (FrameType.REFUSE, b"\0\x63\0\0", "unknown reason"),
        (
            FrameType.RAM_BLOCKS,
            b"\x02pc" + struct.pack(">QH", 2, 1) + b"\x01A" + struct.pack(">QQ", 100, 0),
            "multiple of 4096",
        ),
    ):
        head = HEADER.pack(MAGIC, 1, ftype, 0, 0, 0, len(payload), zlib.crc32(payload), 0)[:32]
        frame = head + zlib.crc32(head).to_bytes(4, "big") + payload
        with pytest.raises(TransactionError, match=message):
            FrameDecoder().feed(frame)


def test_encoder_refuses_invalid_payloads():
    with pytest.raises(TransactionError, match="no page"):
        RamPages(0, 0, page_indices([]), page_indices([]), b"")
    with pytest.raises(TransactionError, match="data is 10 bytes for 1 pages"):
        RamPages(0, 0, page_indices([1]), page_indices([]), b"x" * 10)
    with pytest.raises(TransactionError, match="32 bits"):
        page_indices([1 << 32])
    with pytest.raises(TransactionError, match="out of range"):
        encode_frame(Commit(1, -1, 0, 0), 0)
    with pytest.raises(TransactionError, match="config digest"):
        encode_frame(Hello(Role.PRIMARY, "vm", b"short"), 0)
    with pytest.raises(TransactionError, match="capability"):
        encode_frame(Hello(Role.PRIMARY, "vm", bytes(32), ("Bad Name",)), 0)
    with pytest.raises(TransactionError, match="twice"):
        RamBlocks(0, (RamBlock("a", PAGE_SIZE), RamBlock("a", PAGE_SIZE)))


def test_whole_payload_in_one_chunk_is_not_copied():
    data = bytes(range(256)) * 16
    wire = _wire([RamPages(3, 0, page_indices([4]), page_indices([]), data)])
    [frame] = FrameDecoder().feed(wire)
    assert isinstance(frame.payload, RamPages)
    assert isinstance(frame.payload.data, memoryview)
    assert frame.payload.data.obj is wire
    assert frame.payload.page(0) == data


@given(data=st.binary(max_size=2000))
def test_fuzz_target_accepts_any_input(data):
    TestOneInput(data)


@settings(deadline=None)
@given(
    step=st.integers(0, 255),
    pages=st.lists(st.tuples(st.integers(0, 15), st.booleans()), max_size=6),
    noise=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=3),
)
def test_fuzz_target_on_mutated_valid_streams(step, pages, noise):
    """Valid transactions reach the state machine; mutated ones must fail cleanly."""
    blocks = (RamBlock("pc.ram", 16 * PAGE_SIZE),)
    stream: list[Payload] = [Begin(0), RamBlocks(0, blocks)]
    for page, zero in pages:
        data_pages, zero_pages = ((), (page,)) if zero else ((page,), ())
        stream.append(
            RamPages(
                0,
                0,
                page_indices(data_pages),
                page_indices(zero_pages),
                b"p" * len(data_pages) * PAGE_SIZE,
            )
        )
    data_count = sum(not zero for _, zero in pages)
    stream += [Commit(0, data_count, len(pages) - data_count, 0), Begin(1), Abort(1, "x")]
    wire = bytearray(_wire(stream))
    TestOneInput(bytes([step]) + bytes(wire))
    for position, value in noise:
        wire[position % len(wire)] = value
    TestOneInput(bytes([step]) + bytes(wire))


def test_header_error_in_a_split_header_is_a_transaction_error():
    header = bytearray(_forged_header(100))
    header[35] ^= 0xFF  # header checksum
    decoder = FrameDecoder()
    decoder.feed(bytes(header[:20]))
    with pytest.raises(TransactionError, match="header checksum"):
        decoder.feed(bytes(header[20:]))


# A fuzz finding: BEGIN(1) then RAM_BLOCKS(1, (RamBlock("pc.ram", 4096),), "pc-\u00e9", 2),
# valid frames whose machine type is not ASCII.  StreamParser refuses such names in
# QEMU's stream; the wire decoder accepted any UTF-8 and handed it to the replica.
NON_ASCII_MACHINE_TYPE = bytes.fromhex(
    "4b4d52490110000000000000000000010000000000000000000000000000000078da543c"
    "4b4d524901110000000000000000000100000000000000010000002748dad3f322d35d64"
    "0570632dc3a9000000000000000200010670632e72616d00000000000010000000000000000000"
)


def test_ram_blocks_names_must_be_printable_ascii_at_decode() -> None:
    decoder = FrameDecoder()
    with pytest.raises(TransactionError, match="machine type 'pc-\u00e9' is not printable ASCII"):
        decoder.feed(NON_ASCII_MACHINE_TYPE)
    # The same frame with an ASCII machine type decodes (only the name was wrong).
    good = RamBlocks(1, (RamBlock("pc.ram", PAGE_SIZE),), "pc-i440fx-7.2", 2)
    assert FrameDecoder().feed(b"".join(encode_frame(good, 0)))[0].payload == good
    for machine, block in (("pc", "pc.r\u00e4m"), ("pc", "pc.ram\n"), ("pc\x7f", "pc.ram")):
        with pytest.raises(TransactionError, match="not printable ASCII"):
            RamBlocks(1, (RamBlock(block, PAGE_SIZE),), machine, 0)
