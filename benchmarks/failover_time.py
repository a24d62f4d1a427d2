"""Failover time: the failover command → guest running, and → the guest's first new tick.

Each round protects the running guest in-process (CheckpointSource → ReplicaApplier on
tmpfs, periodic checkpoints every ``--epoch`` ms), lets it run ``--run`` seconds, kills
its QEMU with SIGKILL and calls ``kemari.failover.fail_over``.  The QEMU started by the
failover is the primary of the next round.  Printed per round and as p50/max:

  total    fail_over() called → ``cont`` answered and QEMU running (the guest runs)
  tick     fail_over() called → first complete ``tick N`` line in the new serial log
  parts    hand_over (replica → image), start (exec → QMP), load (stream in), resume (cont)

Guests: ``ticker`` (default; firmware, tests/ticker_rom.py) or ``linux`` (the image's
kernel with the ``ticks`` workload; needs a QEMU whose TCG dirty tracking sees writes to
TLB-resident pages, docs/failover.md).  Needs Kemari's patched QEMU (``kemari qemu build``;
``--qemu PATH`` or KEMARI_PATCHED_QEMU=PATH overrides).
Usage: python benchmarks/failover_time.py [--rounds 5] [--guest ticker|linux] [--run 1.5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kemari.checkpoint import CheckpointSource, SourceState
from kemari.failover import FailoverResult, fail_over
from kemari.image.builder import default_image
from kemari.qemu.build import patched_qemu
from kemari.qemu.cmdline import MachineSpec
from kemari.qemu.machine import QemuMachine
from kemari.replica.applier import ReplicaApplier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ticker_rom import ticker_rom

TICK_RE = re.compile(rb"^tick (\d+)\r?$", re.MULTILINE)
POLL_S = 0.001


def spec_for(guest: str, workdir: Path, name: str) -> MachineSpec:
    common = {
        "name": name,
        "accel": "tcg",
        "qmp_socket": workdir / f"{name}.qmp",
        "serial_log": workdir / f"{name}.log",
    }
    if guest == "ticker":
        rom = ticker_rom(workdir / "ticker.rom", pages=16, delay_tsc=50_000_000, flush_tlb=True)
        return MachineSpec(memory_mib=64, bios=rom, **common)  # type: ignore[arg-type]
    image = default_image()
    return MachineSpec(
        memory_mib=128,
        kernel=image.kernel,
        initrd=image.initrd,
        append="console=ttyS0 kemari.workload=ticks",
        **common,  # type: ignore[arg-type]
    )


def has_tick(path: Path) -> bool:
    try:
        return TICK_RE.search(path.read_bytes()) is not None
    except FileNotFoundError:
        return False


async def wait_tick(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not has_tick(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no tick in {path} within {timeout_s:g} s")
        await asyncio.sleep(POLL_S)


async def one_round(
    machine: QemuMachine, root: Path, standby: MachineSpec, binary: Path, args: argparse.Namespace
) -> tuple[FailoverResult, float]:
    applier = ReplicaApplier(root)
    source = CheckpointSource(machine, applier, epoch_ms=args.epoch)
    await source.start()
    try:
        while source.state is SourceState.SYNCING:
            await source.wait_progress(1.0)
        if source.state is not SourceState.PROTECTED:
            raise SystemExit(f"protection failed: {source.reason}")
        await asyncio.sleep(args.run)
        assert machine.pid is not None
        os.kill(machine.pid, signal.SIGKILL)
        await machine.wait()
    finally:
        await source.close()
    assert standby.serial_log is not None
    started = time.monotonic()
    result = await fail_over(applier, standby, binary)
    await wait_tick(standby.serial_log, 60)
    return result, time.monotonic() - started


def ms(value: float) -> str:
    return f"{value * 1000:7.1f}"


async def run(args: argparse.Namespace, binary: Path) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="kemari-failover-bench-"))
    root = Path(tempfile.mkdtemp(prefix="kemari-failover-bench-", dir="/dev/shm"))
    machines: list[QemuMachine] = []
    totals: list[float] = []
    ticks: list[float] = []
    try:
        spec = spec_for(args.guest, workdir, "primary")
        machine = QemuMachine(spec, binary)
        machines.append(machine)
        await machine.start()
        assert spec.serial_log is not None
        await wait_tick(spec.serial_log, 120)
        print("round    total     tick | hand_over  start   load  resume (ms)  epoch")
        for number in range(1, args.rounds + 1):
            standby = spec_for(args.guest, workdir, f"failover{number}")
            result, to_tick = await one_round(machine, root, standby, binary, args)
            machine = result.machine
            machines.append(machine)
            t = result.timings
            totals.append(t.total_s)
            ticks.append(to_tick)
            print(
                f"{number:5d} {ms(t.total_s)}  {ms(to_tick)} | {ms(t.hand_over_s)} "
                f"{ms(t.start_s)} {ms(t.load_s)} {ms(t.resume_s)}  {result.epoch:6d}"
            )
        print(
            f"command → running:   p50 {statistics.median(totals) * 1000:.1f} ms, "
            f"max {max(totals) * 1000:.1f} ms"
        )
        print(
            f"command → first tick: p50 {statistics.median(ticks) * 1000:.1f} ms, "
            f"max {max(ticks) * 1000:.1f} ms (the guest ticks every "
            f"{'~50 ms' if args.guest == 'ticker' else '200 ms'})"
        )
    finally:
        for machine in machines:
            await machine.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--guest", choices=("ticker", "linux"), default="ticker")
    parser.add_argument("--run", type=float, default=1.5, help="seconds protected per round")
    parser.add_argument("--epoch", type=int, default=100, help="checkpoint period, ms")
    parser.add_argument("--qemu", type=Path, default=None)
    args = parser.parse_args()
    override = args.qemu or os.environ.get("KEMARI_PATCHED_QEMU")
    patched = patched_qemu()
    binary = Path(override) if override else patched.binary if patched else None
    if binary is None:
        raise SystemExit("patched QEMU not built: run kemari qemu build")
    print(f"QEMU {binary}; guest {args.guest}; {args.rounds} rounds, epoch {args.epoch} ms")
    asyncio.run(run(args, binary))


if __name__ == "__main__":
    main()
