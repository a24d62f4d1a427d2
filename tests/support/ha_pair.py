"""The automatic-failover testbed (issue 9): one lab for every HA guest test, pairs on it.

:class:`HaLab` is started once per test session (``ha_lab`` in tests/conftest.py) and
once per benchmark run: two host namespaces ``a`` and ``b``, a client namespace and a
three-member etcd cluster on one LAN (kemari.testbed.topology, kemari.testbed.etcd).

:class:`HaPair` is one VM on that lab: both agents run the SAME command, ``kemari run
... --ha etcd://... --incoming kemari:tcp:<own address>``, and the record decides who
boots the guest and who is the standby; no ``migrate`` or ``failover`` is ever typed.
A client stores records back to back on ONE TCP connection for the pair's whole life
and logs every acknowledged one.  Each pair has its own VM name (so its own etcd keys),
working directory and replica directories; ``close()`` stops its agents and client, so
the next pair finds the hosts, the LAN and etcd as they were.

:func:`kill_and_take_over` is one round of the issue's scenario 7, used by
tests/test_ha_chain.py and benchmarks/auto_failover.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kemari.config import StorageMode
from kemari.errors import KemariError
from kemari.image.disk import create_data_disk
from kemari.testbed.etcd import EtcdLab
from kemari.testbed.records import LOOP_TIMEOUT_S
from kemari.testbed.topology import Namespace, Topology
from kemari.testbed.vm import AgentProcess
from kemari.testbed.wait import wait_for
from support.fsck import check_crashed_disk
from support.soak import GUEST_IP, records_agent_args

# The records guest of tests/support/soak.py (its address is in the shared arguments).
SUBNET = GUEST_IP.rpartition(".")[0]
HOST_IPS = {"a": f"{SUBNET}.21", "b": f"{SUBNET}.22"}
CLIENT_IP = f"{SUBNET}.100"
PORT = 7300
DISK_MIB = 64
PROTECT_TIMEOUT_S = 240.0
TAKEOVER_TIMEOUT_S = 60.0
RECORD_PREFIX = "ha"
_SPLIT = re.compile(r"detection (\d+) ms, arbitration (\d+) ms")


class HaLab:
    """The namespaces and the etcd cluster every pair of a session shares."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self.topology = Topology()
        self.etcd = EtcdLab(3, subnet=SUBNET, topology=self.topology)
        self.hosts: dict[str, Namespace] = {}
        self.client_ns: Namespace | None = None

    def __enter__(self) -> HaLab:
        with self._stack as stack:
            stack.enter_context(self.topology)
            stack.enter_context(self.etcd)
            self.hosts = {
                host: self.topology.add_host(host, f"{ip}/24") for host, ip in HOST_IPS.items()
            }
            self.client_ns = self.topology.add_client("client", f"{CLIENT_IP}/24")
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    @property
    def lan(self) -> Namespace:
        assert self.topology.lan is not None
        return self.topology.lan

    @property
    def client(self) -> Namespace:
        assert self.client_ns is not None
        return self.client_ns


