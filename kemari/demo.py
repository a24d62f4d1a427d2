"""The demo: guests under Kemari on one machine, reached over a real (namespaced) network.

Act 1: a lab of network namespaces (a hypervisor-like host with a bridge, and a
client); the ``records`` guest runs under ``kemari run`` inside the host (disk served
by Kemari over NBD, NIC carried by Kemari to a tap on the host bridge), and a client
stores records and reads them back.

Act 2, fault tolerance: two hosts, ``primary`` and ``standby``, with addresses on the
LAN; the ``ticks`` guest runs on the primary and is protected by the standby
(checkpoints cross the LAN bridge as ft-transactions); the primary's QEMU and agent
are killed with SIGKILL, the standby is told to fail over, and the guest's counter
carries on from the last committed checkpoint without a reboot.

Act 3, automatic failover (``--ha``): a one-member etcd joins the LAN; two hosts run
the SAME ``kemari run ... --ha etcd://...`` command; the first claims the VM and boots
it, the second becomes its standby and the pair protects itself; the active's QEMU and
agent are killed and the standby takes over by itself, with no command typed.

Everything it creates is removed when it ends, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from kemari.config import tls_name_for
from kemari.errors import KemariError
from kemari.image.builder import build_image
from kemari.image.disk import create_data_disk
from kemari.testbed.etcd import EtcdLab
from kemari.testbed.topology import Namespace, Topology
from kemari.testbed.vm import AgentProcess
from kemari.testbed.wait import wait_for
from kemari.transaction.pki import make_credentials

GUEST_IP = "10.213.0.2"
CLIENT_IP = "10.213.0.100"
PRIMARY_IP = "10.213.0.11"
STANDBY_IP = "10.213.0.12"
PROTECTION_PORT = 4444


def step(message: str) -> None:
    """Print one demo step."""
    print(f"\n==> {message}", flush=True)


def run_demo(records_count: int = 20, keep_running: bool = False) -> int:
    """Run the demo; returns the exit status."""
    if os.geteuid() != 0:
        raise KemariError("the demo needs root (network namespaces and tap devices)")
    step("guest image (kernel from Debian's linux-image-cloud-amd64, busybox initramfs)")
    image = build_image()
    print(f"    kernel {image.kernel_version}: {image.kernel}")
    with tempfile.TemporaryDirectory(prefix="kemari-demo-") as workdir_name, Topology() as lab:
        workdir = Path(workdir_name)
        step("lab network: namespaces 'host' (bridge br0) and 'client', joined by a LAN bridge")
        host = lab.add_host("host")
        client = lab.add_client("client", f"{CLIENT_IP}/24")
        print(f"    host ns {host.name}; client ns {client.name} ({CLIENT_IP})")
        step("data disk: 64 MiB ext4 image, served to the guest by Kemari's NBD server")
        disk = workdir / "data.img"
        create_data_disk(disk, 64)
        step(f"kemari run: 'records' guest at {GUEST_IP}, NIC via Kemari to tap kt-demo0 on br0")
        args = [
            "--workload", "records", "--guest-ip", f"{GUEST_IP}/24",
            "--disk", str(disk), "--nic", "tap=kt-demo0,bridge=br0",
        ]  # fmt: skip
        started = time.monotonic()
        with AgentProcess("demo", workdir, args, namespace=host) as agent:
            agent.wait_serial(r"workload records ready")
            print(f"    guest ready after {time.monotonic() - started:.1f} s")
            print("    " + agent.monitor("info", "status").text.replace("\n", "\n    "))
            step(f"client {CLIENT_IP} stores {records_count} records in the guest")
            acked = _records(client, "put", str(records_count), "--prefix", "demo")
            print(f"    acknowledged: {acked[0]['payload']} .. {acked[-1]['payload']}")
            step("client reads every record back")
            stored = _records(client, "get")
            print(f"    {len(stored)} records stored: {stored[:3]} ...")
            if stored != [entry["payload"] for entry in acked]:
                raise KemariError("the guest returned different records than it acknowledged")
            print("\n    the guest console (last lines):")
            for line in agent.serial_text().splitlines()[-5:]:
                print(f"    | {line}")
            if keep_running:
                step(f"VM left running; try: kemari monitor {agent.monitor_path} info status")
                agent.process.wait()
            step("stopping the VM")
            status = agent.stop()
        if status == 0:
            status = _failover_act(lab, workdir)
        if status == 0:
            status = _auto_failover_act(lab, workdir)
        print(f"\ndemo finished (exit status {status}); lab removed")
        return status


def _failover_act(lab: Topology, workdir: Path) -> int:
    """Act 2: protect a running guest, kill its host, fail over, watch it carry on."""
    step("fault tolerance: hosts 'primary' (10.213.0.11) and 'standby' (10.213.0.12)")
    primary_ns = lab.add_host("primary", f"{PRIMARY_IP}/24")
    standby_ns = lab.add_host("standby", f"{STANDBY_IP}/24")
    address = f"kemari:tcp:{STANDBY_IP}:{PROTECTION_PORT}"
    creds = workdir / "pki"
    step(f"TLS credentials for the pair: kemari pki create {creds} --name ft")
    make_credentials(creds, tls_name_for("ft"))
    print("    the replication channel is mutually authenticated TLS 1.3 (docs/security.md)")
    ticks_args = ["--workload", "ticks", "--tls-creds", str(creds)]
    step(f"standby: kemari run -incoming {address} (no QEMU; keeps the replica)")
    standby = AgentProcess(
        "ft", workdir, [*ticks_args, "--incoming", address], standby_ns, label="standby"
    )
    with standby, AgentProcess("ft", workdir, ticks_args, primary_ns, label="primary") as active:
        standby.wait_monitor()
        active.wait_serial(r"tick 3\b")
        step(f"primary: kemari monitor ... migrate -d {address}")
        print("    " + active.monitor("migrate", "-d", address).text)
        deadline = time.monotonic() + 120
        while active.status()["protection"] != "protected":
            if time.monotonic() > deadline:
                raise KemariError("protection did not start within 120 s")
            time.sleep(0.2)
        time.sleep(3)
        print("    " + active.monitor("info", "status").text.replace("\n", "\n    "))
        last_tick = _last_line(active, "tick ")
        step(f"kill -9 the primary's QEMU and Kemari agent (last tick printed: {last_tick!r})")
        qemu_pid = active.status()["qemu_pid"]
        for pid in (qemu_pid, active.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        active.process.wait(30)
        step("standby: kemari monitor ... failover")
        print("    " + standby.monitor("failover").text)
        standby.wait_serial(r"tick \d+", after=0)
        time.sleep(2)
        print("    the guest console on the standby (no reboot, the counter carries on):")
        for line in standby.serial_text().splitlines()[:6]:
            print(f"    | {line}")
        print("    " + standby.monitor("info", "status").text.replace("\n", "\n    "))
        return standby.stop()


def _auto_failover_act(lab: Topology, workdir: Path) -> int:
    """Act 3: the same --ha command on two hosts; kill the active; nobody types failover."""
    step("automatic failover: a one-member etcd on the LAN (10.213.0.10)")
    hosts = {"east": "10.213.0.21", "west": "10.213.0.22"}
    namespaces = {name: lab.add_host(name, f"{ip}/24") for name, ip in hosts.items()}
    creds = workdir / "pki-auto"
    make_credentials(creds, tls_name_for("auto"))
    with EtcdLab(1, subnet="10.213.0", topology=lab) as etcd:

        def agent(name: str, label: str) -> AgentProcess:
            args = [
                "--workload", "ticks", "--ha", etcd.uri, "--tls-creds", str(creds),
                "--incoming", f"kemari:tcp:{hosts[name]}:{PROTECTION_PORT}",
                "--replica-dir", str(workdir / f"replica-{label}"),
            ]  # fmt: skip
            return AgentProcess("auto", workdir, args, namespaces[name], label=label)

        def protected_by(active: AgentProcess, standby: AgentProcess) -> bool:
            return bool(active.status()["ha"]["protected_by"] == standby.status()["ha"]["agent"])

        step(
            f"both hosts: kemari run --workload ticks --ha {etcd.uri} --tls-creds DIR "
            "--incoming <own address>"
        )
        east = agent("east", "east")
        with east:
            east.wait_monitor()
            east.wait_serial(r"tick 3\b")
            west = agent("west", "west")
            with west:
                west.wait_monitor()
                deadline = time.monotonic() + 120
                while east.status()["ha"]["protected_by"] != west.status()["ha"]["agent"]:
                    if time.monotonic() > deadline:
                        raise KemariError("the pair did not protect itself within 120 s")
                    time.sleep(0.2)
                print("    east claimed the VM and protects itself to west; no command typed:")
                print("    " + east.monitor("info", "status").text.replace("\n", "\n    "))
                time.sleep(2)
                step(f"kill -9 east's QEMU and agent (last tick: {_last_line(east, 'tick ')!r})")
                killed = time.monotonic()
                for pid in (east.status()["qemu_pid"], east.process.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                east.process.wait(30)
                while west.status()["state"] != "active":
                    if time.monotonic() > killed + 60:
                        raise KemariError("west did not take over within 60 s")
                    time.sleep(0.05)
                print(f"    west is active {time.monotonic() - killed:.2f} s after the kill:")
                print(f"    {west.status()['ha']['last_change']}")
                west.wait_serial(r"tick \d+", after=0)
                time.sleep(2)
                for line in west.serial_text().splitlines()[:4]:
                    print(f"    | {line}")
                step("east's host comes back and runs the same command: it joins as the standby")
                restarted = time.monotonic()
                with agent("east", "east-again") as east_again:
                    east_again.wait_monitor()
                    wait_for(lambda: protected_by(west, east_again), "re-protection", 120)
                    print(
                        f"    west is protected by east again {time.monotonic() - restarted:.1f} s "
                        "after the restart; no command typed:"
                    )
                    ha_lines = west.monitor("info", "status").text.split("\nha: ", 1)[1]
                    print("    ha: " + ha_lines.replace("\n", "\n    "))
                    east_again.stop()  # the standby first: a stopped active would be taken over
                return west.stop()


def _last_line(agent: AgentProcess, prefix: str) -> str:
    lines = [line for line in agent.serial_text().splitlines() if line.startswith(prefix)]
    return lines[-1] if lines else ""


def _records(client: Namespace, *args: str) -> list[dict[str, object]]:
    command = [sys.executable, "-m", "kemari.testbed.records", GUEST_IP]
    client.run([*command, "wait"], timeout=180)
    result = client.run([*command, *args], timeout=180)
    data: list[dict[str, object]] = json.loads(result.stdout)
    return data
