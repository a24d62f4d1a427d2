"""Session layer of the ft-transaction protocol: sequencing, handshake, transaction rules.

:class:`TransactionTracker` is the pure state machine of one session's transactions::

    IDLE --BEGIN(e), e > every earlier epoch--> IN_TRANSACTION(e)
    IN_TRANSACTION(e) --RAM_BLOCKS/RAM_PAGES/DEVICE_STATE/OUTPUT of e--> IN_TRANSACTION(e)
    IN_TRANSACTION(e) --COMMIT(e) whose summary matches--> IDLE, e committed
    IN_TRANSACTION(e) --ABORT(e) / GOODBYE / disconnect--> IDLE, e discarded

The standby applies it to every frame it receives; the primary applies it to every
frame before sending it, so a primary can never emit what the standby would refuse,
and the COMMIT summary comes from the same counters.  :class:`PrimarySession` and
:class:`StandbySession` put the tracker, the hello handshake and the frame
reader/writer over a :class:`~kemari.transaction.transport.Transport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from kemari.errors import TransactionError
from kemari.stream.format import PAGE_SIZE
from kemari.transaction.transport import Transport, TransportClosed
from kemari.transaction.wire import (
    MAX_PAYLOAD,
    NO_PAYLOAD_CRC,
    NONCE_LEN,
    PROTOCOL_VERSION,
    RUN_ID_LEN,
    ZSTD_PAGES,
    Abort,
    Begin,
    Buffer,
    Commit,
    CommitAck,
    Confirm,
    DeviceState,
    Frame,
    FrameDecoder,
    FrameEncoder,
    Goodbye,
    Heartbeat,
    HeartbeatAck,
    Hello,
    HelloAck,
    Outputs,
    Payload,
    RamBlock,
    RamBlocks,
    RamPages,
    Refuse,
    RefuseReason,
    Role,
    TransactionContent,
    VmDescription,
    ZstdRamPages,
)

# Frame parts up to this size are joined into one write so the header does not leave in
# a segment of its own; larger parts (page data) are written as they are, without copy.
_JOIN_LIMIT = 64 << 10
# Before the handshake ends no frame may be larger than this (HELLO, CONFIRM are small).
HANDSHAKE_MAX_PAYLOAD = 4096
# Deadline of every send: the peer must take a frame's bytes within this many seconds.
SEND_TIMEOUT_S = 5.0
# The standby ends a session that sends no frame for this long; the primary sends a
# HEARTBEAT whenever it sent nothing for KEEPALIVE_S (so an idle guest keeps its session).
IDLE_TIMEOUT_S = 20.0
KEEPALIVE_S = 2.0
log = logging.getLogger(__name__)


class PeerRefused(TransactionError):
    """The standby answered HELLO with REFUSE."""

    def __init__(self, reason: RefuseReason, message: str) -> None:
        super().__init__(f"standby refused the primary ({reason.name}): {message}")
        self.reason = reason


class SessionFailed(TransactionError):
    """The session is over on error; ``discarded`` is the transaction it left open, if any."""

    def __init__(self, message: str, discarded: Discarded | None) -> None:
        lost = "" if discarded is None else f"; epoch {discarded.epoch} discarded"
        super().__init__(f"{message}{lost}")
        self.discarded = discarded


class PeerDisconnected(SessionFailed):
    """The peer's connection ended without GOODBYE."""


class TransactionState(enum.Enum):
    """Where the session's transaction stream stands."""

    IDLE = "idle"
    IN_TRANSACTION = "in-transaction"


@dataclass(frozen=True, slots=True)
class Committed:
    """Transaction ``epoch`` is complete and validated; the standby may now apply it."""

    epoch: int
    data_pages: int
    zero_pages: int
    device_state_bytes: int
    outputs: int = 0
    output_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Discarded:
    """Transaction ``epoch`` will never commit; everything staged for it must be dropped."""

    epoch: int
    reason: str


@dataclass(slots=True)
class _OpenTransaction:
    epoch: int
    data_pages: int = 0
    zero_pages: int = 0
    device_state_bytes: int = 0
    outputs: int = 0
    output_bytes: int = 0
    has_vmdesc: bool = False


