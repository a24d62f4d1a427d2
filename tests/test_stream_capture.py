"""The stream parser against real QEMU 7.2 output: a paused TCG machine migrated to a file.

No guest boots (``-S``, no kernel); the capture is a plain precopy stream, which has the
same grammar as the x-colo initial migration minus the ENABLE_COLO command.
"""

import asyncio
import json
from pathlib import Path

import pytest
from bare_qemu import bare_qemu, load_stream, wait_migration
from stream_model import normalize

from kemari.stream import (
    Configuration,
    DeviceState,
    FailoverPage,
    ParserState,
    RamBlock,
    RamBlockList,
    RamPageRun,
    StreamParser,
    VmDescription,
    failover_stream,
)
from kemari.stream.format import PAGE_SIZE

pytestmark = pytest.mark.guest
MEMORY = 64 << 20


async def _capture(tmp_path: Path, ignore_shared: bool) -> bytes:
    out = tmp_path / "stream.bin"
    async with bare_qemu(tmp_path, "capture", tmp_path / "ram") as qmp:
        caps = [{"capability": "x-ignore-shared", "state": ignore_shared}]
        await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        await qmp.execute("migrate", {"uri": f"exec:cat > {out}"})
        info = await wait_migration(qmp)
        assert info["status"] == "completed", info
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

    touched = {e.block for e in events if isinstance(e, RamPageRun)}
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
    assert normalize(again) == normalize(events)


async def _load_failover_stream(
    tmp_path: Path, stream: list[bytes | memoryview]
) -> dict[str, object]:
    """Start a fresh QEMU on the same shared RAM file and feed it ``stream``."""
    async with bare_qemu(tmp_path, "dst", tmp_path / "ram", incoming=True) as qmp:
        info = await load_stream(qmp, tmp_path, stream)
        status = await qmp.execute("query-status")
        assert isinstance(status, dict)
        return {"migrate": info["status"], "status": status["status"]}


def test_fresh_qemu_loads_the_failover_stream(tmp_path: Path) -> None:
    # Capture a precopy stream (plain, pages of every block), keep what a replica keeps,
    # and let a fresh QEMU with x-ignore-shared load the synthesized failover stream.
    data = asyncio.run(asyncio.wait_for(_capture(tmp_path, False), 60))
    parser = StreamParser()
    events = parser.feed(data)
    parser.finish()
    pages: dict[tuple[str, int], bytes] = {}
    for record in normalize(events):
        if isinstance(record, tuple):
            pages[record[1], record[2]] = record[3] if record[0] == "page" else bytes(PAGE_SIZE)
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
