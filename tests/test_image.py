"""Guest image: deterministic initramfs, module order, the kguest workloads (run on the
host), data disks, and one real boot of the image under QEMU."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import prerequisites

from kemari.cli.main import main
from kemari.errors import ImageError
from kemari.image import GuestImage, build_image, create_data_disk, default_image
from kemari.image.builder import read_manifest
from kemari.image.debs import parse_control, parse_depends
from kemari.image.disk import parse_size_mib
from kemari.image.initramfs import Initramfs, read_members
from kemari.image.modules import load_order, module_name, parse_modules_dep, plain_name
from kemari.testbed.wait import wait_for

# ---------------------------------------------------------------- pure logic


def _archive_bytes(archive: Initramfs) -> bytes:
    out = BytesIO()
    archive.write(out)
    return out.getvalue()


# Directory names start with "d", file names with "f": no path is both.
_DIRS = st.lists(st.text(alphabet="abc_.", max_size=4).map(lambda n: "d" + n), max_size=3)
_PATHS = st.tuples(_DIRS, st.text(alphabet="abc_.", max_size=4)).map(
    lambda p: "/".join([*p[0], "f" + p[1]])
)


@given(st.dictionaries(_PATHS, st.binary()))
def test_initramfs_round_trip_and_order_independence(files: dict[str, bytes]) -> None:
    forward, backward = Initramfs(), Initramfs()
    for path, data in files.items():
        forward.add_file(path, data)
    for path in reversed(list(files)):
        backward.add_file(path, files[path])
    blob = _archive_bytes(forward)
    assert blob == _archive_bytes(backward)
    members = read_members(gzip.decompress(blob))
    for path, data in files.items():
        assert members[path].data == data
        assert stat.S_ISREG(members[path].mode)
    seen: set[str] = set()
    for path in members:  # dict keeps archive order: every parent comes first
        parent = os.path.dirname(path)
        assert not parent or parent in seen
        seen.add(path)


def test_initramfs_nodes_links_and_bad_paths() -> None:
    archive = Initramfs()
    archive.add_char_device("dev/console", 5, 1)
    archive.add_symlink("bin/sh", "/bin/busybox")
    members = read_members(gzip.decompress(_archive_bytes(archive)))
    console = members["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdev_major, console.rdev_minor) == (5, 1)
    assert stat.S_ISLNK(members["bin/sh"].mode) and members["bin/sh"].data == b"/bin/busybox"
    assert stat.S_ISDIR(members["bin"].mode)
    with pytest.raises(ImageError):
        archive.add_file("../etc/passwd", b"")
    with pytest.raises(ImageError):
        archive.add_file("bin/sh", b"different")
    with pytest.raises(ImageError):
        archive.add_file("bin/sh/inside", b"")


_MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
"""


def test_load_order_puts_dependencies_first() -> None:
    graph = parse_modules_dep(_MODULES_DEP)
    order = [module_name(path) for path in load_order(graph, ["kernel/drivers/net/virtio_net.ko"])]
    assert order == ["failover", "net_failover", "virtio_ring", "virtio", "virtio_net"]
    assert module_name("kernel/x/virtio-rng.ko.xz") == "virtio_rng"
    assert plain_name("kernel/x/a.ko.zst") == "kernel/x/a.ko"


def test_load_order_rejects_cycles_and_unknown_modules() -> None:
    with pytest.raises(ImageError, match="cycle"):
        load_order({"a.ko": ("b.ko",), "b.ko": ("a.ko",)}, ["a.ko"])
    with pytest.raises(ImageError, match=r"not in modules\.dep"):
        load_order({"a.ko": ("missing.ko",)}, ["a.ko"])


@given(st.data())
def test_load_order_respects_every_edge(data: st.DataObject) -> None:
    count = data.draw(st.integers(1, 12))
    # Edges only from higher to lower numbers: always a DAG.
    graph = {
        f"m{i}.ko": tuple(
            f"m{j}.ko"
            for j in data.draw(st.sets(st.integers(0, i - 1), max_size=i) if i else st.just(set()))
        )
        for i in range(count)
    }
    roots = data.draw(st.sets(st.sampled_from(sorted(graph)), min_size=1))
    order = load_order(graph, roots)
    assert len(order) == len(set(order))
    assert set(roots) <= set(order)
    for position, module in enumerate(order):
        assert set(graph[module]) <= set(order[:position])


