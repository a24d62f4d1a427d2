"""The inherited guest link: QEMU's end of a socketpair with a send buffer for a full TX ring.

Real sockets, a real tap (inside a testbed namespace) and the kernel's own accounting; the
QEMU side of the link is exercised with a real guest by tests/test_eventtap_backpressure.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kemari.errors import QemuError
from kemari.net.bridge import QEMU_SEND_BUFFER_BYTES, guest_socketpair
from kemari.net.stream import encode_frame
from kemari.qemu.cmdline import MachineSpec, StreamNic
from kemari.qemu.machine import QemuMachine
from kemari.testbed.topology import Topology

# virtio-net's TX ring in QEMU 7.2 (VIRTIO_NET_TX_QUEUE_DEFAULT_SIZE): one frame per descriptor.
TX_RING_FRAMES = 256


def _fill(sock: socket.socket, wire: bytes, count: int) -> int:
    """Write ``wire`` up to ``count`` times without blocking; returns how many went in."""
    sock.setblocking(False)
    for written in range(count):
        try:
            sent = sock.send(wire)
        except BlockingIOError:
            return written
        assert sent == len(wire)
    return count


@pytest.mark.root  # SO_SNDBUFFORCE needs CAP_NET_ADMIN
@pytest.mark.parametrize("frame_bytes", [1514, 9014])
def test_qemu_end_takes_a_full_tx_ring_of_frames(frame_bytes: int) -> None:
    ours, theirs = guest_socketpair()
    with ours, theirs:
        assert theirs.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == QEMU_SEND_BUFFER_BYTES
        # What QEMU writes for each frame of a full ring, with Kemari not reading at all.
        wire = encode_frame(b"\xaa" * frame_bytes)
        assert _fill(theirs, wire, TX_RING_FRAMES) == TX_RING_FRAMES


@pytest.mark.root
def test_without_cap_net_admin_the_buffer_is_capped_by_wmem_max_with_a_warning() -> None:
    """Root without CAP_NET_ADMIN: SO_SNDBUFFORCE is refused, SO_SNDBUF is capped, it says so."""
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    script = textwrap.dedent(
        f"""
        import json, logging, socket
        from kemari.net.bridge import set_send_buffer
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("kemari.net.bridge").addHandler(handler)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        granted = set_send_buffer(theirs, {4 * wmem_max})
        print(json.dumps({{"granted": granted, "warnings": [r.getMessage() for r in records]}}))
        """
    )
    result = _run_without_net_admin([sys.executable, "-c", script])
    report = json.loads(result)
    # Linux doubles the capped request: min(4 * wmem_max / 2, wmem_max) * 2.
    assert report["granted"] == 2 * wmem_max
    assert len(report["warnings"]) == 1
    assert f"{2 * wmem_max}-byte send buffer, not {4 * wmem_max}" in report["warnings"][0]


def _run_without_net_admin(command: list[str]) -> str:
    wrapped = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", *command]
    result = subprocess.run(wrapped, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


_PLUG_SCRIPT = """
import asyncio, json, socket
from kemari.errors import NetError
from kemari.net.bridge import NetBridge
from kemari.net.stream import encode_frame
from kemari.testbed.wait import async_wait_for

async def main() -> None:
    bridge = NetBridge(None, "ktap0")
    await bridge.start()
    report = {}
    try:
        first = await bridge.plug_guest()
        report["attached"] = bridge.guest_attached
        report["sndbuf"] = first.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        try:
            await bridge.plug_guest()
        except NetError as exc:
            report["second_plug"] = str(exc)
        # A guest frame written on QEMU's end reaches the bridge (and the tap).
        first.sendall(encode_frame(b"\\xff" * 6 + b"\\x52" * 54))
        counters = bridge.counters
        await async_wait_for(
            lambda: counters.guest_to_host.frames + counters.guest_to_host_failed.frames >= 1,
            "the guest frame at the bridge", 10, 0.01,
        )
        first.close()  # that QEMU exits: the only copy of its end is gone
        await async_wait_for(lambda: not bridge.guest_attached, "the detach", 10, 0.01)
        report["detached"] = True
        second = await bridge.plug_guest()  # the next QEMU (a failover) gets a new link
        report["reattached"] = bridge.guest_attached
        second.close()
        await async_wait_for(lambda: not bridge.guest_attached, "the second detach", 10, 0.01)
    finally:
        await bridge.close()
    report["counters"] = bridge.counters.as_dict()
    print(json.dumps(report))

asyncio.run(asyncio.wait_for(main(), 30))
"""


@pytest.mark.root
def test_a_new_link_serves_the_next_qemu_after_the_previous_one_went() -> None:
    with Topology() as topology:
        host = topology.add_host("host")
        report = json.loads(host.run([sys.executable, "-c", _PLUG_SCRIPT]).stdout)
    assert report["attached"] is True
    assert report["sndbuf"] == QEMU_SEND_BUFFER_BYTES
    assert "a QEMU is still attached" in report["second_plug"]
    assert report["detached"] is True
    assert report["reattached"] is True
    counters = report["counters"]
    assert counters["connections"] == 2
    assert counters["guest_to_host"]["frames"] == 1
    assert counters["framing_errors"] == 0


def test_machine_refuses_nic_descriptors_that_are_not_open_sockets(tmp_path: Path) -> None:
    async def start_with(fd: int) -> None:
        spec = MachineSpec(
            name="t",
            accel="tcg",
            qmp_socket=tmp_path / "qmp.sock",
            nics=(StreamNic("52:54:00:12:34:56", fd=fd),),
        )
        # /bin/true is never run: the descriptors are checked before QEMU is spawned.
        await QemuMachine(spec, Path("/bin/true")).start()

    read_end, write_end = os.pipe()
    try:
        with pytest.raises(QemuError, match="is not a socket"):
            asyncio.run(start_with(read_end))
    finally:
        os.close(read_end)
        os.close(write_end)
    # The highest descriptor the process may have: never opened by this test run.
    unopened = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
    with pytest.raises(QemuError, match="is not open"):
        asyncio.run(start_with(unopened))
