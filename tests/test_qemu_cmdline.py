"""MachineSpec validation and the argv it becomes (pure; no QEMU is started)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kemari.errors import ConfigError
from kemari.qemu.cmdline import (
    MAX_UNIX_SOCKET_PATH_BYTES,
    IncomingDefer,
    IncomingTcp,
    IncomingUnix,
    MachineSpec,
    MemoryFile,
    NbdDisk,
    StreamNic,
    build_argv,
    escape_option_value,
    inherited_fds,
)

QMP = Path("/run/kemari/vm/qmp.sock")


def spec(**changes: object) -> MachineSpec:
    values: dict[str, object] = {"name": "vm", "accel": "tcg", "qmp_socket": QMP}
    values.update(changes)
    return MachineSpec(**values)  # type: ignore[arg-type]


def option_after(argv: list[str], flag: str, prefix: str = "") -> str:
    """The value following the first ``flag`` whose value starts with ``prefix``."""
    for index, item in enumerate(argv[:-1]):
        if item == flag and argv[index + 1].startswith(prefix):
            return argv[index + 1]
    raise AssertionError(f"{flag} {prefix}... not in {argv}")


def split_options(value: str) -> list[str]:
    """Split a QEMU key=value list the way QEMU does: a doubled comma is a literal comma."""
    return [part.replace("\0", ",") for part in value.replace(",,", "\0").split(",")]


def test_minimal_spec_argv() -> None:
    argv = build_argv(spec())
    assert argv[:6] == ["-name", "guest=vm", "-nodefaults", "-nographic", "-display", "none"]
    assert option_after(argv, "-machine") == "pc"
    assert option_after(argv, "-accel") == "tcg"
    assert option_after(argv, "-m") == "256M"
    assert option_after(argv, "-smp") == "1"
    assert option_after(argv, "-chardev", "socket") == (
        f"socket,id=qmp,path={QMP},server=on,wait=off"
    )
    assert option_after(argv, "-mon") == "chardev=qmp,mode=control"
    assert "-no-reboot" in argv
    assert "-S" not in argv
    assert "-kernel" not in argv
    assert "-bios" not in argv
    assert "-incoming" not in argv


def test_full_spec_argv() -> None:
    argv = build_argv(
        spec(
            memory_mib=512,
            vcpus=2,
            bios=Path("/usr/share/qemu/qboot.rom"),
            kernel=Path("/img/vmlinuz"),
            initrd=Path("/img/initrd"),
            append="console=ttyS0 quiet",
            disks=(
                NbdDisk(Path("/run/k/nbd.sock"), "data"),
                NbdDisk(Path("/run/k/nbd.sock"), "ro", read_only=True),
            ),
            nics=(StreamNic("52:54:00:AB:cd:01", Path("/run/k/net0.sock")),),
            serial_log=Path("/var/log/vm.serial"),
            no_reboot=False,
            start_paused=True,
            memory_file=MemoryFile(Path("/dev/shm/vm.ram")),
            incoming=IncomingUnix(Path("/run/k/in.sock")),
        )
    )
    assert option_after(argv, "-m") == "512M"
    assert option_after(argv, "-smp") == "2"
    assert option_after(argv, "-bios") == "/usr/share/qemu/qboot.rom"
    assert option_after(argv, "-kernel") == "/img/vmlinuz"
    assert option_after(argv, "-initrd") == "/img/initrd"
    assert option_after(argv, "-append") == "console=ttyS0 quiet"
    assert option_after(argv, "-blockdev") == (
        "driver=nbd,server.type=unix,server.path=/run/k/nbd.sock,export=data,"
        "node-name=disk0,read-only=off"
    )
    assert "virtio-blk-pci,drive=disk0,id=vdisk0" in argv
    assert "virtio-blk-pci,drive=disk1,id=vdisk1" in argv
    assert argv.count("-blockdev") == 2
    assert "read-only=on" in argv[argv.index("virtio-blk-pci,drive=disk1,id=vdisk1") - 2]
    assert option_after(argv, "-netdev") == (
        "stream,id=net0,server=off,addr.type=unix,addr.path=/run/k/net0.sock"
    )
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:ab:cd:01,id=vnet0" in argv
    assert option_after(argv, "-chardev", "file") == "file,id=serial0,path=/var/log/vm.serial"
    assert option_after(argv, "-serial") == "chardev:serial0"
    assert option_after(argv, "-object") == (
        "memory-backend-file,id=pc.ram,size=512M,mem-path=/dev/shm/vm.ram,share=on"
    )
    assert option_after(argv, "-machine") == "pc,memory-backend=pc.ram"
    # The memory backend object must precede the machine option that names it.
    assert argv.index("-object") < argv.index("-machine")
    assert "-no-reboot" not in argv
    assert "-S" in argv
    assert option_after(argv, "-incoming") == "unix:/run/k/in.sock"


def test_inherited_nic_sockets_become_fd_netdevs() -> None:
    machine = spec(
        nics=(
            StreamNic("52:54:00:00:00:01", fd=7),
            StreamNic("52:54:00:00:00:02", Path("/run/k/net1.sock")),
            StreamNic("52:54:00:00:00:03", fd=12),
        )
    )
    argv = build_argv(machine)
    netdevs = [argv[i + 1] for i, item in enumerate(argv) if item == "-netdev"]
    assert netdevs == [
        "stream,id=net0,server=off,addr.type=fd,addr.str=7",
        "stream,id=net1,server=off,addr.type=unix,addr.path=/run/k/net1.sock",
        "stream,id=net2,server=off,addr.type=fd,addr.str=12",
    ]
    assert "virtio-net-pci,netdev=net2,mac=52:54:00:00:00:03,id=vnet2" in argv
    assert inherited_fds(machine) == (7, 12)
    assert inherited_fds(spec()) == ()


@pytest.mark.parametrize(
    ("nics", "message"),
    [
        ((StreamNic("52:54:00:12:34:56"),), "exactly one of"),
        ((StreamNic("52:54:00:12:34:56", Path("/n"), fd=5),), "exactly one of"),
        ((StreamNic("52:54:00:12:34:56", fd=2),), "outside 3.."),
        ((StreamNic("52:54:00:12:34:56", fd=-1),), "outside 3.."),
        ((StreamNic("52:54:00:12:34:56", fd=1 << 31),), "outside 3.."),
        ((StreamNic("52:54:00:12:34:56", fd=True),), "expected an integer"),
        ((StreamNic("52:54:00:12:34:56", fd="7"),), "expected an integer"),  # type: ignore[arg-type]
        (
            (StreamNic("52:54:00:12:34:56", fd=7), StreamNic("52:54:00:12:34:57", fd=7)),
            "share a stream socket descriptor",
        ),
    ],
)
def test_invalid_nic_descriptors_raise_config_error(
    nics: tuple[StreamNic, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        spec(nics=nics)


@pytest.mark.parametrize(
    ("incoming", "uri"),
    [
        (IncomingDefer(), "defer"),
        (IncomingTcp("10.0.0.2", 4444), "tcp:10.0.0.2:4444"),
        (IncomingTcp("::1", 4444), "tcp:[::1]:4444"),
        (IncomingTcp("standby.example", 1), "tcp:standby.example:1"),
    ],
)
def test_incoming_uri(incoming: IncomingDefer | IncomingTcp, uri: str) -> None:
    assert option_after(build_argv(spec(incoming=incoming)), "-incoming") == uri


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": ""}, "machine name"),
        ({"name": "a,b"}, "machine name"),
        ({"name": "-x"}, "machine name"),
        ({"accel": "auto"}, "accel"),
        ({"memory_mib": 15}, "memory"),
        ({"memory_mib": True}, "memory"),
        ({"memory_mib": (1 << 20) + 1}, "memory"),
        ({"vcpus": 0}, "vcpus"),
        ({"vcpus": 256}, "vcpus"),
        ({"vcpus": "2"}, "vcpus"),
        ({"initrd": Path("/i")}, "initrd given without a kernel"),
        ({"append": "quiet"}, "without a kernel"),
        ({"kernel": Path("")}, "kernel"),
        ({"bios": "qboot.rom"}, "bios"),
        ({"kernel": "/boot/vmlinuz"}, "expected a path"),
        ({"qmp_socket": Path("/" + "s" * MAX_UNIX_SOCKET_PATH_BYTES)}, "longer than"),
        ({"nics": (StreamNic("52:54:00:12:34", Path("/n")),)}, "MAC"),
        ({"nics": (StreamNic("53:54:00:12:34:56", Path("/n")),)}, "multicast"),
        ({"nics": (StreamNic("00:00:00:00:00:00", Path("/n")),)}, "all zeros"),
        (
            {
                "nics": (
                    StreamNic("52:54:00:12:34:56", Path("/a")),
                    StreamNic("52:54:00:12:34:56", Path("/b")),
                )
            },
            "share a MAC",
        ),
        (
            {
                "nics": (
                    StreamNic("52:54:00:12:34:56", Path("/a")),
                    StreamNic("52:54:00:12:34:57", Path("/a")),
                )
            },
            "share a stream socket",
        ),
        ({"disks": (NbdDisk(Path("/d"), "x\0y"),)}, "export name"),
        ({"disks": (NbdDisk(Path("/d"), "e" * 4097),)}, "longer than 4096"),
        ({"disks": (NbdDisk(Path("/d"), "e"), NbdDisk(Path("/d"), "e"))}, "same NBD socket"),
        ({"incoming": IncomingTcp("10.0.0.1", 0)}, "port"),
        ({"incoming": IncomingTcp("bad host", 80)}, "incoming host"),
    ],
)
def test_invalid_specs_raise_config_error(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        spec(**changes)


def test_spec_is_immutable() -> None:
    machine = spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        machine.vcpus = 4  # type: ignore[misc]


hex_byte = st.integers(min_value=0, max_value=255)


@given(st.lists(hex_byte, min_size=6, max_size=6))
def test_unicast_macs_are_accepted_and_lowercased(octets: list[int]) -> None:
    octets[0] &= 0xFE  # unicast
    if not any(octets):
        octets[5] = 1
    mac = ":".join(f"{o:02X}" for o in octets)
    argv = build_argv(spec(nics=(StreamNic(mac, Path("/n.sock")),)))
    assert f"mac={mac.lower()}," in option_after(argv, "-device", "virtio-net-pci")


@given(st.text(max_size=30))
def test_malformed_macs_are_rejected(text: str) -> None:
    if re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", text):
        return
    with pytest.raises(ConfigError):
        spec(nics=(StreamNic(text, Path("/n.sock")),))


@given(st.integers(min_value=-(1 << 40), max_value=1 << 40))
def test_memory_is_accepted_exactly_in_range(memory: int) -> None:
    if 16 <= memory <= 1 << 20:
        assert option_after(build_argv(spec(memory_mib=memory)), "-m") == f"{memory}M"
    else:
        with pytest.raises(ConfigError):
            spec(memory_mib=memory)


path_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\0"),
    min_size=1,
    max_size=60,
)


@given(path_text, st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_paths_and_export_names_survive_option_escaping(name: str, export: str) -> None:
    socket_path = Path("/run", name)
    if "\0" in export or len(str(socket_path).encode()) > MAX_UNIX_SOCKET_PATH_BYTES:
        return
    argv = build_argv(spec(disks=(NbdDisk(socket_path, export),)))
    fields = split_options(option_after(argv, "-blockdev"))
    assert f"server.path={socket_path}" in fields
    assert f"export={export}" in fields


@given(st.text(alphabet=st.characters(exclude_characters="\0"), max_size=50))
def test_escaped_value_parses_back_as_one_value(value: str) -> None:
    assert split_options(f"a=1,key={escape_option_value(value)},b=2") == [
        "a=1",
        f"key={value}",
        "b=2",
    ]
