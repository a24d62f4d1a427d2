"""Throughput and latency of the ft-transaction protocol for 4 KiB page batches.

Prints, for several batch sizes:
- encode + decode in memory: MB/s of page data and frames/s, with the payload crc32
  (row "codec", plain TCP sessions) and without it (row "no-crc", TLS sessions, which
  negotiate ``no-payload-crc``);
- whole checkpoints over loopback TCP (BEGIN, page batches, device state, COMMIT, then
  wait for COMMIT_ACK) with the real session layer, the standby in its own process:
  p50/p99 latency and MB/s, and the tail from the last page batch to COMMIT_ACK (what
  a checkpoint adds to the pause when pages are forwarded while QEMU still streams).
  Page data is prepared before the clock starts.
- the same checkpoints over mutually authenticated TLS 1.3 (credentials from
  ``kemari pki``), row "tls" under each "tcp" row: the cost of encryption on the
  checkpoint path, less the payload crc32 a TLS session does not compute.

Usage: .venv/bin/python benchmarks/transaction_throughput.py [--pages 1000] [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
import zlib
from multiprocessing.connection import Connection
from pathlib import Path

from kemari.config import TlsCreds
from kemari.stream.format import PAGE_SIZE
from kemari.transaction.pki import make_credentials
from kemari.transaction.session import Committed, Identity, PrimarySession, StandbySession
from kemari.transaction.transport import Listener, connect
from kemari.transaction.wire import (
    Begin,
    DeviceState,
    FrameDecoder,
    FrameEncoder,
    RamBlock,
    RamBlocks,
    RamPages,
    page_indices,
)

MIB = 1 << 20
IDENTITY = Identity("bench", bytes(32))
BLOCK = RamBlock("pc.ram", 256 * MIB)
DEVICE_STATE = os.urandom(64 << 10)


def _batches(pages: int, batch: int, epoch: int) -> list[RamPages]:
    data = os.urandom(pages * PAGE_SIZE)
    stride = BLOCK.size // PAGE_SIZE // pages
    result = []
    for start in range(0, pages, batch):
        count = min(batch, pages - start)
        indices = page_indices([(start + n) * stride for n in range(count)])
        chunk = data[start * PAGE_SIZE : (start + count) * PAGE_SIZE]
        result.append(RamPages(epoch, 0, indices, page_indices(()), chunk))
    return result


def bench_codec(pages: int, batch: int, *, payload_crc: bool, seconds: float = 1.0) -> None:
    batches = _batches(pages, batch, 1)
    encoder = FrameEncoder()
    decoder = FrameDecoder()
    encoder.payload_crc = decoder.payload_crc = payload_crc
    frames = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for item in batches:
            parts = encoder.encode(item)
            # One buffer per frame, as the reader receives them (header, then payload).
            decoder.feed(bytes(parts[0]))
            decoder.feed(b"".join(parts[1:]))
            frames += 1
    elapsed = time.perf_counter() - start
    rate = frames * batch * PAGE_SIZE / elapsed / MIB
    label = "codec" if payload_crc else "no-crc"
    print(f"  {label:7s} batch {batch:5d}: {rate:8.0f} MB/s  {frames / elapsed:9.0f} frames/s")


async def _standby(listener_uri: str, ready: Connection, tls: TlsCreds | None) -> None:
    """The standby end, run in its own process as it would be on its own host."""
    listener = Listener(listener_uri, tls=tls)
    await listener.start()
    ready.send(str(listener.bound))
    transport = await listener.accept()
    session = await StandbySession.handshake(transport, IDENTITY, timeout=5)
    try:
        while True:
            event = await session.receive()
            if isinstance(event, Committed):
                await session.acknowledge(event)
            elif not isinstance(event, Begin | RamBlocks | RamPages | DeviceState):
                return
    finally:
        await transport.close()
        await listener.close()


def _run_standby(ready: Connection, tls: TlsCreds | None) -> None:
    asyncio.run(_standby("kemari:tcp:127.0.0.1:0", ready, tls))


async def _checkpoint_loop(
    uri: str, pages: int, batch: int, rounds: int, tls: TlsCreds | None
) -> tuple[list[float], list[float]]:
    """Per checkpoint: BEGIN..COMMIT_ACK, and the tail from the last page batch to the ack."""
    transport = await connect(uri, timeout=5, tls=tls)
    session = await PrimarySession.handshake(transport, IDENTITY, timeout=5)
    await session.send(Begin(0))
    await session.send(RamBlocks(0, (BLOCK,)))
    await session.commit(timeout=5)
    latencies = []
    tails = []
    for epoch in range(1, rounds + 1):
        batches = _batches(pages, batch, epoch)
        started = time.perf_counter()
        await session.send(Begin(epoch))
        for item in batches:
            await session.send(item)
        last_batch_sent = time.perf_counter()
        await session.send(DeviceState(epoch, DEVICE_STATE))
        await session.commit(timeout=5)
        done = time.perf_counter()
        latencies.append(done - started)
        tails.append(done - last_batch_sent)
    await session.close("benchmark done")
    return latencies, tails


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = sorted(x * 1000 for x in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, int(len(ms) * 0.99))]


def bench_tcp(pages: int, batch: int, rounds: int, tls: TlsCreds | None = None) -> None:
    receive_end, send_end = multiprocessing.Pipe(duplex=False)
    standby = multiprocessing.Process(target=_run_standby, args=(send_end, tls))
    standby.start()
    try:
        uri = receive_end.recv()
        latencies, tails = asyncio.run(_checkpoint_loop(uri, pages, batch, rounds, tls))
    finally:
        standby.join(timeout=10)
        if standby.is_alive():
            standby.kill()
    p50, p99 = _percentiles(latencies)
    tail50, tail99 = _percentiles(tails)
    volume = pages * PAGE_SIZE + len(DEVICE_STATE)
    rate = volume * len(latencies) / sum(latencies) / MIB
    label = "tls" if tls else "tcp"
    print(
        f"  {label:7s} batch {batch:5d}: BEGIN..COMMIT_ACK p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
        f"  {rate:5.0f} MB/s; last batch..COMMIT_ACK p50 {tail50:6.2f} ms  p99 {tail99:6.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=1000, help="dirty pages per checkpoint")
    parser.add_argument("--rounds", type=int, default=200, help="checkpoints over TCP")
    args = parser.parse_args()
    sample = os.urandom(4 * MIB)
    started = time.perf_counter()
    for _ in range(20):
        zlib.crc32(sample)
    crc_rate = 80 / (time.perf_counter() - started)
    print(f"zlib.crc32 alone: {crc_rate:.0f} MB/s")
    for batch in (1, 64, 256, 1000):
        bench_codec(args.pages, batch, payload_crc=True)
        bench_codec(args.pages, batch, payload_crc=False)
    with tempfile.TemporaryDirectory() as directory:
        make_credentials(Path(directory), "kemari-bench")
        tls = TlsCreds(Path(directory), "kemari-bench")
        for pages in sorted({10, 100, args.pages}):
            print(f"{pages} dirty pages + 64 KiB device state per checkpoint, loopback:")
            for batch in (64, 256):
                bench_tcp(pages, batch, args.rounds)
                bench_tcp(pages, batch, args.rounds, tls)


if __name__ == "__main__":
    main()
