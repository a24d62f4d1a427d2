"""Records workload under the network event-tap: client latency and throughput per sync policy.

For each mode a primary ``kemari run`` (records guest, TCG) and, when protected, a standby
``kemari run --incoming`` are started in two host namespaces of a testbed LAN; protection
starts with the monitor's ``migrate -d``; a client in a third namespace stores records as
fast as it can on one TCP connection for ``--seconds``.  Printed per mode: client request
latency p50/p99 and requests/s, the event-tap's output-commit latency (held → released)
p50/p99, and checkpoints/s.

Also printed, to see where output-commit time goes: the checkpoint pause p50
(VMSTATE_SEND → LOADED, over the source's recent checkpoints), the pages and device-state
bytes of the last checkpoint, and the p50 of each phase of a checkpoint: ``kick`` (asking
QEMU → its CHECKPOINT_REQUEST), ``stop`` (REQUEST → VMSTATE_SEND: QEMU stops the VM and
drains its disks), ``transfer`` (VMSTATE_SEND → device state received: RAM and devices
forwarded to the standby) and ``commit`` (COMMIT → COMMIT_ACK).

Needs root, the guest image (``kemari image build``) and the patched QEMU
(``kemari qemu build``).  Usage::

    .venv/bin/python benchmarks/eventtap_records.py [--seconds 10] [--modes unprotected,event]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kemari.image.disk import create_data_disk
from kemari.testbed.topology import Topology
from kemari.testbed.vm import AgentProcess

GUEST_IP = "10.213.0.2"
PRIMARY_IP = "10.213.0.11"
STANDBY_IP = "10.213.0.12"
CLIENT_IP = "10.213.0.100"
GUEST_MAC = "52:54:00:e7:00:02"
PORT = 7100
# name: (sync policy, epoch ms); "unprotected" runs no standby.
MODES: dict[str, tuple[str, int]] = {
    "unprotected": ("event+periodic", 100),
    "event": ("event", 100),
    "periodic-20": ("periodic", 20),
    "periodic-50": ("periodic", 50),
    "event+periodic-100": ("event+periodic", 100),
}

LOAD_SCRIPT = """
import json, statistics, sys, time
from kemari.testbed.records import RecordsClient
host, seconds = sys.argv[1], float(sys.argv[2])
latencies = []
with RecordsClient(host, timeout=60) as client:
    client.put("warmup")
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        sent = time.monotonic()
        client.put(f"bench-{len(latencies)}")
        latencies.append(time.monotonic() - sent)
    elapsed = time.monotonic() - started
latencies.sort()
print(json.dumps({
    "requests": len(latencies),
    "per_s": len(latencies) / elapsed,
    "p50_ms": statistics.median(latencies) * 1000,
    "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
}))
"""


def wait_for(predicate: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def run_mode(name: str, sync: str, epoch_ms: int, seconds: float, workdir: Path) -> dict[str, Any]:
    """One mode on a fresh testbed and fresh agents; returns its numbers."""
    with Topology() as lab:
        primary_ns = lab.add_host("primary", f"{PRIMARY_IP}/24")
        standby_ns = lab.add_host("standby", f"{STANDBY_IP}/24")
        client_ns = lab.add_client("client", f"{CLIENT_IP}/24")
        disk = workdir / f"{name}.img"
        create_data_disk(disk, 64)
        args = [
            "--workload", "records", "--accel", "tcg", "--guest-ip", f"{GUEST_IP}/24",
            "--disk", str(disk), "--nic", f"mac={GUEST_MAC},tap=kt-bench0,bridge=br0",
            "--sync", sync, "--epoch-ms", str(epoch_ms),
        ]  # fmt: skip
        replica = Path(f"/dev/shm/kemari-bench-{os.getpid()}-{name}")
        agents = [AgentProcess("bench", workdir, args, namespace=primary_ns, label=f"{name}-p")]
        try:
            primary = agents[0]
            primary.wait_serial(r"workload records ready")
            primary.wait_monitor()
            if name != "unprotected":
                incoming = [
                    "--incoming", f"kemari:tcp:{STANDBY_IP}:{PORT}", "--replica-dir", str(replica)
                ]  # fmt: skip
                standby = AgentProcess(
                    "bench", workdir, [*args, *incoming], namespace=standby_ns, label=f"{name}-s"
                )
                agents.append(standby)
                standby.wait_monitor()
                primary.monitor("migrate", "-d", f"kemari:tcp:{STANDBY_IP}:{PORT}")
                wait_for(lambda: primary.status()["protection"] == "protected", "protection", 120)
            before = primary.status()
            started = time.monotonic()
            load = client_ns.run(
                [sys.executable, "-c", LOAD_SCRIPT, GUEST_IP, str(seconds)], timeout=seconds + 120
            )
            elapsed = time.monotonic() - started
            after = primary.status()
        finally:
            for agent in agents:
                agent.stop()
            shutil.rmtree(replica, ignore_errors=True)
    result: dict[str, Any] = json.loads(load.stdout)
    tap = after["eventtap"]
    result["commit_p50_ms"] = tap["latency_ms_p50"]
    result["commit_p99_ms"] = tap["latency_ms_p99"]
    epochs = [
        status["replication"]["epoch"] if status["replication"] else 0 for status in (before, after)
    ]
    result["checkpoints_per_s"] = (epochs[1] - epochs[0]) / elapsed
    recent = after["replication"]["recent"] if after["replication"] else {}
    result["pause_p50_ms"] = recent.get("pause_ms_p50")
    result["device_bytes_last"] = recent.get("device_bytes_last")
    # Where one checkpoint's time goes (p50 of each phase, ms).
    result["phases_ms"] = {
        phase: recent.get(f"{phase}_ms_p50") for phase in ("kick", "stop", "transfer", "commit")
    }
    result["pages_last"] = recent.get("pages_last")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per mode")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    workdir = Path(tempfile.mkdtemp(prefix="kemari-bench-evt-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        for mode in modes:
            sync, epoch_ms = MODES[mode]
            results[mode] = run_mode(mode, sync, epoch_ms, args.seconds, workdir)
            print(f"{mode}: {json.dumps(results[mode])}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    print(
        "| mode | requests/s | latency p50 / p99 ms | output-commit p50 / p99 ms "
        "| checkpoints/s | pause p50 ms | pages (last checkpoint) |"
    )
    print("|---|---|---|---|---|---|---|")
    base = results.get("unprotected", {}).get("per_s")
    for mode, r in results.items():
        ratio = f" ({r['per_s'] / base:.2f}x)" if base else ""
        print(
            f"| {mode} | {r['per_s']:.0f}{ratio} | {cell(r['p50_ms'])} / {cell(r['p99_ms'])} | "
            f"{cell(r['commit_p50_ms'])} / {cell(r['commit_p99_ms'])} | "
            f"{r['checkpoints_per_s']:.1f} | {cell(r['pause_p50_ms'])} | {r['pages_last'] or '-'} |"
        )
    print()
    print("| mode | kick | stop | transfer | commit (p50 ms) | device state bytes |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        if mode == "unprotected":
            continue
        phases = r["phases_ms"]
        print(
            f"| {mode} | {cell(phases['kick'])} | {cell(phases['stop'])} | "
            f"{cell(phases['transfer'])} | {cell(phases['commit'])} | {r['device_bytes_last']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
