"""The agent's status is the typed schema of kemari.monitor.api, filled from the real
components' plain status (no QEMU: an agent that has not taken a role yet)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from kemari.config import StorageMode, VMConfig
from kemari.errors import ConfigError, StateError
from kemari.monitor import api, render
from kemari.net.bridge import BridgeCounters
from kemari.replica.applier import ReplicaApplier
from kemari.replica.disks import StandbyDisks
from kemari.replica.receiver import StandbyReceiver
from kemari.roles.agent import Agent
from kemari.roles.state import State
from kemari.transaction.session import Identity


def make_agent(tmp_path: Path) -> Agent:
    config = VMConfig(
        name="unit",
        runtime_dir=tmp_path / "run",
        serial_log=tmp_path / "serial.log",
        replica_dir=tmp_path / "replica",
    )
    return Agent(config)


def test_status_of_an_agent_without_a_role(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    status = agent.status()
    assert (status.role, status.state, status.state_reason) == (None, "starting", "agent started")
    assert status.agent_pid == os.getpid()
    assert (status.vm, status.qemu_pid, status.protection) == ("not-started", None, "unprotected")
    assert status.checkpoint_safe is False and status.disks == [] and status.nics == []
    plain = json.loads(json.dumps(api.to_plain(status)))
    assert api.from_plain(api.Status, plain) == status
    assert render.text(api.InfoStatus(), status).startswith(
        "VM unit: not-started (role none, unprotected, agent starting)"
    )


def test_commands_that_need_a_role_are_refused(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)

    async def scenario() -> None:
        with pytest.raises(ConfigError, match="VM unit is not running"):
            await agent._handle(api.Migrate("kemari:tcp:127.0.0.1:1"))
        with pytest.raises(ConfigError, match="VM unit is not protected"):
            await agent._handle(api.Checkpoint())
        with pytest.raises(ConfigError, match="VM unit is not a standby \\(starting\\)"):
            await agent._handle(api.Failover())
        reply = await agent._handle(api.Quit())
        assert reply == api.Stopping("unit")

    asyncio.run(scenario())
    assert agent.state.state is State.STARTING  # nothing was promoted


def test_the_state_machine_guards_the_agent(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    with pytest.raises(StateError):
        agent.state.to(State.PROMOTING, "no standby role to promote")


def test_nic_schema_matches_the_bridge_counters() -> None:
    nic = api.from_plain(
        api.NicStatus,
        {"tap": "kt0", **BridgeCounters().as_dict(), "guest_reading_paused": False},
    )
    assert nic.guest_to_host == api.Flow(0, 0)


def test_standby_schema_matches_the_receiver(tmp_path: Path) -> None:
    applier = ReplicaApplier(tmp_path / "replica")
    try:
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(1 << 16))
        disks = StandbyDisks([image], StorageMode.SHARED)
        receiver = StandbyReceiver(
            "kemari:tcp:127.0.0.1:0", Identity("unit", bytes(32)), applier, disks
        )
        standby = api.from_plain(api.StandbyStatus, receiver.status())
        assert standby.epoch is None and standby.listening is None
        assert [disk.image for disk in standby.disks] == [str(image)]
        asyncio.run(disks.close())
    finally:
        applier.close()
