"""Boot-to-workload time of a guest under ``kemari run`` (prints numbers, asserts nothing).

Usage: python benchmarks/boot_time.py [ROUNDS]
Measures, per round: agent start -> monitor answering, -> workload ready marker
on the serial console, -> first tick.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from kemari.testbed.vm import AgentProcess


def one_round(workdir: Path, index: int) -> tuple[float, float, float]:
    started = time.monotonic()
    with AgentProcess(f"boot{index}", workdir, ["--workload", "ticks", "--accel", "tcg"]) as agent:
        agent.wait_monitor()
        monitor_s = time.monotonic() - started
        agent.wait_serial(r"workload ticks ready")
        ready_s = time.monotonic() - started
        agent.wait_serial(r"tick 1\b")
        tick_s = time.monotonic() - started
    return monitor_s, ready_s, tick_s


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    samples = []
    with tempfile.TemporaryDirectory(prefix="kemari-boot-") as workdir:
        for index in range(rounds):
            samples.append(one_round(Path(workdir), index))
            print(
                f"round {index}: monitor {samples[-1][0]:.2f} s, "
                f"ready {samples[-1][1]:.2f} s, first tick {samples[-1][2]:.2f} s"
            )
    for label, column in (("monitor up", 0), ("workload ready", 1), ("first tick", 2)):
        values = [sample[column] for sample in samples]
        print(
            f"{label:>15}: median {statistics.median(values):.2f} s "
            f"(min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"
        )


if __name__ == "__main__":
    main()
