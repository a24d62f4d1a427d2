"""Event-tap pure parts: OutputLog (tags, order, bounds), OUTPUT frames, the output store,
sync policies, and the EventTap gate's release rules driven through a real OutputLog."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kemari import persist
from kemari.checkpoint.sender import OUTPUT_FRAME_BYTES, output_frames
from kemari.checkpoint.source import SourceState
from kemari.config import EVENT_ONLY_EPOCH_MS, SyncPolicy
from kemari.errors import ConfigError, EventTapError, TransactionError
from kemari.eventtap.gate import EventTap
from kemari.eventtap.outputs import OutputLog
from kemari.outputs import Output, OutputKind
from kemari.replica.outputstore import OUTPUTS_FORMAT, OutputStore
from kemari.transaction.session import Committed, TransactionTracker
from kemari.transaction.wire import (
    Begin,
    Commit,
    FrameDecoder,
    Outputs,
    RamBlock,
    RamBlocks,
    encode_frame,
    encode_outputs,
)


def net(data: bytes, nic: int = 0) -> Output:
    return Output(OutputKind.NET, nic, data)


def disk(data: bytes, offset: int, device: int = 0) -> Output:
    return Output(OutputKind.DISK, device, data, offset)


# -- OutputLog ----------------------------------------------------------------------------


def test_release_takes_committed_tags_in_arrival_order() -> None:
    log = OutputLog()
    log.hold(net(b"a" * 20), 1, now=0.0)
    log.hold(disk(b"b", 4096), 1, now=0.001)
    log.hold(net(b"c" * 20), 2, now=0.002)
    assert log.outputs_of(1) == [net(b"a" * 20), disk(b"b", 4096)]
    assert log.release(0) == []
    assert log.release(1, now=0.010) == [net(b"a" * 20), disk(b"b", 4096)]
    assert len(log) == 1 and log.held_bytes == 20 and log.outputs_of(2) == [net(b"c" * 20)]
    assert log.release(5, now=0.012) == [net(b"c" * 20)]
    stats = log.stats()
    assert (stats.held, stats.released, stats.released_bytes) == (0, 3, 41)
    # Latencies 10, 9 and 10 ms (held at 0, 1 and 2 ms).
    assert stats.latency_ms_p50 == pytest.approx(10.0)
    assert stats.latency_ms_p99 == pytest.approx(10.0)


def test_tags_must_not_decrease_and_epochs_restart_only_when_empty() -> None:
    log = OutputLog()
    log.hold(net(b"x" * 14), 3)
    with pytest.raises(EventTapError, match="tags must not decrease"):
        log.hold(net(b"y" * 14), 2)
    with pytest.raises(EventTapError, match="still held"):
        log.restart_epochs()
    assert log.release_all() == [net(b"x" * 14)]
    log.restart_epochs()
    log.hold(net(b"z" * 14), 1)
    assert log.discard_all() == 1 and log.stats().discarded == 1 and not log


def test_bounds_say_full_and_drained_but_never_drop() -> None:
    log = OutputLog(max_bytes=100, max_count=1000)
    for _ in range(4):
        log.hold(net(b"q" * 30), 1)
    assert log.full and len(log) == 4  # over the bound, nothing dropped
    log.hold(net(b"r" * 30), 2)
    assert len(log) == 5 and log.held_bytes == 150
    log.release(1)
    assert not log.full and log.drained
    counted = OutputLog(max_bytes=1 << 20, max_count=2)
    counted.hold(net(b"a" * 14), 1)
    assert not counted.full
    counted.hold(net(b"b" * 14), 1)
    assert counted.full and not counted.drained


def test_outputs_are_validated() -> None:
    with pytest.raises(EventTapError, match="no offset"):
        Output(OutputKind.NET, 0, b"x", 5)
    with pytest.raises(EventTapError, match="u16"):
        net(b"x", nic=70000)
    with pytest.raises(EventTapError, match="empty"):
        disk(b"", 0)
    with pytest.raises(EventTapError, match="positive"):
        OutputLog(max_bytes=0)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("hold"), st.integers(0, 3), st.binary(min_size=1, max_size=40)),
        st.tuples(st.just("release"), st.integers(0, 30), st.just(b"")),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_log_behaves_like_a_sorted_queue(ops: list[tuple[str, int, bytes]]) -> None:
    """Against a model: release returns exactly the held prefix with tag <= committed, in
    arrival order; outputs_of partitions the held outputs; counters add up; bounds hold."""
    log = OutputLog(max_bytes=200, max_count=5)
    model: list[tuple[int, Output]] = []
    epoch = 0
    released: list[Output] = []
    for op, number, data in ops:
        if op == "hold":
            epoch += number  # tags never decrease
            output = net(data)
            log.hold(output, epoch)
            model.append((epoch, output))
        else:
            out = log.release(number)
            expected = [output for tag, output in model if tag <= number]
            assert out == expected
            model = [(tag, output) for tag, output in model if tag > number]
            released += out
        assert len(log) == len(model)
        assert log.held_bytes == sum(len(output.data) for _, output in model)
        assert log.full == (log.held_bytes >= 200 or len(model) >= 5)
        for tag in {tag for tag, _ in model}:
            assert log.outputs_of(tag) == [output for t, output in model if t == tag]
    stats = log.stats()
    assert stats.released == len(released)
    assert stats.released_bytes == sum(len(output.data) for output in released)


# -- OUTPUT frames and the transaction rules -----------------------------------------------


def decode_one(payload: Outputs | Commit) -> object:
    frames = FrameDecoder().feed(b"".join(bytes(part) for part in encode_frame(payload, 0)))
    assert len(frames) == 1
    return frames[0].payload


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(net, st.binary(min_size=1, max_size=100), st.integers(0, 0xFFFF)),
            st.builds(
                disk,
                st.binary(min_size=1, max_size=100),
                st.integers(0, (1 << 64) - 1),
                st.integers(0, 0xFFFF),
            ),
        ),
        min_size=1,
        max_size=20,
    ),
    st.integers(0, (1 << 64) - 1),
)
def test_output_frame_round_trip(outputs: list[Output], epoch: int) -> None:
    frame = Outputs(epoch, tuple(outputs))
    assert decode_one(frame) == frame


def test_output_frame_layout_errors_are_typed() -> None:
    good = b"".join(bytes(p) for p in Outputs(1, (net(b"x" * 14),)).encode())
    for payload, message in (
        (good[:-1], "truncated"),
        (good + b"!", "trailing"),
        (good[:4] + b"\x07" + good[5:], "unknown kind"),
        (b"\xff\xff\xff\xff", "announces"),
        (b"\0\0\0\0", "no output"),
        (good[:4] + b"\x01\0\0\0\0\0\0\0\0\0\x01" + good[15:], "no offset"),
    ):
        with pytest.raises(TransactionError, match=message):
            Outputs.decode(1, memoryview(payload))


def test_commit_counts_the_outputs_of_the_transaction() -> None:
    blocks = RamBlocks(0, (RamBlock("pc.ram", 1 << 20),))
    outputs = Outputs(1, (net(b"a" * 60), disk(b"b" * 512, 4096)))
    tracker = TransactionTracker()
    for payload in (Begin(0), blocks, Commit(0, 0, 0, 0), Begin(1), outputs):
        tracker.apply(payload)
    summary = tracker.commit_summary()
    assert (summary.outputs, summary.output_bytes) == (2, 572)
    assert decode_one(summary) == summary
    assert tracker.apply(summary) == Committed(1, 0, 0, 0, 2, 572)
    other = TransactionTracker()
    for payload in (Begin(0), blocks, Commit(0, 0, 0, 0), Begin(1), outputs):
        other.apply(payload)
    with pytest.raises(TransactionError, match=r"outputs, output bytes\) \(1, 60\)"):
        other.apply(Commit(1, 0, 0, 0, 1, 60))
    with pytest.raises(TransactionError, match="OUTPUT outside a transaction"):
        TransactionTracker().apply(outputs)


def test_output_frames_are_bounded_and_keep_order() -> None:
    big = [net(bytes([n]) * (OUTPUT_FRAME_BYTES // 3)) for n in range(7)]
    frames = list(output_frames(4, big))
    assert [output for frame in frames for output in frame.outputs] == big
    assert all(frame.epoch == 4 for frame in frames)
    assert all(frame.data_bytes <= OUTPUT_FRAME_BYTES for frame in frames)
    assert list(output_frames(4, [])) == []


# -- the standby's store -------------------------------------------------------------------


def test_store_keeps_the_committed_epochs_outputs(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "outputs")
    assert store.load(3) == ()
    store.stage(3, [net(b"a" * 20), disk(b"d", 512)])
    store.committed(3)
    store.stage(4, [net(b"b" * 20)])
    # Crash before epoch 4 commits: the replica is at 3, and 3's outputs are still there.
    assert store.load(3) == (net(b"a" * 20), disk(b"d", 512))
    store.committed(4)
    assert store.load(3) == () and store.load(4) == (net(b"b" * 20),)
    store.stage(5, [])
    store.committed(5)
    assert store.load(5) == () and not list((tmp_path / "outputs").iterdir())
    store.stage(6, [net(b"c" * 20)])
    path = store.path_of(6)
    good = path.read_bytes()
    fmt = OUTPUTS_FORMAT
    cases = [
        (good[:-1], persist.TornFileError, "is torn"),
        # Before kemari.persist the file was the bare OUTPUT payload.
        (b"".join(encode_outputs([net(b"c" * 20)])), persist.ForeignFileError, "older Kemari"),
        (persist.HEADER.pack(fmt.magic, 2, 0, 0), persist.NewerVersionError, "newer Kemari"),
        (persist.HEADER.pack(fmt.magic, 1, 0, 1 << 40), persist.OversizedFileError, "more than"),
    ]
    for content, kind, match in cases:
        path.write_bytes(content)
        with pytest.raises(EventTapError, match=match) as caught:
            store.load(6)
        assert isinstance(caught.value.__cause__, kind)
        assert "\n" not in str(caught.value)
    # A frame whose payload is not an OUTPUT payload (it checks out, but does not parse).
    persist.write_file(path, fmt, b"\xff" * 8)
    with pytest.raises(EventTapError, match="damaged"):
        store.load(6)


# -- sync policies ---------------------------------------------------------------------------


def test_sync_policies() -> None:
    assert SyncPolicy.EVENT.on_output and SyncPolicy.EVENT_PERIODIC.on_output
    assert not SyncPolicy.PERIODIC.on_output
    assert SyncPolicy.EVENT.qemu_epoch_ms(20) == EVENT_ONLY_EPOCH_MS
    assert SyncPolicy.PERIODIC.qemu_epoch_ms(20) == 20
    with pytest.raises(ConfigError, match="sync: 'sometimes' is not one of event, periodic, "):
        SyncPolicy.parse("sometimes", "sync")


# -- the gate ------------------------------------------------------------------------------


class TaggingSource:
    """The part of CheckpointSource the gate reads: the output tag, the request count and
    whether a checkpoint is being captured (the VM stopping or stopped)."""

    def __init__(self) -> None:
        self.output_epoch: int | None = None
        self.requested_epoch = 0
        self.capturing = False
        self.listeners: list[EventTap] = []

    def add_listener(self, listener: EventTap) -> None:
        self.listeners.append(listener)


class CountingTrigger:
    def __init__(self) -> None:
        self.requests = 0

    def request_checkpoint(self) -> int:
        self.requests += 1
        return 0


class DevicePath:
    """One device's output path: what left, and whether it is paused."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.paused = False
        self.drains = 0

    def release(self, output: Output) -> None:
        self.sent.append(output.data)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    async def drain(self) -> None:
        assert not self.paused, "drained while paused"
        self.drains += 1


