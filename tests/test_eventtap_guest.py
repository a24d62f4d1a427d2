"""The network event-tap with a real guest: two host namespaces, a client, real packets.

Topology (kemari.testbed.topology): a primary and a standby host namespace, each with its
own ``br0`` bridged to one LAN, and a client namespace on the LAN.  The primary runs the
``records`` guest under ``kemari run``; the standby runs ``kemari run --incoming`` and
receives the checkpoints over the LAN (host addresses on ``br0``, not loopback).

* Answers wait for their checkpoint: the standby agent is frozen (SIGSTOP) while the
  client sends a request; the guest's answer is produced (the primary's event-tap holds
  it) but no frame of it reaches the client until the standby runs again and the
  checkpoint commits.  Every frame the primary released travelled inside a committed
  transaction first (the standby's output counter), none passed unheld while protected.
* Failover replays the last event: the primary kills itself (SIGKILL, crashpoint
  ``output-release``) right after the standby committed a checkpoint carrying the
  answer to a request, before the answer left; the standby's failover sends it again,
  the client gets it on its still-open connection, and the same connection keeps
  working.  A capture in the client namespace shows the guest's self-announce (RARP)
  arriving through the standby's path after the failover.
* No acknowledged answer is lost: a client stores records back to back on one
  connection while the primary's agent and QEMU are killed at a random moment; after
  the failover the same connection goes on, and every record the client saw
  acknowledged is stored in the failed-over guest, in order.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.pcap import capture, pcap_records

from kemari.crashpoint import ENVIRONMENT_VARIABLE
from kemari.image.disk import create_data_disk
from kemari.testbed.topology import Namespace, Topology
from kemari.testbed.vm import AgentProcess
from kemari.testbed.wait import wait_for

pytestmark = [
    pytest.mark.guest,
    pytest.mark.root,
    pytest.mark.usefixtures("image_and_patched_qemu"),
]

GUEST_IP = "10.213.0.2"
PRIMARY_IP = "10.213.0.11"
STANDBY_IP = "10.213.0.12"
CLIENT_IP = "10.213.0.100"
GUEST_MAC = "52:54:00:e7:00:01"
# Every frame from the guest's MAC.
guest_capture = functools.partial(capture, mac=GUEST_MAC)
PORT = 7100
ETH_P_RARP = 0x8035

# A records client on one TCP connection: "PUT warm" at once, then one request per stdin
# line; every answer is printed as one line.
CLIENT_SCRIPT = """
import socket, sys
sock = socket.create_connection((sys.argv[1], 7000), timeout=180)
replies = sock.makefile("rb")
def call(line):
    sock.sendall(line.encode() + b"\\n")
    return replies.readline().decode().strip()
print(call("PUT warm"), flush=True)
for line in sys.stdin:
    print(call(line.strip()), flush=True)
