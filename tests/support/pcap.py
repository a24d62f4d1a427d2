"""Captures of the guest's frames with tcpdump, and reading them back (classic pcap)."""

from __future__ import annotations

import contextlib
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

from kemari.testbed.topology import Namespace


@contextlib.contextmanager
def capture(
    namespace: Namespace, interface: str, path: Path, mac: str, *, inbound_only: bool = False
) -> Iterator[Path]:
    """tcpdump of every frame from ``mac`` on ``interface`` into ``path``, each written at
    once; ``inbound_only`` (``-Q in``): on a LAN port, what that host sent, not the floods
    to it."""
    direction = ["-Q", "in"] if inbound_only else []
    process = namespace.popen(
        ["tcpdump", "--immediate-mode", *direction, "-i", interface, "-U", "-w", str(path),
         "ether", "src", mac],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    process.stderr.readline()  # "listening on ...": the capture is armed
    try:
        yield path
    finally:
        process.terminate()
        process.wait(10)


def pcap_records(path: Path) -> list[tuple[float, bytes]]:
    """(wall-clock time, frame) of each frame in a classic pcap file."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    assert struct.unpack_from("<I", data)[0] == 0xA1B2C3D4
    frames = []
    position = 24
    while position + 16 <= len(data):
        seconds, micros, captured, _ = struct.unpack_from("<IIII", data, position)
        frames.append((seconds + micros / 1e6, data[position + 16 : position + 16 + captured]))
        position += 16 + captured
    return frames
