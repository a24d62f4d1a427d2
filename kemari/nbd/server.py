"""Kemari's NBD server: one export of a :class:`~kemari.nbd.backend.Backend` on a unix socket.

Each connection goes through two phases (:class:`Phase`): the fixed newstyle
handshake (options one at a time, strictly request/reply) and transmission,
where many requests are in flight at once.  In transmission the connection's
reader task decodes and validates requests and spawns one task per valid
request; each task performs its I/O on the backend and writes its own reply.

Invariants:

* every reply is handed to the transport whole (header and data with no
  ``await`` in between, or as one element of a batch of small replies), so
  replies never interleave, though they may leave in a different order than
  requests arrived;
* a reply is complete only once the transport buffer is below its high-water
  mark (``drain`` under a per-connection lock), so a client that stops
  reading stalls its own requests instead of growing the buffer;
* the reader stops reading while the connection's in-flight requests exceed
  :data:`MAX_IN_FLIGHT_REQUESTS` or :data:`MAX_IN_FLIGHT_BYTES`, which bounds
  memory per connection (a lone oversized request is always admitted);
* an invalid request (bad bounds, flags, command, length) gets an error reply
  and the connection keeps serving; only a broken framing (bad magic, bad
  handshake) closes the connection, and never the server;
* on NBD_CMD_DISC, EOF or a violation, in-flight requests complete and
  their replies are sent before the socket closes; on server close, their
  backend I/O completes and then the connection is aborted, so a client that
  stopped reading cannot hold the shutdown.

The server never waits on anything outside itself and its backend before
answering (see the backend contract).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import itertools
import logging
import os
from pathlib import Path

from kemari.errors import NbdError
from kemari.nbd import protocol
from kemari.nbd.backend import Backend
from kemari.nbd.protocol import (
    Command,
    CommandFlag,
    Errno,
    Info,
    Option,
    OptionReply,
    ProtocolViolation,
    TransmissionFlag,
)
from kemari.sockets import bind_private_socket, claim_socket_path

log = logging.getLogger(__name__)

DEFAULT_EXPORT_NAME = "disk"
MAX_IN_FLIGHT_REQUESTS = 128
MAX_IN_FLIGHT_BYTES = 128 * 1024 * 1024
_DISCARD_CHUNK = 1024 * 1024
_JOIN_LIMIT = 64 * 1024
_UNIX_PATH_MAX = 107  # sun_path holds 108 bytes including the NUL
_WRITE_BUFFER_HIGH = 4 * 1024 * 1024
_HANDSHAKE_FLAGS = protocol.HandshakeFlag.FIXED_NEWSTYLE | protocol.HandshakeFlag.NO_ZEROES


class Phase(enum.Enum):
    """Where a connection is in the protocol."""

    HANDSHAKE = "handshake"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class _InFlightLimit:
    """Admission control for one connection: a request count and a byte budget.

    Only the connection's reader task calls :meth:`acquire`, so at most one
    task ever waits; request tasks call :meth:`release` when their reply is out.
    """

    def __init__(self) -> None:
        self._requests = 0
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None

    def _admits(self, cost: int) -> bool:
        # An empty pipeline admits anything, so a request larger than the
        # byte budget still runs (alone) instead of waiting forever.
        return self._requests == 0 or (
            self._requests < MAX_IN_FLIGHT_REQUESTS and self._bytes + cost <= MAX_IN_FLIGHT_BYTES
        )

    async def acquire(self, cost: int) -> None:
        while not self._admits(cost):
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self._requests += 1
        self._bytes += cost

    def release(self, cost: int) -> None:
        self._requests -= 1
        self._bytes -= cost
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class NbdServer:
    """Serves one export of ``backend`` on the unix socket ``socket_path``.

    The caller owns the backend: it must outlive the server and be closed after
    :meth:`close`.  Requests for the default export (empty name) and for
    ``export_name`` reach the same backend.
    """

    def __init__(
        self, backend: Backend, socket_path: Path, export_name: str = DEFAULT_EXPORT_NAME
    ) -> None:
        if not export_name or len(export_name.encode()) > protocol.MAX_NAME or "\0" in export_name:
            raise NbdError(f"invalid export name {export_name!r}")
        self.backend = backend
        self.socket_path = socket_path
        self.export_name = export_name
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    @property
    def transmission_flags(self) -> TransmissionFlag:
        """Flags advertised for the export.

        CAN_MULTI_CONN holds because every connection shares one backend whose
        flush covers writes completed on any connection.
        """
        flags = (
            TransmissionFlag.HAS_FLAGS
            | TransmissionFlag.SEND_FLUSH
            | TransmissionFlag.SEND_FUA
            | TransmissionFlag.CAN_MULTI_CONN
        )
        if self.backend.read_only:
            return flags | TransmissionFlag.READ_ONLY
        return flags | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES

    async def start(self) -> None:
        """Claim the socket path (a live listener is refused) and start accepting clients."""
        if len(os.fsencode(self.socket_path)) > _UNIX_PATH_MAX:
            raise NbdError(f"socket path {self.socket_path} is longer than {_UNIX_PATH_MAX} bytes")
        try:
            claim_socket_path(self.socket_path)
            # Mode 0600 whatever the umask: only the owner (QEMU's user) reaches the disk.
            sock = bind_private_socket(self.socket_path, "NBD socket")
            self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise NbdError(f"cannot listen on {self.socket_path}: {reason}") from exc

    async def __aenter__(self) -> NbdServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop accepting, finish in-flight requests, drop clients and remove the socket."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)
        connection = _Connection(self, next(self._ids), reader, writer)
        await connection.serve()


class _Connection:
    """One client: handshake, then concurrent transmission until DISC or EOF."""

    def __init__(
        self,
        server: NbdServer,
        number: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.backend = server.backend
        self.name = f"nbd connection {number}"
        self.phase = Phase.HANDSHAKE
        self._reader = reader
        self._writer = writer
        self._no_zeroes = False
        self._limit = _InFlightLimit()
        self._requests: set[asyncio.Task[None]] = set()
        self._send_lock = asyncio.Lock()
        self._batch: list[bytes] = []  # whole small replies waiting for _send_batch
        self._performing = 0  # requests inside backend I/O right now
        self._io_idle = asyncio.Event()
        self._io_idle.set()
        # asyncio's default high-water mark (64 KiB) is a single 64 KiB READ
        # reply: it would serialize replies on drain and starve the pipeline.
        writer.transport.set_write_buffer_limits(high=_WRITE_BUFFER_HIGH)

    async def serve(self) -> None:
        log.debug("%s: opened", self.name)
        try:
            await self._speak()
            # Graceful end: in-flight requests finish and reply, then hang up.
            if self._requests:
                await asyncio.gather(*self._requests, return_exceptions=True)
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        except asyncio.CancelledError:
            # Server shutdown: accepted requests finish their backend I/O
            # (never cancelled half-way), then the link is cut hard.
            await self._io_idle.wait()
            self._writer.transport.abort()
            if self._requests:
                await asyncio.gather(*self._requests, return_exceptions=True)
            # Not re-raised: asyncio's stream server callback (3.11) logs a
            # cancelled connection task as an error.  close() awaits us anyway.
        finally:
            self.phase = Phase.CLOSED
            log.debug("%s: closed", self.name)

    async def _speak(self) -> None:
        """Handshake and transmission; returns when the client or the protocol ends them."""
        try:
            if await self._negotiate():
                self.phase = Phase.TRANSMISSION
                await self._transmit()
        except ProtocolViolation as exc:
            log.warning(
                "%s: closing after protocol violation in %s: %s", self.name, self.phase.value, exc
            )
        except asyncio.IncompleteReadError:
            log.debug("%s: client closed the connection in %s", self.name, self.phase.value)
        except ConnectionError as exc:
            log.debug("%s: connection lost: %s", self.name, exc)

    # --- handshake -----------------------------------------------------------

    async def _negotiate(self) -> bool:
        """Run option haggling; True when the client entered transmission."""
        self._writer.write(protocol.encode_greeting(_HANDSHAKE_FLAGS))
        await self._writer.drain()
        raw_flags = await self._reader.readexactly(protocol.CLIENT_FLAGS_SIZE)
        client_flags = protocol.decode_client_flags(raw_flags, _HANDSHAKE_FLAGS)
        self._no_zeroes = bool(client_flags & protocol.ClientFlag.NO_ZEROES)
        while True:
            header = protocol.decode_option_header(
                await self._reader.readexactly(protocol.OPTION_HEADER_SIZE)
            )
            if header.length > protocol.MAX_OPTION_DATA:
                if header.option == Option.EXPORT_NAME:
                    raise ProtocolViolation(f"export name of {header.length} bytes")
                await self._discard(header.length)
                self._reply_option(header.option, OptionReply.ERR_TOO_BIG, b"option too large")
                await self._writer.drain()
                continue
            data = await self._reader.readexactly(header.length)
            entered = self._answer_option(header.option, data)
            await self._writer.drain()
            if entered is not None:
                return entered

    def _answer_option(self, option: int, data: bytes) -> bool | None:
        """Reply to one option; True = transmission begins, False = close, None = continue."""
        if option == Option.EXPORT_NAME:
            # This option cannot fail politely: an unknown name ends the session.
            name = protocol.decode_name(data)
            if not self._is_our_export(name):
                raise ProtocolViolation(f"unknown export {name!r} requested by EXPORT_NAME")
            self._writer.write(
                protocol.encode_export_name_reply(
                    self.backend.size, self.server.transmission_flags, self._no_zeroes
                )
            )
            return True
        if option in (Option.INFO, Option.GO):
            return self._answer_info(option, data)
        if option == Option.LIST:
            if data:
                self._reply_option(option, OptionReply.ERR_INVALID, b"LIST takes no data")
                return None
            export = protocol.encode_rep_server(self.server.export_name)
            self._reply_option(option, OptionReply.SERVER, export)
            self._reply_option(option, OptionReply.ACK)
            return None
        if option == Option.ABORT:
            self._reply_option(option, OptionReply.ACK)
            return False
        # STRUCTURED_REPLY, STARTTLS, meta contexts, extended headers...: the
        # client falls back to simple replies without them.
        self._reply_option(option, OptionReply.ERR_UNSUP, b"option not supported")
        return None

    def _answer_info(self, option: int, data: bytes) -> bool | None:
        try:
            request = protocol.decode_info_request(data)
        except ProtocolViolation as exc:
            self._reply_option(option, OptionReply.ERR_INVALID, str(exc).encode())
            return None
        if not self._is_our_export(request.name):
            message = f"no export named {request.name!r}".encode()
            self._reply_option(option, OptionReply.ERR_UNKNOWN, message)
            return None
        info = protocol.encode_info_export(self.backend.size, self.server.transmission_flags)
        self._reply_option(option, OptionReply.INFO, info)
        # Block sizes are the spec's defaults; sending them unasked is allowed.
        sizes = protocol.encode_info_block_size(
            protocol.MIN_BLOCK_SIZE, protocol.PREFERRED_BLOCK_SIZE, protocol.MAX_PAYLOAD
        )
        self._reply_option(option, OptionReply.INFO, sizes)
        if Info.NAME in request.items:
            canonical = protocol.encode_info_name(self.server.export_name)
            self._reply_option(option, OptionReply.INFO, canonical)
        self._reply_option(option, OptionReply.ACK)
        return True if option == Option.GO else None

    def _is_our_export(self, name: str) -> bool:
        return name in ("", self.server.export_name)

    def _reply_option(self, option: int, reply: OptionReply, data: bytes = b"") -> None:
        self._writer.write(protocol.encode_option_reply(option, reply, data))

    # --- transmission --------------------------------------------------------

    async def _transmit(self) -> None:
        log.debug("%s: transmission", self.name)
        size = self.backend.size
        read_only = self.backend.read_only
        while True:
            request = protocol.decode_request(await self._reader.readexactly(protocol.REQUEST_SIZE))
            if request.command == Command.DISC:
                log.debug("%s: client disconnected", self.name)
                return
            error = protocol.check_request(request, size, read_only)
            carries_payload = request.command == Command.WRITE
            if error != Errno.OK:
                if carries_payload:
                    # Keep the stream in sync: the payload follows regardless.
                    await self._discard(request.length)
                log.debug("%s: %s refused with %s", self.name, request, error.name)
                await self._send_reply(error, request.handle)
                continue
            cost = request.length if request.command in (Command.READ, Command.WRITE) else 0
            await self._limit.acquire(cost)
            try:
                payload = await self._reader.readexactly(request.length) if carries_payload else b""
            except BaseException:
                self._limit.release(cost)
                raise
            task = asyncio.create_task(self._execute(request, payload, cost))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)

    async def _execute(self, request: protocol.Request, payload: bytes, cost: int) -> None:
        data = b""
        self._performing += 1
        self._io_idle.clear()
        try:
            data = await self._perform(request, payload)
            error = Errno.OK
        except OSError as exc:
            error = protocol.errno_to_nbd(exc.errno)
            log.warning("%s: %s failed: %s", self.name, Command(request.command).name, exc)
        except Exception:  # a backend bug must not kill the connection
            error = Errno.EIO
            log.exception("%s: %s failed", self.name, Command(request.command).name)
        finally:
            self._performing -= 1
            if not self._performing:
                self._io_idle.set()
        try:
            await self._send_reply(error, request.handle, data)
        finally:
            self._limit.release(cost)

    async def _perform(self, request: protocol.Request, payload: bytes) -> bytes:
        command = Command(request.command)
        fua = bool(request.flags & CommandFlag.FUA)
        if command is Command.FLUSH:
            await self.backend.flush()
            return b""
        if request.length == 0:  # legal but pointless; nothing to touch
            return b""
        if command is Command.READ:
            return await self.backend.read(request.offset, request.length)
        if command is Command.WRITE:
            await self.backend.write(request.offset, payload, fua=fua)
        elif command is Command.TRIM:
            await self.backend.trim(request.offset, request.length, fua=fua)
        elif command is Command.WRITE_ZEROES:
            may_trim = not request.flags & CommandFlag.NO_HOLE
            await self.backend.write_zeroes(
                request.offset, request.length, may_trim=may_trim, fua=fua
            )
        else:  # check_request admits no other command
            raise OSError(errno.EINVAL, f"command {command.name} not served")
        return b""

    async def _send_reply(self, error: Errno, handle: int, data: bytes = b"") -> None:
        header = protocol.encode_simple_reply(error, handle)
        if len(data) > _JOIN_LIMIT:
            async with self._send_lock:
                self._send_batch()
                if not self._writer.is_closing():
                    self._writer.write(header)
                    self._writer.write(data)
                with contextlib.suppress(ConnectionError):
                    await self._writer.drain()
            return
        # Small replies completing in the same loop iteration leave in one
        # send: a syscall per 4 KiB reply costs more than the reply itself.
        self._batch.append(header + data)
        if len(self._batch) == 1:
            asyncio.get_running_loop().call_soon(self._send_batch)
        # Yield once: the ready queue is FIFO, so the batch send scheduled above
        # (or by an earlier reply) runs first and this reply is in the transport
        # before we return; a graceful close can never drop it.
        await asyncio.sleep(0)
        async with self._send_lock:
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()

    def _send_batch(self) -> None:
        if self._batch and not self._writer.is_closing():
            self._writer.write(b"".join(self._batch))
        self._batch.clear()

    async def _discard(self, length: int) -> None:
        """Read and drop ``length`` bytes in bounded chunks."""
        while length:
            chunk = await self._reader.readexactly(min(length, _DISCARD_CHUNK))
            length -= len(chunk)
