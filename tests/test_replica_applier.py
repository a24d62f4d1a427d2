"""ReplicaApplier without QEMU: generations, epochs, aborts, hand-over and the failover stream."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from array import array
from pathlib import Path

import pytest
from stream_model import Device, device_bytes, vmdesc_json

from kemari import persist
from kemari.errors import ReplicaError
from kemari.replica import Replica
from kemari.replica.applier import (
    CURRENT_LINK,
    REPLICA_SUBDIRECTORY,
    STREAM_FILE,
    STREAM_FORMAT,
    VMDESC_FILE,
    VMDESC_FORMAT,
    ApplierState,
    ReplicaApplier,
)
from kemari.stream import (
    Configuration,
    DeviceState,
    RamBlock,
    RamBlockList,
    RamPageRun,
    StreamParser,
    VmDescription,
)
from kemari.stream.format import PAGE_SIZE

CONFIG = Configuration("pc-i440fx-7.2")
BLOCKS = RamBlockList(2, (RamBlock("pc.ram", 16 * PAGE_SIZE), RamBlock("pc.bios", 2 * PAGE_SIZE)))
VMDESC = vmdesc_json([Device(3, "timer", 0, b"")])


def device(tag: str) -> bytes:
    """A device-state buffer shaped like QEMU's: one FULL section with its footer."""
    return device_bytes([Device(3, "timer", 0, tag.encode())])


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE_SIZE


def run(block: str, pages: dict[int, bytes], zero_pages: tuple[int, ...] = ()) -> RamPageRun:
    """A page run as the stream parser emits it (page numbers increase)."""
    views = [memoryview(data) for data in pages.values()]
    return RamPageRun(block, array("I", pages), views, array("I", zero_pages))


def sync(applier: ReplicaApplier, fill: int, state: bytes = b"") -> None:
    applier.start_sync(CONFIG, BLOCKS)
    applier.put_runs(
        [
            run("pc.ram", {i: page(fill) for i in range(16)}),
            run("pc.bios", {0: page(fill), 1: page(7)}),
        ]
    )
    applier.finish_sync(state or device("dev0"), VMDESC)


def checkpoint(applier: ReplicaApplier, epoch: int, offset: int, fill: int) -> None:
    applier.begin_checkpoint(epoch)
    applier.put_page("pc.ram", offset, page(fill))
    applier.set_device_state(epoch, device(f"dev{epoch}"))
    applier.commit_checkpoint(epoch)


def current_generation(root: Path) -> str:
    return os.readlink(root / CURRENT_LINK)


def generations(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("gen-"))


def test_sync_then_checkpoints_survive_a_reopen(tmp_path: Path) -> None:
    with ReplicaApplier(tmp_path) as applier:
        assert applier.committed_epoch is None
        sync(applier, 1)
        assert applier.committed_epoch == 0
        checkpoint(applier, 1, 0, 2)
        checkpoint(applier, 2, 5 * PAGE_SIZE, 3)
        status = applier.status()
        assert status.committed_epoch == 2 and status.state is ApplierState.IDLE
        assert [r.epoch for r in status.recent] == [0, 1, 2]
        assert status.recent[0].pages == 18 and status.recent[2].pages == 1
    with ReplicaApplier(tmp_path) as reopened:
        assert reopened.committed_epoch == 2
    replica = Replica.open(tmp_path / current_generation(tmp_path) / REPLICA_SUBDIRECTORY)
    with replica:
        assert replica.read_page("pc.ram", 0) == page(2)
        assert replica.read_page("pc.ram", 5 * PAGE_SIZE) == page(3)
        assert replica.read_page("pc.ram", 6 * PAGE_SIZE) == page(1)
        assert replica.device_state == device("dev2")


def test_checkpoint_epochs_must_follow_the_committed_one(tmp_path: Path) -> None:
    with ReplicaApplier(tmp_path) as applier:
        with pytest.raises(ReplicaError, match="no committed replica"):
            applier.begin_checkpoint(1)
        sync(applier, 1)
        with pytest.raises(ReplicaError, match="does not follow"):
            applier.begin_checkpoint(2)
        applier.begin_checkpoint(1)
        with pytest.raises(ReplicaError, match="device state for epoch 2"):
            applier.set_device_state(2, b"x")
        with pytest.raises(ReplicaError, match="commit of epoch 3"):
            applier.commit_checkpoint(3)
        applier.abort("test")
        assert applier.committed_epoch == 0
        checkpoint(applier, 1, 0, 9)
        assert applier.committed_epoch == 1


