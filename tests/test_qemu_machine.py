"""QemuMachine against a real QEMU: start paused, QMP, events, failures and clean-up.

No guest is booted: the machine starts with ``-S`` and no kernel, which is all
QMP needs, so each test costs a fraction of a second.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from kemari.errors import ConfigError, QemuError
from kemari.qemu.binary import qemu_binary
from kemari.qemu.cmdline import MachineSpec, NbdDisk
from kemari.qemu.machine import MachineExit, QemuMachine, QmpCommandError, RunState
from kemari.testbed.wait import async_wait_for, wait_for

QEMU = qemu_binary("tcg").path


def paused_spec(tmp_path: Path, **changes: object) -> MachineSpec:
    values: dict[str, object] = {
        "name": "t",
        "accel": "tcg",
        "qmp_socket": tmp_path / "qmp.sock",
        "memory_mib": 32,
        "start_paused": True,
    }
    values.update(changes)
    return MachineSpec(**values)  # type: ignore[arg-type]


def state(machine: QemuMachine) -> RunState:
    """The machine's run state, read fresh (it changes across awaits)."""
    return machine.run_state


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_paused_start_events_and_clean_shutdown(tmp_path: Path) -> None:
    spec = paused_spec(tmp_path)

    async def scenario() -> None:
        machine = QemuMachine(spec, QEMU)
        assert machine.run_state.value == "not-started"
        async with machine:
            assert state(machine) is RunState.PAUSED
            status = await machine.query_status()
            assert (status.status, status.running) == ("prelaunch", False)
            assert spec.qmp_socket.is_socket()
            with machine.subscribe("STOP", "RESUME") as events:
                await machine.execute("cont")
                resumed = await events.get()
                assert resumed.name == "RESUME"
                assert state(machine) is RunState.RUNNING
                assert (await machine.query_status()).running
                await machine.execute("stop")
                stopped = await events.get()
                assert stopped.name == "STOP"
                assert stopped.timestamp >= resumed.timestamp
                assert state(machine) is RunState.PAUSED
            pid = machine.pid
            assert pid is not None
        exit_info = await machine.wait()
        assert exit_info.clean
        assert exit_info.returncode == 0
        assert exit_info.shutdown_reason == "host-qmp-quit"
        assert state(machine) is RunState.EXITED
        assert not spec.qmp_socket.exists()
        assert not process_alive(pid)

    run(scenario)


