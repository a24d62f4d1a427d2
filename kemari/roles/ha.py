"""Automatic failover: the agent's side of the etcd arbiter (docs/ha.md, issue 9).

:class:`HaSupervisor` holds the agent's :class:`~kemari.ha.arbiter.Arbiter` (its lease,
kept alive in the background) and the record as this agent last read or wrote it.  It
is used only with ``--ha etcd://...``; without it the agent behaves exactly as before.

* **Boot** (:meth:`HaSupervisor.boot`): ``claim`` the record → active (boot the
  guest); otherwise standby, publishing ``incoming`` with ``publish_standby``.
* **Active** (:meth:`HaSupervisor.guard_active`): protects to a published standby by
  itself (the ``migrate -d`` path), wins ``mark_protected`` once the initial sync (and,
  replicated storage, the disk copy) is done; a lost standby is dropped with
  ``drop_standby`` (outputs held until it is won); a record naming another active, or
  an unprotected record with the lease no longer valid, ends the guard with the reason
  to fence.
* **Release permit** (:meth:`HaSupervisor.may_release`, the event-tap's one hook): rule
  2 (a) or (b).
* **Fenced** (:meth:`HaSupervisor.wait_for_another_active`): once etcd answers and the
  record names another active, the agent rejoins as its standby (kemari.roles.agent).
* **Standby** (:meth:`HaSupervisor.guard_standby`): keeps itself published; when the
  active is lost (the session ended or went silent for the detection timeout) and the
  record says this agent protects it: closes the replication connection, wins
  ``take_over``, (shared storage) waits until the old active's lease is gone, and
  returns: the agent then runs the same failover order as ``failover``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import socket
import sys
import time
from dataclasses import dataclass

from kemari.config import StorageMode, VMConfig
from kemari.errors import KemariError
from kemari.eventtap.disktap import DiskTap
from kemari.eventtap.gate import EventTap
from kemari.ha import ArbiterError
from kemari.ha import record as ha
from kemari.ha.arbiter import Arbiter, ArbiterSettings, RecordState, Refused, Won
from kemari.monitor import api
from kemari.roles.active import ActiveRole
from kemari.roles.standby import StandbyRole

# How often the guards look at the receiver (standby) and read the record.
RECEIVER_POLL_S = 0.02
RECORD_POLL_S = 0.1
# An isolated active (no etcd, lease run out) probes its standby with a checkpoint and
# fences itself when no acknowledgement comes within this many detection timeouts.
PROBE_DETECTS = 4
# Protection attempts to a published standby that may fail before it is dropped.
MAX_PROTECT_FAILURES = 3


def agent_identity() -> str:
    """Unique per agent process: ``host:pid.nonce`` (docs/ha.md, "agent identity")."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:60] or "host"
    return f"{host}:{os.getpid()}.{secrets.token_hex(4)}"


@dataclass(frozen=True)
class TakeOver:
    """The standby won ``take_over``: promote now."""

    reason: str
    old_active: str
    detect_ms: float  # the active's last frame → the loss noticed
    arbitrate_ms: float  # the loss noticed → take_over won (and, shared, the lease gone)


@dataclass(frozen=True)
class Rejoin:
    """The standby lost its receiver but may not take over: start a new standby role."""

    reason: str


