"""Real tests of the guest-NIC bridge: namespaces, a tap on a host bridge, real ping.

A host namespace runs ``kemari net bridge`` with its tap on ``br0``; a userspace
fake NIC (kemari.testbed.fake_nic) connects to the stream socket like QEMU and
answers ARP/ICMP for GUEST_IP; a client namespace pings it across the LAN.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import prerequisites
from support.fake_nic import FakeNic

from kemari.testbed.topology import Namespace, Topology
from kemari.testbed.wait import wait_for

pytestmark = pytest.mark.root

GUEST_MAC = "52:54:00:12:34:56"
GUEST_IP = "10.213.0.2"
CLIENT_IP = "10.213.0.100/24"
TAP = "ktap0"
# Upper bound for a background step (bridge start-up, a log line) before the test gives up.
WAIT_LIMIT = 20.0


class BridgeProcess:
    """``kemari net bridge`` running inside a host namespace."""

    def __init__(self, host: Namespace, workdir: Path) -> None:
        self.host = host
        self.socket = workdir / "n0.sock"
        self.log_path = workdir / "bridge.log"
        self._log = self.log_path.open("w")
        command = [
            sys.executable, "-m", "kemari.cli.main", "net", "bridge",
            "--socket", str(self.socket), "--tap", TAP, "--bridge", "br0",
        ]  # fmt: skip
        self.process = host.popen(command, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.wait_log("listening")

    def log_text(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, text: str, count: int = 1) -> None:
        def logged() -> bool:
            if self.log_text().count(text) >= count:
                return True
            if self.process.poll() is not None:
                pytest.fail(f"bridge exited {self.process.returncode}:\n{self.log_text()}")
            return False

        wait_for(logged, f"the bridge to log {text!r} x{count}", WAIT_LIMIT, detail=self.log_text)

    def tap_statistic(self, name: str) -> int:
        path = f"/sys/class/net/{TAP}/statistics/{name}"
        return int(self.host.run(["cat", path]).stdout)

    def stop(self) -> dict[str, object]:
        self.process.send_signal(signal.SIGINT)
        stdout, _ = self.process.communicate(timeout=WAIT_LIMIT)
        self._log.close()
        assert self.process.returncode == 0, self.log_text()
        counters: dict[str, object] = json.loads(stdout)
        return counters


@pytest.fixture
def testbed() -> Iterator[tuple[Namespace, Namespace]]:
    with Topology() as topology:
        yield topology.add_host("host"), topology.add_client("client", CLIENT_IP)


@contextlib.contextmanager
def running_bridge(host: Namespace, workdir: Path) -> Iterator[BridgeProcess]:
    bridge = BridgeProcess(host, workdir)
    try:
        yield bridge
    finally:
        if bridge.process.poll() is None:
            bridge.process.kill()
            bridge.process.wait()


def ping(client: Namespace, count: int = 3) -> subprocess.CompletedProcess[str]:
    return client.run(
        ["ping", "-c", str(count), "-i", "0.2", "-W", "5", GUEST_IP], check=False, timeout=60
    )


def experimental_broadcast(index: int) -> bytes:
    # EtherType 0x88B5 is reserved for local experiments: no host stack answers it.
    return (
        b"\xff" * 6 + bytes.fromhex("525400123456") + struct.pack("!HI", 0x88B5, index) + bytes(50)
    )


async def attach_nic(bridge: BridgeProcess, connections: int) -> tuple[FakeNic, asyncio.Task[None]]:
    nic = FakeNic(GUEST_MAC, GUEST_IP)
    await nic.connect(str(bridge.socket))
    serving = asyncio.create_task(nic.serve())
    await asyncio.to_thread(bridge.wait_log, "guest connected", connections)
    return nic, serving


def flow(counters: dict[str, object], name: str) -> tuple[int, int]:
    entry = counters[name]
    assert isinstance(entry, dict)
    return entry["frames"], entry["octets"]


def test_ping_crosses_the_bridge_and_counters_match(testbed, tmp_path):
    host, client = testbed
    with running_bridge(host, tmp_path) as bridge:

        async def scenario() -> tuple[FakeNic, subprocess.CompletedProcess[str], int]:
            nic, serving = await attach_nic(bridge, 1)
            result = await asyncio.to_thread(ping, client)
            for index in range(5):
                nic.send(experimental_broadcast(index))
            await nic.finish()
            await serving
            await asyncio.to_thread(bridge.wait_log, "guest disconnected")
            return nic, result, bridge.tap_statistic("rx_packets")

        nic, result, tap_received = asyncio.run(scenario())
        counters = bridge.stop()

    assert result.returncode == 0, result.stdout + result.stderr
    assert " 3 received" in result.stdout
    # 3 echo replies, at least one ARP reply, 5 experimental broadcasts.
    assert nic.sent.frames >= 9
    assert flow(counters, "guest_to_host") == (nic.sent.frames, nic.sent.octets)
    assert flow(counters, "host_to_guest") == (nic.received.frames, nic.received.octets)
    # The kernel saw exactly the frames the bridge says it wrote into the tap.
    assert tap_received == nic.sent.frames
    assert counters["connections"] == 1
    assert counters["framing_errors"] == 0
    assert flow(counters, "guest_to_host_failed") == (0, 0)
    # The tap is not persistent: it is gone with the bridge.
    assert host.run(["ip", "link", "show", TAP], check=False).returncode != 0


def test_traffic_resumes_when_a_new_guest_connects(testbed, tmp_path):
    host, client = testbed
    with running_bridge(host, tmp_path) as bridge:

        async def scenario() -> list[subprocess.CompletedProcess[str]]:
            first, serving = await attach_nic(bridge, 1)
            results = [await asyncio.to_thread(ping, client, 1)]
            await first.close()
            await serving
            await asyncio.to_thread(bridge.wait_log, "guest disconnected")
            down = await asyncio.to_thread(ping, client, 1)
            second, serving = await attach_nic(bridge, 2)
            results += [down, await asyncio.to_thread(ping, client, 2)]
            await second.close()
            await serving
            return results

        before, while_unplugged, after = asyncio.run(scenario())
        counters = bridge.stop()

    assert before.returncode == 0, before.stdout
    assert while_unplugged.returncode != 0, "nobody should answer while no guest is attached"
    assert after.returncode == 0, after.stdout
    assert counters["connections"] == 2
    assert flow(counters, "host_to_guest_unplugged")[0] >= 1


def test_malformed_stream_drops_only_that_connection(testbed, tmp_path):
    host, client = testbed
    with running_bridge(host, tmp_path) as bridge:

        async def scenario() -> subprocess.CompletedProcess[str]:
            bad, serving = await attach_nic(bridge, 1)
            bad.send_raw(struct.pack("!I", 0x7FFFFFFF))
            with contextlib.suppress(ConnectionResetError):
                await serving  # ends because the bridge drops the connection
            await bad.close()
            good, serving = await attach_nic(bridge, 2)
            result = await asyncio.to_thread(ping, client, 2)
            await good.close()
            await serving
            return result

        result = asyncio.run(scenario())
        log = bridge.log_text()
        counters = bridge.stop()

    assert "malformed stream" in log and "exceeds the maximum" in log
    assert result.returncode == 0, result.stdout
    assert counters["framing_errors"] == 1
    assert counters["connections"] == 2


def test_second_concurrent_guest_is_refused(testbed, tmp_path):
    host, client = testbed
    with running_bridge(host, tmp_path) as bridge:

        async def scenario() -> subprocess.CompletedProcess[str]:
            first, serving = await attach_nic(bridge, 1)
            intruder = FakeNic("52:54:00:00:00:99", GUEST_IP)
            await intruder.connect(str(bridge.socket))
            with contextlib.suppress(ConnectionResetError):
                await intruder.serve()  # returns at once: the bridge closed it
            await asyncio.to_thread(bridge.wait_log, "refusing a second")
            result = await asyncio.to_thread(ping, client, 2)
            await first.close()
            await serving
            return result

        result = asyncio.run(scenario())
        counters = bridge.stop()

    assert result.returncode == 0, result.stdout
    assert counters["refused_connections"] == 1
    assert counters["connections"] == 1


def test_qemu_nic_frames_reach_the_host_bridge(testbed, tmp_path):
    """QEMU's virtio-net on -netdev stream, driven by its iPXE ROM (no guest OS needed).

    ``-boot n`` makes SeaBIOS run the NIC's iPXE ROM, which broadcasts DHCP
    requests: seeing one on the host's br0 proves the whole guest->host path.
    """
    qemu_program = str(prerequisites.stock_qemu())
    tcpdump = str(prerequisites.tool("tcpdump", "tcpdump"))
    host, _ = testbed
    with running_bridge(host, tmp_path) as bridge:
        capture = host.popen(
            [tcpdump, "-i", "br0", "-n", "-e", "-c", "1",
             "ether", "src", GUEST_MAC, "and", "udp", "dst", "port", "67"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert capture.stderr is not None
        # Ordering: start QEMU only once tcpdump reports that it captures.
        while "listening on br0" not in (line := capture.stderr.readline()):
            assert line, "tcpdump exited before capturing"
        netdev = f"stream,id=n0,server=off,addr.type=unix,addr.path={bridge.socket}"
        command = [
            qemu_program, "-accel", "tcg", "-machine", "pc", "-nodefaults",
            "-display", "none", "-serial", "none", "-boot", "n", "-netdev", netdev,
            "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}",
        ]  # fmt: skip
        qemu = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            captured, _ = capture.communicate(timeout=120)
        finally:
            qemu.terminate()
            _, qemu_stderr = qemu.communicate(timeout=WAIT_LIMIT)
        bridge.wait_log("guest disconnected")
        counters = bridge.stop()
    assert "BOOTP/DHCP, Request from " + GUEST_MAC in captured, qemu_stderr
    assert counters["connections"] == 1
    assert counters["framing_errors"] == 0
    assert flow(counters, "guest_to_host")[0] >= 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tap", "ktap0", "--bridge", "nosuchbr"], "master nosuchbr"),
        (["--tap", "bad name"], "invalid interface name"),
        (["--tap", "br0"], "cannot create tap br0"),
    ],
)
def test_bad_settings_fail_with_one_line_and_leave_nothing(testbed, tmp_path, extra, message):
    host, _ = testbed
    socket_path = tmp_path / "n0.sock"
    command = [
        sys.executable,
        "-m",
        "kemari.cli.main",
        "net",
        "bridge",
        "--socket",
        str(socket_path),
    ]
    result = host.run([*command, *extra], check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("kemari: error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not socket_path.exists()
    assert host.run(["ip", "link", "show", "ktap0"], check=False).returncode != 0


def test_occupied_socket_is_refused(testbed, tmp_path):
    host, _ = testbed
    with running_bridge(host, tmp_path) as bridge:
        command = [
            sys.executable, "-m", "kemari.cli.main", "net", "bridge",
            "--socket", str(bridge.socket), "--tap", "ktap1",
        ]  # fmt: skip
        result = host.run(command, check=False)
        assert bridge.process.poll() is None
        bridge.stop()
    assert result.returncode == 1
    assert "in use by a running process" in result.stderr
