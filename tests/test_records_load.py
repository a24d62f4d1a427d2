"""The closed-loop records load (kemari.testbed.records_load) against kguest on the host."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kemari.image import default_image
from kemari.testbed.records_load import LoadError, check, main, percentile, run_load


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
