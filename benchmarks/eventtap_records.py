"""Records workload under the network event-tap: client latency and throughput per sync policy.

For each mode a primary ``kemari run`` (records guest, TCG) and, when protected, a standby
``kemari run --incoming`` are started in two host namespaces of a testbed LAN; protection
starts with the monitor's ``migrate -d``; in a third namespace, for each count N of
``--clients`` (in order, on the same pair), N closed-loop clients on N TCP connections store
records as fast as they can for ``--seconds`` (kemari/testbed/records_load.py).  Printed per
mode and client count: requests/s and its ratio to the unprotected row of the same count,
client request latency p50/p99/max and stalls (requests that waited over 1 s), the
event-tap's output-commit latency (held → released, over its last 4,096 outputs) p50/p99,
checkpoints/s and the checkpoint pause p50.  Mode ``event+periodic-100-sync`` is
``event+periodic-100`` with ``--checkpoints-in-flight 0`` (the synchronous protocol), so
one run compares the pipeline with the synchronous protocol on the same host.

Also printed, to see where output-commit time goes: the checkpoint pause p50
(VMSTATE_SEND → LOADED, over the source's recent checkpoints), the pages and device-state
bytes of the last checkpoint, and the p50 of each phase of a checkpoint: ``kick`` (asking
QEMU → its CHECKPOINT_REQUEST), ``stop`` (REQUEST → VMSTATE_SEND: QEMU stops the VM and
drains its disks), ``transfer`` (VMSTATE_SEND → device state received: RAM and devices
forwarded to the standby) and ``commit`` (COMMIT → COMMIT_ACK).

Needs root, the guest image (``kemari image build``) and the patched QEMU
(``kemari qemu build``).  Usage::

    .venv/bin/python benchmarks/eventtap_records.py [--seconds 10] [--clients 1,16]
        [--modes unprotected,event+periodic-100]
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

from kemari.config import DEFAULT_CHECKPOINTS_IN_FLIGHT
from kemari.errors import KemariError
from kemari.image.disk import create_data_disk
from kemari.testbed.topology import Topology
from kemari.testbed.vm import AgentProcess
from kemari.testbed.wait import wait_for

GUEST_IP = "10.213.0.2"
PRIMARY_IP = "10.213.0.11"
STANDBY_IP = "10.213.0.12"
CLIENT_IP = "10.213.0.100"
GUEST_MAC = "52:54:00:e7:00:02"
PORT = 7100
# name: (sync policy, epoch ms, checkpoints in flight); "unprotected" runs no standby.
MODES: dict[str, tuple[str, int, int]] = {
    "unprotected": ("event+periodic", 100, DEFAULT_CHECKPOINTS_IN_FLIGHT),
    "event": ("event", 100, DEFAULT_CHECKPOINTS_IN_FLIGHT),
    "periodic-20": ("periodic", 20, DEFAULT_CHECKPOINTS_IN_FLIGHT),
    "periodic-50": ("periodic", 50, DEFAULT_CHECKPOINTS_IN_FLIGHT),
    "event+periodic-100": ("event+periodic", 100, DEFAULT_CHECKPOINTS_IN_FLIGHT),
    # The same with the synchronous protocol: the guest waits for every acknowledgement.
    "event+periodic-100-sync": ("event+periodic", 100, 0),
}


def run_mode(
    name: str,
    sync: str,
    epoch_ms: int,
    in_flight: int,
    seconds: float,
    clients: list[int],
    workdir: Path,
) -> dict[int, dict[str, Any]]:
    """One mode on a fresh testbed and fresh agents; its numbers per client count."""
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
            "--checkpoints-in-flight", str(in_flight),
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
            results: dict[int, dict[str, Any]] = {}
            for count in clients:
                before = primary.status()
                started = time.monotonic()
                load = client_ns.run(
                    [
                        sys.executable, "-m", "kemari.testbed.records_load", GUEST_IP,
                        "--clients", str(count), "--seconds", str(seconds),
                    ],
                    timeout=seconds + 120,
                )  # fmt: skip
                elapsed = time.monotonic() - started
                after = primary.status()
                results[count] = numbers(json.loads(load.stdout), before, after, elapsed)
        finally:
            for agent in agents:
                agent.stop()
            shutil.rmtree(replica, ignore_errors=True)
    return results


def numbers(
    result: dict[str, Any], before: dict[str, Any], after: dict[str, Any], elapsed: float
) -> dict[str, Any]:
    """The load's numbers plus what the primary's status says about the same interval."""
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
    parser.add_argument(
        "--clients", default="1", help="comma-separated client counts, e.g. 1,16 (default 1)"
    )
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    try:
        clients = [int(count) for count in args.clients.split(",")]
    except ValueError:
        parser.error(f"--clients takes comma-separated client counts, not {args.clients!r}")
    if not clients or min(clients) < 1:
        parser.error("--clients: each count must be at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="kemari-bench-evt-"))
    results: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        for mode in modes:
            sync, epoch_ms, in_flight = MODES[mode]
            for count, result in run_mode(
                mode, sync, epoch_ms, in_flight, args.seconds, clients, workdir
            ).items():
                results[mode, count] = result
                print(f"{mode} x{count}: {json.dumps(result)}", file=sys.stderr, flush=True)
    except KemariError as exc:  # a load that failed (a missing reply) or an agent that did
        print(f"eventtap_records: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    print(
        "| mode | clients | requests/s | latency p50 / p99 / max ms | stalls > 1 s "
        "| output-commit p50 / p99 ms | checkpoints/s | pause p50 ms | pages (last checkpoint) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (mode, count), r in results.items():
        base = results.get(("unprotected", count), {}).get("per_s")
        ratio = f" ({r['per_s'] / base:.2f}x)" if base else ""
        print(
            f"| {mode} | {count} | {r['per_s']:.0f}{ratio} | "
            f"{cell(r['p50_ms'])} / {cell(r['p99_ms'])} / {cell(r['max_ms'])} | {r['stalls']} | "
            f"{cell(r['commit_p50_ms'])} / {cell(r['commit_p99_ms'])} | "
            f"{r['checkpoints_per_s']:.1f} | {cell(r['pause_p50_ms'])} | {r['pages_last'] or '-'} |"
        )
    print()
    print("| mode | clients | kick | stop | transfer | commit (p50 ms) | device state bytes |")
    print("|---|---|---|---|---|---|---|")
    for (mode, count), r in results.items():
        if mode == "unprotected":
            continue
        phases = r["phases_ms"]
        print(
            f"| {mode} | {count} | {cell(phases['kick'])} | {cell(phases['stop'])} | "
            f"{cell(phases['transfer'])} | {cell(phases['commit'])} | {r['device_bytes_last']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