def gate(policy: SyncPolicy, log: OutputLog | None = None) -> tuple[EventTap, DevicePath]:
    tap = EventTap(policy, log)
    path = DevicePath()
    tap.add_device(OutputKind.NET, 0, path.release, producer=path)
    return tap, path


def attach(tap: EventTap) -> tuple[TaggingSource, CountingTrigger]:
    source, trigger = TaggingSource(), CountingTrigger()
    tap.attach(source, trigger)  # type: ignore[arg-type]
    return source, trigger


def frame(n: int) -> Output:
    return net(bytes([n]) * 60)


def test_gate_holds_while_tagging_and_releases_on_commit() -> None:
    tap, path = gate(SyncPolicy.EVENT)
    assert tap.submit(frame(0)) is False  # no protection: leaves at once
    source, trigger = attach(tap)
    assert tap.submit(frame(1)) is False  # initial sync: not tagged yet
    source.output_epoch = 1
    assert tap.submit(frame(2)) and tap.submit(frame(3))
    assert trigger.requests == 2 and path.sent == []
    source.requested_epoch = 1  # checkpoint 1 in flight, VMSTATE_SEND not seen yet
    assert tap.submit(frame(4)) and trigger.requests == 2  # the in-flight one covers it
    source.output_epoch = 2  # VMSTATE_SEND(1) seen
    assert tap.submit(frame(5)) and trigger.requests == 3  # queued for the next one
    assert [o.data[0] for o in tap.outputs_of(1)] == [2, 3, 4]
    tap.checkpoint_committed(1)
    assert [data[0] for data in path.sent] == [2, 3, 4]
    tap.protection_ended(SourceState.UNPROTECTED)  # the guest runs on: everything leaves
    assert [data[0] for data in path.sent] == [2, 3, 4, 5]
    assert tap.submit(frame(6)) is False and tap.status()["passed"] == 3


