"""Monitor protocol and server: real unix sockets, real client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kemari.errors import ConfigError, MonitorError
from kemari.monitor import protocol
from kemari.monitor.client import run_command
from kemari.monitor.server import MonitorServer


@given(st.lists(st.text(min_size=1), min_size=1, max_size=protocol.MAX_WORDS))
def test_request_round_trip(words: list[str]) -> None:
    assert protocol.decode_request(protocol.encode_request(words).rstrip(b"\n")) == words


@given(st.binary(max_size=200))
def test_garbage_requests_raise_monitor_error(data: bytes) -> None:
    with contextlib.suppress(MonitorError):
        protocol.decode_request(data)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MonitorServer]:
    loop = asyncio.new_event_loop()
    monitor = MonitorServer(tmp_path / "mon.sock")

    async def echo(args: list[str]) -> protocol.Reply:
        return protocol.Reply(data=args, text=" ".join(args))

    async def broken(args: list[str]) -> protocol.Reply:
        raise RuntimeError("handler bug")

    monitor.register(("echo",), echo, "echo the arguments")
    monitor.register(("broken",), broken, "always fails")
    loop.run_until_complete(monitor.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield monitor
    asyncio.run_coroutine_threadsafe(monitor.close(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_commands_errors_and_help(server: MonitorServer) -> None:
    assert run_command(server.path, ["echo", "a", "b"]).data == ["a", "b"]
    with pytest.raises(MonitorError, match="unknown command 'nope'"):
        run_command(server.path, ["nope"])
    with pytest.raises(MonitorError, match="handler bug"):
        run_command(server.path, ["broken"])
    assert "echo the arguments" in run_command(server.path, ["help"]).text


def test_live_socket_is_not_stolen(server: MonitorServer) -> None:
    second = MonitorServer(server.path)
    with pytest.raises(ConfigError, match="in use by a running process"):
        asyncio.run(second.start())
    assert run_command(server.path, ["echo", "still"]).text == "still"


def test_stale_socket_is_replaced_and_removed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # file remains, nobody listens

    async def scenario() -> None:
        monitor = MonitorServer(path)
        await monitor.start()
        await monitor.close()

    asyncio.run(scenario())
    assert not path.exists()


def test_missing_monitor_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MonitorError, match="no monitor at"):
        run_command(tmp_path / "none.sock", ["info", "status"])


def test_cli_output_into_a_pipe_closed_early_is_quiet(server: MonitorServer) -> None:
    """Issue 10 item 12 (part): ``kemari monitor ... | head`` printed a BrokenPipeError
    traceback (and 'Exception ignored ... BrokenPipeError' at exit) when the reader had
    gone.  The reply is held back until the pipe's read end is closed, like a ``head``
    that has already exited."""
    gate = threading.Event()

    async def slow(args: list[str]) -> protocol.Reply:
        await asyncio.to_thread(gate.wait, 30)
        return protocol.Reply(data=args, text="line\n" * 5000)

    server.register(("slow",), slow, "answer once the test says so")
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kemari.cli.main", "monitor", str(server.path), "slow"],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write_end)
    os.close(read_end)
    gate.set()
    _, stderr = proc.communicate(timeout=60)
    assert stderr == ""
    assert proc.returncode == 1  # what Python itself uses for EPIPE
