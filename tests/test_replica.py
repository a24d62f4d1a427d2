"""Tests of the standby replica (kemari.replica): validation, atomic commits, real SIGKILLs."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import prerequisites

from kemari import persist
from kemari.crashpoint import ENVIRONMENT_VARIABLE
from kemari.errors import KemariError, ReplicaError
from kemari.persist import is_volatile
from kemari.replica import RecoveryAction, Replica, StageState, store

PAGE = 4096
RAM = "pc.ram"
ROM = "/rom@etc/acpi/tables"
VRAM = "0000:00:02.0/vga.vram"
BLOCKS = [(RAM, 64 * PAGE), (ROM, 8 * PAGE), (VRAM, 16 * PAGE)]
TESTS_DIR = Path(__file__).resolve().parent
SHM = Path("/dev/shm")


def page_of(tag: int, offset: int, epoch: int) -> bytes:
    """A recognisable page: who wrote it, where, and in which epoch."""
    head = struct.pack("<QQQ", tag, offset, epoch)
    return head + bytes([(tag + offset // PAGE + epoch) % 256]) * (PAGE - len(head))


def ram_contents(replica: Replica) -> dict[str, bytes]:
    return {info.name: info.path.read_bytes() for info in replica.blocks}


def zero_model(blocks=BLOCKS) -> dict[str, bytearray]:
    return {name: bytearray(size) for name, size in blocks}


def as_bytes(model: dict[str, bytearray]) -> dict[str, bytes]:
    return {name: bytes(data) for name, data in model.items()}


@pytest.fixture(params=["shm", "disk"])
def replica_dir(request, tmp_path):
    """A replica directory on tmpfs (volatile: no fsync) and one on the disk (durable)."""
    if request.param == "shm":
        directory = Path(tempfile.mkdtemp(prefix="kemari-replica-test-", dir=SHM))
        yield directory / "replica"
        shutil.rmtree(directory, ignore_errors=True)
    else:
        # The durable mode needs a disk filesystem; where pytest's tmp_path is in memory
        # (a tmpfs /tmp), /var/tmp usually is not.
        if not is_volatile(tmp_path):
            yield tmp_path / "replica"
            return
        directory = Path(tempfile.mkdtemp(prefix="kemari-replica-test-", dir="/var/tmp"))
        try:
            if is_volatile(directory):
                prerequisites.missing(
                    "a disk filesystem for the durable replica (tmp_path and /var/tmp are "
                    "in memory here)",
                    "run pytest with --basetemp=DIR on a disk filesystem",
                )
            yield directory / "replica"
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def committed(replica: Replica, epoch: int, pages=(), device_state=b"dev") -> None:
    with replica.begin(epoch) as staged:
        for block, offset, data in pages:
            if isinstance(data, int):
                staged.put_zero(block, offset, data)
            else:
                staged.put_page(block, offset, data)
        staged.set_device_state(device_state)
        staged.commit()


# ----- layout, creation, QEMU facts -----------------------------------------------------


def test_create_lays_out_one_reserved_file_per_block(replica_dir):
    with Replica.create(replica_dir, BLOCKS, config_digest="abc123") as replica:
        assert replica.committed_epoch == 0
        assert replica.device_state == b""
        assert [info.name for info in replica.blocks] == [RAM, ROM, VRAM]
        assert [info.shared for info in replica.blocks] == [True, False, False]
        assert replica.durable is (not is_volatile(replica_dir))
        for name, size in BLOCKS:
            path = replica.ram_path(name)
            assert path.stat().st_size == size
            assert path.stat().st_blocks * 512 >= size  # reserved, not sparse
            assert path.read_bytes() == bytes(size)
    with Replica.open(replica_dir) as replica:
        assert replica.config_digest == "abc123"
        assert replica.recovery is RecoveryAction.NONE
        assert replica.committed_epoch == 0


def test_explicit_shared_blocks_and_ram_directory(tmp_path):
    ram_dir = Path(tempfile.mkdtemp(prefix="kemari-replica-ram-", dir=SHM))
    try:
        with Replica.create(tmp_path / "r", BLOCKS, {RAM, VRAM}, ram_directory=ram_dir) as replica:
            assert {info.name for info in replica.blocks if info.shared} == {RAM, VRAM}
            assert replica.ram_path(VRAM).parent == ram_dir.resolve()
            assert replica.durable  # metadata on disk
    finally:
        shutil.rmtree(ram_dir)


@pytest.mark.parametrize(
    ("blocks", "shared", "match"),
    [
        ([], None, "1..1024 RAM blocks"),
        ([(RAM, 4095)], None, "multiple of 4096"),
        ([(RAM, 0)], None, "multiple of 4096"),
        ([(RAM, True)], None, "multiple of 4096"),
        ([("", PAGE)], None, "non-empty"),
        ([("x" * 256, PAGE)], None, "255 bytes"),
        ([("a\0b", PAGE)], None, "NUL"),
        ([(RAM, PAGE), (RAM, PAGE)], None, "twice"),
        ([(RAM, PAGE)], {"nope"}, "not RAM blocks"),
        ([(RAM, PAGE, 1)], None, "pair"),
    ],
)
def test_create_rejects_bad_block_lists(tmp_path, blocks, shared, match):
    with pytest.raises(ReplicaError, match=match):
        Replica.create(tmp_path / "r", blocks, shared)
    assert not (tmp_path / "r" / "replica.json").exists()


def test_create_refuses_an_existing_replica_and_open_needs_one(tmp_path):
    Replica.create(tmp_path / "r", BLOCKS).close()
    with pytest.raises(ReplicaError, match="already holds a replica"):
        Replica.create(tmp_path / "r", BLOCKS)
    with pytest.raises(ReplicaError, match="no replica"):
        Replica.open(tmp_path / "missing")


def test_one_process_at_a_time(tmp_path):
    with (
        Replica.create(tmp_path / "r", BLOCKS),
        pytest.raises(ReplicaError, match="open in another process"),
    ):
        Replica.open(tmp_path / "r")
    Replica.open(tmp_path / "r").close()


def test_replica_error_is_a_kemari_error():
    assert issubclass(ReplicaError, KemariError)


# ----- staging validation ---------------------------------------------------------------


@pytest.fixture
def live(tmp_path):
    with Replica.create(tmp_path / "r", BLOCKS) as replica:
        committed(replica, 1, [(RAM, 0, page_of(1, 0, 1))])
        yield replica


@pytest.mark.parametrize(
    ("block", "offset", "data", "match"),
    [
        ("pc.rom", 0, b"\0" * PAGE, "unknown RAM block"),
        (RAM, 1, b"\0" * PAGE, "page-aligned"),
        (RAM, -PAGE, b"\0" * PAGE, "page-aligned"),
        (RAM, 64 * PAGE, b"\0" * PAGE, "page-aligned"),
        (ROM, 8 * PAGE, b"\0" * PAGE, "page-aligned"),
        (RAM, "0", b"\0" * PAGE, "not an integer"),
        (RAM, 0, b"\0" * (PAGE - 1), "not 4096"),
        (RAM, 0, b"\0" * (PAGE + 1), "not 4096"),
        (RAM, 0, b"", "not 4096"),
    ],
)
def test_put_page_validation(live, block, offset, data, match):
    before = ram_contents(live)
    with live.begin(2) as staged:
        with pytest.raises(ReplicaError, match=match):
            staged.put_page(block, offset, data)
        assert staged.page_count == 0
    assert ram_contents(live) == before
    assert live.committed_epoch == 1


@pytest.mark.parametrize("fill", [-1, 256, True, 1.0])
def test_put_zero_validation(live, fill):
    with live.begin(2) as staged, pytest.raises(ReplicaError, match="not a byte"):
        staged.put_zero(RAM, 0, fill)


@pytest.mark.parametrize("epoch", [0, 1, -5, True, 2**63, "2"])
def test_epoch_must_grow(live, epoch):
    with pytest.raises(ReplicaError, match="epoch"):
        live.begin(epoch)
    live.begin(2).discard()  # nothing was left staged


def test_one_checkpoint_at_a_time_and_no_reuse(live):
    staged = live.begin(2)
    with pytest.raises(ReplicaError, match="still being staged"):
        live.begin(3)
    with pytest.raises(ReplicaError, match="no device state"):
        staged.commit()
    assert staged.state is StageState.OPEN
    staged.set_device_state(b"d2")
    staged.commit()
    for call in (
        lambda: staged.put_page(RAM, 0, b"\0" * PAGE),
        lambda: staged.put_zero(RAM, 0),
        lambda: staged.set_device_state(b"x"),
        staged.commit,
        staged.discard,
    ):
        with pytest.raises(ReplicaError, match="already committed"):
            call()
    live.close()
    with pytest.raises(ReplicaError, match="closed"):
        live.begin(3)


def test_closing_the_replica_discards_a_staged_checkpoint(tmp_path):
    replica = Replica.create(tmp_path / "r", BLOCKS)
    staged = replica.begin(1)
    staged.put_page(RAM, 0, page_of(1, 0, 1))
    replica.close()
    assert staged.state is StageState.DISCARDED
    with pytest.raises(ReplicaError, match="already discarded"):
        staged.put_page(RAM, 0, page_of(1, 0, 1))
    with Replica.open(tmp_path / "r") as reopened:
        assert reopened.committed_epoch == 0
        assert ram_contents(reopened) == as_bytes(zero_model())


def test_mutable_page_buffers_are_copied_when_staged(live):
    buffer = bytearray(page_of(7, 0, 2))
    with live.begin(2) as staged:
        staged.put_page(RAM, PAGE, buffer)
        staged.put_page(ROM, 0, memoryview(bytes(PAGE * 2))[PAGE:])
        buffer[:] = b"\xff" * PAGE  # the receiver reuses its buffer
        staged.set_device_state(b"d2")
        staged.commit()
    assert live.read_page(RAM, PAGE) == page_of(7, 0, 2)


# ----- commit, discard, recovery --------------------------------------------------------


def test_commit_then_reopen_keeps_ram_and_device_state(replica_dir):
    with Replica.create(replica_dir, BLOCKS) as replica:
        committed(replica, 1, [(RAM, 0, page_of(1, 0, 1))], b"state-1")
        committed(replica, 5, [(RAM, 0, 0), (VRAM, 15 * PAGE, page_of(2, 15, 5))], b"state-5")
        first_commit = replica.committed_at
        assert first_commit > 0
    with Replica.open(replica_dir) as replica:
        assert replica.committed_epoch == 5
        assert replica.committed_at == first_commit
        assert replica.device_state == b"state-5"
        assert replica.read_page(RAM, 0) == bytes(PAGE)
        assert replica.read_page(VRAM, 15 * PAGE) == page_of(2, 15, 5)


def test_discard_leaves_no_trace(replica_dir):
    with Replica.create(replica_dir, BLOCKS) as replica:
        with replica.begin(1) as staged:  # the first, unjournaled checkpoint
            staged.put_page(RAM, 0, page_of(1, 0, 1))
            staged.set_device_state(b"never")
        assert staged.state is StageState.DISCARDED
        assert replica.committed_epoch == 0
        assert ram_contents(replica) == as_bytes(zero_model())
        committed(replica, 1, [(ROM, PAGE, page_of(3, 1, 1))], b"one")
        before = ram_contents(replica)
        with replica.begin(2) as staged:
            staged.put_page(ROM, PAGE, page_of(4, 1, 2))
            staged.put_zero(RAM, 0, 9)
            staged.set_device_state(b"two")
            staged.discard()
        assert ram_contents(replica) == before
        assert (replica.committed_epoch, replica.device_state) == (1, b"one")
    with Replica.open(replica_dir) as replica:
        assert ram_contents(replica) == before
        assert replica.device_state == b"one"


def test_deferred_apply_is_committed_before_it_is_applied(replica_dir):
    with Replica.create(replica_dir, BLOCKS) as replica:
        committed(replica, 1, [], b"one")
        with replica.begin(2) as staged:
            staged.put_page(RAM, 3 * PAGE, page_of(5, 3, 2))
            staged.set_device_state(b"two")
            staged.commit(defer_apply=True)
        assert replica.apply_is_pending
        assert replica.committed_epoch == 2
        assert replica.ram_path(RAM).read_bytes()[3 * PAGE : 4 * PAGE] == bytes(PAGE)
        assert replica.read_page(RAM, 3 * PAGE) == page_of(5, 3, 2)  # applies first
        assert not replica.apply_is_pending
        with replica.begin(3) as staged:
            staged.put_zero(RAM, 3 * PAGE, 1)
            staged.set_device_state(b"three")
            staged.commit(defer_apply=True)
    # close() applied it
    with Replica.open(replica_dir) as replica:
        assert replica.recovery is RecoveryAction.NONE
        assert replica.read_page(RAM, 3 * PAGE) == b"\x01" * PAGE


def test_failover_pages_cover_exactly_the_unshared_blocks(tmp_path):
    with Replica.create(tmp_path / "r", BLOCKS) as replica:
        with pytest.raises(ReplicaError, match="nothing to fail over"):
            list(replica.failover_pages())
        committed(replica, 1, [(ROM, 2 * PAGE, page_of(1, 2, 1)), (VRAM, 0, 0xAA)])
        pages = list(replica.failover_pages())
    assert [(p.block, p.offset) for p in pages] == [
        (name, offset) for name, size in BLOCKS if name != RAM for offset in range(0, size, PAGE)
    ]
    contents = {(p.block, p.offset): bytes(p.data) for p in pages}
    assert contents[(ROM, 2 * PAGE)] == page_of(1, 2, 1)
    assert contents[(VRAM, 0)] == b"\xaa" * PAGE
    assert contents[(ROM, 0)] == bytes(PAGE)


def test_hand_over_closes_and_retires_the_replica(tmp_path):
    with Replica.create(tmp_path / "r", BLOCKS) as replica:
        with pytest.raises(ReplicaError, match="nothing to fail over"):
            replica.hand_over()
        committed(replica, 1, [], b"one")
        with replica.begin(2) as staged:
            staged.put_page(RAM, 0, page_of(1, 0, 2))
            staged.set_device_state(b"two")
            staged.commit(defer_apply=True)
        replica.hand_over()
        with pytest.raises(ReplicaError, match="closed"):
            replica.begin(3)
    assert (tmp_path / "r" / "ram" / "000-pc.ram.ram").read_bytes()[:PAGE] == page_of(1, 0, 2)
    with pytest.raises(ReplicaError, match=r"handed over to a failover QEMU \(epoch 2\)"):
        Replica.open(tmp_path / "r")


def test_corrupt_state_file_is_refused(tmp_path):
    with Replica.create(tmp_path / "r", BLOCKS) as replica:
        committed(replica, 1, [], b"device")
    state = tmp_path / "r" / "state.bin"
    data = bytearray(state.read_bytes())
    data[-1] ^= 1
    state.write_bytes(bytes(data))
    with pytest.raises(ReplicaError, match="CRC does not match") as caught:
        Replica.open(tmp_path / "r")
    assert isinstance(caught.value.__cause__, persist.TornFileError)


def test_tampered_layout_is_refused(tmp_path):
    Replica.create(tmp_path / "r", BLOCKS).close()
    layout_path = tmp_path / "r" / "replica.json"
    layout = json.loads(persist.read_file(layout_path, store.LAYOUT_FORMAT))
    layout["blocks"][0]["file"] = "../../etc/passwd"
    persist.write_file(layout_path, store.LAYOUT_FORMAT, json.dumps(layout).encode())
    with pytest.raises(ReplicaError, match="unexpected file name"):
        Replica.open(tmp_path / "r")
    # Edited by hand without its frame: refused before the JSON is even looked at.
    layout_path.write_text(json.dumps(layout))
    with pytest.raises(
        ReplicaError, match=f"not a version {store.LAYOUT_FORMAT.version} replica layout file"
    ):
        Replica.open(tmp_path / "r")


# What the replica's files looked like before kemari.persist (format 1 of each).
_OLD_STATE = struct.pack("<4sIQdQI", b"KMRS", 1, 3, 0.0, 0, 0)


@pytest.mark.parametrize(
    ("name", "old_content", "kind", "match"),
    [
        ("replica.json", b'{"format": 1, "blocks": []}', persist.ForeignFileError, "layout"),
        ("state.bin", _OLD_STATE, persist.ForeignFileError, "older Kemari"),
        ("handed-over", b"3\n", None, r"handed over .*\(its marker: .* older Kemari\)"),
    ],
)
def test_an_old_format_file_is_a_clear_error_not_a_traceback(
    tmp_path, name, old_content, kind, match
):
    with Replica.create(tmp_path / "r", BLOCKS) as replica:
        committed(replica, 1, [], b"one")
    (tmp_path / "r" / name).write_bytes(old_content)
    with pytest.raises(ReplicaError, match=match) as caught:
        Replica.open(tmp_path / "r")
    assert "\n" not in str(caught.value)
    if kind is not None:
        assert isinstance(caught.value.__cause__, kind)


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("replica.json", "LAYOUT_FORMAT"), ("state.bin", "STATE_FORMAT")],
)
def test_torn_newer_and_oversized_replica_files(tmp_path, name, fmt):
    with Replica.create(tmp_path / "r", BLOCKS) as replica:
        committed(replica, 1, [], b"one")
    path = tmp_path / "r" / name
    good = path.read_bytes()
    path.write_bytes(good[:-3])
    with pytest.raises(ReplicaError, match="is torn") as caught:
        Replica.open(tmp_path / "r")
    assert isinstance(caught.value.__cause__, persist.TornFileError)
    current = getattr(store, fmt)
    newer = persist.Format(current.name, current.magic, current.version + 1, 100)
    persist.write_file(path, newer, b"{}")
    with pytest.raises(ReplicaError, match="written by a newer Kemari") as caught:
        Replica.open(tmp_path / "r")
    assert isinstance(caught.value.__cause__, persist.NewerVersionError)
    path.write_bytes(
        persist.HEADER.pack(current.magic, current.version, 0, current.max_payload + 1)
    )
    with pytest.raises(ReplicaError, match="more than the") as caught:
        Replica.open(tmp_path / "r")
    assert isinstance(caught.value.__cause__, persist.OversizedFileError)


def test_resized_ram_file_is_refused(tmp_path):
    with Replica.create(tmp_path / "r", BLOCKS) as replica:
        path = replica.ram_path(ROM)
    os.truncate(path, PAGE)
    with pytest.raises(ReplicaError, match="expected"):
        Replica.open(tmp_path / "r")


# ----- model-based property test --------------------------------------------------------

MODEL_BLOCKS = [(RAM, 6 * PAGE), (ROM, 2 * PAGE)]
write_strategy = st.tuples(
    st.sampled_from([RAM, ROM]),
    st.integers(min_value=0, max_value=5),
    st.one_of(st.integers(min_value=0, max_value=255), st.binary(min_size=1, max_size=8)),
)
checkpoint_strategy = st.tuples(
    st.sampled_from(["commit", "defer", "discard", "reopen"]),
    st.lists(write_strategy, max_size=6),
    st.binary(max_size=64),
    st.integers(min_value=1, max_value=3),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(checkpoint_strategy, min_size=1, max_size=8))
def test_ram_always_equals_the_model_of_committed_checkpoints(steps):
    directory = Path(tempfile.mkdtemp(prefix="kemari-replica-prop-", dir=SHM))
    try:
        model = zero_model(MODEL_BLOCKS)
        model_state = b""
        model_epoch = 0
        replica = Replica.create(directory / "r", MODEL_BLOCKS)
        for action, writes, device_state, epoch_step in steps:
            if action == "reopen":
                replica.close()
                replica = Replica.open(directory / "r")
                assert replica.recovery is RecoveryAction.NONE
            else:
                epoch = model_epoch + epoch_step
                staged_model = {name: bytearray(data) for name, data in model.items()}
                with replica.begin(epoch) as staged:
                    for block, page, value in writes:
                        offset = (page % (dict(MODEL_BLOCKS)[block] // PAGE)) * PAGE
                        if isinstance(value, int):
                            staged.put_zero(block, offset, value)
                            data = bytes([value]) * PAGE
                        else:
                            data = (value * PAGE)[:PAGE]
                            staged.put_page(block, offset, data)
                        staged_model[block][offset : offset + PAGE] = data
                    staged.set_device_state(device_state)
                    if action != "discard":
                        staged.commit(defer_apply=action == "defer")
                        model, model_state, model_epoch = staged_model, device_state, epoch
            assert replica.committed_epoch == model_epoch
            assert replica.device_state == model_state
            if not replica.apply_is_pending:
                assert ram_contents(replica) == as_bytes(model)
        replica.close()
        with Replica.open(directory / "r") as reopened:
            assert ram_contents(reopened) == as_bytes(model)
            assert (reopened.committed_epoch, reopened.device_state) == (model_epoch, model_state)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ----- a committed journal with damaged bytes ------------------------------------------


@pytest.fixture(scope="module")
def unapplied_journal():
    """A replica at epoch 2 plus the complete, not yet applied journal of epoch 3."""
    base = Path(tempfile.mkdtemp(prefix="kemari-replica-journal-", dir=SHM))
    template = base / "template"
    with Replica.create(template, BLOCKS) as replica:
        committed(replica, 1, [(RAM, 0, page_of(1, 0, 1))], b"one")
        committed(replica, 2, [(ROM, PAGE, page_of(1, 1, 2)), (RAM, 0, 3)], b"two")
        old = ram_contents(replica)
        shutil.copytree(template, base / "epoch2")
        with replica.begin(3) as staged:
            staged.put_page(RAM, 5 * PAGE, page_of(3, 5, 3))
            staged.put_zero(VRAM, 0, 0x55)
            staged.put_page(ROM, 0, page_of(3, 0, 3))
            frame = [page_of(3, page * PAGE, 3) for page in (9, 10, 11, 30)]
            staged.put_pages(RAM, [0, 7, 9], [9, 10, 11, 30], b"".join(frame))
            staged.set_device_state(b"three" * 10)
            staged.commit(defer_apply=True)
        journal = (template / "journal").read_bytes()
    with Replica.open(template) as replica:
        new = ram_contents(replica)
    yield base, journal, old, new
    shutil.rmtree(base, ignore_errors=True)


def _with_journal(base: Path, journal: bytes, name: str) -> Path:
    directory = base / name
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(base / "epoch2", directory)
    (directory / "journal").write_bytes(journal)
    return directory


def test_complete_journal_is_redone_at_open(unapplied_journal):
    base, journal, _old, new = unapplied_journal
    with Replica.open(_with_journal(base, journal, "intact")) as replica:
        assert replica.recovery is RecoveryAction.REPLAYED
        assert (replica.committed_epoch, replica.device_state) == (3, b"three" * 10)
        assert ram_contents(replica) == new


def _checked_regions(journal: bytes) -> list[int]:
    """Every journal byte except page data and alignment padding."""
    frames, page_count = (
        struct.unpack_from("<I", journal, 12)[0],
        struct.unpack_from("<I", journal, 56)[0],
    )
    device_length = struct.unpack_from("<Q", journal, 48)[0]
    table = [struct.unpack_from("<IIII", journal, 64 + 16 * n) for n in range(frames)]
    table_end = 64 + 16 * frames + 4 * sum(zeros + datas for _, _, zeros, datas in table)
    pages_at = (table_end + PAGE - 1) // PAGE * PAGE
    device_at = pages_at + page_count * PAGE
    return [*range(table_end), *range(device_at, device_at + device_length + 24)]


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(choice=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_damaged_journal_is_dropped_never_applied(unapplied_journal, choice, flip):
    """A flipped byte anywhere in header, tables, device state or record: the old epoch."""
    base, journal, old, _new = unapplied_journal
    positions = _checked_regions(journal)
    damaged = bytearray(journal)
    damaged[positions[choice % len(positions)]] ^= flip
    with Replica.open(_with_journal(base, bytes(damaged), "damaged")) as replica:
        assert replica.recovery in (RecoveryAction.DROPPED, RecoveryAction.NONE)
        assert (replica.committed_epoch, replica.device_state) == (2, b"two")
        assert ram_contents(replica) == old


# ----- real crashes: a child process applies checkpoints and is SIGKILLed ---------------

CRASH_BLOCKS = [(RAM, 256 * PAGE), (ROM, 16 * PAGE)]
CRASH_PAGES = 96  # at least, per checkpoint


@dataclass(frozen=True)
class CrashFrame:
    """What the crash child stages with one call: a frame (put_pages: zero pages, then
    data pages) or, with ``fill`` set, one filled page (put_zero; ``pages`` is one)."""

    block: str
    zero_pages: list[int]
    data_pages: list[int]
    data: bytes
    fill: int | None = None

    def stage(self, staged) -> None:
        if self.fill is not None:
            staged.put_zero(self.block, self.zero_pages[0] * PAGE, self.fill)
        else:
            staged.put_pages(self.block, self.zero_pages, self.data_pages, self.data)

    def apply(self, model: dict[str, bytearray]) -> None:
        for page in self.zero_pages:
            model[self.block][page * PAGE : (page + 1) * PAGE] = bytes([self.fill or 0]) * PAGE
        for n, page in enumerate(self.data_pages):
            model[self.block][page * PAGE : (page + 1) * PAGE] = self.data[
                n * PAGE : (n + 1) * PAGE
            ]


def crash_epoch_frames(seed: int, epoch: int) -> list[CrashFrame]:
    """The deterministic checkpoint ``epoch`` of a crash run (the child and the test agree):
    frames with runs of pages, scattered and zero pages, single filled pages; pages repeat
    across frames."""
    rng = random.Random(seed * 1_000_003 + epoch)
    frames: list[CrashFrame] = []
    pages = 0
    while pages < CRASH_PAGES:
        block, size = CRASH_BLOCKS[0] if rng.random() < 0.85 else CRASH_BLOCKS[1]
        count = size // PAGE
        if rng.random() < 0.2:
            frames.append(CrashFrame(block, [rng.randrange(count)], [], b"", rng.randrange(256)))
            pages += 1
            continue
        zeros = rng.sample(range(count), rng.randrange(3))
        start = rng.randrange(count)
        datas = [*range(start, min(count, start + rng.randrange(1, 12)))]
        datas += rng.sample(range(count), rng.randrange(3))
        data = b"".join(page_of(seed, page * PAGE, epoch) for page in datas)
        frames.append(CrashFrame(block, zeros, datas, data))
        pages += len(zeros) + len(datas)
    return frames


def crash_device_state(epoch: int) -> bytes:
    return f"device-state-of-epoch-{epoch}".encode() * 50


def crash_model(seed: int, epoch: int) -> dict[str, bytes]:
    model = zero_model(CRASH_BLOCKS)
    for each in range(1, epoch + 1):
        for frame in crash_epoch_frames(seed, each):
            frame.apply(model)
    return as_bytes(model)


def child_main(directory: str, seed: int, last_epoch: int) -> None:
    """Body of the child process: continue the run from the committed epoch, report commits."""
    path = Path(directory)
    replica = (
        Replica.open(path)
        if (path / "replica.json").exists()
        else Replica.create(path, CRASH_BLOCKS)
    )
    for epoch in range(replica.committed_epoch + 1, last_epoch + 1):
        with replica.begin(epoch) as staged:
            for frame in crash_epoch_frames(seed, epoch):
                frame.stage(staged)
            staged.set_device_state(crash_device_state(epoch))
            staged.commit()
        print(f"committed {epoch}", flush=True)
    replica.close()


def start_child(directory: Path, seed: int, last_epoch: int, crash: str | None):
    env = dict(os.environ)
    env.pop(ENVIRONMENT_VARIABLE, None)
    if crash is not None:
        env[ENVIRONMENT_VARIABLE] = crash
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_replica; "
        f"test_replica.child_main({str(directory)!r}, {seed}, {last_epoch})"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )


def reported_epochs(child) -> list[int]:
    assert child.stdout is not None
    return [int(line.split()[1]) for line in child.stdout.read().splitlines()]


def check_one_epoch(directory: Path, seed: int, allowed: set[int]) -> Replica:
    replica = Replica.open(directory)
    epoch = replica.committed_epoch
    assert epoch in allowed
    assert ram_contents(replica) == crash_model(seed, epoch)
    expected_state = crash_device_state(epoch) if epoch else b""
    assert replica.device_state == expected_state
    state = persist.read_file(directory / "state.bin", store.STATE_FORMAT)
    assert struct.unpack_from("<Q", state)[0] == epoch
    return replica


def journal_bytes(frames: list[CrashFrame], device_state: int) -> tuple[int, int, int]:
    """Bytes a journal write has written (padding excluded) when it reaches its first page,
    its commit record, and its end: the units of the ``journal-bytes`` crash hook.  Each
    frame has a 16-byte table entry and 4 bytes per page number."""
    numbers = sum(len(frame.zero_pages) + len(frame.data_pages) for frame in frames)
    pages = sum(len(frame.data_pages) for frame in frames)
    first_page = 64 + 16 * len(frames) + 4 * numbers
    record = first_page + pages * PAGE + device_state
    return first_page, record, record + 24


def _crash_points(seed: int, epoch: int) -> list[tuple[str, bool]]:
    frames = crash_epoch_frames(seed, epoch)
    entries = sum(len(frame.zero_pages) + len(frame.data_pages) for frame in frames)
    pages_at, record_at, total = journal_bytes(frames, len(crash_device_state(epoch)))
    # (hook, whether the new epoch must survive)
    return [
        ("journal-bytes=1", False),
        ("journal-bytes=6", False),
        ("journal-bytes=64", False),
        (f"journal-bytes={pages_at + 3 * PAGE + 17}", False),
        (f"journal-bytes={record_at}", False),
        # magic and crc of the record, not its nonce (its last bytes may match by chance)
        (f"journal-bytes={record_at + 8}", False),
        (f"journal-bytes={total}", True),
        ("journal-complete", True),
        ("apply-pages=1", True),
        (f"apply-pages={entries // 2}", True),
        ("state-written", True),
    ]


SEED = 11
CRASH_AT_EPOCH = 4


@pytest.mark.parametrize(
    ("hook", "survives"),
    _crash_points(SEED, CRASH_AT_EPOCH),
    ids=[hook for hook, _ in _crash_points(SEED, CRASH_AT_EPOCH)],
)
def test_sigkill_at_each_commit_step_leaves_old_or_new_epoch(tmp_path, hook, survives):
    directory = tmp_path / "r"
    setup = start_child(directory, SEED, CRASH_AT_EPOCH - 1, None)
    assert reported_epochs(setup) == [1, 2, 3]
    assert setup.wait() == 0
    child = start_child(directory, SEED, CRASH_AT_EPOCH + 2, hook)
    assert reported_epochs(child) == []
    assert child.wait() == -signal.SIGKILL
    new = CRASH_AT_EPOCH if survives else CRASH_AT_EPOCH - 1
    with check_one_epoch(directory, SEED, {new}) as replica:
        if survives:
            assert replica.recovery is RecoveryAction.REPLAYED
        elif int(hook.split("=")[1]) >= 64:  # the new header (and nonce) is in place
            assert replica.recovery is RecoveryAction.DROPPED
        else:  # the applied journal of the old epoch may be redone: harmless
            assert replica.recovery in (RecoveryAction.DROPPED, RecoveryAction.REPLAYED)
    # the run continues from there
    finish = start_child(directory, SEED, CRASH_AT_EPOCH + 2, None)
    assert reported_epochs(finish) == list(range(new + 1, CRASH_AT_EPOCH + 3))
    assert finish.wait() == 0
    check_one_epoch(directory, SEED, {CRASH_AT_EPOCH + 2}).close()


def test_sigkill_in_the_first_unjournaled_checkpoint_leaves_epoch_zero(tmp_path):
    child = start_child(tmp_path / "r", SEED, 3, "initial-pages=40")
    assert child.wait() == -signal.SIGKILL
    with check_one_epoch(tmp_path / "r", SEED, {0}) as replica:
        assert ram_contents(replica) == as_bytes(zero_model(CRASH_BLOCKS))


@pytest.mark.parametrize("location", ["shm", "disk"])
def test_sigkill_at_random_moments_leaves_old_or_new_epoch(tmp_path, location):
    """Real kill -9 from outside at random times while checkpoints are applied back to back."""
    rng = random.Random(20261125)
    base = (
        Path(tempfile.mkdtemp(prefix="kemari-replica-kill-", dir=SHM))
        if location == "shm"
        else tmp_path
    )
    directory = base / "r"
    last_committed = 0
    try:
        for _round in range(8):
            child = start_child(directory, SEED, 10_000, None)
            assert child.stdout is not None
            wanted = rng.randrange(1, 6)
            seen = 0
            while seen < wanted:
                line = child.stdout.readline()
                assert line.startswith("committed "), line
                last_committed = int(line.split()[1])
                seen += 1
            # a little further into the next checkpoint(s)
            busy_until = rng.randrange(0, 40_000)
            for _ in range(busy_until):
                pass
            child.send_signal(signal.SIGKILL)
            for line in child.stdout.read().splitlines():
                last_committed = int(line.split()[1])
            assert child.wait() == -signal.SIGKILL
            replica = check_one_epoch(directory, SEED, {last_committed, last_committed + 1})
            last_committed = replica.committed_epoch
            replica.close()
    finally:
        if location == "shm":
            shutil.rmtree(base, ignore_errors=True)


# ----- full disk, and QEMU mapping the RAM file ----------------------------------------


def fill_filesystem(path: Path) -> None:
    with open(path, "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * PAGE)
        except OSError:
            pass


@pytest.mark.root  # to mount a small tmpfs (conftest fails the test without root)
def test_full_filesystem_is_a_clear_error(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], check=True)
    try:
        with pytest.raises(ReplicaError, match="no space for RAM file"):
            Replica.create(mount_point / "r", [(RAM, 2 << 20)])
        # a checkpoint whose journal no longer fits: the commit fails, nothing changes
        with Replica.create(mount_point / "r2", [(RAM, 128 * PAGE)]) as replica:
            committed(replica, 1, [(RAM, 0, page_of(1, 0, 1))], b"one")
            fill_filesystem(mount_point / "filler")
            before = ram_contents(replica)
            with replica.begin(2) as staged:
                for page in range(128):
                    staged.put_page(RAM, page * PAGE, page_of(2, page, 2))
                staged.set_device_state(b"two")
                with pytest.raises(ReplicaError, match="no space for journal"):
                    staged.commit()
            assert replica.committed_epoch == 1
            assert ram_contents(replica) == before
        (mount_point / "filler").unlink()
        with Replica.open(mount_point / "r2") as replica:
            assert (replica.committed_epoch, replica.device_state) == (1, b"one")
            assert ram_contents(replica) == before
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def _qmp_session(args: list[str], commands: list[dict]) -> list[dict]:
    lines = "".join(json.dumps(c) + "\n" for c in [{"execute": "qmp_capabilities"}, *commands])
    result = subprocess.run(
        [*args, "-qmp", "stdio"],
        input=lines + '{"execute": "quit"}\n',
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_qemu_maps_the_ram_file_as_block_pc_ram(tmp_path):
    """The failover QEMU sees the committed page at its guest-physical address."""
    qemu = prerequisites.stock_qemu()
    directory = Path(tempfile.mkdtemp(prefix="kemari-replica-qemu-", dir=SHM))
    size = 32 << 20
    marker = page_of(0x4B454D41, 0x200000, 7)
    try:
        with Replica.create(directory / "r", [(RAM, size), (ROM, 32 * PAGE)]) as replica:
            committed(replica, 7, [(RAM, 0x200000, marker)])
            path = replica.ram_path(RAM)
        dump = tmp_path / "dump"
        replies = _qmp_session(
            [
                str(qemu),
                "-accel",
                "tcg",
                "-nodefaults",
                "-display",
                "none",
                "-S",
                "-m",
                "32M",
                "-machine",
                "pc,memory-backend=pc.ram",
                "-object",
                f"memory-backend-file,id=pc.ram,size={size},mem-path={path},share=on,"
                "x-use-canonical-path-for-ramblock-id=off",
            ],
            [
                {
                    "execute": "human-monitor-command",
                    "arguments": {"command-line": "info ramblock"},
                },
                {
                    "execute": "pmemsave",
                    "arguments": {"val": 0x200000, "size": PAGE, "filename": str(dump)},
                },
            ],
        )
        ramblock_table = next(r["return"] for r in replies if "Block Name" in str(r.get("return")))
        names = [line.split()[0] for line in ramblock_table.splitlines()[1:] if line.strip()]
        assert names[0] == RAM
        assert dump.read_bytes() == marker
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_state_file_that_cannot_be_written_after_the_commit_point_keeps_the_epoch(
    tmp_path, monkeypatch
):
    """Issue 10.7: the file system fills after an acknowledged epoch (the journal holds
    it, state.bin cannot be rewritten).  The replica stays at that epoch and can be
    handed over (the old code: "must be reopened"), takes no new checkpoint, and a
    reopen redoes the epoch from the journal."""
    directory = tmp_path / "r"
    replica = Replica.create(directory, BLOCKS)
    committed(replica, 1, [(RAM, 0, page_of(1, 0, 1))], device_state=b"one")
    real_write_state = store._write_state

    def full(*args, **kwargs):
        raise ReplicaError("cannot write state.bin") from OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_write_state", full)
    with replica.begin(2) as staged:
        staged.put_page(RAM, PAGE, page_of(1, PAGE, 2))
        staged.set_device_state(b"two")
        with pytest.raises(ReplicaError, match="only in the journal"):
            staged.commit()
    assert (replica.committed_epoch, replica.device_state) == (2, b"two")
    assert replica.unsaved is not None
    assert replica.read_page(RAM, PAGE) == page_of(1, PAGE, 2)
    with pytest.raises(ReplicaError, match="takes no new checkpoint"):
        replica.begin(3)
    pages = {(p.block, p.offset) for p in replica.failover_pages()}
    assert (ROM, 0) in pages
    monkeypatch.setattr(store, "_write_state", real_write_state)
    replica.close()
    with Replica.open(directory) as reopened:  # the journal's epoch is redone
        assert (reopened.committed_epoch, reopened.device_state) == (2, b"two")
        assert reopened.read_page(RAM, PAGE) == page_of(1, PAGE, 2)
        monkeypatch.setattr(store, "_write_state", full)
        # hand_over needs no state.bin: its marker is written (or, full, left empty).
        reopened.hand_over()
    with pytest.raises(ReplicaError, match="handed over"):
        Replica.open(directory)


# ----- a frame's pages at once ----------------------------------------------------------

frame_pages = st.lists(st.integers(0, 63), max_size=12)


@settings(max_examples=40, deadline=None)
@given(frame_pages, frame_pages, st.sampled_from([bytes, bytearray, memoryview]), st.booleans())
def test_put_pages_stages_what_page_by_page_puts_would(zeros, datas, kind, first):
    """Zero pages first, then data pages in order (a page given twice ends with its last
    content), in the first checkpoint (written in place) and in later ones (staged)."""
    data = b"".join(page_of(7, page * PAGE, n) for n, page in enumerate(datas))
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for batched in (True, False):
            with Replica.create(Path(tmp) / f"r{batched}", BLOCKS) as replica:
                if not first:
                    committed(replica, 1, [(RAM, 0, page_of(1, 0, 1))])
                with replica.begin(1 if first else 2) as staged:
                    if batched:
                        staged.put_pages(RAM, zeros, datas, kind(data))
                    else:
                        for page in zeros:
                            staged.put_zero(RAM, page * PAGE)
                        for n, page in enumerate(datas):
                            staged.put_page(RAM, page * PAGE, data[n * PAGE : (n + 1) * PAGE])
                    staged.set_device_state(b"dev")
                    staged.commit()
                results.append(ram_contents(replica))
        assert results[0] == results[1]


@pytest.mark.parametrize(
    ("zeros", "datas", "data", "match"),
    [
        ([64], [], b"", "outside its 64 pages"),
        ([], [-1], b"\0" * PAGE, "outside its 64 pages"),
        ([], [1, 2], b"\0" * PAGE, "4096 bytes of page data for 2 pages"),
    ],
)
def test_put_pages_validation(live, zeros, datas, data, match):
    before = ram_contents(live)
    with live.begin(2) as staged:
        with pytest.raises(ReplicaError, match=match):
            staged.put_pages(RAM, zeros, datas, data)
        assert staged.page_count == 0
    assert ram_contents(live) == before
