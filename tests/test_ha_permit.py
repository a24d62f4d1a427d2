"""The release permit of an agent under --ha (docs/ha.md rule 2), without etcd or QEMU:
HaSupervisor.may_release against records and a fake protection's COMMIT send time."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from kemari.config import config_from_mapping
from kemari.ha.record import Record, Standby
from kemari.roles.active import ActiveRole
from kemari.roles.ha import HaDiskPermit, HaSupervisor

ME, PEER, OTHER = "a:1.x", "b:2.y", "c:3.z"


def supervisor(lease_valid: bool = True) -> HaSupervisor:
    config = config_from_mapping(
        {"name": "web", "ha": "etcd://10.0.0.1", "incoming": "kemari:tcp:10.0.0.2:4444"}
    )
    ha = HaSupervisor(config, agent=ME)
    ha.arbiter.lease_valid = lambda: lease_valid  # type: ignore[method-assign]
    return ha


def record(active: str = ME, protected_by: str | None = None) -> Record:
    standby = None if protected_by is None else Standby(protected_by, "kemari:tcp:h:1")
    return Record(vm="web", term=3, active=active, protected_by=protected_by, standby=standby)


def protecting(ha: HaSupervisor, sent_ago: float | None) -> None:
    """This agent protects to PEER; its last acknowledged COMMIT was sent ``sent_ago``
    seconds ago."""
    sent = None if sent_ago is None else time.monotonic() - sent_ago
    sink = SimpleNamespace(acked_commit_sent_at=sent)
    protection = SimpleNamespace(source=SimpleNamespace(sink=sink))
    ha._active = cast(ActiveRole, SimpleNamespace(protection=protection))
    ha._protecting = PEER


@pytest.mark.parametrize("committed", [True, False])
def test_b_unprotected_active_with_a_valid_lease_releases(committed: bool) -> None:
    ha = supervisor(lease_valid=True)
    ha.record = record()
    assert ha.may_release(committed)
    invalid = supervisor(lease_valid=False)
    invalid.record = record()
    assert not invalid.may_release(committed)


def test_a_protected_needs_a_commit_answered_within_the_detection_timeout() -> None:
    ha = supervisor(lease_valid=False)  # (a) does not need the lease (network outputs)
    ha.record = record(protected_by=PEER)
    protecting(ha, sent_ago=0.1)
    assert ha.may_release(committed=True)
    protecting(ha, sent_ago=ha.detect_s + 0.05)  # answered late: the standby may take over
    assert not ha.may_release(committed=True)
    protecting(ha, sent_ago=None)
    assert not ha.may_release(committed=True)


def test_a_protected_record_never_permits_unacknowledged_outputs() -> None:
    ha = supervisor(lease_valid=True)
    ha.record = record(protected_by=PEER)
    protecting(ha, sent_ago=0.0)
    assert not ha.may_release(committed=False)  # standby lost: hold until drop_standby


def test_a_counts_only_the_standby_the_record_names() -> None:
    ha = supervisor()
    ha.record = record(protected_by=OTHER)  # we protect to PEER, the record says OTHER
    protecting(ha, sent_ago=0.0)
    assert not ha.may_release(committed=True)


@pytest.mark.parametrize("committed", [True, False])
def test_another_active_or_a_fence_or_no_record_permits_nothing(committed: bool) -> None:
    ha = supervisor()
    assert not ha.may_release(committed)  # nothing read yet
    ha.record = record(active=OTHER)
    assert not ha.may_release(committed)
    ha.record = record()
    ha.fenced = True
    assert not ha.may_release(committed)


def test_shared_disk_writes_need_the_lease_in_case_a_too() -> None:
    ha = supervisor(lease_valid=False)
    ha.record = record(protected_by=PEER)
    protecting(ha, sent_ago=0.0)
    disks: Any = HaDiskPermit(ha)
    assert ha.may_release(committed=True) and not disks.may_release(True)
    ha.arbiter.lease_valid = lambda: True  # type: ignore[method-assign]
    assert disks.may_release(True)
