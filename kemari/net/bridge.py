"""NetBridge: carries a guest NIC between QEMU's ``-netdev stream`` socket and a host tap.

Kemari listens on a unix socket; QEMU connects to it as a client
(``-netdev stream,id=n0,server=off,addr.type=unix,addr.path=PATH``).  Frames
read from QEMU go out of the tap into the host (guest output); frames read from
the tap go to QEMU (guest input).  At most one QEMU is attached at a time; when
it disconnects the listener stays, so the QEMU that takes over after a failover
connects to the same path.

Guest output leaves Kemari through exactly one method,
:meth:`NetBridge._release_to_host`, which asks the bridge's :class:`ReleasePolicy`
(the network event-tap, ``kemari.eventtap.net``) whether to hold the frame; a held
frame is sent later with :meth:`NetBridge.write_to_host`, once its checkpoint
commits.  The bridge knows nothing of checkpoints.  Guest input is never held.
When the policy's memory is full it pauses reading QEMU's stream socket
(:meth:`NetBridge.pause_guest_reading`): QEMU then queues the guest's frames
itself and the guest's virtio queue fills, as on a congested link.

Back-pressure: when QEMU reads slower than the host sends, the socket's write
buffer fills, and the bridge stops reading the tap until it drains; the tap's
kernel queue then drops like a real NIC ring (counted by the kernel, visible in
``ip -s link``).  Nothing is dropped silently inside Kemari: every frame not
delivered is counted in :class:`BridgeCounters`, and every refused connection
or malformed stream is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import fcntl
import logging
import struct
import termios
from pathlib import Path
from typing import Protocol

from kemari.errors import NetError
from kemari.net.stream import QEMU_MAX_FRAME, FrameDecoder, FramingError, encode_frame
from kemari.net.tap import Tap
from kemari.sockets import claim_socket_path

log = logging.getLogger(__name__)

# Frames moved per tap-readable callback, so a flooding host cannot starve the guest side.
_TAP_READ_BUDGET = 64


@dataclasses.dataclass
class FlowCounters:
    """Frames and Ethernet octets (stream length headers excluded) of one flow."""

    frames: int = 0
    octets: int = 0

    def add(self, frame: bytes) -> None:
        """Count one frame."""
        self.frames += 1
        self.octets += len(frame)


@dataclasses.dataclass
class BridgeCounters:
    """Everything the bridge moved, refused or could not deliver."""

    guest_to_host: FlowCounters = dataclasses.field(default_factory=FlowCounters)
    host_to_guest: FlowCounters = dataclasses.field(default_factory=FlowCounters)
    # Host frames that arrived while no QEMU was attached (the cable is unplugged).
    host_to_guest_unplugged: FlowCounters = dataclasses.field(default_factory=FlowCounters)
    # Host frames longer than the stream's maximum (QEMU would drop the connection).
    host_to_guest_oversized: FlowCounters = dataclasses.field(default_factory=FlowCounters)
    # Guest frames the tap refused (e.g. longer than the kernel accepts).
    guest_to_host_failed: FlowCounters = dataclasses.field(default_factory=FlowCounters)
    connections: int = 0
    refused_connections: int = 0
    # Times reading from QEMU was paused because held guest output filled its bound.
    guest_reading_pauses: int = 0
    framing_errors: int = 0

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready copy."""
        return dataclasses.asdict(self)


class ReleasePolicy(Protocol):
    """Decides whether a guest frame leaves now (the network event-tap implements it)."""

    def hold(self, frame: bytes) -> bool:
        """True: the policy keeps ``frame`` and sends it later with
        :meth:`NetBridge.write_to_host`; False: the bridge sends it now."""


class BridgeState(enum.Enum):
    """Life cycle of a :class:`NetBridge`."""

    CREATED = "created"
    RUNNING = "running"
    FAILED = "failed"
    CLOSED = "closed"


