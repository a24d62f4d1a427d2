"""Print how long QemuMachine takes to start QEMU (to QMP ready) and to stop it.

Starts paused machines without a guest, one after another, so the numbers are
Kemari's supervision overhead plus QEMU's own start-up: the floor under any
boot or failover time.  Usage: ``python benchmarks/bench_qemu_start.py [ROUNDS]``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kemari.qemu.binary import qemu_binary
from kemari.qemu.cmdline import MachineSpec
from kemari.qemu.machine import QemuMachine


async def one_round(directory: Path, binary: Path, memory_mib: int) -> tuple[float, float, float]:
    spec = MachineSpec(
        name="bench",
        accel="tcg",
        qmp_socket=directory / "qmp.sock",
        memory_mib=memory_mib,
        start_paused=True,
    )
    machine = QemuMachine(spec, binary)
    began = time.perf_counter()
    await machine.start()
    ready = time.perf_counter()
    await machine.execute("cont")
    resumed = time.perf_counter()
    await machine.shutdown()
    stopped = time.perf_counter()
    return ready - began, resumed - ready, stopped - resumed


def summary(label: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p50 = statistics.median(ms)
    return f"{label:<28} p50 {p50:7.1f} ms   min {ms[0]:7.1f} ms   max {ms[-1]:7.1f} ms"


async def main(rounds: int) -> None:
    binary = qemu_binary("tcg").path
    for memory_mib in (256, 1024):
        results = []
        with tempfile.TemporaryDirectory(prefix="kemari-bench-") as directory:
            for _ in range(rounds):
                results.append(await one_round(Path(directory), binary, memory_mib))
        print(f"QEMU {binary}, tcg, {memory_mib} MiB, {rounds} rounds")
        print(summary("  start -> QMP ready", [r[0] for r in results]))
        print(summary("  cont (QMP round trip)", [r[1] for r in results]))
        print(summary("  shutdown (quit -> reaped)", [r[2] for r in results]))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
