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
import enum
import time
from dataclasses import dataclass

from kemari.errors import TransactionError
from kemari.stream.format import PAGE_SIZE
from kemari.transaction.transport import Transport, TransportClosed
from kemari.transaction.wire import (
    PROTOCOL_VERSION,
    Abort,
    Begin,
    Buffer,
    Commit,
    CommitAck,
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
    VmDescription,
)

# Frame parts up to this size are joined into one write so the header does not leave in
# a segment of its own; larger parts (page data) are written as they are, without copy.
_JOIN_LIMIT = 64 << 10


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
            case RamPages(epoch=epoch):
                current = self._require_open("RAM_PAGES", epoch)
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

    def _check_pages(self, pages: RamPages) -> None:
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


class FrameWriter:
    """Sends payloads as frames with consecutive sequence numbers."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._encoder = FrameEncoder()

    async def send(self, payload: Payload) -> None:
        """Send one frame; waits while the peer does not keep up (callers bound the time)."""
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
        await self._transport.drain()


class FrameReader:
    """Receives validated frames, one at a time.

    A header is read with :meth:`Transport.read_some` so a peer speaking another
    protocol is refused from its first bytes; a payload whose header checked out is
    read whole with :meth:`Transport.read_exactly` (one buffer, decoded without copy).
    """

    def __init__(self, transport: Transport, max_payload: int | None = None) -> None:
        self._transport = transport
        self._decoder = FrameDecoder() if max_payload is None else FrameDecoder(max_payload)

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
    """What a host says about itself in HELLO / HELLO_ACK."""

    vm_name: str
    config_digest: bytes
    capabilities: tuple[str, ...] = ()


async def _receive_within(reader: FrameReader, timeout: float, what: str) -> Frame:
    try:
        async with asyncio.timeout(timeout):
            return await reader.receive()
    except TimeoutError as exc:
        raise TransactionError(f"no {what} within {timeout} s") from exc


class PrimarySession:
    """The active host's end: runs transactions and waits for each COMMIT_ACK."""

    def __init__(
        self, transport: Transport, writer: FrameWriter, reader: FrameReader, standby: HelloAck
    ) -> None:
        self.transport = transport
        self.standby = standby
        self.tracker = TransactionTracker()
        self._writer = writer
        self._reader = reader

    @classmethod
    async def handshake(
        cls, transport: Transport, identity: Identity, timeout: float
    ) -> PrimarySession:
        """Send HELLO and wait for HELLO_ACK; :class:`PeerRefused` on REFUSE."""
        writer = FrameWriter(transport)
        reader = FrameReader(transport)
        hello = Hello(Role.PRIMARY, identity.vm_name, identity.config_digest, identity.capabilities)
        await writer.send(hello)
        frame = await _receive_within(reader, timeout, f"HELLO_ACK from {transport.peer}")
        match frame.payload:
            case Refuse(reason=reason, message=message):
                raise PeerRefused(reason, message)
            case HelloAck(role=Role.STANDBY) as ack:
                _check_ack(ack, identity, transport.peer)
                return cls(transport, writer, reader, ack)
        got = frame.payload.TYPE.name
        raise TransactionError(f"expected HELLO_ACK of a standby from {transport.peer}, got {got}")

    @property
    def capabilities(self) -> tuple[str, ...]:
        """Capabilities both sides support (the standby sends the intersection)."""
        return self.standby.capabilities

    async def send(
        self, payload: Begin | RamBlocks | RamPages | DeviceState | VmDescription | Outputs | Abort
    ) -> None:
        """Send one transaction frame after checking it against the transaction rules."""
        self.tracker.apply(payload)
        await self._writer.send(payload)

    async def commit(self, timeout: float) -> Committed:
        """Send COMMIT for the open transaction and wait for the standby's COMMIT_ACK.

        Only after this returns may the guest run past the checkpoint (docs/protocol.md).
        """
        summary = self.tracker.commit_summary()
        committed = self.tracker.apply(summary)
        assert isinstance(committed, Committed)  # a summary of the tracker always commits
        await self._writer.send(summary)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            frame = await _receive_within(
                self._reader, max(remaining, 0.0), f"COMMIT_ACK of epoch {summary.epoch}"
            )
            match frame.payload:
                case CommitAck(epoch=summary.epoch):
                    return committed
                case Goodbye(message=message):
                    raise TransactionError(f"standby said goodbye before acknowledging: {message}")
                case _:
                    got = frame.payload.TYPE.name
                    raise TransactionError(
                        f"expected COMMIT_ACK of epoch {summary.epoch}, got {got}"
                    )

    async def heartbeat(self, timeout: float) -> float:
        """Round-trip time of one HEARTBEAT in seconds (not concurrently with commit)."""
        sent = time.monotonic_ns()
        await self._writer.send(Heartbeat(sent))
        frame = await _receive_within(self._reader, timeout, "HEARTBEAT_ACK")
        match frame.payload:
            case HeartbeatAck(timestamp_ns=stamp) if stamp == sent:
                return (time.monotonic_ns() - sent) / 1e9
        raise TransactionError(f"expected HEARTBEAT_ACK of {sent}, got {frame.payload.TYPE.name}")

    async def close(self, message: str = "") -> None:
        """Say GOODBYE (best effort) and close the transport."""
        try:
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
    ) -> None:
        self.transport = transport
        self.primary = primary
        self.capabilities = capabilities
        self.tracker = TransactionTracker()
        self._writer = writer
        self._reader = reader

    @classmethod
    async def handshake(
        cls, transport: Transport, identity: Identity, timeout: float
    ) -> StandbySession:
        """Wait for HELLO and accept it, or REFUSE it and raise :class:`TransactionError`."""
        writer = FrameWriter(transport)
        reader = FrameReader(transport)
        frame = await _receive_within(reader, timeout, f"HELLO from {transport.peer}")
        hello = frame.payload
        if type(hello) is not Hello:
            raise TransactionError(f"expected HELLO from {transport.peer}, got {hello.TYPE.name}")
        refusal = _refusal(hello, identity)
        if refusal is not None:
            await writer.send(refusal)
            await transport.close()
            raise TransactionError(
                f"refused primary {transport.peer} ({refusal.reason.name}): {refusal.message}"
            )
        shared = tuple(c for c in identity.capabilities if c in hello.capabilities)
        await writer.send(HelloAck(Role.STANDBY, identity.vm_name, identity.config_digest, shared))
        return cls(transport, writer, reader, hello, shared)

    async def receive(self) -> StandbyEvent:
        """The next validated transaction step.

        Heartbeats are answered here.  When the primary vanishes this raises
        :class:`PeerDisconnected`, on any protocol violation :class:`SessionFailed`; both
        carry the open transaction, now discarded, that the caller must drop.
        """
        while True:
            try:
                frame = await self._reader.receive()
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

    async def close(self, message: str = "") -> None:
        """Say GOODBYE (best effort) and close the transport."""
        try:
            await self._writer.send(Goodbye(message))
        except TransactionError:
            pass
        finally:
            await self.transport.close()


def _check_ack(ack: HelloAck, identity: Identity, peer: str) -> None:
    """The standby checked our HELLO; check that it also describes the same VM."""
    if ack.vm_name != identity.vm_name or ack.config_digest != identity.config_digest:
        raise TransactionError(
            f"standby {peer} accepted but protects VM {ack.vm_name!r} with another config"
        )
    if not set(ack.capabilities) <= set(identity.capabilities):
        raise TransactionError(f"standby {peer} claims capabilities the primary never offered")


async def refuse_busy(transport: Transport, message: str, timeout: float) -> None:
    """Answer another primary's HELLO with REFUSE(BUSY) and close its transport.

    For a standby that already serves a session: the newcomer learns why at once
    instead of waiting for a handshake timeout.
    """
    try:
        await _receive_within(FrameReader(transport), timeout, f"HELLO from {transport.peer}")
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
