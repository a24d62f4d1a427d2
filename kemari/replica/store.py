"""The standby's committed replica: RAM files, last device state, epoch, and atomic checkpoints.

Directory layout (docs/replica.md has the reasoning and a table of every file)::

    replica.json   written once by create(): config digest, blocks, RAM directory (JSON)
    state.bin      committed epoch, commit time, device state (replaced by rename)
    journal        redo journal of the last checkpoint (kemari.replica.journal)
    lock           flock'ed by the one process that has the replica open (empty)
    handed-over    present once hand_over() gave the RAM files to a failover QEMU
    <ram dir>/NNN-<name>.ram   one file per RAM block, offset = block offset

replica.json, state.bin and handed-over are kemari.persist frames (magic, version, length,
crc32), each replaced atomically; the RAM files are raw (QEMU maps them) and described by
replica.json; the journal keeps its own header and is written in place.

Invariants:
- The RAM files, state.bin and the journal together always describe exactly one epoch E
  (state.bin's, or the complete journal's, which is redone by open()).
- Nothing of a checkpoint touches the RAM files or state.bin before its journal is
  complete; the exception is the very first checkpoint, written straight into the RAM
  files while no epoch is committed (epoch 0), with the rule "epoch 0 means all-zero RAM"
  restored by discard() and open().
"""

import array
import enum
import fcntl
import json
import os
import re
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from kemari import crashpoint, persist
from kemari.errors import PersistError, ReplicaError
from kemari.replica.frames import NO_PAGES, PAGE_NUMBER_TYPECODE, PageFrame, write_frame
from kemari.replica.journal import Journal, JournalRecord, JournalState, ScanResult
from kemari.replica.ramfile import PAGE_SIZE, RamFile
from kemari.stream.writer import FailoverPage

LAYOUT_FILE = "replica.json"
STATE_FILE = "state.bin"
JOURNAL_FILE = "journal"
LOCK_FILE = "lock"
HANDED_OVER_FILE = "handed-over"
RAM_SUBDIRECTORY = "ram"

# hw/i386/pc.c: mc->default_ram_id, the main RAM block of the pc and q35 machines.
MAIN_RAM_BLOCK = "pc.ram"
MAX_BLOCKS = 1024
MAX_BLOCK_NAME = 255  # QEMU sends block names with a u8 length (ram.c)
MAX_EPOCH = (1 << 63) - 1
MAX_DEVICE_STATE = 256 << 20
MAX_CONFIG_DIGEST = 128

_STATE_FIELDS = struct.Struct("<Qd")  # epoch, commit time; the device state follows
_HANDED_OVER_FIELDS = struct.Struct("<Q")  # the epoch handed over

# The replica's small files (kemari.persist frames).  A layout of MAX_BLOCKS blocks with
# 255-byte names takes well under 1 MiB of JSON.  The layout's version also stands for the
# journal's layout (kemari.replica.journal.VERSION): change one, bump the layout's.  Layout
# 2 goes with journal 2 (page frames); a layout 1 replica is refused as "older" (a standby
# starts with a new initial sync anyway).
LAYOUT_FORMAT = persist.Format("replica layout", b"KMR:LAYT", 2, 4 << 20)
STATE_FORMAT = persist.Format(
    "replica state", b"KMR:STAT", 1, _STATE_FIELDS.size + MAX_DEVICE_STATE
)
HANDED_OVER_FORMAT = persist.Format("hand-over marker", b"KMR:HAND", 1, _HANDED_OVER_FIELDS.size)


class RecoveryAction(enum.Enum):
    """What open() found in the journal."""

    NONE = "none"  # nothing was pending
    REPLAYED = "replayed"  # a committed checkpoint was redone: the replica is at its epoch
    DROPPED = "dropped"  # a checkpoint cut short before its commit record was dropped


class StageState(enum.Enum):
    """Lifecycle of a StagedCheckpoint."""

    OPEN = "open"
    COMMITTED = "committed"
    DISCARDED = "discarded"


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """One RAM block of the replica and its file."""

    index: int
    name: str
    size: int  # the block's used length, a multiple of 4096
    shared: bool  # mapped by the failover QEMU itself (not sent in the stream)
    path: Path


