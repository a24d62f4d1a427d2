"""Automatic failover in ``shared`` storage mode (docs/ha.md rule 2, rule 4, invariant 5).

The session's lab (``ha_lab``, tests/support/ha_pair.py), this module's VM
``hashared``, both agents naming the same image.  The tests continue from each other:

1. (issue scenario 1, shared) kill -9 of the active's QEMU and agent → the standby takes
   over by itself only once the old active's alive key is gone (lease TTL 5 s by
   default); the client's single connection carries on.
2. (scenario 5, shared) the killed host rejoins; every etcd member is cut off with both
   hosts healthy → once the active's lease has lapsed by its own clock, no guest write
   reaches the shared image (its bytes do not change, and no record acknowledged during
   the cut is in it) while the standby keeps committing them; etcd back → the lease is
   re-bound and the held writes land, every acknowledged record with them.
3. (scenario 3, shared) the link between the hosts cut, etcd reachable → the standby
   takes over; the old active fences itself, closes the image, revokes its lease and
   rejoins as the standby by itself, holding the image no more; protected again.
4. ``quit`` of the protected active: the standby takes over without waiting out a
   lease TTL (the quitting agent revokes its lease once its last write landed).
At the end every acknowledged record is stored, in order.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.ha_pair import (
    HOST_IPS,
    HaLab,
    HaPair,
    kill_agent_and_qemu,
    protected_pair,
    quit_and_hand_over,
    status,
)

from kemari.config import StorageMode
from kemari.testbed.wait import wait_for

pytestmark = [
    pytest.mark.guest,
    pytest.mark.root,
    pytest.mark.usefixtures("image_and_patched_qemu"),
]


@pytest.fixture(scope="module")
def pair(ha_lab: HaLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HaPair]:
    workdir = tmp_path_factory.mktemp("ha-shared")
    ha_pair = HaPair(ha_lab, workdir, StorageMode.SHARED, "hashared")
    try:
        yield ha_pair
    finally:
        ha_pair.close()


def test_kill_of_the_active_takeover_waits_for_its_lease(pair: HaPair) -> None:
    a, b = pair.boot()
    pair.wait_acked(5, "records acknowledged while protected")
    acked_at_kill = pair.acked()
    killed_at = time.monotonic()
    kill_agent_and_qemu(a)
    wait_for(lambda: status(b)["state"] == "active", "b active by itself", 60)
    active_at = time.monotonic()
    wait_for(lambda: pair.acked() > acked_at_kill, "the client's next ack", 60)
    resumed_at = time.monotonic()
    after = status(b)
    print(
        f"shared takeover: kill → b active {(active_at - killed_at) * 1000:.0f} ms, → client's "
        f"next ack {resumed_at - killed_at:.2f} s; {after['ha']['last_change']}"
    )
    assert after["ha"]["term"] == 2
    # The old lease (TTL 5 s, renewed every 0.5 s) had to end first: at least TTL - 0.5 s.
    assert active_at - killed_at > 4.0
    pair.check_acked_stored()


def _digest(image: Path) -> str:
    return hashlib.sha256(image.read_bytes()).hexdigest()


def _in_image(image: Path, record: str) -> bool:
    """The record's line (``<seq> <crc> <payload>``, docs/guest.md) is in the image."""
    return f" {record}\n".encode() in image.read_bytes()


