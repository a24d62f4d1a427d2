"""Byte-stream transports for the ft-transaction protocol, chosen by URI.

:class:`Transport` is the interface the session layer uses; :class:`TcpTransport` is
today's only implementation (TLS comes later and will plug in behind
:func:`parse_uri` / :func:`connect` / :class:`Listener` without touching the session).

Checkpoint frames are small and latency-bound, so every TCP socket sets
``TCP_NODELAY`` and re-arms ``TCP_QUICKACK`` after each read: Linux drops quick-ack
mode by itself, and a delayed ACK then stalls the peer's next small write by 40 ms.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass

from kemari.errors import TransactionError

URI_SCHEME = "kemari"


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


# Unread bytes kept while no exact read is pending (headers, small frames).
_STAGING_SIZE = 256 << 10
# Seconds close() waits for queued bytes to reach a peer before aborting.
_CLOSE_GRACE = 2.0


class _TcpProtocol(asyncio.BufferedProtocol):
    """Receives straight into the buffer a pending :meth:`TcpTransport.read_exactly` wants.

    Bytes that arrive while no exact read is pending go to a staging buffer; reading
    pauses while staging is full.  Invariant: ``get_buffer`` never returns an empty
    buffer (a completed target is detached in ``buffer_updated``, and a full staging
    buffer pauses reading before another receive can happen).
    """

    def __init__(self, on_connected: Callable[[TcpTransport], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_connected = on_connected
        self._staging = bytearray(_STAGING_SIZE)
        self._start = 0
        self._end = 0
        self._target: bytearray | None = None
        self._filled = 0
        self._reading_paused = False
        self._writing_paused = False
        self._eof = False
        self._lost: Exception | None = None
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
        if self._target is not None:
            return memoryview(self._target)[self._filled :]
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
            if self._filled == len(self._target):
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
        self._lost = exc if exc is not None else ConnectionResetError("connection closed")
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

    async def read_some(self, limit: int) -> bytes:
        while self._start == self._end and not self._eof:
            await self._wait()
        return self._take_staged(limit)

    async def read_exactly(self, size: int) -> bytearray:
        target = bytearray(size)
        staged = self._take_staged(size)
        target[: len(staged)] = staged
        if len(staged) == size:
            return target
        self._target, self._filled = target, len(staged)
        while self._target is not None and not self._eof:
            await self._wait()
        if self._target is not None:
            filled, self._target = self._filled, None
            raise TransportClosed(f"connection closed after {filled} of {size} bytes")
        return target

    async def drain(self) -> None:
        if self._lost is not None:
            raise TransportClosed(f"connection lost: {self._lost}")
        if self._writing_paused:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
            if self._lost is not None:
                raise TransportClosed(f"connection lost: {self._lost}")


class TcpTransport(Transport):
    """:class:`Transport` over TCP with low-latency socket options.

    Built on :class:`asyncio.BufferedProtocol`: a payload read with
    :meth:`read_exactly` is received by the kernel straight into the buffer returned
    (no intermediate stream buffer, no copy).
    """

    def __init__(self, protocol: _TcpProtocol) -> None:
        if protocol.transport is None:
            raise TransactionError("TCP transport is not connected")
        self._protocol = protocol
        self._transport = protocol.transport
        peer = self._transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        protocol.rearm_quickack()

    @property
    def peer(self) -> str:
        return self._peer

    async def read_some(self, limit: int) -> bytes:
        return await self._protocol.read_some(limit)

    async def read_exactly(self, size: int) -> bytearray:
        try:
            return await self._protocol.read_exactly(size)
        except TransportClosed as exc:
            raise TransportClosed(f"{self._peer}: {exc}") from exc

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._transport.write(data)

    async def drain(self) -> None:
        try:
            await self._protocol.drain()
        except TransportClosed as exc:
            raise TransportClosed(f"{self._peer}: {exc}") from exc

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


async def connect(uri: str, timeout: float) -> Transport:
    """Open a transport to the listener at ``uri`` within ``timeout`` seconds."""
    address = parse_uri(uri)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            _, protocol = await loop.create_connection(_TcpProtocol, address.host, address.port)
    except TimeoutError as exc:
        raise TransactionError(f"connecting to {address} timed out after {timeout} s") from exc
    except OSError as exc:
        raise TransactionError(f"cannot connect to {address}: {exc.strerror or exc}") from exc
    return TcpTransport(protocol)


class Listener:
    """Accepts transports on a ``kemari:tcp:HOST:PORT`` address (port 0: kernel's choice).

    Connections queue until :meth:`accept` takes them; :meth:`close` stops listening
    and closes every connection nobody took.
    """

    def __init__(self, uri: str) -> None:
        self.address = parse_uri(uri, allow_port_zero=True)
        self._server: asyncio.Server | None = None
        self._pending: asyncio.Queue[TcpTransport] = asyncio.Queue()

    @property
    def bound(self) -> TcpAddress:
        """The address actually listened on (resolves port 0)."""
        if self._server is None or not self._server.sockets:
            raise TransactionError("listener is not started")
        port = self._server.sockets[0].getsockname()[1]
        return TcpAddress(self.address.host, port)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _TcpProtocol(self._pending.put_nowait),
                self.address.host,
                self.address.port,
            )
        except OSError as exc:
            raise TransactionError(
                f"cannot listen on {self.address}: {exc.strerror or exc}"
            ) from exc

    async def accept(self) -> Transport:
        """The next connected transport, waiting for one if needed."""
        if self._server is None:
            raise TransactionError("listener is not started")
        return await self._pending.get()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        while not self._pending.empty():
            await self._pending.get_nowait().close()
