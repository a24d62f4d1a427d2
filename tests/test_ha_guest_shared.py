"""Automatic failover in ``shared`` storage mode: the standby waits for the old active's
lease to end before it starts the guest (docs/ha.md rule 4, invariant 5).

The testbed of tests/test_ha_guest.py (its own etcd cluster and namespaces for this
module), both agents naming the same image: kill -9 of the active's QEMU and agent →
the standby takes over by itself only once the old active's alive key is gone (lease
TTL 5 s by default), the client's single connection carries on, and every acknowledged
record is stored in order.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest
from test_ha_guest import (
    GUEST_IP,
    PROTECT_TIMEOUT_S,
    SUBNET,
    HaPair,
    protected_pair,
    status,
)

from kemari.config import StorageMode
from kemari.testbed.etcd import EtcdLab
from kemari.testbed.topology import Topology
from kemari.testbed.wait import wait_for

pytestmark = [
    pytest.mark.guest,
    pytest.mark.root,
    pytest.mark.usefixtures("image_and_patched_qemu"),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HaPair]:
    workdir = tmp_path_factory.mktemp("ha-shared")
    with Topology() as topology, EtcdLab(3, subnet=SUBNET, topology=topology) as lab:
        ha_pair = HaPair(topology, lab, workdir, StorageMode.SHARED)
        try:
            yield ha_pair
        finally:
            ha_pair.close()


def test_kill_of_the_active_takeover_waits_for_its_lease(pair: HaPair) -> None:
    a = pair.start_agent("a")
    a.wait_serial(r"workload records ready")
    a.wait_monitor()
    pair.start_client()
    b = pair.start_agent("b")
    b.wait_monitor()
    wait_for(lambda: protected_pair(a, b), "a protected by b in the record", PROTECT_TIMEOUT_S)
    wait_for(lambda: pair.acked() > 5, "records acknowledged while protected", 60)
    acked_at_kill = pair.acked()
    killed_at = time.monotonic()
    os.kill(status(a)["qemu_pid"], signal.SIGKILL)
    os.kill(a.process.pid, signal.SIGKILL)
    a.process.wait(30)
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

    assert pair.client is not None and pair.client.stdin is not None
    pair.client.stdin.close()
    assert pair.client.wait(180) == 0, "the client's single connection did not survive"
    acked = pair.acked_log.read_text().split()
    listing = pair.client_ns.run(
        [sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "get"], timeout=120
    )
    stored = [p for p in json.loads(listing.stdout) if p.startswith("ha-")]
    assert stored[: len(acked)] == acked and len(stored) <= len(acked) + 1
