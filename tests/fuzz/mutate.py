"""Mutations that keep an input's framing valid, for the fuzz targets of tests/fuzz/.

A random byte change in a valid input mostly dies at the first check it meets: a frame
checksum on the ft-transaction wire, a length field in the migration stream.  Here an
input is kept as *pieces*: plain bytes, or a body with the length field (and, on the
wire, the checksums) that covers it.  Mutations change a piece's body or the order of
the pieces; encoding then **repairs** every length, checksum and sequence number the
mutation did not explicitly target, so the mutated bytes reach the decoders and state
machines behind those checks.  A few operations deliberately skip a repair, so the
checks themselves stay covered.  Raw inputs (corpus files, libFuzzer's mutations) are
repaired from context (:func:`repair_stream_body`, :func:`split_frames`).

Inputs are in the fuzz targets' format: a selector byte (chunk size) and the body.
This module imports neither hypothesis nor the test models, so the atheris runs stay
quick to start; tests/fuzz/structured.py builds seeds and hypothesis strategies on it.
"""

from __future__ import annotations

import dataclasses
import random
import re
import struct
import zlib
from collections.abc import Callable, Sequence

from kemari.stream.format import ColoMessage
from kemari.transaction.wire import HEADER, HEADER_SIZE, MAGIC, WIRE_VERSION, FrameType

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_HEADER_CRC_SPAN = HEADER_SIZE - 4

# Values that sit on the edges of the checks: sizes, limits, markers of both formats.
INTERESTING = [
    b"\x00",
    b"\x01",
    b"\x7f",
    b"\x80",
    b"\xff",
    b"\x00\x00",
    b"\xff\xff",
    b"\x00\x06",  # EOF + VMDESCRIPTION: the trailer search
    b"}",
    b"\x7e",  # section footer
    b"\x04",
    b"\x05",
    b"\x00\x00\x10\x00",  # 4096
    b"\x00\x00\x10\x01",
    b"\x7f\xff\xff\xff",
    b"\x80\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x00\x00\x00\x00\x00",
    b"\x00\x00\x00\x00\x00\x00\x10\x00",
    b"\x7f\xff\xff\xff\xff\xff\xff\xff",
    b"\xff\xff\xff\xff\xff\xff\xff\xff",
    MAGIC,
]


@dataclasses.dataclass
class Piece:
    """Bytes of a seed; with ``length`` set, ``head`` + length field + ``body``, where the
    field is recomputed from the body unless ``keep_length`` (then ``declared`` stays)."""

    body: bytes
    head: bytes = b""
    length: struct.Struct | None = None
    declared: int = 0
    keep_length: bool = False
    initial: bool = True  # part of the initial migration (not the COLO phase)
    bulk: bool = False  # opaque contents (a page): byte mutations go elsewhere

    def encode(self) -> bytes:
        if self.length is None:
            return self.head + self.body
        value = self.declared if self.keep_length else len(self.body)
        value &= (1 << (8 * self.length.size)) - 1
        return self.head + self.length.pack(value) + self.body


def prefixed(head: bytes, length: struct.Struct, body: bytes, initial: bool = True) -> Piece:
    return Piece(body, head, length, len(body), initial=initial)


@dataclasses.dataclass
class WireFrame:
    """One ft-transaction frame as fields; ``encode`` recomputes what was not pinned."""

    frame_type: int
    flags: int
    epoch: int
    sequence: int
    body: bytes
    length: int | None = None  # pinned payload length (None: the body's)
    keep_payload_crc: bool = False
    keep_header_crc: bool = False
    keep_sequence: bool = False
    payload_crc: int = 0
    header_crc: int = 0

    def encode(self) -> bytes:
        length = len(self.body) if self.length is None else self.length
        crc = self.payload_crc if self.keep_payload_crc else zlib.crc32(self.body)
        head = HEADER.pack(
            MAGIC,
            WIRE_VERSION,
            self.frame_type & 0xFF,
            self.flags & 0xFFFF,
            self.epoch & (1 << 64) - 1,
            self.sequence & (1 << 64) - 1,
            length & 0xFFFFFFFF,
            crc,
            0,
        )[:_HEADER_CRC_SPAN]
        header_crc = self.header_crc if self.keep_header_crc else zlib.crc32(head)
        return head + _BE32.pack(header_crc) + self.body


def split_frames(data: bytes) -> tuple[list[WireFrame], bytes]:
    """Frames whose header parses (checksums not checked), and the bytes after them."""
    frames = []
    pos = 0
    while pos + HEADER_SIZE <= len(data):
        magic, _, ftype, flags, epoch, seq, length, crc, hcrc = HEADER.unpack_from(data, pos)
        end = pos + HEADER_SIZE + length
        if magic != MAGIC or end > len(data):
            break
        body = data[pos + HEADER_SIZE : end]
        frames.append(WireFrame(ftype, flags, epoch, seq, body, payload_crc=crc, header_crc=hcrc))
        pos = end
    return frames, data[pos:]


