"""The HA arbiter against a real three-member etcd cluster in network namespaces.

One cluster for the whole session (kemari.testbed.etcd.EtcdLab); the arbiters run in
this process and reach etcd from agent namespaces through the lab's relay, so cutting
an agent's link on the LAN cuts its arbiter off.  Tests that kill members start them
again before they end.  Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from kemari.ha import ArbiterError
from kemari.ha.arbiter import Arbiter, ArbiterSettings, Refused, Won
from kemari.ha.record import (
    Record,
    Standby,
    claim,
    drop_standby,
    mark_protected,
    publish_standby,
    reattach,
    take_over,
)
from kemari.testbed.etcd import EtcdLab, EtcdLabError, etcd_binary
from kemari.testbed.topology import Topology

pytestmark = pytest.mark.root

TTL = 2
A, B = "host-a:1", "host-b:1"


@pytest.fixture(scope="session")
def lab() -> Iterator[EtcdLab]:
    if os.geteuid() != 0:
        pytest.fail("the etcd tests need root (network namespaces)")
    try:
        etcd_binary()
    except EtcdLabError as exc:
        pytest.fail(str(exc))
    with EtcdLab(3) as started:
        for name in ("agenta", "agentb", "observer"):
            started.add_agent(name)
        yield started


def arbiter(lab: EtcdLab, netns: str, vm: str, agent: str, **timing: float) -> Arbiter:
    settings = ArbiterSettings(lab.local_endpoints(netns), lease_ttl=TTL, **timing)  # type: ignore[arg-type]
    return Arbiter(settings, vm, agent)


def fresh_vm() -> str:
    return f"t-{secrets.token_hex(4)}"


def claim_for(agent: str, vm: str) -> Callable[..., object]:
    return lambda s: claim(s.record, vm, agent, active_alive=s.active_alive)


async def until(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str, step: float = 0.05
) -> float:
    """Wait until ``condition`` holds; seconds taken; fails the test at the deadline."""
    start = time.monotonic()
    while not await condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(step)
    return time.monotonic() - start


def holds(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A synchronous predicate as a condition for :func:`until`."""

    async def check() -> bool:
        return predicate()

    return check


async def protected_record(a: Arbiter, b: Arbiter) -> Standby:
    """a claims, b publishes, a marks protected by b."""
    vm = a.vm
    assert isinstance(await a.transition(claim_for(A, vm)), Won)
    assert isinstance(await b.transition(lambda s: publish_standby(s.record, B, "tcp:b:1")), Won)
    standby = Standby(B, "tcp:b:1")
    assert isinstance(await a.transition(lambda s: mark_protected(s.record, A, standby)), Won)
    return standby


def test_compare_and_swap_wins_exactly_once_for_two_concurrent_contenders(lab):
    async def main() -> None:
        winners = []
        for _ in range(8):
            vm = fresh_vm()
            async with arbiter(lab, "agenta", vm, A) as a, arbiter(lab, "agentb", vm, B) as b:
                seen_a, seen_b = await asyncio.gather(a.read(), b.read())
                assert seen_a.record is None and seen_b.record is None
                step_a = claim(None, vm, A, active_alive=False)
                step_b = claim(None, vm, B, active_alive=False)
                (won_a, now_a), (won_b, now_b) = await asyncio.gather(
                    a.compare_and_swap(seen_a, step_a), b.compare_and_swap(seen_b, step_b)
                )
                assert won_a != won_b, "exactly one of two claims from the same read must win"
                winner = A if won_a else B
                winners.append(winner)
                final = await a.read()
                assert final.record == Record(vm, 1, winner)
                assert now_a.record == now_b.record == final.record
                assert final.alive == {winner}
                # the loser, deciding again on what its failed transaction returned, refuses
                loser_state = now_b if won_a else now_a
                again = claim(loser_state.record, vm, B if won_a else A, active_alive=True)
                assert "lease is alive" in getattr(again, "reason", "")
        print("claim winners:", winners)

    asyncio.run(main())


