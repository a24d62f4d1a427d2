"""Agents of one VM on loopback for the guest tests: a standby started, the active
protected, the active killed, and the ticker guest's ticks read back."""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

from kemari.testbed.vm import AgentProcess
from kemari.testbed.wait import wait_for

TICK_RE = re.compile(r"^tick (\d+)\r?$", re.MULTILINE)


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def ticks(agent: AgentProcess) -> list[int]:
    """The ticker guest's tick numbers on the agent's console, in order."""
    return [int(value) for value in TICK_RE.findall(agent.serial_text())]


def start_standby(
    name: str, workdir: Path, args: Sequence[str], replica_dir: Path | str, label: str
) -> tuple[AgentProcess, str]:
    """A standby agent (``args`` plus ``--incoming`` on a free loopback port and
    ``--replica-dir``) whose monitor answers, and its URI; stopped again if it does not."""
    uri = f"kemari:tcp:127.0.0.1:{free_port()}"
    incoming = ["--incoming", uri, "--replica-dir", str(replica_dir)]
    standby = AgentProcess(name, workdir, [*args, *incoming], label=label)
    try:
        standby.wait_monitor()
    except BaseException:
        standby.stop()
        raise
    return standby, uri


def protect(active: AgentProcess, uri: str) -> None:
    """``migrate -d`` to the standby at ``uri``, then wait until the active is protected."""
    active.monitor("migrate", "-d", uri)
    wait_for(lambda: active.status()["protection"] == "protected", "protection", 120)


def kill_agent_and_qemu(agent: AgentProcess) -> None:
    """SIGKILL the agent and its QEMU: no cleanup runs."""
    qemu_pid = agent.status()["qemu_pid"]
    os.kill(agent.process.pid, signal.SIGKILL)
    os.kill(qemu_pid, signal.SIGKILL)
    agent.process.wait(30)
