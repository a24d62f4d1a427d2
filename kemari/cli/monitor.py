"""``kemari monitor SOCKET CMD...``: talk to a running agent, like QEMU's HMP."""

from __future__ import annotations

import argparse
import json
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
    reply = run_command(args.socket, args.words, timeout=args.timeout)
    print(json.dumps(reply.data, indent=2) if args.json else reply.text)
    return 0
