"""The replication channel under attack (issue 10): each test is one of the issue's probes.

Real sockets on loopback; where the issue's probe was another process (a replayed
recording, a fake standby, a standby that stops reading), the attacker runs as one.
Certificates come from ``kemari pki`` (kemari/transaction/pki.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from support.stuck_standby import stuck_standby

from kemari.cli.main import main as kemari_main
from kemari.config import TLS_FILES, TlsCreds, config_from_mapping
from kemari.errors import ConfigError, KemariError, TransactionError
from kemari.replica.applier import ReplicaApplier
from kemari.replica.receiver import StandbyReceiver
from kemari.stream.format import PAGE_SIZE
from kemari.transaction.pki import make_credentials
from kemari.transaction.session import (
    Committed,
    FrameReader,
    FrameWriter,
    Identity,
    PeerRefused,
    PrimarySession,
    RunState,
    SendTimeout,
    SessionFailed,
    StandbySession,
    session_binding,
)
from kemari.transaction.transport import (
    PRE_HANDSHAKE_BYTES,
    Listener,
    Transport,
    TransportClosed,
    connect,
)
from kemari.transaction.wire import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    NO_PAYLOAD_CRC,
    WIRE_VERSION,
    Begin,
    CommitAck,
    Confirm,
    DeviceState,
    FrameType,
    Hello,
    HelloAck,
    RamBlock,
    RamBlocks,
    RamPages,
    RefuseReason,
    Role,
    VmDescription,
    encode_frame,
    page_indices,
)

VM = "vm1"
DIGEST = bytes(range(32))
IDENTITY = Identity(VM, DIGEST)
BLOCK = RamBlock("pc.ram", 256 * PAGE_SIZE)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with the pair ``kemari-vm1``, another pair under the same CA, another CA."""
    root = tmp_path_factory.mktemp("pki")
    make_credentials(root / "pair", "kemari-vm1")
    make_credentials(root / "other-pair", "kemari-vm2", ca=root / "pair")
    make_credentials(root / "other-ca", "kemari-vm1")
    return root


def creds(pki: Path, which: str = "pair", name: str = "kemari-vm1") -> TlsCreds:
    return TlsCreds(pki / which, name)


# --- helpers: a real receiver with a real replica, a primary that syncs -----------------


async def _with_receiver(
    tmp_path: Path, body: Callable[[StandbyReceiver], Awaitable[object]], **kwargs: object
) -> object:
    applier = ReplicaApplier(tmp_path / "replica", config_digest=DIGEST.hex())
    receiver = StandbyReceiver("kemari:tcp:127.0.0.1:0", IDENTITY, applier, **kwargs)  # type: ignore[arg-type]
    await receiver.start()
    try:
        return await body(receiver)
    finally:
        await receiver.close()
        applier.close()


@contextlib.asynccontextmanager
async def _loopback_listener(
    tls: TlsCreds | None = None, *, pre_handshake_bytes: int | None = PRE_HANDSHAKE_BYTES
) -> AsyncIterator[Listener]:
    """A standby's listener on a free loopback port, closed on exit."""
    listener = Listener("kemari:tcp:127.0.0.1:0", tls=tls, pre_handshake_bytes=pre_handshake_bytes)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.close()


async def _connected(
    listener: Listener, tls: TlsCreds | None = None
) -> tuple[Transport, Transport]:
    """A client connection to ``listener`` and its accepted end: (client, server)."""
    accepted: asyncio.Task[Transport] = asyncio.create_task(listener.accept())
    client = await connect(str(listener.bound), 5, tls=tls)
    return client, await accepted


