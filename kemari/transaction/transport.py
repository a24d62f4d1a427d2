"""Byte-stream transports for the ft-transaction protocol, chosen by URI.

:class:`Transport` is the interface the session layer uses; :class:`TcpTransport` is its
implementation over TCP, with or without TLS.  With credentials
(:class:`~kemari.config.TlsCreds`, QEMU's x509 directory layout) both ends speak TLS 1.3
only and authenticate each other: the standby presents ``server-cert.pem``, the primary
``client-cert.pem``, both signed by ``ca-cert.pem`` and both carrying the pair's name
(``kemari-<vm>`` unless configured) as a DNS subjectAltName; a peer without TLS, with a
certificate of another CA or of another pair is refused before any frame is read.

A :class:`Listener` bounds what an unauthenticated peer can cost: at most
``max_pending`` connections between accept and the end of the session handshake (more
are closed at once), each for at most ``handshake_timeout`` seconds and
``pre_handshake_bytes`` bytes; :meth:`Transport.established` lifts the bounds.
Receive buffers grow only as bytes arrive, so an announced length costs nothing yet.

Checkpoint frames are small and latency-bound, so every TCP socket sets
``TCP_NODELAY`` and re-arms ``TCP_QUICKACK`` after each read: Linux drops quick-ack
mode by itself, and a delayed ACK then stalls the peer's next small write by 40 ms.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from kemari.config import TlsCreds
from kemari.errors import TransactionError

URI_SCHEME = "kemari"
log = logging.getLogger(__name__)


class TransportClosed(TransactionError):
    """The peer closed the byte stream (or it broke) before the expected bytes arrived."""


@dataclass(frozen=True, slots=True)
class TcpAddress:
    """A parsed ``kemari:tcp:HOST:PORT``; ``host`` is bare (no IPv6 brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{URI_SCHEME}:tcp:{host}:{self.port}"


def parse_uri(uri: str, *, allow_port_zero: bool = False) -> TcpAddress:
    """Parse ``kemari:tcp:HOST:PORT``: HOST is IPv4, ``[IPv6]`` or a DNS name.

    Port 0 (let the kernel choose) is only meaningful for listeners and is refused
    unless ``allow_port_zero``.
    """
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme != URI_SCHEME:
        raise TransactionError(f"address {uri!r} must look like kemari:tcp:HOST:PORT")
    kind, sep, rest = rest.partition(":")
    if not sep or kind != "tcp":
        raise TransactionError(f"address {uri!r}: transport {kind!r} is not supported (only tcp)")
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host:
        raise TransactionError(f"address {uri!r} lacks HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]"):
            raise TransactionError(f"address {uri!r}: unbalanced '[' around the IPv6 host")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise TransactionError(f"address {uri!r}: {host!r} is not an IPv6 address") from exc
    elif ":" in host:
        raise TransactionError(f"address {uri!r}: write an IPv6 host in brackets, [{host}]")
    else:
        _check_hostname(uri, host)
    if not port_text.isdigit() or not port_text.isascii():
        raise TransactionError(f"address {uri!r}: port {port_text!r} is not a number")
    port = int(port_text)
    lowest = 0 if allow_port_zero else 1
    if not lowest <= port <= 65535:
        raise TransactionError(f"address {uri!r}: port {port} is outside {lowest}-65535")
    return TcpAddress(host, port)


def _check_hostname(uri: str, host: str) -> None:
    if all(part.isdigit() for part in host.split(".")):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as exc:
            raise TransactionError(f"address {uri!r}: {host!r} is not an IPv4 address") from exc
        return
    labels = host.rstrip(".").split(".")
    valid = len(host) <= 253 and all(
        1 <= len(label) <= 63
        and label.isascii()
        and label.replace("-", "").isalnum()
        and not label.startswith("-")
        and not label.endswith("-")
        for label in labels
    )
    if not valid:
        raise TransactionError(f"address {uri!r}: {host!r} is not a valid host name")


class Transport(abc.ABC):
    """An ordered, reliable byte stream to the peer host."""

    @property
    @abc.abstractmethod
    def peer(self) -> str:
        """A printable name of the other end (e.g. ``10.0.0.2:4444``)."""

    @abc.abstractmethod
    async def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes as soon as any arrive; ``b""`` once the peer closed."""

    @abc.abstractmethod
    async def read_exactly(self, size: int) -> bytes | bytearray:
        """Exactly ``size`` bytes in a new buffer the caller owns (the transport never
        touches it again); :class:`TransportClosed` if the stream ends first."""

    @abc.abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for sending, in order; call :meth:`drain` to wait for room."""

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait until the send buffer is below its high-water mark."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the stream; safe to call more than once."""

    @property
    def tls(self) -> bool:
        """True when the stream is TLS with a peer certificate verified against the CA
        and the pair's name (nothing else is ever TLS here)."""
        return False

    def established(self) -> None:  # noqa: B027 (optional hook, no-op by default)
        """The session handshake succeeded: lift the pre-handshake bounds (if any)."""

    def set_write_buffer_limit(self, high: int) -> None:  # noqa: B027 (optional, no-op)
        """Let :meth:`drain` return at once while fewer than ``high`` bytes are queued."""


# Unread bytes kept while no exact read is pending (headers, small frames).
_STAGING_SIZE = 256 << 10
# Seconds close() waits for queued bytes to reach a peer before aborting.
_CLOSE_GRACE = 2.0
# A payload's receive buffer starts at this size and doubles as bytes arrive, so a
# frame header alone never makes the receiver allocate the length it announces.
_FIRST_CHUNK = 256 << 10
# Listener defaults: connections between accept and the session handshake.
MAX_PENDING = 8
PRE_HANDSHAKE_TIMEOUT_S = 10.0
PRE_HANDSHAKE_BYTES = 64 << 10


def server_context(creds: TlsCreds) -> ssl.SSLContext:
    """The standby's TLS 1.3 context: presents ``server-cert.pem``, requires a client
    certificate signed by ``ca-cert.pem`` (its name is checked by the :class:`Listener`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=str(creds.ca_cert))
        context.load_cert_chain(str(creds.server_cert), str(creds.server_key))
    except (OSError, ssl.SSLError) as exc:
        raise TransactionError(f"TLS credentials in {creds.directory}: {exc}") from exc
    return context


def client_context(creds: TlsCreds) -> ssl.SSLContext:
    """The primary's TLS 1.3 context: presents ``client-cert.pem``, requires a server
    certificate signed by ``ca-cert.pem`` that names the pair (``creds.peer_name``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    try:
        context.load_verify_locations(cafile=str(creds.ca_cert))
        context.load_cert_chain(str(creds.client_cert), str(creds.client_key))
    except (OSError, ssl.SSLError) as exc:
        raise TransactionError(f"TLS credentials in {creds.directory}: {exc}") from exc
    return context


def certificate_names(cert: object) -> tuple[str, ...]:
    """The DNS subjectAltNames of a certificate as ``getpeercert()`` returns it."""
    if not isinstance(cert, dict):
        return ()
    return tuple(value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS")


class _TcpProtocol(asyncio.BufferedProtocol):
    """Receives straight into the buffer a pending :meth:`TcpTransport.read_exactly` wants.

    Bytes that arrive while no exact read is pending go to a staging buffer; reading
    pauses while staging is full.  Invariant: ``get_buffer`` never returns an empty
    buffer (a completed target is detached in ``buffer_updated``, a full but incomplete
    one grows in ``get_buffer``, and a full staging buffer pauses reading before another
    receive can happen).  ``budget``, when set, is how many more bytes may be read before
    :meth:`TcpTransport.established`; reading more aborts the connection (what arrives
    unread meanwhile stays in the bounded staging buffer).
    """

    def __init__(
        self,
        on_connected: Callable[[TcpTransport], None] | None = None,
        budget: int | None = None,
    ) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_connected = on_connected
        self.budget = budget
        self._staging = bytearray(_STAGING_SIZE)
        self._start = 0
        self._end = 0
        self._target: bytearray | None = None
        self._target_size = 0
        self._filled = 0
        self._reading_paused = False
        self._writing_paused = False
        self._eof = False
        self.lost: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self._on_connected is not None:
            self._on_connected(TcpTransport(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        target = self._target
        if target is not None:
            if self._filled == len(target):
                # Grow only now that the peer really sent what the buffer held.
                grow = min(self._target_size, 2 * len(target)) - len(target)
                target.extend(bytes(grow))
            return memoryview(target)[self._filled :]
        if self._end == len(self._staging):
            # Move the unread bytes to the front; reading was paused if nothing was read.
            unread = self._end - self._start
            self._staging[:unread] = self._staging[self._start : self._end]
            self._start, self._end = 0, unread
        return memoryview(self._staging)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.rearm_quickack()
        if self._target is not None:
            self._filled += nbytes
            if self._filled == self._target_size:
                self._target = None
                self._wake()
            return
        self._end += nbytes
        if self._end - self._start == len(self._staging):
            self._pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if self.lost is None:
            self.lost = exc if exc is not None else ConnectionResetError("connection closed")
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- used by TcpTransport
    def rearm_quickack(self) -> None:
        # Linux-only option; the socket may already be gone.
        sock = None if self.transport is None else self.transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_QUICKACK"):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _pause_reading(self) -> None:
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and self._reading_paused and not self._eof:
            self._reading_paused = False
            self.transport.resume_reading()

    async def _wait(self) -> None:
        if self._waiter is not None:
            raise TransactionError("two reads at once on one transport")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _take_staged(self, limit: int) -> bytes:
        end = min(self._end, self._start + limit)
        taken = bytes(memoryview(self._staging)[self._start : end])
        self._start += len(taken)
        if self._start == self._end:
            self._start = self._end = 0
        self._resume_reading()
        return taken

    def _spend(self, size: int) -> None:
        if self.budget is None:
            return
        self.budget -= size
        if self.budget < 0:
            if self.transport is not None:
                self.transport.abort()
            raise TransactionError("peer sent more than allowed before the handshake ended")

    async def read_some(self, limit: int) -> bytes:
        while self._start == self._end and not self._eof:
            await self._wait()
        taken = self._take_staged(limit)
        self._spend(len(taken))
        return taken

    async def read_exactly(self, size: int) -> bytearray:
        self._spend(size)
        staged = self._take_staged(size)
        if len(staged) == size:
            return bytearray(staged)
        target = bytearray(max(len(staged), min(size, _FIRST_CHUNK)))
        target[: len(staged)] = staged
        self._target, self._target_size, self._filled = target, size, len(staged)
        try:
            while self._target is not None and not self._eof:
                await self._wait()
        finally:
            detached, self._target = self._target, None
        if detached is not None:
            raise TransportClosed(f"connection closed after {self._filled} of {size} bytes")
        return target

    async def drain(self) -> None:
        if self.lost is not None:
            raise TransportClosed(f"connection lost: {self.lost}")
        if self._writing_paused:
            # Several senders may wait for the same room (frames are written whole).
            if self._drain_waiter is None or self._drain_waiter.done():
                self._drain_waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drain_waiter)
            if self.lost is not None:
                raise TransportClosed(f"connection lost: {self.lost}")


class TcpTransport(Transport):
    """:class:`Transport` over TCP (optionally TLS) with low-latency socket options.

    Built on :class:`asyncio.BufferedProtocol`: a payload read with
    :meth:`read_exactly` is received straight into the buffer returned (no
    intermediate stream buffer; with TLS, decrypted into it).
    """

    def __init__(self, protocol: _TcpProtocol) -> None:
        if protocol.transport is None:
            raise TransactionError("TCP transport is not connected")
        self._protocol = protocol
        self._transport = protocol.transport
        peer = self._transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._tls = self._transport.get_extra_info("ssl_object") is not None
        self._on_established: Callable[[], None] | None = None
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        protocol.rearm_quickack()

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def tls(self) -> bool:
        return self._tls

    def peer_names(self) -> tuple[str, ...]:
        """The DNS names in the peer's verified certificate (empty without TLS)."""
        return certificate_names(self._transport.get_extra_info("peercert"))

    def established(self) -> None:
        self._protocol.budget = None
        callback, self._on_established = self._on_established, None
        if callback is not None:
            callback()

    async def read_some(self, limit: int) -> bytes:
        return await self._protocol.read_some(limit)

    async def read_exactly(self, size: int) -> bytearray:
        try:
            return await self._protocol.read_exactly(size)
        except TransportClosed as exc:
            raise TransportClosed(f"{self._peer}: {exc}") from exc

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # Writing to a broken connection would only make asyncio log "socket.send()
        # raised exception." once per write: fail the sender instead, once.
        if self._protocol.lost is not None:
            raise TransportClosed(f"{self._peer}: connection lost: {self._protocol.lost}")
        if self._transport.is_closing():
            raise TransportClosed(f"{self._peer}: connection is closing")
        self._transport.write(data)

    async def drain(self) -> None:
        try:
            await self._protocol.drain()
        except TransportClosed as exc:
            raise TransportClosed(f"{self._peer}: {exc}") from exc

    def set_write_buffer_limit(self, high: int) -> None:
        self._transport.set_write_buffer_limits(high=high)

    def abort(self) -> None:
        """Drop the connection at once (nothing queued is sent)."""
        self._transport.abort()

    async def close(self, grace: float = _CLOSE_GRACE) -> None:
        """Close after flushing queued bytes for at most ``grace`` seconds, then abort.

        Without the bound, a peer that stopped reading would keep the socket forever.
        """
        self._transport.close()
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(self._protocol.closed)
        except TimeoutError:
            self._transport.abort()
            await self._protocol.closed


async def connect(uri: str, timeout: float, *, tls: TlsCreds | None = None) -> Transport:
    """Open a transport to the listener at ``uri`` within ``timeout`` seconds.

    With ``tls``, the connection is TLS 1.3 with ``client-cert.pem``, and the standby
    must present a certificate of ``ca-cert.pem`` naming ``tls.peer_name``; a standby
    without TLS is refused (the handshake fails).
    """
    address = parse_uri(uri)
    loop = asyncio.get_running_loop()
    context = None if tls is None else client_context(tls)
    try:
        async with asyncio.timeout(timeout):
            _, protocol = await loop.create_connection(
                _TcpProtocol,
                address.host,
                address.port,
                ssl=context,
                server_hostname=None if tls is None else tls.peer_name,
                ssl_handshake_timeout=None if tls is None else timeout,
            )
    except TimeoutError as exc:
        raise TransactionError(f"connecting to {address} timed out after {timeout} s") from exc
    except ssl.SSLCertVerificationError as exc:
        raise TransactionError(
            f"refused standby {address}: its certificate does not verify "
            f"(CA {tls.ca_cert if tls else '?'}, name {tls.peer_name if tls else '?'}): "
            f"{exc.verify_message or exc}"
        ) from exc
    except (ssl.SSLError, ConnectionResetError) as exc:
        if tls is None:
            raise TransactionError(f"cannot connect to {address}: {exc}") from exc
        raise TransactionError(
            f"TLS handshake with standby {address} failed (does it run with tls_creds?): {exc}"
        ) from exc
    except OSError as exc:
        raise TransactionError(f"cannot connect to {address}: {exc.strerror or exc}") from exc
    transport = TcpTransport(protocol)
    if tls is not None and not transport.tls:
        await transport.close()
        raise TransactionError(f"connection to {address} is not TLS")
    return transport


class Listener:
    """Accepts transports on a ``kemari:tcp:HOST:PORT`` address (port 0: kernel's choice).

    Connections queue until :meth:`accept` takes them; :meth:`close` stops listening
    and closes every connection nobody took.  Until its owner calls
    :meth:`Transport.established`, a connection is *pending*: at most ``max_pending``
    of them exist (a further one is closed at once), each is aborted after
    ``handshake_timeout`` seconds or ``pre_handshake_bytes`` received bytes.  With
    ``tls`` every connection is TLS 1.3 with a client certificate of the CA that names
    ``tls.peer_name``; anything else (plain TCP included) is refused and logged.
    """

    def __init__(
        self,
        uri: str,
        *,
        tls: TlsCreds | None = None,
        max_pending: int = MAX_PENDING,
        handshake_timeout: float = PRE_HANDSHAKE_TIMEOUT_S,
        pre_handshake_bytes: int | None = PRE_HANDSHAKE_BYTES,
    ) -> None:
        self.address = parse_uri(uri, allow_port_zero=True)
        self.tls = tls
        self.max_pending = max_pending
        self.handshake_timeout = handshake_timeout
        self.pre_handshake_bytes = pre_handshake_bytes
        self.refused = 0
        self.last_refusal = ""
        self.pending = 0
        self._context = None if tls is None else server_context(tls)
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._opening: set[asyncio.Task[None]] = set()
        # Pending connections, oldest first: peer and how to drop it.
        self._evictors: dict[int, tuple[str, Callable[[], None]]] = {}
        self._admitted = 0
        self._queue: asyncio.Queue[TcpTransport] = asyncio.Queue()

    @property
    def bound(self) -> TcpAddress:
        """The address actually listened on (resolves port 0)."""
        if self._sock is None:
            raise TransactionError("listener is not started")
        port = self._sock.getsockname()[1]
        return TcpAddress(self.address.host, port)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                self.address.host,
                self.address.port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
            family, kind, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
                sock.listen(128)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            raise TransactionError(
                f"cannot listen on {self.address}: {exc.strerror or exc}"
            ) from exc
        self._sock = sock
        self._task = asyncio.create_task(self._accept_loop(sock), name="listener-accept")

    async def accept(self) -> Transport:
        """The next connected (and, with TLS, authenticated) transport."""
        if self._sock is None:
            raise TransactionError("listener is not started")
        return await self._queue.get()

    def refuse(self, peer: str, reason: str) -> None:
        """Count and log one refused peer (one line, with the reason)."""
        self.refused += 1
        self.last_refusal = f"{peer}: {reason}"
        log.warning("refused peer %s: %s", peer, reason)

    async def _accept_loop(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listening)
            except OSError as exc:
                log.warning("accept on %s failed: %s", self.address, exc)
                await asyncio.sleep(0.1)
                continue
            peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
            if len(self._evictors) >= self.max_pending:
                # Evict the oldest pending connection rather than refuse the newcomer:
                # idle connections cannot keep the real primary out.
                key = next(iter(self._evictors))
                oldest_peer, evict = self._evictors.pop(key)
                self.refuse(
                    oldest_peer,
                    f"evicted: oldest of {self.max_pending} connections waiting for a handshake",
                )
                evict()
            self._admit(sock, peer)

    def _admit(self, sock: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        self._admitted += 1
        key = self._admitted
        state: dict[str, TcpTransport | None] = {"transport": None}

        def settle() -> None:
            entry = self._evictors.pop(key, None)
            if entry is not None:
                self.pending = len(self._evictors)

        def evict() -> None:
            transport = state["transport"]
            if transport is not None:
                transport.abort()
            else:
                task.cancel()
                sock.close()
            self.pending = len(self._evictors)

        async def open_() -> None:
            try:
                transport = await self._open(sock, peer)
            except asyncio.CancelledError:
                settle()
                sock.close()
                raise
            if transport is None:
                settle()
                return
            state["transport"] = transport
            # The pre-handshake deadline: whoever took the transport must finish by then.
            timer = loop.call_later(self.handshake_timeout, self._expire, transport, peer)

            def closed(_: asyncio.Future[None]) -> None:
                timer.cancel()
                settle()

            transport._protocol.closed.add_done_callback(closed)

            def established() -> None:
                timer.cancel()
                settle()

            transport._on_established = established
            self._queue.put_nowait(transport)

        task = asyncio.create_task(open_())
        self._evictors[key] = (peer, evict)
        self.pending = len(self._evictors)
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open(self, sock: socket.socket, peer: str) -> TcpTransport | None:
        """The connection as a transport (TLS: authenticated and named), or None."""
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.connect_accepted_socket(
                lambda: _TcpProtocol(budget=self.pre_handshake_bytes),
                sock,
                ssl=self._context,
                ssl_handshake_timeout=None if self._context is None else self.handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            sock.close()
            what = "TLS handshake failed" if self._context is not None else "connection failed"
            self.refuse(peer, f"{what}: {_tls_reason(exc)}")
            return None
        transport = TcpTransport(protocol)
        if self.tls is not None:
            names = transport.peer_names()
            if self.tls.peer_name not in names:
                transport.abort()
                self.refuse(
                    peer,
                    f"certificate names {', '.join(names) or 'nothing'}, "
                    f"this pair expects {self.tls.peer_name}",
                )
                return None
        return transport

    def _expire(self, transport: TcpTransport, peer: str) -> None:
        if transport._on_established is not None:
            self.refuse(peer, f"no session handshake within {self.handshake_timeout:g} s")
            transport.abort()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for opening in list(self._opening):
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await opening
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        while not self._queue.empty():
            await self._queue.get_nowait().close()


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate does not verify: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_EOF_WHILE_READING"):
            return f"{reason} (a peer without TLS or with another protocol?)"
        return str(reason)
    if isinstance(exc, TimeoutError):
        return "no TLS handshake in time"
    return str(exc) or type(exc).__name__
