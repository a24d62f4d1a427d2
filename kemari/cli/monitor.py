"""``kemari monitor SOCKET CMD...``: talk to a running agent, like QEMU's HMP."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from kemari.errors import MonitorError
from kemari.monitor.client import run_command


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kemari monitor``."""
    parser = subparsers.add_parser(
        "monitor",
        help="send a command to a running Kemari agent",
        description="Send one command to a Kemari agent's monitor, e.g. 'info status' or 'quit'.",
    )
    parser.add_argument("socket", type=Path, help="the agent's monitor socket")
    # REMAINDER: command words may look like flags (``migrate -d kemari:tcp:...``).
    parser.add_argument(
        "words", nargs=argparse.REMAINDER, metavar="CMD", help="command words, e.g. info status"
    )
    parser.add_argument("--json", action="store_true", help="print the machine-readable reply")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a reply")
    parser.set_defaults(func=_monitor)


def _monitor(args: argparse.Namespace) -> int:
    if not args.words:
        raise MonitorError("no command given (try 'help')")
    try:
        status = _command(args)
        # Inside the try: a reader that went away must be noticed here, not by the
        # interpreter's final flush.
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader closed the pipe (``kemari monitor ... | head``): the rest of the
        # output is not wanted.  As Python's signal docs ("Note on SIGPIPE") advise,
        # point stdout at /dev/null so the flush at exit does not fail again, and exit
        # with Python's own status for EPIPE.  SIGPIPE stays ignored: the monitor
        # socket must not kill the process.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    return status


def _command(args: argparse.Namespace) -> int:
    reply = run_command(args.socket, args.words, timeout=args.timeout)
    print(json.dumps(reply.data, indent=2) if args.json else reply.text)
    if args.words[0] == "migrate" and "-d" not in args.words[1:]:
        # Like QEMU's HMP migrate without -d: stay and show the initial sync.
        return _follow_initial_sync(args.socket, args.timeout)
    return 0


def _follow_initial_sync(socket: Path, timeout: float) -> int:
    """Draw progress bars of the initial sync until the VM is protected (0) or not (1).

    First the RAM sync; with ``replicated`` storage, then the disks' initial copy (the
    standby refuses to fail over until it is complete).
    """
    while True:
        status = run_command(socket, ["query-status"], timeout=timeout).data
        replication = status.get("replication") or {}
        state = status.get("protection")
        progress = replication.get("sync_progress")
        if progress and progress.get("ram_bytes"):
            done = progress["received_bytes"] / progress["ram_bytes"]
            _draw("RAM ", done, f"{progress['rate_bytes_per_s'] / 2**20:7.1f} MiB/s")
        if state in ("protected", "copying-disks"):
            break
        if state == "unprotected":
            reason = replication.get("reason") or "protection ended"
            print(f"\ninitial sync failed: {reason}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    if state == "copying-disks":  # replicated storage: not protected before the disks are
        print(f"\nRAM synced to {replication.get('peer')}; copying the disks")
    else:
        print(f"\nprotected by {replication.get('peer')} (epoch {replication.get('epoch')})")
    copies = status.get("disk_copy") or []
    while copies:
        committed = sum(copy["committed_bytes"] for copy in copies)
        total = sum(copy["total_bytes"] for copy in copies)
        _draw(
            "disk", committed / total if total else 1.0, f"{committed >> 20} of {total >> 20} MiB"
        )
        if all(copy["done"] for copy in copies):
            print("\ndisks copied: the standby can take over")
            return 0
        if status.get("protection") not in ("protected", "copying-disks"):
            print("\ndisk copy stopped: protection ended", file=sys.stderr)
            return 1
        time.sleep(0.2)
        status = run_command(socket, ["query-status"], timeout=timeout).data
        copies = status.get("disk_copy") or []
    return 0


def _draw(label: str, fraction: float, detail: str) -> None:
    width = 40
    fraction = min(max(fraction, 0.0), 1.0)
    bar = "#" * int(fraction * width)
    print(f"\r{label} [{bar:<{width}}] {fraction:4.0%} {detail}", end="", flush=True)
