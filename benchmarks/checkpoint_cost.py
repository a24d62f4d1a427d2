"""How a checkpoint's cost grows with dirty pages and guest size, end to end.

For every guest size (``--memory``, MiB) and dirty-page count (``--pages``) this boots the
ticker firmware (tests/ticker_rom.py: it dirties ``pages`` pages about every millisecond)
under Kemari's patched QEMU and protects it through the real path: CheckpointSource →
TransactionSender → PrimarySession over mutually authenticated TLS on loopback →
StandbyReceiver with a ReplicaApplier in another process (its replica in a temporary
directory under ``--replica-base``, default /dev/shm like the agent's default replica
directory: tmpfs, so no msync/fsync; a directory on a disk measures the durable replica).
After the initial sync it takes ``--checkpoints`` back-to-back on-demand checkpoints and
prints one row per configuration:

  pause      QMP STOP -> RESUME (what the guest sees), p50 / p99
  kemari     VMSTATE_SEND received -> VMSTATE_LOADED sent (Kemari's share), p50
  commit     output commit: request_checkpoint() -> the standby's COMMIT_ACK, p50 / p99
  stop, xfer, ack   phases p50: REQUEST -> VMSTATE_SEND (QEMU stops the VM), SEND -> device
             state read (pages parsed and forwarded), time in the sender's commit()
  pages      page records per checkpoint; stream KiB per checkpoint (QEMU's stream)
  wire       page bytes on the wire per dirty page byte (below 1 with zstd-pages)
  cpu        the primary process's CPU ms per checkpoint (parse, frames, TLS)
  sb cpu     the standby process's CPU ms per checkpoint (TLS, staging, journal, apply;
             /proc/PID/stat, all its threads)

With ``--timeline``, each row is followed by the pause step by step (the records'
timelines, as benchmarks/checkpoint_pause.py prints them).

Goals (issue 11): pause p50 <= 1 ms at <= 200 dirty pages and <= 2 ms at 1,000; it grows
<= 1 ms per 1,000 pages and stays flat in guest size.

Needs Kemari's patched QEMU (``kemari qemu build``; KEMARI_PATCHED_QEMU=PATH overrides).
Usage: python benchmarks/checkpoint_cost.py [--memory 256,1024,2048] [--pages 100,1000,10000]
       [--checkpoints 60] [--capability zstd-pages] [--timeline]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from checkpoint_pause import report_timeline
from ticker_guest import PauseRecorder, patched_binary, ticker_machine, wait_protected

from kemari.checkpoint import CheckpointRecord, CheckpointSource, CheckpointTrigger
from kemari.checkpoint.sender import TransactionSender
from kemari.config import TlsCreds
from kemari.qemu.machine import QemuMachine
from kemari.replica.applier import ReplicaApplier
from kemari.replica.receiver import StandbyReceiver
from kemari.transaction.pki import make_credentials
from kemari.transaction.session import Identity, PrimarySession
from kemari.transaction.transport import connect

VM = "bench"
IDENTITY = Identity(VM, bytes(32))
ON_DEMAND_EPOCH_MS = 60_000


def _standby_main(
    root: str, creds_dir: str, capabilities: tuple[str, ...], conn: Connection
) -> None:
    """The standby process: a receiver on an ephemeral port until the parent says stop."""

    async def serve() -> None:
        identity = Identity(VM, bytes(32), capabilities)
        applier = ReplicaApplier(Path(root), config_digest=bytes(32).hex())
        receiver = StandbyReceiver(
            "kemari:tcp:127.0.0.1:0",
            identity,
            applier,
            tls=TlsCreds(Path(creds_dir), f"kemari-{VM}"),
        )
        await receiver.start()
        conn.send(str(receiver.listener.bound))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)
        await receiver.close()
        applier.close()

    asyncio.run(serve())


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    # Fields after the ")" closing the command name: state is the first, utime the 12th.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _p(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    if q == 0.5:
        return statistics.median(ordered) * 1e3
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1e3


async def measure_one(
    binary: Path,
    workdir: Path,
    replica: Path,
    creds: TlsCreds,
    memory: int,
    pages: int,
    args: argparse.Namespace,
) -> tuple[list[CheckpointRecord], str]:
    """One configuration: boot, protect, take the checkpoints; its records and table row."""
    capabilities = tuple(args.capabilities)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    standby = ctx.Process(
        target=_standby_main,
        args=(str(replica), str(creds.directory), capabilities, child),
    )
    standby.start()
    try:
        uri = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
        async with QemuMachine(ticker_machine(workdir, memory, pages), binary) as machine:
            transport = await connect(uri, 10, tls=creds)
            session = await PrimarySession.handshake(
                transport, Identity(VM, bytes(32), capabilities), 10
            )
            sender = TransactionSender(session, commit_timeout_s=30)
            source = CheckpointSource(machine, sender, epoch_ms=ON_DEMAND_EPOCH_MS)
            async with source, CheckpointTrigger(source) as trigger:
                sync = await wait_protected(source)
                with machine.subscribe("STOP", "RESUME") as events:
                    recorder = PauseRecorder(events)
                    for _ in range(args.warmup):
                        await trigger.checkpoint()
                    first = source.committed_epoch
                    recorder.take()
                    requests: list[float] = []
                    page_bytes, wire_bytes = sender.page_bytes, sender.page_wire_bytes
                    assert standby.pid is not None
                    cpu, standby_cpu = time.process_time(), _cpu_s(standby.pid)
                    for _ in range(args.checkpoints):
                        asked = time.monotonic()
                        await trigger.checkpoint()
                        requests.append(time.monotonic() - asked)
                    cpu = (time.process_time() - cpu) / args.checkpoints
                    standby_cpu = (_cpu_s(standby.pid) - standby_cpu) / args.checkpoints
                    wire = (sender.page_wire_bytes - wire_bytes) / max(
                        sender.page_bytes - page_bytes, 1
                    )
                    pauses = recorder.take()
                    await recorder.close()
                records = [r for r in source.recent() if r.epoch > first]
            await session.close("benchmark done")
    finally:
        parent.send("stop")
        standby.join(30)
    count = statistics.mean(r.pages for r in records)
    stream = statistics.mean(r.stream_bytes for r in records) / 1024
    return records, (
        f"{memory:6d} {pages:6d} | {_p(pauses, 0.5):6.2f} {_p(pauses, 0.99):6.2f} | "
        f"{_p([r.pause_s for r in records], 0.5):6.2f} | "
        f"{_p(requests, 0.5):6.2f} {_p(requests, 0.99):6.2f} | "
        f"{_p([r.stop_s for r in records], 0.5):5.2f} "
        f"{_p([r.transfer_s for r in records], 0.5):5.2f} "
        f"{_p([r.commit_s for r in records], 0.5):5.2f} | "
        f"{count:6.0f} {stream:7.0f} | {wire:5.3f} {cpu * 1e3:6.2f} {standby_cpu * 1e3:6.2f} | "
        f"{sync.duration_s:5.1f}"
    )


HEADER = (
    "   MiB  pages |  pause p50/p99 ms | kemari | commit p50/p99 ms |  stop  xfer   ack |"
    "  pages  KiB/ck |  wire cpu ms sb cpu | sync s"
)


async def measure(args: argparse.Namespace, binary: Path, root: Path, replicas: Path) -> None:
    make_credentials(root / "pki", f"kemari-{VM}")
    creds = TlsCreds(root / "pki", f"kemari-{VM}")
    print(HEADER, flush=True)
    for memory in args.memory:
        for pages in args.pages:
            workdir = root / f"{memory}-{pages}"
            workdir.mkdir()
            replica = replicas / f"{memory}-{pages}"
            records, row = await measure_one(binary, workdir, replica, creds, memory, pages, args)
            print(row, flush=True)
            if args.timeline:
                report_timeline(records)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be positive")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=_int_list, default=[256, 1024, 2048], help="MiB list")
    parser.add_argument("--pages", type=_int_list, default=[100, 1000, 10000], help="pages list")
    parser.add_argument("--checkpoints", type=int, default=60, help="measured per row")
    parser.add_argument("--warmup", type=int, default=5, help="checkpoints before measuring")
    parser.add_argument(
        "--capability",
        dest="capabilities",
        action="append",
        default=[],
        help="session capability both sides offer (e.g. zstd-pages); repeatable",
    )
    parser.add_argument(
        "--replica-base",
        type=Path,
        default=Path("/dev/shm"),
        help="where the standby's replica directories go (default /dev/shm)",
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="after each row, the pause step by step (checkpoint_pause.py's breakdown)",
    )
    args = parser.parse_args()
    binary = patched_binary()
    print(
        f"standby in another process over TLS on loopback; {args.checkpoints} on-demand "
        f"checkpoints per row after {args.warmup}; capabilities {args.capabilities or 'none'}; "
        f"replica under {args.replica_base}"
    )
    with (
        tempfile.TemporaryDirectory(prefix="kemari-cost-") as tmp,
        tempfile.TemporaryDirectory(
            prefix="kemari-cost-replica-", dir=args.replica_base
        ) as replicas,
    ):
        asyncio.run(measure(args, binary, Path(tmp), Path(replicas)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
