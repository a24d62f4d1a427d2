"""``kemari run``: start a VM under Kemari from flags, a TOML config file, or both."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from kemari.config import (
    DEFAULT_CHECKPOINTS_IN_FLIGHT,
    DEFAULT_EPOCH_MS,
    DEFAULT_SYNC,
    Accel,
    PageCompression,
    StorageMode,
    SyncPolicy,
    VMConfig,
    config_from_mapping,
    load_config_file,
)
from kemari.errors import ConfigError
from kemari.roles.agent import Agent

# Flag name -> config key for the plain scalar options.
_SCALAR_FLAGS = {
    "name": "name",
    "memory": "memory",
    "vcpus": "vcpus",
    "accel": "accel",
    "kernel": "kernel",
    "initrd": "initrd",
    "append": "append",
    "workload": "workload",
    "guest_ip": "guest_ip",
    "monitor": "monitor",
    "serial_log": "serial_log",
    "runtime_dir": "runtime_dir",
    "incoming": "incoming",
    "replica_dir": "replica_dir",
    "sync": "sync",
    "epoch_ms": "epoch_ms",
    "storage": "storage",
    "held_frames_max": "held_frames_max",
    "page_compression": "page_compression",
    "checkpoints_in_flight": "checkpoints_in_flight",
    "tls_creds": "tls_creds",
    "tls_name": "tls_name",
    "ha": "ha",
    "ha_lease_ttl": "ha_lease_ttl",
    "ha_detect_ms": "ha_detect_ms",
}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kemari run``."""
    parser = subparsers.add_parser(
        "run",
        help="run a VM under Kemari",
        description="Run a VM under Kemari. Flags override values from --config.",
    )
    parser.add_argument("--config", "-c", type=Path, help="TOML config file (see docs/config.md)")
    parser.add_argument("--name", help="VM name (a-z, 0-9, '-')")
    parser.add_argument("--memory", "-m", help="guest RAM, e.g. 256M or 1G")
    parser.add_argument("--vcpus", "--smp", type=int, help="number of vCPUs")
    parser.add_argument("--accel", choices=Accel.names(), help="accelerator")
    parser.add_argument("--kernel", help="guest kernel (default: the built Kemari guest image)")
    parser.add_argument("--initrd", help="guest initramfs")
    parser.add_argument("--append", help="extra kernel command line")
    parser.add_argument("--workload", help="Kemari guest workload: ticks, records, diskload, shell")
    parser.add_argument("--guest-ip", help="guest eth0 address, e.g. 10.213.0.2/24")
    parser.add_argument(
        "--disk", action="append", metavar="PATH[,ro]", help="raw image served over NBD"
    )
    parser.add_argument(
        "--nic",
        action="append",
        metavar="[mac=M][,tap=T][,bridge=B]",
        help="virtio NIC carried by Kemari to a host tap",
    )
    parser.add_argument("--monitor", help="Kemari monitor socket path")
    parser.add_argument("--serial-log", help="file receiving the guest serial console")
    parser.add_argument("--runtime-dir", help="directory for sockets (default /run/kemari/NAME)")
    parser.add_argument(
        "--incoming",
        "-incoming",
        metavar="kemari:tcp:HOST:PORT",
        help="run as the standby: receive checkpoints here, start QEMU only at failover",
    )
    parser.add_argument("--replica-dir", help="standby replica directory (default on /dev/shm)")
    parser.add_argument(
        "--sync",
        choices=SyncPolicy.names(),
        help="when checkpoints happen: on guest output (event), every --epoch-ms "
        f"(periodic), or both (default {DEFAULT_SYNC.value})",
    )
    parser.add_argument(
        "--epoch-ms", type=int, help=f"checkpoint period in ms (default {DEFAULT_EPOCH_MS})"
    )
    parser.add_argument(
        "--page-compression",
        choices=PageCompression.names(),
        help="page data to the standby: off (default) or zstd when the standby agrees "
        "(docs/protocol.md, Page compression)",
    )
    parser.add_argument(
        "--checkpoints-in-flight",
        type=int,
        metavar="N",
        help=f"checkpoints that may travel to the standby while the guest runs on "
        f"(default {DEFAULT_CHECKPOINTS_IN_FLIGHT}; 0: the guest waits for each "
        "acknowledgement)",
    )
    parser.add_argument(
        "--storage",
        choices=StorageMode.names(),
        help="shared: both hosts open the same disk image (default); replicated: each host "
        "has its own image, kept equal at every committed checkpoint",
    )
    parser.add_argument(
        "--held-frames-max",
        metavar="SIZE",
        help="memory for guest frames held until their checkpoint commits, e.g. 64K or 32M "
        "(default 32M); when full, Kemari stops reading the guest's NIC until half has left",
    )
    parser.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="replication channel credentials (ca-cert.pem, server-cert.pem, server-key.pem, "
        "client-cert.pem, client-key.pem; make them with `kemari pki`): mutually "
        "authenticated TLS 1.3, plain TCP refused. Without it the channel is plain TCP.",
    )
    parser.add_argument(
        "--tls-name",
        metavar="NAME",
        help="the name both certificates of this pair carry (default kemari-<vm name>)",
    )
    parser.add_argument(
        "--ha",
        metavar="URI",
        help="automatic failover: manual (default: failover is the operator's command) or "
        "etcd://IP:PORT[,IP:PORT...] (the agents claim the VM in etcd; --incoming is the "
        "address this agent listens on and publishes as a standby; docs/ha.md)",
    )
    parser.add_argument(
        "--ha-lease-ttl",
        type=int,
        metavar="S",
        help="--ha: the agent's etcd lease TTL in whole seconds (default 5: above the "
        "2.8 s renewal stall of an etcd leader election plus the 0.5 s margin)",
    )
    parser.add_argument(
        "--ha-detect-ms",
        type=int,
        metavar="MS",
        help="--ha: the standby declares the active lost after this long without a frame "
        "(default 500; the active sends a heartbeat after a quarter of it)",
    )
    parser.add_argument(
        "--console", action="store_true", help="also copy the guest serial console to stdout"
    )
    parser.set_defaults(func=_run)


def config_from_args(args: argparse.Namespace) -> VMConfig:
    """Merge the config file (if any) and the flags into a validated :class:`VMConfig`."""
    raw: dict[str, Any] = load_config_file(args.config) if args.config else {}
    for flag, key in _SCALAR_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            raw[key] = value
    if args.disk:
        raw["disk"] = [_parse_disk_flag(text) for text in args.disk]
    if args.nic:
        raw["nic"] = [_parse_nic_flag(text) for text in args.nic]
    return config_from_mapping(raw)


def _parse_disk_flag(text: str) -> dict[str, Any]:
    path, _, options = text.partition(",")
    if not path:
        raise ConfigError(f"--disk {text!r}: missing path")
    if options not in ("", "ro", "rw"):
        raise ConfigError(f"--disk {text!r}: options are 'ro' or 'rw'")
    return {"path": path, "read_only": options == "ro"}


def _parse_nic_flag(text: str) -> dict[str, Any]:
    nic: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in ("mac", "tap", "bridge") or not value:
            raise ConfigError(f"--nic {text!r}: expected mac=..,tap=..,bridge=..")
        nic[key] = value
    return nic


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    # Peers connected, refused and lost, replicas replaced: one line each on stderr.
    logging.basicConfig(level=logging.INFO, format="kemari: %(levelname)s: %(message)s")
    agent = Agent(config, console=sys.stdout if args.console else None)
    return asyncio.run(agent.run())
