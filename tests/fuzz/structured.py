"""Seeds and hypothesis strategies for the fuzz tests (tests/test_fuzz.py).

Seeds are valid inputs from the test models (tests/stream_model.py for the migration
stream, a strategy of primary sessions for the ft-transaction wire) kept as pieces, and
the committed corpus (tests/fuzz/corpus/); the operations drawn here are applied, and
the framing repaired, by tests/fuzz/mutate.py.  Hypothesis shrinks a failure to its
smallest operation list.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

from fuzz.mutate import INTERESTING, Piece, WireFrame, prefixed, split_frames
from hypothesis import strategies as st
from stream_model import Model, build, device_bytes, section_bytes, vmdesc_json

from kemari.outputs import Output, OutputKind
from kemari.stream.format import PAGE_SIZE, ColoMessage
from kemari.transaction.wire import (
    Abort,
    Begin,
    Commit,
    DeviceState,
    FrameEncoder,
    FrameType,
    Goodbye,
    Heartbeat,
    Outputs,
    Payload,
    RamBlock,
    RamBlocks,
    RamPages,
    VmDescription,
    page_indices,
)

CORPUS = Path(__file__).parent / "corpus"
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


# -- seeds ------------------------------------------------------------------------------


def stream_pieces(model: Model) -> tuple[list[Piece], int]:
    """The model's stream as pieces, and how many of them form the initial migration.

    Length-prefixed: the machine type of the configuration (the file header goes with
    it, so mutations do not waste themselves on the magic), the vmdesc JSON of the
    trailer, and each checkpoint's device-state buffer (VMSTATE_SIZE).  Page contents
    are pieces of their own marked ``bulk``: the parser never looks inside them, so
    byte mutations go to the records around them instead.
    """
    initial, colo, events = build(model)
    pages = [e[3] for e in events if isinstance(e, tuple) and e[0] == "page"]
    device = device_bytes(model.devices)
    vmdesc = vmdesc_json(model.devices)
    machine = model.machine_type.encode()
    prefix_end = len(initial) - len(device) - 6 - len(vmdesc)
    configuration_end = 8 + 5 + len(machine)
    pieces = [
        prefixed(initial[:9], _BE32, machine),
        *_split_pages(initial[configuration_end:prefix_end], pages, initial=True),
        Piece(device),
        prefixed(b"\x00\x06", _BE32, vmdesc),
    ]
    initial_count = len(pieces)
    pos = 0
    for records, devices in model.checkpoints:
        plain = 8 + (len(section_bytes(records)) if records else 0) + 1
        state = device_bytes(devices) + b"\x00"
        pieces += _split_pages(colo[pos : pos + plain], pages, initial=False)
        pieces.append(prefixed(_BE32.pack(ColoMessage.VMSTATE_SIZE), _BE64, state, False))
        pos += plain + 4 + 8 + len(state)
    assert pos == len(colo), "stream_pieces is out of step with stream_model.build"
    assert not pages, "stream_pieces did not find every page"
    return pieces, initial_count


def _split_pages(data: bytes, pages: list[bytes], *, initial: bool) -> list[Piece]:
    """``data`` cut around the page contents it holds (taken, in order, from ``pages``)."""
    out = []
    pos = 0
    while pages:
        at = data.find(pages[0], pos)
        if at < 0:
            break
        out += [Piece(data[pos:at], initial=initial), Piece(pages.pop(0), initial=initial)]
        out[-1].bulk = True
        pos = at + PAGE_SIZE
    out.append(Piece(data[pos:], initial=initial))
    return out


def frames_of(payloads: Sequence[Payload]) -> list[WireFrame]:
    encoder = FrameEncoder()
    wire = b"".join(bytes(part) for payload in payloads for part in encoder.encode(payload))
    return split_frames(wire)[0]


@st.composite
def sessions(draw: st.DrawFn) -> list[Payload]:
    """A primary's valid frames: 1-3 transactions (the first with RAM_BLOCKS and the
    vmdesc) that commit with exact summaries or abort, heartbeats between them."""
    sizes = draw(st.lists(st.integers(1, 8), min_size=1, max_size=3))
    blocks = tuple(RamBlock(f"b{i}", n * PAGE_SIZE, i << 32) for i, n in enumerate(sizes))
    frames: list[Payload] = []
    epoch = draw(st.integers(0, 3))
    for index in range(draw(st.integers(1, 3))):
        epoch += draw(st.integers(1, 2))
        frames.append(Begin(epoch))
        if index == 0:
            frames.append(RamBlocks(epoch, blocks, "pc-i440fx-7.2", 2))
        data_count = zero_count = device_bytes_sent = outputs = output_bytes = 0
        for _ in range(draw(st.integers(0, 3))):
            block = draw(st.integers(0, len(blocks) - 1))
            limit = blocks[block].size // PAGE_SIZE - 1
            data = draw(st.lists(st.integers(0, limit), max_size=2))
            zero = draw(st.lists(st.integers(0, limit), max_size=2, min_size=0 if data else 1))
            fill = draw(st.binary(min_size=1, max_size=4))
            frames.append(
                RamPages(
                    epoch,
                    block,
                    page_indices(data),
                    page_indices(zero),
                    (fill * PAGE_SIZE)[:PAGE_SIZE] * len(data),
                )
            )
            data_count += len(data)
            zero_count += len(zero)
        for _ in range(draw(st.integers(0, 2))):
            state = draw(st.binary(min_size=1, max_size=24))
            frames.append(DeviceState(epoch, state))
            device_bytes_sent += len(state)
        if index == 0 and draw(st.booleans()):
            frames.append(VmDescription(epoch, b'{"page_size":4096,"devices":[]}'))
        if draw(st.booleans()):
            out = draw(
                st.lists(
                    st.builds(
                        Output,
                        st.just(OutputKind.DISK),
                        st.integers(0, 3),
                        st.binary(min_size=1, max_size=16),
                        st.integers(0, 1 << 20),
                    )
                    | st.builds(
                        Output,
                        st.just(OutputKind.NET),
                        st.integers(0, 3),
                        st.binary(min_size=1, max_size=16),
                    ),
                    min_size=1,
                    max_size=3,
                )
            )
            frames.append(Outputs(epoch, tuple(out)))
            outputs += len(out)
            output_bytes += sum(len(o.data) for o in out)
        if draw(st.booleans()):
            frames.append(Heartbeat(draw(st.integers(0, 1 << 40))))
        if index > 0 and draw(st.integers(0, 3)) == 0:
            frames.append(Abort(epoch, "fuzz"))
        else:
            frames.append(
                Commit(epoch, data_count, zero_count, device_bytes_sent, outputs, output_bytes)
            )
    if draw(st.booleans()):
        frames.append(Goodbye("bye"))
    return frames


def corpus(target: str) -> list[bytes]:
    """The committed corpus of ``target`` ("stream" or "transaction"), sorted by name."""
    return [path.read_bytes() for path in sorted((CORPUS / target).iterdir()) if path.is_file()]


# -- mutations --------------------------------------------------------------------------
# An operation is a tuple (name, numbers...); numbers are reduced modulo what they index,
# so any operation applies to any seed.  Hypothesis draws and shrinks them.

_index = st.integers(0, 1 << 16)
# Positions in a body: negative ones count from its end, where the framing lives
# (footers, the end of the vmdesc JSON, a buffer's EOF byte).
_pos = st.integers(-8, -1) | st.integers(0, 1 << 16)
BODY_OPS = st.one_of(
    st.tuples(st.just("flip"), _index, _pos, st.integers(0, 7)),
    st.tuples(st.just("set"), _index, _pos, st.integers(0, 255)),
    st.tuples(st.just("interesting"), _index, _pos, st.integers(0, len(INTERESTING) - 1)),
    st.tuples(st.just("insert"), _index, _pos, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), _index, _pos, st.integers(1, 16)),
    st.tuples(st.just("splice"), _index, _pos, _index, st.integers(1, 64)),
    st.tuples(st.just("drop"), _index),
    st.tuples(st.just("duplicate"), _index),
    st.tuples(st.just("swap"), _index, _index),
    st.tuples(st.just("truncate"), _index),
)
STREAM_OPS = BODY_OPS | st.tuples(st.just("keep_length"), _index)
WIRE_OPS = BODY_OPS | st.one_of(
    st.tuples(st.just("type"), _index, st.sampled_from([*FrameType, 0x00, 0x7F, 0xFF])),
    st.tuples(st.just("flags"), _index, st.integers(0, 0xFFFF)),
    st.tuples(st.just("epoch"), _index, st.integers(-2, 2) | st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("sequence"), _index, st.integers(-2, 2)),
    st.tuples(st.just("length"), _index, st.integers(-8, 8)),
    st.tuples(st.just("keep_payload_crc"), _index),
    st.tuples(st.just("keep_header_crc"), _index),
)