def _mutate_body(body: bytes, op: tuple[object, ...], donor: bytes) -> bytes:
    name, _, pos = op[0], op[1], op[2]
    assert isinstance(pos, int)
    if pos < 0:  # from the end of the body
        pos = max(len(body) + pos, 0)
    if name == "insert":
        at = pos % (len(body) + 1)
        extra = op[3]
        assert isinstance(extra, bytes)
        return body[:at] + extra + body[at:]
    if name == "splice":
        start, size = op[3], op[4]
        assert isinstance(start, int) and isinstance(size, int)
        at = pos % (len(body) + 1)
        chunk = donor[start % (len(donor) + 1) :][:size]
        return body[:at] + chunk + body[at:]
    if not body:
        return body
    at = pos % len(body)
    if name == "flip":
        bit = op[3]
        assert isinstance(bit, int)
        return body[:at] + bytes([body[at] ^ (1 << bit)]) + body[at + 1 :]
    if name == "set":
        value = op[3]
        assert isinstance(value, int)
        return body[:at] + bytes([value]) + body[at + 1 :]
    if name == "interesting":
        choice = op[3]
        assert isinstance(choice, int)
        value = INTERESTING[choice]
        return body[:at] + value + body[at + len(value) :]
    if name == "delete":
        count = op[3]
        assert isinstance(count, int)
        return body[:at] + body[at + count :]
    raise AssertionError(f"unknown body operation {name}")


def _list_op(items: list[object], op: tuple[object, ...]) -> bool:
    """Apply a piece-level operation in place; False when ``op`` is not one."""
    name = op[0]
    if name not in ("drop", "duplicate", "swap") or not items:
        return name in ("drop", "duplicate", "swap")
    first = op[1]
    assert isinstance(first, int)
    at = first % len(items)
    if name == "drop":
        del items[at]
    elif name == "duplicate":
        items.insert(at, dataclasses.replace(items[at]))  # type: ignore[call-overload]
    else:
        other = op[2]
        assert isinstance(other, int)
        to = other % len(items)
        items[at], items[to] = items[to], items[at]
    return True


