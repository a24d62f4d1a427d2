"""Issue 10.11: replica RAM left in the replica folder after a crash.

After a failover the standby's replica folder holds the running QEMU's RAM (a
handed-over generation).  When that agent and its QEMU were later killed, the
generation stayed, and the next agent with the same folder never removed it: chained
kill/failover rounds grew the folder by one guest RAM per round.  Now an agent reclaims
the generations no live process holds, at start and after a failover, and never one a
live QEMU (or its agent) holds.

Two chained rounds with real SIGKILLs of agent and QEMU, the two hosts' replica folders
alternating; each folder is measured when its next standby is protected.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agents import kill_agent_and_qemu, protect, start_standby, ticks

from kemari.testbed.vm import AgentProcess, wait_for

pytestmark = [pytest.mark.guest, pytest.mark.usefixtures("image_and_patched_qemu")]

COMMON = ["--workload", "ticks", "--accel", "tcg", "--memory", "128M"]


def generations(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("gen-*")) if folder.exists() else []


def size(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def folders() -> Iterator[dict[str, Path]]:
    base = Path("/dev/shm") / f"kemari-test-reclaim-{os.getpid()}"
    yield {"a": base / "a", "b": base / "b"}
    shutil.rmtree(base, ignore_errors=True)


def test_chained_kill_and_failover_rounds_do_not_grow_the_replica_folders(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    agents: list[AgentProcess] = []

    def standby(host: str, label: str) -> tuple[AgentProcess, str]:
        agent, uri = start_standby("reclaim", tmp_path, COMMON, folders[host], label)
        agents.append(agent)
        return agent, uri

    def fail_over(dead: AgentProcess, survivor: AgentProcess) -> None:
        kill_agent_and_qemu(dead)
        survivor.monitor("failover")
        wait_for(lambda: len(ticks(survivor)) >= 2, "ticks after the failover", 60)

    try:
        active = AgentProcess("reclaim", tmp_path, COMMON, label="a0")
        agents.append(active)
        active.wait_serial(r"tick 2\b")
        active.wait_monitor()
        measured: dict[str, list[tuple[list[str], int]]] = {"a": [], "b": []}
        host = "b"
        for number in range(1, 4):
            survivor, uri = standby(host, f"{host}{number}")
            protect(active, uri)
            active.monitor("checkpoint")
            measured[host].append((generations(folders[host]), size(folders[host])))
            if number == 1:
                fail_over(active, survivor)
                # A standby sharing the folder of a running failover QEMU: neither its
                # start nor its stop removes the QEMU's generation, and the guest runs on.
                held = generations(folders[host])
                assert len(held) == 1, held
                intruder, _ = standby(host, "intruder")
                assert generations(folders[host]) == held
                assert intruder.stop() == 0
                assert generations(folders[host]) == held
                before = ticks(survivor)[-1]
                wait_for(
                    lambda agent=survivor, tick=before: ticks(agent)[-1] >= tick + 2,
                    "ticks after the intruder",
                )
            elif number == 2:
                fail_over(active, survivor)
            active = survivor
            host = "a" if host == "b" else "b"
        # Round 3's standby reuses round 1's folder after its agent and QEMU were killed:
        # one generation, as large as the first (the old code kept the dead one too).
        (first_gens, first_size), (third_gens, third_size) = measured["b"]
        assert len(first_gens) == 1 and len(third_gens) == 1, measured
        assert third_size <= first_size * 1.1, measured
    finally:
        for agent in agents:
            agent.stop()