def test_drop_standby_and_take_over_exactly_one_wins(lab):
    async def main() -> None:
        outcomes = []
        for _ in range(6):
            vm = fresh_vm()
            async with arbiter(lab, "agenta", vm, A) as a, arbiter(lab, "agentb", vm, B) as b:
                await protected_record(a, b)
                dropped, taken = await asyncio.gather(
                    a.transition(lambda s: drop_standby(s.record, A)),
                    b.transition(lambda s: take_over(s.record, B)),
                )
                assert isinstance(dropped, Won) != isinstance(taken, Won), (dropped, taken)
                final = (await a.read()).record
                if isinstance(dropped, Won):
                    outcomes.append("drop")
                    assert final == Record(vm, 1, A)
                    assert isinstance(taken, Refused) and "unprotected" in taken.reason
                else:
                    outcomes.append("takeover")
                    assert final == Record(vm, 2, B)
                    assert isinstance(dropped, Refused) and "not the active" in dropped.reason
        print("drop/takeover outcomes:", outcomes)

    asyncio.run(main())


@pytest.mark.parametrize("first", ["drop", "takeover"])
def test_the_transaction_read_from_a_stale_record_loses(lab, first):
    """Both read the protected record; whichever commits second compares a revision
    that is gone, and deciding again on the current record refuses."""

    async def main() -> None:
        vm = fresh_vm()
        async with arbiter(lab, "agenta", vm, A) as a, arbiter(lab, "agentb", vm, B) as b:
            await protected_record(a, b)
            seen_a, seen_b = await asyncio.gather(a.read(), b.read())
            assert seen_a.revision == seen_b.revision
            drop = drop_standby(seen_a.record, A)
            take = take_over(seen_b.record, B)
            if first == "drop":
                assert (await a.compare_and_swap(seen_a, drop))[0]  # type: ignore[arg-type]
                won, now = await b.compare_and_swap(seen_b, take)  # type: ignore[arg-type]
                assert not won and now.record == Record(vm, 1, A)
                assert isinstance(take_over(now.record, B), type(take_over(None, B)))
            else:
                assert (await b.compare_and_swap(seen_b, take))[0]  # type: ignore[arg-type]
                won, now = await a.compare_and_swap(seen_a, drop)  # type: ignore[arg-type]
                assert not won and now.record == Record(vm, 2, B)
                assert "not the active" in getattr(drop_standby(now.record, A), "reason", "")

    asyncio.run(main())


def test_lease_expiry_removes_the_alive_key_within_ttl_and_a_claim_follows(lab):
    async def main() -> None:
        vm = fresh_vm()
        async with (
            arbiter(lab, "agenta", vm, A) as a,
            arbiter(lab, "agentb", vm, B) as b,
        ):
            assert isinstance(await a.transition(claim_for(A, vm)), Won)
            assert a.lease_valid()
            refused = await b.transition(claim_for(B, vm))
            assert isinstance(refused, Refused) and "lease is alive" in refused.reason
            await a.stop_renewing()  # a freezes: no keepalive from now on
            age = a.status().last_renewal_age
            assert age is not None
            renewal_sent = time.monotonic() - age
            local_end = None

            async def gone() -> bool:
                nonlocal local_end
                if local_end is None and not a.lease_valid():
                    local_end = time.monotonic()
                return A not in (await b.read()).alive

            await until(gone, TTL + 3, "the alive key of a lapsed lease disappears", step=0.02)
            expired_after = time.monotonic() - renewal_sent
            print(f"alive key gone {expired_after:.2f} s after the last keepalive was sent")
            assert TTL - 0.05 <= expired_after <= TTL + 1.0
            # a's own clock said "not valid" before etcd dropped the key (the margin)
            assert local_end is not None
            assert local_end - renewal_sent <= TTL - a.settings.safety_margin + 0.05
            # the record is not lease-bound: the term survives, and b can claim over a
            state = await b.read()
            assert state.record == Record(vm, 1, A)
            assert isinstance(await b.transition(claim_for(B, vm)), Won)
            assert (await b.read()).record == Record(vm, 2, B)
            # a comes back and rejoins as b's standby: its old lease is gone in etcd, so
            # the transaction's put fails once and is retried with a new lease
            stale_lease = a.lease_id
            rejoined = await a.transition(lambda s: publish_standby(s.record, A, "tcp:a:1"))
            assert isinstance(rejoined, Won), rejoined
            assert a.lease_id not in (None, stale_lease)
            assert rejoined.state.record == Record(vm, 2, B, standby=Standby(A, "tcp:a:1"))
            assert rejoined.state.alive == {A, B}

    asyncio.run(main())