class TransactionTracker:
    """Pure state machine of one session's transactions (see the module docstring).

    A payload that breaks a rule raises :class:`TransactionError` and leaves the state
    unchanged; the session is then over and the caller discards the open transaction
    with :meth:`discard`.  The first transaction of a session must carry RAM_BLOCKS
    before its first page; later ones must not (the block table is fixed per session).
    """

    def __init__(self) -> None:
        self.blocks: tuple[RamBlock, ...] | None = None
        self.last_committed: int | None = None
        self._last_begun: int | None = None
        self._open: _OpenTransaction | None = None

    @property
    def state(self) -> TransactionState:
        return TransactionState.IDLE if self._open is None else TransactionState.IN_TRANSACTION

    @property
    def open_epoch(self) -> int | None:
        return None if self._open is None else self._open.epoch

    def commit_summary(self) -> Commit:
        """The COMMIT that closes the open transaction with what was sent in it."""
        current = self._require_open("COMMIT", None)
        return Commit(
            current.epoch,
            current.data_pages,
            current.zero_pages,
            current.device_state_bytes,
            current.outputs,
            current.output_bytes,
        )

    def apply(self, payload: Payload) -> Committed | Discarded | None:
        """Check ``payload`` against the rules and advance; say what ended, if anything."""
        match payload:
            case Begin(epoch=epoch):
                if self._open is not None:
                    raise TransactionError(
                        f"BEGIN of epoch {epoch} while epoch {self._open.epoch} is still open"
                    )
                if self._last_begun is not None and epoch <= self._last_begun:
                    raise TransactionError(
                        f"BEGIN of epoch {epoch} does not follow epoch {self._last_begun}"
                    )
                self._last_begun = epoch
                self._open = _OpenTransaction(epoch)
            case RamBlocks(epoch=epoch, blocks=blocks):
                current = self._require_open("RAM_BLOCKS", epoch)
                if self.blocks is not None:
                    raise TransactionError("RAM_BLOCKS sent twice in one session")
                if current.data_pages or current.zero_pages:
                    raise TransactionError("RAM_BLOCKS after pages of the same transaction")
                self.blocks = blocks
            case RamPages(epoch=epoch) | ZstdRamPages(epoch=epoch):
                current = self._require_open(payload.TYPE.name, epoch)
                self._check_pages(payload)
                current.data_pages += len(payload.data_pages)
                current.zero_pages += len(payload.zero_pages)
            case DeviceState(epoch=epoch, data=data):
                self._require_open("DEVICE_STATE", epoch).device_state_bytes += len(data)
            case Outputs(epoch=epoch):
                current = self._require_open("OUTPUT", epoch)
                current.outputs += len(payload.outputs)
                current.output_bytes += payload.data_bytes
            case VmDescription(epoch=epoch):
                current = self._require_open("VM_DESCRIPTION", epoch)
                if self.last_committed is not None or current.has_vmdesc:
                    raise TransactionError("VM_DESCRIPTION outside the first transaction or twice")
                current.has_vmdesc = True
            case Commit(epoch=epoch):
                current = self._require_open("COMMIT", epoch)
                expected = (current.data_pages, current.zero_pages, current.device_state_bytes)
                announced = (payload.data_pages, payload.zero_pages, payload.device_state_bytes)
                if announced != expected:
                    raise TransactionError(
                        f"COMMIT of epoch {epoch} announces (data pages, zero pages, device "
                        f"bytes) {announced} but the transaction carried {expected}"
                    )
                outputs = (current.outputs, current.output_bytes)
                if (payload.outputs, payload.output_bytes) != outputs:
                    raise TransactionError(
                        f"COMMIT of epoch {epoch} announces (outputs, output bytes) "
                        f"{(payload.outputs, payload.output_bytes)} but the transaction "
                        f"carried {outputs}"
                    )
                if self.blocks is None:
                    raise TransactionError(f"COMMIT of epoch {epoch} before any RAM_BLOCKS")
                self._open = None
                self.last_committed = epoch
                return Committed(epoch, *expected, *outputs)
            case Abort(epoch=epoch, reason=reason):
                self._require_open("ABORT", epoch)
                return self.discard(f"primary aborted: {reason}")
            case Goodbye(message=message):
                return self.discard(f"primary said goodbye: {message}")
            # HeartbeatAck subclasses Heartbeat (and HelloAck Hello): acks are matched first.
            case Hello() | Refuse() | CommitAck() | HeartbeatAck():
                raise TransactionError(f"unexpected {payload.TYPE.name} from the primary")
            case Heartbeat():
                return None
        return None

    def discard(self, reason: str) -> Discarded | None:
        """End the open transaction without committing it (None if none was open)."""
        if self._open is None:
            return None
        discarded = Discarded(self._open.epoch, reason)
        self._open = None
        return discarded

    def _require_open(self, what: str, epoch: int | None) -> _OpenTransaction:
        if self._open is None:
            raise TransactionError(f"{what} outside a transaction")
        if epoch is not None and epoch != self._open.epoch:
            raise TransactionError(f"{what} of epoch {epoch} inside transaction {self._open.epoch}")
        return self._open

    def _check_pages(self, pages: RamPages | ZstdRamPages) -> None:
        if self.blocks is None:
            raise TransactionError("RAM_PAGES before RAM_BLOCKS")
        if pages.block_index >= len(self.blocks):
            raise TransactionError(
                f"RAM_PAGES names block {pages.block_index}, the table has {len(self.blocks)}"
            )
        block = self.blocks[pages.block_index]
        limit = block.size // PAGE_SIZE
        highest = max(max(pages.data_pages, default=0), max(pages.zero_pages, default=0))
        if highest >= limit:
            raise TransactionError(
                f"RAM_PAGES page {highest} lies outside block {block.name!r} ({limit} pages)"
            )