def _check_block_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ReplicaError(f"RAM block name {name!r} is not a non-empty string")
    encoded = name.encode("utf-8", errors="replace")
    if len(encoded) > MAX_BLOCK_NAME or "\0" in name:
        raise ReplicaError(f"RAM block name {name!r} is longer than 255 bytes or has a NUL")
    return name


def _check_block_size(name: str, size: object) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % PAGE_SIZE:
        raise ReplicaError(f"RAM block {name!r}: size {size!r} is not a positive multiple of 4096")
    return size


def _file_name(index: int, name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._")[:80] or "block"
    return f"{index:03d}-{safe}.ram"


def _relative_if_inside(path: Path, root: Path) -> str:
    resolved, resolved_root = path.resolve(), root.resolve()
    if resolved.is_relative_to(resolved_root):
        return str(resolved.relative_to(resolved_root))
    return str(resolved)


def _check_epoch(epoch: object) -> int:
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 < epoch <= MAX_EPOCH:
        raise ReplicaError(f"epoch {epoch!r} is not an integer in 1..2**63-1")
    return epoch


def _write(path: Path, fmt: persist.Format, payload: bytes | list[bytes], *, durable: bool) -> None:
    """Replace ``path`` atomically (kemari.persist): readers see the old or the new file."""
    try:
        persist.write_file(path, fmt, payload, durable=durable)
    except PersistError as exc:
        raise ReplicaError(str(exc)) from exc


def _read(path: Path, fmt: persist.Format) -> bytes:
    """The checked payload of ``path``; ReplicaError (caused by the PersistError) if not."""
    try:
        return persist.read_file(path, fmt)
    except PersistError as exc:
        raise ReplicaError(str(exc)) from exc


def _write_state(
    path: Path, epoch: int, committed_at: float, device_state: bytes, *, durable: bool
) -> None:
    fields = _STATE_FIELDS.pack(epoch, committed_at)
    _write(path, STATE_FORMAT, [fields, device_state], durable=durable)


def _read_state(path: Path) -> tuple[int, float, bytes]:
    payload = _read(path, STATE_FORMAT)
    if len(payload) < _STATE_FIELDS.size:
        raise ReplicaError(f"{path} holds {len(payload)} bytes, too few for a replica state")
    epoch, committed_at = _STATE_FIELDS.unpack_from(payload)
    if not 0 <= epoch <= MAX_EPOCH:
        raise ReplicaError(f"{path} holds epoch {epoch}, outside 0..2**63-1")
    return epoch, committed_at, payload[_STATE_FIELDS.size :]


def _page_numbers(numbers: Sequence[int], pages: int, block: str) -> "array.array[int]":
    """``numbers`` as the frame's own u32 array, each checked to lie in ``0..pages-1``."""
    if numbers and not (min(numbers) >= 0 and max(numbers) < pages):
        raise ReplicaError(f"a page of {block!r} lies outside its {pages} pages")
    if type(numbers) is array.array and numbers.typecode == PAGE_NUMBER_TYPECODE:
        return numbers[:]
    return array.array(PAGE_NUMBER_TYPECODE, numbers)


class StagedCheckpoint:
    """One checkpoint being received: page frames and device state, kept apart until commit().

    Each put_pages() batch is kept whole as one frame (kemari.replica.frames), a single
    put_page()/put_zero() as a frame of one page; the journal and the apply take the
    frames in order.  Use as a context manager: leaving the block without commit()
    discards it.
    """

    def __init__(self, replica: "Replica", epoch: int, *, direct: bool) -> None:
        self._replica = replica
        self.epoch = epoch
        # direct: the first checkpoint, written straight into the (all-zero) RAM files.
        self.direct = direct
        self.state = StageState.OPEN
        self._frames: list[PageFrame] = []
        self._pages = 0
        self._guest_pages = sum(info.size for info in replica.blocks) // PAGE_SIZE
        self._device_state: bytes | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.state is StageState.OPEN:
            self.discard()

    @property
    def page_count(self) -> int:
        """Pages (data and zero) staged so far; a page given twice may count twice."""
        return self._pages

    def _locate(self, block: str, offset: int) -> BlockInfo:
        if self.state is not StageState.OPEN:
            raise ReplicaError(f"checkpoint {self.epoch} is already {self.state.value}")
        info = self._replica.block(block)
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise ReplicaError(f"offset {offset!r} in {block!r} is not an integer")
        if offset < 0 or offset % PAGE_SIZE or offset >= info.size:
            raise ReplicaError(
                f"offset {offset:#x} in {block!r} is not page-aligned inside 0..{info.size:#x}"
            )
        return info

    def put_page(self, block: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Stage one 4096-byte page of ``block`` at byte ``offset``."""
        info = self._locate(block, offset)
        page: bytes | memoryview
        # Immutable bytes are kept by reference (the parser hands out byte views of its
        # immutable input chunks); anything mutable is copied now.  The two common
        # shapes are checked first: this runs once per dirty page.
        if (type(data) is bytes and len(data) == PAGE_SIZE) or (
            type(data) is memoryview
            and type(data.obj) is bytes
            and data.nbytes == PAGE_SIZE
            and data.format == "B"
            and data.c_contiguous
        ):
            page = data
        else:
            view = memoryview(data)
            if view.nbytes != PAGE_SIZE:
                raise ReplicaError(f"page {block!r}@{offset:#x} has {view.nbytes} bytes, not 4096")
            if not view.c_contiguous:
                raise ReplicaError(f"page {block!r}@{offset:#x} is not a contiguous buffer")
            page = view.cast("B") if isinstance(view.obj, bytes) else bytes(view)
        numbers = array.array(PAGE_NUMBER_TYPECODE, (offset // PAGE_SIZE,))
        self._stage(PageFrame(info.index, 0, NO_PAGES, numbers, page))

    def put_pages(
        self,
        block: str,
        zero_pages: Sequence[int],
        data_pages: Sequence[int],
        data: bytes | bytearray | memoryview,
        *,
        owned: bool = False,
    ) -> None:
        """Stage a batch of ``block`` by page number: the zero pages, then the data pages
        (``data`` holds them back to back), as if each had been put one by one.

        The batch is kept whole, as one frame: one range check of its page numbers, one
        copy of the number arrays (``array('I')`` as RAM_PAGES decodes them) and at most
        one copy of ``data``: none when it is immutable bytes or a view of them, or when
        ``owned`` says the caller hands a mutable buffer over and never changes it again
        (a received frame's fresh buffer).
        """
        if len(data) != len(data_pages) * PAGE_SIZE:
            raise ReplicaError(
                f"{len(data)} bytes of page data for {len(data_pages)} pages of {block!r}"
            )
        info = self._locate(block, 0)
        pages = info.size // PAGE_SIZE
        zeros = _page_numbers(zero_pages, pages, block)
        datas = _page_numbers(data_pages, pages, block)
        view = memoryview(data)
        if not (owned or type(view.obj) is bytes) or view.format != "B" or not view.c_contiguous:
            view = memoryview(bytes(view))  # mutable or odd-shaped: one copy of the batch
        if zeros or datas:
            self._stage(PageFrame(info.index, 0, zeros, datas, view))

    def put_zero(self, block: str, offset: int, fill: int = 0) -> None:
        """Stage a page of ``block`` at ``offset`` whose every byte is ``fill``."""
        info = self._locate(block, offset)
        if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill <= 255:
            raise ReplicaError(f"fill {fill!r} for {block!r}@{offset:#x} is not a byte")
        numbers = array.array(PAGE_NUMBER_TYPECODE, (offset // PAGE_SIZE,))
        self._stage(PageFrame(info.index, fill, numbers, NO_PAGES, b""))

    def _stage(self, frame: PageFrame) -> None:
        self._pages += frame.page_count
        if self.direct:
            # The first checkpoint: straight into the RAM file, a run of pages at a time.
            write_frame(self._replica.ram_file(frame.block).map, frame)
            limit = crashpoint.limit("initial-pages")
            if limit is not None and self._pages >= limit:
                crashpoint.kill()
            return
        self._frames.append(frame)
        if self._pages > 2 * self._guest_pages:
            self._compact()

    def _compact(self) -> None:
        """Keep each staged page's last write only, in one frame per block and kind.

        A primary that repeats pages cannot make the staging hold more than twice the
        guest's RAM, nor the journal more than once (commit() compacts beyond that).
        QEMU sends each dirty page once per checkpoint, so this runs only for one that
        does not.
        """
        last: dict[tuple[int, int], int | memoryview] = {}
        for frame in self._frames:
            for page in frame.zero_pages:
                last[(frame.block, page)] = frame.fill
            data = memoryview(frame.data)
            for n, page in enumerate(frame.data_pages):
                last[(frame.block, page)] = data[n * PAGE_SIZE : (n + 1) * PAGE_SIZE]
        groups: dict[tuple[int, int], tuple[array.array[int], list[memoryview]]] = {}
        for (block, page), value in last.items():
            fill = value if isinstance(value, int) else -1  # -1: the block's data pages
            numbers, views = groups.setdefault(
                (block, fill), (array.array(PAGE_NUMBER_TYPECODE), [])
            )
            numbers.append(page)
            if not isinstance(value, int):
                views.append(value)
        self._frames = [
            PageFrame(block, fill, numbers, NO_PAGES, b"")
            if fill >= 0
            else PageFrame(block, 0, NO_PAGES, numbers, b"".join(views))
            for (block, fill), (numbers, views) in groups.items()
        ]
        self._pages = len(last)

    def set_device_state(self, data: bytes | bytearray | memoryview) -> None:
        """Stage the checkpoint's device-state buffer (opaque to the replica)."""
        if self.state is not StageState.OPEN:
            raise ReplicaError(f"checkpoint {self.epoch} is already {self.state.value}")
        state = bytes(data)
        if len(state) > MAX_DEVICE_STATE:
            raise ReplicaError(f"device state of {len(state)} bytes exceeds {MAX_DEVICE_STATE}")
        self._device_state = state

    def commit(self, *, defer_apply: bool = False) -> None:
        """Make this checkpoint the replica's committed epoch, atomically.

        Returns once the checkpoint is durable in the journal (the commit point) and,
        unless ``defer_apply``, applied to the RAM files.  With ``defer_apply`` the caller
        may acknowledge the commit first and call :meth:`Replica.apply_pending` later;
        begin(), failover_pages() and close() apply it anyway before they proceed.
        """
        if self.state is not StageState.OPEN:
            raise ReplicaError(f"checkpoint {self.epoch} is already {self.state.value}")
        if self._device_state is None:
            raise ReplicaError(f"checkpoint {self.epoch} has no device state; cannot commit")
        if self._pages > self._guest_pages:
            self._compact()
        frames, self._frames = self._frames, []
        try:
            self._replica._commit(self, frames, self._device_state, defer_apply=defer_apply)
        except BaseException:
            # Either nothing was committed (journal cut short), or the commit point was
            # passed and only the apply failed (the replica then demands a reopen).
            self.state = StageState.DISCARDED
            raise
        self.state = StageState.COMMITTED

    def discard(self) -> None:
        """Forget this checkpoint; the committed replica is exactly as before."""
        if self.state is not StageState.OPEN:
            raise ReplicaError(f"checkpoint {self.epoch} is already {self.state.value}")
        self.state = StageState.DISCARDED
        self._frames = []
        self._replica._discard(self)


class Replica:
    """A committed replica of a guest on the standby; one process opens it at a time.

    Made by :meth:`create` or :meth:`open`; not thread-safe (one receiver task uses it).
    """

    def __init__(
        self,
        directory: Path,
        layout: dict[str, Any],
        *,
        create: bool,
    ) -> None:
        self.directory = directory
        self.config_digest: str = layout["config_digest"]
        # Relative: inside the replica directory (which can then be moved or copied).
        ram_directory = directory / layout["ram_directory"]
        try:
            volatile = persist.is_volatile(directory) and persist.is_volatile(ram_directory)
            self.durable = not volatile
        except PersistError as exc:
            raise ReplicaError(str(exc)) from exc
        self._closed = False
        self._broken: str | None = None
        # The committed epoch lives in RAM and the journal only (state.bin could not be
        # written): hand_over() works, begin() refuses.
        self._unsaved: str | None = None
        self._staged: StagedCheckpoint | None = None
        self._pending: JournalRecord | None = None
        self._ram: list[RamFile] = []
        self._journal: Journal | None = None
        self.recovery = RecoveryAction.NONE
        self._lock_fd = self._lock()
        try:
            self.blocks = tuple(
                BlockInfo(i, b["name"], b["size"], b["shared"], ram_directory / b["file"])
                for i, b in enumerate(layout["blocks"])
            )
            self._by_name = {info.name: info for info in self.blocks}
            for info in self.blocks:
                self._ram.append(RamFile(info.path, info.size, create=create))
            self._journal = Journal(directory / JOURNAL_FILE, durable=self.durable)
            if create:
                self.committed_epoch = 0
                self.committed_at = 0.0
                self.device_state = b""
                _write_state(directory / STATE_FILE, 0, 0.0, b"", durable=self.durable)
            else:
                self.committed_epoch, self.committed_at, self.device_state = _read_state(
                    directory / STATE_FILE
                )
        except BaseException:
            self.close()
            raise

    # ----- creation and recovery -------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        blocks: Iterable[tuple[str, int]],
        shared_blocks: set[str] | None = None,
        *,
        config_digest: str = "",
        ram_directory: str | os.PathLike[str] | None = None,
    ) -> "Replica":
        """Create an empty replica (epoch 0, all-zero RAM) for ``blocks`` (name, used length).

        ``shared_blocks`` are the blocks the failover QEMU maps as share=on
        memory-backend-files (x-ignore-shared skips them in the stream); None means the
        main RAM block ``pc.ram`` if present.  The RAM files go to ``ram_directory``
        (default ``<directory>/ram``); both should be on tmpfs or hugetlbfs.
        """
        root = Path(directory)
        block_list = list(blocks)
        if not block_list or len(block_list) > MAX_BLOCKS:
            raise ReplicaError(f"a replica needs 1..{MAX_BLOCKS} RAM blocks, got {len(block_list)}")
        names: list[str] = []
        for entry in block_list:
            if not isinstance(entry, tuple) or len(entry) != 2:
                raise ReplicaError(f"RAM block {entry!r} is not a (name, size) pair")
            name = _check_block_name(entry[0])
            _check_block_size(name, entry[1])
            if name in names:
                raise ReplicaError(f"RAM block {name!r} is listed twice")
            names.append(name)
        if shared_blocks is None:
            shared = {MAIN_RAM_BLOCK} & set(names)
        else:
            unknown = set(shared_blocks) - set(names)
            if unknown:
                raise ReplicaError(f"shared blocks {sorted(unknown)} are not RAM blocks")
            shared = set(shared_blocks)
        if not isinstance(config_digest, str) or len(config_digest) > MAX_CONFIG_DIGEST:
            raise ReplicaError(f"config digest must be a string of at most {MAX_CONFIG_DIGEST}")
        ram_root = Path(ram_directory) if ram_directory is not None else root / RAM_SUBDIRECTORY
        try:
            root.mkdir(parents=True, exist_ok=True)
            ram_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReplicaError(f"cannot create replica directory: {exc}") from exc
        if (root / LAYOUT_FILE).exists():
            raise ReplicaError(f"{root} already holds a replica; open() it or remove it first")
        layout = {
            "config_digest": config_digest,
            "ram_directory": _relative_if_inside(ram_root, root),
            "blocks": [
                {"name": name, "size": size, "shared": name in shared, "file": _file_name(i, name)}
                for i, (name, size) in enumerate(block_list)
            ],
        }
        # A stale journal from an earlier, unfinished create() must not be replayed later.
        (root / JOURNAL_FILE).unlink(missing_ok=True)
        replica = cls(root, layout, create=True)
        try:
            # replica.json last: its presence means every other file is complete.  The
            # RAM files' entries and this directory's own entry are made durable first.
            if replica.durable:
                for parent in (ram_root, root.parent):
                    try:
                        persist.fsync_directory(parent)
                    except OSError as exc:
                        raise ReplicaError(f"cannot fsync directory {parent}: {exc}") from exc
            _write(
                root / LAYOUT_FILE,
                LAYOUT_FORMAT,
                json.dumps(layout, indent=1).encode(),
                durable=replica.durable,
            )
        except BaseException:
            replica.close()
            raise
        return replica

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> "Replica":
        """Open an existing replica after a restart or crash and bring it to one epoch.

        A complete journal is redone (idempotent), an incomplete one dropped; see
        :attr:`recovery`.  At epoch 0 the RAM files are zeroed (a first checkpoint may
        have been cut short in them).
        """
        root = Path(directory)
        layout = cls._read_layout(root / LAYOUT_FILE)
        handed_over = root / HANDED_OVER_FILE
        if handed_over.exists():
            try:
                payload = persist.read_file(handed_over, HANDED_OVER_FORMAT)
                (epoch,) = _HANDED_OVER_FIELDS.unpack(payload)
                which = f"epoch {epoch}"
            except (PersistError, struct.error) as exc:
                which = f"its marker: {exc}"
            raise ReplicaError(
                f"{root} was handed over to a failover QEMU ({which}); it is no longer a replica"
            )
        replica = cls(root, layout, create=False)
        try:
            replica._recover()
        except BaseException:
            replica.close()
            raise
        return replica

    @staticmethod
    def _read_layout(path: Path) -> dict[str, Any]:
        try:
            payload = persist.read_file(path, LAYOUT_FORMAT)
        except persist.MissingFileError as exc:
            raise ReplicaError(f"no replica at {path.parent} ({path.name} is missing)") from exc
        except PersistError as exc:
            raise ReplicaError(str(exc)) from exc
        try:
            layout = json.loads(payload.decode("utf-8"))
        except ValueError as exc:
            raise ReplicaError(f"{path} holds no valid JSON: {exc}") from exc
        if not isinstance(layout, dict):
            raise ReplicaError(f"{path} does not hold a JSON object")
        if not isinstance(layout.get("config_digest"), str) or not isinstance(
            layout.get("ram_directory"), str
        ):
            raise ReplicaError(f"{path}: config_digest / ram_directory missing")
        blocks = layout.get("blocks")
        if not isinstance(blocks, list) or not 0 < len(blocks) <= MAX_BLOCKS:
            raise ReplicaError(f"{path}: block list missing or too long")
        seen: set[str] = set()
        for index, block in enumerate(blocks):
            if not isinstance(block, dict):
                raise ReplicaError(f"{path}: block entry {index} is not an object")
            name = _check_block_name(block.get("name"))
            _check_block_size(name, block.get("size"))
            if name in seen or not isinstance(block.get("shared"), bool):
                raise ReplicaError(f"{path}: block {name!r} is duplicated or lacks 'shared'")
            if block.get("file") != _file_name(index, name):
                raise ReplicaError(f"{path}: block {name!r} has an unexpected file name")
            seen.add(name)
        return layout

    def _lock(self) -> int:
        path = self.directory / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ReplicaError(f"cannot open {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ReplicaError(f"replica {self.directory} is open in another process") from exc
        return fd

    def _recover(self) -> None:
        assert self._journal is not None
        result, record = self._journal.scan()
        if result is ScanResult.INCOMPLETE:
            self._journal.mark(JournalState.DROPPED)
            self.recovery = RecoveryAction.DROPPED
        elif result is ScanResult.COMPLETE:
            assert record is not None
            # Crash before state.bin was replaced: base == committed.  After it (journal
            # not yet marked applied): epoch == committed; redoing it again is harmless.
            if self.committed_epoch not in (record.base_epoch, record.epoch):
                raise ReplicaError(
                    f"journal of epoch {record.epoch} (based on {record.base_epoch}) does not "
                    f"follow the replica's committed epoch {self.committed_epoch}"
                )
            for frame in record.frames:
                if frame.block >= len(self.blocks) or any(
                    numbers and max(numbers) >= self.blocks[frame.block].size // PAGE_SIZE
                    for numbers in (frame.zero_pages, frame.data_pages)
                ):
                    raise ReplicaError(
                        f"journal frame of block {frame.block} has pages outside the blocks"
                    )
            self._pending = record
            self.apply_pending()
            self.recovery = RecoveryAction.REPLAYED
        if self.committed_epoch == 0:
            self._zero_ram()

    # ----- checkpoints -----------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise ReplicaError(f"replica {self.directory} is closed")
        if self._broken is not None:
            raise ReplicaError(f"replica {self.directory} must be reopened: {self._broken}")

    def begin(self, epoch: int) -> StagedCheckpoint:
        """Start staging checkpoint ``epoch`` (strictly greater than the committed one)."""
        self._check_usable()
        if self._unsaved is not None:
            raise ReplicaError(f"replica {self.directory} takes no new checkpoint: {self._unsaved}")
        epoch = _check_epoch(epoch)
        if self._staged is not None:
            raise ReplicaError(f"checkpoint {self._staged.epoch} is still being staged")
        self.apply_pending()
        if epoch <= self.committed_epoch:
            raise ReplicaError(
                f"epoch {epoch} is not greater than the committed epoch {self.committed_epoch}"
            )
        self._staged = StagedCheckpoint(self, epoch, direct=self.committed_epoch == 0)
        return self._staged

    def _commit(
        self,
        staged: StagedCheckpoint,
        frames: list[PageFrame],
        device_state: bytes,
        *,
        defer_apply: bool,
    ) -> None:
        self._check_usable()
        assert self._journal is not None and staged is self._staged
        self._staged = None
        committed_at = time.time()
        if staged.direct:
            # No committed epoch to protect: the pages are already in place.
            try:
                if self.durable:
                    for ram in self._ram:
                        ram.flush()
                self._write_state(staged.epoch, committed_at, device_state)
            except BaseException as exc:
                self._broken = f"committing the first checkpoint failed: {exc}"
                raise
            return
        record = JournalRecord(
            staged.epoch, self.committed_epoch, committed_at, device_state, frames
        )
        try:
            self._journal.write(record)
        except BaseException:
            self._journal.mark(JournalState.DROPPED)
            raise
        # Commit point passed: from here on the replica is at the new epoch, whatever
        # happens; a failure below only means the redo must happen at the next open().
        self._pending = record
        self.committed_epoch = staged.epoch
        self.committed_at = committed_at
        self.device_state = device_state
        if not defer_apply:
            self.apply_pending()

    def _discard(self, staged: StagedCheckpoint) -> None:
        assert staged is self._staged
        self._staged = None
        if staged.direct:
            self._zero_ram()

    @property
    def apply_is_pending(self) -> bool:
        """True between a commit(defer_apply=True) and the apply."""
        return self._pending is not None

    def apply_pending(self) -> None:
        """Redo the committed journal into the RAM files and state.bin, then mark it applied.

        Idempotent: every entry is a full-page overwrite, so applying twice equals once.
        """
        record = self._pending
        if record is None:
            return
        assert self._journal is not None
        if self._broken is not None:
            raise ReplicaError(f"replica {self.directory} must be reopened: {self._broken}")
        try:
            maps = [ram.map for ram in self._ram]
            limit = crashpoint.limit("apply-pages")
            done = 0
            for frame in record.frames:
                write_frame(maps[frame.block], frame)
                if limit is not None:
                    done += frame.page_count
                    if done >= limit:
                        crashpoint.kill()
            if self.durable:
                for ram in self._ram:
                    ram.flush()
        except BaseException as exc:
            self._broken = f"applying epoch {record.epoch} failed: {exc}"
            raise
        try:
            self._write_state(record.epoch, record.committed_at, record.device_state)
            crashpoint.reached("state-written")
            self._journal.mark(JournalState.APPLIED)
        except BaseException as exc:
            # The RAM files hold the epoch and the complete journal keeps it (open() redoes
            # it), so the replica is at record.epoch and can still be handed over; only a
            # new checkpoint must not overwrite the journal (issue 10 item 7: a full file
            # system after an acknowledged epoch).
            self._pending = None
            self.committed_epoch = record.epoch
            self.committed_at = record.committed_at
            self.device_state = record.device_state
            self._unsaved = f"the committed epoch is only in the journal: {exc}"
            raise ReplicaError(f"replica {self.directory}: {self._unsaved}") from exc
        self._pending = None
        self.committed_epoch = record.epoch
        self.committed_at = record.committed_at
        self.device_state = record.device_state

    def _write_state(self, epoch: int, committed_at: float, device_state: bytes) -> None:
        _write_state(
            self.directory / STATE_FILE, epoch, committed_at, device_state, durable=self.durable
        )
        self.committed_epoch = epoch
        self.committed_at = committed_at
        self.device_state = device_state

    def _zero_ram(self) -> None:
        try:
            for ram in self._ram:
                ram.zero()
        except ReplicaError as exc:
            self._broken = str(exc)
            raise

    # ----- reading ---------------------------------------------------------------------

    def block(self, name: str) -> BlockInfo:
        """The block called ``name``; ReplicaError if there is none."""
        info = self._by_name.get(name) if isinstance(name, str) else None
        if info is None:
            raise ReplicaError(f"unknown RAM block {name!r}")
        return info

    def ram_file(self, index: int) -> RamFile:
        """The RAM file of block number ``index`` (for the staging code)."""
        return self._ram[index]

    def ram_path(self, block: str) -> Path:
        """Path of the file holding ``block`` (mem-path of its memory-backend-file)."""
        return self.block(block).path

    def read_page(self, block: str, offset: int) -> bytes:
        """The committed page of ``block`` at ``offset`` (applies a pending commit first)."""
        self._check_usable()
        self.apply_pending()
        info = self.block(block)
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise ReplicaError(f"offset {offset!r} is not an integer")
        if offset < 0 or offset % PAGE_SIZE or offset >= info.size:
            raise ReplicaError(f"offset {offset:#x} is not a page of {block!r}")
        return self._ram[info.index].map[offset : offset + PAGE_SIZE]

    def failover_pages(self) -> Iterator[FailoverPage]:
        """Every page of every non-shared block, for the failover stream's RAM section.

        Shared blocks are not listed: the failover QEMU maps their files directly.  Each
        block is copied once, so the pages stay valid after the replica is closed.
        """
        self._check_usable()
        self.apply_pending()
        if self.committed_epoch == 0:
            raise ReplicaError("no checkpoint is committed yet; there is nothing to fail over to")
        for info in self.blocks:
            if info.shared:
                continue
            contents = memoryview(self._ram[info.index].map[:])
            for offset in range(0, info.size, PAGE_SIZE):
                yield FailoverPage(info.name, offset, contents[offset : offset + PAGE_SIZE])

    # ----- lifecycle -------------------------------------------------------------------

    def hand_over(self) -> None:
        """Give the RAM files to the failover QEMU: apply, flush, mark the directory, close.

        Once a QEMU maps the shared files and runs, they hold its live RAM, not an epoch;
        the marker makes every later open() refuse the directory.  Take ``device_state``
        and ``failover_pages()`` first, call this, then start QEMU.
        """
        self._check_usable()
        if self._staged is not None:
            raise ReplicaError(f"checkpoint {self._staged.epoch} is still being staged")
        self.apply_pending()
        if self.committed_epoch == 0:
            raise ReplicaError("no checkpoint is committed yet; there is nothing to fail over to")
        if self.durable:
            for ram in self._ram:
                ram.flush()
        try:
            _write(
                self.directory / HANDED_OVER_FILE,
                HANDED_OVER_FORMAT,
                _HANDED_OVER_FIELDS.pack(self.committed_epoch),
                durable=self.durable,
            )
        except ReplicaError:
            # A full file system: an empty marker needs no data block, and open() refuses
            # the directory just the same (it only names no epoch).
            try:
                os.close(
                    os.open(self.directory / HANDED_OVER_FILE, os.O_CREAT | os.O_WRONLY, 0o600)
                )
            except OSError as exc:
                raise ReplicaError(f"cannot mark {self.directory} handed over: {exc}") from exc
        self.close()

    @property
    def unsaved(self) -> str | None:
        """Why the committed epoch is only in RAM and the journal (None: state.bin holds it)."""
        return self._unsaved

    def close(self) -> None:
        """Apply a pending commit, unmap and close everything, release the lock; idempotent."""
        if self._closed:
            return
        try:
            if self._pending is not None and self._broken is None:
                self.apply_pending()
        finally:
            self._closed = True
            if self._staged is not None:
                self._staged.state = StageState.DISCARDED
                self._staged = None
            for ram in self._ram:
                ram.close()
            if self._journal is not None:
                self._journal.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