def test_control_parsing() -> None:
    text = (
        "Package: linux-image-cloud-amd64\nVersion: 6.1.1\nDepends: linux-image-6.1.0-9-cloud-amd64"
        " (= 6.1.1), a | b, c:any\nDescription: x\n more\n\nPackage: busybox-static\nVersion: 1\n"
    )
    stanzas = parse_control(text)
    assert [s["Package"] for s in stanzas] == ["linux-image-cloud-amd64", "busybox-static"]
    assert stanzas[0]["Description"] == "x\nmore"
    assert parse_depends(stanzas[0]["Depends"]) == ("linux-image-6.1.0-9-cloud-amd64", "a", "c")


def test_size_parsing() -> None:
    assert parse_size_mib("64") == 64
    assert parse_size_mib("64M") == 64
    assert parse_size_mib("2GiB") == 2048
    for bad in ("", "G", "1.5G", "-3M", "10K", "12 X"):
        with pytest.raises(ImageError):
            parse_size_mib(bad)


# ---------------------------------------------------------------- the built image


@pytest.fixture(scope="session")
def image() -> GuestImage:
    return build_image()


def test_build_reuses_cache_and_is_byte_identical(image: GuestImage) -> None:
    before = image.initrd.read_bytes()
    stamp = image.initrd.stat().st_mtime_ns
    assert build_image().initrd.stat().st_mtime_ns == stamp  # inputs unchanged: reused
    rebuilt = build_image(force=True)
    assert rebuilt.initrd.stat().st_mtime_ns != stamp  # really rebuilt ...
    assert rebuilt.initrd.read_bytes() == before  # ... to the same bytes
    assert default_image() == rebuilt


def test_initramfs_contents_and_module_order(image: GuestImage) -> None:
    members = read_members(gzip.decompress(image.initrd.read_bytes()))
    for path in ("init", "bin/busybox", "bin/kguest"):
        assert members[path].mode & 0o111, path
    assert members["bin/sh"].data == b"/bin/busybox"
    assert stat.S_ISCHR(members["dev/console"].mode)
    assert all(m.data == b"" or not stat.S_ISDIR(m.mode) for m in members.values())

    order = members["etc/modules.order"].data.decode().split()
    names = [module_name(path) for path in order]
    for needed in ("virtio_pci", "virtio_blk", "virtio_net", "failover", "net_failover"):
        assert needed in names
    # Check the order against the kernel package's own modules.dep.
    version = image.kernel_version
    modules_dir = next((image.kernel.parent.parent / "extract").glob(f"linux-image-{version}_*"))
    graph = parse_modules_dep((modules_dir / "lib/modules" / version / "modules.dep").read_text())
    prefix = f"lib/modules/{version}/"
    for position, path in enumerate(order):
        assert path in members and members[path].data[:4] == b"\x7fELF"
        deps = {prefix + plain_name(dep) for dep in graph[plain_name(path[len(prefix) :])]}
        assert deps <= set(order[:position]), path
    manifest = read_manifest()
    assert manifest["modules"] == names
    assert "ext4" in manifest["builtin_modules"] or "ext4" in names