class SendTimeout(TransactionError):
    """The peer did not take a frame's bytes within the send deadline."""


class FrameWriter:
    """Sends payloads as frames with consecutive sequence numbers, each within a deadline."""

    def __init__(self, transport: Transport, send_timeout: float = SEND_TIMEOUT_S) -> None:
        self._transport = transport
        self._encoder = FrameEncoder()
        self.send_timeout = send_timeout
        self.last_sent = time.monotonic()

    async def send(self, payload: Payload) -> None:
        """Send one frame; :class:`SendTimeout` if the peer does not take it in time."""
        self.last_sent = time.monotonic()
        parts = self._encoder.encode(payload)
        # Header and small leading parts leave together; large page data is not copied.
        small: list[Buffer] = []
        for part in parts:
            if len(part) <= _JOIN_LIMIT:
                small.append(part)
                continue
            if small:
                self._transport.write(b"".join(small))
                small = []
            self._transport.write(part)
        if small:
            self._transport.write(b"".join(small))
        try:
            async with asyncio.timeout(self.send_timeout):
                await self._transport.drain()
        except TimeoutError as exc:
            raise SendTimeout(
                f"{self._transport.peer} took no {payload.TYPE.name} frame within "
                f"{self.send_timeout:g} s (send deadline; the peer stopped reading?)"
            ) from exc

    def drop_payload_crc(self) -> None:
        """Send frames without payload checksum from now on (NO_PAYLOAD_CRC in force)."""
        self._encoder.payload_crc = False


class FrameReader:
    """Receives validated frames, one at a time.

    A header is read with :meth:`Transport.read_some` so a peer speaking another
    protocol is refused from its first bytes; a payload whose header checked out is
    read whole with :meth:`Transport.read_exactly` (one buffer, decoded without copy).
    """

    def __init__(self, transport: Transport, max_payload: int | None = None) -> None:
        self._transport = transport
        self._decoder = FrameDecoder() if max_payload is None else FrameDecoder(max_payload)

    @property
    def max_payload(self) -> int:
        """The largest payload accepted from now on (smaller during the handshake)."""
        return self._decoder.max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        self._decoder.max_payload = value

    def accept_zstd_pages(self) -> None:
        """Accept RAM_PAGES_ZSTD frames from now on (the session negotiated them)."""
        self._decoder.zstd_pages = True

    def drop_payload_crc(self) -> None:
        """Check no payload checksum from now on (NO_PAYLOAD_CRC in force)."""
        self._decoder.payload_crc = False

    async def receive(self) -> Frame:
        """The next frame; :class:`TransportClosed` if the stream ends."""
        while True:
            wanted = self._decoder.wanted
            if self._decoder.expecting_payload:
                chunk = await self._transport.read_exactly(wanted)
            else:
                chunk = await self._transport.read_some(wanted)
                if not chunk:
                    where = "" if self._decoder.at_frame_boundary else " in the middle of a frame"
                    raise TransportClosed(f"{self._transport.peer} closed the connection{where}")
            # Never more than the rest of the current frame is read, so at most one
            # frame completes per chunk.
            frames = self._decoder.feed(chunk)
            if frames:
                return frames[0]


