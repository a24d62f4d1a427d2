"""Benchmark of the replica's checkpoint apply: ms per checkpoint and pages/s (prints numbers).

For 100, 1000 and 10000 dirty pages per checkpoint, on tmpfs (/dev/shm) and on the disk:

- stage:   put_pages() of RAM_PAGES-sized frames (up to 1024 pages, ascending page numbers
           as QEMU sends them, data back to back), what the receiver does per frame;
- ack:     commit(defer_apply=True): only up to the commit point (what the primary waits
           for when the receiver acknowledges before applying);
- apply:   the apply_pending() that follows such an ack (in place + state + mark);
- commit:  StagedCheckpoint.commit(): journal + commit record + apply in place + state;
- direct:  the same pages copied into the mapped RAM file with no journal at all (the floor
           an unprotected apply would cost).

Two patterns of dirty pages: ``scattered`` (uniformly random pages, almost no two
adjacent) and ``runs`` (runs of 16 adjacent pages at random places), since the apply
copies a run of consecutive pages at once.  Wall-clock p50/p99 and pages/s, plus the p50
of the thread's CPU time: on a loaded machine the wall numbers include preemption by
other processes, the CPU column does not (it does not include waiting for the disk
either).

Usage: .venv/bin/python benchmarks/replica_apply.py [--ram-mib 256] [--rounds 40] [--tmpfs-only]
"""

import argparse
import array
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from kemari.replica import Replica

PAGE = 4096
FRAME_PAGES = 1024  # kemari.checkpoint.sender.PAGES_PER_FRAME
RUN_PAGES = 16


def clocks() -> tuple[float, float]:
    """(wall, CPU time of this thread): CPU time excludes preemption by other processes."""
    return time.perf_counter(), time.thread_time()


def elapsed(start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    return end[0] - start[0], end[1] - start[1]


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def dirty_pages(rng: random.Random, total: int, pages: int, pattern: str) -> list[int]:
    """``pages`` distinct page numbers below ``total``, ascending (QEMU's bitmap order)."""
    if pattern == "scattered":
        return sorted(rng.sample(range(total), pages))
    starts = rng.sample(range(total // RUN_PAGES), (pages + RUN_PAGES - 1) // RUN_PAGES)
    return sorted(start * RUN_PAGES + k for start in starts for k in range(RUN_PAGES))[:pages]


def frames(numbers: list[int], pool: list[bytes]) -> list[tuple["array.array[int]", bytes]]:
    """RAM_PAGES frames of ``numbers``: page numbers and their data back to back."""
    return [
        (
            array.array("I", numbers[at : at + FRAME_PAGES]),
            b"".join(pool[n % len(pool)] for n in range(at, min(at + FRAME_PAGES, len(numbers)))),
        )
        for at in range(0, len(numbers), FRAME_PAGES)
    ]


def run(
    base: Path, ram_bytes: int, pages: int, rounds: int, pattern: str
) -> dict[str, list[tuple[float, float]]]:
    rng = random.Random(pages)
    pool = [os.urandom(PAGE) for _ in range(256)]
    directory = Path(tempfile.mkdtemp(prefix="kemari-bench-", dir=base))
    timings: dict[str, list[tuple[float, float]]] = {
        "stage": [],
        "ack": [],
        "apply": [],
        "commit": [],
        "direct": [],
    }
    try:
        replica = Replica.create(directory / "r", [("pc.ram", ram_bytes), ("vga.vram", 16 << 20)])
        epoch = 1
        # epoch 1 is the initial sync: every page once (unjournaled), as after a precopy;
        # every measured checkpoint after it is a journaled one
        with replica.begin(epoch) as staged:
            for page in range(ram_bytes // PAGE):
                staged.put_page("pc.ram", page * PAGE, pool[page % len(pool)])
            staged.set_device_state(b"\0" * 64 * 1024)
            staged.commit()
        device_state = os.urandom(96 * 1024)
        no_pages = array.array("I")
        for round_index in range(2 * rounds + 2):
            batches = frames(dirty_pages(rng, ram_bytes // PAGE, pages, pattern), pool)
            epoch += 1
            staged = replica.begin(epoch)
            started = clocks()
            for numbers, data in batches:
                staged.put_pages("pc.ram", no_pages, numbers, data)
            staged.set_device_state(device_state)
            staged_at = clocks()
            deferred = round_index % 2 == 1
            staged.commit(defer_apply=deferred)
            committed_at = clocks()
            replica.apply_pending()
            applied_at = clocks()
            if round_index < 2:
                continue  # warm-up: first touch of the journal's pages
            timings["stage"].append(elapsed(started, staged_at))
            if deferred:
                timings["ack"].append(elapsed(staged_at, committed_at))
                timings["apply"].append(elapsed(committed_at, applied_at))
            else:
                timings["commit"].append(elapsed(staged_at, committed_at))
        # The floor: the same copies into the replica's own (already populated) mapping.
        mapped = replica.ram_file(0).map
        for _ in range(rounds):
            offsets = dirty_pages(rng, ram_bytes // PAGE, pages, pattern)
            started = clocks()
            for number, page in enumerate(offsets):
                at = page * PAGE
                mapped[at : at + PAGE] = pool[number % len(pool)]
            timings["direct"].append(elapsed(started, clocks()))
        replica.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--disk-dir", default=tempfile.gettempdir())
    parser.add_argument("--tmpfs-only", action="store_true", help="skip the disk rows")
    args = parser.parse_args()
    locations = {"tmpfs": Path("/dev/shm"), "disk": Path(args.disk_dir)}
    if args.tmpfs_only:
        del locations["disk"]
    print(f"guest RAM {args.ram_mib} MiB, {args.rounds} checkpoints per mode, device state 96 KiB")
    header = (
        f"{'where':6} {'pattern':9} {'pages':>6} {'what':7} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'pages/s':>12} {'cpu p50 ms':>11}"
    )
    print(header)
    print("-" * len(header))
    for where, base in locations.items():
        for pattern, pages in [(p, n) for p in ("scattered", "runs") for n in (100, 1000, 10000)]:
            rounds = args.rounds if pages < 10000 else max(4, args.rounds // 4)
            timings = run(base, args.ram_mib << 20, pages, rounds, pattern)
            for what in ("stage", "ack", "apply", "commit", "direct"):
                wall = [sample[0] for sample in timings[what]]
                cpu = [sample[1] for sample in timings[what]]
                rate = pages / statistics.median(wall)
                print(
                    f"{where:6} {pattern:9} {pages:6d} {what:7} {percentile(wall, 0.5) * 1e3:8.3f} "
                    f"{percentile(wall, 0.99) * 1e3:8.3f} {rate:12,.0f} "
                    f"{percentile(cpu, 0.5) * 1e3:11.3f}"
                )


if __name__ == "__main__":
    main()
