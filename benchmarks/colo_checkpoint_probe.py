"""Prove the COLO/TCG BQL fix: stock QEMU 7.2 hangs at the first checkpoint, the patched one runs.

For each QEMU binary (Debian's and Kemari's patched build from ``kemari qemu build``):
start a TCG guest (``-m 128``; the Kemari guest image with ``kemari.workload=ticks``
when ~/.cache/kemari/image has it, otherwise firmware only), enable ``x-colo``,
migrate to a unix socket where this script plays the secondary's side of COLO
(migration/colo.c of QEMU 7.2):

    initial precopy stream ... EOF, VMDESCRIPTION      -> we send CHECKPOINT_READY
    CHECKPOINT_REQUEST                                 -> we send CHECKPOINT_REPLY
    VMSTATE_SEND, RAM SECTION_END + EOF, VMSTATE_SIZE + device buffer
                                                       -> we send VMSTATE_RECEIVED, VMSTATE_LOADED

Checkpoints are requested at once with ``migrate-set-parameters x-checkpoint-delay``
(which notifies the COLO thread), then run periodically at a 20 ms delay.  A checkpoint
counts only when QEMU's RESUME event follows its STOP; no progress within the hang
timeout is reported as a deadlock together with the last COLO message seen.

Prints initial sync time, checkpoints/s, pause p50/p99 (QMP STOP -> RESUME event
timestamps), request -> resume latency and bytes per checkpoint.  This receiver is a
throwaway measurement probe, not Kemari's receiver.

Usage: python benchmarks/colo_checkpoint_probe.py [--checkpoints N] [--binary PATH ...]
Exit status 1 when any probed QEMU hung (expected for Debian's stock QEMU under TCG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kemari.qemu.binary import qemu_binary
from kemari.qemu.build import patched_qemu
from kemari.qemu.cmdline import MachineSpec
from kemari.qemu.debian import qemu_version
from kemari.qemu.machine import EventSubscription, QemuMachine
from kemari.stream import (
    ColoEvent,
    ColoMessage,
    DeviceState,
    StreamParser,
    VmDescription,
    encode_colo_message,
)

IMAGE_DIR = Path.home() / ".cache" / "kemari" / "image"
SYNC_TIMEOUT_S = 120.0


class Deadlock(Exception):
    """The primary made no progress within the hang timeout."""


class SecondaryProbe:
    """Secondary side of QEMU 7.2's COLO protocol on one connection; counts what arrives."""

    def __init__(self) -> None:
        self.parser = StreamParser()
        self.bytes_received = 0
        self.last_message = "nothing yet"
        self.ready = asyncio.Event()  # CHECKPOINT_READY sent: the initial sync is done
        self.loaded: asyncio.Queue[int] = asyncio.Queue()  # bytes of each loaded checkpoint
        self._checkpoint_start: int | None = None  # bytes received at CHECKPOINT_REQUEST

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(1 << 20):
                self.bytes_received += len(chunk)
                for event in self.parser.feed(chunk):
                    reply = self._answer(event)
                    if reply:
                        writer.write(reply)
                        await writer.drain()
        except ConnectionError:
            pass  # QEMU went away (shut down or killed): the end of this stream
        except Exception as exc:  # a probe failure must show, not vanish with the task
            self.last_message = f"probe error: {exc!r}"
            print(f"   {self.last_message}")
        finally:
            writer.close()

    def _answer(self, event: object) -> bytes:
        """The bytes the secondary sends back for ``event`` (possibly none)."""
        if isinstance(event, VmDescription):
            self.last_message = "VMDESCRIPTION (end of precopy)"
            self.ready.set()
            return encode_colo_message(ColoMessage.CHECKPOINT_READY)
        if isinstance(event, ColoEvent):
            self.last_message = event.message.name
            if event.message is ColoMessage.CHECKPOINT_REQUEST:
                self._checkpoint_start = self.bytes_received
                return encode_colo_message(ColoMessage.CHECKPOINT_REPLY)
            return b""
        # The initial device state (before VMDESCRIPTION) is a DeviceState too: no answer.
        if isinstance(event, DeviceState) and self._checkpoint_start is not None:
            self.last_message = "device state buffer"
            self.loaded.put_nowait(self.bytes_received - self._checkpoint_start)
            self._checkpoint_start = None
            return encode_colo_message(ColoMessage.VMSTATE_RECEIVED) + encode_colo_message(
                ColoMessage.VMSTATE_LOADED
            )
        return b""


