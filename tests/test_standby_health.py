"""Issue 10 items 7 and 8: a standby that can no longer keep its replica says so.

8. The standby's disk image deleted while protected was not noticed: status clean,
   epochs applied, only ``failover`` found out.  Now each commit checks that the image
   path still names the file the standby writes; a deleted one ends the session (the
   primary drops protection, one line each side), ``health`` says why, a failover is
   refused before anything changes, and the next primary's initial sync (after the
   image is restored) makes the standby healthy again.
7. A full replica file system after an acknowledged epoch left a standby that refused
   failover ("must be reopened") with no way to reopen it.  Now the standby ends the
   session with the reason, keeps its last committed replica for a failover, and the
   next primary's initial sync resets it, without losing that replica until the new one
   is committed.  Tested on a real small tmpfs as ``--replica-dir``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agents import kill_agent_and_qemu, protect, start_standby, ticks

from kemari.errors import KemariError
from kemari.image.disk import create_data_disk
from kemari.testbed.vm import AgentProcess, wait_for

pytestmark = [pytest.mark.guest, pytest.mark.usefixtures("image_and_patched_qemu")]


def lines(agent: AgentProcess, marker: str) -> list[str]:
    return [line for line in agent.agent_output().splitlines() if marker in line]


def assert_one_line_each(active: AgentProcess, standby: AgentProcess) -> None:
    """One line on each side says why protection ended.

    The status says ``unprotected`` from the moment the source starts releasing the
    guest; the primary's line follows once QEMU has resumed it, so it is waited for.
    """
    for agent, marker in ((active, "protection lost:"), (standby, "cannot keep its replica")):
        wait_for(lambda a=agent, m=marker: lines(a, m), f"{agent.label}'s {marker!r} line", 30)
        assert len(lines(agent, marker)) == 1, agent.agent_output()


def unprotected(active: AgentProcess) -> bool:
    return bool(active.status()["protection"] == "unprotected")


def test_a_deleted_standby_image_ends_protection_and_a_new_sync_resets_it(
    tmp_path: Path,
) -> None:
    primary_image = tmp_path / "primary.raw"
    create_data_disk(primary_image, 16)
    standby_image = tmp_path / "standby.raw"
    standby_image.write_bytes(b"")
    os.truncate(standby_image, 16 << 20)
    common = ["--workload", "ticks", "--accel", "tcg", "--memory", "128M"]
    common += ["--storage", "replicated"]
    replica_dir = Path("/dev/shm") / f"kemari-test-health-{os.getpid()}"
    active = AgentProcess("gone", tmp_path, [*common, "--disk", str(primary_image)], label="a")
    agents = [active]
    try:
        standby_args = [*common, "--disk", str(standby_image)]
        standby, uri = start_standby("gone", tmp_path, standby_args, replica_dir, "b")
        agents.append(standby)
        active.wait_serial(r"tick 2\b")
        active.wait_monitor()
        protect(active, uri)
        standby_image.unlink()
        # The old code stayed "protected" and went on applying epochs.
        wait_for(lambda: unprotected(active), "protection dropped", 30)
        health = standby.status()["standby"]
        assert health["health"] == "failed", health
        assert "was deleted" in health["health_reason"], health
        reason = active.status()["replication"]["reason"]
        assert "cannot keep its replica" in reason and "deleted" in reason, reason
        assert_one_line_each(active, standby)
        assert "HEALTH failed" in standby.monitor("info", "status").text
        # Refused before anything changes: still a standby.
        with pytest.raises(KemariError, match="was deleted"):
            standby.monitor("failover")
        assert standby.status()["state"] == "standby"
        before = ticks(active)[-1]
        wait_for(lambda: ticks(active)[-1] >= before + 2, "the guest runs on")
        # The operator restores an (empty) image; the next session copies it again.
        standby_image.write_bytes(b"")
        os.truncate(standby_image, 16 << 20)
        protect(active, uri)
        assert standby.status()["standby"]["health"] == "ok"
        assert active.monitor("checkpoint").data["epoch"] >= 1
    finally:
        for agent in agents:
            agent.stop()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    # Two generations of 128 MiB of guest RAM (the last good one is kept while a new sync
    # builds the next), with a few MiB for the journal and outputs.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last page."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as handle:
        for chunk in (1 << 20, 4096):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\xff" * chunk)
    with pytest.raises(OSError) as full:
        (directory / "probe").write_bytes(b"x" * 4096)
    assert full.value.errno == errno.ENOSPC
    return filler


@pytest.mark.root
def test_a_full_replica_file_system_keeps_the_last_replica_for_failover(
    tmp_path: Path, small_tmpfs: Path
) -> None:
    common = ["--workload", "ticks", "--accel", "tcg", "--memory", "128M"]
    replica_dir = small_tmpfs / "replica"
    active = AgentProcess("full", tmp_path, common, label="a")
    agents = [active]
    try:
        standby, uri = start_standby("full", tmp_path, common, replica_dir, "b")
        agents.append(standby)
        active.wait_serial(r"tick 2\b")
        active.wait_monitor()
        protect(active, uri)
        active.monitor("checkpoint")
        filler = fill(small_tmpfs)
        wait_for(lambda: unprotected(active), "protection dropped", 30)
        # The primary says why (the old code: "TransportClosed: ... connection closed").
        reason = active.status()["replication"]["reason"]
        assert "cannot keep its replica" in reason and "No space" in reason, reason
        status = standby.status()["standby"]
        assert status.get("health") == "failed", status
        assert "space" in status["health_reason"], status
        kept = status["epoch"]
        assert kept is not None and kept >= 1, status
        assert_one_line_each(active, standby)
        # A new session while the file system is still full: its sync fails cleanly and
        # the last good replica stays (it is replaced only once a new one commits).
        active.monitor("migrate", "-d", uri)
        wait_for(lambda: unprotected(active), "the second session ends", 60)
        status = standby.status()["standby"]
        assert (status["health"], status["epoch"]) == ("failed", kept), status
        # Space again: the next primary's initial sync resets the standby.
        filler.unlink()
        protect(active, uri)
        status = standby.status()["standby"]
        assert status["health"] == "ok", status
        acked = active.monitor("checkpoint").data["epoch"]
        # Full again, then the primary dies: the failover resumes from the last
        # acknowledged epoch, on the full file system.
        fill(small_tmpfs)
        wait_for(lambda: unprotected(active), "protection dropped again", 30)
        kill_agent_and_qemu(active)
        last = ticks(active)[-1]
        reply = standby.monitor("failover")
        assert reply.data["epoch"] >= acked
        wait_for(lambda: len(ticks(standby)) >= 3, "ticks after the failover", 60)
        assert ticks(standby)[0] <= last + 1
    finally:
        for agent in agents:
            agent.stop()
