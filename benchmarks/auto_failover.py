"""Automatic failover (``--ha``): chained kill -9 / takeover / rejoin rounds, timed.

The lab of the HA guest tests (tests/support/ha_pair.py): two host namespaces, a
client and three etcd members on one LAN; both agents run the same ``kemari run ...
--ha etcd://...`` command.  Per storage mode, one VM and one client connection for all
its rounds.  Each round: wait until the record says the active is protected; SIGKILL
the active's QEMU and agent; time until the standby is active by itself and until the
client gets its next acknowledgement; check every acknowledged record is stored in
order; start the killed host's agent again with the same command (it rejoins as the
standby), so the rounds go back and forth.  Printed per round and as p50/max per mode:
detection (the active's last frame → the loss noticed), arbitration (→ ``take_over``
won; shared storage: and the old lease gone), resume (QEMU from the replica), kill →
standby active, kill → client's next ack, and the re-protection time.  At the end of a
mode the client's connection must have survived, every acknowledged record be stored
in order, and every image pass a journal replay and ``e2fsck -fn``.

Needs root, the guest image and the patched QEMU.  Usage::

    .venv/bin/python benchmarks/auto_failover.py [--rounds 20] [--storage both]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/support
from support.ha_pair import HaLab, HaPair, Takeover, kill_and_take_over

from kemari.config import StorageMode
from kemari.errors import KemariError

_COLUMNS = {
    "detect_ms": "detection ms",
    "arbitrate_ms": "arbitration ms",
    "resume_ms": "resume ms",
    "active_ms": "kill → standby active ms",
    "ack_s": "kill → client's next ack s",
    "protect_s": "re-protection s (rounds 2 on)",
}


def _rounds(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of rounds ≥ 1")
    return int(text)


def run_mode(lab: HaLab, storage: StorageMode, rounds: int) -> list[Takeover]:
    """``rounds`` takeovers back and forth on one VM; the checks of the module docstring."""
    workdir = Path(tempfile.mkdtemp(prefix=f"kemari-auto-failover-{storage.value}-"))
    pair = HaPair(lab, workdir, storage, f"bench-{storage.value}")
    results: list[Takeover] = []
    try:
        pair.boot()
        active_host, standby_host = "a", "b"
        for number in range(1, rounds + 1):
            took = kill_and_take_over(pair, active_host, standby_host)
            checked = pair.check_acked_stored()
            results.append(took)
            print(
                f"round {number}/{rounds} [{storage.value}] {active_host} → {standby_host}: "
                f"protected in {took.protect_s:.1f} s; detection {took.detect_ms:.0f} ms, "
                f"arbitration {took.arbitrate_ms:.0f} ms, resume {took.resume_ms:.0f} ms; "
                f"kill → active {took.active_ms:.0f} ms, → client's next ack "
                f"{took.ack_s:.2f} s; {checked} records stored in order",
                flush=True,
            )
            pair.start_agent(active_host).wait_monitor()  # the same command again
            active_host, standby_host = standby_host, active_host
        acked = pair.finish_client()
        pair.agents[standby_host].stop()
        pair.agents[active_host].stop()
    finally:
        pair.close()
    pair.check_images()
    print(f"[{storage.value}] {acked} records acknowledged, all stored in order; e2fsck clean")
    return results


def summary(storage: StorageMode, results: list[Takeover]) -> None:
    print(f"[{storage.value}] {len(results)} takeovers:")
    for field, label in _COLUMNS.items():
        # The first round's protection was waited for at boot: it re-protects nothing.
        counted = results[1:] if field == "protect_s" and len(results) > 1 else results
        values = [getattr(took, field) for took in counted]
        print(f"  {label}: p50 {statistics.median(values):.2f}, max {max(values):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=_rounds, default=20, help="takeovers per mode")
    parser.add_argument("--storage", choices=[*StorageMode.names(), "both"], default="both")
    args = parser.parse_args()
    modes = (
        list(StorageMode)
        if args.storage == "both"
        else [StorageMode.parse(args.storage, "storage")]
    )
    results: dict[StorageMode, list[Takeover]] = {}
    try:
        with HaLab() as lab:
            for storage in modes:
                results[storage] = run_mode(lab, storage, args.rounds)
    except KemariError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    for storage, takeovers in results.items():
        summary(storage, takeovers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