@dataclasses.dataclass
class Checkpoint:
    pause_s: float  # STOP -> RESUME, QEMU's event timestamps
    latency_s: float  # request sent -> RESUME seen
    size: int  # stream bytes from CHECKPOINT_REQUEST to the device buffer's end


async def _next_event(events: EventSubscription, name: str, timeout_s: float, what: str) -> float:
    """Timestamp of the next ``name`` event; Deadlock if none within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            event = await asyncio.wait_for(events.get(), max(remaining, 0.0))
        except TimeoutError as exc:
            raise Deadlock(f"no {name} event within {timeout_s:.0f} s ({what})") from exc
        if event.name == name:
            return event.timestamp


async def _checkpoint(
    machine: QemuMachine,
    probe: SecondaryProbe,
    events: EventSubscription,
    delay_ms: int,
    timeout_s: float,
) -> Checkpoint:
    """Request one checkpoint (by setting the delay) and wait until the guest resumed."""
    began = time.monotonic()
    try:
        await asyncio.wait_for(
            machine.execute("migrate-set-parameters", {"x-checkpoint-delay": delay_ms}), timeout_s
        )
    except TimeoutError as exc:
        raise Deadlock(f"QMP did not answer within {timeout_s:.0f} s") from exc
    return await _wait_checkpoint(probe, events, began, timeout_s)


async def _wait_checkpoint(
    probe: SecondaryProbe, events: EventSubscription, began: float, timeout_s: float
) -> Checkpoint:
    stopped = await _next_event(events, "STOP", timeout_s, "checkpoint never stopped the VM")
    resumed = await _next_event(events, "RESUME", timeout_s, "VM not resumed after checkpoint")
    size = probe.loaded.get_nowait() if not probe.loaded.empty() else 0
    return Checkpoint(resumed - stopped, time.monotonic() - began, size)


def _spec(directory: Path) -> MachineSpec:
    """A 128 MiB TCG machine; it boots the Kemari guest image (ticks) when one is built."""
    kernel, initrd = IMAGE_DIR / "vmlinuz", IMAGE_DIR / "initrd.img"
    qmp = directory / "qmp.sock"
    if not (kernel.is_file() and initrd.is_file()):
        return MachineSpec(name="colo-probe", accel="tcg", qmp_socket=qmp, memory_mib=128)
    return MachineSpec(
        name="colo-probe",
        accel="tcg",
        qmp_socket=qmp,
        memory_mib=128,
        kernel=kernel,
        initrd=initrd,
        append="console=ttyS0 kemari.workload=ticks",
        serial_log=directory / "serial.log",
    )


async def probe_binary(binary: Path, checkpoints: int, periodic_s: float, timeout_s: float) -> bool:
    """Probe one QEMU; False if it deadlocked."""
    print(f"== {qemu_version(binary)}\n   {binary}")
    with tempfile.TemporaryDirectory(prefix="kemari-colo-probe-") as tmp:
        directory = Path(tmp)
        spec = _spec(directory)
        print(f"   guest: {'kemari image, ticks workload' if spec.kernel else 'firmware only'}")
        probe = SecondaryProbe()
        server = await asyncio.start_unix_server(probe.handle, path=str(directory / "mig.sock"))
        machine = QemuMachine(spec, binary)
        try:
            await machine.start()
            await _run(machine, probe, directory, checkpoints, periodic_s, timeout_s)
            return True
        except Deadlock as exc:
            print(f"   DEADLOCK: {exc}; last COLO item from the primary: {probe.last_message}")
            # A deadlocked QEMU holds its big lock: it can answer neither quit nor SIGTERM.
            if machine.pid is not None:
                os.kill(machine.pid, signal.SIGKILL)
            return False
        finally:
            await machine.shutdown(timeout_s=2.0)
            server.close()
            await server.wait_closed()


async def _run(
    machine: QemuMachine,
    probe: SecondaryProbe,
    directory: Path,
    checkpoints: int,
    periodic_s: float,
    timeout_s: float,
) -> None:
    await asyncio.sleep(1.0)  # let the guest get going before the initial sync
    await machine.execute(
        "migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True}]}
    )
    await machine.execute(
        "migrate-set-parameters", {"max-bandwidth": 1 << 34, "x-checkpoint-delay": 60_000}
    )
    with machine.subscribe("STOP", "RESUME") as events:
        began = time.monotonic()
        await machine.execute("migrate", {"uri": f"unix:{directory / 'mig.sock'}"})
        try:
            await asyncio.wait_for(probe.ready.wait(), SYNC_TIMEOUT_S)
        except TimeoutError as exc:
            raise Deadlock("initial sync did not finish") from exc
        await _next_event(events, "RESUME", timeout_s, "VM not resumed after initial sync")
        print(
            f"   initial sync: {time.monotonic() - began:.2f} s, "
            f"{probe.bytes_received / 2**20:.1f} MiB stream"
        )

        on_demand: list[Checkpoint] = []
        began = time.monotonic()
        for index in range(checkpoints):
            try:
                on_demand.append(await _checkpoint(machine, probe, events, 60_000, timeout_s))
            except Deadlock as exc:
                raise Deadlock(f"checkpoint {index + 1}: {exc}") from exc
        _report("on demand", on_demand, time.monotonic() - began, requested=True)

        periodic: list[Checkpoint] = []
        await machine.execute("migrate-set-parameters", {"x-checkpoint-delay": 20})
        began = time.monotonic()
        while time.monotonic() - began < periodic_s:
            periodic.append(await _wait_checkpoint(probe, events, time.monotonic(), timeout_s))
        _report("every 20 ms", periodic, time.monotonic() - began, requested=False)
        status = await asyncio.wait_for(machine.query_status(), timeout_s)
        print(f"   after the checkpoints the VM is {status.status}")


def _report(label: str, results: list[Checkpoint], elapsed_s: float, *, requested: bool) -> None:
    """One line of numbers; request->resume only where the probe sent the request."""
    pauses = sorted(c.pause_s * 1000 for c in results)
    p99 = pauses[min(len(pauses) - 1, int(len(pauses) * 0.99))]
    latency = ""
    if requested:
        latency = (
            f", request->resume p50 {statistics.median(c.latency_s for c in results) * 1000:.2f} ms"
        )
    print(
        f"   {label:<12} {len(results)} checkpoints, {len(results) / elapsed_s:6.1f}/s, "
        f"pause p50 {statistics.median(pauses):.2f} ms p99 {p99:.2f} ms{latency}, "
        f"{statistics.mean(c.size for c in results) / 1024:.0f} KiB/checkpoint"
    )


def _binaries(given: list[Path]) -> list[Path]:
    if given:
        return given
    chosen = [qemu_binary("tcg").path]
    patched = patched_qemu()
    if patched is None:
        print("patched QEMU not built (run: kemari qemu build); probing the stock one only")
    else:
        chosen.append(patched.binary)
    return chosen


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=200, help="on-demand checkpoints")
    parser.add_argument("--periodic", type=float, default=3.0, help="seconds at a 20 ms delay")
    parser.add_argument("--timeout", type=float, default=10.0, help="hang timeout, seconds")
    parser.add_argument("--binary", type=Path, action="append", default=[], help="QEMU to probe")
    args = parser.parse_args()
    hung = 0
    for binary in _binaries(args.binary):
        if not await probe_binary(binary, args.checkpoints, args.periodic, args.timeout):
            hung += 1
    return 1 if hung else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main()))
