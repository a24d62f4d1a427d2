"""The standby's apply path: a checkpoint stream in, a committed :class:`Replica` out.

:class:`ReplicaApplier` keeps the standby's replicas under one root directory::

    <root>/current -> gen-000007        symlink, replaced atomically (rename)
    <root>/gen-000007/replica/          the Replica (kemari.replica.store)
    <root>/gen-000007/stream.json       machine type, RAM section id, RAM block list
    <root>/gen-000007/vmdesc.json       the primary's VM description (failover needs it)

stream.json and vmdesc.json are kemari.persist frames (a JSON payload), written with
kemari.persist.write_file; ``current`` is replaced with kemari.persist.replace_symlink.

It has two faces over the same state machine:

* the transport-neutral calls ``start_sync`` / ``put_page`` / ``put_zero`` /
  ``finish_sync`` and ``begin_checkpoint`` / ``put_page`` / ``put_zero`` /
  ``set_device_state`` / ``commit_checkpoint`` / ``abort``, which the ft-transaction
  receiver feeds from its frames;
* the :class:`~kemari.checkpoint.CheckpointSink` protocol (``begin_sync``, ``sync_pages``,
  ``end_sync``, ``begin``, ``pages``, ``device_state``, ``commit``), so a
  :class:`~kemari.checkpoint.CheckpointSource` can drive it in-process.

Epochs: the initial sync is stream epoch 0, checkpoints are 1, 2, ... without gaps.  The
Replica reserves its epoch 0 for "nothing committed", so stream epoch *e* is stored as
Replica epoch *e* + 1; every epoch this class reports is a stream epoch.

Invariants:

* A new initial sync builds a new generation directory and never touches the committed
  one.  The new generation becomes the committed replica only when its epoch 0 is
  committed (state.bin written, stream.json and vmdesc.json in place) *and* the
  ``current`` symlink is renamed over to it: that rename is the commit point of a
  generation.  Only then is the old generation removed.  A crash before the rename
  leaves the old generation current; the half-built one is removed at the next start.
* A checkpoint is staged apart and committed atomically by the Replica's journal; an
  aborted or half-received checkpoint (``abort``, a new sync, failover) is discarded and
  the replica stays at the last committed epoch.
* Checkpoint epochs must follow the committed one by exactly 1: the primary sends only
  the pages dirtied since the previous checkpoint, so a gap would leave stale pages.
* After :meth:`hand_over` the files belong to the failover QEMU; every further call
  raises.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from kemari import persist
from kemari.errors import PersistError, ReplicaError
from kemari.replica import holders
from kemari.replica.store import (
    HANDED_OVER_FILE,
    LOCK_FILE,
    MAIN_RAM_BLOCK,
    Replica,
    StagedCheckpoint,
)
from kemari.sockets import make_private_dir
from kemari.stream import (
    Configuration,
    FailoverPage,
    RamBlock,
    RamBlockList,
    RamPageRun,
    failover_stream,
)
from kemari.stream.format import CAPABILITY_IGNORE_SHARED, MAX_VMDESC_LEN

CURRENT_LINK = "current"
GENERATION_PREFIX = "gen-"
REPLICA_SUBDIRECTORY = "replica"
STREAM_FILE = "stream.json"
VMDESC_FILE = "vmdesc.json"
# kemari.persist frames; a list of 1024 blocks with 255-byte names is well under 1 MiB.
STREAM_FORMAT = persist.Format("stream description", b"KMR:STRM", 1, 4 << 20)
VMDESC_FORMAT = persist.Format("VM description", b"KMR:VMDS", 1, MAX_VMDESC_LEN)
RECENT_CHECKPOINTS = 64
_GENERATION_RE = re.compile(r"^gen-(\d{6,})$")
_MAX_SECTION_ID = (1 << 32) - 1


class ApplierState(enum.Enum):
    """What the applier is doing; a committed replica may exist in every state but HANDED_OVER."""

    IDLE = "idle"  # no transfer open
    SYNCING = "syncing"  # an initial sync is building a new generation
    RECEIVING = "receiving"  # a checkpoint is being staged
    HANDED_OVER = "handed-over"  # the replica went to a failover QEMU; nothing more to do
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True, slots=True)
class StreamInfo:
    """What the failover stream needs besides RAM and device state (``stream.json``)."""

    machine_type: str
    ram_section_id: int
    blocks: tuple[RamBlock, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "machine_type": self.machine_type,
            "ram_section_id": self.ram_section_id,
            "blocks": [
                {"name": block.name, "used_length": block.used_length, "gpa": block.gpa}
                for block in self.blocks
            ],
        }

    @classmethod
    def from_json(cls, text: str | bytes, where: Path) -> StreamInfo:
        """Parse and validate ``stream.json``'s payload; ReplicaError names the file."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            machine_type = data["machine_type"]
            section_id = data["ram_section_id"]
            if not isinstance(machine_type, str) or not machine_type:
                raise ValueError("machine_type is not a non-empty string")
            if not isinstance(section_id, int) or not 0 <= section_id <= _MAX_SECTION_ID:
                raise ValueError("ram_section_id is not a u32")
            blocks = []
            for entry in data["blocks"]:
                name, length, gpa = entry["name"], entry["used_length"], entry["gpa"]
                if not isinstance(name, str) or not isinstance(length, int):
                    raise ValueError(f"block entry {entry!r}")
                if gpa is not None and not isinstance(gpa, int):
                    raise ValueError(f"block {name!r} has GPA {gpa!r}")
                blocks.append(RamBlock(name, length, gpa))
        except (ValueError, KeyError, TypeError) as exc:
            raise ReplicaError(f"{where} is not a valid stream description: {exc}") from exc
        return cls(machine_type, section_id, tuple(blocks))


