"""Issue 10.4: local access.  Under ``umask 000`` the monitor, QMP and NBD sockets and the
runtime directory used to be world-accessible (any local user could ``quit`` the VM,
connect to its disk and to QMP) and ``serial.log`` world-readable.  Now every path an
agent makes has an explicit mode whatever the umask: the runtime directory and the
replica directory 0700, sockets 0600, the serial log 0640.

A real agent (with a disk, so an NBD socket exists) and a real standby are started under
``umask 000``; every path is stat'ed once the guest runs and is protected.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari.image.disk import create_data_disk
from kemari.testbed.vm import AgentProcess, wait_for

pytestmark = [pytest.mark.guest, pytest.mark.usefixtures("image_and_patched_qemu")]


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> tuple[str, int]:
    info = path.lstat()
    kind = (
        "socket" if stat.S_ISSOCK(info.st_mode) else "dir" if stat.S_ISDIR(info.st_mode) else "file"
    )
    return kind, stat.S_IMODE(info.st_mode)


def test_sockets_directories_and_logs_have_explicit_modes_under_umask_000(
    tmp_path: Path, umask_000: None
) -> None:
    del umask_000
    image = tmp_path / "disk.raw"
    create_data_disk(image, 16)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    replica_dir = Path("/dev/shm") / f"kemari-test-modes-{port}" / "replica"
    common = ["--workload", "ticks", "--accel", "tcg", "--disk", str(image)]
    active = AgentProcess("modes", tmp_path, common, label="active")
    standby = AgentProcess(
        "modes",
        tmp_path,
        [*common, "--incoming", f"kemari:tcp:127.0.0.1:{port}", "--replica-dir", str(replica_dir)],
        label="standby",
    )
    try:
        active.wait_serial(r"tick 3\b")
        active.wait_monitor()
        standby.wait_monitor()
        active.monitor("migrate", "-d", f"kemari:tcp:127.0.0.1:{port}")
        wait_for(lambda: active.status()["protection"] == "protected", "protection", 120)
        found = {
            "active runtime dir": mode(active.runtime_dir),
            "active monitor": mode(active.monitor_path),
            "active QMP": mode(active.runtime_dir / "qmp.sock"),
            "active NBD": mode(active.runtime_dir / "disk0.sock"),
            "active lock": mode(active.runtime_dir / "agent.lock"),
            "active serial log": mode(active.serial_log),
            "standby runtime dir": mode(standby.runtime_dir),
            "standby monitor": mode(standby.monitor_path),
            "replica dir": mode(replica_dir),
        }
        assert found == {
            "active runtime dir": ("dir", 0o700),
            "active monitor": ("socket", 0o600),
            "active QMP": ("socket", 0o600),
            "active NBD": ("socket", 0o600),
            "active lock": ("file", 0o600),
            "active serial log": ("file", 0o640),
            "standby runtime dir": ("dir", 0o700),
            "standby monitor": ("socket", 0o600),
            "replica dir": ("dir", 0o700),
        }
        # Nothing else in a runtime directory is open to others either.
        for runtime in (active.runtime_dir, standby.runtime_dir):
            for path in runtime.iterdir():
                assert mode(path)[1] & 0o077 & ~0o040 == 0, (path, oct(mode(path)[1]))
        # A parent the agent had to create is not world-writable (0755).
        assert mode(replica_dir.parent) == ("dir", 0o755)
    finally:
        active.stop()
        standby.stop()
        shutil.rmtree(replica_dir.parent, ignore_errors=True)
