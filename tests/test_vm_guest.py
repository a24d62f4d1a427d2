"""Real guests under ``kemari run``: the console, the NBD disk, the network path, the monitor."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kemari.image.disk import create_data_disk
from kemari.testbed.topology import Namespace, Topology
from kemari.testbed.vm import AgentProcess

pytestmark = [pytest.mark.guest, pytest.mark.root, pytest.mark.usefixtures("guest_image")]

GUEST_IP = "10.213.0.2"
CLIENT_IP = "10.213.0.100"


def records(client_ns: Namespace, *args: str) -> Any:
    command = [sys.executable, "-m", "kemari.testbed.records", GUEST_IP, *args]
    result = client_ns.run(command, timeout=180)
    return json.loads(result.stdout) if result.stdout.strip() else None


def test_ticks_guest_boots_and_counts(tmp_path: Path) -> None:
    with AgentProcess("ticks", tmp_path, ["--workload", "ticks", "--accel", "tcg"]) as agent:
        agent.wait_serial(r"tick 5\b")
        agent.wait_monitor()
        status = agent.status()
        assert status["vm"] == "running"
        assert status["accel"] == "tcg"
        first = agent.wait_serial(r"tick (\d+)", after=len(agent.serial_text()))
        later = agent.wait_serial(r"tick (\d+)", after=first.end() + 200)
        assert int(later.group(1)) > int(first.group(1))
        assert agent.monitor("quit").text.startswith("stopping")
        assert agent.process.wait(60) == 0
    # Everything but the serial log is gone: sockets, lock, runtime directory.
    assert not agent.runtime_dir.exists()


@pytest.fixture
def lab() -> Iterator[Topology]:
    with Topology() as topology:
        yield topology


def test_records_over_the_network_survive_a_guest_reboot(tmp_path: Path, lab: Topology) -> None:
    host = lab.add_host("host")
    client = lab.add_client("client", f"{CLIENT_IP}/24")
    disk = tmp_path / "data.img"
    create_data_disk(disk, 64)
    args = [
        "--workload", "records", "--accel", "tcg", "--guest-ip", f"{GUEST_IP}/24",
        "--disk", str(disk), "--nic", "tap=kt-rec0,bridge=br0",
    ]  # fmt: skip
    with AgentProcess("records", tmp_path, args, namespace=host) as agent:
        agent.wait_serial(r"workload records ready")
        records(client, "wait")
        acked = records(client, "put", "50", "--prefix", "before")
        assert [r["payload"] for r in acked] == [f"before-{i}" for i in range(50)]
        assert records(client, "get") == [r["payload"] for r in acked]

        # A clean reboot of the guest: same QEMU, same NBD disk served by Kemari.
        boots = len(agent.serial_text())
        records(client, "reboot")
        agent.wait_serial(r"workload records ready", after=boots)
        records(client, "wait")
        more = records(client, "put", "5", "--prefix", "after")
        stored = records(client, "get")
        assert stored == [r["payload"] for r in acked + more]

        status = agent.status()
        assert status["nics"][0]["guest_to_host"]["frames"] > 0
        assert status["disks"][0]
        assert agent.stop() == 0
    # The disk image holds the records after the agent is gone (e2fsck clean).
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], check=False, capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
