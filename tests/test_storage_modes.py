"""Storage modes end to end through the CLI: diskload survives a kill and a failover.

For ``shared`` (one image both agents name) and ``replicated`` (each agent has its own
image; the standby's starts empty and is filled by the initial disk copy), one active
agent runs the ``diskload`` guest, a standby protects it, the active QEMU and agent are
killed with SIGKILL, and the standby fails over.  In ``replicated`` mode protection
starts through ``kemari monitor ... migrate`` without ``-d``, which must follow the RAM
sync and then the disk copy and return only once the copy is complete.  Checked:

- the guest goes on writing after the failover (a new ``diskload: seq N synced`` line on
  the failover QEMU's console, N above what was committed);
- after the new active stops, the image it used replays its ext4 journal, passes
  ``e2fsck -fn``, and its diskload file passes the guest's own ``diskload-verify``
  (every block consistent with a crash after the last acknowledged fsync).

Needs the patched QEMU and the guest image (marker ``guest``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agents import kill_agent_and_qemu, start_standby
from support.fsck import check_diskload_disk

from kemari.errors import KemariError
from kemari.image.builder import default_image
from kemari.image.disk import create_data_disk
from kemari.testbed.vm import AgentProcess
from kemari.testbed.wait import wait_for

pytestmark = [pytest.mark.guest, pytest.mark.usefixtures("image_and_patched_qemu")]

DISK_MIB = 64
SYNCED_RE = re.compile(r"diskload: seq (\d+) synced")


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for leftover in Path("/dev/shm").glob(f"kemari-storage-{os.getpid()}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def synced(agent: AgentProcess) -> list[int]:
    return [int(seq) for seq in SYNCED_RE.findall(agent.serial_text())]


def start_disk_standby(
    name: str, workdir: Path, common: list[str], image: Path, replica: str
) -> tuple[AgentProcess, str]:
    """The standby agent on ``image``, its replica in /dev/shm (removed by ``workdir``)."""
    replica_dir = f"/dev/shm/kemari-storage-{os.getpid()}-{replica}"
    return start_standby(name, workdir, [*common, "--disk", str(image)], replica_dir, "standby")


@pytest.mark.parametrize("storage", ["shared", "replicated"])
def test_diskload_survives_kill_and_failover(workdir: Path, storage: str) -> None:
    primary_image = workdir / "primary.raw"
    create_data_disk(primary_image, DISK_MIB)
    standby_image = primary_image
    if storage == "replicated":
        standby_image = workdir / "standby.raw"
        with standby_image.open("wb") as handle:  # empty: the initial copy fills it
            handle.truncate(DISK_MIB << 20)
    common = ["--workload", "diskload", "--accel", "tcg", "--storage", storage]
    active = AgentProcess("disks", workdir, [*common, "--disk", str(primary_image)], label="active")
    agents = [active]
    try:
        active.wait_serial(r"diskload: seq \d+ synced")
        active.wait_monitor()
        standby, uri = start_disk_standby("disks", workdir, common, standby_image, storage)
        agents.append(standby)
        if storage == "replicated":
            # Through the CLI without -d: it draws the RAM sync, then the disk copy, and
            # returns once the standby has the whole image.
            follow = active.migrate_following(uri)
            assert "disks copied: the standby can take over" in follow, follow
            assert "copied to the standby" in active.agent_output()
            assert all(copy["done"] for copy in active.status()["disk_copy"])
        else:
            active.monitor("migrate", "-d", uri)
        wait_for(lambda: active.status()["protection"] == "protected", "protection", 120)
        # Let the guest write through some committed checkpoints, then kill the primary.
        before = synced(active)[-1]
        wait_for(lambda: synced(active)[-1] >= before + 2048, "diskload progress", 120)
        epoch = active.monitor("checkpoint").data["epoch"]
        kill_agent_and_qemu(active)
        last_printed = synced(active)[-1]
        reply = standby.monitor("failover")
        assert reply.data["epoch"] >= epoch
        # The guest goes on writing on the standby's disk.
        wait_for(lambda: bool(synced(standby)), "diskload after failover", 120)
        assert synced(standby)[0] > last_printed - 2048
        wait_for(lambda: len(synced(standby)) >= 2, "more diskload after failover", 120)
        assert standby.stop() == 0
    finally:
        for agent in agents:
            agent.stop()
    scratch = workdir / "check"
    scratch.mkdir()
    check_diskload_disk(standby_image, scratch, default_image().kguest)


def test_replicated_is_protected_only_once_the_disks_are_copied(workdir: Path) -> None:
    """Issue 10.12: ``protected`` means a failover now would succeed.  While the disks'
    initial copy runs the state is ``copying-disks`` (the old code said ``protected``),
    a failover is refused and leaves the standby a standby, and ``protected`` follows
    once every copy is done."""
    disk_mib = 384  # a copy long enough to be seen (several seconds under TCG)
    primary_image = workdir / "primary.raw"
    create_data_disk(primary_image, disk_mib)
    standby_image = workdir / "standby.raw"
    with standby_image.open("wb") as handle:
        handle.truncate(disk_mib << 20)
    common = ["--workload", "ticks", "--accel", "tcg", "--storage", "replicated"]
    active = AgentProcess("copy", workdir, [*common, "--disk", str(primary_image)], label="active")
    agents = [active]
    try:
        standby, uri = start_disk_standby("copy", workdir, common, standby_image, "copy")
        agents.append(standby)
        active.wait_serial(r"tick 3\b")
        active.wait_monitor()
        active.monitor("migrate", "-d", uri)
        seen: list[tuple[str, bool]] = []
        refused = ""
        texts: list[str] = []

        def copied() -> bool:
            nonlocal refused
            status = active.status()
            copies = status["disk_copy"]
            done = bool(copies) and all(copy["done"] for copy in copies)
            seen.append((status["protection"], done))
            if status["protection"] == "copying-disks" and not refused:
                with pytest.raises(KemariError, match="initial disk copy") as caught:
                    standby.monitor("failover")
                refused = str(caught.value)
                texts.append(active.monitor("info", "status").text)
                standby_status = standby.status()
                assert (standby_status["role"], standby_status["state"]) == (
                    "standby",
                    "standby",
                ), standby_status
            return done and status["protection"] == "protected"

        wait_for(copied, "the disk copy and protection", 180, interval=0.05)
        states = sorted(set(seen))
        assert all(done for protection, done in seen if protection == "protected"), states
        assert ("copying-disks", False) in seen, states
        assert refused, seen
        # The refused failover left the standby receiving: checkpoints still commit.
        assert active.monitor("checkpoint").data["epoch"] >= 1
        assert standby.status()["standby"]["epoch"] >= 1
        assert "copying-disks" in texts[0], texts
    finally:
        for agent in agents:
            agent.stop()
