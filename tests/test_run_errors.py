"""``kemari run`` with bad input: one clear error line, non-zero exit, nothing left behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

KEMARI = [sys.executable, "-m", "kemari.cli.main"]


def kemari_run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KEMARI, "run", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("kemari: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def leftovers(runtime: Path) -> list[str]:
    """What a failed run left in its runtime directory (the serial log may stay)."""
    if not runtime.exists():
        return []
    return sorted(p.name for p in runtime.iterdir() if p.name != "serial.log")


def qemu_children() -> list[str]:
    ps = subprocess.run(["ps", "-eo", "ppid=,comm="], capture_output=True, text=True, check=True)
    mine = str(os.getpid())
    return [line for line in ps.stdout.splitlines() if line.split()[0] == mine and "qemu" in line]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--name", "Bad_Name"], "name:"),
        (["--name", "vm", "--memory", "lots"], "memory: expected a size"),
        (["--name", "vm", "--vcpus", "0"], "vcpus: 0 is outside"),
        (["--name", "vm", "--guest-ip", "10.1.1.1"], "guest_ip"),
        (["--name", "vm", "--kernel", "/nonexistent/vmlinuz"], "kernel: /nonexistent/vmlinuz"),
        (["--name", "vm", "--disk", "/nonexistent.img"], "disk[0].path"),
        (["--name", "vm", "--nic", "mac=xx"], "nic[0].mac"),
        (["--name", "vm", "--nic", "colour=red"], "--nic 'colour=red'"),
        (["--config", "/nonexistent.toml"], "config file /nonexistent.toml does not exist"),
    ],
)
def test_invalid_values(tmp_path: Path, args: list[str], expected: str) -> None:
    runtime = tmp_path / "run"
    result = kemari_run(*args, "--runtime-dir", str(runtime))
    assert expected in error_line(result)
    assert not runtime.exists()


@pytest.mark.guest
def test_qemu_refusing_to_start_is_reported_with_its_stderr(tmp_path: Path) -> None:
    bogus_kernel = tmp_path / "vmlinuz"
    bogus_kernel.write_bytes(b"this is not a kernel\n" * 100)
    runtime = tmp_path / "run"
    result = kemari_run(
        "--name", "bogus", "--accel", "tcg", "--kernel", str(bogus_kernel),
        "--runtime-dir", str(runtime),
    )  # fmt: skip
    line = error_line(result)
    assert "QEMU" in line
    assert "kernel" in line.lower()  # QEMU's own complaint about the kernel is quoted
    assert leftovers(runtime) == []
    assert qemu_children() == []


@pytest.mark.guest
def test_occupied_monitor_socket_is_refused(tmp_path: Path) -> None:
    monitor = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(monitor))
        listener.listen()
        runtime = tmp_path / "run"
        result = kemari_run(
            "--name", "busy", "--accel", "tcg", "--monitor", str(monitor),
            "--runtime-dir", str(runtime),
        )  # fmt: skip
        assert f"socket path {monitor} is in use" in error_line(result)
        assert monitor.exists()  # the other process's socket is untouched
    assert leftovers(runtime) == []
