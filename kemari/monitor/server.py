"""The agent side of the monitor: a unix-socket server dispatching commands to handlers.

Handlers are registered by the words they answer to (``("info", "status")``);
the longest registered prefix of a request wins and receives the remaining
words as arguments.  A handler raising :class:`KemariError` becomes an error
reply; the connection and the server keep serving.

The agent registers through :meth:`MonitorServer.register_api`: each command of
the typed API (kemari.monitor.api) is parsed from its words at this edge, answered
with a typed reply, and sent as its plain JSON plus the text kemari.monitor.render
makes of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from kemari.errors import KemariError, MonitorError
from kemari.monitor import api, protocol, render
from kemari.sockets import bind_private_socket, check_socket_path, claim_socket_path

Handler = Callable[[list[str]], Awaitable[protocol.Reply]]
ApiHandler = Callable[[api.Command], Awaitable[api.Reply]]
log = logging.getLogger(__name__)


class MonitorServer:
    """Serves the Kemari monitor on a unix socket until :meth:`close`."""

    def __init__(self, path: Path) -> None:
        # Checked here, when the path is taken, so a bad one is refused before anything
        # (runtime directory, QEMU, listeners) has been set up.
        check_socket_path(path, "monitor socket path")
        self.path = path
        self._handlers: dict[tuple[str, ...], tuple[Handler, str]] = {}
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.register(("help",), self._help, "list monitor commands")

    def register(self, words: tuple[str, ...], handler: Handler, summary: str) -> None:
        """Make ``handler`` answer requests starting with ``words``."""
        self._handlers[words] = (handler, summary)

    def register_api(self, handle: ApiHandler) -> None:
        """Answer every command of the typed API (but ``help``, answered here) with ``handle``."""
        for spec in api.COMMANDS:
            if spec.words != ("help",):
                self.register(spec.words, self._typed(spec.words, handle), spec.summary)

    @staticmethod
    def _typed(words: tuple[str, ...], handle: ApiHandler) -> Handler:
        async def run(args: list[str]) -> protocol.Reply:
            command = api.parse_command([*words, *args])
            reply = await handle(command)
            return protocol.Reply(data=api.to_plain(reply), text=render.text(command, reply))

        return run

    async def start(self) -> None:
        """Claim the socket path (refusing a live one) and start listening."""
        claim_socket_path(self.path)
        # Mode 0600 whatever the umask: the monitor can quit the VM and fail it over.
        sock = bind_private_socket(self.path, "monitor socket")
        self._server = await asyncio.start_unix_server(self._serve_client, sock=sock)

    async def close(self) -> None:
        """Stop listening, end client connections and remove the socket file."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._clients):
            task.cancel()
        for task in list(self._clients):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def dispatch(self, words: list[str]) -> protocol.Reply:
        """Run the handler registered for the longest prefix of ``words``."""
        for length in range(len(words), 0, -1):
            entry = self._handlers.get(tuple(words[:length]))
            if entry is not None:
                return await entry[0](words[length:])
        raise MonitorError(f"unknown command {' '.join(words)!r} (try 'help')")

    async def _help(self, args: list[str]) -> protocol.Reply:
        del args
        rows = sorted((" ".join(words), summary) for words, (_, summary) in self._handlers.items())
        reply = api.HelpReply(dict(rows))
        return protocol.Reply(data=reply.commands, text=render.text(api.Help(), reply))

    def _track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._track()
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    writer.write(protocol.encode_error("MonitorError", "request line too long"))
                    await writer.drain()
                    return
                writer.write(await self._answer(line))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> bytes:
        try:
            words = protocol.decode_request(line)
            return protocol.encode_reply(await self.dispatch(words))
        except KemariError as exc:
            return protocol.encode_error(type(exc).__name__, str(exc))
        except Exception as exc:  # a handler bug must not kill the monitor
            log.exception("monitor command failed")
            return protocol.encode_error("InternalError", f"{type(exc).__name__}: {exc}")
