"""``kemari nbd serve``: serve a raw disk image over NBD on a unix socket until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from kemari.nbd.backend import RawFileBackend
from kemari.nbd.server import DEFAULT_EXPORT_NAME, NbdServer


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kemari nbd``."""
    parser = subparsers.add_parser(
        "nbd",
        help="Kemari's NBD disk server",
        description="Kemari's NBD server, the one that serves guest disks to QEMU.",
    )
    nbd_commands = parser.add_subparsers(dest="nbd_command", required=True, metavar="NBDCMD")
    serve = nbd_commands.add_parser(
        "serve",
        help="serve a raw image on a unix socket until SIGINT/SIGTERM",
        description=(
            "Serve IMAGE (raw file or block device) as one NBD export on a unix socket. "
            "Clients use e.g. nbd+unix:///EXPORT?socket=SOCKET; QEMU uses "
            "-blockdev driver=nbd,server.type=unix,server.path=SOCKET,export=EXPORT."
        ),
    )
    serve.add_argument("image", type=Path, help="raw disk image or block device")
    serve.add_argument("--socket", type=Path, required=True, help="unix socket to listen on")
    serve.add_argument(
        "--export",
        default=DEFAULT_EXPORT_NAME,
        help=f"export name (default {DEFAULT_EXPORT_NAME!r}; the empty name also reaches it)",
    )
    serve.add_argument("--read-only", action="store_true", help="refuse writes with EPERM")
    serve.add_argument("--verbose", action="store_true", help="log every connection")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="kemari: %(levelname)s: %(message)s",
        )
    return asyncio.run(_run(args.image, args.socket, args.export, args.read_only))


async def _run(image: Path, socket_path: Path, export: str, read_only: bool) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # Order: the backend outlives the server (closed last, after a final flush).
    async with (
        RawFileBackend.open(image, read_only=read_only) as backend,
        NbdServer(backend, socket_path, export),
    ):
        mode = "read-only" if read_only else "read-write"
        print(
            f"kemari nbd: serving {image} ({backend.size} bytes, {mode}) "
            f"as export {export!r} on {socket_path}",
            flush=True,
        )
        await stop.wait()
    return 0
