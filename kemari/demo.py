"""The demo: a guest under Kemari on one machine, reached by a client over a real network.

It builds a small lab of network namespaces (a hypervisor-like host with a
bridge, and a client), boots the ``records`` guest under ``kemari run`` inside
the host (disk served by Kemari over NBD, NIC carried by Kemari to a tap on the
host bridge), and shows a client storing records and reading them back.
Everything it creates is removed when it ends, also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from kemari.errors import KemariError
from kemari.image.builder import build_image
from kemari.image.disk import create_data_disk
from kemari.testbed.topology import Namespace, Topology
from kemari.testbed.vm import AgentProcess

GUEST_IP = "10.213.0.2"
CLIENT_IP = "10.213.0.100"


def step(message: str) -> None:
    """Print one demo step."""
    print(f"\n==> {message}", flush=True)


def run_demo(records_count: int = 20, keep_running: bool = False) -> int:
    """Run the demo; returns the exit status."""
    if os.geteuid() != 0:
        raise KemariError("the demo needs root (network namespaces and tap devices)")
    step("guest image (kernel from Debian's linux-image-cloud-amd64, busybox initramfs)")
    image = build_image()
    print(f"    kernel {image.kernel_version}: {image.kernel}")
    with tempfile.TemporaryDirectory(prefix="kemari-demo-") as workdir_name, Topology() as lab:
        workdir = Path(workdir_name)
        step("lab network: namespaces 'host' (bridge br0) and 'client', joined by a LAN bridge")
        host = lab.add_host("host")
        client = lab.add_client("client", f"{CLIENT_IP}/24")
        print(f"    host ns {host.name}; client ns {client.name} ({CLIENT_IP})")
        step("data disk: 64 MiB ext4 image, served to the guest by Kemari's NBD server")
        disk = workdir / "data.img"
        create_data_disk(disk, 64)
        step(f"kemari run: 'records' guest at {GUEST_IP}, NIC via Kemari to tap kt-demo0 on br0")
        args = [
            "--workload", "records", "--guest-ip", f"{GUEST_IP}/24",
            "--disk", str(disk), "--nic", "tap=kt-demo0,bridge=br0",
        ]  # fmt: skip
        started = time.monotonic()
        with AgentProcess("demo", workdir, args, namespace=host) as agent:
            agent.wait_serial(r"workload records ready")
            print(f"    guest ready after {time.monotonic() - started:.1f} s")
            print("    " + agent.monitor("info", "status").text.replace("\n", "\n    "))
            step(f"client {CLIENT_IP} stores {records_count} records in the guest")
            acked = _records(client, "put", str(records_count), "--prefix", "demo")
            print(f"    acknowledged: {acked[0]['payload']} .. {acked[-1]['payload']}")
            step("client reads every record back")
            stored = _records(client, "get")
            print(f"    {len(stored)} records stored: {stored[:3]} ...")
            if stored != [entry["payload"] for entry in acked]:
                raise KemariError("the guest returned different records than it acknowledged")
            print("\n    the guest console (last lines):")
            for line in agent.serial_text().splitlines()[-5:]:
                print(f"    | {line}")
            if keep_running:
                step(f"VM left running; try: kemari monitor {agent.monitor_path} info status")
                agent.process.wait()
            step("stopping the VM")
            status = agent.stop()
        print(f"\ndemo finished (agent exit status {status}); lab removed")
        return status


def _records(client: Namespace, *args: str) -> list[dict[str, object]]:
    command = [sys.executable, "-m", "kemari.testbed.records", GUEST_IP]
    client.run([*command, "wait"], timeout=180)
    result = client.run([*command, *args], timeout=180)
    data: list[dict[str, object]] = json.loads(result.stdout)
    return data
