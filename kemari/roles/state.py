"""The role state machine: which role the agent plays, since when, and why.

One agent plays exactly one role at a time (docs/architecture.md).  Its life is a
walk through the states below; :data:`TRANSITIONS` is the whole table of allowed
steps, and :meth:`RoleState.to` refuses every other step with :class:`StateError`
(the state stays as it was).  Each step records its reason and the monotonic time
it was taken, so ``info status`` can say what the agent is, since when, and why.

::

    starting ──► standby ──► promoting ──► active ──► fenced
        │           ▲            │                      │
        │           │            └──► failed            │
        │           └───────────────────────────────────┘  (fenced rejoins as standby)
        └──────────────────────────────► active            (started without --incoming)

    any state above ──► stopping ──► stopped

- ``starting``: the agent is setting up (runtime dir, bridges, monitor, first role).
- ``standby``: keeping the replica; no QEMU runs here.
- ``promoting``: failing over: the standby hands its replica to a new active role.
- ``active``: QEMU runs the guest here.  Whether it is protected (``unprotected``,
  ``syncing``, ``protected``) is a sub-state of ``active``, reported separately.
- ``fenced``: the guest is paused and nothing is released (automatic failover); once
  etcd names another active, the agent rejoins as its standby by itself.
- ``failed``: the promotion failed (the failover QEMU did not start); see the reason.
- ``stopping`` / ``stopped``: teardown, then the end (no step leaves ``stopped``).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable, Mapping

from kemari.errors import StateError


class State(enum.Enum):
    """The agent's role state (the text is what ``info status`` shows)."""

    STARTING = "starting"
    STANDBY = "standby"
    PROMOTING = "promoting"
    ACTIVE = "active"
    FENCED = "fenced"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


S = State
TRANSITIONS: Mapping[State, frozenset[State]] = {
    S.STARTING: frozenset({S.STANDBY, S.ACTIVE, S.STOPPING}),
    S.STANDBY: frozenset({S.PROMOTING, S.STOPPING}),
    S.PROMOTING: frozenset({S.ACTIVE, S.FAILED, S.STOPPING}),
    S.ACTIVE: frozenset({S.FENCED, S.STOPPING}),
    S.FENCED: frozenset({S.STANDBY, S.STOPPING}),
    S.FAILED: frozenset({S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.STOPPED: frozenset(),
}
"""Every allowed step: ``TRANSITIONS[a]`` holds each state ``a`` may move to."""


@dataclasses.dataclass(frozen=True, slots=True)
class Transition:
    """One step taken: from, to, why, and when (``time.monotonic()``)."""

    source: State
    target: State
    reason: str
    at: float


class RoleState:
    """The current state, guarded by :data:`TRANSITIONS`, with the history of steps."""

    HISTORY = 32  # steps kept for status and debugging

    def __init__(
        self,
        reason: str = "agent started",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        now = clock()
        self._current = Transition(State.STARTING, State.STARTING, reason, now)
        self.history: list[Transition] = [self._current]

    @property
    def state(self) -> State:
        """The current state."""
        return self._current.target

    @property
    def since(self) -> float:
        """``time.monotonic()`` when the current state was entered."""
        return self._current.at

    @property
    def reason(self) -> str:
        """Why the current state was entered."""
        return self._current.reason

    def age_s(self) -> float:
        """Seconds spent in the current state so far."""
        return self._clock() - self._current.at

    def can(self, target: State) -> bool:
        """True when the table allows a step from the current state to ``target``."""
        return target in TRANSITIONS[self.state]

    def to(self, target: State, reason: str) -> Transition:
        """Step to ``target`` for ``reason``; :class:`StateError` if the table forbids it."""
        if not self.can(target):
            allowed = ", ".join(sorted(s.value for s in TRANSITIONS[self.state])) or "none"
            raise StateError(
                f"cannot go from {self.state.value} to {target.value} ({reason}); "
                f"allowed from {self.state.value}: {allowed}"
            )
        step = Transition(self.state, target, reason, self._clock())
        self._current = step
        self.history.append(step)
        del self.history[: -self.HISTORY]
        return step

    def require(self, *states: State, doing: str) -> None:
        """:class:`StateError` unless the current state is one of ``states``."""
        if self.state not in states:
            wanted = " or ".join(s.value for s in states)
            raise StateError(f"cannot {doing}: the agent is {self.state.value}, not {wanted}")
