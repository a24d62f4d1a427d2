"""Closed-loop load on the guest's ``records`` service: N connections, one PUT in flight each.

Each connection sends ``PUT <payload>`` and waits for its ``OK <seq>`` before the next one,
for ``--seconds``; all connections run in one asyncio loop.  Printed as one JSON line:
requests, requests/s, the request latency p50/p99 and max over every connection, and
``stalls``, the requests that waited longer than 1 s (a percentile hides a lone stall).
Used by the benchmarks from inside a client namespace::

    python -m kemari.testbed.records_load HOST[:PORT] --clients 16 [--seconds 10] [--check N]

A reply missing for 60 s ends the load (exit 1) with one line naming the connection, its
request, its client port (to find it in a capture) and how many requests the other
connections completed while it waited: none means the whole service stalled, some means
that one connection did.

``--check N`` stores N records one by one before the load and fails (exit 1, one line)
when any of them takes longer than ``--check-timeout`` seconds: a protected pair that
cannot answer promptly is found before it is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Sequence

from kemari.testbed.records import MAX_REPLY_LINE, RECORDS_PORT

# A request slower than this is counted as a stall, apart from the percentiles.
STALL_S = 1.0
REPLY_TIMEOUT_S = 60.0


class LoadError(Exception):
    """A reply was wrong or missing, or a check request was too slow."""


class ReplyMissing(LoadError):
    """A PUT got no reply within its timeout."""


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What one load run measured."""

    requests: int
    seconds: float
    latencies_s: tuple[float, ...]

    @property
    def per_s(self) -> float:
        """Requests per second over the run."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def stalls(self) -> int:
        """Requests that waited longer than STALL_S for their reply."""
        return sum(1 for latency in self.latencies_s if latency > STALL_S)

    def summary(self) -> dict[str, float]:
        """requests, per_s, p50_ms, p99_ms, max_ms and stalls, for the benchmark's JSON line."""
        return {
            "requests": self.requests,
            "per_s": self.per_s,
            "p50_ms": percentile(self.latencies_s, 0.50) * 1000,
            "p99_ms": percentile(self.latencies_s, 0.99) * 1000,
            "max_ms": max(self.latencies_s, default=0.0) * 1000,
            "stalls": self.stalls,
        }


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank ``fraction`` percentile of ``values`` (0.0 when there are none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, int(len(ordered) * fraction)))
    return ordered[rank]


class _Connection:
    """One records connection with a PUT that waits for its reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        # The client's port, to find this connection in a capture.
        self._local_port: int = writer.get_extra_info("sockname")[1]

    @classmethod
    async def open(cls, host: str, port: int, timeout_s: float) -> _Connection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=MAX_REPLY_LINE), timeout_s
        )
        return cls(reader, writer)

    async def put(self, payload: str, timeout_s: float) -> None:
        self._writer.write(f"PUT {payload}\n".encode())
        await self._writer.drain()
        try:
            line = await asyncio.wait_for(self._reader.readline(), timeout_s)
        except TimeoutError:
            raise ReplyMissing(
                f"PUT {payload} got no reply within {timeout_s:g} s "
                f"(client port {self._local_port})"
            ) from None
        except ValueError:  # StreamReader's limit: no newline within MAX_REPLY_LINE bytes
            raise LoadError(f"PUT {payload} answered over {MAX_REPLY_LINE} bytes") from None
        if not line.startswith(b"OK ") or not line.endswith(b"\n"):
            raise LoadError(f"PUT {payload} answered {line[:200]!r}")

    def close(self) -> None:
        self._writer.close()


async def check(host: str, port: int, count: int, timeout_s: float) -> list[float]:
    """Store ``count`` records one by one; LoadError if one takes longer than ``timeout_s``."""
    connection = await _Connection.open(host, port, timeout_s)
    latencies: list[float] = []
    try:
        for number in range(count):
            sent = time.monotonic()
            try:
                await connection.put(f"check-{number}", timeout_s)
            except ReplyMissing as exc:
                raise LoadError(
                    f"check request {number + 1} of {count} got no reply within {timeout_s:g} s"
                ) from exc
            latencies.append(time.monotonic() - sent)
    finally:
        connection.close()
    return latencies


async def run_load(
    host: str, port: int, clients: int, seconds: float, reply_timeout_s: float = REPLY_TIMEOUT_S
) -> LoadResult:
    """``clients`` connections storing records back to back for ``seconds``; LoadError
    when a reply is missing for ``reply_timeout_s`` (the other connections are stopped)."""
    connections = [await _Connection.open(host, port, reply_timeout_s) for _ in range(clients)]
    latencies: list[float] = []
    try:
        for index, connection in enumerate(connections):  # warm every connection up
            await connection.put(f"warmup-{index}", reply_timeout_s)
        started = time.monotonic()
        deadline = started + seconds

        async def loop(index: int, connection: _Connection) -> None:
            number = 0
            while time.monotonic() < deadline:
                sent = time.monotonic()
                done_before = len(latencies)
                try:
                    await connection.put(f"load-{index}-{number}", reply_timeout_s)
                except ReplyMissing as missing:
                    raise LoadError(
                        f"connection {index}: {missing}, {time.monotonic() - started:.1f} s "
                        f"into the load; the other {clients - 1} connection(s) completed "
                        f"{len(latencies) - done_before} request(s) meanwhile"
                    ) from None
                latencies.append(time.monotonic() - sent)
                number += 1

        try:
            async with asyncio.TaskGroup() as group:
                for index, connection in enumerate(connections):
                    group.create_task(loop(index, connection))
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None
        elapsed = time.monotonic() - started
    finally:
        for connection in connections:
            connection.close()
    return LoadResult(len(latencies), elapsed, tuple(latencies))


def _server(text: str) -> tuple[str, int]:
    host, _, port = text.partition(":")
    if not host or (port and not port.isdigit()):
        raise argparse.ArgumentTypeError(f"expected HOST or HOST:PORT, got {text!r}")
    return host, int(port) if port else RECORDS_PORT


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry for use inside a client namespace."""
    parser = argparse.ArgumentParser(prog="python -m kemari.testbed.records_load")
    parser.add_argument("server", type=_server, help="HOST or HOST:PORT")
    parser.add_argument("--clients", type=int, default=1, help="connections (default 1)")
    parser.add_argument("--seconds", type=float, default=10.0, help="load time (default 10)")
    parser.add_argument("--check", type=int, default=0, help="check requests before the load")
    parser.add_argument("--check-timeout", type=float, default=1.0, help="seconds per check")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.check < 0 or args.check_timeout <= 0:
        parser.error("--clients must be >= 1; --seconds and --check-timeout > 0; --check >= 0")
    host, port = args.server
    try:
        if args.check:
            asyncio.run(check(host, port, args.check, args.check_timeout))
        result = asyncio.run(run_load(host, port, args.clients, args.seconds))
    except (OSError, TimeoutError, LoadError) as exc:
        print(f"records_load: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
