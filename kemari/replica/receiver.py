"""The standby's network half: ft-transactions in, a committed replica out.

:class:`StandbyReceiver` listens on ``kemari:tcp:HOST:PORT``, accepts one primary at a
time (a second one is refused BUSY), and feeds each validated transaction step into a
:class:`~kemari.replica.applier.ReplicaApplier`.

Ordering: COMMIT_ACK of epoch *n* is sent only after the applier committed *n* (its
journal holds it, so a crash of this process keeps *n*); copying the pages into the RAM
files happens after the acknowledgement, while the primary's guest already runs.

The guest outputs of a transaction (OUTPUT frames) are kept with the replica by an
:class:`~kemari.replica.outputstore.OutputStore`: staged before the replica commits the
epoch, the older epochs' removed after, so a failover finds the outputs of exactly the
epoch it resumes from (:meth:`StandbyReceiver.committed_outputs`).

A primary that disconnects, says goodbye or breaks the protocol loses only its open
transaction: the replica stays at the last committed epoch and the receiver waits for
the next primary.  It never takes over by itself (failover is the operator's, or a
later issue's failure detector's, decision).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from kemari.errors import KemariError, ReplicaError, TransactionError
from kemari.outputs import Output
from kemari.replica.applier import ReplicaApplier
from kemari.replica.disks import StandbyDisks
from kemari.replica.outputstore import OutputStore
from kemari.stream import Configuration, RamBlock, RamBlockList
from kemari.stream.format import PAGE_SIZE
from kemari.tasks import cancel_and_wait
from kemari.transaction.session import (
    Committed,
    Discarded,
    Identity,
    SessionEnded,
    StandbySession,
    refuse_busy,
)
from kemari.transaction.transport import Listener, Transport
from kemari.transaction.wire import (
    Begin,
    DeviceState,
    Outputs,
    RamBlocks,
    RamPages,
    VmDescription,
)

HANDSHAKE_TIMEOUT_S = 10.0
OUTPUTS_DIRECTORY = "outputs"
log = logging.getLogger(__name__)


class StandbyReceiver:
    """Receives one primary at a time into ``applier`` until :meth:`close`."""

    def __init__(
        self,
        uri: str,
        identity: Identity,
        applier: ReplicaApplier,
        disks: StandbyDisks | None = None,
    ) -> None:
        self.listener = Listener(uri)
        # The guest's disks on this host (docs/storage.md): committed disk records go there.
        self.disks = disks
        self.identity = identity
        self.applier = applier
        self.peer: str | None = None
        self.sessions = 0
        self.last_error = ""
        self.last_frame_at: float | None = None
        self._session: StandbySession | None = None
        self._task: asyncio.Task[None] | None = None
        self._block_names: tuple[str, ...] = ()
        self._device_state: list[bytes] = []
        self._vmdesc = b""
        self.outputs = OutputStore(applier.root / OUTPUTS_DIRECTORY)
        self._open_outputs: list[Output] = []
        self.outputs_committed = 0  # guest outputs of committed transactions (all sessions)

    def committed_outputs(self) -> tuple[Output, ...]:
        """The guest outputs of the replica's committed epoch (for failover to release)."""
        epoch = self.applier.committed_epoch
        return () if epoch is None else self.outputs.load(epoch)

    async def start(self) -> None:
        """Listen and serve primaries in the background."""
        await self.listener.start()
        self._task = asyncio.create_task(self._serve(), name="standby-receiver")

    async def close(self) -> None:
        """Stop listening, drop the primary (its open transaction is discarded)."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        await self.listener.close()
        self.applier.abort("the standby receiver stopped")

    def status(self) -> dict[str, Any]:
        """Plain-data status for ``info status``."""
        applied = self.applier.recent()
        last = applied[-1] if applied else None
        return {
            "listening": str(self.listener.bound) if self._task is not None else None,
            "primary": self.peer,
            "sessions": self.sessions,
            "last_error": self.last_error,
            "epoch": self.applier.committed_epoch,
            "applier": self.applier.state.value,
            "last_checkpoint_age_s": None
            if last is None
            else round(time.time() - last.committed_at, 3),
            "last_checkpoint_pages": None if last is None else last.pages,
            "outputs_committed": self.outputs_committed,
            "disks": [] if self.disks is None else self.disks.status(),
            "last_frame_age_s": None
            if self.last_frame_at is None
            else round(time.monotonic() - self.last_frame_at, 3),
        }

    async def _serve(self) -> None:
        """Accept forever: one primary is served, any other is refused BUSY meanwhile."""
        helpers: set[asyncio.Task[None]] = set()
        current: asyncio.Task[None] | None = None
        try:
            while True:
                transport = await self.listener.accept()
                if current is not None and not current.done():
                    task = asyncio.create_task(self._refuse(transport))
                    helpers.add(task)
                    task.add_done_callback(helpers.discard)
                    continue
                current = asyncio.create_task(self._serve_primary(transport))
        finally:
            for task in [*helpers, *([current] if current is not None else [])]:
                await cancel_and_wait(task)

    async def _refuse(self, transport: Transport) -> None:
        with contextlib.suppress(KemariError, OSError):
            await refuse_busy(transport, f"already serving {self.peer}", HANDSHAKE_TIMEOUT_S)

    async def _serve_primary(self, transport: Transport) -> None:
        try:
            session = await StandbySession.handshake(transport, self.identity, HANDSHAKE_TIMEOUT_S)
        except (KemariError, OSError) as exc:
            self.last_error = f"handshake with {transport.peer}: {exc}"
            log.warning("%s", self.last_error)
            await transport.close()
            return
        self._session, self.peer = session, transport.peer
        self.sessions += 1
        log.info("primary %s connected", transport.peer)
        try:
            await self._receive(session)
        except (KemariError, OSError) as exc:
            # The open transaction, if any, is discarded; the committed replica stays.
            self.last_error = f"primary {transport.peer}: {exc}"
            log.warning(
                "%s; replica stays at epoch %s", self.last_error, self.applier.committed_epoch
            )
            self.applier.abort(str(exc))
        finally:
            self._session = None
            await session.close("standby closing the session")

    async def _receive(self, session: StandbySession) -> None:
        while True:
            event = await session.receive()
            self.last_frame_at = time.monotonic()
            match event:
                case Begin(epoch=epoch):
                    self._device_state.clear()
                    self._open_outputs.clear()
                    self._vmdesc = b""
                    if epoch != 0:
                        self.applier.begin_checkpoint(epoch)
                case RamBlocks():
                    self._start_sync(event)
                case RamPages():
                    self._put_pages(event)
                case DeviceState(data=data):
                    self._device_state.append(bytes(data))
                case VmDescription(data=data):
                    self._vmdesc = bytes(data)
                case Outputs(outputs=outputs):
                    self._open_outputs.extend(outputs)
                case Committed():
                    await self._commit(session, event)
                case Discarded(epoch=epoch, reason=reason):
                    log.info("transaction %d discarded: %s", epoch, reason)
                    self.applier.abort(reason)
                case SessionEnded(message=message):
                    log.info("primary %s ended the session: %s", self.peer, message)
                    self.applier.abort(f"session ended: {message}")
                    return

    def _start_sync(self, blocks: RamBlocks) -> None:
        configuration = Configuration(machine_type=blocks.machine_type)
        block_list = RamBlockList(
            section_id=blocks.ram_section_id,
            blocks=tuple(RamBlock(b.name, b.size, b.gpa) for b in blocks.blocks),
        )
        self.applier.start_sync(configuration, block_list)
        if self.disks is not None:
            self.disks.new_session()
        self._block_names = tuple(block.name for block in blocks.blocks)

    def _put_pages(self, pages: RamPages) -> None:
        try:
            name = self._block_names[pages.block_index]
        except IndexError as exc:  # the session's tracker checked it; be explicit anyway
            raise TransactionError(f"RAM_PAGES of unknown block {pages.block_index}") from exc
        # Zero pages before data pages: the order RAM_PAGES defines for one frame.
        for page in pages.zero_pages:
            self.applier.put_zero(name, page * PAGE_SIZE)
        for n, page in enumerate(pages.data_pages):
            self.applier.put_page(name, page * PAGE_SIZE, pages.page(n))

    async def _commit(self, session: StandbySession, committed: Committed) -> None:
        device_state = b"".join(self._device_state)
        # Ordering: the outputs are kept before the replica commits the epoch, the older
        # epochs' are removed only after (kemari.replica.outputstore).
        self.outputs.stage(committed.epoch, self._open_outputs)
        if self.disks is not None:
            # Before the acknowledgement: replicated storage has the epoch on its image.
            await self.disks.committed_outputs(committed.epoch, self._open_outputs)
        if committed.epoch == 0:
            if not self._vmdesc:
                raise ReplicaError("the initial sync ended without a VM description")
            self.applier.finish_sync(device_state, self._vmdesc)
            await session.acknowledge(committed)
            self.outputs.committed(0)
            self.outputs_committed += committed.outputs
            return
        self.applier.set_device_state(committed.epoch, device_state)
        # The journal holds the epoch now (commit point): acknowledge, then copy pages.
        self.applier.commit_checkpoint(committed.epoch, defer_apply=True)
        await session.acknowledge(committed)
        self.outputs.committed(committed.epoch)
        self.outputs_committed += committed.outputs
        self.applier.apply_pending()
