"""The HA record: its encoding, its validation and its pure transitions (no etcd)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kemari.errors import KemariError
from kemari.ha import ArbiterError
from kemari.ha.arbiter import ArbiterSettings, parse_arbiter_uri
from kemari.ha.record import (
    MAX_RECORD_BYTES,
    Record,
    Refusal,
    Standby,
    Step,
    alive_key,
    claim,
    decode_record,
    drop_standby,
    encode_record,
    mark_protected,
    publish_standby,
    reattach,
    record_key,
    take_over,
)

VM = "web"
A, S, C = "host-a:1", "host-b:7", "host-c:3"
S_AT = Standby(S, "kemari:tcp:10.0.0.2:4444")


def protected(term: int = 3) -> Record:
    return Record(VM, term, A, protected_by=S, standby=S_AT)


def document(record: Record) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(encode_record(record))
    return loaded


# --- encoding ---------------------------------------------------------------------


agents = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}", fullmatch=True)


@given(
    term=st.integers(1, 2**63 - 1),
    active=agents,
    standby=st.none() | agents,
    is_protected=st.booleans(),
    address=st.from_regex(r"[\x21-\x7e]{1,40}", fullmatch=True),
)
def test_every_valid_record_round_trips(term, active, standby, is_protected, address):
    if standby == active:
        standby = None
    published = None if standby is None else Standby(standby, address)
    record = Record(
        VM,
        term,
        active,
        protected_by=standby if is_protected and standby is not None else None,
        standby=published,
    )
    data = encode_record(record)
    assert len(data) <= MAX_RECORD_BYTES
    assert decode_record(data, VM) == record


def test_encoding_is_versioned_compact_json():
    data = encode_record(protected())
    assert json.loads(data) == {
        "format": "kemari-ha-record",
        "version": 1,
        "vm": VM,
        "term": 3,
        "active": A,
        "protected_by": S,
        "standby": {"agent": S, "address": S_AT.address},
    }
    assert b" " not in data


def bad(mutate):
    doc = document(protected())
    mutate(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"hello", "not JSON"),
        (b"[1, 2]", "no format"),
        (b'{"leader": "x"}', "no format"),
        (bad(lambda d: d.update(version=2)), "record version 2"),
        (bad(lambda d: d.update(version=True)), "record version True"),
        (bad(lambda d: d.update(vm="db")), "names VM 'db'"),
        (bad(lambda d: d.update(term=0)), "invalid term 0"),
        (bad(lambda d: d.update(term=True)), "invalid term True"),
        (bad(lambda d: d.update(term="3")), "invalid term '3'"),
        (bad(lambda d: d.update(term=2**63)), "invalid term"),
        (bad(lambda d: d.update(active="a/b")), "invalid agent identity"),
        (bad(lambda d: d.update(active=5)), "active must be a string"),
        (bad(lambda d: d.update(extra=1)), "unknown ['extra']"),
        (bad(lambda d: d.pop("term")), "missing ['term']"),
        (bad(lambda d: d.update(standby=None)), "has not published"),
        (bad(lambda d: d.update(protected_by=C)), "has not published"),
        (bad(lambda d: d.update(standby={"agent": S})), "standby must be null or"),
        (bad(lambda d: d.update(standby={"agent": S, "address": "a b"})), "invalid standby addr"),
        (bad(lambda d: d.update(standby={"agent": A, "address": "x"}, protected_by=None)), "both"),
        (b"{" + b" " * MAX_RECORD_BYTES + b"}", "more than 2048"),
    ],
)
def test_bad_foreign_or_oversized_records_are_one_clear_error(data, message):
    with pytest.raises(ArbiterError) as info:
        decode_record(data, VM)
    assert isinstance(info.value, KemariError)
    text = str(info.value)
    assert text.startswith(f"HA record of {VM}: ")
    assert message in text
    assert "\n" not in text


def test_keys_and_names_are_checked():
    assert record_key(VM) == b"kemari/ha/web/record"
    assert alive_key(VM, A) == b"kemari/ha/web/alive/host-a:1"
    for vm in ("", "Web", "-x", "a" * 64, "a/b"):
        with pytest.raises(ArbiterError, match="invalid VM name"):
            record_key(vm)
    for agent in ("", "a/b", "a b", "x" * 129, ".x"):
        with pytest.raises(ArbiterError, match="invalid agent identity"):
            alive_key(VM, agent)


# --- transitions ------------------------------------------------------------------


def test_claim_with_no_record_starts_term_1():
    assert claim(None, VM, A, active_alive=False) == Step(Record(VM, 1, A))


def test_claim_over_a_dead_unprotected_active_takes_term_plus_1_and_requires_it_gone():
    current = Record(VM, 4, A, standby=S_AT)
    step = claim(current, VM, C, active_alive=False)
    assert step == Step(Record(VM, 5, C), requires_gone=A)


@pytest.mark.parametrize(
    ("current", "me", "alive", "reason"),
    [
        (Record(VM, 2, A), C, True, "its lease is alive"),
        (protected(), C, False, "only that standby may take over"),
        (protected(), S, False, "only that standby may take over"),
        (Record(VM, 2, A), A, False, "already the active"),
    ],
)
def test_claim_refusals(current, me, alive, reason):
    decision = claim(current, VM, me, active_alive=alive)
    assert isinstance(decision, Refusal)
    assert reason in decision.reason


def test_standby_publishes_then_active_marks_protected():
    current = Record(VM, 2, A)
    step = publish_standby(current, S, S_AT.address)
    assert step == Step(Record(VM, 2, A, standby=S_AT))
    assert isinstance(step, Step)
    done = mark_protected(step.record, A, S_AT)
    assert done == Step(protected(2))
    # the term does not move for either
    assert isinstance(done, Step)
    assert done.record.term == 2


@pytest.mark.parametrize(
    ("decision", "reason"),
    [
        (publish_standby(None, S, "x"), "no active"),
        (publish_standby(Record(VM, 1, A), A, "x"), "not a standby"),
        (publish_standby(protected(), C, "x"), "already protected by"),
        (publish_standby(Record(VM, 1, A, standby=S_AT), C, "x"), "already published"),
        (mark_protected(Record(VM, 1, A, standby=S_AT), S, S_AT), "is not the active"),
        (mark_protected(Record(VM, 1, A), A, S_AT), "is not the published standby"),
        (mark_protected(Record(VM, 1, A, standby=S_AT), A, Standby(S, "other")), "not the pub"),
        (mark_protected(protected(), A, S_AT), "already protected"),
        (drop_standby(None, A), "not the active"),
        (drop_standby(protected(), S), "not the active"),
        (drop_standby(Record(VM, 1, A), A), "no standby"),
        (take_over(None, S), "no record"),
        (take_over(protected(), C), "protected by host-b:7, not by host-c:3"),
        (take_over(Record(VM, 1, A, standby=S_AT), S), "unprotected, not by"),
        (reattach(protected(), C), "neither"),
    ],
)
def test_transition_refusals(decision, reason):
    assert isinstance(decision, Refusal)
    assert reason in decision.reason


def test_drop_standby_and_take_over():
    assert drop_standby(protected(3), A) == Step(Record(VM, 3, A))
    assert drop_standby(Record(VM, 3, A, standby=S_AT), A) == Step(Record(VM, 3, A))
    assert take_over(protected(3), S) == Step(Record(VM, 4, S))
    assert reattach(protected(3), S) == Step(protected(3))


def test_drop_and_take_over_from_the_same_record_exclude_each_other():
    """Whichever commits first, the other no longer applies to the record it left."""
    dropped = drop_standby(protected(), A)
    taken = take_over(protected(), S)
    assert isinstance(dropped, Step)
    assert isinstance(taken, Step)
    assert isinstance(take_over(dropped.record, S), Refusal)
    assert isinstance(drop_standby(taken.record, A), Refusal)


def test_record_invariants_are_enforced_on_construction():
    with pytest.raises(ArbiterError, match="has not published"):
        Record(VM, 1, A, protected_by=S)
    with pytest.raises(ArbiterError, match="both active and standby"):
        Record(VM, 1, A, standby=Standby(A, "x"))


def test_arbiter_uri_and_settings():
    assert parse_arbiter_uri("etcd://10.0.0.5:2379,10.0.0.6,10.0.0.7:2000") == (
        "10.0.0.5:2379",
        "10.0.0.6:2379",
        "10.0.0.7:2000",
    )
    assert parse_arbiter_uri("etcd://etcd.example") == ("etcd.example:2379",)
    for uri in ("http://x", "etcd://", "etcd://a:b", "etcd://x:70000", "etcd://h1,h2"):
        with pytest.raises(ArbiterError):
            parse_arbiter_uri(uri)
    with pytest.raises(ArbiterError, match="margin"):
        ArbiterSettings(("a:1",), lease_ttl=2, safety_margin=2.0)
    with pytest.raises(ArbiterError, match="keepalive"):
        ArbiterSettings(("a:1",), lease_ttl=2, safety_margin=0.5, keepalive_interval=1.6)