def test_gate_discards_when_the_guest_died_and_never_overtakes() -> None:
    tap, path = gate(SyncPolicy.PERIODIC)
    source, trigger = attach(tap)
    source.output_epoch = 3
    assert tap.submit(frame(1))
    tap.protection_ended(SourceState.FAILED)
    assert path.sent == [] and tap.log.stats().discarded == 1 and trigger.requests == 0
    source, _ = attach(tap)
    source.output_epoch = 1
    assert tap.submit(frame(2))
    source.output_epoch = None  # e.g. the source lost its tagging before telling us
    assert tap.submit(frame(3)) is False
    assert [data[0] for data in path.sent] == [2]  # the older frame left first


def test_gate_pauses_producers_at_the_bound_and_resumes_when_drained() -> None:
    tap, path = gate(SyncPolicy.PERIODIC, OutputLog(max_bytes=1 << 20, max_count=4))
    source, _ = attach(tap)
    source.output_epoch = 1
    for n in range(3):
        tap.submit(frame(n))
    assert not path.paused
    tap.submit(frame(3))
    assert path.paused and tap.status()["pauses"] == 1
    source.output_epoch = 2
    tap.submit(frame(4))  # the producer's last read: held, never dropped
    tap.checkpoint_committed(1)
    assert not path.paused and len(path.sent) == 4 and len(tap.log) == 1


