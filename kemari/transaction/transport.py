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
from dataclasses import dataclass

from kemari.errors import TransactionError

URI_SCHEME = "kemari"
_READ_CHUNK = 256 << 10


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
    async def read_exactly(self, size: int) -> bytes:
        """Exactly ``size`` bytes; :class:`TransportClosed` if the stream ends first."""

    @abc.abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for sending, in order; call :meth:`drain` to wait for room."""

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait until the send buffer is below its high-water mark."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the stream; safe to call more than once."""


class TcpTransport(Transport):
    """:class:`Transport` over an asyncio TCP stream with low-latency socket options."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._socket: socket.socket | None = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if self._socket is not None:
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._rearm_quickack()

    @property
    def peer(self) -> str:
        return self._peer

    def _rearm_quickack(self) -> None:
        # Linux-only option; the socket may already be closed by the peer.
        if self._socket is not None and hasattr(socket, "TCP_QUICKACK"):
            with contextlib.suppress(OSError):
                self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    async def read_some(self, limit: int) -> bytes:
        try:
            data = await self._reader.read(min(limit, _READ_CHUNK))
        except OSError as exc:
            raise TransportClosed(f"connection to {self._peer} broke: {exc}") from exc
        self._rearm_quickack()
        return data

    async def read_exactly(self, size: int) -> bytes:
        try:
            data = await self._reader.readexactly(size)
        except asyncio.IncompleteReadError as exc:
            raise TransportClosed(
                f"{self._peer} closed the connection after {len(exc.partial)} of {size} bytes"
            ) from exc
        except OSError as exc:
            raise TransportClosed(f"connection to {self._peer} broke: {exc}") from exc
        self._rearm_quickack()
        return data

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except OSError as exc:
            raise TransportClosed(f"connection to {self._peer} broke: {exc}") from exc

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


# asyncio's default StreamReader limit (64 KiB) would pause the socket on every
# page batch; a few MiB keeps a whole batch flowing.
_STREAM_LIMIT = 4 << 20


async def connect(uri: str, timeout: float) -> Transport:
    """Open a transport to the listener at ``uri`` within ``timeout`` seconds."""
    address = parse_uri(uri)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                address.host, address.port, limit=_STREAM_LIMIT
            )
    except TimeoutError as exc:
        raise TransactionError(f"connecting to {address} timed out after {timeout} s") from exc
    except OSError as exc:
        raise TransactionError(f"cannot connect to {address}: {exc.strerror or exc}") from exc
    return TcpTransport(reader, writer)


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
        try:
            self._server = await asyncio.start_server(
                self._on_connection, self.address.host, self.address.port, limit=_STREAM_LIMIT
            )
        except OSError as exc:
            raise TransactionError(
                f"cannot listen on {self.address}: {exc.strerror or exc}"
            ) from exc

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._pending.put(TcpTransport(reader, writer))

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