@dataclasses.dataclass(frozen=True, slots=True)
class AppliedCheckpoint:
    """What one committed checkpoint (or the initial sync, epoch 0) brought."""

    epoch: int
    pages: int  # distinct pages written (data and filled pages)
    device_bytes: int
    receive_s: float  # begin → commit point (staging, journal)
    committed_at: float  # time.time() of the commit


@dataclasses.dataclass(frozen=True, slots=True)
class ApplierStatus:
    """Status for ``info status``: the committed epoch and what recent checkpoints cost."""

    state: ApplierState
    committed_epoch: int | None  # None: no committed replica
    committed_at: float | None  # time.time() of that commit
    generation: str | None
    open_epoch: int | None  # the sync (0) or checkpoint being received
    recent: tuple[AppliedCheckpoint, ...]


@dataclasses.dataclass(frozen=True)
class FailoverImage:
    """Everything a failover QEMU needs, taken from the replica before it was handed over.

    ``ram_path`` is the main RAM block's file (``memory-backend-file,share=on`` with id
    ``main_block``); ``pages`` are copies of every other block's pages.
    """

    epoch: int
    committed_at: float
    info: StreamInfo
    main_block: str
    main_block_size: int
    ram_path: Path
    device_state: bytes
    vmdesc: bytes
    pages: tuple[FailoverPage, ...]

    def stream(self) -> Iterator[bytes | memoryview]:
        """The incoming stream for a QEMU with x-ignore-shared (kemari.stream.writer)."""
        # Only shared blocks' GPAs are checked by the loader (ram.c ram_load_precopy), and
        # the main RAM backend's region is mapped through aliases, so its address is 0.
        blocks = [RamBlock(b.name, b.used_length, b.gpa or 0) for b in self.info.blocks]
        return failover_stream(
            machine_type=self.info.machine_type,
            ram_section_id=self.info.ram_section_id,
            blocks=blocks,
            device_state=self.device_state,
            vmdesc=self.vmdesc,
            pages=self.pages,
        )


@dataclasses.dataclass
class _Generation:
    """One generation directory and its open replica."""

    name: str
    path: Path
    replica: Replica
    info: StreamInfo
    vmdesc: bytes


def _write_file(path: Path, fmt: persist.Format, data: bytes, *, durable: bool) -> None:
    try:
        persist.write_file(path, fmt, data, durable=durable)
    except PersistError as exc:
        raise ReplicaError(str(exc)) from exc


_FRESH_START_HINT = (
    "; a standby starts with a fresh initial sync anyway: remove {root} to discard it"
)


