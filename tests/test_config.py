"""VM configuration: parsing, validation and the flag/TOML equivalence."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kemari.cli.main import build_parser
from kemari.cli.run import config_from_args
from kemari.config import (
    Accel,
    PageCompression,
    StorageMode,
    SyncPolicy,
    config_from_mapping,
    load_config_file,
    parse_size_mib,
)
from kemari.errors import ConfigError


def test_minimal_config_gets_defaults() -> None:
    config = config_from_mapping({"name": "vm1"})
    assert (config.memory_mib, config.vcpus, config.accel) == (256, 1, Accel.AUTO)
    assert (config.sync, config.storage) == (SyncPolicy.EVENT_PERIODIC, StorageMode.SHARED)
    assert config.uses_built_image
    assert config.resolved_monitor() == Path("/run/kemari/vm1/monitor.sock")


def test_full_toml_file(tmp_path: Path) -> None:
    disk = tmp_path / "data.img"
    disk.write_bytes(b"\0" * 4096)
    path = tmp_path / "vm.toml"
    path.write_text(
        f"""
name = "web"
memory = "1G"
vcpus = 2
accel = "tcg"
workload = "records"
guest_ip = "10.213.0.2/24"
append = "quiet"
[[disk]]
path = "{disk}"
[[nic]]
mac = "52:54:00:AA:BB:01"
tap = "kt-web0"
bridge = "br0"
"""
    )
    config = config_from_mapping(load_config_file(path))
    assert config.memory_mib == 1024
    assert config.nics[0].mac == "52:54:00:aa:bb:01"
    assert config.disks[0].path == disk
    assert config.kernel_command_line() == (
        "console=ttyS0 kemari.workload=records kemari.ip=10.213.0.2/24 quiet"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "name: missing"),
        ({"name": "Bad Name"}, "name:"),
        ({"name": "a", "memory": "12X"}, "memory: expected a size"),
        ({"name": "a", "memory": "32M"}, "outside"),
        ({"name": "a", "vcpus": 0}, "vcpus"),
        ({"name": "a", "vcpus": True}, "vcpus: expected an integer"),
        ({"name": "a", "accel": "xen"}, "accel"),
        ({"name": "a", "workload": "mine"}, "workload"),
        ({"name": "a", "guest_ip": "10.0.0.300/24"}, "guest_ip"),
        ({"name": "a", "guest_ip": "10.0.0.3"}, "needs a prefix"),
        ({"name": "a", "kernel": "/nonexistent/vmlinuz"}, "kernel: /nonexistent/vmlinuz"),
        ({"name": "a", "disk": [{"path": "/nonexistent.img"}]}, "disk[0].path"),
        ({"name": "a", "nic": [{"mac": "01:00:00:00:00:01"}]}, "multicast"),
        ({"name": "a", "nic": [{"mac": "zz"}]}, "nic[0].mac"),
        ({"name": "a", "nic": [{"tap": "x" * 16}]}, "nic[0].tap"),
        ({"name": "a", "nic": [{}, {"tap": "kt-a-0"}]}, "share a tap"),
        ({"name": "a", "colour": "red"}, "unknown key(s): colour"),
        ({"name": "a", "disk": {"path": "x"}}, "arrays of tables"),
        ({"name": "a", "held_frames_max": "32K"}, "held_frames_max: 32768 bytes is outside"),
        ({"name": "a", "held_frames_max": "2T"}, "held_frames_max"),
        ({"name": "a", "held_frames_max": "lots"}, "held_frames_max: expected a size"),
        (
            {"name": "a", "page_compression": "lz4"},
            "page_compression: 'lz4' is not one of off, zstd",
        ),
        ({"name": "a", "checkpoints_in_flight": -1}, "checkpoints_in_flight: -1 is outside 0..16"),
        ({"name": "a", "checkpoints_in_flight": 17}, "checkpoints_in_flight: 17 is outside 0..16"),
        ({"name": "a", "checkpoints_in_flight": "3"}, "checkpoints_in_flight: expected"),
    ],
)
def test_invalid_values_are_refused(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_mapping(raw)


def test_broken_toml_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config_file(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")


@given(st.integers(min_value=1, max_value=1 << 20), st.sampled_from(["M", "MiB", "G", "g"]))
def test_size_parsing_units(number: int, unit: str) -> None:
    factor = 1024 if unit.upper().startswith("G") else 1
    assert parse_size_mib(f"{number}{unit}", "x") == number * factor


@given(st.text())
def test_size_parsing_never_crashes(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_size_mib(text, "x")


def test_replication_digest_ignores_host_local_settings(tmp_path: Path) -> None:
    base = {"name": "vm", "memory": "512M", "nic": [{"mac": "52:54:00:00:00:01"}]}
    host_a = config_from_mapping(
        {**base, "runtime_dir": "/a", "accel": "tcg", "held_frames_max": "64K"}
    )
    host_b = config_from_mapping(
        {**base, "monitor": "/b/m.sock", "nic": [{"mac": "52:54:00:00:00:01", "tap": "other"}]}
    )
    assert host_a.replication_digest() == host_b.replication_digest()
    bigger = config_from_mapping({**base, "memory": "1G"})
    assert bigger.replication_digest() != host_a.replication_digest()
    other_mac = config_from_mapping({**base, "nic": [{"mac": "52:54:00:00:00:02"}]})
    assert other_mac.replication_digest() != host_a.replication_digest()


def test_held_frames_max_is_a_size_with_the_log_default() -> None:
    assert config_from_mapping({"name": "a"}).held_frames_max_bytes == 32 << 20
    assert config_from_mapping({"name": "a", "held_frames_max": "64K"}).held_frames_max_bytes == (
        64 << 10
    )
    assert config_from_mapping({"name": "a", "held_frames_max": 8}).held_frames_max_bytes == (
        8 << 20
    )


def test_a_kernel_path_that_is_a_directory_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"kernel: {tmp_path} is a directory, not a file"):
        config_from_mapping({"name": "a", "kernel": str(tmp_path)})


def test_the_digest_covers_the_kernel_and_initrd_by_content_not_by_path(tmp_path: Path) -> None:
    """Two hosts may keep the same kernel at different paths; different kernels never match."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder, kernel in (("a", b"kernel one"), ("b", b"kernel two")):
        (tmp_path / folder / "vmlinuz").write_bytes(kernel)
        (tmp_path / folder / "initrd").write_bytes(b"same initrd")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bzImage").write_bytes(b"kernel one")
    (tmp_path / "c" / "initramfs").write_bytes(b"same initrd")

    def digest(kernel: str, initrd: str) -> bytes:
        raw = {"name": "a", "kernel": str(tmp_path / kernel), "initrd": str(tmp_path / initrd)}
        return config_from_mapping(raw).replication_digest()

    assert digest("a/vmlinuz", "a/initrd") == digest("c/bzImage", "c/initramfs")
    assert digest("a/vmlinuz", "a/initrd") != digest("b/vmlinuz", "b/initrd")


