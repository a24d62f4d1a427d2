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
  inside  the pause step by step (CheckpointRecord.timeline, docs/checkpoint.md "Inside
          the pause"): p50 ms of each step between two milestones, and who works in it
  qemu    with ``--qemu-trace``: QEMU's own steps from its trace points (log backend,
          wall-clock microseconds) in colo.c, savevm.c and ram.c, p50 ms, lined up with
          Kemari's milestones of the same checkpoint
and the initial sync time of the ``--memory`` MiB guest.

Needs Kemari's patched QEMU (``kemari qemu build``; KEMARI_PATCHED_QEMU=PATH overrides).
Usage: python benchmarks/checkpoint_pause.py [--memory 256] [--pages 1000] [--seconds 3]
       [--on-demand 200] [--qemu-trace]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ticker_guest import PauseRecorder, patched_binary, ticker_machine, wait_protected

from kemari.checkpoint import CheckpointRecord, CheckpointSource, CheckpointTrigger, PageBatch
from kemari.qemu.machine import QemuMachine
from kemari.stream import Configuration, RamBlockList

PERIODS_MS = (200, 50, 20)
# The steps of the pause, between two milestones of PauseTimeline, and who works in them.
PAUSE_STEPS = (
    ("reply", "stop", "QEMU reads REPLY, pauses the vCPUs (before STOP)"),
    ("stop", "vmstate_send", "QEMU sends VMSTATE_SEND; Kemari's read returns"),
    ("vmstate_send", "first_page", "QEMU saves devices to its buffer, syncs the bitmap"),
    ("first_page", "ram_end", "pages: QEMU writes, Kemari reads and parses"),
    ("ram_end", "vmstate_size", "QEMU: EOF, then VMSTATE_SIZE"),
    ("vmstate_size", "device_read", "QEMU writes the device buffer, Kemari reads it"),
    ("device_read", "device_parsed", "Kemari parses the last read"),
    ("device_parsed", "captured", "Kemari: the capture recorded"),
    ("captured", "loaded", "Kemari: in-flight window (full: forwards N first); LOADED"),
    ("loaded", "resume", "QEMU reads RECEIVED, LOADED, takes the BQL, vm_start"),
)
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


# QEMU trace points of one checkpoint (migration/colo.c colo_do_checkpoint_transaction, in
# its order) and the names they get here; a checkpoint's lines start at its REPLY.
QEMU_TRACE_POINTS = {
    "colo_receive_message Receive 'checkpoint-reply'": "q_reply",
    "colo_vm_state_change Change 'run' => 'stop'": "q_stopped",
    "colo_send_message Send 'vmstate-send'": "q_vmstate_send",
    "savevm_state_complete_precopy": "q_devices_saved",
    "migration_bitmap_sync_start": "q_sync_start",
    "migration_bitmap_sync_end": "q_sync_end",
    "colo_send_message Send 'vmstate-size'": "q_vmstate_size",
    "colo_receive_message Receive 'vmstate-received'": "q_received",
    "colo_receive_message Receive 'vmstate-loaded'": "q_loaded",
    "colo_vm_state_change Change 'stop' => 'run'": "q_running",
}
QEMU_TRACE_EVENTS = sorted({point.split()[0] for point in QEMU_TRACE_POINTS})
_TRACE_LINE = re.compile(r"^\d+@(\d+)\.(\d+):(.*)$")
# QEMU's steps, and the steps across QEMU and Kemari, on one clock.
QEMU_STEPS = (
    ("reply", "q_reply", "Kemari's REPLY reaches QEMU's COLO thread"),
    ("q_reply", "q_stopped", "QEMU: BQL, pause vCPUs, STOP, drain (vm_stop_force_state)"),
    ("q_stopped", "q_vmstate_send", "QEMU: replication checkpoint, VMSTATE_SEND"),
    ("q_vmstate_send", "q_devices_saved", "QEMU: device state into its buffer, BQL again"),
    ("q_devices_saved", "q_sync_start", "QEMU: into the RAM section's completion"),
    ("q_sync_start", "q_sync_end", "QEMU: dirty bitmap sync (+ TLB flush per vCPU)"),
    ("q_sync_end", "q_vmstate_size", "QEMU: pages + EOF written (as fast as Kemari reads)"),
    ("q_vmstate_size", "device_read", "device buffer written, Kemari's last read returns"),
    ("device_read", "loaded", "Kemari: parse the tail, sink calls, answer"),
    ("loaded", "q_received", "Kemari's RECEIVED reaches QEMU"),
    ("q_received", "q_loaded", "QEMU: reset the checkpoint event, read LOADED"),
    ("q_loaded", "q_running", "QEMU: BQL, vm_start (RESUME inside)"),
)


def read_qemu_trace(path: Path) -> dict[int, dict[str, float]]:
    """Checkpoint epoch -> QEMU trace point name -> time.monotonic() of that point."""
    to_monotonic = time.time() - time.monotonic()
    epochs: dict[int, dict[str, float]] = {}
    epoch = 0
    for line in path.read_text(errors="replace").splitlines():
        match = _TRACE_LINE.match(line)
        if match is None:
            continue
        at = int(match[1]) + int(match[2]) / 1e6 - to_monotonic
        name = next((n for p, n in QEMU_TRACE_POINTS.items() if match[3].startswith(p)), None)
        if name == "q_reply":
            epoch += 1
        if name is not None and epoch:
            epochs.setdefault(epoch, {}).setdefault(name, at)
    return epochs


