"""A ``kemari run`` agent started as a real child process, for tests and the demo.

The child is the real CLI (no in-process shortcuts): it is optionally placed in
a network namespace, its guest console is read from the serial log file, and
its monitor is reached through the real monitor socket.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from kemari.errors import KemariError
from kemari.monitor.client import run_command
from kemari.monitor.protocol import Reply
from kemari.testbed.topology import Namespace
from kemari.testbed.wait import wait_for

KEMARI_ARGV = (sys.executable, "-m", "kemari.cli.main")
__all__ = ["AgentProcess", "kill_active", "wait_for"]  # wait_for lives in kemari.testbed.wait


class AgentProcess:
    """One ``kemari run`` child with its runtime directory and serial log."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        args: Sequence[str],
        namespace: Namespace | None = None,
        label: str | None = None,
    ) -> None:
        """``label`` names this agent's files (default: the VM name); two agents of one
        VM (active and standby) need different labels."""
        self.name = name
        self.label = label or name
        self.runtime_dir = workdir / f"{self.label}-run"
        self.serial_log = workdir / f"{self.label}-serial.log"
        self.agent_log = workdir / f"{self.label}-agent.log"
        self.monitor_path = self.runtime_dir / "monitor.sock"
        argv = [
            *KEMARI_ARGV, "run", "--name", name,
            "--runtime-dir", str(self.runtime_dir), "--serial-log", str(self.serial_log),
            *args,
        ]  # fmt: skip
        self._log_handle = self.agent_log.open("ab")
        command = namespace.argv(argv) if namespace is not None else argv
        self.process = subprocess.Popen(
            command, stdout=self._log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def serial_text(self) -> str:
        """Everything the guest printed on its serial console so far."""
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def agent_output(self) -> str:
        """Everything the agent printed so far."""
        return self.agent_log.read_text(errors="replace")

    def wait_serial(self, pattern: str, timeout: float = 180.0, after: int = 0) -> re.Match[str]:
        """Wait until ``pattern`` appears in the serial log past offset ``after``."""
        regex = re.compile(pattern)

        def appeared() -> re.Match[str] | None:
            match = regex.search(self.serial_text(), after)
            if match is None and self.process.poll() is not None:
                raise KemariError(
                    f"agent {self.label} exited ({self.process.returncode}) before "
                    f"{pattern!r} appeared: {self.agent_output()[-2000:]}"
                )
            return match

        return wait_for(
            appeared,
            f"{pattern!r} on {self.label}'s console",
            timeout,
            interval=0.1,
            detail=lambda: f"console tail: {self.serial_text()[-1500:]!r}",
        )

    def wait_monitor(self, timeout: float = 60.0) -> None:
        """Wait until the agent's monitor answers and the agent has taken its first role.

        The monitor answers from early in the start-up, before a standby's receiver
        listens or an active's QEMU runs: a test that went on then would race them.
        """
        last_error = ""

        def answers() -> bool:
            nonlocal last_error
            try:
                state = str(self.status()["state"])
            except KemariError as exc:
                if self.process.poll() is not None:
                    raise
                last_error = str(exc)
                return False
            last_error = f"state {state}"
            return state != "starting"

        wait_for(
            answers,
            f"{self.label}'s monitor to answer with a role taken",
            timeout,
            interval=0.1,
            detail=lambda: f"last error: {last_error}",
        )

    def monitor(self, *words: str) -> Reply:
        """Send a monitor command and return the reply."""
        return run_command(self.monitor_path, list(words))

    def migrate_following(self, uri: str, timeout: float = 240.0) -> str:
        """``kemari monitor SOCK migrate URI`` without ``-d``, as an operator types it: the
        CLI draws the initial sync until the standby can take over.  Returns its output;
        KemariError if it fails."""
        command = [*KEMARI_ARGV, "monitor", str(self.monitor_path), "migrate", uri]
        follow = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        if follow.returncode != 0:
            raise KemariError(
                f"migrate {uri} on {self.label} failed ({follow.returncode}): "
                f"{follow.stdout[-1000:]}{follow.stderr[-1000:]}"
            )
        return follow.stdout

    def status(self) -> dict[str, Any]:
        """``query-status``: the status as JSON data (docs/status.md)."""
        data: dict[str, Any] = self.monitor("query-status").data
        return data

    def stop(self, timeout: float = 60.0) -> int:
        """Ask the agent to stop (SIGTERM), kill it if it must; returns its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_handle.close()
        return self.process.returncode


def kill_active(active: AgentProcess, rng: random.Random) -> list[str]:
    """SIGKILL the active side's QEMU, its agent, or both, in a random order.

    Returns what was killed on purpose, in order (``"qemu"``, ``"agent"``); once
    this returns, both are gone.
    """
    qemu_pid = active.status()["qemu_pid"]
    victims = [("qemu", qemu_pid), ("agent", active.process.pid)]
    rng.shuffle(victims)
    killed = victims[: rng.choice((1, 2))]
    for _, pid in killed:
        os.kill(pid, signal.SIGKILL)
    active.process.wait(30)
    # A killed agent takes its QEMU along (PR_SET_PDEATHSIG); make sure it is gone.
    with contextlib.suppress(ProcessLookupError):
        os.kill(qemu_pid, signal.SIGKILL)
    return [name for name, _ in killed]