@dataclass(frozen=True, slots=True)
class Identity:
    """What a host says about itself in HELLO / HELLO_ACK.

    ``capabilities`` are the configured ones; the handshake adds
    :data:`NO_PAYLOAD_CRC` on TLS transports and never offers it on plain TCP.
    """

    vm_name: str
    config_digest: bytes
    capabilities: tuple[str, ...] = ()


@dataclass(slots=True)
class RunState:
    """A run of a VM and how far its replicated history has come.

    ``run_id`` is chosen when the VM first boots and kept across failovers (the
    failed-over agent continues the run of the replica it resumed).  Run epochs count
    the run's checkpoints across sessions: a session starting at run epoch ``b`` maps
    its transaction epoch ``e`` to ``b + e``; ``committed`` is the run epoch of the last
    checkpoint known committed (None before the first).  A standby refuses a session of
    the same run that starts at or below its replica's run epoch (a replay, or a primary
    from the past).
    """

    run_id: bytes
    committed: int | None = None

    @classmethod
    def new(cls) -> RunState:
        """A fresh run (a VM booting for the first time)."""
        return cls(secrets.token_bytes(RUN_ID_LEN))

    @property
    def next_base(self) -> int:
        """The run epoch a new session's epoch 0 gets."""
        return 0 if self.committed is None else self.committed + 1

    def __str__(self) -> str:
        return f"run {self.run_id.hex()[:12]} epoch {self.committed}"


def session_binding(hello: Hello, ack: HelloAck) -> bytes:
    """What CONFIRM carries: both nonces and the run, hashed (so a recorded CONFIRM is
    worthless against any other HELLO_ACK)."""
    digest = hashlib.sha256(b"kemari-session-binding-v2\0")
    for part in (hello.nonce, ack.nonce, hello.run_id, hello.run_epoch.to_bytes(8, "big")):
        digest.update(part)
    digest.update(hello.vm_name.encode())
    digest.update(hello.config_digest)
    return digest.digest()


async def _receive_within(reader: FrameReader, timeout: float, what: str) -> Frame:
    try:
        async with asyncio.timeout(timeout):
            return await reader.receive()
    except TimeoutError as exc:
        raise TransactionError(f"no {what} within {timeout} s") from exc


