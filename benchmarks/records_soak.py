"""Records soak: hundreds of chained kill/failover rounds under one client connection.

Each round protects the running ``records`` guest with a fresh standby in the other host
namespace, SIGKILLs the active's QEMU and/or agent after a random 1-4 s and fails over
(tests/support/soak.py); the client stores records back to back on ONE TCP connection
through every round.  At the end every acknowledged record must be stored in order and
the data disk must pass ``e2fsck -fn``.  Printed: one line per round (what was killed,
time to protect, failover command time, client-visible outage), then per storage mode the
rounds, records acknowledged and failover time p50/p99/max; a failure prints its seed
and the directory with the agent and serial logs (kept).

Needs root, the guest image (``kemari image build``) and the patched QEMU
(``kemari qemu build``).  Usage::

    .venv/bin/python benchmarks/records_soak.py [--rounds 100] [--storage both] [--seed N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the soak: tests/support
from support.soak import RoundResult, SoakResult, run_soak

from kemari.config import StorageMode
from kemari.errors import KemariError


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def report(result: SoakResult, elapsed_s: float) -> None:
    print(result.summary())
    if not result.rounds:
        return
    failovers = [r.failover_ms for r in result.rounds]
    qemu = [r.qemu_ms for r in result.rounds]
    resumes = [r.resume_s for r in result.rounds]
    protects = [r.protect_s for r in result.rounds]
    print(
        f"[{result.storage.value}] failover command p99 {percentile(failovers, 0.99):.0f} ms "
        f"(QEMU part p50 {statistics.median(qemu):.0f} ms); client resumed p99 "
        f"{percentile(resumes, 0.99):.2f} s; protected in p50 {statistics.median(protects):.1f} s"
        f", max {max(protects):.1f} s; {elapsed_s:.0f} s in all"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--storage", choices=("shared", "replicated", "both"), default="both")
    parser.add_argument("--seed", type=int, default=None, help="default: the clock")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    seed = time.time_ns() if args.seed is None else args.seed
    modes = list(StorageMode) if args.storage == "both" else [StorageMode(args.storage)]
    failed = False
    for storage in modes:
        print(f"records soak [{storage.value}]: {args.rounds} rounds, seed {seed}", flush=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"kemari-soak-{storage.value}-"))
        started = time.monotonic()

        def show(result: RoundResult, storage: StorageMode = storage) -> None:
            print(result.line(args.rounds, storage), flush=True)

        try:
            result = run_soak(storage, args.rounds, seed, workdir, on_round=show)
        except KemariError as exc:
            failed = True
            print(f"FAILED [{storage.value}]: {exc}", flush=True)
            print(
                f"reproduce: {sys.executable} {sys.argv[0]} --storage {storage.value} "
                f"--rounds {args.rounds} --seed {seed}   (logs kept in {workdir})",
                flush=True,
            )
            continue
        report(result, time.monotonic() - started)
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