def test_a_new_sync_replaces_the_old_generation_only_once_committed(tmp_path: Path) -> None:
    with ReplicaApplier(tmp_path) as applier:
        sync(applier, 1)
        checkpoint(applier, 1, 0, 2)
        old = current_generation(tmp_path)
        # A second sync is cut short: the old replica stays current and whole.
        applier.start_sync(CONFIG, BLOCKS)
        applier.put_page("pc.ram", 0, page(5))
        assert applier.committed_epoch == 1 and current_generation(tmp_path) == old
        assert len(generations(tmp_path)) == 2
        applier.abort("primary gone")
        assert generations(tmp_path) == [old]
        assert applier.committed_epoch == 1
        checkpoint(applier, 2, 0, 3)
        # A complete one becomes current, the old one goes away.
        sync(applier, 4, device("fresh"))
        new = current_generation(tmp_path)
        assert new != old and generations(tmp_path) == [new]
        assert applier.committed_epoch == 0
    with ReplicaApplier(tmp_path) as reopened:
        image = reopened.hand_over()
        assert image.epoch == 0 and image.device_state == device("fresh")


def test_half_built_generations_are_removed_at_start(tmp_path: Path) -> None:
    with ReplicaApplier(tmp_path) as applier:
        sync(applier, 1)
    committed = current_generation(tmp_path)
    (tmp_path / "gen-000099" / "replica").mkdir(parents=True)
    with ReplicaApplier(tmp_path) as applier:
        assert applier.committed_epoch == 0
    assert generations(tmp_path) == [committed]


# stream.json and vmdesc.json as they were written before kemari.persist (plain files).
_OLD_STREAM = json.dumps(
    {"format": 1, "machine_type": "pc", "ram_section_id": 2, "blocks": []}
).encode()