class HaPair:
    """One VM on the lab: its agents (one per host at a time), images and client."""

    def __init__(self, lab: HaLab, workdir: Path, storage: StorageMode, vm: str) -> None:
        self.lab = lab
        self.etcd = lab.etcd
        self.hosts = lab.hosts
        self.client_ns = lab.client
        self.storage = storage
        self.vm = vm
        self.workdir = workdir
        self.agents: dict[str, AgentProcess] = {}
        self.all_agents: list[AgentProcess] = []
        self.starts = 0
        self.images = {host: workdir / f"{host}.raw" for host in HOST_IPS}
        create_data_disk(self.images["a"], DISK_MIB)
        if storage is StorageMode.SHARED:
            self.images["b"] = self.images["a"]  # one image both hosts see
        else:
            with self.images["b"].open("wb") as handle:  # empty: the initial copy fills it
                handle.truncate(DISK_MIB << 20)
        self.acked_log = workdir / "acked.log"
        self.client: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []
        self._replica_prefix = f"kemari-ha-{os.getpid()}-{vm}-"

    def start_agent(self, host: str) -> AgentProcess:
        """The same command on every host: only the address differs."""
        self.starts += 1
        label = f"{host}{self.starts}"
        replica_dir = Path("/dev/shm") / f"{self._replica_prefix}{label}"
        args = [
            *records_agent_args(self.images[host], self.storage),
            "--ha", self.etcd.uri,
            "--incoming", f"kemari:tcp:{HOST_IPS[host]}:{PORT}",
            "--replica-dir", str(replica_dir),
        ]  # fmt: skip
        agent = AgentProcess(self.vm, self.workdir, args, self.hosts[host], label)
        self.agents[host] = agent
        self.all_agents.append(agent)
        return agent

    def boot(self) -> tuple[AgentProcess, AgentProcess]:
        """``a`` claims the record and boots the guest, the client starts, ``b`` joins
        as the standby; returns (a, b) once the record says a is protected by b."""
        a = self.start_agent("a")
        a.wait_serial(r"workload records ready")
        a.wait_monitor()
        if status(a)["ha"]["active"] != status(a)["ha"]["agent"]:
            raise KemariError(f"{self.vm}: the first agent did not claim the record")
        self.start_client()
        b = self.start_agent("b")
        b.wait_monitor()
        wait_for(lambda: protected_pair(a, b), "a protected by b in the record", PROTECT_TIMEOUT_S)
        return a, b

    def start_client(self) -> None:
        acked = self.acked_log.open("wb")
        errors = (self.workdir / "client.log").open("wb")
        self._files = [acked, errors]
        command = [
            sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "loop",
            "--prefix", RECORD_PREFIX,
        ]  # fmt: skip
        self.client = self.client_ns.popen(
            command, stdin=subprocess.PIPE, stdout=acked, stderr=errors
        )

    def acked(self) -> int:
        """Records acknowledged so far; KemariError if the client has exited."""
        assert self.client is not None
        if self.client.poll() is not None:
            errors = (self.workdir / "client.log").read_text(errors="replace")[-800:]
            raise KemariError(f"the client exited {self.client.returncode}: {errors}")
        return self.acked_log.read_bytes().count(b"\n")

    def wait_acked(self, more: int, what: str, timeout: float = 60.0) -> None:
        """Wait until ``more`` records beyond the ones acknowledged now are."""
        target = self.acked() + more
        wait_for(lambda: self.acked() >= target, what, timeout)

    def stored(self) -> list[str]:
        """Every record the guest holds (``get`` over a second connection)."""
        listing = self.client_ns.run(
            [sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "get"], timeout=120
        )
        return [p for p in json.loads(listing.stdout) if p.startswith(f"{RECORD_PREFIX}-")]

    def check_acked_stored(self) -> int:
        """Every record acknowledged so far is stored, in order; returns how many."""
        acked = self.acked_log.read_text().split()
        stored = self.stored()
        if stored[: len(acked)] != acked:
            raise KemariError(
                f"{len(acked)} records acknowledged, but the guest's first {len(acked)} of "
                f"{len(stored)} differ: acknowledged ...{acked[-3:]}, stored "
                f"...{stored[len(acked) - 3 : len(acked)]}"
            )
        return len(acked)

    def finish_client(self) -> int:
        """EOF to the client (it finishes its record in flight); its one connection must
        have survived; every acknowledged record stored in order.  Returns how many."""
        assert self.client is not None and self.client.stdin is not None
        self.client.stdin.close()
        if self.client.wait(LOOP_TIMEOUT_S + 60) != 0:
            errors = (self.workdir / "client.log").read_text(errors="replace")[-800:]
            raise KemariError(f"the client's single connection did not survive: {errors}")
        acked = self.acked_log.read_text().split()
        stored = self.stored()
        if stored[: len(acked)] != acked or len(stored) > len(acked) + 1:
            raise KemariError(f"{len(acked)} records acknowledged, {len(stored)} stored")
        return len(acked)

    def close(self) -> None:
        if self.client is not None and self.client.poll() is None:
            self.client.kill()
            self.client.wait()
        for handle in self._files:
            handle.close()
        # Standbys first: a stopped active's standby would otherwise take over.
        for agent in sorted(self.all_agents, key=_is_active):
            agent.stop()
        for path in Path("/dev/shm").glob(f"{self._replica_prefix}*"):
            shutil.rmtree(path, ignore_errors=True)

    def check_images(self) -> None:
        """After :meth:`close`: every image the pair wrote replays its journal and passes
        ``e2fsck -fn`` (ImageError otherwise)."""
        scratch = self.workdir / "fsck"
        scratch.mkdir()
        for image in sorted(set(self.images.values())):
            check_crashed_disk(image, scratch)


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
    return bool(
        ha_active["active"] == ha_active["agent"]
        and ha_active["protected_by"] == ha_standby["agent"]
        and status(active)["protection"] == "protected"
    )


