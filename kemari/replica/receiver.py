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

Admission (docs/security.md): with ``tls`` only a primary with a certificate of the
pair gets past the listener; the session slot is taken only after the handshake
(HELLO, HELLO_ACK, CONFIRM), so an idle or silent connection never makes the real
primary BUSY; a session of the replica's run must start after the replica's run epoch,
a new run replaces the replica only over TLS, and each replacement is logged with both
runs and epochs.  ``max_ram_bytes`` bounds the RAM_BLOCKS a primary may announce.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kemari import crashpoint
from kemari.config import TlsCreds
from kemari.errors import KemariError, ReplicaError, TransactionError
from kemari.outputs import Output
from kemari.replica.applier import ReplicaApplier
from kemari.replica.disks import StandbyDisks
from kemari.replica.health import ReplicaHealthError, StandbyHealth, storage
from kemari.replica.outputstore import OutputStore
from kemari.stream import Configuration, RamBlock, RamBlockList
from kemari.tasks import cancel_and_wait
from kemari.transaction.session import (
    IDLE_TIMEOUT_S,
    Committed,
    Discarded,
    Identity,
    RunState,
    SessionEnded,
    StandbySession,
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
# Test hook (kemari/crashpoint.py): every COMMIT_ACK after the initial sync leaves this
# many ms late, as over a long link, so checkpoints pile up in flight on the active.
ACK_DELAY_MS = "ack-delay-ms"
OUTPUTS_DIRECTORY = "outputs"
# RAM_BLOCKS may announce the configured memory plus this much (firmware, option ROMs,
# ACPI tables, video RAM); anything beyond is refused before a byte is reserved.
RAM_SLACK_BYTES = 64 << 20
# A standby that cannot keep its replica says GOODBYE with the reason and reads what the
# primary still sends for up to this long, so the primary learns the reason.
HEALTH_LINGER_S = 5.0
log = logging.getLogger(__name__)


class StandbyReceiver:
    """Receives one primary at a time into ``applier`` until :meth:`close`."""

    def __init__(
        self,
        uri: str,
        identity: Identity,
        applier: ReplicaApplier,
        disks: StandbyDisks | None = None,
        *,
        tls: TlsCreds | None = None,
        max_ram_bytes: int | None = None,
        idle_timeout: float = IDLE_TIMEOUT_S,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    ) -> None:
        self.listener = Listener(uri, tls=tls, handshake_timeout=handshake_timeout)
        self.tls = tls
        self.max_ram_bytes = max_ram_bytes
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        # The run and run epoch of the committed replica (None: nothing committed yet).
        self.replica_run: RunState | None = None
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
        # Whether this standby can still keep its replica (kemari.replica.health).
        self.health = StandbyHealth()

    @property
    def connected(self) -> bool:
        """A primary's session is open (handshake done, not ended)."""
        return self._session is not None

    def committed_outputs(self) -> tuple[Output, ...]:
        """The guest outputs of the replica's committed epoch (for failover to release)."""
        epoch = self.applier.committed_epoch
        return () if epoch is None else self.outputs.load(epoch)

    async def start(self) -> None:
        """Listen and serve primaries in the background."""
        await self.listener.start()
        if self.tls is None:
            log.warning(
                "standby %s: replication channel is plain TCP (no tls_creds): anyone who "
                "can reach %s can replace the replica",
                self.identity.vm_name,
                self.listener.bound,
            )
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
            "tls": self.tls is not None,
            "primary": self.peer,
            "refused_peers": self.listener.refused,
            "last_refusal": self.listener.last_refusal,
            "run": None if self.replica_run is None else self.replica_run.run_id.hex(),
            "run_epoch": None if self.replica_run is None else self.replica_run.committed,
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
            "health": self.health.state,
            "health_reason": self.health.reason,
        }

    async def _serve(self) -> None:
        """Accept forever; each connection shakes hands on its own, and only one that
        completed the handshake takes the session slot (others are refused BUSY)."""
        helpers: set[asyncio.Task[None]] = set()
        try:
            while True:
                transport = await self.listener.accept()
                task = asyncio.create_task(self._serve_primary(transport))
                helpers.add(task)
                task.add_done_callback(helpers.discard)
        finally:
            for task in list(helpers):
                await cancel_and_wait(task)

    def _busy(self) -> str | None:
        return None if self._session is None else f"already serving {self.peer}"

    async def _serve_primary(self, transport: Transport) -> None:
        try:
            session = await StandbySession.handshake(
                transport,
                self.identity,
                self.handshake_timeout,
                replica=self.replica_run,
                idle_timeout=self.idle_timeout,
                busy=self._busy,
            )
        except (KemariError, OSError) as exc:
            self.listener.refuse(transport.peer, f"handshake: {exc}")
            self.last_error = f"handshake with {transport.peer}: {exc}"
            await transport.close()
            return
        if self._session is not None:  # another primary completed its handshake first
            self.listener.refuse(transport.peer, f"busy: already serving {self.peer}")
            await session.close(f"standby busy: already serving {self.peer}")
            return
        self._session, self.peer = session, transport.peer
        self.sessions += 1
        log.info(
            "primary %s connected (%s, run %s from run epoch %d)",
            transport.peer,
            "TLS, authenticated" if transport.tls else "plain TCP, NOT authenticated",
            session.run_id.hex()[:12],
            session.run_epoch(0),
        )
        goodbye, linger = "standby closing the session", 0.0
        try:
            await self._receive(session)
        except ReplicaHealthError as exc:
            # This standby cannot keep its replica: end the session with the reason (the
            # primary drops protection and says why); the committed replica stays.
            self.last_error = f"cannot keep the replica: {exc}"
            self.applier.abort(str(exc))
            self.health.fail(str(exc), self.applier.committed_epoch)
            goodbye, linger = f"standby cannot keep its replica: {exc}", HEALTH_LINGER_S
        except (KemariError, OSError) as exc:
            # The open transaction, if any, is discarded; the committed replica stays.
            self.last_error = f"primary {transport.peer}: {exc}"
            log.warning(
                "session with primary lost: %s; replica stays at epoch %s",
                self.last_error,
                self.applier.committed_epoch,
            )
            self.applier.abort(str(exc))
        finally:
            self._session = None
            await session.close(goodbye[:1000], linger=linger)

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
                    self._check_ram_blocks(event)
                    await self._reset_images()
                    with storage("starting the initial sync"):
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
                    log.warning(
                        "session with primary %s ended by the primary: %s; replica stays at "
                        "epoch %s",
                        self.peer,
                        message,
                        self.applier.committed_epoch,
                    )
                    self.applier.abort(f"session ended: {message}")
                    return

    def _check_ram_blocks(self, blocks: RamBlocks) -> None:
        if self.max_ram_bytes is None:
            return
        total = sum(block.size for block in blocks.blocks)
        limit = self.max_ram_bytes + RAM_SLACK_BYTES
        if total > limit:
            raise ReplicaError(
                f"RAM_BLOCKS announce {total} bytes of RAM ({len(blocks.blocks)} blocks), "
                f"more than the configured memory allows ({limit} bytes with firmware)"
            )

    def _replaced(self, session: StandbySession) -> None:
        """Epoch 0 of ``session`` is the replica now: log what it replaced."""
        old = self.replica_run
        new = RunState(session.run_id, session.run_epoch(0))
        if old is None or old.committed is None:
            log.info("replica: %s from primary %s (nothing replaced)", str(new), self.peer)
        else:
            log.warning(
                "replica replaced: %s -> %s from primary %s (%s)",
                str(old),  # formatted now: both are updated by later commits
                str(new),
                self.peer,
                "same run" if old.run_id == new.run_id else "NEW RUN, authenticated by TLS",
            )
        self.replica_run = new

    async def _reset_images(self) -> None:
        """A new initial sync: the images are opened again from their paths (an operator
        may have restored one); one that is missing ends the session (health)."""
        if self.disks is None:
            return
        with storage("reopening the standby's disk images"):
            await self.disks.reopen()
        self._check_images()

    def _check_images(self) -> None:
        problem = None if self.disks is None else self.disks.check_images()
        if problem is not None:
            raise ReplicaHealthError(problem)

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
        # Zero pages before data pages: the order RAM_PAGES defines for one frame.  The
        # data is a view of the frame's own receive buffer (a fresh bytearray nobody
        # writes again, kemari.transaction.wire.FrameDecoder) or decompressed bytes: the
        # replica keeps it without a copy.
        self.applier.put_pages(name, pages.zero_pages, pages.data_pages, pages.data, owned=True)

    async def _commit(self, session: StandbySession, committed: Committed) -> None:
        device_state = b"".join(self._device_state)
        epoch = committed.epoch
        # Ordering: the outputs are kept before the replica commits the epoch, the older
        # epochs' are removed only after (kemari.replica.outputstore).
        with storage(f"keeping the outputs of epoch {epoch}"):
            self.outputs.stage(epoch, self._open_outputs)
        if self.disks is not None:
            # Before the acknowledgement: replicated storage has the epoch on its image.
            with storage(f"writing epoch {epoch} to the standby's disks"):
                await self.disks.committed_outputs(epoch, self._open_outputs)
            # An epoch is acknowledged only while the images are still the guest's.
            self._check_images()
        if epoch == 0:
            if not self._vmdesc:
                raise ReplicaError("the initial sync ended without a VM description")
            with storage("committing the initial sync"):
                self.applier.finish_sync(device_state, self._vmdesc)
            self._replaced(session)
            await session.acknowledge(committed)
            with storage("removing older outputs"):
                self.outputs.committed(0)
            self.outputs_committed += committed.outputs
            self.health.recovered(0)
            return
        self.applier.set_device_state(epoch, device_state)
        # The journal holds the epoch now (commit point): acknowledge, then copy pages.
        with storage(f"committing epoch {epoch}"):
            self.applier.commit_checkpoint(epoch, defer_apply=True)
        if self.replica_run is not None:
            self.replica_run.committed = session.run_epoch(epoch)
        delay_ms = crashpoint.limit(ACK_DELAY_MS)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)  # test hook: a long round trip
        await session.acknowledge(committed)
        with storage(f"applying epoch {epoch}"):
            self.outputs.committed(epoch)
            self.outputs_committed += committed.outputs
            self.applier.apply_pending()