"""


def loop_client(namespace: Namespace, seconds: float) -> subprocess.Popen[bytes]:
    """``loop-N`` records stored on one connection for ``seconds``; prints each acknowledged."""
    return namespace.popen(
        [
            sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "loop",
            "--prefix", "loop", "--seconds", str(seconds),
        ],
        stdout=subprocess.PIPE,
    )  # fmt: skip


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Topology]:
    with Topology() as topology:
        yield topology
    for leftover in Path("/dev/shm").glob(f"kemari-evt-{os.getpid()}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def agent_args(disk: Path, tap: str, sync: str) -> list[str]:
    return [
        "--workload", "records", "--accel", "tcg", "--guest-ip", f"{GUEST_IP}/24",
        "--disk", str(disk), "--nic", f"mac={GUEST_MAC},tap={tap},bridge=br0", "--sync", sync,
    ]  # fmt: skip


def start_pair(
    lab: Topology,
    workdir: Path,
    sync: str,
    crash: str | None = None,
    extra_args: tuple[str, ...] = (),
    standby_crash: str | None = None,
) -> tuple[AgentProcess, AgentProcess, Namespace, Namespace]:
    """The primary (records guest booted) and a listening standby, and the client ns;
    ``extra_args`` go to both agents' ``kemari run``; ``crash`` and ``standby_crash`` arm
    test hooks (kemari/crashpoint.py) in the primary and the standby."""
    primary_ns = lab.add_host("primary", f"{PRIMARY_IP}/24")
    standby_ns = lab.add_host("standby", f"{STANDBY_IP}/24")
    client_ns = lab.add_client("client", f"{CLIENT_IP}/24")
    disk = workdir / "data.img"
    create_data_disk(disk, 64)
    environment = dict(os.environ)
    if crash is not None:
        os.environ[ENVIRONMENT_VARIABLE] = crash
    try:
        primary = AgentProcess(
            "evt",
            workdir,
            [*agent_args(disk, "kt-evt0", sync), *extra_args],
            namespace=primary_ns,
            label="p",
        )
    finally:
        os.environ.clear()
        os.environ.update(environment)
    if standby_crash is not None:
        os.environ[ENVIRONMENT_VARIABLE] = standby_crash
    try:
        standby = AgentProcess(
            "evt",
            workdir,
            [
                *agent_args(disk, "kt-evt0", sync),
                *extra_args,
                "--incoming", f"kemari:tcp:{STANDBY_IP}:{PORT}",
                "--replica-dir", f"/dev/shm/kemari-evt-{os.getpid()}-{sync}",
            ],
            namespace=standby_ns,
            label="s",
        )  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(environment)
    primary.wait_serial(r"workload records ready")
    primary.wait_monitor()
    standby.wait_monitor()
    return primary, standby, client_ns, standby_ns


def protect(primary: AgentProcess) -> None:
    primary.monitor("migrate", "-d", f"kemari:tcp:{STANDBY_IP}:{PORT}")
    wait_for(lambda: primary.status()["protection"] == "protected", "protection", 120)


class Client:
    """CLIENT_SCRIPT running in the client namespace."""

    def __init__(self, namespace: Namespace) -> None:
        self.process = namespace.popen(
            [sys.executable, "-c", CLIENT_SCRIPT, GUEST_IP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._pending = b""

    def send(self, request: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(request.encode() + b"\n")
        self.process.stdin.flush()

    def line(self, timeout: float) -> str | None:
        """The next answer, or None if none came within ``timeout`` seconds."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    raise AssertionError(f"client exited ({self.process.wait()})")
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()


def test_answers_leave_only_after_their_checkpoint_commits(tmp_path: Path, lab: Topology) -> None:
    primary, standby, client_ns, _ = start_pair(lab, tmp_path, "event")
    with primary, standby:
        client = Client(client_ns)
        assert (client.line(120) or "").startswith("OK ")  # unprotected: flows at once
        assert primary.status()["eventtap"]["passed"] > 0
        protect(primary)
        passed = primary.status()["eventtap"]["passed"]
        for index in range(20):
            client.send(f"PUT protected-{index}")
            assert (client.line(60) or "").startswith("OK ")
        # Every answer above was released; the tap is idle once nothing is held.
        wait_for(lambda: primary.status()["eventtap"]["held"] == 0, "an idle event-tap", 10)

        os.kill(standby.process.pid, signal.SIGSTOP)
        try:
            # Everything is held from now on, a late delayed ACK of the guest too; the
            # answer is one frame more than what is held already.
            already_held = primary.status()["eventtap"]["held"]
            client.send("PUT frozen")
            wait_for(
                lambda: primary.status()["eventtap"]["held"] > already_held, "a held answer", 5
            )
            # The guest answered, the checkpoint cannot commit: nothing reaches the client.
            assert client.line(2.0) is None
            tap = primary.status()["eventtap"]
            assert tap["held"] > 0 and tap["passed"] == passed, tap
        finally:
            os.kill(standby.process.pid, signal.SIGCONT)
        answer = client.line(30)
        assert answer is not None and answer.startswith("OK "), answer

        wait_for(lambda: primary.status()["eventtap"]["held"] == 0, "release", 10)
        status = primary.status()
        tap = status["eventtap"]
        assert status["protection"] == "protected"
        assert tap["passed"] == passed  # nothing left unheld while protected
        assert tap["released"] >= 21 and tap["latency_ms_p50"] is not None
        # Every released frame was inside a transaction the standby committed.
        assert standby.status()["standby"]["outputs_committed"] >= tap["released"]
        client.send("COUNT")
        assert client.line(30) is not None