def test_a_won_transaction_with_a_lease_that_lapsed_by_our_clock_renews_it(lab):
    """After an outage the lease may still live in etcd (an election renews every lease)
    while by the agent's clock it ran out; the transaction that binds it (a takeover)
    must leave it valid, or the new active would fence itself at its next step."""

    async def main() -> None:
        vm = fresh_vm()
        ahead = 0.0
        settings = ArbiterSettings(lab.local_endpoints("agenta"), lease_ttl=TTL)

        def clock() -> float:  # a's clock, made to run ahead below
            return time.monotonic() + ahead

        async with (
            Arbiter(settings, vm, A, clock=clock) as a,
            arbiter(lab, "agentb", vm, B) as b,
        ):
            assert isinstance(await a.transition(claim_for(A, vm)), Won)
            assert isinstance(
                await b.transition(lambda s: publish_standby(s.record, B, "tcp:b:1")), Won
            )
            await a.stop_renewing()
            lease = a.lease_id
            ahead = float(TTL)  # by a's clock the lease ran out; etcd still holds it
            assert not a.lease_valid()
            standby = Standby(B, "tcp:b:1")
            won = await a.transition(lambda s: mark_protected(s.record, A, standby))
            assert isinstance(won, Won), won
            assert a.lease_id == lease and a.lease_valid()

    asyncio.run(main())


def test_keepalive_keeps_the_alive_key_and_the_lease_valid(lab):
    async def main() -> None:
        vm = fresh_vm()
        async with arbiter(lab, "agenta", vm, A) as a, arbiter(lab, "observer", vm, B) as o:
            assert isinstance(await a.transition(claim_for(A, vm)), Won)
            start = time.monotonic()
            reads = 0
            worst_age = 0.0
            while time.monotonic() - start < 3 * TTL:
                assert A in (await o.read()).alive, "the alive key vanished under keepalive"
                assert a.lease_valid()
                status = a.status()
                assert status.reachable and status.last_renewal_age is not None
                worst_age = max(worst_age, status.last_renewal_age)
                reads += 1
                await asyncio.sleep(0.1)
            print(f"{reads} reads over {3 * TTL} s; oldest renewal seen {worst_age:.2f} s")
            assert worst_age < a.settings.keepalive_interval + a.settings.request_timeout

    asyncio.run(main())


@pytest.mark.parametrize("which", ["leader", "follower"])
def test_a_three_member_cluster_with_one_member_killed_accepts_transactions(lab, which):
    async def main() -> None:
        vm = fresh_vm()
        async with arbiter(lab, "agenta", vm, A) as a, arbiter(lab, "agentb", vm, B) as b:
            assert isinstance(await a.transition(claim_for(A, vm)), Won)
            leader = lab.leader()
            victim = (
                leader if which == "leader" else next(m for m in lab.members if m is not leader)
            )
            killed_at = time.monotonic()
            lab.kill(victim.name)
            try:
                # publish/drop back and forth: every one is a compare-and-swap.  A call
                # that ran out of time has an unknown outcome (it may have committed):
                # the retry then finds the record already changed and refuses, which
                # counts when the record is what the change wanted.
                unprotected = Record(vm, 1, A)
                published = Record(vm, 1, A, standby=Standby(B, "tcp:b:1"))
                done = 0
                first_ok = None
                unknown = 0
                deadline = killed_at + 15
                while done < 6:
                    if done % 2 == 0:
                        decide = lambda s: publish_standby(s.record, B, "tcp:b:1")  # noqa: E731
                        who, target = b, published
                    else:
                        decide = lambda s: drop_standby(s.record, A)  # noqa: E731
                        who, target = a, unprotected
                    try:
                        outcome = await who.transition(decide)
                    except ArbiterError:
                        assert time.monotonic() < deadline, "no transaction within 15 s"
                        unknown += 1
                        continue
                    assert outcome.state.record == target, outcome
                    first_ok = first_ok or time.monotonic() - killed_at
                    done += 1
                print(f"{unknown} calls with an unknown outcome")
                print(f"killed the {which}: first transaction {first_ok:.2f} s after the kill")
                # etcd extends leases on a leader change: a's lease and key survive; by
                # a's own clock it may have lapsed during a long election (TTL 2 s,
                # margin 0.5 s), and is valid again once renewals go through.  A read may
                # still fail while the channels settle (a failed renewal resets the channel
                # and cancels the calls on it): read again, as the wiring does.
                states = []

                async def read_once() -> bool:
                    with contextlib.suppress(ArbiterError):
                        states.append(await a.read())
                    return bool(states)

                await until(read_once, 5, "a read of the record after the kill")
                state = states[0]
                assert state.record == Record(vm, 1, A)
                assert A in state.alive and B in state.alive
                await until(holds(a.lease_valid), 5, "a's lease valid again")
            finally:
                lab.restart(victim.name)
            lab.wait_healthy()

    asyncio.run(main())