class PrimarySession:
    """The active host's end: runs transactions and waits for each COMMIT_ACK."""

    def __init__(
        self,
        transport: Transport,
        writer: FrameWriter,
        reader: FrameReader,
        standby: HelloAck,
        *,
        run: RunState | None = None,
        run_base: int = 0,
    ) -> None:
        self.transport = transport
        self.standby = standby
        self.tracker = TransactionTracker()
        self.run = run
        self.run_base = run_base
        self.failed: TransactionError | None = None
        self._writer = writer
        self._reader = reader
        self._keepalive: asyncio.Task[None] | None = None

    @classmethod
    async def handshake(
        cls,
        transport: Transport,
        identity: Identity,
        timeout: float,
        *,
        run: RunState | None = None,
        send_timeout: float = SEND_TIMEOUT_S,
    ) -> PrimarySession:
        """HELLO (with a fresh nonce and the run), HELLO_ACK, then CONFIRM binding both
        nonces; :class:`PeerRefused` on REFUSE."""
        writer = FrameWriter(transport, send_timeout)
        reader = FrameReader(transport, HANDSHAKE_MAX_PAYLOAD)
        run = run if run is not None else RunState.new()
        base = run.next_base
        hello = Hello(
            Role.PRIMARY,
            identity.vm_name,
            identity.config_digest,
            _supported(identity, transport),
            nonce=secrets.token_bytes(NONCE_LEN),
            run_id=run.run_id,
            run_epoch=base,
        )
        await writer.send(hello)
        frame = await _receive_within(reader, timeout, f"HELLO_ACK from {transport.peer}")
        match frame.payload:
            case Refuse(reason=reason, message=message):
                raise PeerRefused(reason, message)
            case HelloAck(role=Role.STANDBY) as ack:
                _check_ack(ack, hello, transport.peer)
                await writer.send(Confirm(session_binding(hello, ack)))
                transport.established()
                reader.max_payload = MAX_PAYLOAD
                _use_capabilities(ack.capabilities, writer, reader)
                return cls(transport, writer, reader, ack, run=run, run_base=base)
        got = frame.payload.TYPE.name
        raise TransactionError(f"expected HELLO_ACK of a standby from {transport.peer}, got {got}")

    @property
    def capabilities(self) -> tuple[str, ...]:
        """Capabilities both sides support (the standby sends the intersection)."""
        return self.standby.capabilities

    def start_keepalive(self, interval: float = KEEPALIVE_S) -> None:
        """Send a HEARTBEAT whenever nothing was sent for ``interval`` seconds (the
        standby ends sessions idle for :data:`IDLE_TIMEOUT_S`).  A heartbeat that cannot
        be sent fails the session: the next send or commit raises."""
        if self._keepalive is None:
            self._keepalive = asyncio.create_task(self._keep_alive(interval), name="keepalive")

    async def _keep_alive(self, interval: float) -> None:
        while self.failed is None:
            await asyncio.sleep(max(0.0, self._writer.last_sent + interval - time.monotonic()))
            if time.monotonic() - self._writer.last_sent >= interval:
                try:
                    await self._writer.send(Heartbeat(time.monotonic_ns()))
                except TransactionError as exc:
                    self.failed = exc

    def _check_alive(self) -> None:
        if self.failed is not None:
            raise TransactionError(f"session to {self.transport.peer} failed: {self.failed}")

    async def send(self, payload: TransactionContent) -> None:
        """Send one transaction frame after checking it against the transaction rules."""
        self._check_alive()
        if isinstance(payload, ZstdRamPages) and ZSTD_PAGES not in self.capabilities:
            raise TransactionError(f"RAM_PAGES_ZSTD without the {ZSTD_PAGES!r} capability")
        self.tracker.apply(payload)
        await self._writer.send(payload)

    async def commit(self, timeout: float) -> Committed:
        """Send COMMIT for the open transaction and wait for the standby's COMMIT_ACK."""
        committed = await self.send_commit()
        await self.receive_commit_ack(committed.epoch, timeout)
        return committed

    async def send_commit(self) -> Committed:
        """Send COMMIT for the open transaction; its COMMIT_ACK is awaited separately
        (:meth:`receive_commit_ack`), so the next transaction may start meanwhile."""
        self._check_alive()
        summary = self.tracker.commit_summary()
        committed = self.tracker.apply(summary)
        assert isinstance(committed, Committed)  # a summary of the tracker always commits
        await self._writer.send(summary)
        return committed

    async def receive_commit_ack(self, epoch: int, timeout: float) -> None:
        """Wait for the COMMIT_ACK of ``epoch``, the oldest unacknowledged COMMIT.

        The standby acknowledges in commit order, so any other COMMIT_ACK is an error;
        keepalive answers are skipped.  One task at a time reads acknowledgements (and
        not concurrently with :meth:`heartbeat`).  Only after this returns may outputs of
        ``epoch`` leave (docs/protocol.md).
        """
        self._check_alive()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            frame = await _receive_within(
                self._reader, max(remaining, 0.0), f"COMMIT_ACK of epoch {epoch}"
            )
            match frame.payload:
                case CommitAck(epoch=acknowledged) if acknowledged == epoch:
                    if self.run is not None:
                        self.run.committed = self.run_base + epoch
                    return
                case CommitAck(epoch=other):
                    raise TransactionError(
                        f"expected COMMIT_ACK of epoch {epoch}, got COMMIT_ACK of epoch {other}"
                    )
                case HeartbeatAck():
                    continue  # the answer to a keepalive
                case Goodbye(message=message):
                    raise TransactionError(f"standby said goodbye before acknowledging: {message}")
                case _:
                    got = frame.payload.TYPE.name
                    raise TransactionError(f"expected COMMIT_ACK of epoch {epoch}, got {got}")

    async def heartbeat(self, timeout: float) -> float:
        """Round-trip time of one HEARTBEAT in seconds (not concurrently with commit)."""
        sent = time.monotonic_ns()
        await self._writer.send(Heartbeat(sent))
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(deadline - time.monotonic(), 0.0)
            frame = await _receive_within(self._reader, remaining, "HEARTBEAT_ACK")
            match frame.payload:
                case HeartbeatAck(timestamp_ns=stamp) if stamp == sent:
                    return (time.monotonic_ns() - sent) / 1e9
                case HeartbeatAck():
                    continue  # a keepalive's answer
            got = frame.payload.TYPE.name
            raise TransactionError(f"expected HEARTBEAT_ACK of {sent}, got {got}")

    async def close(self, message: str = "") -> None:
        """Say GOODBYE (best effort) and close the transport."""
        keepalive, self._keepalive = self._keepalive, None
        if keepalive is not None:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive
        try:
            if self.failed is None:
                await self._writer.send(Goodbye(message))
        except TransactionError:
            pass
        finally:
            await self.transport.close()


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """The primary said GOODBYE; ``discarded`` is the transaction it left open, if any."""

    message: str
    discarded: Discarded | None


