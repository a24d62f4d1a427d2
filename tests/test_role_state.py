"""The role state machine: its table, its refusals, and random walks through it."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kemari.errors import KemariError, StateError
from kemari.roles.state import TRANSITIONS, RoleState, State


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_every_state_is_in_the_table_and_only_stopped_is_terminal() -> None:
    assert set(TRANSITIONS) == set(State)
    assert [s for s, targets in TRANSITIONS.items() if not targets] == [State.STOPPED]
    for targets in TRANSITIONS.values():
        assert State.STARTING not in targets  # nothing goes back to starting


def test_every_state_but_stopped_is_reachable_and_can_stop() -> None:
    reached = {State.STARTING}
    frontier = [State.STARTING]
    while frontier:
        for target in TRANSITIONS[frontier.pop()]:
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(State)
    for state in State:
        if state not in (State.STOPPING, State.STOPPED):
            assert State.STOPPING in TRANSITIONS[state], state


def test_manual_failover_path_records_reason_and_time() -> None:
    clock = FakeClock()
    role = RoleState("agent started", clock=clock)
    assert (role.state, role.reason, role.since) == (State.STARTING, "agent started", 100.0)
    clock.now = 101.0
    role.to(State.STANDBY, "listening on 127.0.0.1:4444")
    clock.now = 105.5
    step = role.to(State.PROMOTING, "monitor: failover")
    assert (step.source, step.target, step.at) == (State.STANDBY, State.PROMOTING, 105.5)
    clock.now = 105.7
    role.to(State.ACTIVE, "resumed from epoch 12")
    assert role.state is State.ACTIVE and role.reason == "resumed from epoch 12"
    clock.now = 106.0
    assert role.age_s() == pytest.approx(0.3)
    assert [t.target for t in role.history] == [
        State.STARTING,
        State.STANDBY,
        State.PROMOTING,
        State.ACTIVE,
    ]


def test_illegal_transition_raises_state_error_and_changes_nothing() -> None:
    role = RoleState()
    role.to(State.STANDBY, "incoming")
    with pytest.raises(StateError, match="cannot go from standby to active") as caught:
        role.to(State.ACTIVE, "skipping the promotion")
    assert isinstance(caught.value, KemariError)
    assert role.state is State.STANDBY and role.reason == "incoming"
    assert len(role.history) == 2


def test_failed_promotion_and_fenced_rejoin() -> None:
    role = RoleState()
    role.to(State.STANDBY, "incoming")
    role.to(State.PROMOTING, "failover")
    role.to(State.FAILED, "the failover QEMU did not start")
    with pytest.raises(StateError):
        role.to(State.ACTIVE, "no")
    role.to(State.STOPPING, "quit")
    role.to(State.STOPPED, "done")
    with pytest.raises(StateError, match="allowed from stopped: none"):
        role.to(State.STOPPING, "again")

    fenced = RoleState()
    fenced.to(State.ACTIVE, "started")
    fenced.to(State.FENCED, "lost the standby and the quorum")
    fenced.to(State.STANDBY, "rejoined as standby")
    assert fenced.state is State.STANDBY


def test_require_names_the_current_state() -> None:
    role = RoleState()
    role.to(State.ACTIVE, "started")
    role.require(State.ACTIVE, doing="migrate")
    with pytest.raises(StateError, match="cannot fail over: the agent is active, not standby"):
        role.require(State.STANDBY, doing="fail over")


def test_history_is_bounded() -> None:
    role = RoleState()
    role.to(State.ACTIVE, "started")
    for _ in range(100):
        role.to(State.FENCED, "fence")
        role.to(State.STANDBY, "rejoin")
        role.to(State.PROMOTING, "promote")
        role.to(State.ACTIVE, "promoted")
    assert len(role.history) == RoleState.HISTORY


class RandomWalk(RuleBasedStateMachine):
    """Random steps: a step the table allows is taken, any other raises StateError."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.role = RoleState(clock=self.clock)
        self.model = State.STARTING

    @rule(goal=st.sampled_from(list(State)), dt=st.floats(0, 10), reason=st.text(max_size=8))
    def step(self, goal: State, dt: float, reason: str) -> None:
        target = goal
        self.clock.now += dt
        if target in TRANSITIONS[self.model]:
            step = self.role.to(target, reason)
            assert (step.source, step.target, step.reason) == (self.model, target, reason)
            assert self.role.since == self.clock.now
            self.model = target
        else:
            before = (self.role.since, self.role.reason, len(self.role.history))
            with pytest.raises(StateError):
                self.role.to(target, reason)
            assert (self.role.since, self.role.reason, len(self.role.history)) == before

    @invariant()
    def follows_the_table(self) -> None:
        assert self.role.state is self.model
        history = self.role.history
        for before, after in itertools.pairwise(history):
            assert after.source is before.target
            assert after.target in TRANSITIONS[after.source]
            assert after.at >= before.at


TestRandomWalk = RandomWalk.TestCase
