"""Fuzz target for the stream parser (atheris-compatible ``TestOneInput``).

Run with atheris:  python tests/fuzz/fuzz_stream.py [libFuzzer flags] [corpus_dir]
(coverage-guided, with a mutator that repairs the stream's length fields, see
tests/fuzz/structured.py).  Without atheris, the same command replays the input files
it is given.  In the test suite it is driven by hypothesis (tests/test_fuzz.py).
The only acceptable outcomes for any input are events or a StreamError.
"""

import sys
from collections.abc import Iterator
from pathlib import Path

from kemari.errors import StreamError
from kemari.stream import StreamParser


def chunks(data: bytes) -> Iterator[bytes]:
    """The body of an input (after its selector byte) cut as the selector says.

    The low 6 bits give the chunk size (1-64).  With bit 6 (0x40) set, a chunk also ends
    after every ``}``: the primary sends nothing after the initial vmdesc JSON until it
    is answered, so a real receive ends there, and only then can the parser find the
    vmdesc trailer and go on into the COLO phase.
    """
    if not data:
        return
    step = data[0] % 64 + 1
    at_brace = bool(data[0] & 0x40)
    body = data[1:]
    start = 0
    while start < len(body):
        end = min(start + step, len(body))
        if at_brace and (brace := body.find(b"}", start, end)) >= 0:
            end = brace + 1
        yield body[start:end]
        start = end


def TestOneInput(data: bytes) -> None:
    """Entry point under the name atheris expects.

    The first byte picks how the rest is cut into chunks (see :func:`chunks`); the
    chunks are fed in order, then the end of the input is declared.
    """
    parser = StreamParser(max_device_state=1 << 16, max_vmdesc=1 << 12)
    try:
        for chunk in chunks(data):
            parser.feed(chunk)
        parser.finish()
    except StreamError:
        return


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the fuzz package
    try:
        import atheris  # type: ignore[import-not-found]  # noqa: PLC0415, F401 - optional engine
    except ImportError:
        for name in sys.argv[1:]:
            if not name.startswith("-"):
                TestOneInput(Path(name).read_bytes())  # a failure shows its traceback
        return
    from fuzz.atheris_run import run  # noqa: PLC0415

    run("fuzz_stream", "atheris_stream_mutator")


if __name__ == "__main__":
    main()
