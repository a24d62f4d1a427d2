"""Issue 10.5/10.6 end to end: a real ``kemari run`` agent protecting a real guest against a
standby process that shakes hands and then never reads again.

Before the send deadline, the primary waited on ``drain()`` forever: ``info status``
stayed ``syncing``/``protected`` and nothing was logged.  Now the send fails within
its deadline, protection is dropped (``migrate_cancel`` / ``x-colo-lost-heartbeat``),
the guest runs on, the status says why, and the agent logs one line.

This runs the agent as it is today (no TLS wiring needed: the deadline is in the
transaction layer, and a plain-TCP pair is announced with a warning).
"""

from __future__ import annotations

import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.stuck_standby import stuck_standby

from kemari.testbed.vm import AgentProcess, wait_for
from kemari.transaction.pki import make_credentials

pytestmark = [pytest.mark.guest, pytest.mark.usefixtures("image_and_patched_qemu")]

ROOT = Path(__file__).resolve().parent.parent
TICK_RE = re.compile(r"^tick (\d+)\r?$", re.MULTILINE)


@pytest.fixture(name="stuck_standby")
def stuck_standby_port() -> Iterator[int]:
    with stuck_standby() as port:
        yield port


def ticks(agent: AgentProcess) -> list[int]:
    return [int(value) for value in TICK_RE.findall(agent.serial_text())]


def test_a_standby_that_stops_reading_costs_protection_not_the_guest(
    tmp_path: Path, stuck_standby: int
) -> None:
    active = AgentProcess("stuck", tmp_path, ["--workload", "ticks", "--accel", "tcg"])
    try:
        active.wait_serial(r"tick 3\b")
        active.wait_monitor()
        active.monitor("migrate", "-d", f"kemari:tcp:127.0.0.1:{stuck_standby}")
        # The send deadline is 5 s; the old code stayed "syncing" here for good.
        wait_for(lambda: active.status()["protection"] == "unprotected", "protection dropped", 40)
        status = active.status()
        assert "send deadline" in status["replication"]["reason"], status["replication"]
        assert status["replication"]["tls"] is False
        before = ticks(active)[-1]
        wait_for(lambda: ticks(active)[-1] >= before + 3, "ticks after protection dropped", 60)
        assert active.status()["vm"] == "running"
        output = active.agent_output()
        lost = [line for line in output.splitlines() if "protection lost:" in line]
        assert len(lost) == 1, output
        assert "send deadline" in lost[0]
        assert "plain TCP" in output  # the unauthenticated channel was announced
        assert "socket.send() raised exception" not in output
    finally:
        assert active.stop() == 0


def test_a_pair_with_tls_creds_protects_over_authenticated_tls(tmp_path: Path) -> None:
    creds = tmp_path / "pki"
    make_credentials(creds, "kemari-tlspair")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    standby = AgentProcess(
        "tlspair",
        tmp_path,
        [
            "--workload", "ticks", "--accel", "tcg", "--tls-creds", str(creds),
            "--incoming", f"kemari:tcp:127.0.0.1:{port}",
            "--replica-dir", str(Path("/dev/shm") / f"kemari-test-tls-{port}"),
        ],
        label="tls-standby",
    )  # fmt: skip
    active = AgentProcess(
        "tlspair",
        tmp_path,
        ["--workload", "ticks", "--accel", "tcg", "--tls-creds", str(creds)],
        label="tls-active",
    )
    try:
        standby.wait_monitor()
        active.wait_serial(r"tick 3\b")
        active.wait_monitor()
        active.monitor("migrate", "-d", f"kemari:tcp:127.0.0.1:{port}")
        wait_for(lambda: active.status()["protection"] == "protected", "protection", 120)
        assert active.status()["replication"]["tls"] is True
        assert "plain TCP" not in active.agent_output() + standby.agent_output()
    finally:
        active.stop()
        standby.stop()
        shutil.rmtree(Path("/dev/shm") / f"kemari-test-tls-{port}", ignore_errors=True)
