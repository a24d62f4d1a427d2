"""Checkpoint pause, rate and size through CheckpointSource on a real TCG guest.

The guest is the ticker firmware (tests/ticker_rom.py) dirtying ``--pages`` pages about
every millisecond, so every checkpoint carries those pages plus QEMU's own few.  The sink
keeps references to the pages and commits at once: this measures QEMU plus Kemari's
source, not the network or the standby.

Printed per mode (periodic 200/50/20 ms for ``--seconds`` each, then ``--on-demand``
back-to-back requested checkpoints):
  pause   QMP STOP -> RESUME event timestamps (what the guest sees), p50/p99
  kemari  VMSTATE_SEND received -> VMSTATE_LOADED sent (inside that pause), p50/p99
  rate    committed checkpoints per second; pages and stream bytes per checkpoint
  request on demand only: request_checkpoint() -> committed, p50/p99
and the initial sync time of the ``--memory`` MiB guest.

Needs Kemari's patched QEMU (``kemari qemu build``; KEMARI_PATCHED_QEMU=PATH overrides).
Usage: python benchmarks/checkpoint_pause.py [--memory 256] [--pages 1000] [--seconds 3]
       [--on-demand 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ticker_guest import PauseRecorder, patched_binary, ticker_machine, wait_protected

from kemari.checkpoint import CheckpointSource, CheckpointTrigger, PageBatch
from kemari.qemu.machine import QemuMachine
from kemari.stream import Configuration, RamBlockList

PERIODS_MS = (200, 50, 20)
ON_DEMAND_EPOCH_MS = 60_000


class HoldingSink:
    """Holds the last checkpoint's pages (as a sender would until sent) and commits at once."""

    def __init__(self) -> None:
        self.held: list[PageBatch] = []

    async def begin_sync(self, configuration: Configuration, blocks: RamBlockList) -> None:
        pass

    async def sync_pages(self, batch: PageBatch) -> None:
        pass

    async def end_sync(self, device_state: bytes, vmdesc: bytes) -> None:
        pass

    async def begin(self, epoch: int) -> None:
        self.held = []

    async def pages(self, batch: PageBatch) -> None:
        self.held.append(batch)

    async def device_state(self, epoch: int, data: bytes) -> None:
        pass

    async def commit(self, epoch: int) -> None:
        pass

    async def acknowledged(self, epoch: int) -> None:
        pass


def percentiles_ms(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {p50 * 1e3:6.2f} ms  p99 {p99 * 1e3:6.2f} ms"


def report(
    name: str,
    source: CheckpointSource,
    first_epoch: int,
    elapsed_s: float,
    pauses: list[float],
    requests: list[float] | None = None,
) -> None:
    records = [r for r in source.recent() if r.epoch > first_epoch]
    count = len(records)
    print(f"{name}: {count} checkpoints in {elapsed_s:.2f} s = {count / elapsed_s:7.1f}/s")
    print(f"  pause  {percentiles_ms(pauses)}   (QMP STOP -> RESUME, {len(pauses)} pairs)")
    print(f"  kemari {percentiles_ms([r.pause_s for r in records])}   (VMSTATE_SEND -> LOADED)")
    if requests is not None:
        print(f"  request->committed {percentiles_ms(requests)}")
    if records:
        pages = statistics.mean(r.pages for r in records)
        stream = statistics.mean(r.stream_bytes for r in records)
        device = statistics.mean(r.device_bytes for r in records)
        print(
            f"  per checkpoint: {pages:.0f} pages, {stream / 1024:.0f} KiB stream "
            f"({device / 1024:.1f} KiB device state)"
        )


async def measure(args: argparse.Namespace, binary: Path, workdir: Path) -> None:
    spec = ticker_machine(workdir, args.memory, args.pages)
    async with QemuMachine(spec, binary) as machine:
        # Let the guest touch its pages before protection starts.
        await asyncio.sleep(0.5)
        source = CheckpointSource(machine, HoldingSink(), epoch_ms=ON_DEMAND_EPOCH_MS)
        async with source, CheckpointTrigger(source) as trigger:
            sync = await wait_protected(source)
            print(
                f"initial sync: {sync.ram_bytes >> 20} MiB guest in {sync.duration_s:.2f} s "
                f"({sync.ram_bytes / sync.duration_s / 2**20:.0f} MiB/s of guest RAM; "
                f"{sync.stream_bytes / 2**20:.1f} MiB stream, {sync.pages} page records)"
            )
            with machine.subscribe("STOP", "RESUME") as events:
                recorder = PauseRecorder(events)
                for period in PERIODS_MS:
                    await source.set_epoch(period)
                    await asyncio.sleep(0.3)  # settle into the new period
                    recorder.take()
                    first = source.committed_epoch
                    started = time.monotonic()
                    await asyncio.sleep(args.seconds)
                    elapsed = time.monotonic() - started
                    report(f"periodic {period} ms", source, first, elapsed, recorder.take())

                await source.set_epoch(ON_DEMAND_EPOCH_MS)
                await trigger.checkpoint()
                recorder.take()
                first = source.committed_epoch
                requests: list[float] = []
                started = time.monotonic()
                for _ in range(args.on_demand):
                    asked = time.monotonic()
                    await trigger.checkpoint()
                    requests.append(time.monotonic() - asked)
                elapsed = time.monotonic() - started
                report("on demand", source, first, elapsed, recorder.take(), requests)
                print(f"  QEMU asked {trigger.kicks} times in all")
                await recorder.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, default=256, help="guest MiB (default 256)")
    parser.add_argument("--pages", type=int, default=1000, help="pages dirtied per tick")
    parser.add_argument("--seconds", type=float, default=3.0, help="per periodic mode")
    parser.add_argument("--on-demand", type=int, default=200, help="on-demand checkpoints")
    args = parser.parse_args()
    binary = patched_binary()
    print(f"guest: {args.memory} MiB, ticker dirtying {args.pages} pages per ~1 ms tick")
    with tempfile.TemporaryDirectory(prefix="kemari-bench-") as tmp:
        asyncio.run(measure(args, binary, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
