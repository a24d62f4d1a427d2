"""A kill of the active host at each phase of a checkpoint loses nothing acknowledged.

The active agent kills itself with a real SIGKILL (test hook, kemari/crashpoint.py)
at one named phase of a checkpoint while a client stores records back to back on one TCP
connection to the ``records`` guest (shared storage, disk through Kemari's overlay):

- ``before-reply``: QEMU asked for checkpoint N, Kemari had not answered;
- ``during-pages``: half of checkpoint N's transaction was on the wire;
- ``after-device-state``: all of N but its outputs and COMMIT were sent;
- ``output-release``: N was committed on the standby, none of its outputs released;
- ``during-release``: N's first output was released, the others not;
- ``in-flight``: the guest already runs past checkpoint N (VMSTATE_LOADED sent), whose
  COMMIT_ACK has not arrived (pipelined checkpoints, docs/protocol.md);
- ``two-in-flight``: checkpoints N-1 and N are both captured and unacknowledged (the
  standby holds each COMMIT_ACK back 40 ms, like a long link, so they pile up; two
  clients keep outputs coming while a reply waits for its commit).

After the manual failover the same connection goes on, every record the client saw
acknowledged is stored in the guest, in order (no answer escaped before its commit, no
acknowledged write was lost), and the data disk passes ``e2fsck`` after its journal is
replayed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE, Popen

import pytest
from support.fsck import check_crashed_disk
from test_eventtap_guest import GUEST_IP, PORT, STANDBY_IP, loop_client, start_pair

from kemari.testbed.topology import Namespace, Topology

pytestmark = [
    pytest.mark.guest,
    pytest.mark.root,
    pytest.mark.usefixtures("image_and_patched_qemu"),
]

# (hook, sync policy): a release of several outputs at once needs periodic checkpoints
# (with the event policy the first output of an epoch triggers its checkpoint at once, so
# most commits carry a single output).
PHASES = [
    ("before-reply=6", "event+periodic"),
    ("during-pages=6", "event+periodic"),
    ("after-device-state=6", "event+periodic"),
    ("output-release=3", "event+periodic"),
    ("during-release=2", "periodic"),
    ("in-flight=6", "event+periodic"),
]


@pytest.fixture
def phase_lab() -> Iterator[Topology]:
    with Topology() as topology:
        yield topology


@pytest.mark.parametrize(("crash", "sync"), PHASES)
def test_kill_at_a_protocol_phase_loses_nothing_acknowledged(
    tmp_path: Path, phase_lab: Topology, crash: str, sync: str
) -> None:
    primary, standby, client_ns, _ = start_pair(phase_lab, tmp_path, sync, crash)
    with primary, standby:
        loop = loop_client(client_ns, 20)
        primary.monitor("migrate", "-d", f"kemari:tcp:{STANDBY_IP}:{PORT}")
        # The hook fires on its own once the named phase of checkpoint N is reached.
        assert primary.process.wait(120) == -9, primary.agent_output()[-2000:]
        reply = standby.monitor("failover")
        assert reply.data["epoch"] >= 1
        stdout, _ = loop.communicate(timeout=240)
        assert loop.returncode == 0, "the client's connection did not survive the failover"
        acked = stdout.decode().split()
        assert acked, "the client stored nothing"
        stored = client_ns.run(
            [sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "get"], timeout=120
        ).stdout
        loop_records = [payload for payload in json.loads(stored) if payload.startswith("loop-")]
        assert loop_records[: len(acked)] == acked, (crash, acked[-3:], loop_records[-3:])
        assert len(loop_records) <= len(acked) + 1
        assert standby.stop() == 0
    check_crashed_disk(tmp_path / "data.img", tmp_path)


def test_kill_with_two_checkpoints_in_flight_loses_nothing_acknowledged(
    tmp_path: Path, phase_lab: Topology
) -> None:
    primary, standby, client_ns, _ = start_pair(
        phase_lab, tmp_path, "event+periodic", "two-in-flight=6", standby_crash="ack-delay-ms=40"
    )
    with primary, standby:
        loops = {prefix: prefixed_loop(client_ns, prefix, 20) for prefix in ("one", "two")}
        primary.monitor("migrate", "-d", f"kemari:tcp:{STANDBY_IP}:{PORT}")
        assert primary.process.wait(120) == -9, primary.agent_output()[-2000:]
        reply = standby.monitor("failover")
        assert reply.data["epoch"] >= 1
        acked: dict[str, list[str]] = {}
        for prefix, loop in loops.items():
            stdout, _ = loop.communicate(timeout=240)
            assert loop.returncode == 0, f"client {prefix} did not survive the failover"
            acked[prefix] = stdout.decode().split()
            assert acked[prefix], f"client {prefix} stored nothing"
        stored = client_ns.run(
            [sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "get"], timeout=120
        ).stdout
        payloads = json.loads(stored)
        for prefix, mine in acked.items():
            records = [payload for payload in payloads if payload.startswith(f"{prefix}-")]
            assert records[: len(mine)] == mine, (prefix, mine[-3:], records[-3:])
            assert len(records) <= len(mine) + 1
        assert standby.stop() == 0
    check_crashed_disk(tmp_path / "data.img", tmp_path)


def prefixed_loop(namespace: Namespace, prefix: str, seconds: float) -> Popen[bytes]:
    """Like ``loop_client``, with records named ``PREFIX-N`` (two loops side by side)."""
    return namespace.popen(
        [
            sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "loop",
            "--prefix", prefix, "--seconds", str(seconds),
        ],
        stdout=PIPE,
    )  # fmt: skip