class _GuestConnection(asyncio.Protocol):
    """One QEMU stream connection: decodes its frames and hands them to the bridge."""

    def __init__(self, bridge: NetBridge) -> None:
        self._bridge = bridge
        self._decoder = FrameDecoder(bridge.max_frame)
        self.transport: asyncio.Transport | None = None
        self.received = 0  # stream bytes read so far

    def unread(self) -> int:
        """Stream bytes QEMU wrote that Kemari has not read yet (the socket's FIONREAD)."""
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        pending = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        count: int = struct.unpack("i", pending)[0]
        return count

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._bridge._attach(self)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        try:
            frames = self._decoder.feed(data)
        except FramingError as exc:
            for frame in exc.complete_frames:
                self._bridge._release_to_host(frame)
            self._bridge._framing_failed(self, exc)
            return
        for frame in frames:
            self._bridge._release_to_host(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._bridge._detach(self, exc)

    def pause_writing(self) -> None:
        self._bridge._set_tap_reading(enabled=False)

    def resume_writing(self) -> None:
        self._bridge._set_tap_reading(enabled=True)


class NetBridge:
    """Moves frames between one QEMU ``-netdev stream`` client and a host tap."""

    def __init__(
        self,
        stream_socket: Path,
        tap_name: str,
        bridge: str | None = None,
        max_frame: int = QEMU_MAX_FRAME,
    ) -> None:
        self.stream_socket = stream_socket
        self.max_frame = max_frame
        self.counters = BridgeCounters()
        self.state = BridgeState.CREATED
        self.failure: NetError | None = None
        self._tap = Tap(tap_name, bridge)
        self._server: asyncio.base_events.Server | None = None
        self._peer: _GuestConnection | None = None
        self._tap_reading = False
        self._guest_reading_paused = False
        self._stopped = asyncio.Event()
        self.release_policy: ReleasePolicy | None = None

    @property
    def tap_name(self) -> str:
        """Name of the host tap interface."""
        return self._tap.name

    @property
    def guest_reading_paused(self) -> bool:
        """True while reading guest frames is paused (held output at its bound)."""
        return self._guest_reading_paused

    @property
    def guest_attached(self) -> bool:
        """True while a QEMU is connected."""
        return self._peer is not None

    async def start(self) -> None:
        """Create the tap, then listen for QEMU (so a connected QEMU always has a tap)."""
        if self.state is not BridgeState.CREATED:
            raise NetError(f"bridge cannot start in state {self.state.value}")
        claim_socket_path(self.stream_socket)
        self._tap.open()
        try:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_unix_server(
                lambda: _GuestConnection(self), path=str(self.stream_socket)
            )
        except OSError as exc:
            self._tap.close()
            raise NetError(f"cannot listen on {self.stream_socket}: {exc.strerror}") from exc
        except BaseException:
            self._tap.close()
            raise
        self.state = BridgeState.RUNNING
        self._set_tap_reading(enabled=True)
        log.info("bridge %s <-> tap %s listening", self.stream_socket, self.tap_name)

    async def wait_stopped(self) -> None:
        """Return once the bridge failed (see :attr:`failure`) or was closed."""
        await self._stopped.wait()

    async def close(self) -> None:
        """Stop listening, drop the QEMU connection, remove the tap and the socket file."""
        if self.state is BridgeState.CLOSED:
            return
        # Ordering: leave RUNNING first, so the peer's connection_lost below
        # cannot re-arm the tap reader of a tap about to close.
        self.state = BridgeState.CLOSED
        self._set_tap_reading(enabled=False)
        listened = self._server is not None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._peer is not None and self._peer.transport is not None:
            self._peer.transport.abort()
            # connection_lost runs on the next loop iteration; let it detach the peer.
            await asyncio.sleep(0)
        self._tap.close()
        if listened:
            with contextlib.suppress(FileNotFoundError):
                self.stream_socket.unlink()
        self._stopped.set()

    # -- guest side ---------------------------------------------------------

    def _attach(self, connection: _GuestConnection) -> None:
        assert connection.transport is not None
        if self._peer is not None:
            # Two NICs on one guest identity would interleave two guests' frames:
            # the attached QEMU keeps the link until it disconnects.
            self.counters.refused_connections += 1
            log.warning("refusing a second QEMU connection on %s", self.stream_socket)
            connection.transport.close()
            return
        self._peer = connection
        self.counters.connections += 1
        if self._guest_reading_paused:
            connection.transport.pause_reading()
        log.info(
            "guest connected on %s (connection %d)", self.stream_socket, self.counters.connections
        )

    def _detach(self, connection: _GuestConnection, exc: Exception | None) -> None:
        if self._peer is not connection:
            return
        self._peer = None
        reason = f": {exc}" if exc is not None else ""
        log.info("guest disconnected from %s%s", self.stream_socket, reason)
        # A paused tap reader belongs to the old connection's back-pressure.
        self._set_tap_reading(enabled=self.state is BridgeState.RUNNING)

    def _framing_failed(self, connection: _GuestConnection, exc: FramingError) -> None:
        self.counters.framing_errors += 1
        log.error("dropping QEMU connection on %s: malformed stream: %s", self.stream_socket, exc)
        if connection.transport is not None:
            connection.transport.abort()

    def _release_to_host(self, frame: bytes) -> None:
        """Send one guest frame out of the tap, unless the release policy holds it.

        Every frame the guest sends passes here, in the order Kemari read it
        from QEMU.  This is the seat of the network event-tap.
        """
        policy = self.release_policy
        if policy is not None and policy.hold(frame):
            return
        self.write_to_host(frame)

    def write_to_host(self, frame: bytes) -> None:
        """Write one guest frame to the tap now (failures are counted, never raised)."""
        if self.state is not BridgeState.RUNNING:
            self.counters.guest_to_host_failed.add(frame)
            return
        try:
            self._tap.write_frame(frame)
        except NetError as exc:
            self.counters.guest_to_host_failed.add(frame)
            log.warning("%s", exc)
            return
        self.counters.guest_to_host.add(frame)

    def pause_guest_reading(self) -> None:
        """Stop reading guest frames from QEMU (held output is at its bound)."""
        if self._guest_reading_paused:
            return
        self._guest_reading_paused = True
        self.counters.guest_reading_pauses += 1
        peer = self._peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.pause_reading()

    def resume_guest_reading(self) -> None:
        """Read guest frames from QEMU again."""
        if not self._guest_reading_paused:
            return
        self._guest_reading_paused = False
        peer = self._peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.resume_reading()

    async def drain_guest_stream(self) -> None:
        """Read what QEMU already wrote to the stream socket, paused or not.

        The checkpoint's ``vm_stop`` makes QEMU flush the frames it queued for the stream
        (``net_vm_change_state_handler``), and *purge* what the socket cannot take: the
        guest believes those frames were sent, no one has them.  So before Kemari lets
        QEMU stop the VM, reading must have resumed and emptied the socket; returns once
        the bytes unread at the call have been read (the guest may write more meanwhile:
        reading goes on, so the socket keeps room for the flush).
        """
        peer = self._peer
        if self._guest_reading_paused or peer is None or peer.transport is None:
            return
        target = peer.received + peer.unread()
        while self._peer is peer and not peer.transport.is_closing() and peer.received < target:
            await asyncio.sleep(0)

    # -- host side ----------------------------------------------------------

    def _set_tap_reading(self, *, enabled: bool) -> None:
        if enabled == self._tap_reading:
            return
        loop = asyncio.get_running_loop()
        if enabled:
            loop.add_reader(self._tap.fileno(), self._on_tap_readable)
        else:
            loop.remove_reader(self._tap.fileno())
        self._tap_reading = enabled

    def _on_tap_readable(self) -> None:
        for _ in range(_TAP_READ_BUDGET):
            try:
                frame = self._tap.read_frame()
            except OSError as exc:
                self._fail(NetError(f"reading tap {self.tap_name}: {exc}"))
                return
            if frame is None:
                return
            self._deliver_to_guest(frame)
            if not self._tap_reading:
                return  # the guest socket asked for back-pressure

    def _deliver_to_guest(self, frame: bytes) -> None:
        peer = self._peer
        if peer is None or peer.transport is None or peer.transport.is_closing():
            self.counters.host_to_guest_unplugged.add(frame)
            return
        try:
            wire = encode_frame(frame, self.max_frame)
        except FramingError as exc:
            self.counters.host_to_guest_oversized.add(frame)
            log.warning("not passing a host frame to the guest: %s", exc)
            return
        peer.transport.write(wire)
        self.counters.host_to_guest.add(frame)

    def _fail(self, error: NetError) -> None:
        log.error("bridge %s failed: %s", self.stream_socket, error)
        self._set_tap_reading(enabled=False)
        self.failure = error
        self.state = BridgeState.FAILED
        self._stopped.set()
