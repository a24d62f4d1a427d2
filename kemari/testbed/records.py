"""Client of the guest's ``records`` service (protocol in docs/guest.md).

Used by the tests and the demo from inside a client network namespace:
``python -m kemari.testbed.records HOST:PORT put COUNT [--prefix P]`` stores
records and prints the acknowledged ones as JSON; ``... loop [--seconds S]``
stores records back to back on one connection and prints each acknowledged
payload on its own line (for ``S`` seconds, or until its stdin reaches EOF);
``... get`` prints every stored record; ``... netstat`` prints the guest's sent-frame
count; ``... reboot`` asks the guest to reboot cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import sys
import time
from collections.abc import Sequence

from kemari.errors import KemariError
from kemari.testbed.wait import wait_for

RECORDS_PORT = 7000
MAX_REPLY_LINE = 64 * 1024
# A loop's connection lives across failovers: an answer may wait out the kill of the
# primary, the failover and the client's TCP retransmission backoff.
LOOP_TIMEOUT_S = 180.0


class RecordsError(KemariError):
    """The records service answered something unexpected, or not at all."""


class RecordsClient:
    """One TCP connection to the records service."""

    def __init__(self, host: str, port: int = RECORDS_PORT, timeout: float = 30.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._file = self._sock.makefile("rb")

    def close(self) -> None:
        """Close the connection."""
        self._file.close()
        self._sock.close()

    def __enter__(self) -> RecordsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def put(self, payload: str) -> int:
        """Store one record; returns its sequence number once it is durable in the guest."""
        if "\n" in payload or not payload:
            raise RecordsError("a record payload is one non-empty line")
        reply = self._call(f"PUT {payload}")
        kind, _, seq = reply.partition(" ")
        if kind != "OK" or not seq.isdigit():
            raise RecordsError(f"PUT answered {reply!r}")
        return int(seq)

    def get(self) -> list[str]:
        """Every stored record's payload, in order (``REC <seq> <payload>`` lines, then END)."""
        self._send("GET")
        records: list[str] = []
        while True:
            line = self._line()
            if line.startswith("END "):
                count = line[4:]
                if not count.isdigit() or int(count) != len(records):
                    raise RecordsError(f"GET ended with {line!r} after {len(records)} records")
                return records
            kind, _, rest = line.partition(" ")
            seq, _, payload = rest.partition(" ")
            if kind != "REC" or seq != str(len(records) + 1):
                raise RecordsError(f"GET answered {line!r} as record {len(records) + 1}")
            records.append(payload)

    def netstat(self) -> int:
        """Frames the guest's non-loopback interfaces have sent (sysfs ``tx_packets``)."""
        reply = self._call("NETSTAT")
        kind, _, value = reply.partition(" tx_packets=")
        if kind != "NETSTAT" or not value.isdigit():
            raise RecordsError(f"NETSTAT answered {reply!r}")
        return int(value)

    def reboot(self) -> None:
        """Ask the guest to sync its data and reboot."""
        self._send("REBOOT")
        with contextlib.suppress(RecordsError, OSError):  # the guest may go down first
            self._line()

    def _call(self, request: str) -> str:
        self._send(request)
        return self._line()

    def _send(self, request: str) -> None:
        self._sock.sendall(request.encode() + b"\n")

    def _line(self) -> str:
        line = self._file.readline(MAX_REPLY_LINE)
        if not line.endswith(b"\n"):
            raise RecordsError("the records service closed the connection mid-reply")
        return line[:-1].decode(errors="replace")


def wait_for_service(host: str, port: int = RECORDS_PORT, timeout: float = 120.0) -> None:
    """Wait until the service accepts connections."""
    last_error = ""

    def accepts() -> bool:
        nonlocal last_error
        try:
            socket.create_connection((host, port), timeout=2.0).close()
        except OSError as exc:
            last_error = str(exc)
            return False
        return True

    try:
        wait_for(accepts, f"the records service at {host}:{port}", timeout, interval=0.2)
    except KemariError as exc:
        raise RecordsError(f"records service at {host}:{port} unreachable: {last_error}") from exc


def store_loop(client: RecordsClient, prefix: str, seconds: float | None) -> None:
    """Store ``PREFIX-0``, ``PREFIX-1``, ... back to back, printing each acknowledged payload.

    Stops after ``seconds``, or (``seconds`` None) once stdin reaches EOF; a record
    in flight is always finished first, so every printed line was acknowledged.
    """
    deadline = None if seconds is None else time.monotonic() + seconds
    number = 0
    while not _loop_done(deadline):
        payload = f"{prefix}-{number}"
        client.put(payload)
        print(payload, flush=True)
        number += 1


def _loop_done(deadline: float | None) -> bool:
    if deadline is not None:
        return time.monotonic() >= deadline
    readable, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(readable) and not os.read(sys.stdin.fileno(), 4096)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry for use inside a client namespace."""
    parser = argparse.ArgumentParser(prog="python -m kemari.testbed.records")
    parser.add_argument("server", help="HOST:PORT or HOST")
    parser.add_argument("action", choices=("put", "loop", "get", "netstat", "reboot", "wait"))
    parser.add_argument("count", type=int, nargs="?", default=1)
    parser.add_argument("--prefix", default="record")
    parser.add_argument("--seconds", type=float, help="loop: stop after this long (default: EOF)")
    args = parser.parse_args(argv)
    host, _, port_text = args.server.partition(":")
    port = int(port_text) if port_text else RECORDS_PORT
    try:
        if args.action == "wait":
            wait_for_service(host, port)
            return 0
        timeout = LOOP_TIMEOUT_S if args.action == "loop" else 30.0
        with RecordsClient(host, port, timeout=timeout) as client:
            if args.action == "loop":
                store_loop(client, args.prefix, args.seconds)
            elif args.action == "put":
                acked = [
                    {"seq": client.put(f"{args.prefix}-{i}"), "payload": f"{args.prefix}-{i}"}
                    for i in range(args.count)
                ]
                print(json.dumps(acked))
            elif args.action == "get":
                print(json.dumps(client.get()))
            elif args.action == "netstat":
                print(client.netstat())
            else:
                client.reboot()
    except (OSError, KemariError) as exc:
        print(f"records: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