def test_failover_replays_the_answer_the_primary_never_released(
    tmp_path: Path, lab: Topology
) -> None:
    primary, standby, client_ns, standby_ns = start_pair(
        lab, tmp_path, "event+periodic", crash="output-release=1"
    )
    with primary, standby:
        client = Client(client_ns)
        assert (client.line(120) or "").startswith("OK ")
        protect(primary)
        qemu_pid = primary.status()["qemu_pid"]
        with (
            capture(
                standby_ns, "kt-evt0", tmp_path / "standby-tap.pcap", GUEST_MAC
            ) as standby_pcap,
            guest_capture(client_ns, "eth0", tmp_path / "client.pcap") as client_pcap,
        ):
            client.send("PUT replayed")
            # The first commit carrying an output kills the primary before the release.
            assert primary.process.wait(60) == -signal.SIGKILL
            with contextlib.suppress(ProcessLookupError):
                os.kill(qemu_pid, signal.SIGKILL)
            reply = standby.monitor("failover")
            assert reply.data["replayed_frames"] >= 1
            answer = client.line(60)
            assert answer is not None and answer.startswith("OK "), answer
            # The same TCP connection goes on with the failed-over guest.
            client.send("PUT after-failover")
            assert (client.line(60) or "").startswith("OK ")
            # The replayed frames on the standby's tap, and QEMU's self-announce (RARP
            # rounds at 50 ms, then 100 ms steps) at the client; tcpdump -U writes each.
            wait_for(
                lambda: len(pcap_records(standby_pcap)) >= reply.data["replayed_frames"],
                "the replayed frames on the standby's tap",
                10,
            )
            wait_for(
                lambda: any(
                    f[12:14] == ETH_P_RARP.to_bytes(2, "big") for _, f in pcap_records(client_pcap)
                ),
                "QEMU's self-announce (RARP) at the client",
                10,
            )
        records = client_ns.run(
            [sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "get"], timeout=120
        ).stdout
        for payload in ("warm", "replayed", "after-failover"):
            assert f'"{payload}"' in records, records


def test_acknowledged_records_survive_a_kill_at_a_random_moment(
    tmp_path: Path, lab: Topology
) -> None:
    rng = random.Random(os.environ.get("KEMARI_TEST_SEED", time.time_ns()))
    primary, standby, client_ns, _ = start_pair(lab, tmp_path, "event+periodic")
    with primary, standby:
        protect(primary)
        qemu_pid = primary.status()["qemu_pid"]
        loop = loop_client(client_ns, 15)
        time.sleep(rng.uniform(1.0, 4.0))  # the kill comes at a random moment: tested
        victims = [qemu_pid, primary.process.pid]
        rng.shuffle(victims)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        primary.process.wait(30)
        assert standby.monitor("failover").data["epoch"] >= 1
        stdout, _ = loop.communicate(timeout=240)
        assert loop.returncode == 0, "the client's connection did not survive the failover"
        acked = stdout.decode().split()
        stored = client_ns.run(
            [sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "get"], timeout=120
        ).stdout
        loop_records = [payload for payload in json.loads(stored) if payload.startswith("loop-")]
        # Every acknowledged record is there, in order (the guest may hold one more whose
        # answer never left: the kill came before its checkpoint committed).
        assert loop_records[: len(acked)] == acked, (acked[-3:], loop_records[-3:])
        assert len(loop_records) <= len(acked) + 1