def test_the_arbiter_reports_unreachable_when_cut_and_rebinds_its_lease_after(lab):
    async def main() -> None:
        vm = fresh_vm()
        async with arbiter(lab, "agenta", vm, A) as a, arbiter(lab, "observer", vm, B) as o:
            assert isinstance(await a.transition(claim_for(A, vm)), Won)
            old_lease = a.lease_id
            assert a.status().reachable
            lab.cut("agenta")
            try:
                assert not await a.probe()
                status = a.status()
                assert not status.reachable and status.last_error
                assert "UNREACHABLE" in status.lines()[0]
                waited = await until(
                    holds(lambda: not a.lease_valid()),
                    TTL,
                    "the lease is no longer valid by the agent's clock",
                )
                print(f"lease invalid by own clock {waited:.2f} s after the cut")
                await until(
                    lambda: _gone(o, A),
                    TTL + 2,
                    "etcd drops the cut agent's alive key",
                )
            finally:
                lab.heal("agenta")
            await until(a.probe, 10, "reachable again after the link is healed")
            # the keepalive loop finds the lease gone and grants a new one, which backs
            # nothing: still not valid until a transaction binds it
            await until(
                holds(lambda: a.lease_id not in (None, old_lease)),
                5,
                "a new lease is granted",
            )
            assert not a.lease_valid()
            assert (a.lease_remaining() or 0) > 0
            assert isinstance(await a.transition(lambda s: reattach(s.record, A)), Won)
            assert a.lease_valid()
            assert A in (await o.read()).alive

    asyncio.run(main())


async def _gone(observer: Arbiter, agent: str) -> bool:
    return agent not in (await observer.read()).alive


def test_the_arbiter_reports_unreachable_when_the_cluster_loses_its_quorum(lab):
    async def main() -> None:
        vm = fresh_vm()
        async with arbiter(lab, "agenta", vm, A) as a:
            assert isinstance(await a.transition(claim_for(A, vm)), Won)
            killed = [lab.kill(m.name) for m in lab.members[:2]]
            try:
                assert lab.members[2].running
                await until(
                    lambda: _unreachable(a),
                    5,
                    "the arbiter says unreachable without a quorum",
                )
                assert not a.status().reachable
                with pytest.raises(ArbiterError):
                    await a.transition(lambda s: drop_standby(s.record, A))
            finally:
                for member in killed:
                    lab.restart(member.name, wait=False)
                lab.wait_healthy()
            await until(a.probe, 10, "reachable again with the quorum back")
            assert (await a.read()).record == Record(vm, 1, A)

    asyncio.run(main())


async def _unreachable(a: Arbiter) -> bool:
    return not await a.probe()


def test_a_one_member_etcd_on_an_existing_topology_for_the_demo():
    """The demo's shape: one member joined to a testbed Topology's LAN (kt- namespaces),
    an arbiter from an agent namespace on that LAN; the member stops with the lab, the
    namespaces go with the topology."""
    with Topology() as topology:
        topology.add_host("primary", "10.232.0.2/24")
        with EtcdLab(1, subnet="10.232.0", topology=topology) as single:
            assert [m.name for m in single.members] == ["etcd0"]
            assert single.uri == "etcd://10.232.0.10:2379"
            agent = single.add_agent("agent")

            async def main() -> None:
                vm = fresh_vm()
                async with arbiter(single, "agent", vm, A) as a:
                    assert isinstance(await a.transition(claim_for(A, vm)), Won)
                    assert a.status().term == 1

            asyncio.run(main())
            member = single.members[0]
            namespace = agent.name
        assert not member.running
        names = os.listdir("/run/netns")
        assert namespace in names  # the topology is not the lab's: it stays until its exit
    assert namespace not in os.listdir("/run/netns")
