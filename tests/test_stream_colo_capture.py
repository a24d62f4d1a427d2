"""A live x-colo primary (QEMU 7.2, TCG): parse initial sync + one checkpoint, then fail over.

Kemari's receiver role is played in-process: it answers CHECKPOINT_READY after the
initial vmdesc, CHECKPOINT_REPLY to the request and VMSTATE_RECEIVED to the device
state, then withholds VMSTATE_LOADED so the primary stays stopped inside the checkpoint
(stock 7.2 under TCG may hold the BQL forever from this point on, so QMP is not asked
anything after the checkpoint; see issue 3).  No guest kernel: only firmware runs.
The failover test then builds a minimal replica from the events and has a fresh QEMU
(x-ignore-shared, RAM file shared) load kemari.stream's failover stream and continue.
"""

import asyncio
import contextlib
from pathlib import Path

import pytest
from bare_qemu import bare_qemu, load_stream
from stream_model import normalize

from kemari.stream import (
    ColoEvent,
    ColoMessage,
    Command,
    Configuration,
    DeviceState,
    FailoverPage,
    LiveStateEnd,
    ParserState,
    RamBlock,
    RamBlockList,
    RamPageRun,
    SectionEnd,
    StreamEvent,
    StreamParser,
    VmDescription,
    encode_colo_message,
    failover_stream,
)
from kemari.stream.format import PAGE_SIZE, SectionType, VmCommand

pytestmark = pytest.mark.guest


async def _protect_once(tmp_path: Path) -> list[StreamEvent]:
    mig_path = tmp_path / "mig.sock"
    parser = StreamParser()
    events: list[StreamEvent] = []
    checkpoint_done = asyncio.Event()

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer):
            while not checkpoint_done.is_set():
                data = await reader.read(1 << 16)
                if not data:
                    return
                for event in parser.feed(data):
                    events.append(event)
                    if isinstance(event, VmDescription):
                        writer.write(encode_colo_message(ColoMessage.CHECKPOINT_READY))
                    elif event == ColoEvent(ColoMessage.CHECKPOINT_REQUEST):
                        writer.write(encode_colo_message(ColoMessage.CHECKPOINT_REPLY))
                    elif isinstance(event, DeviceState) and any(
                        isinstance(e, LiveStateEnd) for e in events
                    ):
                        writer.write(encode_colo_message(ColoMessage.VMSTATE_RECEIVED))
                        checkpoint_done.set()
                await writer.drain()
            await writer.drain()
            # Hold the connection open until the primary is inspected and killed.
            await reader.read(1)

    server = await asyncio.start_unix_server(receive, str(mig_path))
    try:
        # SIGKILL on the way out (bare_qemu): a primary stuck in a checkpoint does not act
        # on SIGTERM.
        async with bare_qemu(tmp_path, "primary", tmp_path / "primary.ram") as qmp:
            caps = [{"capability": "x-colo", "state": True}]
            await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
            await qmp.execute("migrate-set-parameters", {"x-checkpoint-delay": 100})
            await qmp.execute("migrate", {"uri": f"unix:{mig_path}"})
            await checkpoint_done.wait()
    finally:
        server.close()
        await server.wait_closed()
    assert parser.state is ParserState.COLO_IDLE
    return events


@pytest.fixture(scope="module")
def colo_events(tmp_path_factory: pytest.TempPathFactory) -> list[StreamEvent]:
    """Events of one real x-colo primary: initial sync and one received checkpoint."""
    tmp_path = tmp_path_factory.mktemp("colo")
    return asyncio.run(asyncio.wait_for(_protect_once(tmp_path), 60))


def test_parser_follows_a_live_colo_primary_through_a_checkpoint(
    colo_events: list[StreamEvent],
) -> None:
    events = colo_events
    assert Command(VmCommand.ENABLE_COLO) in events
    initial_end = next(i for i, e in enumerate(events) if isinstance(e, VmDescription))
    initial_device = events[initial_end - 1]
    assert isinstance(initial_device, DeviceState)

    checkpoint = [e for e in events[initial_end + 1 :] if not isinstance(e, RamPageRun)]
    assert checkpoint[:2] == [
        ColoEvent(ColoMessage.CHECKPOINT_REQUEST),
        ColoEvent(ColoMessage.VMSTATE_SEND),
    ]
    # The RAM section keeps the id it had in the initial sync (which id depends on the
    # devices the build registers before RAM).
    ram_section = next(e for e in events if isinstance(e, RamBlockList)).section_id
    assert checkpoint[2:4] == [SectionEnd(SectionType.END, ram_section), LiveStateEnd()]
    size_event, device = checkpoint[4:]
    assert isinstance(size_event, ColoEvent) and isinstance(device, DeviceState)
    assert size_event.message is ColoMessage.VMSTATE_SIZE
    assert size_event.value == len(device.data) + 1
    # Same devices in the same order as the initial state: the first FULL section header
    # (type, section id, idstr, instance, version) is identical.
    header_len = 1 + 4 + 1 + device.data[5] + 8
    assert device.data[:header_len] == initial_device.data[:header_len]


async def _fail_over(tmp_path: Path, ram_file: Path, stream: list[bytes | memoryview]) -> list[str]:
    """Fresh QEMU on the replica's RAM file: load ``stream``, then continue the guest."""
    async with bare_qemu(tmp_path, "failover", ram_file, incoming=True) as qmp:
        info = await load_stream(qmp, tmp_path, stream)
        await qmp.execute("cont")
        status = await qmp.execute("query-status")
        assert isinstance(status, dict)
        return [str(info["status"]), str(status["status"])]


def test_fresh_qemu_takes_over_from_the_checkpoint(
    colo_events: list[StreamEvent], tmp_path: Path
) -> None:
    # A minimal replica: pc.ram in a file the failover QEMU maps shared, every other
    # block (firmware ROMs) in memory and re-sent as pages; the device state is the
    # checkpoint's buffer, the vmdesc the initial one.
    ram_file = tmp_path / "pc.ram"
    blocks = next(e for e in colo_events if isinstance(e, RamBlockList))
    ram_file.write_bytes(b"")
    other: dict[tuple[str, int], bytes] = {}
    with ram_file.open("r+b") as ram:
        ram.truncate(64 << 20)
        for record in normalize(colo_events):
            if isinstance(record, tuple):
                block, offset = record[1], record[2]
                data = record[3] if record[0] == "page" else bytes(PAGE_SIZE)
                if block == "pc.ram":
                    ram.seek(offset)
                    ram.write(data)
                else:
                    other[block, offset] = data
    devices = [e for e in colo_events if isinstance(e, DeviceState)]
    assert len(devices) == 2  # initial + checkpoint
    stream = list(
        failover_stream(
            machine_type=next(e for e in colo_events if isinstance(e, Configuration)).machine_type,
            ram_section_id=blocks.section_id,
            # Only shared blocks' GPAs are compared by the loader; pc.ram's region is at 0.
            blocks=[RamBlock(b.name, b.used_length, 0) for b in blocks.blocks],
            device_state=devices[-1].data,
            vmdesc=next(e for e in colo_events if isinstance(e, VmDescription)).json,
            pages=[FailoverPage(b, o, d) for (b, o), d in other.items()],
        )
    )
    result = asyncio.run(asyncio.wait_for(_fail_over(tmp_path, ram_file, stream), 60))
    assert result == ["completed", "running"]
