"""NetBridge: carries a guest NIC between QEMU's ``-netdev stream`` socket and a host tap.

QEMU is always the stream client.  Two ways to give it the socket:

* **Inherited (the agent).** :meth:`NetBridge.plug_guest` makes a connected
  ``AF_UNIX`` socketpair per QEMU launch, attaches Kemari's end as the guest
  connection and returns QEMU's end, which QEMU inherits
  (``-netdev stream,id=n0,server=off,addr.type=fd,addr.str=FD``).  QEMU's end
  gets a send buffer for a whole virtio TX ring (:data:`QEMU_SEND_BUFFER_BYTES`):
  the checkpoint's ``vm_stop`` pushes the ring into the socket and QEMU purges
  what does not fit, which the guest counts as sent.
* **Listening (``kemari net bridge``).** With a ``stream_socket`` path, Kemari
  listens there and QEMU connects to it
  (``-netdev stream,id=n0,server=off,addr.type=unix,addr.path=PATH``); QEMU's
  socket then has the system's default send buffer.

Frames read from QEMU go out of the tap into the host (guest output); frames
read from the tap go to QEMU (guest input).  At most one QEMU is attached at a
time; when it goes, the bridge and its tap stay, so the QEMU that takes over
after a failover (plugged anew, or connecting to the same path) carries on.

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
import socket
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

# The send buffer QEMU's end of an inherited guest link gets (what SO_SNDBUF reads back).
# At a checkpoint's vm_stop, QEMU 7.2 pushes every frame still in the guest's TX ring into
# the socket and purges the first one that does not fit (net_vm_change_state_handler ->
# qemu_flush_or_purge_queued_packets; each purge completes the frame, and
# virtio_net_tx_complete fetches the next): the guest counts those as sent, nobody has them.
# So the buffer must take a full ring on top of the little Kemari has not read yet (the
# checkpoint drains the socket first, drain_guest_stream).  The ring: virtio-net's TX queue
# has 256 descriptors (QEMU 7.2 VIRTIO_NET_TX_QUEUE_DEFAULT_SIZE), one frame each.  The
# cost of a frame: on AF_UNIX stream sockets every write (4-byte length + frame) is one skb
# charged to the *sender's* send buffer at its truesize (data rounded up to a slab, plus
# skb_shared_info and sk_buff); measured on Linux 6.x by filling a socketpair: 2303 bytes
# for a 1514-byte frame, 10485 for a 9014-byte jumbo frame.  256 x 2303 = 0.56 MiB (the
# default net.core.wmem_default, 212992, holds only 92 such frames); 256 x 10485 = 2.6 MiB.
# 4 MiB = 256 x 16 KiB holds a full ring of frames up to about 15000 bytes, so any
# standard or jumbo MTU.  (A guest that raises its MTU towards virtio-net's 65535 could
# still overflow it: 256 maximal frames cost about 17 MiB.)  The kernel charges this
# memory only while frames wait unread, i.e. while Kemari has paused reading the guest.
QEMU_SEND_BUFFER_BYTES = 4 << 20
# Linux's SO_SNDBUFFORCE (asm-generic/socket.h; not exported by Python's socket module):
# SO_SNDBUF without the net.core.wmem_max cap, for a process with CAP_NET_ADMIN.
_SO_SNDBUFFORCE = 32


def set_send_buffer(sock: socket.socket, size: int) -> int:
    """Give ``sock`` a send buffer of ``size`` bytes, as near as allowed; returns what it got.

    Linux doubles the value it is given (the extra half is its bookkeeping allowance) and
    reports the doubled value, so ``size / 2`` is asked for.  Without CAP_NET_ADMIN,
    SO_SNDBUFFORCE is refused and plain SO_SNDBUF is capped by net.core.wmem_max: then a
    smaller buffer is logged as a warning, since frames may be lost at checkpoints.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, size // 2)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size // 2)
    granted: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    if granted < size:
        log.warning(
            "QEMU's stream socket got a %d-byte send buffer, not %d (no CAP_NET_ADMIN, and "
            "net.core.wmem_max caps it): a full TX ring may not fit at a checkpoint, and "
            "QEMU drops what does not",
            granted,
            size,
        )
    return granted


