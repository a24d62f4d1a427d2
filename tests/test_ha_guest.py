"""Automatic failover with real guests, a real three-member etcd and real kills (issue 9).

The session's lab (``ha_lab``, tests/support/ha_pair.py): two host namespaces ``a``
and ``b``, a client namespace and three etcd members on one LAN; this module's VM is
``hapair``.  Both agents run the SAME command: ``kemari run ... --ha etcd://... --incoming
kemari:tcp:<own address>``; the record decides who boots the guest and who is the
standby; no ``migrate`` or ``failover`` is ever typed.  A client stores records back
to back on ONE TCP connection for the whole module and logs every acknowledged one.

The tests run in order and continue from each other's end state:

1. (issue scenario 1) kill -9 of the active's QEMU and agent → the standby takes over
   by itself; the client's connection carries on; the split of the takeover time is
   printed.
2. (scenario 6) the killed host's agent is started again with the same command → it
   joins as the standby and the pair is protected again (replicated storage: a fresh
   disk copy), with no command typed.
3. (scenario 8) one etcd member of three killed during protection → nothing changes.
4. (scenario 2) SIGSTOP of the active agent beyond the detection timeout → takeover;
   after SIGCONT the old active fences itself; captures show nothing it sent after; it
   then rejoins as the standby by itself and the pair is protected again.
5. (scenario 5) every etcd member cut off: the protected pair goes on, status says
   unreachable; the active killed → no takeover while etcd is unreachable.
6. (scenario 3) the link between the hosts cut, etcd reachable: the standby takes over,
   the active fences itself, nothing leaves its host after the takeover; once the link
   is back it is the standby (it rejoined by itself) and the pair is protected again.
7. (scenario 4) the protected active cut from etcd only: it goes on, past its lease.
   Then cut from everything: the standby takes over; once the link is back the old
   active fences itself, rejoins as the standby by itself, protected again.
Tests 5 and 7 start from the pair that tests 2 and 3 re-protected with no command.
8. ``quit`` of the protected active: the standby takes over at once.
At the end the acknowledged records must be exactly the first stored ones, in order.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support.ha_pair import (
    HOST_IPS,
    PROTECT_TIMEOUT_S,
    TAKEOVER_TIMEOUT_S,
    HaLab,
    HaPair,
    protected_pair,
    quit_and_hand_over,
    status,
)
from support.pcap import capture, pcap_records
from support.soak import GUEST_MAC

from kemari.config import StorageMode
from kemari.testbed.topology import LAN_BRIDGE
from kemari.testbed.vm import AgentProcess
from kemari.testbed.wait import wait_for

# The guest's frames a host sent into its LAN port (-Q in: not the floods to it).
host_capture = functools.partial(capture, mac=GUEST_MAC, inbound_only=True)

pytestmark = [
    pytest.mark.guest,
    pytest.mark.root,
    pytest.mark.usefixtures("image_and_patched_qemu"),
]


@pytest.fixture(scope="module")
def pair(ha_lab: HaLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HaPair]:
    ha_pair = HaPair(ha_lab, tmp_path_factory.mktemp("ha"), StorageMode.REPLICATED, "hapair")
    try:
        yield ha_pair
    finally:
        ha_pair.close()


def test_1_kill_of_the_active_the_standby_takes_over_by_itself(pair: HaPair) -> None:
    a = pair.start_agent("a")
    a.wait_serial(r"workload records ready")
    a.wait_monitor()
    assert status(a)["ha"]["active"] == status(a)["ha"]["agent"]  # it claimed the record
    pair.start_client()
    b = pair.start_agent("b")
    b.wait_monitor()
    assert status(b)["state"] == "standby"
    started = time.monotonic()
    wait_for(lambda: protected_pair(a, b), "a protected by b in the record", PROTECT_TIMEOUT_S)
    print(f"protected with no command in {time.monotonic() - started:.1f} s")
    wait_for(lambda: pair.acked() > 5, "records acknowledged while protected", 60)

    acked_at_kill = pair.acked()
    qemu_pid = status(a)["qemu_pid"]
    killed_at = time.monotonic()
    os.kill(qemu_pid, signal.SIGKILL)
    os.kill(a.process.pid, signal.SIGKILL)
    a.process.wait(30)

    wait_for(lambda: status(b)["state"] == "active", "b active by itself", TAKEOVER_TIMEOUT_S)
    active_at = time.monotonic()
    wait_for(lambda: pair.acked() > acked_at_kill, "the client's next ack", TAKEOVER_TIMEOUT_S)
    resumed_at = time.monotonic()
    after = status(b)
    assert after["ha"]["active"] == after["ha"]["agent"]
    assert after["ha"]["term"] == 2
    assert "took over" in after["ha"]["last_change"]
    print(
        f"takeover: kill → b active {(active_at - killed_at) * 1000:.0f} ms "
        f"(QEMU from replica {after['failover']['total_ms']:.0f} ms), kill → client's next "
        f"ack {(resumed_at - killed_at):.2f} s; {after['ha']['last_change']}"
    )


def test_6_the_killed_host_restarts_with_the_same_command_and_is_protected_again(
    pair: HaPair,
) -> None:
    b = pair.agents["b"]
    assert status(b)["state"] == "active"
    a = pair.start_agent("a")  # the same command as at the start
    a.wait_monitor()
    wait_for(lambda: status(a)["state"] == "standby", "a joined as standby", 60)
    started = time.monotonic()
    wait_for(lambda: protected_pair(b, a), "b protected by a again", PROTECT_TIMEOUT_S)
    print(f"re-protected (fresh disk copy) with no command in {time.monotonic() - started:.1f} s")
    acked = pair.acked()
    wait_for(lambda: pair.acked() > acked + 3, "records acknowledged after rejoin", 60)


def test_8_one_etcd_member_of_three_killed_during_protection_changes_nothing(
    pair: HaPair,
) -> None:
    active, standby = pair.agents["b"], pair.agents["a"]
    assert protected_pair(active, standby)
    term = status(active)["ha"]["term"]
    victim = pair.etcd.leader()
    pair.etcd.kill(victim.name)
    try:
        acked = pair.acked()
        wait_for(lambda: pair.acked() > acked + 5, "records acknowledged, member down", 60)
        assert protected_pair(active, standby)
        assert status(active)["state"] == "active" and status(standby)["state"] == "standby"
        assert status(active)["ha"]["term"] == term
        assert status(active)["ha"]["withheld"] == 0 or status(active)["ha"]["fenced"] is False
    finally:
        pair.etcd.restart(victim.name)


def test_2_a_frozen_active_is_replaced_fences_itself_and_rejoins_as_standby(
    pair: HaPair,
) -> None:
    """SIGSTOP of the active agent beyond the detection timeout → takeover; after SIGCONT
    the old active fences itself, and nothing it sends reaches the network: every guest
    frame the client captures after the SIGCONT also left the new active's host.  Then,
    with no command typed, it rejoins as the new active's standby (a new identity), the
    pair is protected again, and every acknowledged record is stored."""
    old, new = pair.agents["b"], pair.agents["a"]
    assert protected_pair(old, new)
    fenced_identity = status(old)["ha"]["agent"]
    lan = pair.lab.lan
    workdir = pair.workdir
    with (
        capture(
            pair.client_ns, "eth0", workdir / "client.pcap", GUEST_MAC, inbound_only=True
        ) as client_pcap,
        host_capture(lan, "to-b", workdir / "old-host.pcap") as old_pcap,
        host_capture(lan, "to-a", workdir / "new-host.pcap") as new_pcap,
    ):
        stopped_at = time.monotonic()
        os.kill(old.process.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: status(new)["state"] == "active", "the standby took over", 60)
            active_after = time.monotonic() - stopped_at
            acked = pair.acked()
            wait_for(lambda: pair.acked() > acked, "the client's ack from the new active", 60)
        finally:
            cont_wall = time.time()
            os.kill(old.process.pid, signal.SIGCONT)
        rejoined = wait_for_rejoin(old, "the old active fenced itself and rejoined")
        fenced_at = time.monotonic()
        wait_for(lambda: protected_pair(new, old), "protected again", PROTECT_TIMEOUT_S)
        protected_after = time.monotonic() - fenced_at
        acked = pair.acked()
        wait_for(lambda: pair.acked() > acked + 3, "records acknowledged after the rejoin", 60)
        end_wall = time.time()  # the captures stop after this, the new host's first
    print(
        f"SIGSTOP → standby active in {active_after * 1000:.0f} ms; old active: "
        f"{rejoined['state_reason']}; protected again {protected_after:.1f} s after"
    )
    assert rejoined["qemu_pid"] is None and rejoined["ha"]["fenced"] is False
    assert rejoined["ha"]["agent"] != fenced_identity
    assert status(new)["ha"]["protected_by"] == rejoined["ha"]["agent"]
    print(f"{pair.check_acked_stored()} records acknowledged and stored after the rejoin")
    late_old = [frame for at, frame in pcap_records(old_pcap) if at >= cont_wall]
    assert late_old == [], f"{len(late_old)} frames left the fenced host after SIGCONT"
    new_frames = {frame for _, frame in pcap_records(new_pcap)}
    late_client = [frame for at, frame in pcap_records(client_pcap) if cont_wall <= at <= end_wall]
    assert late_client, "the client saw no guest frame after the SIGCONT"
    strangers = [frame for frame in late_client if frame not in new_frames]
    assert strangers == [], f"{len(strangers)} of {len(late_client)} not from the new host"


def test_5_etcd_unreachable_the_pair_goes_on_and_a_kill_leads_to_no_takeover(
    pair: HaPair,
) -> None:
    """Replicated storage, every etcd member cut off: the protected pair keeps serving
    (rule 2 a) and says etcd is unreachable; the active killed → the standby does NOT
    take over while etcd is unreachable, and says why; healed → it takes over."""
    active, standby = pair.agents["a"], pair.agents["b"]  # b rejoined by itself in test 2
    assert protected_pair(active, standby)
    members = [member.name for member in pair.etcd.members]
    for name in members:
        pair.etcd.cut(name)
    try:
        wait_for(
            lambda: (
                status(active)["ha"]["reachable"] is False
                and status(standby)["ha"]["reachable"] is False
            ),
            "both agents see etcd unreachable",
            30,
        )
        acked = pair.acked()
        wait_for(lambda: pair.acked() > acked + 5, "records acknowledged without etcd", 60)
        assert status(active)["state"] == "active" and protected_pair(active, standby)
        os.kill(status(active)["qemu_pid"], signal.SIGKILL)
        os.kill(active.process.pid, signal.SIGKILL)
        active.process.wait(30)
        wait_for(
            lambda: "cannot take over" in status(standby)["ha"]["last_change"],
            "the standby saying why it does not take over",
            30,
        )
        assert status(standby)["state"] == "standby"
        print(f"etcd unreachable, active killed: {status(standby)['ha']['last_change']}")
    finally:
        for name in members:
            pair.etcd.heal(name)
    wait_for(lambda: status(standby)["state"] == "active", "takeover once etcd is back", 60)
    acked = pair.acked()
    # The client's TCP has been backing off through the whole outage (tens of seconds):
    # its next retransmission may come up to Linux's 120 s maximum RTO after the last.
    wait_for(lambda: pair.acked() > acked, "the client's ack after the late takeover", 180)


def test_3_partition_between_active_and_standby_with_etcd_reachable(pair: HaPair) -> None:
    """The replication link cut (blackhole routes between the two hosts), both still
    reaching etcd and the client: the standby takes over (it protects the active in the
    record); the active, whose commits are no longer acknowledged, holds its outputs,
    loses drop_standby and fences itself; no guest frame leaves its host once the
    standby runs the guest.  It rejoins as the standby by itself (etcd names the new
    active); once the link is back the new active protects to it, no command typed."""
    active = pair.agents["b"]  # active since test 5
    standby = pair.start_agent("a")
    standby.wait_monitor()
    wait_for(lambda: protected_pair(active, standby), "b protected by a", PROTECT_TIMEOUT_S)
    lan = pair.lab.lan
    routes = [("a", HOST_IPS["b"]), ("b", HOST_IPS["a"])]
    with capture(
        lan, "to-b", pair.workdir / "partitioned-old.pcap", GUEST_MAC, inbound_only=True
    ) as old_pcap:
        for host, peer in routes:
            pair.hosts[host].run(["ip", "route", "add", "blackhole", f"{peer}/32"])
        try:
            wait_for(lambda: status(standby)["state"] == "active", "the standby took over", 60)
            active_wall = time.time()  # the new guest runs from here (or earlier)
            wait_for(lambda: "fenced: " in reason(active), "the old active fenced", 60)
            fenced = status(active)
            acked = pair.acked()
            wait_for(lambda: pair.acked() > acked + 3, "records from the new active", 60)
        finally:
            for host, peer in routes:
                pair.hosts[host].run(["ip", "route", "del", "blackhole", f"{peer}/32"])
        healed_at = time.monotonic()
    print(f"partition: old active {fenced['state_reason']}")
    late = [frame for at, frame in pcap_records(old_pcap) if at >= active_wall]
    assert late == [], f"{len(late)} guest frames left the fenced host after the takeover"
    rejoined = wait_for_rejoin(active, "the old active rejoined as standby")
    wait_for(lambda: protected_pair(standby, active), "protected again", PROTECT_TIMEOUT_S)
    print(f"partition healed → protected again in {time.monotonic() - healed_at:.1f} s")
    assert rejoined["qemu_pid"] is None
    acked = pair.acked()
    wait_for(lambda: pair.acked() > acked + 3, "records acknowledged after the rejoin", 60)
    print(f"{pair.check_acked_stored()} records acknowledged and stored after the rejoin")


def test_4_a_protected_active_cut_from_etcd_goes_on(pair: HaPair) -> None:
    """The active's host loses etcd (blackhole routes to every member), the replication
    link and the standby's etcd stay: the protected active goes on (rule 2 a), says etcd
    is unreachable; nothing changes in the record; after healing it is reachable again."""
    active, standby = pair.agents["a"], pair.agents["b"]  # since test 3 (b rejoined)
    assert protected_pair(active, standby)
    term = status(active)["ha"]["term"]
    members = [member.ip for member in pair.etcd.members]
    for ip in members:
        pair.hosts["a"].run(["ip", "route", "add", "blackhole", f"{ip}/32"])
    try:
        wait_for(lambda: status(active)["ha"]["reachable"] is False, "a sees etcd gone", 30)
        # Longer than the lease: the protected active must not fence itself.
        wait_for(lambda: status(active)["ha"]["lease_valid"] is False, "a's lease lapsed", 30)
        acked = pair.acked()
        wait_for(lambda: pair.acked() > acked + 5, "records with the active cut from etcd", 60)
        assert status(active)["state"] == "active" and status(standby)["state"] == "standby"
        assert status(standby)["ha"]["reachable"] is True
        assert status(standby)["ha"]["term"] == term
    finally:
        for ip in members:
            pair.hosts["a"].run(["ip", "route", "del", "blackhole", f"{ip}/32"])
    wait_for(lambda: status(active)["ha"]["lease_valid"] is True, "a's lease re-bound", 60)
    assert protected_pair(active, standby) and status(active)["ha"]["term"] == term


def test_4_an_isolated_active_is_replaced_and_rejoins_once_the_link_is_back(
    pair: HaPair,
) -> None:
    """The protected active's host cut from everything (its LAN port taken out of the
    LAN bridge: etcd, the standby and the client gone): the standby takes over; the
    isolated agent holds every output, and once its lease ran out and its standby does
    not acknowledge a checkpoint it fences itself, still cut off.  Once the port is
    back it reads the record, rejoins as the standby by itself and the pair is
    protected again; no guest frame leaves its host from the cut on, and every
    acknowledged record is stored."""
    isolated, standby = pair.agents["a"], pair.agents["b"]
    assert protected_pair(isolated, standby)
    lan = pair.lab.lan
    port = ["ip", "link", "set", "to-a"]
    # -Q in on the port: what host a sends, cut off or not (the port stays up).
    with capture(
        lan, "to-a", pair.workdir / "isolated-old.pcap", GUEST_MAC, inbound_only=True
    ) as old_pcap:
        cut_at = time.monotonic()
        lan.run([*port, "nomaster"])
        try:
            wait_for(lambda: status(standby)["state"] == "active", "the standby took over", 60)
            acked = pair.acked()
            wait_for(lambda: pair.acked() > acked + 3, "records from the new active", 60)
            wait_for(lambda: status(isolated)["state"] == "fenced", "a fenced, cut off", 60)
            fenced_s = time.monotonic() - cut_at
            fenced_wall = time.time()
            fenced = status(isolated)
            assert fenced["ha"]["reachable"] is False and fenced["ha"]["lease_valid"] is False
            assert "does not answer" in fenced["state_reason"], fenced["state_reason"]
        finally:
            healed_at = time.monotonic()
            lan.run([*port, "master", LAN_BRIDGE])
        rejoined = wait_for_rejoin(isolated, "the isolated active fenced and rejoined")
        rejoin_s = time.monotonic() - healed_at
        wait_for(lambda: protected_pair(standby, isolated), "protected", PROTECT_TIMEOUT_S)
        protected_s = time.monotonic() - healed_at
    print(
        f"isolated → fenced {fenced_s:.1f} s after the cut; healed → rejoined {rejoin_s:.1f} s, "
        f"protected again {protected_s:.1f} s; {rejoined['state_reason']}"
    )
    late = [frame for at, frame in pcap_records(old_pcap) if at >= fenced_wall]
    assert late == [], f"{len(late)} guest frames left the isolated host after it fenced"
    acked = pair.acked()
    wait_for(lambda: pair.acked() > acked + 3, "records acknowledged after the rejoin", 60)
    print(f"{pair.check_acked_stored()} records acknowledged and stored after the rejoin")


def test_9_quit_of_the_protected_active_hands_over_to_the_standby(pair: HaPair) -> None:
    """A graceful ``quit`` of the protected active (b since the isolation): the
    replication connection ends, so the standby notices at once and wins ``take_over``;
    the quitting agent released nothing its standby lacks and exits 0; the client
    carries on."""
    term = status(pair.agents["b"])["ha"]["term"]
    handed = quit_and_hand_over(pair, "b", "a")
    print(
        f"quit → b active {handed.active_ms:.0f} ms, → client's next ack "
        f"{handed.ack_s:.2f} s; {handed.last_change}"
    )
    assert handed.exit_status == 0
    assert status(pair.agents["a"])["ha"]["term"] == term + 1
    assert "took over" in handed.last_change


def reason(agent: AgentProcess) -> str:
    return str(status(agent)["state_reason"])


def wait_for_rejoin(agent: AgentProcess, what: str) -> dict[str, Any]:
    """Wait until the fenced ``agent`` is a standby again by itself; its status then."""
    wait_for(lambda: reason(agent).startswith("rejoined as standby"), what, 60)
    rejoined = status(agent)
    assert rejoined["state"] == "standby" and "fenced: " in rejoined["state_reason"]
    return rejoined


def test_records_acknowledged_are_stored_in_order(pair: HaPair) -> None:
    print(f"{pair.finish_client()} records acknowledged, all stored in order")
