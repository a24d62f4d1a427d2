"""A model of two agents racing on the HA record: every interleaving keeps one active.

The store is a model of etcd's part in docs/ha.md: the record under compare-and-swap on
its revision, leases with a server-side expiry, and alive keys bound to leases (deleted
when their lease expires, at the earliest moment etcd could).  Two agent slots run the
rules of docs/ha.md with the real transitions of ``kemari.ha.record``; hypothesis
interleaves their reads, transactions, lease renewals (sent and delivered separately),
crashes, restarts, freezes, etcd cuts, replication-link cuts and the passing of time,
in both storage modes, and checks after every step:

* **no divergent outputs**: two agents may release outputs at the same time only if
  one releases under rule (a) (its standby committed them and answered within the
  failure-detection timeout) and the other took over *from that agent's replica*;
* **shared mode**: at most one agent may write the disk at a time;
* the term never decreases, and no record revision has two successors (so of a
  drop and a takeover read from the same record, at most one commits).

The same machine with a deliberate bug (``BUG``) must fail on a short scripted
interleaving, which shows the checks can fail.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from kemari.ha.record import (
    Decision,
    Record,
    Refusal,
    Standby,
    Step,
    claim,
    drop_standby,
    mark_protected,
    publish_standby,
    take_over,
)

VM = "web"
TTL = 20  # ticks of 0.1 s: a 2 s lease
MARGIN = 5  # the safety margin subtracted by the agent's own clock
T_FD = 5  # failure-detection timeout of the replication heartbeats
IO_LATENCY = 3  # a disk write issued at t lands by t + IO_LATENCY (< MARGIN, docs/ha.md)

slots = st.sampled_from(["a", "b", "c"])


@dataclass
class View:
    record: Record | None = None
    revision: int = 0
    alive: frozenset[str] = frozenset()


@dataclass
class Link:
    """A replication connection from an active to its standby."""

    active: str
    standby: str
    open: bool = True
    cut: bool = False


@dataclass
class Agent:
    slot: str
    incarnation: int = 1
    up: bool = True
    frozen: bool = False
    etcd_ok: bool = True
    lease: int | None = None
    renewed_sent: int = 0
    pending_renewal: int | None = None
    attached: bool = False
    role: str = "idle"  # idle | candidate | standby | active | fenced
    started: bool = False
    took_over_from: str | None = None
    lost_active: bool = False
    last_answer: int = -(10**9)  # active: last heartbeat answer from its standby
    last_heard: int = -(10**9)  # standby: last frame from its active
    view: View = field(default_factory=View)

    @property
    def ident(self) -> str:
        return f"host-{self.slot}:{self.incarnation}"


class HaModel(RuleBasedStateMachine):
    BUG: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.shared = False
        self.record: Record | None = None
        self.revision = 0
        self.next_revision = 1
        self.leases: dict[int, int] = {}  # lease id -> server expiry
        self.next_lease = 1
        self.alive: dict[str, int] = {}  # agent -> lease its alive key is bound to
        self.successors: dict[int, int] = {}  # record revision -> transitions from it
        self.max_term = 0
        self.agents = {slot: Agent(slot) for slot in ("a", "b", "c")}
        self.links: dict[str, Link] = {}  # by active identity
        self.write_horizon: dict[str, int] = {}  # agent -> last time it may issue a write

    # --- the model store (etcd) ---------------------------------------------------

    def expire(self) -> None:
        for lease, expiry in list(self.leases.items()):
            if expiry <= self.now:
                del self.leases[lease]
                for agent, bound in list(self.alive.items()):
                    if bound == lease:
                        del self.alive[agent]

    def can_reach_etcd(self, agent: Agent) -> bool:
        return agent.up and not agent.frozen and agent.etcd_ok

    def cas(self, agent: Agent, step: Step) -> bool:
        """One transaction: compare the revision agent read (and requires_gone), put
        the record and agent's alive key bound to its lease."""
        assert agent.lease is not None
        if agent.lease not in self.leases:  # etcd: "requested lease not found"
            agent.lease, agent.attached = None, False
            return False
        if self.revision != agent.view.revision:
            return False
        if step.requires_gone is not None and step.requires_gone in self.alive:
            return False
        self.successors[self.revision] = self.successors.get(self.revision, 0) + 1
        assert step.record.term >= self.max_term, "the term decreased"
        self.max_term = step.record.term
        self.record = step.record
        self.revision = self.next_revision
        self.next_revision += 1
        self.alive[agent.ident] = agent.lease
        agent.attached = True
        agent.view = View(self.record, self.revision, frozenset(self.alive))
        return True

    # --- the agent's rules (docs/ha.md) -------------------------------------------

    def lease_valid(self, agent: Agent) -> bool:
        attached = agent.attached or self.BUG == "new-lease-counts"
        return agent.lease is not None and attached and self.now < agent.renewed_sent + TTL - MARGIN

    def case_a(self, agent: Agent) -> bool:
        """(a): the standby the record says protects it committed and answered within
        the detection timeout."""
        link = self.links.get(agent.ident)
        record = agent.view.record
        return (
            agent.role == "active"
            and agent.started
            and link is not None
            and record is not None
            and (record.protected_by == link.standby or self.BUG == "unmarked-standby-counts")
            and self.now - agent.last_answer <= T_FD
        )

    def case_b(self, agent: Agent) -> bool:
        """(b): the record says it is the active, unprotected, and its lease is valid."""
        record = agent.view.record
        return (
            agent.role == "active"
            and agent.started
            and record is not None
            and record.active == agent.ident
            and record.protected_by is None
            and self.lease_valid(agent)
        )

    def releases(self, agent: Agent) -> bool:
        return self.case_a(agent) or self.case_b(agent)

    def writes_disk(self, agent: Agent) -> bool:
        """Shared mode: a disk write needs a valid lease in case (a) too."""
        return (self.case_a(agent) and self.lease_valid(agent)) or self.case_b(agent)

    def writable_until(self, agent: Agent) -> int:
        """The last time ``agent`` may issue a write if nothing happens meanwhile."""
        lease_end = agent.renewed_sent + TTL - MARGIN
        if self.case_b(agent):
            return lease_end
        return min(agent.last_answer + T_FD, lease_end)

    def fence(self, agent: Agent) -> None:
        agent.role, agent.started = "fenced", False
        self.links.pop(agent.ident, None)

    def decide(self, agent: Agent) -> tuple[str, Decision] | None:
        record, me = agent.view.record, agent.ident
        if agent.role == "idle":
            alive = record is not None and record.active in agent.view.alive
            if self.BUG == "claim-protected" and record is not None:
                record_for_claim = Record(record.vm, record.term, record.active)
            else:
                record_for_claim = record
            decision = claim(record_for_claim, VM, me, active_alive=alive)
            if isinstance(decision, Step):
                return "claim", decision
            if record is not None and record.standby is None and record.active != me:
                return "publish", publish_standby(record, me, f"tcp:{me}")
            return None
        if agent.role == "active" and record is not None and record.active == me:
            link = self.links.get(me)
            if record.standby is not None and record.protected_by is None and link is not None:
                return "protected", mark_protected(record, me, record.standby)
            if link is not None:
                lost = self.now - agent.last_answer > T_FD
            else:  # protected without a link, or a candidate whose lease ended
                lost = record.protected_by is not None or (
                    record.standby is not None and record.standby.agent not in agent.view.alive
                )
            if record.standby is not None and lost:
                return "drop", drop_standby(record, me)
            return None
        if agent.role == "standby" and agent.lost_active:
            return "takeover", take_over(record, me)
        return None

    # --- rules ----------------------------------------------------------------------

    @initialize(shared=st.booleans(), start=st.sampled_from(["empty", "active", "protected"]))
    def mode(self, shared: bool, start: str = "empty") -> None:
        """The storage mode, and where the run starts (so short runs reach deep states)."""
        self.shared = shared
        if start != "empty":
            protected_pair(self, protect=start == "protected")

    @rule(ticks=st.integers(1, 6))
    def tick(self, ticks: int) -> None:
        self.now += ticks
        self.expire()

    @rule()
    def keepalives(self) -> None:
        """Every agent's keepalive loop, sent and answered at once."""
        for agent in self.agents.values():
            if self.can_reach_etcd(agent) and agent.lease is not None:
                if agent.lease in self.leases:
                    self.leases[agent.lease] = self.now + TTL
                    agent.renewed_sent = self.now
                else:
                    agent.lease, agent.attached = None, False

    @rule(slot=slots)
    def grant(self, slot: str) -> None:
        agent = self.agents[slot]
        if self.can_reach_etcd(agent) and (agent.lease is None or agent.lease not in self.leases):
            agent.lease = self.next_lease
            self.next_lease += 1
            self.leases[agent.lease] = self.now + TTL
            agent.renewed_sent, agent.attached = self.now, False

    @rule(slot=slots)
    def renew_send(self, slot: str) -> None:
        agent = self.agents[slot]
        if self.can_reach_etcd(agent) and agent.lease is not None:
            agent.pending_renewal = self.now

    @rule(slot=slots)
    def renew_deliver(self, slot: str) -> None:
        agent = self.agents[slot]
        if agent.pending_renewal is None or not agent.etcd_ok or agent.lease is None:
            return
        if agent.lease in self.leases:  # the server extends from *its* time
            self.leases[agent.lease] = self.now + TTL
            if not agent.frozen and agent.up:
                agent.renewed_sent = agent.pending_renewal
        else:
            agent.lease, agent.attached = None, False
        agent.pending_renewal = None

    @rule(slot=slots)
    def read(self, slot: str) -> None:
        agent = self.agents[slot]
        if not self.can_reach_etcd(agent):
            return
        agent.view = View(self.record, self.revision, frozenset(self.alive))
        record = agent.view.record
        if agent.role == "active" and (record is None or record.active != agent.ident):
            self.fence(agent)  # superseded: stop, release nothing more
        if agent.role == "candidate" and (record is None or record.standby is None):
            agent.role = "idle"

    @rule(slot=slots, fresh=st.booleans())
    def act(self, slot: str, fresh: bool = False) -> None:
        """Decide on the record as last read (or read it first) and try the transaction."""
        agent = self.agents[slot]
        if not agent.up or agent.frozen:
            return
        if fresh:
            self.read(slot)
        if agent.lease is None or agent.lease not in self.leases:
            self.grant(slot)  # the arbiter grants a lease before a transaction
        record = agent.view.record
        if (
            agent.role == "active"
            and agent.started
            and record is not None
            and record.protected_by is None
            and not self.lease_valid(agent)
        ):
            self.fence(agent)  # unprotected and the lease ran out
            return
        decided = self.decide(agent)
        if decided is None or not self.can_reach_etcd(agent) or agent.lease is None:
            return
        kind, decision = decided
        if isinstance(decision, Refusal):
            if kind == "takeover":
                agent.role, agent.lost_active = "idle", False  # the drop won: rejoin later
            return
        if not self.cas(agent, decision):
            return
        if kind == "claim":
            agent.role, agent.took_over_from = "active", None
        elif kind == "publish":
            agent.role = "candidate"
        elif kind == "drop":
            self.links.pop(agent.ident, None)
        elif kind == "takeover":
            assert record is not None
            agent.role, agent.took_over_from, agent.lost_active = "active", record.active, False

    @rule(slot=slots)
    def agent_loop(self, slot: str) -> None:
        """One turn of an agent's whole loop (the fine-grained rules interleave too)."""
        self.standby_loses_active(slot)
        self.protect(slot)
        self.act(slot, fresh=True)
        self.start_guest(slot)
        self.exchange()

    @rule(slot=slots)
    def protect(self, slot: str) -> None:
        """The active connects to the published candidate; the initial sync commits."""
        active = self.agents[slot]
        self.read(slot)
        record = active.view.record
        if active.role != "active" or not active.up or active.frozen or record is None:
            return
        if record.active != active.ident or record.standby is None:
            return
        if active.ident in self.links:
            return
        standby = next((a for a in self.agents.values() if a.ident == record.standby.agent), None)
        if standby is None or standby.role != "candidate" or not standby.up or standby.frozen:
            return
        self.links[active.ident] = Link(active.ident, standby.ident)
        standby.role, standby.lost_active = "standby", False
        active.last_answer = standby.last_heard = self.now

    @rule()
    def exchange(self) -> None:
        """Checkpoints and heartbeats on every working link."""
        for link in self.links.values():
            ends = [a for a in self.agents.values() if a.ident in (link.active, link.standby)]
            if len(ends) != 2 or link.cut or not link.open:
                continue
            if all(a.up and not a.frozen for a in ends):
                active, standby = sorted(ends, key=lambda a: a.ident != link.active)
                if standby.role == "standby" and active.role == "active":
                    active.last_answer = standby.last_heard = self.now

    @rule(slot=slots)
    def standby_loses_active(self, slot: str) -> None:
        """Heartbeat timeout: close the connection first, then try to take over."""
        agent = self.agents[slot]
        up = agent.up and not agent.frozen
        if agent.role == "standby" and up and self.now - agent.last_heard > T_FD:
            for link in self.links.values():
                if link.standby == agent.ident:
                    link.open = False
            agent.lost_active = True

    @rule(slot=slots)
    def start_guest(self, slot: str) -> None:
        agent = self.agents[slot]
        if agent.role != "active" or agent.started or not agent.up or agent.frozen:
            return
        waits = self.shared and agent.took_over_from is not None and self.BUG != "no-lease-wait"
        if waits and (not self.can_reach_etcd(agent) or agent.took_over_from in self.alive):
            return  # shared mode: wait until the old active's lease has ended in etcd
        agent.started = True

    @rule(slot=slots)
    def crash(self, slot: str) -> None:
        agent = self.agents[slot]
        agent.up, agent.started, agent.role = False, False, "idle"
        self.links.pop(agent.ident, None)
        for link in self.links.values():
            if link.standby == agent.ident:
                link.open = False

    @rule(slot=slots)
    def restart(self, slot: str) -> None:
        old = self.agents[slot]
        if not old.up:
            self.agents[slot] = Agent(slot, incarnation=old.incarnation + 1, etcd_ok=old.etcd_ok)

    @rule(slot=slots)
    def freeze_or_thaw(self, slot: str) -> None:
        agent = self.agents[slot]
        agent.frozen = not agent.frozen

    @rule(slot=slots)
    def cut_or_heal_etcd(self, slot: str) -> None:
        agent = self.agents[slot]
        agent.etcd_ok = not agent.etcd_ok
        if not agent.etcd_ok:
            agent.pending_renewal = None

    @rule()
    def cut_or_heal_replication(self) -> None:
        for link in self.links.values():
            link.cut = not link.cut

    @rule(slot=slots)
    def rejoin(self, slot: str) -> None:
        agent = self.agents[slot]
        if agent.role == "fenced":
            agent.role = "idle"

    # --- the safety properties -------------------------------------------------------

    @invariant()
    def no_divergent_outputs(self) -> None:
        releasing = [a for a in self.agents.values() if self.releases(a)]
        for x, y in itertools.combinations(releasing, 2):
            self.check_pair(x, y)

    def check_pair(self, x: Agent, y: Agent) -> None:

        def continues(old: Agent, new: Agent) -> bool:
            link = self.links.get(old.ident)
            return (
                self.case_a(old)
                and link is not None
                and link.standby == new.ident
                and new.took_over_from == old.ident
            )

        assert continues(x, y) or continues(y, x), (
            f"two agents release divergent outputs at t={self.now}: {x} and {y}"
        )

    @invariant()
    def one_disk_writer_in_shared_mode(self) -> None:
        """No agent may write while another's earlier write may still land."""
        if not self.shared:
            return
        writers = [a for a in self.agents.values() if self.writes_disk(a)]
        for writer in writers:
            horizon = self.write_horizon.get(writer.ident, -(10**9))
            self.write_horizon[writer.ident] = max(horizon, self.writable_until(writer))
        for writer in writers:
            for other, horizon in self.write_horizon.items():
                assert other == writer.ident or horizon + IO_LATENCY <= self.now, (
                    f"two agents write the shared disk at t={self.now}: {writer.ident} "
                    f"while {other}'s writes issued until t={horizon} may still land"
                )

    @invariant()
    def one_successor_per_revision(self) -> None:
        assert all(count == 1 for count in self.successors.values())
        assert self.record is None or self.record.term == self.max_term


