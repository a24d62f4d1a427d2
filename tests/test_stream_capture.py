"""The stream parser against real QEMU 7.2 output: a paused TCG machine migrated to a file.

No guest boots (``-S``, no kernel); the capture is a plain precopy stream, which has the
same grammar as the x-colo initial migration minus the ENABLE_COLO command.
"""

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from kemari.qemu.binary import qemu_binary
from kemari.stream import (
    Configuration,
    DeviceState,
    FailoverPage,
    ParserState,
    RamBlock,
    RamBlockList,
    RamPage,
    RamZeroPage,
    StreamParser,
    VmDescription,
    failover_stream,
)
from kemari.stream.format import PAGE_SIZE

QEMU = str(qemu_binary("tcg").path)
pytestmark = pytest.mark.guest
MEMORY = 64 << 20


async def _capture(tmp_path: Path, ignore_shared: bool) -> bytes:
    qmp_path = tmp_path / "qmp.sock"
    out = tmp_path / "stream.bin"
    argv = [QEMU, "-accel", "tcg", "-nodefaults", "-display", "none", "-S", "-m", "64M"]
    argv += ["-machine", "pc,memory-backend=pc.ram"]
    argv += [
        "-object",
        f"memory-backend-file,id=pc.ram,size=64M,mem-path={tmp_path / 'ram'},share=on",
    ]
    argv += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    qmp = QMPClient("capture")
    try:
        for _ in range(200):
            if qmp_path.exists():
                break
            await asyncio.sleep(0.05)
        await qmp.connect(str(qmp_path))
        caps = [{"capability": "x-ignore-shared", "state": ignore_shared}]
        await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        await qmp.execute("migrate", {"uri": f"exec:cat > {out}"})
        while True:
            info = await qmp.execute("query-migrate")
            assert isinstance(info, dict)
            if info.get("status") in ("completed", "failed"):
                assert info["status"] == "completed", info
                break
            await asyncio.sleep(0.05)
    finally:
        await qmp.disconnect()
        proc.terminate()
        proc.wait(timeout=10)
    return out.read_bytes()


@pytest.mark.parametrize("ignore_shared", [False, True])
def test_parser_reads_a_real_qemu_migration_stream(tmp_path: Path, ignore_shared: bool) -> None:
    data = asyncio.run(asyncio.wait_for(_capture(tmp_path, ignore_shared), 60))
    parser = StreamParser()
    # The whole capture in one feed, then again in odd-sized chunks: same events.
    events = parser.feed(data)
    parser.finish()
    assert parser.state is ParserState.DONE and not parser.colo_enabled

    config = next(e for e in events if isinstance(e, Configuration))
    assert config.machine_type.startswith("pc-i440fx-")
    assert config.capabilities == (("x-ignore-shared",) if ignore_shared else ())

    blocks = next(e for e in events if isinstance(e, RamBlockList)).blocks
    by_name = {b.name: b for b in blocks}
    assert by_name["pc.ram"].used_length == MEMORY
    if ignore_shared:
        # The backend's own region is mapped through aliases, so its address is 0.
        assert by_name["pc.ram"].gpa == 0
        assert all(b.gpa is not None for b in blocks)

    touched = {e.block for e in events if isinstance(e, RamPage | RamZeroPage)}
    assert ("pc.ram" in touched) is not ignore_shared
    assert touched <= set(by_name)

    device = next(e for e in events if isinstance(e, DeviceState)).data
    vmdesc = json.loads(next(e for e in events if isinstance(e, VmDescription)).json)
    assert vmdesc["page_size"] == PAGE_SIZE
    names = [d["name"] for d in vmdesc["devices"]]
    for name in names:
        assert name.encode() in device
    assert isinstance(events[-1], VmDescription)

    chunked = StreamParser()
    again = []
    for start in range(0, len(data), 7919):
        again += chunked.feed(data[start : start + 7919])
    chunked.finish()
    assert [type(e) for e in again] == [type(e) for e in events]


async def _load_failover_stream(
    tmp_path: Path, stream: list[bytes | memoryview]
) -> dict[str, object]:
    """Start a fresh QEMU on the same shared RAM file and feed it ``stream``."""
    qmp_path = tmp_path / "qmp-dst.sock"
    incoming = tmp_path / "incoming.sock"
    argv = [QEMU, "-accel", "tcg", "-nodefaults", "-display", "none", "-S", "-m", "64M"]
    argv += ["-machine", "pc,memory-backend=pc.ram", "-incoming", "defer"]
    argv += [
        "-object",
        f"memory-backend-file,id=pc.ram,size=64M,mem-path={tmp_path / 'ram'},share=on",
    ]
    argv += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    qmp = QMPClient("failover")
    try:
        for _ in range(200):
            if qmp_path.exists():
                break
            await asyncio.sleep(0.05)
        await qmp.connect(str(qmp_path))
        caps = [{"capability": "x-ignore-shared", "state": True}]
        await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        await qmp.execute("migrate-incoming", {"uri": f"unix:{incoming}"})
        _, writer = await asyncio.open_unix_connection(str(incoming))
        for chunk in stream:
            writer.write(chunk)
        await writer.drain()
        while True:
            info = await qmp.execute("query-migrate")
            assert isinstance(info, dict)
            if info.get("status") in ("completed", "failed"):
                break
            await asyncio.sleep(0.05)
        status = await qmp.execute("query-status")
        assert isinstance(status, dict)
        writer.close()
        return {"migrate": info["status"], "status": status["status"]}
    finally:
        await qmp.disconnect()
        proc.terminate()
        proc.wait(timeout=10)


def test_fresh_qemu_loads_the_failover_stream(tmp_path: Path) -> None:
    # Capture a precopy stream (plain, pages of every block), keep what a replica keeps,
    # and let a fresh QEMU with x-ignore-shared load the synthesized failover stream.
    data = asyncio.run(asyncio.wait_for(_capture(tmp_path, False), 60))
    parser = StreamParser()
    events = parser.feed(data)
    parser.finish()
    pages: dict[tuple[str, int], bytes] = {}
    for event in events:
        if isinstance(event, RamPage):
            pages[event.block, event.offset] = bytes(event.data)
        elif isinstance(event, RamZeroPage):
            pages[event.block, event.offset] = bytes([event.fill]) * PAGE_SIZE
    gpas = {"pc.ram": 0, "pc.bios": 0xFFFC0000, "pc.rom": 0xC0000}
    blocks = [RamBlock(b.name, b.used_length, gpas.get(b.name, 0)) for b in parser.blocks.values()]
    with (tmp_path / "ram").open("r+b") as ram:
        for (block, offset), page in pages.items():
            if block == "pc.ram":
                ram.seek(offset)
                ram.write(page)
    stream = list(
        failover_stream(
            machine_type=next(e for e in events if isinstance(e, Configuration)).machine_type,
            ram_section_id=parser.ram_section_id or 0,
            blocks=blocks,
            device_state=next(e for e in events if isinstance(e, DeviceState)).data,
            vmdesc=next(e for e in events if isinstance(e, VmDescription)).json,
            pages=[FailoverPage(b, o, p) for (b, o), p in pages.items() if b != "pc.ram"],
        )
    )
    result = asyncio.run(asyncio.wait_for(_load_failover_stream(tmp_path, stream), 60))
    # The source never ran, so the run state carried in the device state (global state)
    # is "prelaunch"; a load error would leave the migration "failed".
    assert result == {"migrate": "completed", "status": "prelaunch"}
