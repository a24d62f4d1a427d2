"""``kemari net bridge``: run the guest-NIC bridge on its own (QEMU stream socket <-> tap)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from pathlib import Path

from kemari.net.bridge import NetBridge
from kemari.net.stream import QEMU_MAX_FRAME


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kemari net``."""
    parser = subparsers.add_parser(
        "net",
        help="guest network plumbing",
        description="Guest network plumbing: the bridge between QEMU's stream netdev and a tap.",
    )
    net_commands = parser.add_subparsers(dest="net_command", required=True, metavar="NETCMD")
    bridge = net_commands.add_parser(
        "bridge",
        help="carry a QEMU -netdev stream NIC to a host tap until SIGINT/SIGTERM",
        description=(
            "Listen on SOCKET for QEMU (-netdev stream,server=off,addr.type=unix,addr.path=SOCKET) "
            "and move its frames to and from a new tap. On exit prints the frame counters as JSON."
        ),
    )
    bridge.add_argument("--socket", type=Path, required=True, help="unix socket QEMU connects to")
    bridge.add_argument("--tap", required=True, help="name of the tap to create (<= 15 chars)")
    bridge.add_argument("--bridge", help="host bridge the tap joins, e.g. br0")
    bridge.add_argument(
        "--max-frame",
        type=int,
        default=QEMU_MAX_FRAME,
        help=f"longest frame accepted either way (default {QEMU_MAX_FRAME}, QEMU's limit)",
    )
    bridge.set_defaults(func=_bridge)


def _bridge(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="kemari: %(levelname)s: %(message)s")
    return asyncio.run(_run_bridge(NetBridge(args.socket, args.tap, args.bridge, args.max_frame)))


async def _run_bridge(bridge: NetBridge) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await bridge.start()
    try:
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(bridge.wait_stopped())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
    finally:
        await bridge.close()
        print(json.dumps(bridge.counters.as_dict()), flush=True)
    if bridge.failure is not None:
        raise bridge.failure
    return 0
