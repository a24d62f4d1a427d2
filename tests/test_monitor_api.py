"""The typed monitor API: commands parsed once, replies rendered, status JSON both ways."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kemari.errors import ConfigError, MonitorError
from kemari.monitor import api, render
from kemari.monitor.client import run_command
from kemari.monitor.server import MonitorServer


@pytest.mark.parametrize(
    ("words", "command"),
    [
        (["help"], api.Help()),
        (["info", "status"], api.InfoStatus()),
        (["info", "status", "--json"], api.InfoStatus(json=True)),
        (["query-status"], api.QueryStatus()),
        (["quit"], api.Quit()),
        (["failover"], api.Failover()),
        (["migrate", "-d", "kemari:tcp:h:1"], api.Migrate("kemari:tcp:h:1", detach=True)),
        (["migrate", "kemari:tcp:h:1"], api.Migrate("kemari:tcp:h:1", detach=False)),
        (["checkpoint"], api.Checkpoint()),
        (["migrate_cancel"], api.MigrateCancel()),
    ],
)
def test_every_command_parses(words: list[str], command: api.Command) -> None:
    assert api.parse_command(words) == command


def test_every_table_row_parses() -> None:
    for spec in api.COMMANDS:
        words = [*spec.words, "kemari:tcp:h:1"] if spec.words == ("migrate",) else spec.words
        api.parse_command(list(words))


@pytest.mark.parametrize(
    ("words", "error", "message"),
    [
        (["nope"], MonitorError, "unknown command 'nope' \\(try 'help'\\)"),
        (["info"], MonitorError, "unknown command 'info'"),
        (["info", "status", "x"], ConfigError, "info status takes no arguments, got 'x'"),
        (["failover", "now"], ConfigError, "failover takes no arguments, got 'now'"),
        (["checkpoint", "1"], ConfigError, "checkpoint takes no arguments"),
        (["migrate", "-d"], ConfigError, "usage: migrate -d kemari:tcp:HOST:PORT"),
        (["migrate", "-d", "tcp:h:1"], ConfigError, "usage: migrate"),
    ],
)
def test_bad_commands_are_refused_at_the_edge(
    words: list[str], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        api.parse_command(words)


@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=5))
def test_any_words_parse_or_raise_a_kemari_error(words: list[str]) -> None:
    try:
        command = api.parse_command(words)
    except (MonitorError, ConfigError):
        return
    assert isinstance(command, api.Command)


def sample_status() -> api.Status:
    flow = api.Flow(frames=3, octets=180)
    return api.Status(
        name="web",
        role="active",
        state="active",
        state_for_s=1.5,
        state_since_unix=1_700_000_000.0,
        state_reason="QEMU started",
        agent_pid=1234,
        protection="protected",
        replication=api.ReplicationStatus(
            state="protected",
            reason=None,
            peer="10.0.0.2:4444",
            tls=True,
            run="00" * 16,
            run_epoch=7,
            epoch=7,
            in_flight=1,
            epoch_ms=100,
            last_checkpoint_age_s=0.05,
            initial_sync=api.InitialSync(duration_s=1.2, ram_bytes=1 << 27, stream_bytes=1 << 20),
            sync_progress=None,
            recent=api.RecentCheckpoints(7, 12.5, 20.0, 0.1, 1.0, 5.0, 2.0, 4096, 9000, 12),
        ),
        standby=None,
        failover=None,
        vm="running",
        qemu_pid=4321,
        accel="tcg",
        accel_reason="no KVM",
        qemu_binary="/usr/bin/qemu-system-x86_64",
        qemu_binary_reason="patched",
        checkpoint_safe=True,
        uptime_s=12.0,
        disks=[api.DiskStatus(image="/d.img", read_only=False, socket="/run/disk0.sock")],
        nics=[
            api.NicStatus(
                tap="kt0",
                guest_to_host=flow,
                host_to_guest=flow,
                host_to_guest_unplugged=api.Flow(0, 0),
                host_to_guest_oversized=api.Flow(0, 0),
                guest_to_host_failed=api.Flow(0, 0),
                connections=1,
                refused_connections=0,
                guest_reading_pauses=0,
                framing_errors=0,
                guest_reading_paused=False,
            )
        ],
        eventtap=api.EventTapStatus(
            sync="event+periodic",
            mode="holding",
            max_bytes=1 << 25,
            max_count=1 << 16,
            paused=False,
            held=1,
            held_bytes=60,
            held_max=4,
            held_bytes_max=240,
            released=10,
            released_bytes=600,
            discarded=0,
            latency_ms_p50=3.0,
            latency_ms_p99=None,
            passed=2,
            checkpoint_requests=5,
            pauses=0,
        ),
        storage="shared",
        disk_copy=[],
        serial_log="/run/serial.log",
    )


def test_status_json_round_trips() -> None:
    status = sample_status()
    plain = json.loads(json.dumps(api.to_plain(status)))
    assert api.from_plain(api.Status, plain) == status
    assert plain["agent_pid"] == 1234 and plain["nics"][0]["guest_to_host"]["frames"] == 3


def test_from_plain_is_strict() -> None:
    plain = api.to_plain(sample_status())
    with pytest.raises(MonitorError, match="unknown keys \\['extra'\\]"):
        api.from_plain(api.Status, {**plain, "extra": 1})
    del plain["agent_pid"]
    with pytest.raises(MonitorError, match="missing keys \\['agent_pid'\\]"):
        api.from_plain(api.Status, plain)
    plain = api.to_plain(sample_status())
    plain["eventtap"]["held"] = "many"
    with pytest.raises(MonitorError, match=r"Status\.eventtap\.held: expected an integer"):
        api.from_plain(api.Status, plain)


def test_status_renders_as_text_and_as_json() -> None:
    status = sample_status()
    lines = render.text(api.InfoStatus(), status).splitlines()
    assert lines[0] == "VM web: running (role active, protected, agent active)"
    assert lines[1] == "state: active for 1.5 s (QEMU started); agent pid 1234"
    assert "nic0: tap kt0: guest->host 3 frames, host->guest 3 frames" in lines
    assert "standby: 10.0.0.2:4444 (protected, TLS)" in lines
    assert not any("WARNING: plain TCP" in line for line in lines)
    plain = dataclasses.replace(
        status, replication=dataclasses.replace(status.replication, tls=False)
    )
    plain_lines = render.text(api.InfoStatus(), plain).splitlines()
    assert "standby: 10.0.0.2:4444 (protected, plain TCP)" in plain_lines
    assert any(line.startswith("  WARNING: plain TCP") for line in plain_lines)
    for command in (api.InfoStatus(json=True), api.QueryStatus()):
        assert json.loads(render.text(command, status)) == api.to_plain(status)


def test_replies_render() -> None:
    assert render.text(api.Quit(), api.Stopping("web")) == "stopping VM web"
    assert (
        render.text(api.Failover(), api.FailedOver("web", 5, 151.4, 2))
        == "VM web resumed from epoch 5 in 151 ms (2 held frames replayed)"
    )
    assert render.text(api.Checkpoint(), api.CheckpointDone(3, 12.345)) == (
        "checkpoint 3 committed in 12.3 ms"
    )
    migrate = api.Migrate("kemari:tcp:h:1")
    assert render.text(migrate, api.MigrateStarted("h:1")) == (
        "initial sync to h:1 started; see 'info status'"
    )
    assert render.text(api.MigrateCancel(), api.ProtectionStopped()).startswith("protection")


@pytest.fixture
def typed_server(tmp_path: Path) -> Iterator[tuple[MonitorServer, list[api.Command]]]:
    seen: list[api.Command] = []
    loop = asyncio.new_event_loop()
    monitor = MonitorServer(tmp_path / "mon.sock")

    async def handle(command: api.Command) -> api.Reply:
        seen.append(command)
        if isinstance(command, api.InfoStatus | api.QueryStatus):
            return sample_status()
        if isinstance(command, api.Checkpoint):
            raise ConfigError("VM web is not protected")
        return api.Stopping("web")

    monitor.register_api(handle)
    loop.run_until_complete(monitor.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield monitor, seen
    asyncio.run_coroutine_threadsafe(monitor.close(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_typed_commands_over_the_real_socket(
    typed_server: tuple[MonitorServer, list[api.Command]],
) -> None:
    server, seen = typed_server
    status = run_command(server.path, ["query-status"])
    assert api.from_plain(api.Status, status.data) == sample_status()
    assert json.loads(status.text) == status.data
    info = run_command(server.path, ["info", "status"])
    assert info.data == status.data and info.text.startswith("VM web: running")
    assert json.loads(run_command(server.path, ["info", "status", "--json"]).text) == status.data
    assert run_command(server.path, ["quit"]).text == "stopping VM web"
    with pytest.raises(MonitorError, match="not protected"):
        run_command(server.path, ["checkpoint"])
    with pytest.raises(MonitorError, match="takes no arguments"):
        run_command(server.path, ["failover", "x"])
    help_text = run_command(server.path, ["help"]).text
    assert "query-status" in help_text and "migrate_cancel" in help_text
    assert seen == [
        api.QueryStatus(),
        api.InfoStatus(),
        api.InfoStatus(json=True),
        api.Quit(),
        api.Checkpoint(),
    ]
    assert dataclasses.is_dataclass(seen[0])
