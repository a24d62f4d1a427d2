"""NBD throughput: the same raw image read/written directly and through ``kemari nbd serve``.

Prints MB/s (10^6 bytes per second) for sequential and scattered reads and
writes with ``qemu-img bench`` (QEMU's own block layer as the client, many
requests in flight) and for whole-image copies with ``nbdcopy``.  Scattered
means 4 KiB requests with a stride of 7919 blocks (prime, so every block is
visited once per pass in a seemingly random order); ``qemu-img bench`` has no
truly random mode.  The direct runs use the host page cache
(``-t writeback``), as the server's buffered ``pread``/``pwrite`` do, so the
difference is the cost of the NBD path itself.  ``qemu-nbd`` on the same
image is printed as a reference for what a C server achieves here.

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


@contextlib.contextmanager
def qemu_nbd_server(image: Path, socket_path: Path) -> Iterator[str]:
    """Run ``qemu-nbd`` (the reference C server) and yield its NBD URI."""
    process = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-x", "bench", "-k", str(socket_path), "--persistent",
         "--shared=8", str(image)],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit("qemu-nbd did not start")
            time.sleep(0.05)
        yield f"nbd+unix:///bench?socket={socket_path}"
    finally:
        process.terminate()
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


CASES = [
    # label, write, request size, share of the image, step
    ("sequential read, 1 MiB x32 in flight", False, MiB, 1, MiB),
    ("sequential write, 1 MiB x32 in flight", True, MiB, 1, MiB),
    ("sequential read, 64 KiB x32", False, 65536, 1, 65536),
    ("scattered read, 4 KiB x32", False, 4096, 4, SCATTER_STRIDE),
    ("scattered write, 4 KiB x32", True, 4096, 4, SCATTER_STRIDE),
]


def run_cases(target: str, size: int) -> list[float]:
    """Every qemu-img bench case against ``target``, in MB/s."""
    return [
        bench(target, write=write, request=request, count=size // request // share, step=step)
        for _, write, request, share, step in CASES
    ]


def run_copies(work: Path, source: Path, target: str, size: int) -> list[float]:
    """Whole-image nbdcopy into and out of ``target`` (a file or an NBD URI), in MB/s."""
    return [copy(source, target, size), copy(target, work / "out.raw", size)]


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
        results = {
            "direct": run_cases(str(image), size) + run_copies(work, source, str(image), size)
        }
        for name, server in (("kemari", kemari_server), ("qemu-nbd", qemu_nbd_server)):
            with server(image, work / f"{name}.sock") as uri:
                results[name] = run_cases(uri, size) + run_copies(work, source, uri, size)
    labels = [case[0] for case in CASES] + ["nbdcopy whole image in", "nbdcopy whole image out"]
    print(f"image: {args.size_mib} MiB raw, {os.cpu_count()} CPUs; MB/s = 10^6 bytes/s")
    print(f"{'workload':<40} {'direct':>9} {'kemari':>9} {'qemu-nbd':>9} {'kemari/direct':>14}")
    for index, label in enumerate(labels):
        direct, kemari, qemu = (results[name][index] for name in ("direct", "kemari", "qemu-nbd"))
        print(f"{label:<40} {direct:>9.1f} {kemari:>9.1f} {qemu:>9.1f} {kemari / direct:>14.2f}")


if __name__ == "__main__":
    main()