async def _sync(session: PrimarySession, checkpoints: int, blocks=(BLOCK,)) -> None:
    """An initial sync (epoch 0) and ``checkpoints`` checkpoints, each page tagged."""
    await session.send(Begin(0))
    await session.send(RamBlocks(0, tuple(blocks), "pc-i440fx-7.2", 2))
    await session.send(RamPages(0, 0, page_indices([0]), page_indices([]), b"\x01" * PAGE_SIZE))
    await session.send(DeviceState(0, b"device-state-0"))
    await session.send(VmDescription(0, b'{"devices": []}'))
    await session.commit(timeout=5)
    for epoch in range(1, checkpoints + 1):
        await session.send(Begin(epoch))
        page = bytes([epoch]) * PAGE_SIZE
        await session.send(RamPages(epoch, 0, page_indices([0]), page_indices([]), page))
        await session.send(DeviceState(epoch, f"device-state-{epoch}".encode()))
        await session.commit(timeout=5)


async def _primary(uri: str, run: RunState, checkpoints: int, tls: TlsCreds | None = None) -> None:
    transport = await connect(uri, 5, tls=tls)
    session = await PrimarySession.handshake(transport, IDENTITY, 5, run=run)
    try:
        await _sync(session, checkpoints)
    finally:
        await session.close("done")


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def _run_process(code: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


# --- 1. authentication: TLS 1.3 with certificates of the pair ---------------------------


def test_tls_session_is_mutually_authenticated_tls13(pki: Path) -> None:
    async def scenario() -> tuple[str, str, bool, bool]:
        async with _loopback_listener(creds(pki)) as listener:
            client, server = await _connected(listener, creds(pki))
            standby = asyncio.create_task(StandbySession.handshake(server, IDENTITY, 5))
            primary = await PrimarySession.handshake(client, IDENTITY, 5)
            await standby
            ssl_client = client._transport.get_extra_info("ssl_object")  # type: ignore[attr-defined]
            ssl_server = server._transport.get_extra_info("ssl_object")  # type: ignore[attr-defined]
            versions = (ssl_client.version(), ssl_server.version())
            await primary.close()
            await server.close()
            return (*versions, client.tls, server.tls)

    assert asyncio.run(scenario()) == ("TLSv1.3", "TLSv1.3", True, True)


# --- payload checksums: dropped on TLS (its AEAD covers every byte), kept on plain TCP --


async def _session_pair(
    listener: Listener, tls: TlsCreds | None, identity: Identity = IDENTITY
) -> tuple[PrimarySession, StandbySession, Transport]:
    """Both ends of a real session; also the standby's transport, for raw reads."""
    client, server = await _connected(listener, tls)
    standby = asyncio.create_task(StandbySession.handshake(server, identity, 5))
    primary = await PrimarySession.handshake(client, identity, 5)
    return primary, await standby, server


def _machine_frame(sequence: int) -> bytes:
    """RAM_BLOCKS with its payload crc32, then one payload byte changed: what a path
    that corrupts bytes after the checksum was taken would deliver."""
    frame = bytearray(b"".join(encode_frame(RamBlocks(0, (BLOCK,), "pc-i440fx-7.2"), sequence)))
    at = frame.index(b"7.2")
    frame[at + 2 : at + 3] = b"3"
    return bytes(frame)


@pytest.mark.parametrize("use_tls", [True, False], ids=["tls", "plain"])
def test_page_frames_carry_a_payload_crc_only_on_plain_tcp(pki: Path, use_tls: bool) -> None:
    tls = creds(pki) if use_tls else None
    pages = RamPages(0, 0, page_indices([3, 4]), page_indices([5]), b"\x17" * 2 * PAGE_SIZE)

    async def scenario() -> tuple[tuple[str, ...], tuple[str, ...], list[tuple[int, int]]]:
        async with _loopback_listener(tls) as listener:
            primary, standby, server = await _session_pair(listener, tls)
            await primary.send(Begin(0))
            await primary.send(RamBlocks(0, (BLOCK,)))
            await primary.send(pages)
            fields = []
            for _ in range(3):  # read as the standby's bytes arrive, header checked
                header = bytes(await server.read_exactly(HEADER_SIZE))
                *_, length, crc, header_crc = HEADER.unpack(header)
                assert header_crc == zlib.crc32(header[:32])
                payload = bytes(await server.read_exactly(length)) if length else b""
                fields.append((crc, zlib.crc32(payload)))
            await primary.close()
            await server.close()
            return primary.capabilities, standby.capabilities, fields

    offered, accepted, fields = asyncio.run(scenario())
    assert offered == accepted == ((NO_PAYLOAD_CRC,) if use_tls else ())
    page_crc, page_payload_crc = fields[2]
    assert page_payload_crc != 0
    assert page_crc == (0 if use_tls else page_payload_crc)


@pytest.mark.parametrize("use_tls", [True, False], ids=["tls", "plain"])
def test_a_corrupted_payload_is_refused_by_its_crc_on_plain_tcp(pki: Path, use_tls: bool) -> None:
    """On plain TCP the payload crc32 refuses a changed byte; on TLS the same bytes pass
    the frame decoder (nothing but the endpoints can change them: the AEAD refuses any
    change on the way, and the transaction rules still check every field)."""
    tls = creds(pki) if use_tls else None

    async def scenario() -> str:
        async with _loopback_listener(tls) as listener:
            primary, standby, server = await _session_pair(listener, tls)
            await primary.send(Begin(0))
            primary.transport.write(_machine_frame(sequence=3))  # after HELLO, CONFIRM, BEGIN
            try:
                assert await standby.receive() == Begin(0)
                event = await standby.receive()
                assert isinstance(event, RamBlocks)
                return event.machine_type
            except SessionFailed as exc:
                return str(exc)
            finally:
                await primary.transport.close()
                await server.close()

    outcome = asyncio.run(scenario())
    if use_tls:
        assert outcome == "pc-i440fx-7.3"
    else:
        assert outcome.startswith("RAM_BLOCKS payload checksum mismatch (corrupted stream)")


def test_a_plain_primary_offering_no_payload_crc_keeps_the_checksums(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hostile primary on plain TCP asks for no checksums: the standby leaves the
    capability out of HELLO_ACK, says so in one line, and still checks every payload."""

    async def scenario() -> tuple[tuple[str, ...], str]:
        async with _loopback_listener() as listener:
            client, server = await _connected(listener)
            standby = asyncio.create_task(StandbySession.handshake(server, IDENTITY, 5))
            writer, reader = FrameWriter(client), FrameReader(client)
            hello = Hello(
                Role.PRIMARY,
                VM,
                DIGEST,
                (NO_PAYLOAD_CRC,),
                nonce=os.urandom(32),
                run_id=os.urandom(16),
            )
            await writer.send(hello)
            ack = (await reader.receive()).payload
            assert isinstance(ack, HelloAck)
            await writer.send(Confirm(session_binding(hello, ack)))
            session = await standby
            await writer.send(Begin(0))
            client.write(b"".join(encode_frame(DeviceState(0, b"state"), 3, payload_crc=False)))
            try:
                assert await session.receive() == Begin(0)
                await session.receive()
            except SessionFailed as exc:
                return ack.capabilities, str(exc)
            finally:
                await client.close()
                await server.close()
            return ack.capabilities, "accepted"

    with caplog.at_level(logging.WARNING):
        capabilities, outcome = asyncio.run(scenario())
    assert capabilities == ()
    assert outcome.startswith("DEVICE_STATE payload checksum mismatch (corrupted stream)")
    [warning] = [r.getMessage() for r in caplog.records if NO_PAYLOAD_CRC in r.getMessage()]
    assert "over plain TCP: ignored, payload checksums stay on" in warning


def test_a_plain_standby_claiming_no_payload_crc_is_refused() -> None:
    async def scenario() -> str:
        async with _loopback_listener() as listener:
            client, server = await _connected(listener)

            async def hostile_standby() -> None:
                hello = (await FrameReader(server).receive()).payload
                assert isinstance(hello, Hello)
                ack = HelloAck(Role.STANDBY, VM, DIGEST, (NO_PAYLOAD_CRC,), nonce=os.urandom(32))
                await FrameWriter(server).send(ack)

            standby = asyncio.create_task(hostile_standby())
            try:
                await PrimarySession.handshake(client, IDENTITY, 5)
            except TransactionError as exc:
                return str(exc)
            finally:
                await standby
                await client.close()
                await server.close()
            return "accepted"

    assert asyncio.run(scenario()).endswith(
        "claims capabilities the primary never offered on this transport: no-payload-crc"
    )


def test_no_payload_crc_is_never_offered_on_plain_tcp_even_if_configured() -> None:
    configured = Identity(VM, DIGEST, (NO_PAYLOAD_CRC,))

    async def scenario() -> tuple[tuple[str, ...], tuple[str, ...]]:
        async with _loopback_listener() as listener:
            primary, standby, server = await _session_pair(listener, None, configured)
            await primary.close()
            await server.close()
            return primary.capabilities, standby.capabilities

    assert asyncio.run(scenario()) == ((), ())


def test_forged_initial_sync_over_plain_tcp_is_refused_by_a_tls_standby(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10.1 "forgery": a made-up initial sync never reaches the replica."""

    async def body(receiver: StandbyReceiver) -> object:
        try:
            await _primary(str(receiver.listener.bound), RunState.new(), 0, tls=None)
        except (KemariError, OSError) as exc:
            return exc
        return None

    with caplog.at_level(logging.WARNING):
        error = asyncio.run(_with_receiver(tmp_path, body, tls=creds(pki)))
    assert isinstance(error, TransactionError | OSError)
    assert not (tmp_path / "replica").exists() or not any((tmp_path / "replica").rglob("*ram*"))
    assert "TLS handshake failed" in caplog.text
    assert "refused peer 127.0.0.1" in caplog.text


FAKE_STANDBY = """
import socket, sys
from kemari.transaction.wire import FrameDecoder, encode_frame, HelloAck, CommitAck, Role
from kemari.transaction.wire import FrameType, Hello
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
decoder, seq = FrameDecoder(), 0
def send(payload):
    global seq
    conn.sendall(b"".join(encode_frame(payload, seq))); seq += 1
while data := conn.recv(65536):
    try:
        frames = decoder.feed(data)
    except Exception as exc:
        print("not a kemari frame:", exc, flush=True); break
    for frame in frames:
        p = frame.payload
        if type(p) is Hello:   # echo the (public) digest: the whole forgery of issue 10.1
            send(HelloAck(Role.STANDBY, p.vm_name, p.config_digest, p.capabilities,
                          nonce=bytes(32)))
        elif frame.payload.TYPE is FrameType.COMMIT:
            send(CommitAck(p.epoch))
"""


def test_primary_with_credentials_refuses_a_fake_standby(pki: Path) -> None:
    """Issue 10.1 "fake standby": a process that echoes the digest is refused."""
    fake = subprocess.Popen(
        [sys.executable, "-c", FAKE_STANDBY], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert fake.stdout is not None
        port = int(fake.stdout.readline())

        async def primary() -> BaseException | None:
            try:
                await _primary(f"kemari:tcp:127.0.0.1:{port}", RunState.new(), 2, tls=creds(pki))
            except (KemariError, OSError) as exc:
                return exc
            return None

        error = asyncio.run(primary())
    finally:
        fake.kill()
        fake.wait()
    assert isinstance(error, TransactionError)
    assert "TLS handshake with standby" in str(error)


@pytest.mark.parametrize(
    ("server_creds", "expected"),
    [
        (("other-ca", "kemari-vm1"), "certificate does not verify"),
        (("other-pair", "kemari-vm2"), "certificate does not verify"),
    ],
)
def test_primary_refuses_a_standby_certificate_of_another_ca_or_pair(
    pki: Path, server_creds: tuple[str, str], expected: str
) -> None:
    async def scenario() -> BaseException | None:
        async with _loopback_listener(creds(pki, *server_creds)) as listener:
            try:
                await connect(str(listener.bound), 5, tls=creds(pki))
            except TransactionError as exc:
                return exc
        return None

    error = asyncio.run(scenario())
    assert isinstance(error, TransactionError)
    assert expected in str(error)


@pytest.mark.parametrize(
    ("client_creds", "expected"),
    [
        (
            ("other-pair", "kemari-vm1"),
            "certificate names kemari-vm2, this pair expects kemari-vm1",
        ),
        (("other-ca", "kemari-vm1"), "TLS handshake failed"),
    ],
)
def test_standby_refuses_a_primary_certificate_of_another_pair_or_ca(
    pki: Path, client_creds: tuple[str, str], expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> int:
        async with _loopback_listener(creds(pki)) as listener:
            # The other pair's client certificate verifies against our CA, so the
            # client's view of the handshake succeeds; the listener drops it after.
            with caplog.at_level(logging.WARNING):
                try:
                    transport = await connect(str(listener.bound), 5, tls=creds(pki, *client_creds))
                    assert await transport.read_some(10) == b""
                except (TransactionError, TransportClosed, OSError):
                    pass
                await _until(lambda: listener.refused == 1)
            return listener._queue.qsize()

    assert asyncio.run(scenario()) == 0
    assert expected in caplog.text


def test_tls_creds_config_is_parsed_and_checked_once(pki: Path, tmp_path: Path) -> None:
    config = config_from_mapping({"name": VM, "tls_creds": str(pki / "pair")})
    assert config.tls_creds == TlsCreds(pki / "pair", "kemari-vm1")
    named = config_from_mapping({"name": VM, "tls_creds": str(pki / "pair"), "tls_name": "x.y"})
    assert named.tls_creds is not None and named.tls_creds.peer_name == "x.y"
    with pytest.raises(ConfigError, match="is not a directory"):
        config_from_mapping({"name": VM, "tls_creds": str(tmp_path / "nowhere")})
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "ca-cert.pem").write_text("x")
    with pytest.raises(ConfigError, match=r"server-cert\.pem is missing"):
        config_from_mapping({"name": VM, "tls_creds": str(partial)})
    with pytest.raises(ConfigError, match="tls_name: given without tls_creds"):
        config_from_mapping({"name": VM, "tls_name": "x"})


def test_kemari_pki_create_writes_the_qemu_layout(tmp_path: Path, capsys) -> None:
    target = tmp_path / "creds"
    assert kemari_main(["pki", "create", str(target), "--name", "web"]) == 0
    names = {p.name for p in target.iterdir()}
    assert names == {"ca-key.pem", *TLS_FILES}
    assert (target / "server-key.pem").stat().st_mode & 0o777 == 0o600
    assert "kemari-web" in capsys.readouterr().out
    assert kemari_main(["pki", "create", str(target), "--name", "web"]) == 1  # no overwrite
    config_from_mapping({"name": "web", "tls_creds": str(target)})  # a valid tls_creds


# --- 1. replay: a recorded session, resent by another process ---------------------------


async def _recording_proxy(target: str) -> tuple[asyncio.Server, int, bytearray]:
    """A TCP proxy to ``target`` that records what the primary sends."""
    host, port = target.rsplit(":", 2)[1:]
    recorded = bytearray()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            while data := await src.read(65536):
                if record:
                    recorded.extend(data)
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(
            pump(reader, up_writer, True), pump(up_reader, writer, False), return_exceptions=True
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], recorded


REPLAYER = """
import socket, sys, time
data = open(sys.argv[2], "rb").read()
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.sendall(data)
sock.shutdown(socket.SHUT_WR)
answer = b""
sock.settimeout(5)
try:
    while chunk := sock.recv(65536):
        answer += chunk
except OSError:
    pass
print(len(answer))
"""


def test_replayed_session_cannot_replace_a_newer_replica(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10.1 "replay": the first session is recorded; after a second session of the
    same run moved the replica on, another process resends the recording."""
    recording = tmp_path / "session.bin"

    async def body(receiver: StandbyReceiver) -> tuple[int | None, int | None]:
        run = RunState.new()
        server, port, recorded = await _recording_proxy(str(receiver.listener.bound))
        async with server:
            await _primary(f"kemari:tcp:127.0.0.1:{port}", run, 3)
        await _until(lambda: receiver._session is None)
        await _primary(str(receiver.listener.bound), run, 3)  # the live primary goes on
        await _until(lambda: receiver._session is None)
        assert receiver.applier.committed_epoch == 3
        assert receiver.replica_run is not None and receiver.replica_run.committed == 7
        recording.write_bytes(bytes(recorded))
        replay = await asyncio.to_thread(
            _run_process, REPLAYER, str(receiver.listener.bound.port), str(recording)
        )
        assert replay.returncode == 0, replay.stderr
        await asyncio.sleep(0.3)
        return receiver.applier.committed_epoch, receiver.replica_run.committed

    with caplog.at_level(logging.INFO):
        epochs = asyncio.run(_with_receiver(tmp_path, body))
    assert epochs == (3, 7)  # the replica of the live primary, untouched
    assert "STALE_RUN" in caplog.text
    assert caplog.text.count("replica replaced") == 1  # the live primary's second session


def test_recorded_confirm_does_not_bind_another_session() -> None:
    """A replayed HELLO + CONFIRM against a fresh nonce (the standby's replica is empty, so
    the run check cannot help): the CONFIRM binds the old nonce and is refused."""

    async def scenario() -> str:
        async with _loopback_listener() as listener:
            client, server = await _connected(listener)
            standby = asyncio.create_task(StandbySession.handshake(server, IDENTITY, 5))
            writer, reader = FrameWriter(client), FrameReader(client)
            hello = Hello(Role.PRIMARY, VM, DIGEST, nonce=os.urandom(32), run_id=os.urandom(16))
            await writer.send(hello)
            await reader.receive()  # HELLO_ACK with the standby's fresh nonce, ignored
            await writer.send(Confirm(b"\x00" * 32))  # what a recording would carry
            try:
                await standby
            except TransactionError as exc:
                return str(exc)
            finally:
                await client.close()
                await server.close()
            return "accepted"

    assert "CONFIRM for another session" in asyncio.run(scenario())


def test_new_run_replaces_a_replica_only_over_tls(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def plain(receiver: StandbyReceiver) -> BaseException | None:
        await _primary(str(receiver.listener.bound), RunState.new(), 1)
        await _until(lambda: receiver._session is None)
        try:
            await _primary(str(receiver.listener.bound), RunState.new(), 1)
        except PeerRefused as exc:
            return exc
        return None

    error = asyncio.run(_with_receiver(tmp_path / "plain", plain))
    assert isinstance(error, PeerRefused) and error.reason is RefuseReason.UNAUTHENTICATED

    first, second = RunState.new(), RunState.new()

    async def tls(receiver: StandbyReceiver) -> int | None:
        await _primary(str(receiver.listener.bound), first, 2, tls=creds(pki))
        await _until(lambda: receiver._session is None)
        await _primary(str(receiver.listener.bound), second, 1, tls=creds(pki))
        await _until(lambda: receiver._session is None)
        return receiver.applier.committed_epoch

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(_with_receiver(tmp_path / "tls", tls, tls=creds(pki))) == 1
    line = next(r.getMessage() for r in caplog.records if "replica replaced" in r.getMessage())
    assert f"run {first.run_id.hex()[:12]} epoch 2 -> run {second.run_id.hex()[:12]} epoch 0" in (
        line
    )
    assert "NEW RUN, authenticated by TLS" in line


# --- 2. slot squatting ------------------------------------------------------------------


def test_idle_and_silent_connections_do_not_hold_the_session_slot(tmp_path: Path) -> None:
    """Issue 10.2: an idle connection and a HELLO followed by silence are open while the
    real primary connects: it gets the session at once (it used to get BUSY)."""

    async def body(receiver: StandbyReceiver) -> int | None:
        host, port = "127.0.0.1", receiver.listener.bound.port
        idle = socket.create_connection((host, port))
        silent = socket.create_connection((host, port))
        hello = Hello(Role.PRIMARY, VM, DIGEST, nonce=os.urandom(32), run_id=os.urandom(16))
        silent.sendall(b"".join(encode_frame(hello, 0)))
        await asyncio.sleep(0.3)
        try:
            async with asyncio.timeout(5):
                await _primary(str(receiver.listener.bound), RunState.new(), 1)
            await _until(lambda: receiver._session is None)
            return receiver.applier.committed_epoch
        finally:
            idle.close()
            silent.close()

    assert asyncio.run(_with_receiver(tmp_path, body)) == 1


def test_a_session_that_goes_silent_after_the_handshake_is_dropped(tmp_path: Path) -> None:
    """Issue 10.2: "HELLO then silence" with a complete handshake ends at the idle timeout
    (it used to hold the slot forever); then the real primary gets in."""

    async def body(receiver: StandbyReceiver) -> int | None:
        squatter = await connect(str(receiver.listener.bound), 5)
        await PrimarySession.handshake(squatter, IDENTITY, 5)  # then nothing, no keepalive
        await _until(lambda: receiver._session is not None)
        await _until(lambda: receiver._session is None, timeout=5)
        await _primary(str(receiver.listener.bound), RunState.new(), 1)
        await squatter.close()
        await _until(lambda: receiver._session is None)
        return receiver.applier.committed_epoch

    assert asyncio.run(_with_receiver(tmp_path, body, idle_timeout=1.0)) == 1


def test_keepalive_keeps_an_idle_but_live_session(tmp_path: Path) -> None:
    async def body(receiver: StandbyReceiver) -> int | None:
        transport = await connect(str(receiver.listener.bound), 5)
        session = await PrimarySession.handshake(transport, IDENTITY, 5, run=RunState.new())
        session.start_keepalive(0.2)
        await _sync(session, 1)
        await asyncio.sleep(2.0)  # idle twice the standby's idle timeout
        await _sync_more(session, 2)
        await session.close()
        await _until(lambda: receiver._session is None)
        return receiver.applier.committed_epoch

    assert asyncio.run(_with_receiver(tmp_path, body, idle_timeout=1.0)) == 2


async def _sync_more(session: PrimarySession, epoch: int) -> None:
    await session.send(Begin(epoch))
    await session.send(DeviceState(epoch, b"more"))
    await session.commit(timeout=5)


# --- 3. memory: pending connections, announced frames, RAM_BLOCKS -----------------------


def _header(frame_type: FrameType, length: int, sequence: int = 0) -> bytes:
    head = HEADER.pack(MAGIC, WIRE_VERSION, frame_type, 0, 0, sequence, length, 0, 0)
    return head[:32] + struct.pack(">I", zlib.crc32(head[:32]))


def test_connections_announcing_64mib_frames_cost_no_memory(tmp_path: Path) -> None:
    """Issue 10.3: 11 connections each announce a 64 MiB HELLO (it was 32 MB -> 756 MB)."""

    async def body(receiver: StandbyReceiver) -> tuple[int, int]:
        tracemalloc.start()
        try:
            socks = []
            for _ in range(11):
                sock = socket.create_connection(("127.0.0.1", receiver.listener.bound.port))
                sock.sendall(_header(FrameType.HELLO, 64 << 20) + b"\0" * 1000)
                socks.append(sock)
            await asyncio.sleep(1.0)
            _, peak = tracemalloc.get_traced_memory()
            pending = receiver.listener.pending
            for sock in socks:
                sock.close()
            return peak, pending
        finally:
            tracemalloc.stop()

    peak, pending = asyncio.run(_with_receiver(tmp_path, body))
    assert peak < 16 << 20
    assert pending <= 8


def test_payload_buffers_grow_only_as_bytes_arrive() -> None:
    """Issue 10.3: after the handshake, a 64 MiB frame header alone allocates nothing big."""

    async def scenario() -> int:
        async with _loopback_listener() as listener:
            client, server = await _connected(listener)
            server.established()
            tracemalloc.start()
            try:
                read = asyncio.create_task(server.read_exactly(64 << 20))
                client.write(b"x" * 100_000)
                await asyncio.sleep(0.5)  # a "must not happen" window: no big allocation
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            read.cancel()
            await client.close()
            await server.close()
            return peak

    assert asyncio.run(scenario()) < 4 << 20


def test_ram_blocks_beyond_the_configured_memory_are_refused(tmp_path: Path) -> None:
    """Issue 10.3: two 1 GiB blocks for a 128M VM reserve nothing."""

    async def body(receiver: StandbyReceiver) -> tuple[str, int | None]:
        transport = await connect(str(receiver.listener.bound), 5)
        session = await PrimarySession.handshake(transport, IDENTITY, 5)
        huge = (RamBlock("pc.ram", 1 << 30), RamBlock("extra", 1 << 30, 1 << 30))
        with pytest.raises(TransactionError):
            await _sync(session, 0, blocks=huge)
        await session.close()
        await _until(lambda: receiver._session is None)
        return receiver.last_error, receiver.applier.committed_epoch

    error, epoch = asyncio.run(_with_receiver(tmp_path, body, max_ram_bytes=128 << 20))
    assert "RAM_BLOCKS announce 2147483648 bytes" in error
    assert epoch is None
    used = sum(p.stat().st_blocks * 512 for p in (tmp_path / "replica").rglob("*") if p.is_file())
    assert used < 1 << 20


# --- 5. a standby that stops reading ----------------------------------------------------


def test_a_standby_that_stops_reading_fails_the_send_within_its_deadline() -> None:
    """Issue 10.5: the primary's sends have a deadline (it used to wait forever)."""
    with stuck_standby() as port:

        async def primary() -> tuple[BaseException | None, float]:
            transport = await connect(f"kemari:tcp:127.0.0.1:{port}", 5)
            session = await PrimarySession.handshake(transport, IDENTITY, 5, send_timeout=1.0)
            started = time.monotonic()
            try:
                async with asyncio.timeout(20):  # the old code would hang here
                    await session.send(Begin(0))
                    await session.send(RamBlocks(0, (RamBlock("pc.ram", 1 << 30),)))
                    page = b"\x07" * (1024 * PAGE_SIZE)
                    for start in range(0, 1 << 18, 1024):
                        indices = page_indices(range(start, start + 1024))
                        await session.send(RamPages(0, 0, indices, page_indices([]), page))
            except (TransactionError, TimeoutError) as exc:
                return exc, time.monotonic() - started
            finally:
                await session.close()
            return None, time.monotonic() - started

        error, elapsed = asyncio.run(primary())
    assert isinstance(error, SendTimeout), error
    assert "send deadline" in str(error)
    assert elapsed < 10


# --- 6. operator visibility -------------------------------------------------------------


def test_writes_after_a_reset_raise_once_instead_of_flooding_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 10.6: a reset connection made asyncio log 445 'socket.send() raised exception.'"""

    async def scenario() -> int:
        async with _loopback_listener(pre_handshake_bytes=None) as listener:
            client, server = await _connected(listener)
            server.abort()  # type: ignore[attr-defined]  # RST to the client
            await asyncio.sleep(0.2)
            failures = 0
            for _ in range(500):
                try:
                    client.write(b"x" * 1000)
                    await client.drain()
                except TransportClosed:
                    failures += 1
                await asyncio.sleep(0)
            await client.close()
            return failures

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        failures = asyncio.run(scenario())
    assert failures == 500
    assert "socket.send() raised exception" not in caplog.text


def test_commit_ack_of_another_epoch_names_both() -> None:
    async def scenario() -> str:
        async with _loopback_listener() as listener:
            client, server = await _connected(listener)
            standby_task = asyncio.create_task(StandbySession.handshake(server, IDENTITY, 5))
            primary = await PrimarySession.handshake(client, IDENTITY, 5)
            standby = await standby_task
            await primary.send(Begin(0))
            await primary.send(RamBlocks(0, (BLOCK,)))

            async def wrong_ack() -> None:
                while not isinstance(await standby.receive(), Committed):
                    pass
                await standby._writer.send(CommitAck(5))

            acker = asyncio.create_task(wrong_ack())
            try:
                await primary.commit(timeout=5)
            except TransactionError as exc:
                return str(exc)
            finally:
                await acker
                await client.close()
                await server.close()
            return "acknowledged"

    assert asyncio.run(scenario()) == "expected COMMIT_ACK of epoch 0, got COMMIT_ACK of epoch 5"
