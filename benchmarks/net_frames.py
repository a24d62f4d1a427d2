"""Frames per second and MB/s through Kemari's NetBridge (stream socket <-> tap). Needs root.

Builds a testbed host namespace, runs ``kemari net bridge`` in it (its own
process, as in production), then for each direction and frame size runs a load
process inside the namespace:

* guest->host: a fake NIC writes stream-framed frames to the bridge socket; an
  AF_PACKET socket on the tap counts what the kernel receives from the bridge;
* host->guest: an AF_PACKET socket transmits frames on the tap; a fake NIC
  counts what the bridge delivers on the stream socket.

The sender keeps at most ``--window`` frames in flight (sent but not yet
counted), so the number measured is the sustained rate without kernel queue
drops; frames lost anyway are reported.  Prints a table; asserts nothing.

    sudo .venv/bin/python benchmarks/net_frames.py [--seconds 3] [--window 256]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kemari.net.stream import FrameDecoder, encode_frame
from kemari.testbed.topology import Topology

ETHERTYPE = 0x88B5  # local experimental: no host stack reacts to it
SO_RCVBUFFORCE = 33  # Linux; not exported by the socket module
TAP = "kbench0"
SIZES = (64, 1500)
DIRECTIONS = ("guest->host", "host->guest")


def make_frame(size: int) -> bytes:
    header = bytes.fromhex("525400aabbcc525400123456") + struct.pack("!H", ETHERTYPE)
    return header + bytes(size - len(header))


class Flow:
    """Shared counters of one measurement (sender thread vs receiver thread)."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.sending = True
        self.first_send = 0.0
        self.last_receive = 0.0

    def received_one(self) -> None:
        self.received += 1
        self.last_receive = time.perf_counter()


def send_windowed(flow: Flow, send: Callable[[], object], seconds: float, window: int) -> None:
    flow.first_send = time.perf_counter()
    deadline = flow.first_send + seconds
    while time.perf_counter() < deadline:
        if flow.sent - flow.received >= window:
            time.sleep(0.0001)
            continue
        send()
        flow.sent += 1
    flow.sending = False


def receive_until_idle(flow: Flow, receive: Callable[[], int]) -> None:
    while True:
        try:
            count = receive()
        except TimeoutError:
            if not flow.sending:
                return
            continue
        for _ in range(count):
            flow.received_one()


def load_guest_to_host(path: str, size: int, seconds: float, window: int) -> Flow:
    flow = Flow()
    capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    capture.bind((TAP, ETHERTYPE))
    capture.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    capture.settimeout(1.0)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(path)
    wire = encode_frame(make_frame(size))

    def receive() -> int:
        capture.recv(65536)
        return 1

    receiver = threading.Thread(target=receive_until_idle, args=(flow, receive))
    receiver.start()
    send_windowed(flow, lambda: peer.sendall(wire), seconds, window)
    receiver.join()
    peer.close()
    capture.close()
    return flow


def load_host_to_guest(path: str, size: int, seconds: float, window: int) -> Flow:
    flow = Flow()
    injector = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: send only
    injector.bind((TAP, 0))
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(path)
    peer.settimeout(0.05)
    decoder = FrameDecoder()
    frame = make_frame(size)
    probe = frame[:-1] + b"\x01"

    def receive() -> int:
        data = peer.recv(1 << 20)
        if not data:
            raise SystemExit("bridge closed the connection")
        return sum(1 for received in decoder.feed(data) if received == frame)

    # The bridge accepts the connection asynchronously; host frames before that
    # are (rightly) not delivered.  Probe until one arrives, then measure.
    while True:
        injector.send(probe)
        try:
            if probe in decoder.feed(peer.recv(1 << 20)):
                break
        except TimeoutError:
            continue
    peer.settimeout(1.0)

    receiver = threading.Thread(target=receive_until_idle, args=(flow, receive))
    receiver.start()
    send_windowed(flow, lambda: injector.send(frame), seconds, window)
    receiver.join()
    peer.close()
    injector.close()
    return flow


def run_load(args: argparse.Namespace) -> None:
    load = load_guest_to_host if args.direction == "guest->host" else load_host_to_guest
    flow = load(args.socket, args.size, args.seconds, args.window)
    elapsed = max(flow.last_receive - flow.first_send, 1e-9)
    print(
        json.dumps(
            {
                "sent": flow.sent,
                "received": flow.received,
                "fps": flow.received / elapsed,
                "mbps": flow.received * args.size / elapsed / 1e6,
            }
        )
    )


def wait_for(log: Path, text: str, count: int) -> None:
    deadline = time.monotonic() + 20
    while log.read_text().count(text) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"bridge never logged {text!r}:\n{log.read_text()}")
        time.sleep(0.05)


def orchestrate(args: argparse.Namespace) -> None:
    with Topology() as topology, tempfile.TemporaryDirectory() as workdir:
        host = topology.add_host("bench")
        path = Path(workdir) / "bench.sock"
        log = Path(workdir) / "bridge.log"
        with log.open("w") as log_file:
            bridge = host.popen(
                [sys.executable, "-m", "kemari.cli.main", "net", "bridge",
                 "--socket", str(path), "--tap", TAP],
                stdout=subprocess.PIPE, stderr=log_file, text=True,
            )  # fmt: skip
            wait_for(log, "listening", 1)
            print(f"{'direction':<12} {'frame':>6} {'frames/s':>10} {'MB/s':>8} {'lost':>6}")
            runs = 0
            for direction in DIRECTIONS:
                for size in SIZES:
                    result = host.run(
                        [sys.executable, __file__, "--load", direction, "--size", str(size),
                         "--socket", str(path), "--seconds", str(args.seconds),
                         "--window", str(args.window)],
                        timeout=args.seconds + 60,
                    )  # fmt: skip
                    runs += 1
                    wait_for(log, "guest disconnected", runs)
                    row = json.loads(result.stdout)
                    lost = row["sent"] - row["received"]
                    print(
                        f"{direction:<12} {size:>6} {row['fps']:>10.0f} "
                        f"{row['mbps']:>8.1f} {lost:>6}",
                        flush=True,
                    )
            bridge.send_signal(signal.SIGINT)
            counters, _ = bridge.communicate(timeout=20)
        print("bridge counters:", counters.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="sending time per case")
    parser.add_argument("--window", type=int, default=256, help="frames in flight at most")
    parser.add_argument("--load", choices=DIRECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--direction", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load is not None:
        args.direction = args.load
        run_load(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