@pytest.mark.parametrize(
    ("name", "content"),
    [(STREAM_FILE, _OLD_STREAM), (VMDESC_FILE, VMDESC), ("replica/state.bin", b"KMRS\1\0\0\0")],
)
def test_an_old_format_generation_is_a_clear_error(tmp_path: Path, name: str, content: bytes):
    with ReplicaApplier(tmp_path) as applier:
        sync(applier, 1)
    (tmp_path / current_generation(tmp_path) / name).write_bytes(content)
    with pytest.raises(ReplicaError, match="older Kemari") as caught:
        ReplicaApplier(tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot open the committed replica: ")
    assert message.endswith(f"remove {tmp_path} to discard it")


@pytest.mark.parametrize(
    ("name", "fmt"), [(STREAM_FILE, STREAM_FORMAT), (VMDESC_FILE, VMDESC_FORMAT)]
)
def test_torn_newer_and_oversized_generation_files(tmp_path: Path, name, fmt) -> None:
    with ReplicaApplier(tmp_path) as applier:
        sync(applier, 1)
    path = tmp_path / current_generation(tmp_path) / name
    good = path.read_bytes()
    cases = [
        (good[:-1], persist.TornFileError, "is torn"),
        (good[:-1] + bytes([good[-1] ^ 1]), persist.TornFileError, "CRC does not match"),
        (persist.HEADER.pack(fmt.magic, fmt.version + 1, 0, 0), persist.NewerVersionError, "newer"),
        (
            persist.HEADER.pack(fmt.magic, fmt.version, 0, fmt.max_payload + 1),
            persist.OversizedFileError,
            "more than the",
        ),
    ]
    for content, kind, match in cases:
        path.write_bytes(content)
        with pytest.raises(ReplicaError, match=match) as caught:
            ReplicaApplier(tmp_path)
        assert isinstance(caught.value.__cause__, kind)
        assert "remove" not in str(caught.value)  # damage, not an old format: no hint
    path.write_bytes(good)
    with ReplicaApplier(tmp_path) as applier:
        assert applier.committed_epoch == 0


def test_hand_over_discards_the_open_checkpoint_and_builds_the_stream(tmp_path: Path) -> None:
    with ReplicaApplier(tmp_path) as applier:
        sync(applier, 1)
        checkpoint(applier, 1, 0, 2)
        applier.begin_checkpoint(2)
        applier.put_page("pc.ram", 0, page(8))  # never committed: must not be resumed from
        image = applier.hand_over()
        assert applier.state is ApplierState.HANDED_OVER
        with pytest.raises(ReplicaError, match="handed over"):
            applier.begin_checkpoint(2)
    assert image.epoch == 1 and image.device_state == device("dev1")
    assert image.main_block == "pc.ram" and image.main_block_size == 16 * PAGE_SIZE
    assert image.ram_path.read_bytes()[:PAGE_SIZE] == page(2)
    # The synthesized stream parses back to the replica's blocks, pages and state.
    parser = StreamParser()
    events = parser.feed(b"".join(image.stream()))
    parser.finish()
    block_list = next(e for e in events if isinstance(e, RamBlockList))
    assert [(b.name, b.used_length) for b in block_list.blocks] == [
        ("pc.ram", 16 * PAGE_SIZE),
        ("pc.bios", 2 * PAGE_SIZE),
    ]
    assert block_list.section_id == BLOCKS.section_id
    pages = {
        (e.block, page * PAGE_SIZE): bytes(data)
        for e in events
        if isinstance(e, RamPageRun)
        for page, data in zip(e.data_pages, e.data, strict=True)
    }
    assert pages == {("pc.bios", 0): page(1), ("pc.bios", PAGE_SIZE): page(7)}
    assert next(e for e in events if isinstance(e, DeviceState)).data == device("dev1")
    assert next(e for e in events if isinstance(e, VmDescription)).json == VMDESC
    # A later applier on the same root has no replica (the files were QEMU's RAM), and
    # takes a new sync; the handed-over generation, which no live process holds any
    # more (no QEMU maps it here), is reclaimed (issue 10.11; the test below).
    with ReplicaApplier(tmp_path) as applier:
        assert applier.committed_epoch is None
        with pytest.raises(ReplicaError, match="no committed replica"):
            applier.hand_over()
        sync(applier, 3)
        assert len(generations(tmp_path)) == 1


def test_checkpoint_sink_protocol_defers_the_apply(tmp_path: Path) -> None:
    async def scenario() -> None:
        with ReplicaApplier(tmp_path) as applier:
            await applier.begin_sync(CONFIG, BLOCKS)
            await applier.sync_pages([run("pc.ram", {0: page(1)})])
            await applier.end_sync(b"d0", VMDESC)
            await applier.begin(1)
            await applier.pages([run("pc.ram", {}, zero_pages=(0,))])
            await applier.device_state(1, b"d1")
            await applier.commit(1)
            assert applier.committed_epoch == 1
            await asyncio.sleep(0)  # the apply runs right after commit returned
            image = applier.hand_over()
            assert image.ram_path.read_bytes()[:PAGE_SIZE] == page(0)

    asyncio.run(scenario())


def test_primary_with_x_ignore_shared_or_without_main_ram_is_refused(tmp_path: Path) -> None:
    with ReplicaApplier(tmp_path) as applier:
        with pytest.raises(ReplicaError, match="x-ignore-shared"):
            applier.start_sync(Configuration("pc", ("x-ignore-shared",)), BLOCKS)
        with pytest.raises(ReplicaError, match=r"lack 'pc\.ram'"):
            applier.start_sync(CONFIG, RamBlockList(2, (RamBlock("pc.bios", PAGE_SIZE),)))
        assert generations(tmp_path) == []


HOLD_MAPPED = """
import mmap, sys, time
with open(sys.argv[1], "r+b") as handle:
    view = mmap.mmap(handle.fileno(), 0)
print("mapped", flush=True)
time.sleep(3600)
"""


def test_handed_over_generations_are_reclaimed_once_no_live_process_holds_them(
    tmp_path: Path,
) -> None:
    """Issue 10.11: a handed-over generation stays while a process maps its RAM file (a
    failover QEMU) or its agent holds it, and goes at the next open once neither lives.
    The old code kept every handed-over generation forever."""
    applier = ReplicaApplier(tmp_path)
    sync(applier, 1)
    image = applier.hand_over()
    held = current_generation(tmp_path)
    # The handing-over agent owns it until it closes (its QEMU has not mapped it yet).
    assert ReplicaApplier(tmp_path).reclaim() == []
    assert generations(tmp_path) == [held]
    qemu = subprocess.Popen(
        [sys.executable, "-c", HOLD_MAPPED, str(image.ram_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert qemu.stdout is not None and qemu.stdout.readline() == "mapped\n"
        applier.close()  # the agent is gone, its "QEMU" maps the RAM file
        with ReplicaApplier(tmp_path) as second:
            assert generations(tmp_path) == [held]
            sync(second, 2)  # a new generation; the mapped one still stays
            assert generations(tmp_path) == sorted([held, current_generation(tmp_path)])
        second.remove_files()  # a standby's stop spares the live one
        assert generations(tmp_path) == [held]
    finally:
        qemu.kill()
        qemu.wait()
    with ReplicaApplier(tmp_path) as third:  # nobody holds it now: reclaimed at open
        assert generations(tmp_path) == []
        assert third.committed_epoch is None
