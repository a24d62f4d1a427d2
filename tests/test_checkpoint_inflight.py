"""The in-flight window of pipelined checkpoints (kemari/checkpoint/inflight.py): order,
bounds, and acknowledgements only of the oldest checkpoint, as unit and property tests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kemari.checkpoint.inflight import InflightWindow
from kemari.errors import CheckpointError


def test_acknowledgements_come_in_epoch_order() -> None:
    window: InflightWindow[str] = InflightWindow(max_count=3, max_bytes=100)
    window.add(4, 10, "four")
    window.add(5, 20, "five")
    assert (len(window), window.bytes, window.oldest) == (2, 30, 4)
    with pytest.raises(CheckpointError, match="acknowledgement of 5, expected 4"):
        window.acknowledge(5)
    assert (len(window), window.bytes, window.oldest) == (2, 30, 4)  # unchanged
    assert window.acknowledge(4).ticket == "four"
    assert window.holds(5) and not window.holds(4)
    assert window.acknowledge(5).ticket == "five"
    assert (len(window), window.bytes, window.oldest) == (0, 0, None)
    with pytest.raises(CheckpointError, match="no checkpoint in flight"):
        window.acknowledge(6)


def test_epochs_must_grow() -> None:
    window: InflightWindow[None] = InflightWindow()
    window.add(3, 1, None)
    window.acknowledge(3)
    with pytest.raises(CheckpointError, match="captured after 3"):
        window.add(3, 1, None)
    with pytest.raises(CheckpointError, match="out of range"):
        InflightWindow(max_count=-1)


def test_count_bound_zero_is_the_synchronous_protocol() -> None:
    window: InflightWindow[None] = InflightWindow(max_count=0, max_bytes=1 << 30)
    assert window.resume_allowed
    window.add(1, 10, None)
    assert not window.resume_allowed  # the guest waits for the ack of 1
    window.acknowledge(1)
    assert window.resume_allowed


def test_count_bound_one_lets_the_guest_run_past_one_checkpoint() -> None:
    window: InflightWindow[None] = InflightWindow(max_count=1, max_bytes=1 << 30)
    window.add(1, 10, None)
    assert window.resume_allowed  # one in flight: the guest may run past it
    window.add(2, 10, None)
    assert not window.resume_allowed  # 2 may not resume until 1 is acknowledged
    window.acknowledge(1)
    assert window.resume_allowed


def test_a_single_checkpoint_above_the_byte_bound_still_goes_alone() -> None:
    window: InflightWindow[None] = InflightWindow(max_count=4, max_bytes=100)
    window.add(1, 500, None)
    assert window.resume_allowed
    window.add(2, 1, None)
    assert not window.resume_allowed
    window.acknowledge(1)
    assert window.resume_allowed


# Operations: ("capture", size) adds the next epoch; ("ack", wrong) acknowledges the
# oldest (or, with wrong, an epoch that is not the oldest).
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("capture"), st.integers(0, 300)),
        st.tuples(st.just("ack"), st.booleans()),
    ),
    max_size=60,
)


@given(OPERATIONS, st.integers(0, 4), st.integers(1, 600))
def test_window_matches_a_queue_model(
    operations: list[tuple[str, int | bool]], max_count: int, max_bytes: int
) -> None:
    window: InflightWindow[int] = InflightWindow(max_count, max_bytes)
    model: list[tuple[int, int]] = []  # (epoch, size) in flight, oldest first
    next_epoch = 1
    for kind, argument in operations:
        if kind == "capture":
            size = int(argument)
            window.add(next_epoch, size, next_epoch)
            model.append((next_epoch, size))
            next_epoch += 1
        elif not model:
            with pytest.raises(CheckpointError):
                window.acknowledge(next_epoch)
        elif argument:  # an epoch other than the oldest is refused, nothing changes
            with pytest.raises(CheckpointError):
                window.acknowledge(model[0][0] + 1)
        else:
            entry = window.acknowledge(model[0][0])
            assert (entry.epoch, entry.size, entry.ticket) == (*model[0], model[0][0])
            model.pop(0)
        assert len(window) == len(model)
        assert window.bytes == sum(size for _, size in model)
        assert window.oldest == (model[0][0] if model else None)
        total = sum(size for _, size in model)
        assert window.resume_allowed == (
            len(model) <= max_count and (len(model) <= 1 or total <= max_bytes)
        )


@given(
    st.lists(st.integers(0, 300), min_size=1, max_size=40),
    st.lists(st.booleans(), max_size=200),
    st.integers(0, 4),
    st.integers(1, 600),
)
def test_a_pipeline_driven_by_the_window_never_releases_early_nor_runs_ahead(
    sizes: list[int], ack_arrivals: list[bool], max_count: int, max_bytes: int
) -> None:
    """A source that resumes only when the window allows it, and a tap that releases an
    epoch's outputs only when its ack arrives: outputs leave in epoch order, each after
    its own ack, and the guest never runs past more than ``max_count`` unacked epochs."""
    window: InflightWindow[None] = InflightWindow(max_count, max_bytes)
    acked: list[int] = []
    released: list[int] = []
    resumed = 0
    arrivals = iter(ack_arrivals)
    for epoch, size in enumerate(sizes, start=1):
        window.add(epoch, size, None)
        while not window.resume_allowed:  # the guest stays stopped until acks arrive
            oldest = window.oldest
            assert oldest is not None
            window.acknowledge(oldest)
            acked.append(oldest)
            released.append(oldest)
        resumed = epoch
        assert len(window) <= max_count
        assert resumed - (acked[-1] if acked else 0) <= max_count
        if next(arrivals, False) and window.oldest is not None:  # an ack arrives meanwhile
            oldest = window.oldest
            window.acknowledge(oldest)
            acked.append(oldest)
            released.append(oldest)
    assert released == acked == sorted(acked) == list(range(1, len(acked) + 1))