def test_ha_defaults_to_manual() -> None:
    assert config_from_mapping({"name": "vm1"}).ha is None
    assert config_from_mapping({"name": "vm1", "ha": "manual"}).ha is None


def test_ha_etcd_uri_is_parsed_once_with_defaults() -> None:
    config = config_from_mapping(
        {"name": "vm1", "ha": "etcd://10.0.0.1,10.0.0.2:2380", "incoming": "kemari:tcp:0:7000"}
    )
    assert config.ha is not None
    assert config.ha.endpoints == ("10.0.0.1:2379", "10.0.0.2:2380")
    assert (config.ha.lease_ttl_s, config.ha.detect_ms) == (5, 500)
    assert config.ha.detect_s == 0.5


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"ha": "etcd://h1,h2", "incoming": "kemari:tcp:0:1"}, "IPv4"),
        ({"ha": "zookeeper://x", "incoming": "kemari:tcp:0:1"}, "expected etcd://"),
        ({"ha": "etcd://10.0.0.1"}, "needs incoming"),
        ({"ha_lease_ttl": 5}, "without ha"),
        ({"ha": "etcd://10.0.0.1", "incoming": "kemari:tcp:0:1", "ha_lease_ttl": 1}, "2..60"),
        ({"ha": "etcd://10.0.0.1", "incoming": "kemari:tcp:0:1", "ha_detect_ms": 50}, "100..10000"),
    ],
)
def test_ha_invalid_settings(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_mapping({"name": "vm1", **raw})


def test_ha_flags_match_config() -> None:
    args = build_parser().parse_args(
        ["run", "--name", "vm1", "--ha", "etcd://10.0.0.1:2379", "--incoming",
         "kemari:tcp:0:7000", "--ha-lease-ttl", "7", "--ha-detect-ms", "300"]
    )  # fmt: skip
    ha = config_from_args(args).ha
    assert ha is not None and (ha.lease_ttl_s, ha.detect_ms) == (7, 300)


def test_page_compression_is_off_by_default_host_local_and_a_flag() -> None:
    default = config_from_mapping({"name": "a"})
    zstd = config_from_mapping({"name": "a", "page_compression": "zstd"})
    assert (default.page_compression, zstd.page_compression) == (
        PageCompression.OFF,
        PageCompression.ZSTD,
    )
    assert default.replication_digest() == zstd.replication_digest()
    args = build_parser().parse_args(["run", "--name", "a", "--page-compression", "zstd"])
    assert config_from_args(args).page_compression is PageCompression.ZSTD


def test_checkpoints_in_flight_defaults_to_3_is_host_local_and_a_flag() -> None:
    default = config_from_mapping({"name": "a"})
    synchronous = config_from_mapping({"name": "a", "checkpoints_in_flight": 0})
    assert (default.checkpoints_in_flight, synchronous.checkpoints_in_flight) == (3, 0)
    assert default.replication_digest() == synchronous.replication_digest()
    args = build_parser().parse_args(["run", "--name", "a", "--checkpoints-in-flight", "1"])
    assert config_from_args(args).checkpoints_in_flight == 1
