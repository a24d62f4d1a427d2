"""The fuzz targets in the test command (issue 10 item 10), for a bounded number of inputs.

Each target (tests/fuzz/fuzz_stream.py, fuzz_transaction.py) is run on inputs built by
a hypothesis-driven, structure-aware mutator (tests/fuzz/structured.py): seeds are the
committed corpus (tests/fuzz/corpus/) and valid inputs generated from the test models;
after each mutation the lengths, checksums and sequence numbers are repaired, so the
mutations reach the decoders and state machines behind them.  When atheris is
installed, each target also runs under it (coverage-guided) for a fixed number of runs.

The only acceptable outcomes are events or the module's KemariError subclass (the
targets catch exactly that one).  Anything else fails the test; the input is saved
under $KEMARI_FUZZ_CRASHES (default /tmp/kemari-fuzz-crashes) and the message says how
to replay it.  Budget: $KEMARI_FUZZ_EXAMPLES inputs per hypothesis test (default 500)
and $KEMARI_FUZZ_RUNS atheris runs per target (default 6000, seed $KEMARI_TEST_SEED).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from fuzz import fuzz_stream, fuzz_transaction
from fuzz.mutate import (
    AT_BRACE,
    INTERESTING,
    Piece,
    atheris_stream_mutator,
    atheris_wire_mutator,
    mutate_stream,
    mutate_wire,
    repair_stream_body,
    split_frames,
)
from fuzz.structured import (
    CORPUS,
    STREAM_OPS,
    WIRE_OPS,
    corpus,
    frames_of,
    sessions,
    stream_pieces,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stream_model import Device, Model, Record, build, models, normalize

from kemari.errors import TransactionError
from kemari.stream import ParserState, StreamParser, VmDescription
from kemari.stream import RamBlock as StreamRamBlock
from kemari.stream.format import PAGE_SIZE
from kemari.transaction.session import TransactionTracker
from kemari.transaction.wire import Begin, FrameDecoder, RamBlock, RamBlocks, RamPages, page_indices

EXAMPLES = int(os.environ.get("KEMARI_FUZZ_EXAMPLES", "500"))
ATHERIS_RUNS = int(os.environ.get("KEMARI_FUZZ_RUNS", "6000"))
CRASHES = Path(os.environ.get("KEMARI_FUZZ_CRASHES", "/tmp/kemari-fuzz-crashes"))
# libFuzzer's seed for the atheris runs: KEMARI_TEST_SEED, or a new one each run.
SEED = int(os.environ.get("KEMARI_TEST_SEED") or random.randrange(1, 1 << 31))
TARGETS: dict[str, Callable[[bytes], None]] = {
    "stream": fuzz_stream.TestOneInput,
    "transaction": fuzz_transaction.TestOneInput,
}

_fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def run_target(name: str, data: bytes) -> None:
    """Run one input; anything the target lets out fails, with the input saved."""
    try:
        TARGETS[name](data)
    except Exception as exc:
        CRASHES.mkdir(parents=True, exist_ok=True)
        path = CRASHES / f"{name}-{hashlib.sha1(data).hexdigest()}"
        path.write_bytes(data)
        raise AssertionError(
            f"fuzz_{name}.TestOneInput raised {type(exc).__name__}: {exc}\n"
            f"input ({len(data)} bytes) saved to {path}; replay it with\n"
            f"  .venv/bin/python tests/fuzz/fuzz_{name}.py {path}\n"
            f"input: {data.hex()}"
        ) from exc


@st.composite
def stream_inputs(draw: st.DrawFn) -> bytes:
    files = corpus("stream")
    selector: int | None = None
    if files and draw(st.integers(0, 4)) == 0:
        raw = draw(st.sampled_from(files))
        pieces, selector = [Piece(raw[1:])], raw[0]
    else:
        pieces, _ = stream_pieces(draw(models(max_pages=2)))
    data, _ = mutate_stream(pieces, draw(st.lists(STREAM_OPS, min_size=1, max_size=6)))
    if len(pieces) == 1 and draw(st.integers(0, 3)) > 0:
        data, _ = repair_stream_body(data)  # a corpus file: its lengths found by context
    if selector is None or draw(st.booleans()):
        # Mostly cut after "}" too, so a chunk ends with the initial vmdesc and the COLO
        # phase is reached; sometimes plain chunks.
        brace = AT_BRACE if draw(st.integers(0, 3)) > 0 else 0
        selector = draw(st.integers(0, 63)) | brace
    return bytes([selector]) + data


@st.composite
def wire_inputs(draw: st.DrawFn) -> bytes:
    files = corpus("transaction")
    if files and draw(st.integers(0, 4)) == 0:
        raw = draw(st.sampled_from(files))
        frames, tail = split_frames(raw[1:])
        selector = raw[0]
    else:
        frames, tail = frames_of(draw(sessions())), b""
        selector = draw(st.integers(0, 255))
    ops = draw(st.lists(WIRE_OPS, min_size=1, max_size=6))
    return bytes([selector]) + mutate_wire(frames, tail, ops)


@_fuzz
@given(stream_inputs())
def test_fuzz_stream_parser(data: bytes) -> None:
    run_target("stream", data)


@_fuzz
@given(wire_inputs())
def test_fuzz_transaction_decoder(data: bytes) -> None:
    run_target("transaction", data)


@pytest.mark.parametrize(
    "path",
    sorted(p for p in CORPUS.glob("*/*") if p.is_file()),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_corpus_inputs_end_cleanly(path: Path) -> None:
    run_target(path.parent.name, path.read_bytes())


# -- the mutator itself: without repair, mutations would stop at the first check -------


@settings(max_examples=30, deadline=None)
@given(models(max_pages=2))
def test_unmutated_stream_seeds_are_the_models_streams(model) -> None:
    pieces, _ = stream_pieces(model)
    data, boundary = mutate_stream(pieces, [])
    initial, colo, events = build(model)
    assert data == initial + colo
    assert boundary == len(initial)
    parser = StreamParser()
    seen = []
    for chunk in fuzz_stream.chunks(bytes([AT_BRACE | 63]) + data):
        seen += normalize(parser.feed(chunk))
    parser.finish()
    assert seen == normalize(events)


@settings(max_examples=30, deadline=None)
@given(sessions())
def test_unmutated_wire_seeds_decode_and_apply(payloads) -> None:
    frames = frames_of(payloads)
    data = mutate_wire(frames, b"", [])
    decoder = FrameDecoder()
    tracker = TransactionTracker()
    for frame in decoder.feed(data):
        tracker.apply(frame.payload)
    assert decoder.at_frame_boundary
    assert len(frames) == len(payloads)


def test_repaired_stream_length_reaches_the_vmdesc_check() -> None:
    """A longer vmdesc with its length repaired is judged on its JSON, not its length."""
    model = Model(
        "pc-i440fx-7.2",
        False,
        [StreamRamBlock("pc.ram", 4 * PAGE_SIZE)],
        [[Record("pc.ram", 0, None)]],
        [Device(3, "timer", 0, b"state")],
    )
    pieces, count = stream_pieces(model)
    trailer = count - 1
    assert pieces[trailer].head == b"\x00\x06"
    vmdesc_op = 2 * 1 + 1  # odd: a length-prefixed body; the 2nd is the vmdesc
    grown, boundary = mutate_stream(pieces, [("insert", vmdesc_op, 1, b" ")])
    parser = StreamParser()
    events = parser.feed(grown[:boundary])
    [vmdesc] = [e for e in events if isinstance(e, VmDescription)]
    assert vmdesc.json.startswith(b'{ "page_size"')


def test_repaired_frames_reach_the_state_machine() -> None:
    """A page index changed inside RAM_PAGES passes both checksums and the decoder, and
    is refused by the transaction rules; unrepaired, the checksum refuses it."""
    blocks = (RamBlock("pc.ram", 2 * PAGE_SIZE),)
    frames = frames_of(
        [Begin(1), RamBlocks(1, blocks), RamPages(1, 0, page_indices([]), page_indices([1]), b"")]
    )
    index_at = 10  # block u16, data count u32, zero count u32, then the zero page index
    op = ("interesting", 2, index_at, INTERESTING.index(b"\x7f\xff\xff\xff"))
    tracker = TransactionTracker()
    with pytest.raises(TransactionError, match="lies outside block"):
        for frame in FrameDecoder().feed(mutate_wire(frames, b"", [op])):
            tracker.apply(frame.payload)
    with pytest.raises(TransactionError, match="payload checksum mismatch"):
        FrameDecoder().feed(mutate_wire(frames, b"", [op, ("keep_payload_crc", 2)]))
    original = mutate_wire(frames, b"", [])
    assert zlib.crc32(original) != zlib.crc32(mutate_wire(frames, b"", [op]))


def test_raw_stream_repair_sets_the_vmdesc_length() -> None:
    """Repair from context (corpus files, libFuzzer's mutations): a valid stream is left
    as it is, and a vmdesc grown by libFuzzer gets the length that reaches its end."""
    seed = (CORPUS / "stream" / "seed-colo-two-checkpoints-ignore-shared").read_bytes()
    body = seed[1:]
    assert repair_stream_body(body)[0] == body
    at = body.index(b'{"page_size"')
    comma = body.index(b",", at) + 1
    grown, boundary = repair_stream_body(body[:comma] + b" " + body[comma:])
    assert boundary is not None and grown[at - 4 : at] == (boundary - at).to_bytes(4, "big")
    parser = StreamParser()
    for chunk in fuzz_stream.chunks(seed[:1] + grown):
        parser.feed(chunk)
    parser.finish()
    assert parser.state is ParserState.COLO_IDLE


def _flip_last(data: bytes, max_size: int) -> bytes:
    """Stands in for atheris.Mutate: one change, at the end of what it is given."""
    return data[:-1] + bytes([data[-1] ^ 0x55]) if data else b"\x00"


def test_atheris_wire_mutator_output_passes_the_checksums() -> None:
    seed = (CORPUS / "transaction" / "seed-two-commits-an-abort").read_bytes()
    checksum_errors = 0
    for rng_seed in range(200):
        data = atheris_wire_mutator(seed, 1 << 20, rng_seed, _flip_last)
        run_target("transaction", data)
        try:
            for frame in FrameDecoder().feed(data[1:]):
                del frame
        except TransactionError as exc:
            checksum_errors += "checksum" in str(exc)
    assert checksum_errors < 200 * 0.3  # only the plain-mutation path (15 %) and kept CRCs


def test_atheris_stream_mutator_output_keeps_the_vmdesc_length() -> None:
    seed = (CORPUS / "stream" / "seed-no-devices-q35").read_bytes()
    for rng_seed in range(50):
        data = atheris_stream_mutator(seed, 1 << 20, rng_seed, lambda d, _: d + b"}")
        run_target("stream", data)
        body = data[1:]
        at = body.rindex(b'{"page_size"')
        end = body.find(b"\x00\x00\x00\x01\x00\x00\x00\x03", at)
        assert int.from_bytes(body[at - 4 : at], "big") == (end if end >= 0 else len(body)) - at


# -- atheris (coverage-guided), where it is installed -----------------------------------


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_atheris_run(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is not installed (the hypothesis run stands)")
    seeds = tmp_path / "corpus"
    shutil.copytree(CORPUS / name, seeds)
    script = Path(__file__).parent / "fuzz" / f"fuzz_{name}.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            f"-runs={ATHERIS_RUNS}",
            "-max_total_time=30",
            f"-seed={SEED}",
            f"-artifact_prefix={tmp_path}/",
            str(seeds),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*"))
    for crash in crashes:
        CRASHES.mkdir(parents=True, exist_ok=True)
        shutil.copy(crash, CRASHES / f"{name}-{crash.name}")
    log = "\n".join(
        line
        for line in (result.stdout + result.stderr).splitlines()
        if not line.startswith(("INFO: Instrumenting", "#"))
    )
    assert result.returncode == 0 and not crashes, (
        f"atheris (-seed={SEED}) found a failing input for fuzz_{name}; saved to "
        f"{[str(CRASHES / f'{name}-{c.name}') for c in crashes]}\n{log[-4000:]}"
    )


@pytest.mark.parametrize(
    "path", sorted(CORPUS.glob("*/seed-*")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_corpus_seeds_are_valid_inputs(path: Path) -> None:
    """The seed files are complete, valid inputs: mutations start from the deep end."""
    data = path.read_bytes()
    step = data[0] % 64 + 1
    body = data[1:]
    if path.parent.name == "stream":
        parser = StreamParser()
        for chunk in fuzz_stream.chunks(data):
            parser.feed(chunk)
        parser.finish()
        assert parser.state is ParserState.COLO_IDLE
    else:
        decoder = FrameDecoder()
        tracker = TransactionTracker()
        for start in range(0, len(body), step):
            for frame in decoder.feed(body[start : start + step]):
                tracker.apply(frame.payload)
        assert decoder.at_frame_boundary
        assert tracker.last_committed is not None
