"""Automatic failover (``--ha``): chained kill -9 / takeover / rejoin rounds, timed.

The testbed of tests/test_ha_guest.py: two host namespaces, a client and three etcd
members on one LAN; both agents run the same ``kemari run ... --ha etcd://...``
command.  Each round: wait until the record says the active is protected; SIGKILL the
active's QEMU and agent; time until the standby is active by itself and until the
client (one TCP connection for the whole run) gets its next acknowledgement; start the
killed host's agent again with the same command (it rejoins as the standby).  Printed
per round and as p50/max: detection (the active's last frame → the loss noticed),
arbitration (→ ``take_over`` won; shared storage: and the old lease gone), resume
(QEMU from the replica), kill → standby active, kill → client's next ack, and the
re-protection time.  At the end every acknowledged record must be stored in order.

Needs root, the guest image and the patched QEMU.  Usage::

    .venv/bin/python benchmarks/auto_failover.py [--rounds 5] [--storage replicated]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_ha_guest import GUEST_IP, SUBNET, HaPair, protected_pair, status

from kemari.config import StorageMode
from kemari.testbed.etcd import EtcdLab
from kemari.testbed.topology import Topology
from kemari.testbed.wait import wait_for

_SPLIT = re.compile(r"detection (\d+) ms, arbitration (\d+) ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--storage", choices=StorageMode.names(), default="replicated")
    args = parser.parse_args()
    storage = StorageMode.parse(args.storage, "storage")
    rows: list[dict[str, float]] = []
    workdir = Path(tempfile.mkdtemp(prefix="kemari-auto-failover-"))
    with Topology() as topology, EtcdLab(3, subnet=SUBNET, topology=topology) as lab:
        pair = HaPair(topology, lab, workdir, storage)
        try:
            active_host, standby_host = "a", "b"
            first = pair.start_agent(active_host)
            first.wait_serial(r"workload records ready")
            first.wait_monitor()
            pair.start_client()
            pair.start_agent(standby_host).wait_monitor()
            for number in range(1, args.rounds + 1):
                active, standby = pair.agents[active_host], pair.agents[standby_host]
                started = time.monotonic()
                wait_for(lambda: protected_pair(active, standby), "protection", 300)  # noqa: B023
                protect_s = time.monotonic() - started
                acked = pair.acked()
                wait_for(lambda: pair.acked() > acked + 3, "records while protected", 60)  # noqa: B023
                acked = pair.acked()
                killed = time.monotonic()
                os.kill(status(active)["qemu_pid"], signal.SIGKILL)
                os.kill(active.process.pid, signal.SIGKILL)
                active.process.wait(30)
                wait_for(lambda: status(standby)["state"] == "active", "takeover", 60)  # noqa: B023
                active_ms = (time.monotonic() - killed) * 1000
                wait_for(lambda: pair.acked() > acked, "the client's next ack", 60)  # noqa: B023
                ack_s = time.monotonic() - killed
                after = status(standby)
                split = _SPLIT.search(after["ha"]["last_change"])
                row = {
                    "protect_s": protect_s,
                    "detect_ms": float(split.group(1)) if split else float("nan"),
                    "arbitrate_ms": float(split.group(2)) if split else float("nan"),
                    "resume_ms": float(after["failover"]["total_ms"]),
                    "active_ms": active_ms,
                    "ack_s": ack_s,
                }
                rows.append(row)
                print(
                    f"round {number}/{args.rounds} [{storage.value}]: protected in "
                    f"{protect_s:.1f} s; detection {row['detect_ms']:.0f} ms, arbitration "
                    f"{row['arbitrate_ms']:.0f} ms, resume {row['resume_ms']:.0f} ms; kill → "
                    f"active {active_ms:.0f} ms, → client's next ack {ack_s:.2f} s",
                    flush=True,
                )
                pair.start_agent(active_host).wait_monitor()  # the same command again
                active_host, standby_host = standby_host, active_host
            assert pair.client is not None and pair.client.stdin is not None
            pair.client.stdin.close()
            if pair.client.wait(180) != 0:
                print("FAILED: the client's connection did not survive")
                return 1
            acked_records = pair.acked_log.read_text().split()
            listing = pair.client_ns.run(
                [sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "get"], timeout=120
            )
            stored = [p for p in json.loads(listing.stdout) if p.startswith("ha-")]
            if stored[: len(acked_records)] != acked_records:
                print("FAILED: acknowledged records missing or out of order")
                return 1
        finally:
            pair.close()
    for key in ("protect_s", "detect_ms", "arbitrate_ms", "resume_ms", "active_ms", "ack_s"):
        values = [row[key] for row in rows]
        print(f"{key}: p50 {statistics.median(values):.2f}, max {max(values):.2f}")
    print(f"{len(acked_records)} records acknowledged, all stored in order")
    return 0


if __name__ == "__main__":
    sys.exit(main())