def test_pending_events_are_taken_without_waiting(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with QemuMachine(paused_spec(tmp_path), QEMU) as machine:
            with machine.subscribe("STOP", "RESUME") as events:
                assert events.take_pending() == []
                await machine.execute("cont")
                await machine.execute("stop")
                taken: list[str] = []

                def both_taken() -> bool:
                    taken.extend(event.name for event in events.take_pending())
                    return len(taken) >= 2

                await async_wait_for(both_taken, "RESUME and STOP taken", 10.0, 0.01)
                assert taken == ["RESUME", "STOP"]
                assert events.take_pending() == []
                await machine.execute("quit")
                await machine.wait()
                # QEMU has exited: nothing is pending, and iteration has ended.
                assert events.take_pending() == []
                assert [event async for event in events] == []

    run(scenario)


@pytest.mark.parametrize(
    ("changes", "stderr_part"),
    [
        ({"kernel": Path("/nonexistent/vmlinuz")}, "could not open kernel file"),
        ({"disks": (NbdDisk(Path("/nonexistent/nbd.sock"), "disk"),)}, "Failed to connect"),
    ],
)
def test_refused_command_line_reports_qemu_stderr(
    tmp_path: Path, changes: dict[str, object], stderr_part: str
) -> None:
    spec = paused_spec(tmp_path, **changes)

    async def scenario() -> None:
        machine = QemuMachine(spec, QEMU)
        with pytest.raises(QemuError, match="refused to start") as raised:
            await machine.start()
        assert stderr_part in str(raised.value)
        assert state(machine) is RunState.FAILED
        assert not (await machine.wait()).clean
        assert not spec.qmp_socket.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == []

    run(scenario)


def reset_rom(directory: Path) -> Path:
    """A 64 KiB firmware whose reset vector asks the chipset for a hard reset (port 0xcf9).

    With ``-no-reboot`` this is a guest-initiated end: QEMU reports SHUTDOWN
    with reason ``guest-reset`` and exits 0.
    """
    # mov al, 6; mov dx, 0xcf9; out dx, al; hlt; jmp $-1
    code = bytes([0xB0, 0x06, 0xBA, 0xF9, 0x0C, 0xEE, 0xF4, 0xEB, 0xFD])
    rom = bytearray(0x10000)
    # The ROM ends at 4 GiB; the CPU starts 16 bytes below the end (the reset vector).
    rom[0xFFF0 : 0xFFF0 + len(code)] = code
    path = directory / "reset.rom"
    path.write_bytes(rom)
    return path


def test_guest_initiated_end_is_clean(tmp_path: Path) -> None:
    spec = paused_spec(tmp_path, bios=reset_rom(tmp_path), no_reboot=True)

    async def scenario() -> None:
        async with QemuMachine(spec, QEMU) as machine:
            with machine.subscribe("SHUTDOWN") as events:
                await machine.execute("cont")
                shutdown = await events.get()
                assert shutdown.data["guest"] is True
                assert shutdown.data["reason"] == "guest-reset"
                exit_info = await machine.wait()
            assert exit_info.clean
            assert not exit_info.requested
            assert exit_info.shutdown_reason == "guest-reset"
            assert state(machine) is RunState.EXITED
        assert not spec.qmp_socket.exists()

    run(scenario)


def test_guest_reset_without_no_reboot_keeps_running(tmp_path: Path) -> None:
    spec = paused_spec(tmp_path, bios=reset_rom(tmp_path), no_reboot=False)

    async def scenario() -> None:
        async with QemuMachine(spec, QEMU) as machine:
            with machine.subscribe("RESET") as events:
                await machine.execute("cont")
                first = await events.get()
                second = await events.get()  # the firmware resets again after each reset
                assert first.data["reason"] == second.data["reason"] == "guest-reset"
            assert state(machine) is RunState.RUNNING
        assert (await machine.wait()).clean

    run(scenario)


def test_sigkill_is_reported_and_leaves_nothing(tmp_path: Path) -> None:
    spec = paused_spec(tmp_path)

    async def scenario() -> None:
        async with QemuMachine(spec, QEMU) as machine:
            assert machine.pid is not None
            with machine.subscribe() as events:
                os.kill(machine.pid, signal.SIGKILL)
                exit_info = await machine.wait()
                # The subscription ends with QEMU instead of hanging.
                assert [event async for event in events] == []
            assert exit_info.returncode == -signal.SIGKILL
            assert not exit_info.clean
            assert "SIGKILL" in exit_info.describe()
            assert state(machine) is RunState.FAILED
            with pytest.raises(QemuError, match=r"QMP query-status"):
                await machine.query_status()
        assert not spec.qmp_socket.exists()

    run(scenario)


def test_sigterm_from_someone_else_is_a_failure(tmp_path: Path) -> None:
    spec = paused_spec(tmp_path)

    async def scenario() -> None:
        async with QemuMachine(spec, QEMU) as machine:
            assert machine.pid is not None
            os.kill(machine.pid, signal.SIGTERM)
            exit_info = await machine.wait()
            assert exit_info.returncode == 0
            assert exit_info.shutdown_reason == "host-signal"
            assert not exit_info.clean
            assert state(machine) is RunState.FAILED

    run(scenario)


def test_second_machine_on_same_qmp_socket_is_refused(tmp_path: Path) -> None:
    spec = paused_spec(tmp_path)

    async def scenario() -> None:
        async with QemuMachine(spec, QEMU) as first:
            second = QemuMachine(spec, QEMU)
            with pytest.raises(ConfigError, match="in use by a running process"):
                await second.start()
            assert second.pid is None
            # The first machine is untouched.
            assert (await first.query_status()).status == "prelaunch"
            assert spec.qmp_socket.is_socket()

    run(scenario)


def test_stale_socket_is_replaced_but_a_regular_file_is_kept(tmp_path: Path) -> None:
    spec = paused_spec(tmp_path)

    async def scenario() -> None:
        async with QemuMachine(spec, QEMU) as machine:
            assert machine.pid is not None
            os.kill(machine.pid, signal.SIGKILL)
            await machine.wait()
            # A SIGKILLed QEMU leaves its socket file behind; shutdown removes it.
            assert spec.qmp_socket.is_socket()
        assert not spec.qmp_socket.exists()
        # A stale socket (nobody listening) is taken over.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
            stale.bind(str(spec.qmp_socket))
        async with QemuMachine(spec, QEMU) as again:
            assert state(again) is RunState.PAUSED
        # A regular file is never deleted.
        spec.qmp_socket.write_text("user data")
        with pytest.raises(ConfigError, match="not a socket"):
            await QemuMachine(spec, QEMU).start()
        assert spec.qmp_socket.read_text() == "user data"

    run(scenario)


def test_qmp_error_is_typed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with QemuMachine(paused_spec(tmp_path), QEMU) as machine:
            with pytest.raises(QmpCommandError) as raised:
                await machine.execute("no-such-command")
            assert raised.value.error_class == "CommandNotFound"
            # The connection survives an error answer.
            assert (await machine.query_status()).status == "prelaunch"

    run(scenario)


def test_pass_fd_hands_a_descriptor_to_qemu(tmp_path: Path) -> None:
    async def scenario() -> None:
        read_end, write_end = os.pipe()
        try:
            async with QemuMachine(paused_spec(tmp_path), QEMU) as machine:
                await machine.pass_fd("migration_out", write_end)
                # QEMU holds the descriptor under that name until closefd ...
                await machine.execute("closefd", {"fdname": "migration_out"})
                # ... and then no longer.
                with pytest.raises(QmpCommandError, match="migration_out"):
                    await machine.execute("closefd", {"fdname": "migration_out"})
                with pytest.raises(QemuError, match="fd name"):
                    await machine.pass_fd("1bad", write_end)
        finally:
            os.close(read_end)
            os.close(write_end)

    run(scenario)


def test_missing_binary_is_reported(tmp_path: Path) -> None:
    async def scenario() -> None:
        machine = QemuMachine(paused_spec(tmp_path), tmp_path / "no-qemu")
        with pytest.raises(QemuError, match="missing or not executable"):
            await machine.start()
        assert list(tmp_path.iterdir()) == []

    run(scenario)


def test_qemu_dies_with_its_supervisor(tmp_path: Path) -> None:
    """SIGKILL the Kemari process: the kernel kills its QEMU too (no orphan guest)."""
    program = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from kemari.qemu.cmdline import MachineSpec
        from kemari.qemu.machine import QemuMachine

        async def main():
            spec = MachineSpec(name="t", accel="tcg", qmp_socket=Path({str(tmp_path / "q.sock")!r}),
                               memory_mib=32, start_paused=True)
            async with QemuMachine(spec, Path({str(QEMU)!r})) as machine:
                print(machine.pid, flush=True)
                await asyncio.sleep(600)  # idles until the test SIGKILLs it

        asyncio.run(main())
        """
    )
    supervisor = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE)
    try:
        assert supervisor.stdout is not None
        qemu_pid = int(supervisor.stdout.readline())
        assert process_alive(qemu_pid)
        supervisor.kill()
        supervisor.wait()
        wait_for(lambda: not process_alive(qemu_pid), "the orphaned QEMU to die", 30)
    finally:
        supervisor.kill()
        supervisor.wait()


@pytest.mark.parametrize(
    ("returncode", "requested", "reason", "clean", "described"),
    [
        (0, True, "host-qmp-quit", True, "exit status 0"),
        (0, False, "guest-shutdown", True, "guest-shutdown"),
        (0, False, "guest-reset", True, "guest-reset"),
        (0, False, "host-signal", False, "host-signal"),
        (0, False, "guest-panic", False, "guest-panic"),
        (0, False, None, False, "exit status 0"),
        (1, True, None, False, "exit status 1"),
        (-9, True, None, False, "SIGKILL"),
        (-40, False, None, False, "signal 40"),
    ],
)
def test_exit_judgement(
    returncode: int, requested: bool, reason: str | None, clean: bool, described: str
) -> None:
    exit_info = MachineExit(returncode, requested, reason, ("", "last line"))
    assert exit_info.clean is clean
    assert described in exit_info.describe()
    assert exit_info.describe().endswith(": last line")
