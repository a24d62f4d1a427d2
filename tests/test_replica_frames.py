"""The standby's page frames (kemari.replica.frames) and checkpoints staged as whole frames.

A frame is a RAM_PAGES batch kept whole: zero pages, then data pages back to back; the
journal and the apply take frames in order, a run of consecutive pages per copy.  The
property tests compare the committed RAM with a model that writes page by page.
"""

from __future__ import annotations

import array
import itertools
import mmap
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kemari import persist
from kemari.errors import ReplicaError
from kemari.replica import RecoveryAction, Replica, store
from kemari.replica.frames import PageFrame, page_runs, write_frame
from kemari.replica.journal import Journal, JournalRecord

PAGE = 4096
SHM = Path("/dev/shm")
# Small blocks: pages repeat often, and a checkpoint easily carries more pages than the
# guest has (the staging then keeps each page's last write only).
BLOCKS = [("pc.ram", 12 * PAGE), ("/rom@etc/acpi/tables", 3 * PAGE), ("vga.vram", 5 * PAGE)]
BLOCK_PAGES = {name: size // PAGE for name, size in BLOCKS}


def page_content(tag: int, page: int) -> bytes:
    """A page that says who wrote it and where."""
    return struct.pack("<QQ", tag, page) + bytes([(tag * 7 + page) % 251 + 1]) * (PAGE - 16)


def page_numbers(numbers: list[int]) -> array.array[int]:
    return array.array("I", numbers)


# ----- page runs and one frame -----------------------------------------------------------


@given(st.lists(st.integers(0, 40), max_size=60))
def test_page_runs_cover_the_numbers_in_order_in_maximal_runs(numbers):
    runs = page_runs(page_numbers(numbers))
    rebuilt = [first + k for first, _, count in runs for k in range(count)]
    assert rebuilt == numbers
    positions = [position for _, position, _ in runs]
    assert positions == sorted(positions) and (not runs or positions[0] == 0)
    for (first, position, count), (next_first, next_position, _) in itertools.pairwise(runs):
        assert next_position == position + count
        assert next_first != first + count  # a run ends only where the numbers jump


def test_page_runs_example():
    assert page_runs(page_numbers([3, 4, 5, 9, 4, 4])) == [
        (3, 0, 3),
        (9, 3, 1),
        (4, 4, 1),
        (4, 5, 1),
    ]
    assert page_runs(page_numbers([])) == []


@settings(max_examples=150)
@given(
    zeros=st.lists(st.integers(0, 139), max_size=80),
    datas=st.lists(st.integers(0, 139), max_size=80),
    fill=st.integers(0, 255),
)
def test_write_frame_equals_writing_page_by_page(zeros, datas, fill):
    """Zero runs longer than the shared fill buffer (64 pages) are cut in pieces."""
    pages = 140
    data = b"".join(page_content(n, page) for n, page in enumerate(datas))
    frame = PageFrame(0, fill, page_numbers(zeros), page_numbers(datas), data)
    model = bytearray(b"\xee" * pages * PAGE)
    for page in zeros:
        model[page * PAGE : (page + 1) * PAGE] = bytes([fill]) * PAGE
    for n, page in enumerate(datas):
        model[page * PAGE : (page + 1) * PAGE] = data[n * PAGE : (n + 1) * PAGE]
    with mmap.mmap(-1, pages * PAGE) as target:
        target[:] = b"\xee" * pages * PAGE
        write_frame(target, frame)
        assert target[:] == model


def test_a_long_zero_run_is_written_whole():
    with mmap.mmap(-1, 200 * PAGE) as target:
        target[:] = b"\x01" * 200 * PAGE
        write_frame(target, PageFrame(0, 0, page_numbers([*range(3, 198)]), page_numbers([]), b""))
        assert target[: 3 * PAGE] == b"\x01" * 3 * PAGE
        assert target[3 * PAGE : 198 * PAGE] == bytes(195 * PAGE)
        assert target[198 * PAGE :] == b"\x01" * 2 * PAGE


# ----- checkpoints of frames against a page-by-page model ------------------------------


@dataclass(frozen=True)
class Put:
    """One staging call: a frame (put_pages), one data page (put_page) or one fill (put_zero)."""

    kind: str  # "frame", "page", "fill"
    block: str
    zero_pages: tuple[int, ...]
    data_pages: tuple[int, ...]
    fill: int
    tag: int

    def data(self) -> bytes:
        return b"".join(page_content(self.tag + n, page) for n, page in enumerate(self.data_pages))

    def stage(self, staged, buffer_kind) -> None:
        if self.kind == "frame":
            numbers = array.array("I", self.zero_pages), array.array("I", self.data_pages)
            staged.put_pages(self.block, *numbers, buffer_kind(self.data()))
        elif self.kind == "page":
            staged.put_page(self.block, self.data_pages[0] * PAGE, buffer_kind(self.data()))
        else:
            staged.put_zero(self.block, self.zero_pages[0] * PAGE, self.fill)

    def apply(self, model: dict[str, bytearray]) -> None:
        ram = model[self.block]
        for page in self.zero_pages:
            ram[page * PAGE : (page + 1) * PAGE] = bytes([self.fill]) * PAGE
        data = self.data()
        for n, page in enumerate(self.data_pages):
            ram[page * PAGE : (page + 1) * PAGE] = data[n * PAGE : (n + 1) * PAGE]


@st.composite
def puts(draw) -> Put:
    block = draw(st.sampled_from([name for name, _ in BLOCKS]))
    numbers = st.integers(0, BLOCK_PAGES[block] - 1)
    kind = draw(st.sampled_from(["frame", "frame", "frame", "page", "fill"]))
    tag = draw(st.integers(0, 1 << 20))
    if kind == "frame":
        zeros = draw(st.lists(numbers, max_size=4))
        datas = draw(st.lists(numbers, max_size=8))
        return Put(kind, block, tuple(zeros), tuple(datas), 0, tag)
    page = draw(numbers)
    if kind == "page":
        return Put(kind, block, (), (page,), 0, tag)
    return Put(kind, block, (page,), (), draw(st.integers(0, 255)), tag)


checkpoints = st.tuples(
    st.sampled_from(["commit", "defer", "discard", "reopen"]),
    st.lists(puts(), max_size=8),
    st.binary(max_size=32),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(checkpoints, min_size=1, max_size=7),
    buffer_kind=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_committed_ram_equals_a_page_by_page_model(steps, buffer_kind):
    """Frames with repeated pages (in one frame and across frames), zero pages and
    fills, over three blocks; the first checkpoint goes straight into the RAM files, the
    later ones through the journal (also redone by a reopen).  After every step the
    committed RAM is what writing each page in order gives."""
    directory = Path(tempfile.mkdtemp(prefix="kemari-frames-prop-", dir=SHM))
    try:
        model = {name: bytearray(size) for name, size in BLOCKS}
        model_state, epoch = b"", 0
        replica = Replica.create(directory / "r", BLOCKS)
        for action, calls, device_state in steps:
            if action == "reopen":
                replica.close()
                replica = Replica.open(directory / "r")
                assert replica.recovery is RecoveryAction.NONE
                continue
            staged_model = {name: bytearray(ram) for name, ram in model.items()}
            with replica.begin(epoch + 1) as staged:
                for call in calls:
                    call.stage(staged, buffer_kind)
                    call.apply(staged_model)
                staged.set_device_state(device_state)
                if action != "discard":
                    staged.commit(defer_apply=action == "defer")
                    model, model_state, epoch = staged_model, device_state, epoch + 1
            assert (replica.committed_epoch, replica.device_state) == (epoch, model_state)
            if not replica.apply_is_pending:
                assert ram_contents(replica) == as_bytes(model)
        replica.close()
        with Replica.open(directory / "r") as reopened:
            assert ram_contents(reopened) == as_bytes(model)
            assert (reopened.committed_epoch, reopened.device_state) == (epoch, model_state)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def ram_contents(replica: Replica) -> dict[str, bytes]:
    return {info.name: info.path.read_bytes() for info in replica.blocks}


def as_bytes(model: dict[str, bytearray]) -> dict[str, bytes]:
    return {name: bytes(ram) for name, ram in model.items()}


def test_a_checkpoint_that_repeats_pages_keeps_each_page_once(tmp_path):
    """A primary sending the same pages over and over cannot make the staging hold more
    than twice the guest's pages, nor the journal more than the guest's pages."""
    guest_pages = sum(BLOCK_PAGES.values())
    with Replica.create(tmp_path / "r", BLOCKS) as replica:
        committed_first(replica)
        with replica.begin(2) as staged:
            for round_ in range(10):
                staged.put_pages("vga.vram", [0], [], b"")
                data = b"".join(page_content(round_, page) for page in range(12))
                staged.put_pages("pc.ram", [], [*range(12)], data)
                assert staged.page_count <= 2 * guest_pages
            staged.put_zero("vga.vram", 0, 7)
            staged.set_device_state(b"two")
            staged.commit(defer_apply=True)
            journal = (tmp_path / "r" / "journal").read_bytes()
            assert struct.unpack_from("<I", journal, 56)[0] <= guest_pages  # data pages
        assert replica.read_page("pc.ram", 5 * PAGE) == page_content(9, 5)
        assert replica.read_page("vga.vram", 0) == bytes([7]) * PAGE


def committed_first(replica: Replica) -> None:
    with replica.begin(1) as staged:
        staged.put_pages("pc.ram", [], [0], page_content(1, 0))
        staged.set_device_state(b"one")
        staged.commit()


def test_a_replica_of_the_per_page_journal_is_refused_in_one_line(tmp_path):
    """Layout 1 went with the per-page journal (version 1): refused as older, not read."""
    with Replica.create(tmp_path / "r", BLOCKS) as replica:
        committed_first(replica)
    layout = tmp_path / "r" / "replica.json"
    payload = persist.read_file(layout, store.LAYOUT_FORMAT)
    old = persist.Format("replica layout", b"KMR:LAYT", 1, 4 << 20)
    persist.write_file(layout, old, payload)
    with pytest.raises(ReplicaError, match="written by an older Kemari") as caught:
        Replica.open(tmp_path / "r")
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value.__cause__, persist.OlderVersionError)


@pytest.mark.parametrize("owned", [False, True])
def test_a_mutable_frame_buffer_is_copied_unless_handed_over(tmp_path, owned):
    """Without ``owned`` a bytearray is copied when staged; with it (the receiver's fresh
    frame buffer, never written again) it is kept by reference, with no copy."""
    with Replica.create(tmp_path / "r", BLOCKS) as replica:
        committed_first(replica)
        buffer = bytearray(page_content(2, 3) + page_content(2, 4))
        with replica.begin(2) as staged:
            staged.put_pages("pc.ram", [], [3, 4], buffer, owned=owned)
            buffer[:PAGE] = page_content(9, 9)
            staged.set_device_state(b"two")
            staged.commit()
        assert replica.read_page("pc.ram", 3 * PAGE) == (
            page_content(9, 9) if owned else page_content(2, 3)
        )
        assert replica.read_page("pc.ram", 4 * PAGE) == page_content(2, 4)


@pytest.mark.parametrize(
    "frame",
    [
        PageFrame(3, 0, page_numbers([0]), page_numbers([]), b""),  # no block 3
        PageFrame(1, 0, page_numbers([]), page_numbers([3]), page_content(0, 3)),  # 3 pages
    ],
)
def test_a_committed_journal_with_a_page_outside_the_blocks_is_refused(tmp_path, frame):
    """The crc32 makes this a bug, never damage: open() refuses it in one line."""
    directory = tmp_path / "r"
    with Replica.create(directory, BLOCKS) as replica:
        committed_first(replica)
    journal = Journal(directory / "journal", durable=False)
    journal.write(JournalRecord(2, 1, 0.0, b"two", [frame]))
    journal.close()
    with pytest.raises(ReplicaError, match="has pages outside the blocks") as caught:
        Replica.open(directory)
    assert "\n" not in str(caught.value)