def test_etcd_unreachable_disk_writes_hold_until_it_returns(pair: HaPair) -> None:
    active = pair.agents["b"]
    standby = pair.start_agent("a")  # the same command again
    standby.wait_monitor()
    wait_for(lambda: protected_pair(active, standby), "b protected by a", 240)
    image = pair.images["a"]
    members = [member.name for member in pair.etcd.members]
    for name in members:
        pair.etcd.cut(name)
    try:
        wait_for(lambda: not status(active)["ha"]["reachable"], "a sees etcd unreachable", 30)
        wait_for(lambda: not status(active)["ha"]["lease_valid"], "a's lease lapsed", 30)
        # Writes released before the lapse are done once a few more checkpoints committed.
        pair.wait_acked(3, "records acknowledged after the lapse")
        held_from = pair.acked()
        before = _digest(image)
        pair.wait_acked(10, "records acknowledged (committed by the standby) without etcd")
        during = pair.acked_log.read_text().split()[held_from:]
        assert _digest(image) == before, "a write reached the shared image without a lease"
        assert not any(_in_image(image, record) for record in during)
        assert status(active)["state"] == "active" and protected_pair(active, standby)
        assert status(standby)["state"] == "standby"
        print(f"etcd unreachable: {len(during)} records acknowledged, the image unchanged")
    finally:
        for name in members:
            pair.etcd.heal(name)
    wait_for(lambda: status(active)["ha"]["lease_valid"], "the lease re-bound", 60)
    wait_for(lambda: _in_image(image, during[-1]), "the held writes in the image", 60)
    assert all(_in_image(image, record) for record in during)
    assert protected_pair(active, standby)
    pair.check_acked_stored()


def test_link_cut_the_old_active_fences_and_rejoins_without_holding_the_image(
    pair: HaPair,
) -> None:
    """The link between the hosts cut (blackhole routes), etcd reachable: the standby (a)
    wins ``take_over``; the active (b) reads the new record, fences itself, closes the
    image and only then revokes its old lease, which is what a's wait for that lease
    ends on before it opens the image; b rejoins as the standby under a new identity,
    holding the image no more, with no command typed; once the link is back the new
    active protects to it; every acknowledged record is stored."""
    old, standby = pair.agents["b"], pair.agents["a"]
    assert protected_pair(old, standby)
    identity = status(old)["ha"]["agent"]
    routes = [("a", HOST_IPS["b"]), ("b", HOST_IPS["a"])]
    cut_at = time.monotonic()
    for host, peer in routes:
        pair.hosts[host].run(["ip", "route", "add", "blackhole", f"{peer}/32"])
    try:
        wait_for(lambda: status(standby)["state"] == "active", "the standby took over", 60)
        active_s = time.monotonic() - cut_at
        wait_for(
            lambda: str(status(old)["state_reason"]).startswith("rejoined as standby"),
            "the old active fenced itself and rejoined",
            60,
        )
        rejoined = status(old)
        pair.wait_acked(3, "records acknowledged by the new active")
    finally:
        for host, peer in routes:
            pair.hosts[host].run(["ip", "route", "del", "blackhole", f"{peer}/32"])
    assert rejoined["state"] == "standby" and "fenced: " in rejoined["state_reason"]
    assert rejoined["ha"]["agent"] != identity and rejoined["disks"] == []
    held = _open_files(old.process.pid)
    assert pair.images["a"].resolve() not in held, "the rejoined standby holds the image"
    wait_for(lambda: protected_pair(standby, old), "protected again", 240)
    print(
        f"shared link cut → standby active {active_s:.2f} s; old active: "
        f"{rejoined['state_reason']}; a: {status(standby)['ha']['last_change']}"
    )
    pair.wait_acked(3, "records acknowledged after the rejoin")
    pair.check_acked_stored()


def _open_files(pid: int) -> set[Path]:
    """The files process ``pid`` holds open."""
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            held.add(Path(os.readlink(fd)))
    return held


def test_quit_of_the_protected_active_hands_over_without_waiting_a_lease(pair: HaPair) -> None:
    """``quit`` of the protected active (a): it stops its QEMU, closes its disks and only
    then revokes its lease, so the standby, which took over as soon as the replication
    connection ended, starts the guest once the last write has landed, not a TTL later."""
    handed = quit_and_hand_over(pair, "a", "b")
    print(
        f"shared quit → b active {handed.active_ms:.0f} ms, → client's next ack "
        f"{handed.ack_s:.2f} s; {handed.last_change}"
    )
    assert handed.exit_status == 0
    assert "took over" in handed.last_change
    # Revoked, not lapsed: a lapse would take at least TTL - margin (4.5 s by default).
    assert handed.active_ms < 4500
    pair.check_acked_stored()


def test_records_acknowledged_are_stored_in_order(pair: HaPair) -> None:
    print(f"{pair.finish_client()} records acknowledged, all stored in order")