@pytest.mark.parametrize("pipelined", [False, True])
def test_gate_runs_paused_producers_from_a_checkpoint_request_until_the_guest_resumed(
    pipelined: bool,
) -> None:
    tap, path = gate(SyncPolicy.PERIODIC, OutputLog(max_bytes=1 << 20, max_count=2))
    source, _ = attach(tap)
    source.output_epoch = 1
    tap.submit(frame(0))
    tap.submit(frame(1))
    assert path.paused
    # QEMU drops what its NIC backend cannot hand over when it stops the VM: the request
    # resumes and drains the producers, which stay running although the log is full.
    source.requested_epoch, source.capturing = 1, True
    asyncio.run(tap.checkpoint_requested(1))
    assert not path.paused and path.drains == 1
    source.output_epoch = 2
    for n in range(2, 6):
        assert tap.submit(frame(n))
    assert not path.paused and tap.status()["pauses"] == 1
    if pipelined:
        # The guest resumed from 1 before its ack: the next output held pauses again.
        source.capturing = False
        assert tap.submit(frame(6))
        assert path.paused and tap.status()["pauses"] == 2
        tap.checkpoint_committed(1)  # frames 2..6 stay held: still full, still paused
    else:
        # Acknowledged while the VM is still stopped (the window was full): not yet.
        tap.checkpoint_committed(1)
        assert not path.paused
        source.capturing = False
        assert tap.submit(frame(6))  # the first output after the resume pauses again
    assert [data[0] for data in path.sent] == [0, 1]
    assert path.paused and tap.status()["pauses"] == 2


