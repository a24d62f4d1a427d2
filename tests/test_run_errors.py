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


def only_line(result: subprocess.CompletedProcess[str]) -> str:
    """The whole of stderr is one ``kemari: error:`` line (no traceback, nothing else)."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kemari: error: "), result.stderr
    return lines[0]


@pytest.fixture
def fake_kernel(tmp_path: Path) -> list[str]:
    """Kernel and initrd files, so a run gets past the config checks without the image."""
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return ["--accel", "tcg", "--kernel", str(kernel), "--initrd", str(initrd)]


@pytest.mark.parametrize(
    ("runtime", "strerror"),
    [
        ("/proc/kemari-test/run", "No such file or directory"),
        ("FILE/run", "Not a directory"),
    ],
)
def test_unusable_runtime_dir_is_one_line_naming_it(
    tmp_path: Path, fake_kernel: list[str], runtime: str, strerror: str
) -> None:
    """Issue 10 item 9: an OSError from the runtime directory is one line, not a traceback."""
    (tmp_path / "FILE").write_text("not a directory\n")
    runtime = runtime.replace("FILE", str(tmp_path / "FILE"))
    result = kemari_run("--name", "vm", *fake_kernel, "--runtime-dir", runtime)
    line = only_line(result)
    assert strerror in line
    assert str(Path(runtime).parent) in line or runtime in line


def test_too_long_monitor_path_is_refused_before_anything_starts(
    tmp_path: Path, fake_kernel: list[str]
) -> None:
    """Issue 10 item 9: a --monitor path over 107 bytes gave 'OSError: AF_UNIX path too
    long' with a traceback, after the runtime directory was made."""
    monitor = tmp_path / ("m" * (108 - len(str(tmp_path)) - 1))
    assert len(str(monitor)) == 108
    runtime = tmp_path / "run"
    result = kemari_run(
        "--name", "vm", *fake_kernel, "--monitor", str(monitor), "--runtime-dir", str(runtime)
    )  # fmt: skip
    line = only_line(result)
    assert str(monitor) in line
    assert "107 bytes" in line
    assert not runtime.exists()
    assert not monitor.exists()


def test_too_long_runtime_dir_names_the_socket_path(tmp_path: Path, fake_kernel: list[str]) -> None:
    """The default monitor socket lives in the runtime directory: a long one is refused
    with the socket path it would make."""
    runtime = tmp_path / ("r" * (100 - len(str(tmp_path))))
    result = kemari_run("--name", "vm", *fake_kernel, "--runtime-dir", str(runtime))
    line = only_line(result)
    assert str(runtime / "monitor.sock") in line
    assert not runtime.exists()


def test_monitor_client_with_a_too_long_path_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / ("s" * 200)
    result = subprocess.run(
        [*KEMARI, "monitor", str(path), "info", "status"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    line = only_line(result)
    assert str(path) in line
    assert "107 bytes" in line


def test_socket_path_limit_is_the_kernels(tmp_path: Path) -> None:
    """107 bytes bind (sun_path holds 108 with the NUL); 108 are refused by check and kernel."""
    from kemari.errors import ConfigError  # noqa: PLC0415
    from kemari.sockets import check_socket_path  # noqa: PLC0415

    fits = tmp_path / ("a" * (107 - len(str(tmp_path)) - 1))
    assert len(str(fits)) == 107
    check_socket_path(fits)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(fits))
    too_long = Path(str(fits) + "b")
    with pytest.raises(ConfigError, match="107 bytes"):
        check_socket_path(too_long)
    with socket.socket(socket.AF_UNIX) as sock, pytest.raises(OSError, match="too long"):
        sock.bind(str(too_long))


def test_os_error_line_and_bugs_keep_their_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process: an OSError with an errno is one line naming both paths of a rename;
    one without an errno (no system report, so a bug) is not swallowed."""
    import argparse  # noqa: PLC0415
    import errno  # noqa: PLC0415

    from kemari.cli import main as cli  # noqa: PLC0415

    def parser_raising(exc: BaseException) -> argparse.ArgumentParser:
        def func(args: argparse.Namespace) -> int:
            raise exc

        parser = argparse.ArgumentParser()
        parser.set_defaults(func=func)
        return parser

    rename = OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a", None, b"/b")
    monkeypatch.setattr(cli, "build_parser", lambda: parser_raising(rename))
    assert cli.main([]) == 1
    assert capsys.readouterr().err == "kemari: error: /a -> /b: Invalid cross-device link\n"
    monkeypatch.setattr(cli, "build_parser", lambda: parser_raising(OSError("a bug")))
    with pytest.raises(OSError, match="a bug"):
        cli.main([])
