"""Monitor protocol and server: real unix sockets, real client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
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
