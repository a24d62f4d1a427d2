"""A fenced agent's rejoin decision (docs/ha.md rule 5, "A partition heals"), without
etcd: ``another_active`` on records, and the wait over a scripted sequence of reads."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from hypothesis import given
from hypothesis import strategies as st

from kemari.config import config_from_mapping
from kemari.ha import ArbiterUnreachable
from kemari.ha.arbiter import RecordState
from kemari.ha.record import Record, Standby
from kemari.roles.ha import HaSupervisor, another_active

ME, OTHER = "a:1.x", "b:2.y"
agents = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}", fullmatch=True)


def record(active: str, term: int = 4, standby: str | None = None) -> Record:
    published = None if standby is None else Standby(standby, "kemari:tcp:h:1")
    return Record(vm="web", term=term, active=active, protected_by=None, standby=published)


@given(me=agents, active=agents, term=st.integers(1, 2**63 - 1))
def test_rejoins_exactly_when_the_record_names_another_active(
    me: str, active: str, term: int
) -> None:
    seen = another_active(record(active, term), me)
    if active == me:
        assert seen is None  # still named: never rejoin (and never resume) on its own
    else:
        assert seen == f"the record names {active} active (term {term})"


def test_no_record_is_no_reason_to_rejoin() -> None:
    assert another_active(None, ME) is None


def test_a_standby_published_in_the_record_does_not_matter() -> None:
    assert another_active(record(ME, standby=OTHER), ME) is None
    assert another_active(record(OTHER, standby=ME), ME) is not None


def fenced_supervisor(reads: Iterator[RecordState | Exception]) -> HaSupervisor:
    config = config_from_mapping(
        {"name": "web", "ha": "etcd://10.0.0.1", "incoming": "kemari:tcp:10.0.0.2:4444"}
    )
    ha = HaSupervisor(config, agent=ME)

    async def read() -> RecordState:
        answer = next(reads)
        if isinstance(answer, Exception):
            raise answer
        return answer

    ha.arbiter.read = read  # type: ignore[method-assign]
    return ha


def test_waits_through_an_unreachable_etcd_and_its_own_record_then_rejoins() -> None:
    reads = iter(
        [
            ArbiterUnreachable("etcd: deadline exceeded"),
            ArbiterUnreachable("etcd: deadline exceeded"),
            RecordState(record(ME), 7, frozenset()),  # the record still names this agent
            RecordState(record(OTHER, term=5), 9, frozenset({OTHER})),
        ]
    )
    ha = fenced_supervisor(reads)
    seen = asyncio.run(ha.wait_for_another_active(asyncio.Event()))
    assert seen == f"the record names {OTHER} active (term 5)"
    assert ha.record is not None and ha.record.active == OTHER
    assert "waiting for etcd" in ha.last_change  # said once while unreachable


def test_a_stop_ends_the_wait_without_rejoining() -> None:
    stop = asyncio.Event()

    def reads() -> Iterator[RecordState | Exception]:
        for _ in range(3):  # the record keeps naming this agent
            yield RecordState(record(ME), 7, frozenset())
        stop.set()  # then the agent is told to stop, before the next poll
        yield RecordState(record(ME), 7, frozenset())
        raise AssertionError("read again after the stop")

    ha = fenced_supervisor(reads())
    assert asyncio.run(ha.wait_for_another_active(stop)) is None
