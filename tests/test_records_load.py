"""The closed-loop records load (kemari.testbed.records_load) against kguest on the host."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kemari.image import default_image
from kemari.testbed.records_load import (
    STALL_S,
    LoadError,
    LoadResult,
    check,
    main,
    percentile,
    run_load,
)


@given(
    st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1),
    st.floats(min_value=0, max_value=1),
    st.floats(min_value=0, max_value=1),
)
def test_percentile_is_a_member_and_grows_with_the_fraction(
    values: list[float], low: float, high: float
) -> None:
    low, high = min(low, high), max(low, high)
    assert percentile(values, low) in values
    assert min(values) <= percentile(values, low) <= percentile(values, high) <= max(values)
    assert percentile(values, 0.0) == min(values)


def test_percentile_of_nothing_is_zero() -> None:
    assert percentile([], 0.5) == 0.0


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False)))
def test_the_summary_counts_every_stall_and_keeps_the_slowest(latencies: list[float]) -> None:
    summary = LoadResult(len(latencies), 1.0, tuple(latencies)).summary()
    assert summary["stalls"] == len([latency for latency in latencies if latency > STALL_S])
    assert summary["max_ms"] == max(latencies, default=0.0) * 1000
    assert summary["p99_ms"] <= summary["max_ms"]


# When the scripted server below answers a PUT: "now", after a delay in seconds, or never.
Answer = Callable[[str], float | None]


async def scripted_load(
    answer: Answer, clients: int, seconds: float, timeout_s: float
) -> LoadResult:
    """run_load against a loopback records server that sends each ``OK`` one byte per
    segment (TCP_NODELAY, a drain between bytes), when ``answer`` says."""
    sequence = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sequence
        writer.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        while line := await reader.readline():
            delay = answer(line.decode().removeprefix("PUT ").strip())
            if delay is None:
                continue  # this request is never answered; none after it on this connection
            if delay:
                await asyncio.sleep(delay)  # the slow reply under test, not a synchronisation
            sequence += 1
            for byte in f"OK {sequence}\n".encode():
                writer.write(bytes([byte]))
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        return await run_load("127.0.0.1", port, clients, seconds, reply_timeout_s=timeout_s)


def test_replies_split_across_segments_are_read_whole() -> None:
    result = asyncio.run(scripted_load(lambda payload: 0.0, clients=3, seconds=0.5, timeout_s=5))
    assert result.requests > 0 and result.stalls == 0


def test_a_lone_slow_reply_is_reported_as_a_stall() -> None:
    def answer(payload: str) -> float:
        return STALL_S + 0.2 if payload == "load-1-0" else 0.0

    summary = asyncio.run(scripted_load(answer, clients=4, seconds=1.5, timeout_s=5)).summary()
    assert summary["stalls"] == 1
    assert summary["max_ms"] >= (STALL_S + 0.2) * 1000 > summary["p99_ms"]


def test_a_missing_reply_names_its_connection_and_the_others_progress() -> None:
    def answer(payload: str) -> float | None:
        return None if payload == "load-2-3" else 0.0

    with pytest.raises(LoadError) as lost:
        asyncio.run(scripted_load(answer, clients=4, seconds=30, timeout_s=0.5))
    message = str(lost.value)
    assert re.match(
        r"connection 2: PUT load-2-3 got no reply within 0\.5 s \(client port \d+\)", message
    )
    progress = re.search(r"the other 3 connection\(s\) completed (\d+) request", message)
    assert progress is not None and int(progress.group(1)) > 0, message


def test_a_stalled_service_shows_no_progress_on_the_other_connections() -> None:
    def answer(payload: str) -> float | None:
        return None if payload.startswith("load-") else 0.0

    with pytest.raises(LoadError, match=r"the other 1 connection\(s\) completed 0 request"):
        asyncio.run(scripted_load(answer, clients=2, seconds=30, timeout_s=0.5))


@pytest.fixture
def records_port(tmp_path: Path) -> Iterator[int]:
    """kguest's records service on loopback (the guest image's binary, run on the host)."""
    kguest = str(default_image().kguest)
    child = subprocess.Popen(
        [kguest, "records", "--dir", str(tmp_path), "--listen", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        for line in child.stdout:
            match = re.search(r"workload records ready port=(\d+)", line)
            if match:
                yield int(match.group(1))
                break
        else:
            raise AssertionError("kguest records ended before it was ready")
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_every_measured_request_is_a_stored_record(records_port: int, tmp_path: Path) -> None:
    result = asyncio.run(run_load("127.0.0.1", records_port, clients=4, seconds=1.0))
    stored = (tmp_path / "records.log").read_bytes().splitlines()
    assert result.requests > 0 and len(result.latencies_s) == result.requests
    assert len(stored) == 4 + result.requests  # one warm-up record per connection
    payloads = {line.split(b" ", 2)[2] for line in stored}
    assert {f"load-{c}-0".encode() for c in range(4)} <= payloads
    summary = result.summary()
    assert summary["p50_ms"] <= summary["p99_ms"]


def test_check_passes_on_a_prompt_service(records_port: int) -> None:
    assert len(asyncio.run(check("127.0.0.1", records_port, 3, timeout_s=5.0))) == 3


def test_check_fails_when_replies_do_not_come() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        with pytest.raises(LoadError, match=r"no reply within 0\.3 s"):
            asyncio.run(check("127.0.0.1", port, 2, timeout_s=0.3))


def test_command_line_reports_a_stall_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        assert main([f"127.0.0.1:{port}", "--check", "1", "--check-timeout", "0.3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("records_load: check request 1 of 1")


def test_command_line_rejects_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["127.0.0.1:port"])
    with pytest.raises(SystemExit):
        main(["127.0.0.1", "--clients", "0"])
    assert "Traceback" not in capsys.readouterr().err