def mutate_stream(pieces: list[Piece], ops: Sequence[tuple[object, ...]]) -> tuple[bytes, int]:
    """The stream after ``ops``, with every length not pinned by ``keep_length``
    recomputed (``truncate`` cuts the result), and where its initial migration ends."""
    work = [dataclasses.replace(p) for p in pieces]
    cut: int | None = None
    for op in ops:
        if _list_op(work, op) or not work:  # type: ignore[arg-type]
            continue
        first = op[1]
        assert isinstance(first, int)
        piece = work[first % len(work)]
        if op[0] == "keep_length":
            piece.keep_length = True
        elif op[0] == "truncate":
            cut = first
        else:
            # Half the time a length-prefixed body (the vmdesc, a device buffer, the
            # machine type): the framing rules live at their edges.
            framed = [p for p in work if p.length is not None]
            targets = framed if framed and first % 2 else [p for p in work if not p.bulk]
            piece = (targets or work)[(first // 2) % len(targets or work)]
            donor = work[(first + 1) % len(work)].body
            piece.body = _mutate_body(piece.body, op, donor)
    encoded = [p.encode() for p in work]
    last_initial = max((i for i, p in enumerate(work) if p.initial), default=-1)
    boundary = sum(len(e) for e in encoded[: last_initial + 1])
    data = b"".join(encoded)
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    return data, min(boundary, len(data))


def mutate_wire(frames: list[WireFrame], tail: bytes, ops: Sequence[tuple[object, ...]]) -> bytes:
    """The frames after ``ops`` with sequences renumbered from 0, lengths and checksums
    recomputed, except where an operation pinned them."""
    work = [dataclasses.replace(f) for f in frames]
    cut: int | None = None
    for op in ops:
        if _list_op(work, op) or not work:  # type: ignore[arg-type]
            continue
        first = op[1]
        assert isinstance(first, int)
        frame = work[first % len(work)]
        name = op[0]
        value = op[2] if len(op) > 2 else 0
        assert isinstance(value, int)
        if name == "type":
            frame.frame_type = value
        elif name == "flags":
            frame.flags = value
        elif name == "epoch":
            frame.epoch = frame.epoch + value if -2 <= value <= 2 else value
        elif name == "sequence":
            frame.sequence, frame.keep_sequence = frame.sequence + value, True
        elif name == "length":
            frame.length = max(len(frame.body) + value, 0)
        elif name == "keep_payload_crc":
            frame.keep_payload_crc = True
        elif name == "keep_header_crc":
            frame.keep_header_crc = True
        elif name == "truncate":
            cut = first
        else:
            donor = work[(first + 1) % len(work)].body
            frame.body = _mutate_body(frame.body, op, donor)
    for number, frame in enumerate(work):
        if not frame.keep_sequence:
            frame.sequence = number
    data = b"".join(f.encode() for f in work) + tail
    return data[: cut % (len(data) + 1)] if cut is not None else data


AT_BRACE = 0x40  # selector bit: a chunk also ends after every "}" (fuzz_stream.chunks)


# -- repair of raw inputs (corpus files, atheris mutations) -----------------------------
# Without the pieces, the length fields are found by their context.

_VMDESC_AT = re.compile(rb'\x00\x06(?=....\{"page_size")', re.DOTALL)
_CHECKPOINT_START = ColoMessage.CHECKPOINT_REQUEST.to_bytes(4, "big") + (
    ColoMessage.VMSTATE_SEND.to_bytes(4, "big")
)
_VMSTATE_SIZE_AT = re.compile(rb"(?<=\x00)\x00\x00\x00\x04(?=........)", re.DOTALL)


def repair_stream_body(body: bytes) -> tuple[bytes, int | None]:
    """``body`` with the vmdesc length and the VMSTATE_SIZE values set to reach the next
    checkpoint (or the end), and where the initial migration ends (None: no trailer)."""
    trailers = list(_VMDESC_AT.finditer(body))
    if not trailers:
        return body, None
    out = bytearray(body)
    json_start = trailers[-1].start() + 6
    end = out.find(_CHECKPOINT_START, json_start)
    end = len(out) if end < 0 else end
    out[json_start - 4 : json_start] = _BE32.pack(end - json_start)
    pos = end
    while match := _VMSTATE_SIZE_AT.search(bytes(out), pos):
        start = match.start() + 12
        stop = out.find(_CHECKPOINT_START, start)
        stop = len(out) if stop < 0 else stop
        out[start - 8 : start] = _BE64.pack(max(stop - start, 0))
        pos = max(stop, start)  # the next checkpoint: nothing inside the buffer is touched
    return bytes(out), end


def random_wire_op(rng: random.Random) -> tuple[object, ...]:
    """One operation of :data:`WIRE_OPS`, drawn without hypothesis (atheris mutator)."""
    n = rng.randrange(1 << 16)
    choice = rng.randrange(10)
    if choice == 0:
        return ("type", n, rng.choice([*FrameType, 0x00, 0xFF]))
    if choice == 1:
        return ("flags", n, rng.randrange(1 << 16))
    if choice == 2:
        return ("epoch", n, rng.randint(-2, 2))
    if choice == 3:
        return ("sequence", n, rng.randint(-2, 2))
    if choice == 4:
        return ("length", n, rng.randint(-8, 8))
    if choice == 5:
        return (rng.choice(["keep_payload_crc", "keep_header_crc"]), n)
    if choice == 6:
        return (rng.choice(["drop", "duplicate"]), n)
    if choice == 7:
        return ("swap", n, rng.randrange(1 << 16))
    return ("interesting", n, rng.randrange(1 << 16), rng.randrange(len(INTERESTING)))


Mutate = Callable[[bytes, int], bytes]


def atheris_stream_mutator(data: bytes, max_size: int, seed: int, mutate: Mutate) -> bytes:
    """libFuzzer's mutation of the whole input, then the stream's lengths repaired and
    (mostly) the selector bit that ends a chunk with the initial vmdesc."""
    rng = random.Random(seed)
    mutated = mutate(data, max_size)
    if not mutated or rng.random() < 0.1:
        return mutated
    body, _ = repair_stream_body(mutated[1:])
    selector = mutated[0] | AT_BRACE if rng.random() < 0.75 else mutated[0]
    return (bytes([selector]) + body)[:max_size]


def atheris_wire_mutator(data: bytes, max_size: int, seed: int, mutate: Mutate) -> bytes:
    """libFuzzer's mutation of one frame's payload (or a frame-level operation), then
    sequences, lengths and checksums repaired; sometimes a plain mutation of it all."""
    rng = random.Random(seed)
    frames, tail = split_frames(data[1:]) if data else ([], b"")
    if not frames or rng.random() < 0.15:
        return mutate(data, max_size)
    ops: list[tuple[object, ...]] = []
    if rng.random() < 0.3:
        ops.append(random_wire_op(rng))
    else:
        frame = rng.choice(frames)
        frame.body = mutate(frame.body, max(2 * len(frame.body), 64))
    selector = data[0] if rng.random() < 0.9 else rng.randrange(256)
    return (bytes([selector]) + mutate_wire(frames, tail, ops))[:max_size]