def guest_socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected ``AF_UNIX`` stream pair: (Kemari's end, QEMU's end).

    QEMU's end gets :data:`QEMU_SEND_BUFFER_BYTES` of send buffer.  Kemari's end keeps the
    defaults: on AF_UNIX stream sockets the receiver's SO_RCVBUF limits nothing (the
    kernel charges queued data to the sender, net/unix/af_unix.c), and Kemari's own send
    buffer only bounds host frames waiting for QEMU, where asyncio's write-buffer marks
    already stop the tap reader.  Both ends are close-on-exec; a child inherits QEMU's
    end only through ``pass_fds``.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        set_send_buffer(theirs, QEMU_SEND_BUFFER_BYTES)
    except OSError as exc:
        ours.close()
        theirs.close()
        raise NetError(f"cannot size QEMU's stream socket: {exc}") from exc
    return ours, theirs


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
    """Moves frames between one QEMU ``-netdev stream`` client and a host tap.

    ``stream_socket``: the unix path to listen on for QEMU; None: no listener, each QEMU
    gets its end of a socketpair from :meth:`plug_guest`.
    """

    def __init__(
        self,
        stream_socket: Path | None,
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

    @property
    def _guest_side(self) -> str:
        """The guest side's name in log lines."""
        if self.stream_socket is None:
            return f"the guest link of tap {self.tap_name}"
        return str(self.stream_socket)

    async def start(self) -> None:
        """Create the tap, then listen for QEMU if there is a path (a QEMU always has a tap)."""
        if self.state is not BridgeState.CREATED:
            raise NetError(f"bridge cannot start in state {self.state.value}")
        if self.stream_socket is not None:
            claim_socket_path(self.stream_socket)
        self._tap.open()
        try:
            if self.stream_socket is not None:
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
        if self.stream_socket is not None:
            log.info("bridge %s <-> tap %s listening", self.stream_socket, self.tap_name)
        else:
            log.info("bridge of tap %s running (each QEMU gets a new link)", self.tap_name)

    async def plug_guest(self) -> socket.socket:
        """Connect a new guest link for the next QEMU; returns QEMU's end.

        Kemari's end is attached at once as the guest connection.  The caller passes QEMU's
        end to QEMU (``StreamNic(fd=...)``, inherited) and closes its own copy once QEMU has
        started, or failed to: from then on QEMU holds the only copy, so QEMU's exit (or a
        refused descriptor) reads as end-of-stream here and detaches the link, like a
        disconnect on the listener.  Host frames that arrive before QEMU reads wait in the
        socket, as in a NIC's receive ring.
        """
        if self.state is not BridgeState.RUNNING:
            raise NetError(f"bridge of tap {self.tap_name} is {self.state.value}, not running")
        if self._peer is not None:
            # One guest per NIC identity: the previous QEMU must be gone first.
            raise NetError(f"a QEMU is still attached to {self._guest_side}")
        ours, theirs = guest_socketpair()
        try:
            loop = asyncio.get_running_loop()
            # Returns after connection_made, i.e. after _attach.
            await loop.connect_accepted_socket(lambda: _GuestConnection(self), sock=ours)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        return theirs

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
        if listened and self.stream_socket is not None:
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
            log.warning("refusing a second QEMU connection on %s", self._guest_side)
            connection.transport.close()
            return
        self._peer = connection
        self.counters.connections += 1
        if self._guest_reading_paused:
            connection.transport.pause_reading()
        log.info(
            "guest connected on %s (connection %d)", self._guest_side, self.counters.connections
        )

    def _detach(self, connection: _GuestConnection, exc: Exception | None) -> None:
        if self._peer is not connection:
            return
        self._peer = None
        reason = f": {exc}" if exc is not None else ""
        log.info("guest disconnected from %s%s", self._guest_side, reason)
        # A paused tap reader belongs to the old connection's back-pressure.
        self._set_tap_reading(enabled=self.state is BridgeState.RUNNING)

    def _framing_failed(self, connection: _GuestConnection, exc: FramingError) -> None:
        self.counters.framing_errors += 1
        log.error("dropping QEMU connection on %s: malformed stream: %s", self._guest_side, exc)
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
        log.error("bridge %s failed: %s", self._guest_side, error)
        self._set_tap_reading(enabled=False)
        self.failure = error
        self.state = BridgeState.FAILED
        self._stopped.set()
