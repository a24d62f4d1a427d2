"""Parse rate of kemari.stream.StreamParser on a synthetic x-colo stream. Prints numbers.

Builds an initial migration of ``--mib`` MiB (a fraction ``--zero`` of zero pages, the
rest data pages) and a checkpoint of ``--dirty`` data pages, then feeds each in
``--chunk``-byte pieces and reports MB/s and pages/s; for the checkpoint also the time
to cut each piece's page runs into RAM_PAGES frames, as the primary does per stream
read (the median of ``--rounds``, in µs per dirty page).  Asserts nothing.

    .venv/bin/python benchmarks/stream_parse.py [--mib 256] [--dirty 1000] [--chunk 212992]
"""

from __future__ import annotations

import argparse
import statistics
import time

from kemari.checkpoint.sender import page_frames
from kemari.stream import ColoMessage, RamBlock, RamPageRun, StreamParser
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

SECTION = 2
DEVICE = (
    bytes([SectionType.FULL])
    + SECTION.to_bytes(4, "big")
    + b"\x05timer"
    + bytes(8)
    + bytes(4000)
    + encode_section_footer(SECTION)
)
VMDESC = b'{"page_size":4096,"devices":[{"name":"timer","instance_id":0}]}'


def pages_section(kind: SectionType, count: int, zero_every: int) -> bytes:
    encoder = PageEncoder()
    out = bytearray(encode_section_header(kind, SECTION))
    page = bytes(range(256)) * (PAGE_SIZE // 256)
    for index in range(count):
        if zero_every and index % zero_every == 0:
            out += encoder.zero("pc.ram", index * PAGE_SIZE)
        else:
            for part in encoder.page("pc.ram", index * PAGE_SIZE, page):
                out += part
    return bytes(out + encode_eos() + encode_section_footer(SECTION))


def feed(parser: StreamParser, data: bytes, chunk: int) -> tuple[float, int]:
    pages = 0
    start = time.perf_counter()
    for offset in range(0, len(data), chunk):
        pages += len(parser.feed(data[offset : offset + chunk]))
    return time.perf_counter() - start, pages


def feed_and_frame(
    parser: StreamParser, data: bytes, chunk: int, pages: int
) -> tuple[float, float]:
    """Seconds to parse ``data`` piece by piece, and to parse and cut frames per piece."""
    parse = frames = 0.0
    for offset in range(0, len(data), chunk):
        start = time.perf_counter()
        events = parser.feed(data[offset : offset + chunk])
        parsed = time.perf_counter()
        runs = [event for event in events if isinstance(event, RamPageRun)]
        for _frame in page_frames(1, runs, {"pc.ram": 0}, [pages]):
            pass
        parse += parsed - start
        frames += time.perf_counter() - start
    return parse, frames


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--mib", type=int, default=256)
    args.add_argument("--dirty", type=int, default=1000)
    args.add_argument("--chunk", type=int, default=212992, help="bytes per read (a unix socket's)")
    args.add_argument("--rounds", type=int, default=50)
    args.add_argument("--zero", type=float, default=0.5, help="fraction of zero pages")
    opts = args.parse_args()
    count = opts.mib * (1 << 20) // PAGE_SIZE
    zero_every = round(1 / opts.zero) if opts.zero > 0 else 0
    initial = b"".join(
        [
            encode_header(),
            encode_configuration("pc-i440fx-7.2"),
            encode_command(VmCommand.ENABLE_COLO),
            encode_section_header(SectionType.START, SECTION),
            encode_block_list([RamBlock("pc.ram", count * PAGE_SIZE)], ignore_shared=False),
            encode_eos(),
            encode_section_footer(SECTION),
            pages_section(SectionType.END, count, zero_every),
            DEVICE,
            encode_vmdesc_trailer(VMDESC),
        ]
    )
    checkpoint = b"".join(
        [
            encode_colo_message(ColoMessage.CHECKPOINT_REQUEST),
            encode_colo_message(ColoMessage.VMSTATE_SEND),
            pages_section(SectionType.END, opts.dirty, 0),
            bytes([SectionType.EOF]),
            encode_colo_device_state(DEVICE),
        ]
    )
    parser = StreamParser()
    seconds, events = feed(parser, initial, opts.chunk)
    print(
        f"initial sync {opts.mib} MiB ({count} pages, zero every {zero_every or 'never'}), "
        f"chunk {opts.chunk}: {seconds * 1000:.1f} ms, {len(initial) / seconds / 1e6:.0f} MB/s, "
        f"{count / seconds / 1e3:.0f} kpages/s, {events} events"
    )
    parses, totals = [], []
    for _ in range(opts.rounds):
        parse, total = feed_and_frame(parser, checkpoint, opts.chunk, count)
        parses.append(parse)
        totals.append(total)
    per = statistics.median(parses)
    print(
        f"checkpoint of {opts.dirty} dirty pages ({len(checkpoint)} bytes): "
        f"{per * 1000:.2f} ms per checkpoint, {len(checkpoint) / per / 1e6:.0f} MB/s, "
        f"parse {per / opts.dirty * 1e6:.2f} µs/page, "
        f"parse + frames {statistics.median(totals) / opts.dirty * 1e6:.2f} µs/page"
    )


if __name__ == "__main__":
    main()
