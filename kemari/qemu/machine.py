"""One supervised QEMU process and its QMP connection.

:class:`QemuMachine` starts QEMU from a :class:`~kemari.qemu.cmdline.MachineSpec`,
connects to its QMP socket (QEMU is the server, so the socket path marks the
machine as taken for as long as it lives), tracks its run state
from QMP events, and always reaps the child and removes its socket::

    async with QemuMachine(spec, binary) as machine:
        await machine.execute("cont")
        exit_info = await machine.wait()

Invariants:

* ``run_state`` is updated from an event *before* any subscriber sees that
  event, so a subscriber woken by ``STOP`` reads ``PAUSED``.
* The final state (``EXITED`` or ``FAILED``) is set only after the process is
  reaped, its output drained and every QMP event it sent has been handled.
* QEMU runs in its own session (a terminal's Ctrl-C reaches Kemari, which then
  stops QEMU in order) and is killed by the kernel if Kemari itself dies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import enum
import os
import re
import signal
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError
from qemu.qmp import Runstate as QmpRunstate

from kemari.errors import QemuError
from kemari.qemu.cmdline import MachineSpec, build_argv, inherited_fds
from kemari.sockets import SOCKET_MODE, SOCKET_UMASK, claim_socket_path, create_log
from kemari.tasks import cancel_and_wait

OUTPUT_TAIL_LINES = 200
DEFAULT_START_TIMEOUT_S = 30.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0
_CONNECT_RETRY_S = 0.02
_OUTPUT_CHUNK_BYTES = 4096
_REFUSAL_GRACE_S = 1.0
_FD_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_QMP_EOF_TIMEOUT_S = 2.0
_PR_SET_PDEATHSIG = 1
# Shutdown reasons (QMP SHUTDOWN event) that mean the guest ended itself normally.
_GUEST_SHUTDOWN_REASONS = frozenset({"guest-shutdown", "guest-reset"})


class RunState(enum.Enum):
    """Where a supervised QEMU is in its life."""

    NOT_STARTED = "not-started"
    STARTING = "starting"
    PAUSED = "paused"
    RUNNING = "running"
    SHUTDOWN = "shutdown"  # QEMU announced SHUTDOWN; the process is on its way out
    EXITED = "exited"  # reaped after a requested or guest-initiated exit
    FAILED = "failed"  # refused to start, crashed, was killed, or exited unasked


@dataclasses.dataclass(frozen=True)
class QemuEvent:
    """A QMP event: its name, its data and QEMU's timestamp (seconds since the epoch)."""

    name: str
    data: Mapping[str, Any]
    timestamp: float


@dataclasses.dataclass(frozen=True)
class VmStatus:
    """The answer of ``query-status``: QEMU's run state name and whether vCPUs run."""

    status: str
    running: bool


@dataclasses.dataclass(frozen=True)
class MachineExit:
    """How a QEMU process ended."""

    returncode: int
    requested: bool  # Kemari asked it to stop
    shutdown_reason: str | None  # from the last SHUTDOWN event, if any
    output_tail: tuple[str, ...]

    @property
    def clean(self) -> bool:
        """True when QEMU exited 0 because Kemari or the guest asked it to."""
        ended_by_guest = self.shutdown_reason in _GUEST_SHUTDOWN_REASONS
        return self.returncode == 0 and (self.requested or ended_by_guest)

    def describe(self) -> str:
        """One line: how it ended, then QEMU's last output lines."""
        if self.returncode < 0:
            how = f"killed by {_signal_name(-self.returncode)}"
        else:
            how = f"exit status {self.returncode}"
        if self.shutdown_reason is not None:
            how += f", shutdown reason {self.shutdown_reason}"
        output = " | ".join(line for line in self.output_tail[-5:] if line)
        return f"QEMU {how}" + (f": {output}" if output else "")


