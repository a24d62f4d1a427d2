"""Does zstd pay for a real guest's dirty pages?  Bytes on the wire and CPU per checkpoint.

Boots Kemari's Linux guest (``kemari image build``; the ``ticks`` workload, or
``--workload``) under the patched QEMU, protects it with a sink that keeps a copy of
every checkpoint's dirty pages (periodic checkpoints every ``--epoch-ms`` for
``--seconds``), then replays those pages through the sender's frame building and the
wire encoder/decoder, plain and zstd-compressed, and prints per checkpoint:

  pages      data pages (4 KiB each) per checkpoint, p50
  wire/dirty bytes of page data on the wire per dirty byte (1.00 = uncompressed)
  primary    CPU ms to build and encode the frames (frames, page copy or compression,
             CRC), p50; what the guest's pause pays for the pages before TLS
  standby    CPU ms to decode them (CRC, decompression), p50
  net at     the link speed below which compression shortens the checkpoint (the time
             saved on the wire equals the extra CPU), or "never"

Needs Kemari's patched QEMU (``kemari qemu build``) and the guest image.
Usage: python benchmarks/page_compression.py [--seconds 5] [--epoch-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from array import array
from pathlib import Path

from kemari.checkpoint import CheckpointSource, PageBatch, SourceState
from kemari.checkpoint.sender import page_frames
from kemari.image.builder import default_image
from kemari.qemu.build import patched_qemu
from kemari.qemu.cmdline import MachineSpec, MemoryFile
from kemari.qemu.machine import QemuMachine
from kemari.stream import Configuration, RamBlockList, RamPageRun
from kemari.testbed.wait import async_wait_for
from kemari.transaction.wire import FrameDecoder, FrameEncoder, RamPages, ZstdRamPages

MIB = 1 << 20


class KeepingSink:
    """Keeps a copy of each checkpoint's data pages; commits at once."""

    def __init__(self) -> None:
        self.blocks: dict[str, int] = {}
        self.block_pages: list[int] = []
        self.checkpoints: list[list[RamPageRun]] = []

    async def begin_sync(self, configuration: Configuration, blocks: RamBlockList) -> None:
        self.blocks = {block.name: i for i, block in enumerate(blocks.blocks)}
        self.block_pages = [block.used_length // 4096 for block in blocks.blocks]

    async def sync_pages(self, batch: PageBatch) -> None:
        pass

    async def end_sync(self, device_state: bytes, vmdesc: bytes) -> None:
        pass

    async def begin(self, epoch: int) -> None:
        self.checkpoints.append([])

    async def pages(self, batch: PageBatch) -> None:
        self.checkpoints[-1].extend(
            RamPageRun(
                run.block, run.data_pages, [memoryview(bytes(d)) for d in run.data], array("I")
            )
            for run in batch
            if run.data_pages
        )

    async def device_state(self, epoch: int, data: bytes) -> None:
        pass

    async def commit(self, epoch: int) -> None:
        pass


async def capture(args: argparse.Namespace, workdir: Path) -> KeepingSink:
    patched = patched_qemu()
    if patched is None:
        raise SystemExit("patched QEMU not built: run `kemari qemu build` first")
    image = default_image()
    spec = MachineSpec(
        name="bench-pages",
        accel="tcg",
        qmp_socket=workdir / "qmp.sock",
        memory_mib=args.memory,
        kernel=image.kernel,
        initrd=image.initrd,
        append=f"console=ttyS0 kemari.workload={args.workload}",
        serial_log=workdir / "serial.log",
        memory_file=MemoryFile(workdir / "ram"),
    )
    sink = KeepingSink()
    async with QemuMachine(spec, patched.binary) as machine:

        def ready() -> bool:
            log = spec.serial_log
            marker = f"workload {args.workload} ready".encode()
            return log is not None and log.exists() and marker in log.read_bytes()

        await async_wait_for(ready, f"workload {args.workload} ready on the console", 120)
        source = CheckpointSource(machine, sink, epoch_ms=args.epoch_ms)
        async with source:
            while source.state is SourceState.SYNCING:
                await source.wait_progress(1.0)
            if source.state is not SourceState.PROTECTED:
                raise SystemExit(f"protection failed: {source.state.value} {source.reason}")
            sink.checkpoints.clear()
            await asyncio.sleep(args.seconds)
    sink.checkpoints = [pages for pages in sink.checkpoints[:-1] if pages]
    return sink


def replay(sink: KeepingSink, compress: bool) -> tuple[list[float], list[float], float]:
    """Primary and standby CPU seconds per checkpoint, and wire bytes per dirty byte."""
    primary, standby = [], []
    dirty = wire = 0
    for number, pages in enumerate(sink.checkpoints, start=1):
        encoder, decoder = FrameEncoder(), FrameDecoder()
        decoder.zstd_pages = True
        started = time.process_time()
        encoded = []
        for frame in page_frames(number, pages, sink.blocks, sink.block_pages, compress=compress):
            encoded.append(b"".join(bytes(part) for part in encoder.encode(frame)))
            dirty += len(frame.data_pages) * 4096
            wire += len(frame.compressed if isinstance(frame, ZstdRamPages) else frame.data)
        primary.append(time.process_time() - started)
        started = time.process_time()
        for data in encoded:
            for decoded in decoder.feed(data):
                assert isinstance(decoded.payload, RamPages)
        standby.append(time.process_time() - started)
    return primary, standby, wire / dirty


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, default=256, help="guest MiB")
    parser.add_argument("--workload", default="ticks", help="Kemari guest workload")
    parser.add_argument("--epoch-ms", type=int, default=50, help="checkpoint period")
    parser.add_argument("--seconds", type=float, default=5.0, help="checkpoints taken for")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kemari-pages-") as tmp:
        sink = asyncio.run(capture(args, Path(tmp)))
    counts = [len(pages) for pages in sink.checkpoints]
    print(
        f"{len(counts)} checkpoints of a {args.memory} MiB Linux guest ({args.workload}), "
        f"every {args.epoch_ms} ms: data pages p50 {statistics.median(counts):.0f}, "
        f"max {max(counts)}"
    )
    print("  mode | wire/dirty | primary ms p50 | standby ms p50")
    results = {}
    for compress in (False, True):
        primary, standby, ratio = replay(sink, compress)
        results[compress] = (statistics.median(primary), statistics.median(standby), ratio)
        name = "zstd" if compress else "off"
        print(
            f"  {name:>4} | {ratio:10.3f} | {results[compress][0] * 1e3:14.3f} | "
            f"{results[compress][1] * 1e3:14.3f}"
        )
    pages = statistics.median(counts) * 4096
    extra_cpu = (results[True][0] + results[True][1]) - (results[False][0] + results[False][1])
    saved = pages * (1 - results[True][2])
    if saved <= 0:
        print("  compression saves no bytes: never worth it")
    elif extra_cpu <= 0:
        print("  compression costs no extra CPU here: worth it at any link speed")
    else:
        print(f"  worth it below {saved / extra_cpu * 8 / 1e6:.0f} Mbit/s of link bandwidth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
