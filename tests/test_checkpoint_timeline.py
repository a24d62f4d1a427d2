"""The pause timeline's pure parts: offsets from the marks, and placing QEMU's STOP/RESUME.

The source's use of them against a real guest is in tests/test_checkpoint_source.py.
"""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st
from support.pause_order import PAUSE_MILESTONES

from kemari.checkpoint.timeline import (
    RESUME_EVENT,
    STOP_EVENT,
    PauseMarks,
    attach_run_state_event,
)

QEMU_EVENTS = {"stop": STOP_EVENT, "resume": RESUME_EVENT}

steps = st.floats(min_value=1e-6, max_value=0.05, allow_nan=False)


def full_marks(reply: float, gaps: list[float]) -> PauseMarks:
    """Marks of one checkpoint: ``reply``, then each milestone ``gaps`` later, in order."""
    times = [reply]
    for gap in gaps:
        times.append(times[-1] + gap)
    return PauseMarks(**dict(zip(PAUSE_MILESTONES, times, strict=True)))


def test_timeline_is_absent_until_loaded_and_optional_parts_may_be_missing() -> None:
    marks = PauseMarks(reply=10.0, vmstate_send=10.001, ram_end=10.002, vmstate_size=10.002)
    assert marks.timeline() is None
    marks.device_read = marks.device_parsed = marks.captured = 10.003
    assert marks.timeline() is None
    marks.loaded = 10.004
    timeline = marks.timeline()
    assert timeline is not None
    assert timeline.stop_ms is None and timeline.first_page_ms is None
    assert timeline.resume_ms is None and timeline.qemu_pause_ms is None
    names = [name for name, _ in timeline.milestones()]
    assert names == [n for n in PAUSE_MILESTONES if n not in ("stop", "first_page", "resume")]


@given(
    reply=st.floats(min_value=0.0, max_value=1e6), gaps=st.lists(steps, min_size=10, max_size=10)
)
def test_timeline_offsets_are_ms_after_reply_in_causal_order(
    reply: float, gaps: list[float]
) -> None:
    marks = full_marks(reply, gaps)
    timeline = marks.timeline()
    assert timeline is not None
    milestones = timeline.milestones()
    assert [name for name, _ in milestones] == list(PAUSE_MILESTONES)
    offsets = [at for _, at in milestones]
    assert offsets[0] == 0.0
    assert offsets == sorted(offsets)
    for name, at in milestones:
        expected = (getattr(marks, name) - reply) * 1000
        assert abs(at - expected) <= 1e-6 * max(1.0, abs(expected)) + 1e-3
    pause = timeline.qemu_pause_ms
    assert pause is not None and pause > 0


@dataclasses.dataclass
class Action:
    """One step of the simulation, at ``at``: set a mark, or place a QEMU event."""

    at: float
    order: int  # ties: marks before a drain that happens at the same moment
    checkpoint: int
    field: str
    event_time: float | None = None  # for a drain: when QEMU emitted the event


@given(
    checkpoints=st.lists(
        st.tuples(
            st.lists(steps, min_size=10, max_size=10),  # gaps between milestones
            st.tuples(steps, steps),  # how late Kemari reads STOP / RESUME
            st.tuples(st.booleans(), st.booleans()),  # STOP / RESUME lost on the way
            st.booleans(),  # a stray STOP + RESUME (a user's stop) after the checkpoint
        ),
        min_size=1,
        max_size=6,
    )
)
def test_events_land_on_their_own_checkpoint_whatever_the_delay(
    checkpoints: list[tuple[list[float], tuple[float, float], tuple[bool, bool], bool]],
) -> None:
    # Each checkpoint's marks are set at their times; QEMU's events are placed when
    # Kemari reads them, any time after QEMU emitted them (possibly checkpoints later).
    actions: list[Action] = []
    truth: list[PauseMarks] = []
    start = 0.0
    stray_stops: list[float] = []
    for index, (gaps, (stop_late, resume_late), (stop_lost, resume_lost), stray) in enumerate(
        checkpoints
    ):
        marks = full_marks(start, gaps)
        truth.append(marks)
        for name in PAUSE_MILESTONES:
            at = getattr(marks, name)
            if name in QEMU_EVENTS:
                lost, late = (
                    (stop_lost, stop_late) if name == "stop" else (resume_lost, resume_late)
                )
                if not lost:
                    actions.append(Action(at + late, 1, index, name, event_time=at))
            else:
                actions.append(Action(at, 0, index, name))
        assert marks.resume is not None
        start = marks.resume + 0.001
        # QMP delivers every event, in order; only after a lost RESUME could a stray
        # RESUME be taken for the checkpoint's, so the test does not combine the two.
        if stray and not resume_lost:
            stray_stops.append(start)
            actions.append(Action(start + 0.0001, 1, -1, "stop", event_time=start))
            actions.append(Action(start + 0.0003, 1, -1, "resume", event_time=start + 0.0002))
            start += 0.001

    seen: list[PauseMarks] = []
    # Events reach Kemari in the order QEMU emitted them (one QMP socket).
    drains = sorted((a for a in actions if a.event_time is not None), key=lambda a: a.event_time)
    drain_at = 0.0
    for drain in drains:  # a later-emitted event is never read before an earlier one
        drain_at = max(drain_at, drain.at)
        drain.at = drain_at
    for action in sorted(actions, key=lambda a: (a.at, a.order)):
        if action.event_time is None:
            if action.field == "reply":
                seen.append(PauseMarks(reply=action.at))
            else:
                setattr(seen[action.checkpoint], action.field, action.at)
            continue
        placed = attach_run_state_event(seen, QEMU_EVENTS[action.field], action.event_time)
        assert placed == (action.checkpoint >= 0), action

    for index, ((_, _, (stop_lost, resume_lost), _), marks) in enumerate(
        zip(checkpoints, seen, strict=True)
    ):
        assert marks.stop == (None if stop_lost else truth[index].stop)
        assert marks.resume == (None if resume_lost else truth[index].resume)
    assert all(stop not in {m.stop for m in seen} for stop in stray_stops)