TestHaModel = HaModel.TestCase
TestHaModel.settings = settings(
    max_examples=500,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- scripted interleavings: the checks fail when a rule is broken --------------------


def protected_pair(model: HaModel, *, protect: bool = True) -> tuple[Agent, Agent]:
    """a active and started, b its standby, record protected by b (or just a active)."""
    a, b = model.agents["a"], model.agents["b"]
    for slot in ("a", "b"):
        model.grant(slot)
    model.read("a")
    model.act("a")  # claim
    model.start_guest("a")
    if not protect:
        return model.agents["a"], model.agents["b"]
    model.read("b")
    model.act("b")  # publish
    model.read("a")
    model.protect("a")
    model.act("a")  # mark protected
    assert model.record == Record(VM, 1, a.ident, b.ident, Standby(b.ident, f"tcp:{b.ident}"))
    return a, b


def renew(model: HaModel, *slots_: str) -> None:
    for slot in slots_:
        model.renew_send(slot)
        model.renew_deliver(slot)


def scenario_unprotected_active_frozen_then_claimed(model: HaModel) -> None:
    """a unprotected and frozen past its lease; b claims; a thaws with a stale record."""
    model.mode(shared=False)
    b = model.agents["b"]
    protected_pair(model)
    model.cut_or_heal_replication()
    model.tick(T_FD + 1)
    renew(model, "a", "b")
    model.act("a")  # drop the lost standby: a active and unprotected
    assert model.record is not None and model.record.protected_by is None
    model.freeze_or_thaw("a")
    for _ in range(3):
        model.tick(10)
        renew(model, "b")
    model.read("b")
    model.standby_loses_active("b")
    model.act("b")  # takeover refused (the drop won): b goes idle
    model.read("b")
    model.act("b")  # claim over a's ended lease
    model.start_guest("b")
    assert b.role == "active" and b.started
    model.freeze_or_thaw("a")  # a thaws, still believes it is the unprotected active
    model.renew_send("a")
    model.renew_deliver("a")  # its old lease is gone
    model.grant("a")  # a new lease, not bound to anything yet
    model.no_divergent_outputs()


def scenario_standby_crash_and_claim(model: HaModel) -> None:
    """a protected, cut from etcd (its lease ends); b restarts and claims."""
    model.mode(shared=False)
    protected_pair(model)
    model.cut_or_heal_etcd("a")
    model.tick(TTL + 1)
    model.exchange()
    model.crash("b")
    model.restart("b")
    model.grant("b")
    model.read("b")
    model.act("b")  # claim: refused unless the claim ignores protection
    model.start_guest("b")
    model.no_divergent_outputs()


def scenario_shared_takeover(model: HaModel) -> None:
    """Shared mode: a frozen with its lease alive; b takes over and starts."""
    model.mode(shared=True)
    b = model.agents["b"]
    protected_pair(model)
    renew(model, "a", "b")
    model.exchange()
    model.one_disk_writer_in_shared_mode()  # a writes: the check notes until when
    model.freeze_or_thaw("a")
    model.tick(T_FD + 1)
    model.standby_loses_active("b")
    model.read("b")
    model.act("b")  # takeover
    assert b.role == "active"
    model.start_guest("b")
    model.freeze_or_thaw("a")
    model.one_disk_writer_in_shared_mode()
    model.no_divergent_outputs()


def scenario_claim_while_an_unmarked_standby_commits(model: HaModel) -> None:
    """a connected to b but has not won mark_protected; a loses etcd, its lease ends,
    and a third agent c claims: a's commits at b must not count for case (a)."""
    model.mode(shared=False)
    protected_pair(model, protect=False)
    model.read("b")
    model.act("b")  # publish
    model.protect("a")  # the link and the initial sync, not yet marked in the record
    model.cut_or_heal_etcd("a")
    model.tick(TTL + 1)
    model.exchange()
    model.act("c", fresh=True)  # claim over a's ended lease (unprotected record)
    model.start_guest("c")
    assert model.agents["c"].started
    model.no_divergent_outputs()


SCENARIOS = [
    (scenario_unprotected_active_frozen_then_claimed, "new-lease-counts"),
    (scenario_standby_crash_and_claim, "claim-protected"),
    (scenario_shared_takeover, "no-lease-wait"),
    (scenario_claim_while_an_unmarked_standby_commits, "unmarked-standby-counts"),
]


@pytest.mark.parametrize(("scenario", "bug"), SCENARIOS, ids=[b for _s, b in SCENARIOS])
def test_scripted_interleaving_is_safe_and_fails_with_the_bug(scenario, bug):
    scenario(HaModel())  # the real rules: the checks hold

    class Broken(HaModel):
        BUG = bug

    with pytest.raises(AssertionError, match="two agents"):
        scenario(Broken())
