"""Fuzz target for the stream parser (atheris-compatible ``TestOneInput``).

Run with atheris:  python tests/fuzz/fuzz_stream.py [corpus_dir]
In the test suite it is driven by hypothesis (tests/test_stream_codec.py).
The only acceptable outcomes for any input are events or a StreamError.
"""

import sys

from kemari.errors import StreamError
from kemari.stream import RamPage, StreamParser


def feed_two_phase(parser: StreamParser, data: bytes, split: int) -> list[object]:
    """Feed ``data`` as two bursts, like a primary that pauses after the initial vmdesc;
    return the events with page views converted to bytes."""
    events: list[object] = []
    for part in (data[:split], data[split:]):
        for event in parser.feed(part):
            if isinstance(event, RamPage):
                events.append(("page", event.block, event.offset, bytes(event.data)))
            else:
                events.append(event)
    return events


def TestOneInput(data: bytes) -> None:
    """Entry point under the name atheris expects.

    The first byte picks a chunk size; the rest is fed in chunks of that size.
    """
    if not data:
        return
    step = data[0] % 64 + 1
    parser = StreamParser(max_device_state=1 << 16, max_vmdesc=1 << 12)
    body = data[1:]
    try:
        for start in range(0, len(body), step):
            parser.feed(body[start : start + step])
        parser.finish()
    except StreamError:
        return


def main() -> None:
    import atheris  # type: ignore[import-not-found]  # noqa: PLC0415 - optional fuzz engine

    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
