"""The records soak: chained kill/failover rounds under a client that never reconnects.

Two host namespaces ``a`` and ``b`` and a client namespace share one LAN
(kemari.testbed.topology).  The ``records`` guest starts under ``kemari run`` on
``a``; the client stores ``soak-0``, ``soak-1``, ... back to back on ONE TCP
connection for the whole soak and logs every acknowledged record.  Each round:

1. a fresh standby starts on the other host (the one whose agent died in the
   previous round: its tap name, MAC and address are reused at once); shared
   storage names the same image, replicated storage a new empty image (the dead
   agent's stale one is removed);
2. ``migrate -d`` until protected (replicated: and the initial disk copy is done);
3. after a random 1-4 s the active's QEMU, its agent, or both are SIGKILLed in a
   random order;
4. ``failover`` on the standby, which becomes the next round's active; the round
   ends once the client got its next acknowledgement over the same connection.

At the end the client stops (exit status 0: its connection survived every
failover), the acknowledged records must be exactly the first stored ``soak-``
records in order (the guest may hold one more, whose answer never left: the kill
came before its checkpoint committed), the last active stops cleanly, and its
image passes a journal replay and ``e2fsck -fn``.  Every random choice comes
from one seed, printed by the callers so a failure can be replayed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from kemari.config import StorageMode
from kemari.errors import KemariError
from kemari.image.disk import create_data_disk
from kemari.testbed.records import LOOP_TIMEOUT_S
from kemari.testbed.topology import Namespace, Topology
from kemari.testbed.vm import AgentProcess, kill_active, wait_for
from support.fsck import check_crashed_disk

GUEST_IP = "10.214.0.2"
HOST_IPS = {"a": "10.214.0.11", "b": "10.214.0.12"}
CLIENT_IP = "10.214.0.100"
GUEST_MAC = "52:54:00:e7:00:05"
TAP = "kt-soak0"
PORT = 7100
DISK_MIB = 64
SYNC = "event+periodic"
VM_NAME = "soak"
RECORD_PREFIX = "soak"
# What the active agent prints when a replicated disk's initial copy is committed.
DISK_COPIED = "copied to the standby"
PROTECT_TIMEOUT_S = 180.0
RESUME_TIMEOUT_S = 120.0
_T = TypeVar("_T")


class SoakError(KemariError):
    """A soak round or the final check failed; the message names the seed and the logs."""


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """What one kill/failover round did and how long it took."""

    number: int
    killed_host: str
    killed: tuple[str, ...]  # "qemu", "agent": what was SIGKILLed, in order
    protect_s: float  # migrate -> protected (replicated: and the disk copied)
    ran_s: float  # protected run before the kill
    failover_ms: float  # the standby's failover command, as the operator waits for it
    qemu_ms: float  # of which: replica -> QEMU running (the agent's own measure)
    epoch: int  # the checkpoint the guest resumed from
    resume_s: float  # kill -> the client's first acknowledgement after it
    acked: int  # records acknowledged so far

    def line(self, rounds: int, storage: StorageMode) -> str:
        """One human line."""
        return (
            f"round {self.number}/{rounds} [{storage.value}] killed {'+'.join(self.killed)} "
            f"on {self.killed_host}: protected in {self.protect_s:.1f} s, ran {self.ran_s:.1f} s; "
            f"failover {self.failover_ms:.0f} ms (QEMU {self.qemu_ms:.0f} ms) from epoch "
            f"{self.epoch}; client resumed after {self.resume_s:.2f} s; "
            f"{self.acked} records acknowledged"
        )


@dataclasses.dataclass(frozen=True)
class SoakResult:
    """A finished soak: every check passed."""

    storage: StorageMode
    seed: int
    rounds: tuple[RoundResult, ...]
    acked: int
    stored: int

    def summary(self) -> str:
        """A few human lines: counts and the failover time distribution."""
        failovers = [r.failover_ms for r in self.rounds]
        resumes = [r.resume_s for r in self.rounds]
        lines = [
            f"[{self.storage.value}] seed {self.seed}: {len(self.rounds)} rounds passed, "
            f"{self.acked} records acknowledged, {self.stored} stored, e2fsck -fn clean"
        ]
        if self.rounds:
            lines.append(
                f"[{self.storage.value}] failover command p50 {statistics.median(failovers):.0f} "
                f"ms, max {max(failovers):.0f} ms; client resumed p50 "
                f"{statistics.median(resumes):.2f} s, max {max(resumes):.2f} s"
            )
        return "\n".join(lines)


def records_agent_args(image: Path, storage: StorageMode) -> list[str]:
    """The guest-visible ``kemari run`` arguments every agent of the soak shares."""
    return [
        "--workload", "records", "--accel", "tcg", "--guest-ip", f"{GUEST_IP}/24",
        "--disk", str(image), "--nic", f"mac={GUEST_MAC},tap={TAP},bridge=br0",
        "--sync", SYNC, "--storage", storage.value,
    ]  # fmt: skip


class RecordsSoak:
    """The hosts, the agents and the client of one soak; ``close()`` removes everything."""

    def __init__(self, topology: Topology, workdir: Path, storage: StorageMode, seed: int) -> None:
        self.topology = topology
        self.workdir = workdir
        self.storage = storage
        self.seed = seed
        self.rng = random.Random(seed)
        self.hosts: dict[str, Namespace] = {}
        self.client_ns: Namespace | None = None
        self.active: AgentProcess | None = None
        self.active_host = "a"
        self.images: dict[str, Path] = {}  # host -> the image its agent uses
        self.acked_log = workdir / "acked.log"
        self._client: subprocess.Popen[bytes] | None = None
        self._client_files: list[IO[bytes]] = []
        self._agents: list[AgentProcess] = []
        self._replica_dirs: dict[str, Path] = {}  # agent label -> its replica directory

    def start(self) -> None:
        """Boot the records guest on host ``a`` and start the client."""
        for host, ip in HOST_IPS.items():
            self.hosts[host] = self.topology.add_host(host, f"{ip}/24")
        self.client_ns = self.topology.add_client("client", f"{CLIENT_IP}/24")
        image = self._image_path("a", 0)
        create_data_disk(image, DISK_MIB)
        self.images["a"] = image
        active = self._start_agent("a", 0, image)
        active.wait_serial(r"workload records ready")
        active.wait_monitor()
        self.active = active
        acked = self.acked_log.open("wb")
        errors = (self.workdir / "client.log").open("wb")
        self._client_files = [acked, errors]
        self._client = self.client_ns.popen(
            [
                sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "loop",
                "--prefix", RECORD_PREFIX,
            ],
            stdin=subprocess.PIPE, stdout=acked, stderr=errors,
        )  # fmt: skip

    def round(self, number: int) -> RoundResult:
        """Protect the active with a fresh standby, kill the active, fail over."""
        try:
            return self._round(number)
        except KemariError as exc:
            raise self._failure(f"round {number}", exc) from exc

    def finish(self) -> SoakResult:
        """Stop the client, check the stored records and the final image."""
        try:
            return self._finish()
        except KemariError as exc:
            raise self._failure("final check", exc) from exc

    def close(self) -> None:
        """Stop every agent and the client, remove the replicas on /dev/shm."""
        if self._client is not None and self._client.poll() is None:
            self._client.kill()
            self._client.wait()
        for handle in self._client_files:
            handle.close()
        for agent in self._agents:
            agent.stop()
        for replica_dir in self._replica_dirs.values():
            shutil.rmtree(replica_dir, ignore_errors=True)

    def __enter__(self) -> RecordsSoak:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one round -------------------------------------------------------------

    def _round(self, number: int) -> RoundResult:
        active, active_host = self._started(self.active), self.active_host
        standby_host = "b" if active_host == "a" else "a"
        standby_image = self._standby_image(standby_host, number)
        target = f"kemari:tcp:{HOST_IPS[standby_host]}:{PORT}"
        standby = self._start_agent(standby_host, number, standby_image, incoming=target)
        standby.wait_monitor()
        protecting = time.monotonic()
        copies = active.agent_output().count(DISK_COPIED)
        active.monitor("migrate", "-d", target)
        wait_for(
            lambda: active.status()["protection"] == "protected", "protection", PROTECT_TIMEOUT_S
        )
        if self.storage is StorageMode.REPLICATED:
            wait_for(
                lambda: active.agent_output().count(DISK_COPIED) > copies,
                "the initial disk copy",
                PROTECT_TIMEOUT_S,
            )
        protect_s = time.monotonic() - protecting
        ran_s = self.rng.uniform(1.0, 4.0)
        time.sleep(ran_s)

        killed = kill_active(active, self.rng)
        killed_at = time.monotonic()
        acked_at_kill = self.acked_count()
        # The dead agent's replica is the memory of a QEMU that no longer runs.
        dead_replica = self._replica_dirs.pop(active.label, None)
        if dead_replica is not None:
            shutil.rmtree(dead_replica, ignore_errors=True)
        commanded = time.monotonic()
        reply = standby.monitor("failover")
        failover_ms = (time.monotonic() - commanded) * 1000
        epoch = int(reply.data["epoch"])
        wait_for(
            lambda: self.acked_count() > acked_at_kill,
            "the client's first acknowledgement after the failover",
            RESUME_TIMEOUT_S,
        )
        resume_s = time.monotonic() - killed_at
        self.active, self.active_host = standby, standby_host
        self.images[standby_host] = standby_image
        return RoundResult(
            number=number,
            killed_host=active_host,
            killed=tuple(killed),
            protect_s=protect_s,
            ran_s=ran_s,
            failover_ms=failover_ms,
            qemu_ms=float(reply.data["total_ms"]),
            epoch=epoch,
            resume_s=resume_s,
            acked=self.acked_count(),
        )

    def _standby_image(self, host: str, number: int) -> Path:
        """The image the new standby on ``host`` names (replicated: new and empty)."""
        if self.storage is StorageMode.SHARED:
            return self.images["a"]
        stale = self.images.pop(host, None)
        if stale is not None:
            stale.unlink()
        image = self._image_path(host, number)
        with image.open("wb") as handle:  # sparse and empty: the initial copy fills it
            handle.truncate(DISK_MIB << 20)
        return image

    def _image_path(self, host: str, number: int) -> Path:
        if self.storage is StorageMode.SHARED:
            return self.workdir / "shared.raw"
        return self.workdir / f"{host}-r{number}.raw"

    def _start_agent(
        self, host: str, number: int, image: Path, incoming: str | None = None
    ) -> AgentProcess:
        """An agent on ``host`` (a standby when ``incoming`` is given), labelled by round."""
        label = f"r{number}-{host}"
        args = records_agent_args(image, self.storage)
        if incoming is not None:
            replica_dir = Path(f"/dev/shm/kemari-soak-{os.getpid()}-{self.storage.value}-{label}")
            self._replica_dirs[label] = replica_dir
            args += ["--incoming", incoming, "--replica-dir", str(replica_dir)]
        agent = AgentProcess(VM_NAME, self.workdir, args, self.hosts[host], label)
        self._agents.append(agent)
        return agent

    # -- the end ---------------------------------------------------------------

    def _finish(self) -> SoakResult:
        client = self._started(self._client)
        assert client.stdin is not None
        client.stdin.close()  # EOF: the client finishes its record in flight and exits
        try:
            status = client.wait(LOOP_TIMEOUT_S + 60)
        except subprocess.TimeoutExpired as exc:
            raise SoakError("the client did not stop after its stdin closed") from exc
        if status != 0:
            raise SoakError(
                f"the client exited {status} (its connection did not survive): "
                f"{self._client_errors()}"
            )
        acked = self.acked_log.read_text().split()
        client_ns = self._started(self.client_ns)
        listing = client_ns.run(
            [sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "get"], timeout=120
        )
        stored = [p for p in json.loads(listing.stdout) if p.startswith(f"{RECORD_PREFIX}-")]
        if stored[: len(acked)] != acked or len(stored) > len(acked) + 1:
            raise SoakError(
                f"{len(acked)} records acknowledged, {len(stored)} stored; first difference at "
                f"{_first_difference(acked, stored)}: acknowledged ...{acked[-3:]}, "
                f"stored ...{stored[-3:]}"
            )
        active = self._started(self.active)
        status = active.stop()
        if status != 0:
            raise SoakError(f"the last active ({active.label}) stopped with status {status}")
        scratch = self.workdir / "fsck"
        scratch.mkdir(exist_ok=True)
        check_crashed_disk(self.images[self.active_host], scratch)
        return SoakResult(self.storage, self.seed, (), len(acked), len(stored))

    # -- helpers ---------------------------------------------------------------

    def acked_count(self) -> int:
        """Records the client saw acknowledged so far; SoakError if it has exited."""
        client = self._started(self._client)
        if client.poll() is not None:
            raise SoakError(f"the client exited {client.returncode}: {self._client_errors()}")
        return self.acked_log.read_bytes().count(b"\n")

    def _client_errors(self) -> str:
        return (self.workdir / "client.log").read_text(errors="replace").strip()[-1000:]

    def _failure(self, where: str, exc: KemariError) -> SoakError:
        return SoakError(
            f"{where} failed [{self.storage.value}, seed {self.seed}]: {exc} "
            f"(agent and serial logs in {self.workdir})"
        )

    @staticmethod
    def _started(value: _T | None) -> _T:
        if value is None:
            raise SoakError("the soak has not started")
        return value


def _first_difference(acked: list[str], stored: list[str]) -> int:
    for index, (left, right) in enumerate(zip(acked, stored, strict=False)):
        if left != right:
            return index
    return min(len(acked), len(stored))


def run_soak(
    storage: StorageMode,
    rounds: int,
    seed: int,
    workdir: Path,
    on_round: Callable[[RoundResult], Any] = lambda result: None,
) -> SoakResult:
    """A whole soak in a new testbed; ``on_round`` sees each round's result as it ends."""
    results: list[RoundResult] = []
    with Topology() as topology, RecordsSoak(topology, workdir, storage, seed) as soak:
        for number in range(1, rounds + 1):
            result = soak.round(number)
            results.append(result)
            on_round(result)
        final = soak.finish()
    return dataclasses.replace(final, rounds=tuple(results))