StandbyEvent = (
    Begin
    | RamBlocks
    | RamPages
    | DeviceState
    | VmDescription
    | Outputs
    | Committed
    | Discarded
    | SessionEnded
)


class StandbySession:
    """The standby's end: hands out validated transaction steps, acknowledges commits."""

    def __init__(
        self,
        transport: Transport,
        writer: FrameWriter,
        reader: FrameReader,
        primary: Hello,
        capabilities: tuple[str, ...],
        *,
        idle_timeout: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.transport = transport
        self.primary = primary
        self.capabilities = capabilities
        self.tracker = TransactionTracker()
        self.idle_timeout = idle_timeout
        self._writer = writer
        self._reader = reader

    @property
    def run_id(self) -> bytes:
        """The run the primary's guest belongs to."""
        return self.primary.run_id

    def run_epoch(self, epoch: int) -> int:
        """The run epoch of this session's transaction ``epoch``."""
        return self.primary.run_epoch + epoch

    @classmethod
    async def handshake(
        cls,
        transport: Transport,
        identity: Identity,
        timeout: float,
        *,
        replica: RunState | None = None,
        idle_timeout: float = IDLE_TIMEOUT_S,
        send_timeout: float = SEND_TIMEOUT_S,
        busy: Callable[[], str | None] | None = None,
    ) -> StandbySession:
        """Wait for HELLO and accept it (then CONFIRM), or REFUSE it and raise
        :class:`TransactionError`.  ``replica`` is the run of the committed replica, if
        any: a session may not replace it with an older epoch of the same run, and a new
        run may replace it only over authenticated TLS.  ``busy`` says why the standby
        cannot take a session now (REFUSE BUSY), or None."""
        writer = FrameWriter(transport, send_timeout)
        reader = FrameReader(transport, HANDSHAKE_MAX_PAYLOAD)
        deadline = time.monotonic() + timeout
        frame = await _receive_within(reader, timeout, f"HELLO from {transport.peer}")
        hello = frame.payload
        if type(hello) is not Hello:
            raise TransactionError(f"expected HELLO from {transport.peer}, got {hello.TYPE.name}")
        refusal = _refusal(hello, identity) or _run_refusal(hello, replica, transport.tls)
        busy_message = None if busy is None or refusal is not None else busy()
        if busy_message is not None:
            refusal = Refuse(RefuseReason.BUSY, busy_message)
        if refusal is not None:
            with contextlib.suppress(TransactionError):
                await writer.send(refusal)
            await transport.close()
            raise TransactionError(
                f"refused primary {transport.peer} ({refusal.reason.name}): {refusal.message}"
            )
        supported = _supported(identity, transport)
        shared = tuple(c for c in supported if c in hello.capabilities)
        if NO_PAYLOAD_CRC in hello.capabilities and NO_PAYLOAD_CRC not in supported:
            log.warning(
                "primary %s offered %r over plain TCP: ignored, payload checksums stay on",
                transport.peer,
                NO_PAYLOAD_CRC,
            )
        ack = HelloAck(
            Role.STANDBY,
            identity.vm_name,
            identity.config_digest,
            shared,
            nonce=secrets.token_bytes(NONCE_LEN),
            run_id=bytes(RUN_ID_LEN) if replica is None else replica.run_id,
            run_epoch=0 if replica is None or replica.committed is None else replica.committed,
        )
        await writer.send(ack)
        remaining = max(deadline - time.monotonic(), 0.0)
        frame = await _receive_within(reader, remaining, f"CONFIRM from {transport.peer}")
        match frame.payload:
            case Confirm(binding=binding) if secrets.compare_digest(
                binding, session_binding(hello, ack)
            ):
                pass
            case Confirm():
                raise TransactionError(
                    f"primary {transport.peer} sent a CONFIRM for another session "
                    "(a replayed recording?)"
                )
            case other:
                raise TransactionError(
                    f"expected CONFIRM from {transport.peer}, got {other.TYPE.name}"
                )
        transport.established()
        reader.max_payload = MAX_PAYLOAD
        if ZSTD_PAGES in shared:
            reader.accept_zstd_pages()
        _use_capabilities(shared, writer, reader)
        return cls(transport, writer, reader, hello, shared, idle_timeout=idle_timeout)

    async def receive(self) -> StandbyEvent:
        """The next validated transaction step.

        Heartbeats are answered here.  When the primary vanishes (or sends nothing for
        ``idle_timeout`` seconds) this raises :class:`PeerDisconnected`, on any protocol
        violation :class:`SessionFailed`; both carry the open transaction, now
        discarded, that the caller must drop.
        """
        while True:
            try:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        frame = await self._reader.receive()
                except TimeoutError as exc:
                    raise TransportClosed(
                        f"{self.transport.peer} sent nothing for {self.idle_timeout:g} s "
                        "(idle timeout)"
                    ) from exc
                payload = frame.payload
                ended = self.tracker.apply(payload)
            except TransportClosed as exc:
                discarded = self.tracker.discard(f"primary disconnected: {exc}")
                raise PeerDisconnected(str(exc), discarded) from exc
            except TransactionError as exc:
                discarded = self.tracker.discard(f"protocol violation: {exc}")
                raise SessionFailed(str(exc), discarded) from exc
            match payload:
                case Heartbeat(timestamp_ns=stamp):
                    await self._writer.send(HeartbeatAck(stamp))
                case Goodbye(message=message):
                    assert not isinstance(ended, Committed)
                    return SessionEnded(message, ended)
                case Commit() | Abort():
                    assert ended is not None
                    return ended
                case (
                    Begin() | RamBlocks() | RamPages() | DeviceState() | VmDescription() | Outputs()
                ):
                    return payload

    async def acknowledge(self, committed: Committed) -> None:
        """Tell the primary ``committed`` is the replica now (after applying it durably)."""
        if self.tracker.last_committed != committed.epoch:
            raise TransactionError(f"epoch {committed.epoch} is not the last committed one")
        await self._writer.send(CommitAck(committed.epoch))

    async def close(self, message: str = "", *, linger: float = 0.0) -> None:
        """Say GOODBYE (best effort) and close the transport.

        With ``linger``, first read and drop what the primary still sends, for up to that
        many seconds or until it closes: a primary busy sending a transaction then reads
        the GOODBYE, and its reason, at its next wait (COMMIT_ACK) instead of meeting a
        reset connection.
        """
        try:
            await self._writer.send(Goodbye(message))
            if linger > 0:
                with contextlib.suppress(TransactionError, TimeoutError, OSError):
                    async with asyncio.timeout(linger):
                        while True:
                            await self._reader.receive()
        except TransactionError:
            pass
        finally:
            await self.transport.close()


def _supported(identity: Identity, transport: Transport) -> tuple[str, ...]:
    """The capabilities this end offers on ``transport``: the configured ones, plus
    NO_PAYLOAD_CRC exactly when TLS 1.3's AEAD protects every byte."""
    configured = tuple(c for c in identity.capabilities if c != NO_PAYLOAD_CRC)
    return (*configured, NO_PAYLOAD_CRC) if transport.tls else configured


def _use_capabilities(shared: tuple[str, ...], writer: FrameWriter, reader: FrameReader) -> None:
    """Put the negotiated frame-level capabilities in force, from the first frame after
    CONFIRM in both directions."""
    if NO_PAYLOAD_CRC in shared:
        writer.drop_payload_crc()
        reader.drop_payload_crc()


def _check_ack(ack: HelloAck, hello: Hello, peer: str) -> None:
    """The standby checked our HELLO; check that it also describes the same VM."""
    if ack.protocol_version != PROTOCOL_VERSION:
        raise TransactionError(
            f"standby {peer} speaks protocol {ack.protocol_version}, primary {PROTOCOL_VERSION}"
        )
    if ack.vm_name != hello.vm_name or ack.config_digest != hello.config_digest:
        raise TransactionError(
            f"standby {peer} accepted but protects VM {ack.vm_name!r} with another config"
        )
    unoffered = sorted(set(ack.capabilities) - set(hello.capabilities))
    if unoffered:
        raise TransactionError(
            f"standby {peer} claims capabilities the primary never offered on this "
            f"transport: {', '.join(unoffered)}"
        )


async def refuse_busy(transport: Transport, message: str, timeout: float) -> None:
    """Answer another primary's HELLO with REFUSE(BUSY) and close its transport.

    For a standby that already serves a session: the newcomer learns why at once
    instead of waiting for a handshake timeout.
    """
    try:
        reader = FrameReader(transport, HANDSHAKE_MAX_PAYLOAD)
        await _receive_within(reader, timeout, f"HELLO from {transport.peer}")
        await FrameWriter(transport).send(Refuse(RefuseReason.BUSY, message))
    finally:
        await transport.close()


def _refusal(hello: Hello, identity: Identity) -> Refuse | None:
    if hello.protocol_version != PROTOCOL_VERSION:
        return Refuse(
            RefuseReason.PROTOCOL_VERSION,
            f"primary speaks protocol {hello.protocol_version}, standby {PROTOCOL_VERSION}",
        )
    if hello.role is not Role.PRIMARY:
        return Refuse(RefuseReason.ROLE, f"peer introduced itself as {hello.role.name}")
    if hello.vm_name != identity.vm_name:
        return Refuse(
            RefuseReason.VM_NAME,
            f"standby protects VM {identity.vm_name!r}, primary runs {hello.vm_name!r}",
        )
    if hello.config_digest != identity.config_digest:
        return Refuse(
            RefuseReason.CONFIG_DIGEST,
            f"VM config of {hello.vm_name!r} differs (primary {hello.config_digest.hex()[:16]}…, "
            f"standby {identity.config_digest.hex()[:16]}…)",
        )
    return None


def _run_refusal(hello: Hello, replica: RunState | None, authenticated: bool) -> Refuse | None:
    """May a session of ``hello``'s run replace the committed replica of ``replica``?"""
    if replica is None or replica.committed is None:
        return None
    if hello.run_id == replica.run_id:
        if hello.run_epoch <= replica.committed:
            return Refuse(
                RefuseReason.STALE_RUN,
                f"session of run {hello.run_id.hex()[:12]} starts at run epoch "
                f"{hello.run_epoch}, the replica already holds epoch {replica.committed} "
                "of that run (a replayed or outdated primary)",
            )
        return None
    if not authenticated:
        return Refuse(
            RefuseReason.UNAUTHENTICATED,
            f"the replica holds run {replica.run_id.hex()[:12]} epoch {replica.committed}; "
            f"a new run ({hello.run_id.hex()[:12]}) may replace it only over authenticated "
            "TLS (tls_creds) — or restart the standby to drop the replica",
        )
    return None