class QmpCommandError(QemuError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


class EventSubscription:
    """Events of one subscriber, in order; iteration ends when QEMU exits.

    Use through :meth:`QemuMachine.subscribe` (a ``with`` block), then
    ``async for event in subscription`` or ``await subscription.get()``.
    """

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self._queue: asyncio.Queue[QemuEvent | None] = asyncio.Queue()
        self._closed = False

    def _offer(self, event: QemuEvent) -> None:
        if not self.names or event.name in self.names:
            self._queue.put_nowait(event)

    def _close(self) -> None:
        self._queue.put_nowait(None)

    def take_pending(self) -> list[QemuEvent]:
        """The events queued so far, without waiting (none once QEMU has exited)."""
        taken: list[QemuEvent] = []
        while not self._closed and not self._queue.empty():
            event = self._queue.get_nowait()
            if event is None:
                self._closed = True
            else:
                taken.append(event)
        return taken

    async def get(self) -> QemuEvent:
        """The next event; raises :class:`QemuError` once QEMU has exited and all are read."""
        if self._closed:
            raise QemuError("QEMU has exited; no more events")
        event = await self._queue.get()
        if event is None:
            self._closed = True
            raise QemuError("QEMU has exited; no more events")
        return event

    def __aiter__(self) -> AsyncIterator[QemuEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[QemuEvent]:
        while not self._closed:
            event = await self._queue.get()
            if event is None:
                self._closed = True
                return
            yield event


class QemuMachine:
    """A QEMU child process under Kemari's control (async context manager)."""

    def __init__(
        self,
        spec: MachineSpec,
        binary: Path,
        *,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    ) -> None:
        self.spec = spec
        self.binary = binary
        self.argv = [str(binary), *build_argv(spec)]
        self.start_timeout_s = start_timeout_s
        self.run_state = RunState.NOT_STARTED
        self._process: asyncio.subprocess.Process | None = None
        self._qmp = QMPClient(spec.name)
        self._output: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
        self._output_task: asyncio.Task[None] | None = None
        self._event_task: asyncio.Task[None] | None = None
        self._reaper_task: asyncio.Task[MachineExit] | None = None
        self._subscriptions: list[EventSubscription] = []
        self._stop_requested = False
        self._shutdown_reason: str | None = None
        # Set once start() stopped touching the QMP client (connected or not);
        # the reaper waits for it, so connect and disconnect never overlap.
        self._qmp_settled = asyncio.Event()
        self._fd_lock = asyncio.Lock()

    # -- life cycle ------------------------------------------------------------

    async def __aenter__(self) -> QemuMachine:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.shutdown()

    @property
    def pid(self) -> int | None:
        """The QEMU process id once started."""
        return self._process.pid if self._process is not None else None

    def output_tail(self) -> list[str]:
        """QEMU's last stdout/stderr lines (bounded to :data:`OUTPUT_TAIL_LINES`)."""
        return list(self._output)

    async def start(self) -> None:
        """Start QEMU and connect QMP; on any failure nothing is left behind."""
        if self.run_state is not RunState.NOT_STARTED:
            raise QemuError(f"machine {self.spec.name} was already started")
        if not os.access(self.binary, os.X_OK):
            raise QemuError(f"QEMU binary {self.binary} is missing or not executable")
        pass_fds = inherited_fds(self.spec)
        for fd in pass_fds:
            _check_inheritable_socket(fd)
        # Refuses (ConfigError) when a live process listens on the path; removes a stale socket.
        claim_socket_path(self.spec.qmp_socket)
        if self.spec.serial_log is not None:
            try:  # QEMU opens it; made here so it is 0640 whatever the umask
                create_log(self.spec.serial_log)
            except OSError as exc:
                raise QemuError(f"cannot create serial log {self.spec.serial_log}: {exc}") from exc
        self.run_state = RunState.STARTING
        try:
            # pass_fds: the NICs' stream sockets keep their numbers in QEMU, which the
            # argv names (addr.str); every other descriptor is closed in the child.
            self._process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
                pass_fds=pass_fds,
            )
        except OSError as exc:
            self.run_state = RunState.FAILED
            raise QemuError(f"cannot execute {self.binary}: {exc.strerror}") from exc
        self._output_task = asyncio.create_task(self._collect_output(self._process))
        self._reaper_task = asyncio.create_task(self._reap(self._process))
        try:
            try:
                await self._connect_qmp(self._process)
                # QEMU bound it under umask 0177 (_die_with_parent); say the mode explicitly.
                os.chmod(self.spec.qmp_socket, SOCKET_MODE)
                self._event_task = asyncio.create_task(self._watch_events())
            finally:
                self._qmp_settled.set()
            status = await self.query_status()
        except BaseException as exc:
            # A QEMU refusing its command line may already have broken the QMP
            # handshake while still exiting: give it a moment to say so itself.
            exited_by_itself = await _exits_within(self._process, _REFUSAL_GRACE_S)
            await self._abort_start()
            if exited_by_itself:
                exit_info = self._reaper_task.result()
                raise QemuError(f"QEMU refused to start: {exit_info.describe()}") from exc
            raise
        # Events handled meanwhile are newer than the answer only if the state moved on.
        if self.run_state is RunState.STARTING:
            self.run_state = RunState.RUNNING if status.running else RunState.PAUSED

    async def _connect_qmp(self, process: asyncio.subprocess.Process) -> None:
        """Connect to QEMU's QMP server, retrying until the socket listens or QEMU exits."""
        deadline = time.monotonic() + self.start_timeout_s
        path = str(self.spec.qmp_socket)
        loop = asyncio.get_running_loop()
        while True:
            if process.returncode is not None:
                raise QemuError("QEMU exited during start-up")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            except OSError as exc:
                sock.close()
                raise QemuError(f"cannot connect to QMP socket {path}: {exc}") from exc
            if time.monotonic() > deadline:
                raise QemuError(
                    f"QEMU did not open its QMP socket {path} within {self.start_timeout_s:g} s"
                )
            await asyncio.sleep(_CONNECT_RETRY_S)
        try:
            # QMPClient owns the socket from here on and closes it on disconnect.
            await self._qmp.connect(sock)
        except ConnectError as exc:
            raise QemuError(f"QMP handshake on {path} failed: {exc}") from exc

    async def _abort_start(self) -> None:
        """Undo a half-done start: kill QEMU, reap it, drop QMP and the socket."""
        self._stop_requested = True
        self._signal(signal.SIGKILL)
        await self._finish()
        self.run_state = RunState.FAILED

    async def wait(self) -> MachineExit:
        """Wait until QEMU has exited and been reaped; says how it ended."""
        if self._reaper_task is None:
            raise QemuError(f"machine {self.spec.name} was never started")
        return await asyncio.shield(self._reaper_task)

    async def shutdown(self, timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> MachineExit | None:
        """Stop QEMU: QMP ``quit``, then SIGTERM, then SIGKILL, each given ``timeout_s``.

        Always reaps the child and removes the QMP socket; safe to call twice.
        Returns how QEMU ended (None when it was never started).
        """
        if self._reaper_task is None:
            return None
        if not self._reaper_task.done():
            self._stop_requested = True
            # A hung QEMU (e.g. deadlocked) never answers: go on to the signals.
            with contextlib.suppress(QemuError, TimeoutError):
                await asyncio.wait_for(self.execute("quit"), timeout_s)
            for next_signal in (signal.SIGTERM, signal.SIGKILL):
                if await self._exited_within(timeout_s):
                    break
                self._signal(next_signal)
        return await self._finish()

    async def close(self) -> None:
        """Same as :meth:`shutdown` with the default timeout (for ``AsyncExitStack``)."""
        await self.shutdown()

    async def _exited_within(self, timeout_s: float) -> bool:
        assert self._reaper_task is not None
        done, _ = await asyncio.wait({self._reaper_task}, timeout=timeout_s)
        return bool(done)

    def _signal(self, signum: signal.Signals) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    async def _finish(self) -> MachineExit:
        """After QEMU was told to go: wait for the reaper, then release every resource."""
        assert self._reaper_task is not None
        exit_info = await asyncio.shield(self._reaper_task)
        for task in (self._event_task, self._output_task):
            if task is not None and not task.done():
                await cancel_and_wait(task)
        _remove_socket(self.spec.qmp_socket)
        return exit_info

    # -- background tasks ------------------------------------------------------

    async def _collect_output(self, process: asyncio.subprocess.Process) -> None:
        """Keep QEMU's last output lines; a runaway line is cut, never buffered whole."""
        assert process.stdout is not None
        pending = b""
        while chunk := await process.stdout.read(_OUTPUT_CHUNK_BYTES):
            *lines, pending = (pending + chunk).split(b"\n")
            self._output.extend(line.decode(errors="replace") for line in lines)
            pending = pending[:_OUTPUT_CHUNK_BYTES]
        if pending:
            self._output.append(pending.decode(errors="replace"))

    async def _reap(self, process: asyncio.subprocess.Process) -> MachineExit:
        """Wait for the process, then settle output, QMP events and the final state."""
        returncode = await process.wait()
        if self._output_task is not None:
            # QEMU's output ends when it exits (nothing else holds the pipe).
            with contextlib.suppress(asyncio.CancelledError):
                await self._output_task
        await self._qmp_settled.wait()
        await self._drain_qmp()
        exit_info = MachineExit(
            returncode=returncode,
            requested=self._stop_requested,
            shutdown_reason=self._shutdown_reason,
            output_tail=tuple(self._output),
        )
        self.run_state = RunState.EXITED if exit_info.clean else RunState.FAILED
        for subscription in self._subscriptions:
            subscription._close()
        return exit_info

    async def _drain_qmp(self) -> None:
        """Handle every event QEMU sent before it died, then disconnect QMP."""
        # The peer is gone, so the reader sees EOF and leaves RUNNING on its own;
        # waiting for that (instead of disconnecting at once) keeps buffered events.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_QMP_EOF_TIMEOUT_S):
                while self._qmp.runstate is QmpRunstate.RUNNING:
                    await self._qmp.runstate_changed()
        if self._event_task is not None:
            await cancel_and_wait(self._event_task)
        # The watcher handles each event synchronously after its one await, so
        # cancelling it lost nothing; the rest are still queued in the listener.
        while not self._qmp.events.empty():
            self._handle_event(await self._qmp.events.get())
        if self._qmp.runstate is not QmpRunstate.IDLE:
            with contextlib.suppress(QMPError, OSError, EOFError):
                await self._qmp.disconnect()

    async def _watch_events(self) -> None:
        async for message in self._qmp.events:
            self._handle_event(message)

    def _handle_event(self, message: Mapping[str, Any]) -> None:
        event = _event_from_message(message)
        if event.name == "STOP":
            self._set_live_state(RunState.PAUSED)
        elif event.name == "RESUME":
            self._set_live_state(RunState.RUNNING)
        elif event.name == "SHUTDOWN":
            reason = event.data.get("reason")
            self._shutdown_reason = reason if isinstance(reason, str) else "unknown"
            self._set_live_state(RunState.SHUTDOWN)
        for subscription in self._subscriptions:
            subscription._offer(event)

    def _set_live_state(self, state: RunState) -> None:
        # A SHUTDOWN is final for a live process; EXITED/FAILED are set by the reaper only.
        if self.run_state not in (RunState.SHUTDOWN, RunState.EXITED, RunState.FAILED):
            self.run_state = state

    # -- QMP -------------------------------------------------------------------

    @contextlib.contextmanager
    def subscribe(self, *names: str) -> Iterator[EventSubscription]:
        """``with machine.subscribe("STOP", "RESUME") as events:`` (no names: every event).

        Only events handled while the block is open are delivered.
        """
        subscription = EventSubscription(frozenset(names))
        if self._reaper_task is not None and self._reaper_task.done():
            subscription._close()
        self._subscriptions.append(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.remove(subscription)

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run a QMP command and return its ``return`` value.

        Raises :class:`QmpCommandError` when QEMU answers with an error and
        :class:`QemuError` when there is no live QMP connection.
        """
        try:
            return await self._qmp.execute(command, arguments)
        except ExecuteError as exc:
            raise QmpCommandError(command, exc.error_class, str(exc)) from exc
        except ExecInterruptedError as exc:
            raise QemuError(f"QMP {command}: connection to QEMU lost") from exc
        except QMPError as exc:
            raise QemuError(f"QMP {command}: {exc}") from exc

    async def pass_fd(self, name: str, fd: int) -> None:
        """Give QEMU a duplicate of ``fd`` under ``name`` (QMP ``getfd``), e.g. for ``fd:NAME``.

        ``fd`` stays open here; the caller closes its own copy.
        """
        if not _FD_NAME_RE.match(name):
            raise QemuError(f"fd name {name!r} must be a letter or '_' then letters, digits, '_-'")
        # QEMU pairs a received descriptor with the next getfd; the lock keeps
        # two concurrent pass_fd calls from swapping descriptors.
        async with self._fd_lock:
            try:
                self._qmp.send_fd_scm(fd)
            except (QMPError, OSError) as exc:
                raise QemuError(f"cannot pass fd {fd} to QEMU: {exc}") from exc
            await self.execute("getfd", {"fdname": name})

    async def query_status(self) -> VmStatus:
        """QEMU's own run state (``running``, ``paused``, ``prelaunch``, ``inmigrate``, ...)."""
        reply = await self.execute("query-status")
        if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
            raise QemuError(f"QMP query-status: unexpected answer {reply!r}")
        return VmStatus(status=reply["status"], running=bool(reply.get("running")))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _event_from_message(message: Mapping[str, Any]) -> QemuEvent:
    """A typed event from a QMP message; odd fields degrade to defaults, never raise."""
    data = message.get("data")
    stamp = message.get("timestamp")
    timestamp = 0.0
    if isinstance(stamp, dict):
        seconds, micros = stamp.get("seconds"), stamp.get("microseconds")
        if isinstance(seconds, int) and isinstance(micros, int):
            timestamp = seconds + micros / 1e6
    return QemuEvent(
        name=str(message.get("event")),
        data=data if isinstance(data, dict) else {},
        timestamp=timestamp,
    )


async def _exits_within(process: asyncio.subprocess.Process, timeout_s: float) -> bool:
    """True when ``process`` has exited or does so within ``timeout_s``."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(process.wait()), timeout_s)
    return process.returncode is not None


def _check_inheritable_socket(fd: int) -> None:
    """Raise :class:`QemuError` unless ``fd`` is an open socket of this process."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise QemuError(f"NIC stream descriptor {fd} is not open: {exc.strerror}") from exc
    if not stat.S_ISSOCK(mode):
        raise QemuError(f"NIC stream descriptor {fd} is not a socket")


def _remove_socket(path: Path) -> None:
    """Remove ``path`` if it is a socket (never a user's regular file)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the kernel SIGKILL the child when Kemari dies, and
    sets the child's umask to 0177 (QEMU's QMP socket is then 0600).

    libc is loaded here, in the parent, so the child only makes two system calls.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        # What QEMU creates (its QMP socket) is the owner's only, whatever our umask.
        os.umask(SOCKET_UMASK)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died between fork and prctl; then nobody would kill us.
        if os.getppid() != parent_pid:
            os._exit(1)

    return arm
