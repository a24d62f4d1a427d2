"""The ticker guest the checkpoint benchmarks share (checkpoint_pause.py, checkpoint_cost.py).

The guest is the ticker firmware (tests/ticker_rom.py) dirtying a given number of pages
about every millisecond, under Kemari's patched QEMU (``kemari qemu build``;
KEMARI_PATCHED_QEMU=PATH overrides).  Here: finding that QEMU, the machine, waiting for
protection, and the guest's pauses as QEMU's STOP/RESUME events time them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

from kemari.checkpoint import CheckpointSource, SourceState, SyncRecord
from kemari.qemu.build import patched_qemu
from kemari.qemu.cmdline import MachineSpec, MemoryFile
from kemari.qemu.debian import qemu_version
from kemari.qemu.machine import EventSubscription

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ticker_rom import ticker_rom

TICK_DELAY_TSC = 2_000_000  # about 1 ms of host TSC


def patched_binary() -> Path:
    """KEMARI_PATCHED_QEMU, else the built patched QEMU, its version printed; exit status 2
    with one line when there is neither."""
    override = os.environ.get("KEMARI_PATCHED_QEMU")
    patched = patched_qemu()
    if override:
        binary = Path(override)
    elif patched is not None:
        binary = patched.binary
    else:
        print("patched QEMU not built: run `kemari qemu build` first", file=sys.stderr)
        raise SystemExit(2)
    print(f"QEMU: {qemu_version(binary)} ({binary})")
    return binary


def ticker_machine(workdir: Path, memory_mib: int, pages: int) -> MachineSpec:
    """The ticker guest of ``memory_mib`` MiB dirtying ``pages`` pages per tick, its files
    (QMP socket, firmware, serial log, RAM file) in ``workdir``."""
    return MachineSpec(
        name="bench-primary",
        accel="tcg",
        qmp_socket=workdir / "qmp.sock",
        memory_mib=memory_mib,
        # invlpg before each store: without it TCG misses writes to TLB-resident pages
        # (see docs/checkpoint.md) and checkpoints would carry no pages at all.
        bios=ticker_rom(
            workdir / "ticker.rom", pages=pages, delay_tsc=TICK_DELAY_TSC, flush_tlb=True
        ),
        serial_log=workdir / "serial.log",
        memory_file=MemoryFile(workdir / "ram"),
    )


async def wait_protected(source: CheckpointSource) -> SyncRecord:
    """Wait out the initial sync; its record, or SystemExit saying why protection failed."""
    while source.state is SourceState.SYNCING:
        await source.wait_progress(1.0)
    sync = source.sync
    if source.state is not SourceState.PROTECTED or sync is None:
        raise SystemExit(f"protection failed: {source.state.value} {source.reason}")
    return sync


class PauseRecorder:
    """STOP -> RESUME durations from QEMU's event timestamps, collected in the background."""

    def __init__(self, events: EventSubscription) -> None:
        self.pauses: list[float] = []
        self._task = asyncio.create_task(self._collect(events))

    async def _collect(self, events: EventSubscription) -> None:
        stopped: float | None = None
        async for event in events:
            if event.name == "STOP":
                stopped = event.timestamp
            elif event.name == "RESUME" and stopped is not None:
                self.pauses.append(event.timestamp - stopped)
                stopped = None

    def take(self) -> list[float]:
        """The pauses recorded since the last call."""
        taken, self.pauses = self.pauses, []
        return taken

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