def test_default_image_missing(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not built"):
        default_image(tmp_path)


def test_data_disk(tmp_path: Path) -> None:
    disk = tmp_path / "data.img"
    create_data_disk(disk, 16)
    assert disk.stat().st_size == 16 << 20
    fsck = shutil.which("e2fsck") or "/usr/sbin/e2fsck"
    assert (
        subprocess.run([fsck, "-n", "-f", str(disk)], check=False, capture_output=True).returncode
        == 0
    )
    with pytest.raises(ImageError, match="already exists"):
        create_data_disk(disk, 16)
    create_data_disk(disk, 32, overwrite=True)
    assert disk.stat().st_size == 32 << 20
    with pytest.raises(ImageError, match="size"):
        create_data_disk(tmp_path / "tiny.img", 1)
    assert not (tmp_path / "tiny.img").exists()


def test_cli_disk_and_info(
    image: GuestImage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "cli.img"
    assert main(["image", "disk", str(disk), "--size", "16M"]) == 0
    assert disk.stat().st_size == 16 << 20
    assert main(["image", "disk", str(disk), "--size", "16M"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["image", "disk", str(tmp_path / "x.img"), "--size", "lots"]) == 1
    assert "invalid size" in capsys.readouterr().err
    assert main(["image", "info"]) == 0
    out = capsys.readouterr().out
    assert image.kernel_version in out and "virtio_net" in out and "DAMAGED" not in out
    assert main(["image", "info", "--cache", str(tmp_path)]) == 1
    assert "not built" in capsys.readouterr().err


# ---------------------------------------------------------------- kguest on the host


class Kguest:
    """A kguest child process with its stdout read line by line."""

    def __init__(self, binary: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(binary), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []

    def wait_for(self, pattern: str) -> re.Match[str]:
        assert self.proc.stdout is not None
        # A hung child must fail the test, not hang it: kill it after a generous bound.
        watchdog = threading.Timer(120, self.proc.kill)
        watchdog.start()
        try:
            for line in self.proc.stdout:
                self.lines.append(line)
                match = re.search(pattern, line)
                if match:
                    return match
        finally:
            watchdog.cancel()
        raise AssertionError(f"kguest ended without {pattern!r}: {self.lines}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def kguest(image: GuestImage) -> Iterator[list[Kguest]]:
    started: list[Kguest] = []
    yield started
    for child in started:
        child.kill()


def start_records(binary: Path, started: list[Kguest], data: Path) -> tuple[Kguest, int]:
    child = Kguest(binary, "records", "--dir", str(data), "--listen", "127.0.0.1", "--port", "0")
    started.append(child)
    port = int(child.wait_for(r"workload records ready port=(\d+)").group(1))
    return child, port


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.file = self.sock.makefile("rwb")

    def ask(self, line: bytes) -> bytes:
        self.file.write(line + b"\n")
        self.file.flush()
        return self.file.readline().rstrip(b"\n")

    def get(self) -> list[tuple[int, bytes]]:
        self.file.write(b"GET\n")
        self.file.flush()
        records: list[tuple[int, bytes]] = []
        while True:
            line = self.file.readline().rstrip(b"\n")
            if line.startswith(b"END "):
                assert int(line[4:]) == len(records)
                return records
            tag, seq, payload = line.split(b" ", 2)
            assert tag == b"REC"
            records.append((int(seq), payload))

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def check_log_file(path: Path) -> list[bytes]:
    """Independent reader of records.log (zlib's CRC-32): payloads in order."""
    payloads = []
    for number, line in enumerate(path.read_bytes().split(b"\n")[:-1], start=1):
        seq, crc, payload = line.split(b" ", 2)
        assert int(seq) == number
        assert int(crc, 16) == zlib.crc32(seq + b" " + payload)
        payloads.append(payload)
    return payloads


def test_records_concurrent_clients_kill9_and_torn_tail(
    image: GuestImage, kguest: list[Kguest], tmp_path: Path
) -> None:
    child, port = start_records(image.kguest, kguest, tmp_path)
    acked: dict[bytes, int] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer(client_id: int, count: int) -> None:
        try:
            client = Client(port)
            for n in range(count):
                payload = b"client%d-record%d" % (client_id, n)
                reply = client.ask(b"PUT " + payload)
                assert reply.startswith(b"OK "), reply
                with lock:
                    acked[payload] = int(reply[3:])
            client.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i, 20)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(acked.values()) == list(range(1, 32 * 20 + 1))

    # A client streams PUTs; kill -9 the service in the middle of the stream.
    streamer = Client(port)

    def stream() -> None:
        try:
            for chunk in range(1000):
                streamer.sock.sendall(
                    b"".join(b"PUT stream%d\n" % (chunk * 10 + n) for n in range(10))
                )
        except OSError:
            pass  # the service was killed

    sender = threading.Thread(target=stream)
    sender.start()
    for n in range(50):
        reply = streamer.file.readline()
        assert reply == b"OK %d\n" % (32 * 20 + 1 + n)
        acked[b"stream%d" % n] = 32 * 20 + 1 + n
    child.kill()
    sender.join()
    streamer.close()

    # Simulate a torn final append as a crash mid-write leaves it: no terminator.
    log = tmp_path / "records.log"
    stored = check_log_file(log)
    with log.open("ab") as f:
        f.write(b"%d 0badc0de half a rec" % (len(stored) + 1))
    child, port = start_records(image.kguest, kguest, tmp_path)
    assert any("dropping a torn trailing record" in line for line in child.lines)

    client = Client(port)
    records = client.get()
    assert [seq for seq, _ in records] == list(range(1, len(stored) + 1))
    by_payload = {payload: seq for seq, payload in records}
    for payload, seq in acked.items():
        assert by_payload[payload] == seq  # every acknowledged record, at its seq
    assert client.ask(b"PUT after-restart") == b"OK %d" % (len(stored) + 1)
    assert client.ask(b"COUNT") == b"COUNT %d" % (len(stored) + 1)
    client.close()
    assert check_log_file(log)[-1] == b"after-restart"


def test_records_protocol_errors_and_reboot_request(
    image: GuestImage, kguest: list[Kguest], tmp_path: Path
) -> None:
    child, port = start_records(image.kguest, kguest, tmp_path)
    client = Client(port)
    assert client.ask(b"PUT ok") == b"OK 1"
    assert client.ask(b"PUT bad\x01byte").startswith(b"ERR")
    assert client.ask(b"PUT ").startswith(b"ERR")
    assert client.ask(b"PUT " + b"x" * 4097).startswith(b"ERR")
    assert client.ask(b"DELETE everything").startswith(b"ERR unknown command")
    assert client.ask(b"PING") == b"PONG"
    netstat = client.ask(b"NETSTAT")  # the host's interfaces here: a count, whatever it is
    assert netstat.startswith(b"NETSTAT tx_packets=") and netstat[19:].isdigit(), netstat
    flood = Client(port)
    flood.file.write(b"y" * 10000)  # no newline: rejected, connection closed
    flood.file.flush()
    assert flood.file.readline() == b"ERR line too long\n"
    assert flood.file.readline() == b""
    flood.close()
    assert client.get() == [(1, b"ok")]
    assert client.ask(b"REBOOT") == b"OK reboot"
    assert child.proc.wait(timeout=30) == 100  # init turns 100 into reboot -f
    client.close()


def test_records_refuses_corruption_in_the_middle(image: GuestImage, tmp_path: Path) -> None:
    line1 = b"1 %08x first" % zlib.crc32(b"1 first")
    line3 = b"3 %08x third" % zlib.crc32(b"3 third")
    (tmp_path / "records.log").write_bytes(line1 + b"\n2 00000000 broken\n" + line3 + b"\n")
    done = subprocess.run(
        [str(image.kguest), "records", "--dir", str(tmp_path), "--port", "0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "corrupt" in done.stderr
    assert (tmp_path / "records.log").read_bytes().endswith(line3 + b"\n")  # nothing dropped


def recovered_count(image: GuestImage, data: Path) -> int:
    """Start the records service on ``data``, read how many records it kept, stop it."""
    child = Kguest(
        image.kguest, "records", "--dir", str(data), "--listen", "127.0.0.1", "--port", "0"
    )
    try:
        count = int(child.wait_for(r"holds (\d+) records").group(1))
        child.wait_for(r"workload records ready")
    finally:
        child.kill()
    return count


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(0, 10_000), flip=st.booleans())
def test_records_recovery_keeps_exactly_the_complete_prefix(
    image: GuestImage, tmp_path_factory: pytest.TempPathFactory, cut: int, flip: bool
) -> None:
    lines = [b"%d %08x payload number %d" % (n, zlib.crc32(b"%d payload number %d" % (n, n)), n)
             for n in range(1, 201)]  # fmt: skip
    full = b"".join(line + b"\n" for line in lines)
    cut %= len(full) + 1
    torn = bytearray(full[:cut])
    complete = torn.count(b"\n")
    if flip and cut > 0 and torn[-1:] != b"\n":
        torn[-1] ^= 0x01  # damage inside the torn tail too
    elif flip and complete:
        # The cut is on a record boundary: damage the last complete record's CRC,
        # which makes it the torn tail.
        start = torn.rfind(b"\n", 0, len(torn) - 1) + 1
        torn[start + len(str(complete)) + 3] ^= 0x01  # hex digit -> another byte
        complete -= 1
    data = tmp_path_factory.mktemp("records")
    (data / "records.log").write_bytes(bytes(torn))
    assert recovered_count(image, data) == complete
    assert (data / "records.log").read_bytes() == b"".join(
        line + b"\n" for line in lines[:complete]
    )


def run_verify(image: GuestImage, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(image.kguest), "diskload-verify", "--dir", str(data)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_diskload_kill9_verify_continue_and_detect_corruption(
    image: GuestImage, kguest: list[Kguest], tmp_path: Path
) -> None:
    args = ("diskload", "--dir", str(tmp_path), "--blocks", "64", "--sync-every", "4")
    child = Kguest(image.kguest, *args)
    kguest.append(child)
    child.wait_for(r"workload diskload ready .*start_seq=0")
    child.wait_for(r"diskload: seq \d+ synced")  # at least 1024 writes: many rounds
    child.kill()
    verified = run_verify(image, tmp_path)
    assert verified.returncode == 0, verified.stdout
    match = re.search(r"OK blocks=64 written=64 max_seq=(\d+)", verified.stdout)
    assert match and int(match.group(1)) >= 1023

    done = subprocess.run(
        [str(image.kguest), *args, "--count", "10"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert f"start_seq={int(match.group(1)) + 1}" in done.stdout  # continued, not restarted

    disk = tmp_path / "diskload.bin"
    with disk.open("r+b") as f:
        f.seek(5 * 4096 + 100)
        byte = f.read(1)
        f.seek(5 * 4096 + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    verified = run_verify(image, tmp_path)
    assert verified.returncode == 1
    assert "FAIL block 5" in verified.stdout


# ---------------------------------------------------------------- a real boot


@pytest.mark.guest
def test_guest_boots_and_ticks(image: GuestImage, tmp_path: Path) -> None:
    serial = tmp_path / "serial.log"
    qemu = str(prerequisites.stock_qemu())
    command = [
        qemu, "-accel", "tcg", "-M", "pc", "-m", "256", "-nographic", "-no-reboot", "-nic", "none",
        "-monitor", "none", "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", "console=ttyS0 kemari.workload=ticks", "-serial", f"file:{serial}",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        ready_after: float | None = None

        def console() -> str:
            return serial.read_text(errors="replace") if serial.exists() else ""

        def ticked_five() -> bool:
            nonlocal ready_after
            assert proc.poll() is None, f"QEMU exited ({proc.returncode}): {console()[-2000:]}"
            text = console()
            if ready_after is None and "kemari-guest: workload ticks ready" in text:
                ready_after = time.monotonic() - started
            return re.search(r"^tick 5\r?$", text, re.MULTILINE) is not None

        # 300 s: a generous failure bound for a loaded host, not a timing check.
        wait_for(
            ticked_five,
            "tick 5 on the console",
            300,
            interval=0.2,
            detail=lambda: f"console tail: {console()[-2000:]!r}",
        )
        text = serial.read_text(errors="replace")
        ticks = [int(n) for n in re.findall(r"^tick (\d+)\r?$", text, re.MULTILINE)]
        assert ticks[:5] == [1, 2, 3, 4, 5], text[-2000:]
        assert "no data disk" in text
        assert ready_after is not None
        print(f"boot-to-ready under TCG: {ready_after:.1f} s")
    finally:
        proc.kill()
        proc.wait()