class ReplicaApplier:
    """Applies the primary's initial sync and checkpoints to replicas under ``root``.

    Not thread-safe: one receiver task (or one CheckpointSource) drives it.  Opening an
    applier on a root with a committed generation recovers that replica (Replica.open).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        config_digest: str = "",
        ram_directory: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.config_digest = config_digest
        # RAM files of every generation go to <ram_directory>/<generation> when given.
        self.ram_directory = Path(ram_directory) if ram_directory is not None else None
        self._state = ApplierState.IDLE
        self._committed: _Generation | None = None
        self._building: _Generation | None = None  # the generation of a running sync
        self._staged: StagedCheckpoint | None = None
        self._open_epoch: int | None = None
        self._begun_at = 0.0
        self._apply_error: str | None = None
        self._recent: collections.deque[AppliedCheckpoint] = collections.deque(
            maxlen=RECENT_CHECKPOINTS
        )
        try:
            # 0700 whatever the umask: the replica is the guest's memory.
            make_private_dir(self.root)
        except OSError as exc:
            raise ReplicaError(f"cannot create replica root {self.root}: {exc}") from exc
        self._committed = self._open_current()
        self._held_fd: int | None = None  # flock on a handed-over generation (hand_over)
        self._remove_stale_generations()

    # -- status ------------------------------------------------------------------

    @property
    def state(self) -> ApplierState:
        return self._state

    @property
    def committed_epoch(self) -> int | None:
        """The stream epoch of the committed replica (0: initial sync), None if none."""
        if self._committed is None:
            return None
        return self._committed.replica.committed_epoch - 1

    @property
    def stream_info(self) -> StreamInfo | None:
        """The committed generation's machine type and block list (None: nothing committed)."""
        return self._committed.info if self._committed is not None else None

    def status(self) -> ApplierStatus:
        committed = self._committed
        return ApplierStatus(
            state=self._state,
            committed_epoch=self.committed_epoch,
            committed_at=committed.replica.committed_at if committed is not None else None,
            generation=committed.name if committed is not None else None,
            open_epoch=self._open_epoch,
            recent=tuple(self._recent),
        )

    def recent(self) -> list[AppliedCheckpoint]:
        """The last :data:`RECENT_CHECKPOINTS` commits (initial syncs included), oldest first."""
        return list(self._recent)

    # -- generations ---------------------------------------------------------------

    def _open_current(self) -> _Generation | None:
        link = self.root / CURRENT_LINK
        try:
            name = os.readlink(link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ReplicaError(f"cannot read {link}: {exc}") from exc
        if not _GENERATION_RE.match(name):
            raise ReplicaError(f"{link} points to {name!r}, not a generation directory")
        path = self.root / name
        if (path / REPLICA_SUBDIRECTORY / HANDED_OVER_FILE).exists():
            # A failover QEMU took these files: they are its live RAM, not a replica.
            return None
        try:
            stream = persist.read_file(path / STREAM_FILE, STREAM_FORMAT)
            vmdesc = persist.read_file(path / VMDESC_FILE, VMDESC_FORMAT)
            info = StreamInfo.from_json(stream, path / STREAM_FILE)
            replica = Replica.open(path / REPLICA_SUBDIRECTORY)
        except (PersistError, ReplicaError) as exc:
            # Replica.open's ReplicaError is caused by the PersistError of a file it read.
            cause = exc if isinstance(exc, PersistError) else exc.__cause__
            hint = ""
            if isinstance(cause, persist.ForeignFileError | persist.OlderVersionError):
                hint = _FRESH_START_HINT.format(root=self.root)
            raise ReplicaError(f"cannot open the committed replica: {exc}{hint}") from exc
        if replica.committed_epoch == 0:
            replica.close()
            raise ReplicaError(f"generation {path} is current but has no committed epoch")
        return _Generation(name, path, replica, info, vmdesc)

    def _generation_names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if _GENERATION_RE.match(p.name))
        except OSError as exc:
            raise ReplicaError(f"cannot list {self.root}: {exc}") from exc

    def _remove_stale_generations(self) -> list[str]:
        """Remove every generation but the committed and the building one; a handed-over
        one only once no live process holds it (kemari.replica.holders): a failover QEMU
        maps it, or its agent still owns it.  Returns the names removed."""
        keep = {g.name for g in (self._committed, self._building) if g is not None}
        removed = []
        for name in self._generation_names():
            path = self.root / name
            if name in keep:
                continue
            if (path / REPLICA_SUBDIRECTORY / HANDED_OVER_FILE).exists() and holders.in_use(
                path / REPLICA_SUBDIRECTORY / LOCK_FILE, self._generation_dirs(path)
            ):
                continue
            self._remove_generation_files(path)
            removed.append(name)
        return removed

    def _generation_dirs(self, path: Path) -> list[Path]:
        """The directories holding a generation's files (its RAM may live elsewhere)."""
        if self.ram_directory is None:
            return [path]
        return [path, self.ram_directory / path.name]

    def reclaim(self) -> list[str]:
        """Remove the generations nobody holds (issue 10 item 11): half-built ones, and
        handed-over ones whose failover QEMU and agent are gone.  Returns their names.

        Runs when the applier opens (agent start) and after a failover; a generation a
        live QEMU maps is never removed.
        """
        if self._state is ApplierState.CLOSED:
            return []
        return self._remove_stale_generations()

    def remove_files(self) -> None:
        """After :meth:`close`: remove what this applier kept under ``root`` (its
        generations, ``current``, the kept outputs), except generations a live process
        still holds (another agent's failover QEMU); the root goes when empty."""
        for name in self._generation_names():
            path = self.root / name
            if holders.in_use(path / REPLICA_SUBDIRECTORY / LOCK_FILE, self._generation_dirs(path)):
                continue
            self._remove_generation_files(path)
        link = self.root / CURRENT_LINK
        with contextlib.suppress(OSError):
            if not (self.root / os.readlink(link)).exists():
                link.unlink()
        if not self._generation_names():
            shutil.rmtree(self.root, ignore_errors=True)

    def _remove_generation_files(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        if self.ram_directory is not None:
            shutil.rmtree(self.ram_directory / path.name, ignore_errors=True)

    def _switch_current(self, generation: _Generation) -> None:
        """The commit point of a generation: ``current`` is renamed over to it."""
        try:
            persist.replace_symlink(
                self.root / CURRENT_LINK, generation.name, durable=generation.replica.durable
            )
        except PersistError as exc:
            raise ReplicaError(str(exc)) from exc

    # -- transport-neutral API -----------------------------------------------------

    def _check_live(self) -> None:
        if self._state is ApplierState.HANDED_OVER:
            raise ReplicaError("the replica was handed over to a failover QEMU")
        if self._state is ApplierState.CLOSED:
            raise ReplicaError(f"the replica applier of {self.root} is closed")

    def start_sync(self, configuration: Configuration, blocks: RamBlockList) -> None:
        """An initial sync (stream epoch 0) starts: build a new generation for ``blocks``.

        Whatever transfer was open is discarded first; the committed generation stays.
        """
        self._check_live()
        if CAPABILITY_IGNORE_SHARED in configuration.capabilities:
            raise ReplicaError(
                "the primary migrates with x-ignore-shared: its shared RAM would never arrive"
            )
        names = [block.name for block in blocks.blocks]
        if MAIN_RAM_BLOCK not in names:
            raise ReplicaError(f"the primary's RAM blocks {names} lack {MAIN_RAM_BLOCK!r}")
        if not 0 <= blocks.section_id <= _MAX_SECTION_ID:
            raise ReplicaError(f"RAM section id {blocks.section_id} is not a u32")
        self.abort("a new initial sync started")
        existing = self._generation_names()
        number = int(existing[-1][len(GENERATION_PREFIX) :]) + 1 if existing else 1
        name = f"{GENERATION_PREFIX}{number:06d}"
        path = self.root / name
        ram_directory = self.ram_directory / name if self.ram_directory is not None else None
        try:
            replica = Replica.create(
                path / REPLICA_SUBDIRECTORY,
                [(block.name, block.used_length) for block in blocks.blocks],
                {MAIN_RAM_BLOCK},
                config_digest=self.config_digest,
                ram_directory=ram_directory,
            )
        except BaseException:
            self._remove_generation_files(path)
            raise
        info = StreamInfo(configuration.machine_type, blocks.section_id, blocks.blocks)
        generation = _Generation(name, path, replica, info, b"")
        try:
            self._staged = replica.begin(1)
        except BaseException:
            replica.close()
            self._remove_generation_files(path)
            raise
        self._building = generation
        self._open_epoch = 0
        self._begun_at = time.monotonic()
        self._state = ApplierState.SYNCING

    def put_page(self, block: str, offset: int, data: bytes | memoryview) -> None:
        """One page of the open sync or checkpoint (``data`` is kept by reference if immutable)."""
        self._require_open().put_page(block, offset, data)

    def put_zero(self, block: str, offset: int, fill: int = 0) -> None:
        """A page of the open sync or checkpoint whose every byte is ``fill``."""
        self._require_open().put_zero(block, offset, fill)

    def put_pages(
        self,
        block: str,
        zero_pages: Sequence[int],
        data_pages: Sequence[int],
        data: bytes | bytearray | memoryview,
        *,
        owned: bool = False,
    ) -> None:
        """A RAM_PAGES batch by page number: zero pages first, then the data pages.

        Kept whole; ``owned``: the caller never changes ``data`` again, so even a mutable
        buffer is kept without a copy (StagedCheckpoint.put_pages).
        """
        self._require_open().put_pages(block, zero_pages, data_pages, data, owned=owned)

    def put_runs(self, batch: Sequence[RamPageRun]) -> None:
        """Page runs as the stream parser emits them."""
        staged = self._require_open()
        for run in batch:
            staged.put_pages(run.block, run.zero_pages, run.data_pages, b"".join(run.data))

    def finish_sync(self, device_state: bytes, vmdesc: bytes) -> AppliedCheckpoint:
        """Commit the initial sync and make its generation the committed replica.

        Order: the replica's epoch (state.bin), stream.json and vmdesc.json, then the
        ``current`` rename (commit point), then the old generation is closed and removed.
        """
        staged = self._require_open()
        generation = self._building
        if generation is None or self._open_epoch != 0:
            raise ReplicaError(f"no initial sync is open (epoch {self._open_epoch} is)")
        if not vmdesc or len(vmdesc) > MAX_VMDESC_LEN:
            raise ReplicaError(f"VM description of {len(vmdesc)} bytes")
        durable = generation.replica.durable
        try:
            staged.set_device_state(device_state)
            pages = staged.page_count
            staged.commit()
            _write_file(
                generation.path / STREAM_FILE,
                STREAM_FORMAT,
                json.dumps(generation.info.to_json(), indent=1).encode(),
                durable=durable,
            )
            _write_file(generation.path / VMDESC_FILE, VMDESC_FORMAT, vmdesc, durable=durable)
            generation.vmdesc = vmdesc
            self._switch_current(generation)
        except BaseException:
            self.abort("committing the initial sync failed")
            raise
        old, self._committed = self._committed, generation
        self._apply_error = None  # that was the old generation's
        self._building = None
        self._staged = None
        self._open_epoch = None
        self._state = ApplierState.IDLE
        if old is not None:
            old.replica.close()
            self._remove_stale_generations()
        return self._record(0, pages, len(device_state), generation.replica.committed_at)

    def begin_checkpoint(self, epoch: int) -> None:
        """Checkpoint ``epoch`` starts; it must follow the committed epoch by exactly 1."""
        self._check_live()
        if self._state is not ApplierState.IDLE or self._committed is None:
            raise ReplicaError(
                f"checkpoint {epoch} cannot start: applier is {self._state.value}"
                + ("" if self._committed is not None else ", no committed replica")
            )
        if self._apply_error is not None:
            raise ReplicaError(f"the last checkpoint could not be applied: {self._apply_error}")
        committed = self._committed.replica.committed_epoch - 1
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch != committed + 1:
            raise ReplicaError(f"checkpoint {epoch!r} does not follow committed epoch {committed}")
        self._staged = self._committed.replica.begin(epoch + 1)
        self._open_epoch = epoch
        self._begun_at = time.monotonic()
        self._state = ApplierState.RECEIVING

    def set_device_state(self, epoch: int, data: bytes) -> None:
        """The device state of the open checkpoint ``epoch``."""
        staged = self._require_open()
        if epoch != self._open_epoch or self._state is not ApplierState.RECEIVING:
            raise ReplicaError(f"device state for epoch {epoch}, but {self._open_epoch} is open")
        staged.set_device_state(data)

    def commit_checkpoint(self, epoch: int, *, defer_apply: bool = False) -> AppliedCheckpoint:
        """Commit the open checkpoint ``epoch``; on return it survives any crash of this process.

        With ``defer_apply`` only the journal is written (the commit point); call
        :meth:`apply_pending` soon after acknowledging (the next begin does it anyway).
        """
        staged = self._require_open()
        if epoch != self._open_epoch or self._state is not ApplierState.RECEIVING:
            raise ReplicaError(f"commit of epoch {epoch}, but {self._open_epoch} is open")
        assert self._committed is not None
        pages = staged.page_count
        self._staged = None
        self._open_epoch = None
        self._state = ApplierState.IDLE
        staged.commit(defer_apply=defer_apply)
        replica = self._committed.replica
        return self._record(epoch, pages, len(replica.device_state), replica.committed_at)

    def apply_pending(self) -> None:
        """Apply a commit made with ``defer_apply`` to the RAM files (no-op otherwise)."""
        if self._committed is None or self._state is ApplierState.HANDED_OVER:
            return
        try:
            self._committed.replica.apply_pending()
        except ReplicaError as exc:
            self._apply_error = str(exc)
            raise

    def abort(self, reason: str) -> None:
        """Discard the open sync or checkpoint (if any); the committed replica is unchanged."""
        del reason  # the caller reports it; the replica keeps no log
        staged, self._staged = self._staged, None
        if staged is not None:
            with contextlib.suppress(ReplicaError):
                staged.discard()
        building, self._building = self._building, None
        if building is not None:
            building.replica.close()
            self._remove_generation_files(building.path)
        self._open_epoch = None
        if self._state in (ApplierState.SYNCING, ApplierState.RECEIVING):
            self._state = ApplierState.IDLE

    def _require_open(self) -> StagedCheckpoint:
        self._check_live()
        if self._staged is None:
            raise ReplicaError("no initial sync or checkpoint is open")
        return self._staged

    def _record(
        self, epoch: int, pages: int, device_bytes: int, committed_at: float
    ) -> AppliedCheckpoint:
        record = AppliedCheckpoint(
            epoch=epoch,
            pages=pages,
            device_bytes=device_bytes,
            receive_s=time.monotonic() - self._begun_at,
            committed_at=committed_at,
        )
        self._recent.append(record)
        return record

    # -- failover --------------------------------------------------------------------

    def hand_over(self) -> FailoverImage:
        """Give the committed replica to a failover QEMU; ReplicaError if there is none.

        An open sync or checkpoint is discarded first (it was never committed, so the
        primary never resumed from it).  The returned image holds the device state, the
        VM description and copies of the non-shared blocks; the main RAM file is marked
        handed over (kemari.replica.store) and from now on belongs to the QEMU.
        """
        self._check_live()
        committed = self._committed
        if committed is None:
            raise ReplicaError(
                "no committed replica: the initial sync has not completed"
                + (" (one is running)" if self._state is ApplierState.SYNCING else "")
            )
        self.abort("failover")
        replica = committed.replica
        replica.apply_pending()
        main = replica.block(MAIN_RAM_BLOCK)
        image = FailoverImage(
            epoch=replica.committed_epoch - 1,
            committed_at=replica.committed_at,
            info=committed.info,
            main_block=main.name,
            main_block_size=main.size,
            ram_path=main.path,
            device_state=replica.device_state,
            vmdesc=committed.vmdesc,
            pages=tuple(replica.failover_pages()),
        )
        replica.hand_over()
        self._state = ApplierState.HANDED_OVER
        # Owned until close() (after the failover QEMU is gone): no other agent sharing
        # the replica folder reclaims it before that QEMU maps it (kemari.replica.holders).
        with contextlib.suppress(OSError):
            fd = os.open(replica.directory / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
            else:
                self._held_fd = fd
        return image

    # -- CheckpointSink ---------------------------------------------------------------

    async def begin_sync(self, configuration: Configuration, blocks: RamBlockList) -> None:
        self.start_sync(configuration, blocks)

    async def sync_pages(self, batch: Sequence[RamPageRun]) -> None:
        self.put_runs(batch)

    async def end_sync(self, device_state: bytes, vmdesc: bytes) -> None:
        self.finish_sync(device_state, vmdesc)

    async def begin(self, epoch: int) -> None:
        self.begin_checkpoint(epoch)

    async def pages(self, batch: Sequence[RamPageRun]) -> None:
        self.put_runs(batch)

    async def device_state(self, epoch: int, data: bytes) -> None:
        self.set_device_state(epoch, data)

    async def commit(self, epoch: int) -> None:
        # Acknowledge at the commit point; the copy into RAM runs right after, while the
        # primary's guest runs (the source sends VMSTATE_LOADED before this callback).
        self.commit_checkpoint(epoch, defer_apply=True)
        asyncio.get_running_loop().call_soon(self._apply_quietly)

    async def acknowledged(self, epoch: int) -> None:
        """``commit`` committed ``epoch`` already (a local replica has no round trip)."""

    def _apply_quietly(self) -> None:
        # A failure is kept in _apply_error and refuses the next checkpoint.
        with contextlib.suppress(ReplicaError):
            self.apply_pending()

    # -- life cycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Discard an open transfer, close the committed replica (applying a pending commit).

        Idempotent.  A handed-over replica is already closed.
        """
        self.abort("applier closed")
        if self._committed is not None:
            self._committed.replica.close()
        held, self._held_fd = self._held_fd, None
        if held is not None:
            os.close(held)
        if self._state is not ApplierState.HANDED_OVER:
            self._state = ApplierState.CLOSED

    def __enter__(self) -> ReplicaApplier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