def report_qemu_trace(
    records: Sequence[CheckpointRecord], trace: dict[int, dict[str, float]]
) -> None:
    """QEMU's steps and the hand-overs between QEMU and Kemari, p50 ms."""
    joint = []
    for record in records:
        points = dict(record.timeline.milestones())
        origin = record.timeline.origin
        for name, at in trace.get(record.epoch, {}).items():
            points[name] = (at - origin) * 1000
        joint.append(points)
    print("  QEMU's trace points with Kemari's milestones, p50 ms:")
    for start, end, who in QEMU_STEPS:
        steps = [p[end] - p[start] for p in joint if start in p and end in p]
        print(f"    {start:>15} -> {end:<15} {p50_ms(steps)}  {who}")
    whole = [
        p["q_running"] - p["q_stopped"] for p in joint if "q_running" in p and "q_stopped" in p
    ]
    print(f"    {'q_stopped':>15} -> {'q_running':<15} {p50_ms(whole)}  QEMU's stop to run")


def p50_ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values):6.2f}" if values else "   n/a"


def report_timeline(records: Sequence[CheckpointRecord]) -> None:
    """The p50 of each step inside the pause, from the records' timelines."""
    points = [dict(r.timeline.milestones()) for r in records]
    qemu = [p for r in records if (p := r.timeline.qemu_pause_ms) is not None]
    print(f"  inside the pause, p50 ms ({len(qemu)} of {len(records)} with STOP and RESUME):")
    for start, end, who in PAUSE_STEPS:
        steps = [p[end] - p[start] for p in points if start in p and end in p]
        print(f"    {start:>13} -> {end:<13} {p50_ms(steps)}  {who}")
    kemari = [p["loaded"] - p["vmstate_send"] for p in points]
    print(f"    {'stop':>13} -> {'resume':<13} {p50_ms(qemu)}  the pause (QEMU's timestamps)")
    print(f"    {'vmstate_send':>13} -> {'loaded':<13} {p50_ms(kemari)}  Kemari's reads to LOADED")


def host_cpu() -> tuple[int, int]:
    """The host's busy and total CPU time so far (all cores, all processes), in ticks."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def report(
    name: str,
    source: CheckpointSource,
    first_epoch: int,
    elapsed_s: float,
    pauses: list[float],
    host_from: tuple[int, int],
    requests: list[float] | None = None,
) -> list[CheckpointRecord]:
    records = [r for r in source.recent() if r.epoch > first_epoch]
    count = len(records)
    (busy_from, total_from), (busy, total) = host_from, host_cpu()
    host = (busy - busy_from) / max(total - total_from, 1)
    print(
        f"{name}: {count} checkpoints in {elapsed_s:.2f} s = {count / elapsed_s:7.1f}/s"
        f"  (host CPU {host:.0%} busy, all processes)"
    )
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
        report_timeline(records)
    return records


async def measure(args: argparse.Namespace, binary: Path, workdir: Path) -> None:
    spec = ticker_machine(workdir, args.memory, args.pages)
    trace_log = workdir / "qemu-trace.log"
    if args.qemu_trace:
        binary = traced_qemu(binary, trace_log, workdir / "qemu-traced")
    modes: list[tuple[str, list[CheckpointRecord]]] = []
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
                    host_from = host_cpu()
                    started = time.monotonic()
                    await asyncio.sleep(args.seconds)
                    elapsed = time.monotonic() - started
                    name = f"periodic {period} ms"
                    modes.append(
                        (name, report(name, source, first, elapsed, recorder.take(), host_from))
                    )

                await source.set_epoch(ON_DEMAND_EPOCH_MS)
                await trigger.checkpoint()
                recorder.take()
                first = source.committed_epoch
                requests: list[float] = []
                host_from = host_cpu()
                started = time.monotonic()
                for _ in range(args.on_demand):
                    asked = time.monotonic()
                    await trigger.checkpoint()
                    requests.append(time.monotonic() - asked)
                elapsed = time.monotonic() - started
                records = report(
                    "on demand", source, first, elapsed, recorder.take(), host_from, requests
                )
                modes.append(("on demand", records))
                print(f"  QEMU asked {trigger.kicks} times in all")
                await recorder.close()
    if args.qemu_trace:
        # QEMU has exited: its log is complete.
        trace = read_qemu_trace(trace_log)
        for name, records in modes:
            print(f"{name}:")
            report_qemu_trace(records, trace)


def traced_qemu(binary: Path, log: Path, wrapper: Path) -> Path:
    """A script that runs ``binary`` with Kemari's checkpoint trace points logged to ``log``."""
    traces = " ".join(f"-trace {event}" for event in QEMU_TRACE_EVENTS)
    wrapper.write_text(f'#!/bin/sh\nexec "{binary}" "$@" -msg timestamp=on -D "{log}" {traces}\n')
    wrapper.chmod(0o755)
    return wrapper


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, default=256, help="guest MiB (default 256)")
    parser.add_argument("--pages", type=int, default=1000, help="pages dirtied per tick")
    parser.add_argument("--seconds", type=float, default=3.0, help="per periodic mode")
    parser.add_argument("--on-demand", type=int, default=200, help="on-demand checkpoints")
    parser.add_argument(
        "--qemu-trace",
        action="store_true",
        help="also log QEMU's checkpoint trace points and print its steps",
    )
    args = parser.parse_args()
    binary = patched_binary()
    print(f"guest: {args.memory} MiB, ticker dirtying {args.pages} pages per ~1 ms tick")
    with tempfile.TemporaryDirectory(prefix="kemari-bench-") as tmp:
        asyncio.run(measure(args, binary, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
