"""NBD throughput: the same raw image read/written directly and through ``kemari nbd serve``.

Prints MB/s (10^6 bytes per second) for sequential and scattered reads and
writes with ``qemu-img bench`` (QEMU's own block layer as the client, many
requests in flight) and for whole-image copies with ``nbdcopy``.  Scattered
means 4 KiB requests with a stride of 7919 blocks (prime, so every block is
visited once per pass in a seemingly random order); ``qemu-img bench`` has no
truly random mode.  The direct runs use the host page cache
(``-t writeback``), as the server's buffered ``pread``/``pwrite`` do, so the
difference is the cost of the NBD path itself.

Usage: python benchmarks/nbd_throughput.py [--size-mib 256] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

MiB = 1024 * 1024
SCATTER_STRIDE = 4096 * 7919


@contextlib.contextmanager
def kemari_server(image: Path, socket_path: Path) -> Iterator[str]:
    """Run ``kemari nbd serve`` and yield its NBD URI."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kemari.cli.main", "nbd", "serve", str(image),
         "--socket", str(socket_path), "--export", "bench"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        if "serving" not in process.stdout.readline():
            raise SystemExit("kemari nbd serve did not start")
        yield f"nbd+unix:///bench?socket={socket_path}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def bench(target: str, *, write: bool, request: int, count: int, step: int) -> float:
    """One ``qemu-img bench`` run; returns MB/s from qemu-img's own timing."""
    cache = "none" if target.startswith("nbd") else "writeback"
    argv = ["qemu-img", "bench", "-f", "raw", "-t", cache, "-d", "32",
            "-s", str(request), "-S", str(step), "-c", str(count)]  # fmt: skip
    if write:
        argv += ["-w", "--pattern=0x5a"]
    result = subprocess.run([*argv, target], capture_output=True, text=True, check=True)
    match = re.search(r"Run completed in ([0-9.]+) seconds", result.stdout)
    if match is None:
        raise SystemExit(f"unexpected qemu-img bench output: {result.stdout!r}")
    return count * request / float(match.group(1)) / 1e6


def copy(source: str | Path, destination: str | Path, size: int) -> float:
    """One ``nbdcopy`` run; returns MB/s by wall clock."""
    started = time.perf_counter()
    subprocess.run(["nbdcopy", str(source), str(destination)], check=True)
    return size / (time.perf_counter() - started) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="image size (default 256)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        work = Path(workdir)
        image = work / "disk.raw"
        with image.open("wb") as file:
            for _ in range(args.size_mib):
                file.write(os.urandom(MiB))
        source = work / "source.raw"
        source.write_bytes(image.read_bytes())
        print(f"image: {args.size_mib} MiB raw, {os.cpu_count()} CPUs; MB/s = 10^6 bytes/s")
        print(f"{'workload':<40} {'direct file':>12} {'kemari nbd':>12} {'ratio':>7}")
        with kemari_server(image, work / "nbd.sock") as uri:
            blocks = size // 4096
            cases = [
                ("sequential read, 1 MiB x32 in flight", False, MiB, size // MiB, MiB),
                ("sequential write, 1 MiB x32 in flight", True, MiB, size // MiB, MiB),
                ("sequential read, 64 KiB x32", False, 65536, size // 65536, 65536),
                ("scattered read, 4 KiB x32", False, 4096, blocks // 4, SCATTER_STRIDE),
                ("scattered write, 4 KiB x32", True, 4096, blocks // 4, SCATTER_STRIDE),
            ]
            for label, write, request, count, step in cases:
                direct, served = (
                    bench(target, write=write, request=request, count=count, step=step)
                    for target in (str(image), uri)
                )
                print(f"{label:<40} {direct:>12.1f} {served:>12.1f} {served / direct:>7.2f}")
            copies = [
                ("nbdcopy whole image in", source, work / "copy.raw", source, uri),
                ("nbdcopy whole image out", image, work / "copy.raw", uri, work / "out.raw"),
            ]
            for label, direct_from, direct_to, served_from, served_to in copies:
                direct = copy(direct_from, direct_to, size)
                served = copy(served_from, served_to, size)
                print(f"{label:<40} {direct:>12.1f} {served:>12.1f} {served / direct:>7.2f}")


if __name__ == "__main__":
    main()