def test_gate_refuses_a_second_session_and_a_second_device() -> None:
    tap, _ = gate(SyncPolicy.EVENT)
    attach(tap)
    with pytest.raises(EventTapError, match="already follows"):
        attach(tap)
    with pytest.raises(EventTapError, match="registered twice"):
        tap.add_device(OutputKind.NET, 0, lambda output: None)


def test_gate_status_is_plain_data() -> None:
    tap, _ = gate(SyncPolicy.EVENT_PERIODIC)
    status = tap.status()
    assert status["sync"] == "event+periodic" and status["mode"].startswith("pass-through")


# -- the release permit (docs/ha.md, rule 2) ---------------------------------------------


class Permit:
    """A release permit whose answers the test sets: (a) and (b) separately."""

    def __init__(self) -> None:
        self.committed = True  # case (a) or (b) for acknowledged checkpoints
        self.unprotected = True  # case (b)
        self.asked: list[bool] = []

    def may_release(self, committed: bool) -> bool:
        self.asked.append(committed)
        return self.committed if committed else self.unprotected


def permitted_gate() -> tuple[EventTap, DevicePath, Permit]:
    permit = Permit()
    tap = EventTap(SyncPolicy.PERIODIC, OutputLog(), permit)
    path = DevicePath()
    tap.add_device(OutputKind.NET, 0, path.release, producer=path)
    return tap, path, permit


def test_permit_refusing_a_commit_keeps_outputs_until_a_later_permitted_commit() -> None:
    tap, path, permit = permitted_gate()
    source, _ = attach(tap)
    source.output_epoch = 1
    assert tap.submit(frame(1))
    permit.committed = False  # the acknowledgement came too late (standby may take over)
    tap.checkpoint_committed(1)
    assert path.sent == [] and tap.withheld == 1
    source.output_epoch = 2
    assert tap.submit(frame(2))
    permit.committed = True  # a commit answered in time covers the older epoch too
    tap.checkpoint_committed(2)
    assert [data[0] for data in path.sent] == [1, 2]


def test_permit_standby_lost_holds_everything_until_drop_standby_is_won() -> None:
    tap, path, permit = permitted_gate()
    source, _ = attach(tap)
    source.output_epoch = 1
    assert tap.submit(frame(1))
    permit.committed = permit.unprotected = False  # record: protected; lease irrelevant
    tap.protection_ended(SourceState.UNPROTECTED)
    assert tap.submit(frame(2))  # held even though nothing tags it any more
    assert path.sent == [] and len(tap.log) == 2
    assert tap.release_permitted() == 0  # still not permitted: nothing leaves
    permit.unprotected = True  # drop_standby won: case (b)
    assert tap.release_permitted() == 2
    assert [data[0] for data in path.sent] == [1, 2]
    assert tap.submit(frame(3)) is False  # permitted again: it may leave at once


def test_permit_fence_discards_and_nothing_leaves_again() -> None:
    tap, path, permit = permitted_gate()
    source, _ = attach(tap)
    source.output_epoch = 1
    assert tap.submit(frame(1))
    permit.committed = permit.unprotected = False
    tap.protection_ended(SourceState.UNPROTECTED)
    assert tap.fence() == 1
    permit.committed = permit.unprotected = True  # even a permit saying yes changes nothing
    assert tap.submit(frame(2)) is True and tap.release_permitted() == 0
    assert path.sent == [] and len(tap.log) == 0


def test_permit_unprotected_guest_without_a_valid_lease_holds() -> None:
    tap, path, permit = permitted_gate()
    permit.unprotected = False  # case (b) fails: the lease ran out by our clock
    assert tap.submit(frame(1)) is True and path.sent == []
    assert permit.asked == [False]
    permit.unprotected = True
    assert tap.submit(frame(2)) is False  # the held one leaves first
    assert [data[0] for data in path.sent] == [1]
