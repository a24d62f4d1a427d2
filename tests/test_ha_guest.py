"""Automatic failover with real guests, a real three-member etcd and real kills (issue 9).

One testbed for the module: two host namespaces ``a`` and ``b``, a client namespace and
three etcd members on one LAN (kemari.testbed.topology, kemari.testbed.etcd).  Both
agents run the SAME command: ``kemari run ... --ha etcd://... --incoming
kemari:tcp:<own address>``; the record decides who boots the guest and who is the
standby; no ``migrate`` or ``failover`` is ever typed.  A client stores records back
to back on ONE TCP connection for the whole module and logs every acknowledged one.

The tests run in order and continue from each other's end state:

1. (issue scenario 1) kill -9 of the active's QEMU and agent → the standby takes over
   by itself; the client's connection carries on; the split of the takeover time is
   printed.
2. (scenario 6) the killed host's agent is started again with the same command → it
   joins as the standby and the pair is protected again (replicated storage: a fresh
   disk copy), with no command typed.
3. (scenario 8) one etcd member of three killed during protection → nothing changes.
At the end the acknowledged records must be exactly the first stored ones, in order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from support.soak import GUEST_IP, records_agent_args

from kemari.config import StorageMode
from kemari.errors import KemariError
from kemari.image.disk import create_data_disk
from kemari.testbed.etcd import EtcdLab
from kemari.testbed.topology import Namespace, Topology
from kemari.testbed.vm import AgentProcess
from kemari.testbed.wait import wait_for

pytestmark = [
    pytest.mark.guest,
    pytest.mark.root,
    pytest.mark.usefixtures("image_and_patched_qemu"),
]

# The records guest of tests/support/soak.py (its address is in the shared arguments).
SUBNET = GUEST_IP.rpartition(".")[0]
HOST_IPS = {"a": f"{SUBNET}.21", "b": f"{SUBNET}.22"}
CLIENT_IP = f"{SUBNET}.100"
PORT = 7300
VM = "hapair"
DISK_MIB = 64
STORAGE = StorageMode.REPLICATED
PROTECT_TIMEOUT_S = 240.0
TAKEOVER_TIMEOUT_S = 60.0


class HaPair:
    """The testbed, the agents (one per host at a time) and the client."""

    def __init__(self, topology: Topology, lab: EtcdLab, workdir: Path) -> None:
        self.topology = topology
        self.lab = lab
        self.workdir = workdir
        self.hosts: dict[str, Namespace] = {
            host: topology.add_host(host, f"{ip}/24") for host, ip in HOST_IPS.items()
        }
        self.client_ns = topology.add_client("client", f"{CLIENT_IP}/24")
        self.agents: dict[str, AgentProcess] = {}
        self.all_agents: list[AgentProcess] = []
        self.starts = 0
        self.images = {host: workdir / f"{host}.raw" for host in HOST_IPS}
        create_data_disk(self.images["a"], DISK_MIB)
        with self.images["b"].open("wb") as handle:  # empty: the initial copy fills it
            handle.truncate(DISK_MIB << 20)
        self.acked_log = workdir / "acked.log"
        self.client: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    def start_agent(self, host: str) -> AgentProcess:
        """The same command on every host: only the address differs."""
        self.starts += 1
        label = f"{host}{self.starts}"
        replica_dir = Path(f"/dev/shm/kemari-ha-{os.getpid()}-{label}")
        args = [
            *records_agent_args(self.images[host], STORAGE),
            "--ha", self.lab.uri,
            "--incoming", f"kemari:tcp:{HOST_IPS[host]}:{PORT}",
            "--replica-dir", str(replica_dir),
        ]  # fmt: skip
        agent = AgentProcess(VM, self.workdir, args, self.hosts[host], label)
        self.agents[host] = agent
        self.all_agents.append(agent)
        return agent

    def start_client(self) -> None:
        acked = self.acked_log.open("wb")
        errors = (self.workdir / "client.log").open("wb")
        self._files = [acked, errors]
        self.client = self.client_ns.popen(
            [sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "loop", "--prefix", "ha"],
            stdin=subprocess.PIPE, stdout=acked, stderr=errors,
        )  # fmt: skip

    def acked(self) -> int:
        assert self.client is not None
        if self.client.poll() is not None:
            errors = (self.workdir / "client.log").read_text(errors="replace")[-800:]
            raise KemariError(f"the client exited {self.client.returncode}: {errors}")
        return self.acked_log.read_bytes().count(b"\n")

    def close(self) -> None:
        if self.client is not None and self.client.poll() is None:
            self.client.kill()
            self.client.wait()
        for handle in self._files:
            handle.close()
        # Standbys first: a stopped active's standby would otherwise take over.
        for agent in sorted(self.all_agents, key=_is_active):
            agent.stop()
        for path in Path("/dev/shm").glob(f"kemari-ha-{os.getpid()}-*"):
            shutil.rmtree(path, ignore_errors=True)


def _is_active(agent: AgentProcess) -> bool:
    if agent.process.poll() is not None:
        return False
    try:
        return bool(agent.status()["role"] == "active")
    except KemariError:
        return False


def status(agent: AgentProcess) -> dict[str, Any]:
    return agent.status()


def protected_pair(active: AgentProcess, standby: AgentProcess) -> bool:
    """The record says ``active`` is protected by ``standby`` (as the active read it)."""
    ha_active = status(active)["ha"]
    ha_standby = status(standby)["ha"]
    return (
        ha_active["active"] == ha_active["agent"]
        and ha_active["protected_by"] == ha_standby["agent"]
        and status(active)["protection"] == "protected"
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HaPair]:
    workdir = tmp_path_factory.mktemp("ha")
    with Topology() as topology, EtcdLab(3, subnet=SUBNET, topology=topology) as lab:
        ha_pair = HaPair(topology, lab, workdir)
        try:
            yield ha_pair
        finally:
            ha_pair.close()


def test_1_kill_of_the_active_the_standby_takes_over_by_itself(pair: HaPair) -> None:
    a = pair.start_agent("a")
    a.wait_serial(r"workload records ready")
    a.wait_monitor()
    assert status(a)["ha"]["active"] == status(a)["ha"]["agent"]  # it claimed the record
    pair.start_client()
    b = pair.start_agent("b")
    b.wait_monitor()
    assert status(b)["state"] == "standby"
    started = time.monotonic()
    wait_for(lambda: protected_pair(a, b), "a protected by b in the record", PROTECT_TIMEOUT_S)
    print(f"protected with no command in {time.monotonic() - started:.1f} s")
    wait_for(lambda: pair.acked() > 5, "records acknowledged while protected", 60)

    acked_at_kill = pair.acked()
    qemu_pid = status(a)["qemu_pid"]
    killed_at = time.monotonic()
    os.kill(qemu_pid, signal.SIGKILL)
    os.kill(a.process.pid, signal.SIGKILL)
    a.process.wait(30)

    wait_for(lambda: status(b)["state"] == "active", "b active by itself", TAKEOVER_TIMEOUT_S)
    active_at = time.monotonic()
    wait_for(lambda: pair.acked() > acked_at_kill, "the client's next ack", TAKEOVER_TIMEOUT_S)
    resumed_at = time.monotonic()
    after = status(b)
    assert after["ha"]["active"] == after["ha"]["agent"]
    assert after["ha"]["term"] == 2
    assert "took over" in after["ha"]["last_change"]
    print(
        f"takeover: kill → b active {(active_at - killed_at) * 1000:.0f} ms "
        f"(QEMU from replica {after['failover']['total_ms']:.0f} ms), kill → client's next "
        f"ack {(resumed_at - killed_at):.2f} s; {after['ha']['last_change']}"
    )


def test_6_the_killed_host_restarts_with_the_same_command_and_is_protected_again(
    pair: HaPair,
) -> None:
    b = pair.agents["b"]
    assert status(b)["state"] == "active"
    a = pair.start_agent("a")  # the same command as at the start
    a.wait_monitor()
    wait_for(lambda: status(a)["state"] == "standby", "a joined as standby", 60)
    started = time.monotonic()
    wait_for(lambda: protected_pair(b, a), "b protected by a again", PROTECT_TIMEOUT_S)
    print(f"re-protected (fresh disk copy) with no command in {time.monotonic() - started:.1f} s")
    acked = pair.acked()
    wait_for(lambda: pair.acked() > acked + 3, "records acknowledged after rejoin", 60)


def test_8_one_etcd_member_of_three_killed_during_protection_changes_nothing(
    pair: HaPair,
) -> None:
    active, standby = pair.agents["b"], pair.agents["a"]
    assert protected_pair(active, standby)
    term = status(active)["ha"]["term"]
    victim = pair.lab.leader()
    pair.lab.kill(victim.name)
    try:
        acked = pair.acked()
        wait_for(lambda: pair.acked() > acked + 5, "records acknowledged, member down", 60)
        assert protected_pair(active, standby)
        assert status(active)["state"] == "active" and status(standby)["state"] == "standby"
        assert status(active)["ha"]["term"] == term
        assert status(active)["ha"]["withheld"] == 0 or status(active)["ha"]["fenced"] is False
    finally:
        pair.lab.restart(victim.name)


def test_records_acknowledged_are_stored_in_order(pair: HaPair) -> None:
    assert pair.client is not None and pair.client.stdin is not None
    pair.client.stdin.close()
    assert pair.client.wait(180) == 0, "the client's single connection did not survive"
    acked = pair.acked_log.read_text().split()
    listing = pair.client_ns.run(
        [sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "get"], timeout=120
    )
    stored = [p for p in json.loads(listing.stdout) if p.startswith("ha-")]
    assert stored[: len(acked)] == acked and len(stored) <= len(acked) + 1
    print(f"{len(acked)} records acknowledged, {len(stored)} stored")
