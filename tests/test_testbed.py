"""Real tests of the namespace testbed: reachability, input checks, cleanup."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kemari.errors import NetError
from kemari.testbed.topology import Topology, cleanup_stale

pytestmark = pytest.mark.root


def namespaces() -> set[str]:
    return {p.name for p in Path("/run/netns").iterdir()} if Path("/run/netns").is_dir() else set()


def test_hosts_and_clients_share_one_lan_and_everything_goes_away():
    with Topology() as topology:
        primary = topology.add_host("primary", "10.213.0.11/24")
        standby = topology.add_host("standby", "10.213.0.12/24")
        client = topology.add_client("client", "10.213.0.100/24")
        created = {topology.prefix + "-" + role for role in ("lan", "primary", "standby", "client")}
        assert created <= namespaces()
        # Checkpoint traffic path (host to host) and the client path both cross the LAN bridge.
        primary.run(["ping", "-c", "1", "-W", "5", "10.213.0.12"])
        client.run(["ping", "-c", "1", "-W", "5", "10.213.0.11"])
        assert standby.ip == "10.213.0.12"
        sleeper = client.popen(["sleep", "600"])
    assert not created & namespaces()
    assert sleeper.poll() is not None


def test_root_namespace_is_untouched():
    before = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True, check=True)
    with Topology() as topology:
        topology.add_host("host", "10.213.0.11/24")
        topology.add_client("client", "10.213.0.100/24")
        during = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True, check=True)
    assert during.stdout == before.stdout


@pytest.mark.parametrize(
    ("name", "ip", "message"),
    [
        ("Bad-Name", "10.213.0.5/24", "invalid member name"),
        ("waytoolongname", "10.213.0.5/24", "invalid member name"),
        ("lan", "10.213.0.5/24", "already has a member"),
        ("client", "10.213.0.5", "needs a prefix length"),
        ("client", "10.213.0.300/24", "invalid IPv4 address"),
    ],
)
def test_bad_members_are_refused(name, ip, message):
    with Topology() as topology, pytest.raises(NetError, match=message):
        topology.add_client(name, ip)


def test_duplicate_member_is_refused():
    with Topology() as topology:
        topology.add_host("host")
        with pytest.raises(NetError, match="already has a member"):
            topology.add_client("host", "10.213.0.100/24")


def test_cleanup_stale_removes_only_dead_runs():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"kt-{dead.pid}-beef-lan"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with Topology() as live:
            removed = cleanup_stale()
            assert stale in removed
            assert live.lan is not None and live.lan.name in namespaces()
        assert stale not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True, check=False)