def kill_agent_and_qemu(agent: AgentProcess) -> None:
    """SIGKILL the agent's QEMU, then the agent (a host lost at once)."""
    os.kill(status(agent)["qemu_pid"], signal.SIGKILL)
    os.kill(agent.process.pid, signal.SIGKILL)
    agent.process.wait(30)


@dataclass(frozen=True)
class Takeover:
    """One kill → automatic takeover, timed (monotonic clock of the test process)."""

    protect_s: float  # the round's start → the record says protected
    detect_ms: float  # the active's last frame → the standby noticed the loss
    arbitrate_ms: float  # → take_over won (shared storage: and the old lease gone)
    resume_ms: float  # QEMU started from the replica
    active_ms: float  # kill → the standby says active
    ack_s: float  # kill → the client's next acknowledgement
    term: int


def kill_and_take_over(pair: HaPair, active_host: str, standby_host: str) -> Takeover:
    """Wait until the pair is protected and serving, kill -9 the active's QEMU and agent,
    wait for the standby to take over by itself and for the client's next ack."""
    active, standby = pair.agents[active_host], pair.agents[standby_host]
    started = time.monotonic()
    wait_for(lambda: protected_pair(active, standby), "protection", PROTECT_TIMEOUT_S)
    protect_s = time.monotonic() - started
    pair.wait_acked(3, "records acknowledged while protected")
    acked = pair.acked()
    killed = time.monotonic()
    kill_agent_and_qemu(active)
    wait_for(lambda: status(standby)["state"] == "active", "takeover", TAKEOVER_TIMEOUT_S)
    active_ms = (time.monotonic() - killed) * 1000
    wait_for(lambda: pair.acked() > acked, "the client's next ack", TAKEOVER_TIMEOUT_S)
    ack_s = time.monotonic() - killed
    after = status(standby)["ha"]
    split = _SPLIT.search(after["last_change"])
    if after["active"] != after["agent"] or split is None:
        raise KemariError(f"{standby_host} active, but its record says: {after}")
    return Takeover(
        protect_s=protect_s,
        detect_ms=float(split.group(1)),
        arbitrate_ms=float(split.group(2)),
        resume_ms=float(status(standby)["failover"]["total_ms"]),
        active_ms=active_ms,
        ack_s=ack_s,
        term=int(after["term"]),
    )


@dataclass(frozen=True)
class HandOver:
    """A graceful ``quit`` of the protected active, and the standby's takeover."""

    active_ms: float  # quit → the standby says active
    ack_s: float  # quit → the client's next acknowledgement
    exit_status: int  # the quitting agent's
    last_change: str  # the new active's account of it


def quit_and_hand_over(pair: HaPair, active_host: str, standby_host: str) -> HandOver:
    """``quit`` on the protected active's monitor: its standby takes over by itself."""
    active, standby = pair.agents[active_host], pair.agents[standby_host]
    wait_for(lambda: protected_pair(active, standby), "protection", PROTECT_TIMEOUT_S)
    pair.wait_acked(3, "records acknowledged while protected")
    acked = pair.acked()
    asked = time.monotonic()
    active.monitor("quit")
    wait_for(lambda: status(standby)["state"] == "active", "takeover", TAKEOVER_TIMEOUT_S)
    active_ms = (time.monotonic() - asked) * 1000
    wait_for(lambda: pair.acked() > acked, "the client's next ack", TAKEOVER_TIMEOUT_S)
    ack_s = time.monotonic() - asked
    exit_status = active.process.wait(TAKEOVER_TIMEOUT_S)
    return HandOver(active_ms, ack_s, exit_status, str(status(standby)["ha"]["last_change"]))
