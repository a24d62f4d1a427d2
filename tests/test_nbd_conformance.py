"""Kemari's NBD server against real clients: qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh, sockets.

Most tests run the server in-process (an asyncio loop in a thread); the CLI
tests run ``kemari nbd serve`` as a subprocess.  Every check looks at real
bytes: in the image file, or read back through another client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kemari.nbd import protocol
from kemari.nbd.backend import RawFileBackend
from kemari.nbd.protocol import (
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    Info,
    InfoRequest,
    Option,
    OptionReply,
    Request,
    TransmissionFlag,
)
from kemari.nbd.server import NbdServer
from kemari.qemu.binary import qemu_binary
from kemari.qemu.cmdline import MachineSpec, NbdDisk, disk_node_name
from kemari.qemu.machine import QemuMachine

MiB = 1024 * 1024
IMAGE_SIZE = 64 * MiB
EXPORT = "disk"
# nbdsh is a shell wrapper running "python3 -m nbd": make it find Debian's
# python3 (which has the libnbd bindings) before any other python3 on PATH.
SYSTEM_PATH = "/usr/bin:" + os.environ.get("PATH", "")


def nbd_uri(socket_path: Path, export: str = EXPORT) -> str:
    return f"nbd+unix:///{export}?socket={socket_path}"


def run(*argv: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a client tool that must succeed; a failure shows its output."""
    result = subprocess.run(
        [str(arg) for arg in argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{argv[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result


def nbdsh(socket_path: Path, script: str) -> object:
    """Run ``script`` in nbdsh (``h`` is connected); its last output line is JSON."""
    result = subprocess.run(
        ["nbdsh", "-u", nbd_uri(socket_path), "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PATH": SYSTEM_PATH},
    )
    assert result.returncode == 0, f"nbdsh failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


class ServerThread:
    """An NbdServer on its own event loop in a background thread."""

    def __init__(self, image: Path, socket_path: Path, read_only: bool = False) -> None:
        self.image = image
        self.socket = socket_path
        self.uri = nbd_uri(socket_path)
        self.loop = asyncio.new_event_loop()
        self.backend = RawFileBackend.open(image, read_only=read_only)
        self.server = NbdServer(self.backend, socket_path, EXPORT)
        self.loop.run_until_complete(self.server.start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(30)
        asyncio.run_coroutine_threadsafe(self.backend.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerThread]:
    image = tmp_path / "disk.raw"
    with image.open("wb") as file:
        file.truncate(IMAGE_SIZE)
    server = ServerThread(image, tmp_path / "nbd.sock")
    yield server
    server.close()
    assert not server.socket.exists()


class RawClient:
    """A hand-driven NBD client on a plain socket, built on Kemari's codec."""

    def __init__(self, socket_path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(socket_path))

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError(f"server closed after {len(data)} of {size} bytes")
            data += chunk
        return bytes(data)

    def at_eof(self) -> bool:
        """True when the server has closed the connection (after any pending bytes)."""
        return self.sock.recv(1) == b""

    def greet(self, flags: ClientFlag = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES) -> None:
        offered = protocol.decode_greeting(self.recv_exact(protocol.GREETING_SIZE))
        assert offered == protocol.HandshakeFlag.FIXED_NEWSTYLE | protocol.HandshakeFlag.NO_ZEROES
        self.sock.sendall(protocol.encode_client_flags(flags))

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; return its (reply type, data) replies up to the final one."""
        self.sock.sendall(protocol.encode_option(option, data))
        replies = []
        while True:
            header = protocol.decode_option_reply_header(
                self.recv_exact(protocol.OPTION_REPLY_HEADER_SIZE)
            )
            assert header.option == option
            replies.append((header.reply, self.recv_exact(header.length)))
            if header.reply not in (OptionReply.SERVER, OptionReply.INFO):
                return replies

    def go(self, name: str = EXPORT) -> tuple[int, int]:
        """Greet and enter transmission with NBD_OPT_GO; return (size, transmission flags)."""
        self.greet()
        request = InfoRequest(name=name, items=(Info.BLOCK_SIZE,))
        replies = self.option(Option.GO, protocol.encode_info_request(request))
        assert replies[-1][0] == OptionReply.ACK
        export = next(data for kind, data in replies if data[:2] == b"\x00\x00")
        return int.from_bytes(export[2:10], "big"), int.from_bytes(export[10:12], "big")

    def send(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        handle: int = 1,
        payload: bytes = b"",
    ) -> None:
        request = Request(flags=flags, command=command, handle=handle, offset=offset, length=length)
        self.sock.sendall(protocol.encode_request(request) + payload)

    def reply(self, data_length: int = 0) -> tuple[int, int, bytes]:
        """Receive a simple reply: (error, handle, data); data only on success."""
        error, handle = protocol.decode_simple_reply(self.recv_exact(protocol.SIMPLE_REPLY_SIZE))
        data = self.recv_exact(data_length) if error == 0 and data_length else b""
        return error, handle, data

    def call(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes = b"",
    ) -> tuple[int, bytes]:
        self.send(command, offset, length, flags=flags, payload=payload, handle=42)
        error, handle, data = self.reply(length if command == Command.READ else 0)
        assert handle == 42
        return error, data


@contextlib.contextmanager
def raw_client(socket_path: Path) -> Iterator[RawClient]:
    client = RawClient(socket_path)
    try:
        yield client
    finally:
        client.close()


def write_random_source(path: Path, size: int, seed: int) -> bytes:
    """A sparse file of ``size`` bytes with random data in scattered 1 MiB chunks."""
    rng = random.Random(seed)
    content = bytearray(size)
    for start in range(0, size, 4 * MiB):
        offset = start + rng.randrange(0, 3 * MiB)
        content[offset : offset + MiB] = rng.randbytes(MiB)
    path.write_bytes(content)
    return bytes(content)


# --- qemu-img / qemu-io ------------------------------------------------------


def test_qemu_img_info_convert_and_compare(served: ServerThread, tmp_path: Path) -> None:
    info = json.loads(run("qemu-img", "info", "--output=json", served.uri).stdout)
    assert info["virtual-size"] == IMAGE_SIZE
    source = tmp_path / "source.raw"
    content = write_random_source(source, IMAGE_SIZE, seed=1)
    # Into the export, then compare through NBD and byte-for-byte in the file.
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, served.uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", source, served.uri)
    assert served.image.read_bytes() == content
    # And out of it again.
    copy = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri, copy)
    assert copy.read_bytes() == content


def test_qemu_io_write_read_fua_zero_discard_flush(served: ServerThread) -> None:
    output = run(
        "qemu-io", "-f", "raw", served.uri,
        "-c", "write -P 0xab 0 1M",
        "-c", "read -P 0xab 0 1M",
        "-c", "write -f -P 0xcd 1M 64k",
        "-c", "write -z 0 64k",
        "-c", "write -z -u 64k 64k",
        "-c", "discard 128k 64k",
        "-c", "flush",
        "-c", "read -P 0 0 128k",
        "-c", "read -P 0xab 192k 64k",
        "-c", "read -P 0xcd 1M 64k",
    ).stdout  # fmt: skip
    assert "Pattern verification failed" not in output
    assert output.count("read ") == 4
    with served.image.open("rb") as image:
        assert image.read(128 * 1024) == bytes(128 * 1024)  # zeroed with and without holes
        image.seek(192 * 1024)
        assert image.read(MiB - 192 * 1024) == b"\xab" * (MiB - 192 * 1024)
        assert image.read(64 * 1024) == b"\xcd" * 64 * 1024
    # The discarded range: the raw backend punches a hole, which reads as zeroes.
    assert served.image.read_bytes()[128 * 1024 : 192 * 1024] == bytes(64 * 1024)


def test_qemu_blockdev_options_as_the_vm_uses_them(served: ServerThread) -> None:
    # The same option spelling as -blockdev driver=nbd,server.type=unix,... for a guest disk.
    options = (
        "driver=raw,file.driver=nbd,file.server.type=unix,"
        f"file.server.path={served.socket},file.export={EXPORT}"
    )
    output = run(
        "qemu-io", "--image-opts", options,
        "-c", "write -P 0x21 4k 4k", "-c", "read -P 0x21 4k 4k",
    ).stdout  # fmt: skip
    assert "Pattern verification failed" not in output
    assert served.image.read_bytes()[4096:8192] == b"\x21" * 4096


def test_qemu_io_many_aio_requests_in_flight(served: ServerThread) -> None:
    commands = []
    for index in range(32):
        commands += ["-c", f"aio_write -P {index + 1} {index * 256}k 256k"]
    commands += ["-c", "aio_flush"]
    for index in range(32):
        commands += ["-c", f"aio_read -P {index + 1} {index * 256}k 256k"]
    commands += ["-c", "aio_flush"]
    output = run("qemu-io", "-f", "raw", served.uri, *commands).stdout
    assert "Pattern verification failed" not in output
    data = served.image.read_bytes()
    for index in range(32):
        chunk = data[index * 256 * 1024 : (index + 1) * 256 * 1024]
        assert chunk == bytes([index + 1]) * len(chunk)


def test_qemu_img_bench_deep_queue_writes_land_where_asked(served: ServerThread) -> None:
    # 4 KiB writes every 8 KiB, 32 in flight: each must land whole and alone.
    run(
        "qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "-q", "-d", "32",
        "-c", "2048", "-s", "4096", "-S", "8192", "--pattern=0x5a", served.uri,
    )  # fmt: skip
    data = served.image.read_bytes()
    for offset in range(0, 2048 * 8192, 8192):
        assert data[offset : offset + 4096] == b"\x5a" * 4096
        assert data[offset + 4096 : offset + 8192] == bytes(4096)
    run("qemu-img", "bench", "-f", "raw", "-t", "none", "-q", "-d", "32", "-c", "2048", served.uri)


def test_qemu_vm_disk_io_pause_and_resume(served: ServerThread, tmp_path: Path) -> None:
    """A real VM's virtio-blk nbd blockdev: I/O through QEMU's block layer, stop/cont drain."""
    spec = MachineSpec(
        name="nbd",
        accel="tcg",
        qmp_socket=tmp_path / "qmp.sock",
        memory_mib=32,
        start_paused=True,
        disks=(NbdDisk(served.socket, EXPORT),),
    )
    # The virtio-blk device's own block backend, which holds the write permission.
    backend = f"/machine/peripheral/v{disk_node_name(0)}/virtio-backend"

    async def qemu_io(machine: QemuMachine, command: str) -> None:
        line = f'qemu-io -d {backend} "{command}"'
        output = await machine.execute("human-monitor-command", {"command-line": line})
        assert output == "", output  # HMP's qemu-io only prints on failure

    async def scenario() -> None:
        async with QemuMachine(spec, qemu_binary("tcg").path) as machine:
            await qemu_io(machine, "write -P 0x5c 1M 256k")
            await qemu_io(machine, "write -z 1088k 64k")
            await qemu_io(machine, "flush")
            # Run (the firmware probes the disk), then pause: QEMU drains
            # in-flight disk I/O, which only works if the server answers.
            await machine.execute("cont")
            await machine.execute("stop")
            await qemu_io(machine, "write -f -P 0x6d 2M 64k")  # I/O while paused
            await machine.execute("cont")
            await machine.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 120))
    data = served.image.read_bytes()
    assert data[MiB : MiB + 64 * 1024] == b"\x5c" * 64 * 1024
    assert data[MiB + 64 * 1024 : MiB + 128 * 1024] == bytes(64 * 1024)
    assert data[MiB + 128 * 1024 : MiB + 256 * 1024] == b"\x5c" * 128 * 1024
    assert data[2 * MiB : 2 * MiB + 64 * 1024] == b"\x6d" * 64 * 1024


# --- libnbd tools ------------------------------------------------------------


def test_nbdinfo_list_and_export_details(served: ServerThread) -> None:
    listing = json.loads(run("nbdinfo", "--list", "--json", served.uri).stdout)
    assert [export["export-name"] for export in listing["exports"]] == [EXPORT]
    info = json.loads(run("nbdinfo", "--json", served.uri).stdout)
    (export,) = info["exports"]
    assert export["export-size"] == IMAGE_SIZE
    assert export["is_read_only"] is False
    for capability in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[capability] is True, capability
    assert export["can_df"] is False  # structured replies were refused
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == protocol.MAX_PAYLOAD
    # The default (empty) export name reaches the same export.
    default = json.loads(run("nbdinfo", "--json", nbd_uri(served.socket, "")).stdout)
    assert default["exports"][0]["export-size"] == IMAGE_SIZE


def test_nbdcopy_in_and_out_over_several_connections(served: ServerThread, tmp_path: Path) -> None:
    source = tmp_path / "source.raw"
    content = write_random_source(source, IMAGE_SIZE, seed=2)
    run("nbdcopy", "--connections=4", "--requests=16", "--flush", source, served.uri)
    assert served.image.read_bytes() == content
    copy = tmp_path / "copy.raw"
    run("nbdcopy", "--connections=4", served.uri, copy)
    assert copy.read_bytes() == content


def test_nbdsh_bad_requests_get_errors_and_the_connection_keeps_serving(
    served: ServerThread,
) -> None:
    results = nbdsh(
        served.socket,
        """
import json
h.set_strict_mode(0)  # let libnbd send what a careful client never would
size = h.get_size()
def attempt(call, *args):
    try:
        call(*args)
        outcome = 0
    except nbd.Error as exc:
        outcome = exc.errnum
    assert h.pread(512, 0) == bytes(512)  # the connection still serves
    return outcome
print(json.dumps({
    "read_past_end": attempt(h.pread, 4096, size - 100),
    "read_after_end": attempt(h.pread, 512, size),
    "write_past_end": attempt(h.pwrite, b"x" * 4096, size - 100),
    "zero_past_end": attempt(h.zero, 4096, size - 100),
    "trim_past_end": attempt(h.trim, 4096, size - 100),
    "oversized_read": attempt(h.pread, 32 * 1024 * 1024 + 1, 0),
    "no_hole_on_write": attempt(h.pwrite, b"x" * 512, 4096, nbd.CMD_FLAG_NO_HOLE),
    "df_on_read": attempt(h.pread, 512, 0, nbd.CMD_FLAG_DF),
    "empty_read": attempt(h.pread, 0, 0),
    "empty_write": attempt(h.pwrite, b"", 0),
    "fua_write": attempt(h.pwrite, b"f" * 512, 8192, nbd.CMD_FLAG_FUA),
    "no_hole_zero": attempt(h.zero, 512, 8192, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA),
    "flush": attempt(h.flush),
    "last_byte": attempt(h.pwrite, b"L", size - 1),
}))
""",
    )
    assert results == {
        "read_past_end": Errno.EINVAL,
        "read_after_end": Errno.EINVAL,
        "write_past_end": Errno.ENOSPC,
        "zero_past_end": Errno.ENOSPC,
        "trim_past_end": Errno.EINVAL,
        "oversized_read": Errno.EINVAL,
        "no_hole_on_write": Errno.EINVAL,
        "df_on_read": Errno.EINVAL,
        "empty_read": 0,
        "empty_write": 0,
        "fua_write": 0,
        "no_hole_zero": 0,
        "flush": 0,
        "last_byte": 0,
    }
    with served.image.open("rb") as image:
        assert image.read(8192) == bytes(8192)  # nothing from the refused writes landed
        assert image.read(512) == bytes(512)  # written, then zeroed with NO_HOLE
        image.seek(IMAGE_SIZE - 1)
        assert image.read() == b"L"


def test_nbdsh_aio_requests_complete_out_of_order_with_right_data(served: ServerThread) -> None:
    results = nbdsh(
        served.socket,
        """
import json
size = 64 * 1024
writes = [h.aio_pwrite(bytes([n]) * size, n * size) for n in range(1, 65)]
while h.aio_in_flight():
    h.poll(-1)
assert all(h.aio_command_completed(cookie) for cookie in writes)  # raises on an error reply
buffers = [nbd.Buffer(size) for _ in range(64)]
reads = [h.aio_pread(buffers[n - 1], n * size) for n in range(1, 65)]
while h.aio_in_flight():
    h.poll(-1)
assert all(h.aio_command_completed(cookie) for cookie in reads)
print(json.dumps([buffers[n - 1].to_bytearray() == bytes([n]) * size for n in range(1, 65)]))
""",
    )
    assert results == [True] * 64


MODEL_SIZE = 256 * 1024
_offsets = st.integers(0, MODEL_SIZE + 4096)
_lengths = st.integers(0, 8192)
operations = st.lists(
    st.one_of(
        st.tuples(st.just(Command.WRITE), _offsets, _lengths, st.integers(1, 255)),
        st.tuples(st.just(Command.READ), _offsets, _lengths, st.just(0)),
        st.tuples(st.just(Command.WRITE_ZEROES), _offsets, _lengths, st.sampled_from([0, 2])),
        st.tuples(st.just(Command.TRIM), _offsets, _lengths, st.just(0)),
        st.tuples(st.just(Command.FLUSH), st.just(0), st.just(0), st.just(0)),
    ),
    max_size=25,
)


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    directory = tmp_path_factory.mktemp("model")
    image = directory / "disk.raw"
    image.write_bytes(bytes(MODEL_SIZE))
    server = ServerThread(image, directory / "nbd.sock")
    yield server
    server.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations)
def test_server_matches_a_byte_array_model(
    model_server: ServerThread, ops: list[tuple[Command, int, int, int]]
) -> None:
    model = bytearray(model_server.image.read_bytes())
    with raw_client(model_server.socket) as client:
        client.go()
        for command, offset, length, extra in ops:
            in_bounds = offset + length <= MODEL_SIZE
            if command is Command.WRITE:
                payload = bytes([extra]) * length
                error, _ = client.call(command, offset, length, payload=payload)
                assert error == (0 if in_bounds else Errno.ENOSPC)
                if in_bounds:
                    model[offset : offset + length] = payload
            elif command is Command.READ:
                error, data = client.call(command, offset, length)
                assert error == (0 if in_bounds else Errno.EINVAL)
                if in_bounds:
                    assert data == model[offset : offset + length]
            elif command is Command.FLUSH:
                assert client.call(command) == (0, b"")
            else:  # WRITE_ZEROES (extra = NO_HOLE or not) and TRIM, which zeroes here
                error, _ = client.call(command, offset, length, flags=extra)
                beyond = Errno.ENOSPC if command is Command.WRITE_ZEROES else Errno.EINVAL
                assert error == (0 if in_bounds else beyond)
                if in_bounds:
                    model[offset : offset + length] = bytes(length)
        client.send(Command.DISC)
    assert model_server.image.read_bytes() == model


# --- raw sockets: handshake details and broken clients -----------------------


def test_options_are_answered_per_spec(served: ServerThread) -> None:
    with raw_client(served.socket) as client:
        client.greet()
        assert client.option(Option.STRUCTURED_REPLY)[0][0] == OptionReply.ERR_UNSUP
        assert client.option(Option.STARTTLS)[0][0] == OptionReply.ERR_UNSUP
        assert client.option(Option.LIST, b"junk")[0][0] == OptionReply.ERR_INVALID
        assert client.option(Option.INFO, b"\x00\x00\x00\x09abc")[0][0] == OptionReply.ERR_INVALID
        unknown = protocol.encode_info_request(InfoRequest(name="nope", items=()))
        assert client.option(Option.INFO, unknown)[0][0] == OptionReply.ERR_UNKNOWN
        too_big = client.option(9999, bytes(protocol.MAX_OPTION_DATA + 1))
        assert too_big[0][0] == OptionReply.ERR_TOO_BIG
        listing = client.option(Option.LIST)
        assert listing == [(OptionReply.SERVER, protocol.encode_rep_server(EXPORT)), (1, b"")]
        info = client.option(
            Option.INFO, protocol.encode_info_request(InfoRequest(name="", items=(Info.NAME,)))
        )
        assert (OptionReply.INFO, protocol.encode_info_name(EXPORT)) in info
        assert info[-1] == (OptionReply.ACK, b"")
        assert client.option(Option.ABORT) == [(OptionReply.ACK, b"")]
        assert client.at_eof()


def test_export_name_option_with_and_without_zero_padding(served: ServerThread) -> None:
    for flags, padding in ((ClientFlag.FIXED_NEWSTYLE, 124), (ClientFlag(3), 0)):
        with raw_client(served.socket) as client:
            client.greet(flags)
            client.sock.sendall(protocol.encode_option(Option.EXPORT_NAME, EXPORT.encode()))
            reply = client.recv_exact(10 + padding)
            assert int.from_bytes(reply[:8], "big") == IMAGE_SIZE
            assert TransmissionFlag(int.from_bytes(reply[8:10], "big")) & TransmissionFlag.SEND_FUA
            assert reply[10:] == bytes(padding)
            assert client.call(Command.READ, 0, 512) == (0, bytes(512))
    with raw_client(served.socket) as client:
        client.greet()
        client.sock.sendall(protocol.encode_option(Option.EXPORT_NAME, b"nope"))
        assert client.at_eof()  # EXPORT_NAME cannot fail politely


def test_invalid_requests_keep_the_stream_in_sync(served: ServerThread) -> None:
    with raw_client(served.socket) as client:
        size, flags = client.go()
        assert size == IMAGE_SIZE
        assert flags & TransmissionFlag.CAN_MULTI_CONN
        assert client.call(99, 0, 512)[0] == Errno.EINVAL
        assert client.call(Command.BLOCK_STATUS, 0, 512)[0] == Errno.EINVAL
        assert client.call(Command.FLUSH, 512, 0)[0] == Errno.EINVAL
        assert client.call(Command.READ, 0, protocol.MAX_PAYLOAD + 1)[0] == Errno.EINVAL
        # An oversized WRITE still carries its payload; it is skipped, not parsed.
        big = b"\xee" * (protocol.MAX_PAYLOAD + 512)
        assert client.call(Command.WRITE, 0, len(big), payload=big)[0] == Errno.EINVAL
        bad_flags = b"\xee" * 512
        assert client.call(Command.WRITE, 0, 512, flags=1 << 9, payload=bad_flags)[0] == 22
        assert client.call(Command.READ, 0, 512) == (0, bytes(512))
        # A maximum-size request is fine.
        whole = b"\x77" * protocol.MAX_PAYLOAD
        assert client.call(Command.WRITE, 0, len(whole), payload=whole) == (0, b"")
        assert client.call(Command.READ, 0, len(whole)) == (0, whole)
        # Trim and write-zeroes carry no payload, so any in-bounds length is served.
        assert client.call(Command.WRITE_ZEROES, 0, IMAGE_SIZE)[0] == 0
        assert client.call(Command.TRIM, 0, IMAGE_SIZE, flags=CommandFlag.FUA)[0] == 0
        client.send(Command.DISC)
        assert client.at_eof()
    assert served.image.read_bytes()[: protocol.MAX_PAYLOAD] == bytes(protocol.MAX_PAYLOAD)


def test_in_flight_requests_finish_before_disconnect(served: ServerThread) -> None:
    with raw_client(served.socket) as client:
        client.go()
        payloads = [bytes([n]) * MiB for n in range(1, 9)]
        for n, payload in enumerate(payloads):
            client.send(Command.WRITE, n * MiB, MiB, handle=n, payload=payload)
        client.send(Command.DISC)
        handles = {client.reply()[1] for _ in payloads}
        assert handles == set(range(len(payloads)))
        assert client.at_eof()
    assert served.image.read_bytes()[: 8 * MiB] == b"".join(payloads)


def test_bad_magic_drops_only_that_connection(served: ServerThread) -> None:
    with raw_client(served.socket) as bystander, raw_client(served.socket) as offender:
        bystander.go()
        offender.go()
        offender.sock.sendall(b"\xde\xad\xbe\xef" + bytes(24))
        assert offender.at_eof()
        assert bystander.call(Command.WRITE, 0, 4, payload=b"ok!!") == (0, b"")
        assert bystander.call(Command.READ, 0, 4) == (0, b"ok!!")
    run("nbdinfo", served.uri)


def test_broken_handshakes_leave_the_server_serving(served: ServerThread) -> None:
    with raw_client(served.socket):
        pass  # connect and hang up before reading the greeting
    with raw_client(served.socket) as client:
        client.recv_exact(protocol.GREETING_SIZE)
        client.sock.sendall(b"\x00\x00")  # half the client flags
    with raw_client(served.socket) as client:
        client.recv_exact(protocol.GREETING_SIZE)
        client.sock.sendall(b"\x00\x00\x00\x80")  # a client flag nobody offered
        assert client.at_eof()
    with raw_client(served.socket) as client:
        client.greet()
        client.sock.sendall(protocol.encode_option(Option.GO, b"\x00\x00")[:10])  # cut short
    with raw_client(served.socket) as client:
        client.greet()
        client.sock.sendall(b"NOTMAGIC" + bytes(8))  # bad option magic
        assert client.at_eof()
    with raw_client(served.socket) as client:
        client.go()
        client.sock.sendall(protocol.encode_request(Request(0, Command.WRITE, 1, 0, 4096))[:20])
    info = json.loads(run("nbdinfo", "--json", served.uri).stdout)
    assert info["exports"][0]["export-size"] == IMAGE_SIZE


def test_close_ends_connected_clients_and_removes_the_socket(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(MiB))
    server = ServerThread(image, tmp_path / "nbd.sock")
    with raw_client(server.socket) as idle, raw_client(server.socket) as greeting:
        idle.go()
        server.close()
        assert idle.at_eof()
        greeting.recv_exact(protocol.GREETING_SIZE)
        assert greeting.at_eof()
    assert not server.socket.exists()


def test_close_does_not_wait_for_a_client_that_stopped_reading(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(8 * MiB))
    server = ServerThread(image, tmp_path / "nbd.sock")
    with raw_client(server.socket) as stalled:
        stalled.go()
        # 64 MiB of READ replies: far more than the socket buffers hold.
        for handle in range(64):
            stalled.send(Command.READ, 0, MiB, handle=handle)
        with raw_client(server.socket) as other:
            other.go()
            assert other.call(Command.READ, 0, 4) == (0, bytes(4))  # others are served
        server.close()  # returns although nobody reads the stalled replies
    assert not server.socket.exists()


# --- host errors -------------------------------------------------------------


@pytest.mark.root
def test_full_host_disk_gives_enospc_and_serving_goes_on(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mount], check=True)
    try:
        image = mount / "disk.raw"
        with image.open("wb") as file:
            file.truncate(16 * MiB)  # sparse: far more than the filesystem can hold
        server = ServerThread(image, tmp_path / "nbd.sock")
        try:
            results = nbdsh(
                server.socket,
                """
import json
outcomes = []
for n in range(8):
    try:
        h.pwrite(bytes([n + 1]) * (1024 * 1024), n * 1024 * 1024)
        outcomes.append(0)
    except nbd.Error as exc:
        outcomes.append(exc.errnum)
print(json.dumps({"writes": outcomes, "first": list(h.pread(4, 0))}))
""",
            )
        finally:
            server.close()
    finally:
        subprocess.run(["umount", mount], check=True)
    assert isinstance(results, dict)
    assert results["writes"][0] == 0
    assert Errno.ENOSPC in results["writes"]
    assert set(results["writes"]) <= {0, Errno.ENOSPC}
    assert results["first"] == [1, 1, 1, 1]


# --- the CLI -----------------------------------------------------------------


def kemari(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "kemari.cli.main", *(str(arg) for arg in args)]


@contextlib.contextmanager
def cli_server(*args: str | Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        kemari("nbd", "serve", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()
        assert "serving" in ready, process.stderr.read() if process.stderr else ""
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(30)
        if process.stdout:
            process.stdout.close()
        if process.stderr:
            process.stderr.close()


def test_cli_read_only_export(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x42" * MiB)
    socket_path = tmp_path / "ro.sock"
    with cli_server(image, "--socket", socket_path, "--read-only") as process:
        info = json.loads(run("nbdinfo", "--json", nbd_uri(socket_path)).stdout)["exports"][0]
        assert info["is_read_only"] is True
        assert info["can_trim"] is False
        assert info["can_zero"] is False
        results = nbdsh(
            socket_path,
            """
import json
h.set_strict_mode(0)
outcomes = {}
for name, call, args in [
    ("write", h.pwrite, (b"x" * 512, 0)),
    ("trim", h.trim, (512, 0)),
    ("zero", h.zero, (512, 0)),
]:
    try:
        call(*args)
        outcomes[name] = 0
    except nbd.Error as exc:
        outcomes[name] = exc.errnum
outcomes["read"] = list(h.pread(2, 0))
print(json.dumps(outcomes))
""",
        )
        assert results == {"write": 1, "trim": 1, "zero": 1, "read": [0x42, 0x42]}
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    assert not socket_path.exists()
    assert image.read_bytes() == b"\x42" * MiB


def test_cli_serves_qemu_img_and_replaces_a_stale_socket(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4 * MiB))
    socket_path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path))
    stale.close()  # the file stays, nobody listens
    with cli_server(image, "--socket", socket_path, "--export", "vda") as process:
        run("qemu-io", "-f", "raw", nbd_uri(socket_path, "vda"), "-c", "write -P 0x33 0 4M")
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    assert image.read_bytes() == b"\x33" * 4 * MiB
    assert not socket_path.exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("image_is_directory", "cannot open disk image {image_dir}: Is a directory"),
        ("socket_is_regular_file", "socket path {regular} exists and is not a socket"),
        ("socket_path_too_long", "socket path {long} is longer than 107 bytes"),
        ("empty_export_name", "invalid export name ''"),
    ],
)
def test_cli_refuses_bad_paths_and_names(tmp_path: Path, case: str, message: str) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(MiB))
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    paths = {"image_dir": tmp_path, "regular": regular, "long": tmp_path / ("x" * 120)}
    argv: dict[str, list[str | Path]] = {
        "image_is_directory": [tmp_path, "--socket", tmp_path / "a.sock"],
        "socket_is_regular_file": [image, "--socket", regular],
        "socket_path_too_long": [image, "--socket", paths["long"]],
        "empty_export_name": [image, "--socket", tmp_path / "a.sock", "--export", ""],
    }
    result = subprocess.run(
        kemari("nbd", "serve", *argv[case]), capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["kemari: error: " + message.format(**paths)]
    assert regular.read_text() == "keep me"
    assert not (tmp_path / "a.sock").exists()


def test_cli_bad_input_gives_one_line_errors(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(MiB))
    missing = subprocess.run(
        kemari("nbd", "serve", tmp_path / "nope.raw", "--socket", tmp_path / "a.sock"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"kemari: error: disk image {tmp_path / 'nope.raw'} does not exist"
    ]
    assert not (tmp_path / "a.sock").exists()

    socket_path = tmp_path / "busy.sock"
    with cli_server(image, "--socket", socket_path):
        other = tmp_path / "other.raw"
        other.write_bytes(bytes(MiB))
        busy = subprocess.run(
            kemari("nbd", "serve", other, "--socket", socket_path),
            capture_output=True,
            text=True,
            check=False,
        )
        assert busy.returncode == 1
        assert busy.stderr.strip().splitlines() == [
            f"kemari: error: socket path {socket_path} is in use by a running process"
        ]
        locked = subprocess.run(
            kemari("nbd", "serve", image, "--socket", tmp_path / "second.sock"),
            capture_output=True,
            text=True,
            check=False,
        )
        assert locked.returncode == 1
        assert locked.stderr.strip().splitlines() == [
            f"kemari: error: disk image {image} is locked by another process"
        ]
        run("nbdinfo", nbd_uri(socket_path))  # the running server was not disturbed