class HaSupervisor:
    """One agent's arbiter, record and decisions (see the module docstring)."""

    def __init__(self, config: VMConfig, *, agent: str | None = None) -> None:
        assert config.ha is not None
        self.config = config
        self.settings = ArbiterSettings(config.ha.endpoints, lease_ttl=config.ha.lease_ttl_s)
        self.me = agent_identity() if agent is None else agent
        self.arbiter = Arbiter(self.settings, config.name, self.me)
        self.detect_s = config.ha.detect_s
        self.record: ha.Record | None = None  # as this agent last read or wrote it
        self.last_change = "starting"
        self.fenced = False
        self.event_tap: EventTap | None = None
        self.disk_tap: DiskTap | None = None  # shared storage: gated by HaDiskPermit
        self._active: ActiveRole | None = None
        self._standby: StandbyRole | None = None
        self._protecting: str | None = None  # the standby agent our protection goes to
        self._protect_failures = 0
        # An unanswered probe of the standby (isolated active), and the acknowledged
        # COMMIT's send time it saw: no new probe until another acknowledgement.
        self._probe_failed = False
        self._unanswered: float | None = None
        self._started = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, stop: asyncio.Event) -> None:
        """Grant the lease (retrying while etcd is unreachable, until ``stop``)."""
        while not stop.is_set():
            try:
                await self.arbiter.start()
                self._started = True
                return
            except ArbiterError as exc:
                self._note(f"waiting for etcd: {exc}")
                await _sleep_or(stop, 0.5)

    async def close(self) -> None:
        """Stop renewing and revoke the lease (best effort)."""
        await self.arbiter.close(revoke=True)

    def _note(self, why: str) -> None:
        self.last_change = why
        print(f"kemari: ha: {why}", file=sys.stderr, flush=True)

    # -- boot ------------------------------------------------------------------------

    async def boot(self, stop: asyncio.Event) -> bool | None:
        """``claim`` the record: True → this agent boots the guest; False → standby;
        None: stopped before etcd answered."""
        vm, me = self.config.name, self.me
        while not stop.is_set():
            try:
                got = await self.arbiter.transition(
                    lambda s: ha.claim(s.record, vm, me, active_alive=s.active_alive)
                )
            except ArbiterError as exc:
                self._note(f"claim: outcome unknown, reading again: {exc}")
                if await self._names_me_active():
                    return True
                await _sleep_or(stop, RECORD_POLL_S)
                continue
            self.record = got.state.record
            if isinstance(got, Won):
                assert self.record is not None
                self._note(f"claimed VM {vm} (term {self.record.term}): booting the guest")
                return True
            self._note(f"standby: {got.reason}")
            return False
        return None

    async def _names_me_active(self) -> bool:
        try:
            state = await self.arbiter.read()
        except ArbiterError:
            return False
        return state.record is not None and state.record.active == self.me

    # -- the release permit (docs/ha.md rule 2) ---------------------------------------

    def may_release(self, committed: bool) -> bool:
        """The event-tap's permit: (a) for outputs whose checkpoint the standby the record
        names acknowledged within the detection timeout of the COMMIT's send time, or
        (b) the record says this agent is active and unprotected, and the lease is valid.

        (a) uses the send time of the COMMIT whose acknowledgement came last (the one
        that released the outputs asked about), never that of a COMMIT still in flight:
        with pipelined checkpoints a later COMMIT may already be on the wire."""
        record = self.record
        if self.fenced or record is None or record.active != self.me:
            return False
        if record.protected_by is None:
            return self.arbiter.lease_valid()  # (b)
        if not committed or record.protected_by != self._protecting:
            return False
        sent = self._commit_sent_at()
        return sent is not None and time.monotonic() - sent < self.detect_s  # (a)

    def _commit_sent_at(self) -> float | None:
        active = self._active
        protection = None if active is None else active.protection
        if protection is None:
            return None
        return getattr(protection.source.sink, "acked_commit_sent_at", None)

    # -- the active --------------------------------------------------------------------

    async def guard_active(self, role: ActiveRole) -> str:
        """Run the active's side until it must fence itself; returns why."""
        self._active = role
        self._standby = None
        while True:
            reason = await self._active_step(role)
            if reason is not None:
                return reason
            await asyncio.sleep(RECORD_POLL_S)

    async def _active_step(self, role: ActiveRole) -> str | None:
        try:
            state = await self.arbiter.read()
        except ArbiterError as exc:  # unreachable, or an answer we cannot use
            record = self.record
            if record is not None and record.protected_by is None:
                if self.arbiter.lease_valid():
                    return None
                return f"etcd unreachable and the lease ran out while unprotected ({exc})"
            if await self._standby_answers(role):
                return None  # protected: goes on while the standby keeps committing (rule 5)
            if self.arbiter.lease_valid():
                return None  # holds every output; fences when the lease runs out
            # Isolated: neither etcd nor the standby; the standby may have taken over.
            return (
                f"etcd unreachable, the lease ran out and standby "
                f"{None if record is None else record.protected_by} does not answer ({exc})"
            )
        record = state.record
        if record is None or record.active != self.me:
            return f"the record names another active: {_describe(record)}"
        self.record = record
        if not record.protected:
            if not self.arbiter.lease_valid():
                return "the lease is no longer valid while unprotected"
            self._release_permitted()
        standby = record.standby
        if record.protected and not self.arbiter.lease_valid():
            await self._reattach()  # the lease lapsed while etcd was away: bind the new one
        if record.protected:
            if role.protection_state == "unprotected":
                await self._drop(f"standby {record.protected_by} lost")
        elif standby is not None:
            await self._protect(role, state, standby)
        return None

    async def _standby_answers(self, role: ActiveRole) -> bool:
        """Has the standby acknowledged a COMMIT sent within the detection timeout?  If
        not, ask for a checkpoint and give its acknowledgement :data:`PROBE_DETECTS`
        detection timeouts (a large checkpoint must not look like a lost standby), but
        no longer than the lease's validity, so an isolated active fences within it."""
        sent = self._commit_sent_at()
        if sent is not None and time.monotonic() - sent < self.detect_s:
            return True
        protection = role.protection
        if protection is None or not protection.active:
            return False
        if self._probe_failed and self._unanswered == sent:
            return False  # a probe went unanswered and nothing was acknowledged since
        window = self.detect_s * PROBE_DETECTS
        if self.arbiter.lease_valid():
            window = min(window, self.arbiter.lease_remaining() or 0.0)
        try:
            async with asyncio.timeout(window):
                await protection.trigger.checkpoint()
        except (TimeoutError, KemariError):
            self._probe_failed, self._unanswered = True, self._commit_sent_at()
            return False
        self._probe_failed = False
        return True

    async def _protect(self, role: ActiveRole, state: RecordState, standby: ha.Standby) -> None:
        if standby.agent not in state.alive:
            await self._drop(f"published standby {standby.agent} has no lease")
            return
        protection = role.protection_state
        if protection == "unprotected":
            try:
                await role.migrate(api.Migrate(standby.address))
            except KemariError as exc:
                self._protect_failures += 1
                self._note(f"protecting to {standby.address} failed: {exc}")
                if self._protect_failures >= MAX_PROTECT_FAILURES:
                    await self._drop(f"standby {standby.agent} unreachable")
                return
            self._protecting = standby.agent
            self._note(f"protecting to standby {standby.agent} at {standby.address}")
        elif protection == "protected" and self._protecting == standby.agent:
            if not all(copier.done for copier in role.disk_copies):
                return
            me = self.me
            try:
                got = await self.arbiter.transition(
                    lambda s: ha.mark_protected(s.record, me, standby)
                )
            except ArbiterError as exc:
                self._note(f"mark_protected: {exc} (reading again)")
                return
            if isinstance(got, Won):
                self.record = got.state.record
                self._protect_failures = 0
                self._note(f"protected by {standby.agent} (marked in the record)")

    async def _reattach(self) -> None:
        me = self.me
        try:
            got = await self.arbiter.transition(lambda s: ha.reattach(s.record, me))
        except ArbiterError:
            return
        if isinstance(got, Won):
            self.record = got.state.record
            self._note("etcd reachable again: lease re-bound (reattach)")

    async def _drop(self, why: str) -> None:
        """Win ``drop_standby``; until then every output stays held (rule 3)."""
        me = self.me
        try:
            got = await self.arbiter.transition(lambda s: ha.drop_standby(s.record, me))
        except ArbiterError as exc:
            self._note(f"{why}: drop_standby: outcome unknown ({exc}); holding outputs")
            return
        self.record = got.state.record
        self._protecting = None
        self._protect_failures = 0
        if isinstance(got, Won):
            self._note(f"{why}: dropped it, running unprotected")
            self._release_permitted()
        else:
            self._note(f"{why}: drop_standby refused: {got.reason}")

    def _release_permitted(self) -> None:
        assert self.event_tap is not None
        self.event_tap.release_permitted()
        if self.disk_tap is not None:
            self.disk_tap.release_permitted()

    # -- the standby ------------------------------------------------------------------

    async def guard_standby(self, role: StandbyRole) -> TakeOver | Rejoin:
        """Keep published; when the active is lost and the record names this agent as
        its protector, close the connection, win ``take_over`` and return TakeOver."""
        self._standby, self._active = role, None
        address = self.config.incoming
        assert address is not None
        had_session = False
        next_read = 0.0
        while True:
            connected = role.receiver.connected
            had_session = had_session or connected
            if had_session and not connected:
                outcome = await self._lost_active(role)
                if outcome is not None:
                    return outcome
                had_session = False
            if time.monotonic() >= next_read:
                next_read = time.monotonic() + RECORD_POLL_S
                await self._keep_published(address)
            await asyncio.sleep(RECEIVER_POLL_S)

    async def _keep_published(self, address: str) -> None:
        try:
            state = await self.arbiter.read()
        except ArbiterError:
            return
        record = self.record = state.record
        if record is None or record.protected or record.active == self.me:
            return
        if record.standby is not None and record.standby.agent == self.me:
            return
        me = self.me
        try:
            got = await self.arbiter.transition(lambda s: ha.publish_standby(s.record, me, address))
        except ArbiterError:
            return
        self.record = got.state.record
        if isinstance(got, Won):
            self._note(f"published as standby of {record.active} at {address}")

    async def _lost_active(self, role: StandbyRole) -> TakeOver | Rejoin | None:
        """The session with the active ended: take over if the record lets us."""
        lost = role.receiver.last_error or "the session ended"
        noticed = time.monotonic()
        last_frame = role.receiver.last_frame_at
        detect_ms = 0.0 if last_frame is None else (noticed - last_frame) * 1000
        while True:
            try:
                state = await self.arbiter.read()
                break
            except ArbiterError as exc:
                self._note(f"active lost ({lost}); etcd unreachable, cannot take over: {exc}")
                await asyncio.sleep(RECORD_POLL_S)
        record = state.record
        if record is None or record.protected_by != self.me:
            return None  # not (yet) protecting it: nothing to take over; stay published
        old_active = record.active
        # Rule 4: the active gets no answer after this.
        await role.stop_receiving()
        me = self.me
        while True:
            try:
                got: Won | Refused = await self.arbiter.transition(
                    lambda s: ha.take_over(s.record, me)
                )
                break
            except ArbiterError as exc:
                self._note(f"take_over: outcome unknown ({exc}); reading again")
                await asyncio.sleep(RECORD_POLL_S)
        self.record = got.state.record
        if isinstance(got, Refused):
            if self.record is not None and self.record.active == self.me:
                pass  # an earlier attempt that timed out had committed
            else:
                self._note(f"active lost ({lost}) but take_over refused: {got.reason}")
                return Rejoin(got.reason)
        assert self.record is not None
        shared_writer = self.config.storage is StorageMode.SHARED and any(
            not disk.read_only for disk in self.config.disks
        )
        if shared_writer:  # invariant 5: one writer of the shared image
            wait = self.settings.lease_ttl + self.settings.safety_margin + 1
            try:
                await self.arbiter.wait_gone(old_active, timeout=wait)
            except ArbiterError as exc:
                # The term is ours; the old active's lease outlived its TTL: never start
                # a second writer of the shared disk.  Keep waiting.
                self._note(f"waiting for {old_active}'s lease to end: {exc}")
                while True:
                    try:
                        await self.arbiter.wait_gone(old_active, timeout=wait)
                        break
                    except ArbiterError:
                        continue
        arbitrate_ms = (time.monotonic() - noticed) * 1000
        why = (
            f"took over from {old_active} (term {self.record.term}): active lost: {lost}; "
            f"detection {detect_ms:.0f} ms, arbitration {arbitrate_ms:.0f} ms"
        )
        self._note(why)
        return TakeOver(why, old_active, detect_ms, arbitrate_ms)

    # -- fenced ---------------------------------------------------------------------

    async def wait_for_another_active(self, stop: asyncio.Event) -> str | None:
        """A fenced agent: wait until etcd answers with a record naming another active;
        returns what it names (why to rejoin), or None on ``stop``."""
        unreachable_noted = False
        while not stop.is_set():
            try:
                state = await self.arbiter.read()
            except ArbiterError as exc:
                if not unreachable_noted:
                    unreachable_noted = True
                    self._note(f"fenced; waiting for etcd to rejoin as standby: {exc}")
                await _sleep_or(stop, RECORD_POLL_S)
                continue
            self.record = state.record
            seen = another_active(state.record, self.me)
            if seen is not None:
                return seen
            await _sleep_or(stop, RECORD_POLL_S)
        return None

    def promoted(self, role: ActiveRole) -> None:
        """The failover order made ``role`` the active: guard it from now on."""
        self._active, self._standby = role, None

    # -- status -----------------------------------------------------------------------

    def status(self) -> api.HaStatus:
        arbiter = self.arbiter.status()
        record = self.record
        heartbeat: float | None = None
        if self._standby is not None and self._standby.receiver.last_frame_at is not None:
            heartbeat = time.monotonic() - self._standby.receiver.last_frame_at
        elif self._active is not None:
            sent = self._commit_sent_at()
            heartbeat = None if sent is None else time.monotonic() - sent
        return api.HaStatus(
            mode="etcd",
            agent=self.me,
            endpoints=list(self.settings.endpoints),
            term=None if record is None else record.term,
            active=None if record is None else record.active,
            protected_by=None if record is None else record.protected_by,
            standby=None if record is None or record.standby is None else record.standby.agent,
            reachable=arbiter.reachable,
            lease_valid=arbiter.lease_valid,
            lease_remaining_s=None
            if arbiter.lease_remaining is None
            else round(arbiter.lease_remaining, 3),
            last_heartbeat_age_s=None if heartbeat is None else round(heartbeat, 3),
            last_change=self.last_change,
            last_error=arbiter.last_error,
            withheld=0 if self.event_tap is None else self.event_tap.withheld,
            fenced=self.fenced,
        )


class HaDiskPermit:
    """Shared storage: a disk write reaches the image under rule 2 and, in case (a),
    only with a valid lease too (the new active starts only after our lease is gone)."""

    def __init__(self, supervisor: HaSupervisor) -> None:
        self.supervisor = supervisor

    def may_release(self, committed: bool) -> bool:
        return self.supervisor.may_release(committed) and self.supervisor.arbiter.lease_valid()


class HaPermit:
    """The event-tap's release permit, answered by the supervisor (rule 2)."""

    def __init__(self, supervisor: HaSupervisor) -> None:
        self.supervisor = supervisor

    def may_release(self, committed: bool) -> bool:
        return self.supervisor.may_release(committed)


def another_active(record: ha.Record | None, me: str) -> str | None:
    """Rule 5's rejoin condition for the fenced agent ``me``: the record names another
    active (then: which, and its term); None while it names ``me`` or there is none."""
    if record is None or record.active == me:
        return None
    return f"the record names {record.active} active (term {record.term})"


def _describe(record: ha.Record | None) -> str:
    return "no record" if record is None else record.describe()


async def _sleep_or(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
