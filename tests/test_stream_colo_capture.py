"""The stream parser on a live x-colo primary (QEMU 7.2, TCG): initial sync + one checkpoint.

Kemari's receiver role is played in-process: it answers CHECKPOINT_READY after the
initial vmdesc, CHECKPOINT_REPLY to the request and VMSTATE_RECEIVED to the device
state, then withholds VMSTATE_LOADED so the primary stays stopped inside the checkpoint
(stock 7.2 under TCG may hold the BQL forever from this point on, so QMP is not asked
anything after the checkpoint; see issue 3).  No guest kernel: only firmware runs.
"""

import asyncio
import contextlib
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from kemari.qemu.binary import qemu_binary
from kemari.stream import (
    ColoEvent,
    ColoMessage,
    Command,
    DeviceState,
    LiveStateEnd,
    ParserState,
    RamPage,
    RamZeroPage,
    SectionEnd,
    StreamEvent,
    StreamParser,
    VmDescription,
    encode_colo_message,
)
from kemari.stream.format import SectionType, VmCommand

pytestmark = pytest.mark.guest


async def _protect_once(tmp_path: Path) -> list[StreamEvent]:
    qmp_path = tmp_path / "qmp.sock"
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
                for parsed in parser.feed(data):
                    # Page views pin their input chunk; the test only keeps page metadata.
                    event = (
                        RamZeroPage(parsed.block, parsed.offset, -1)
                        if isinstance(parsed, RamPage)
                        else parsed
                    )
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
    argv = [str(qemu_binary("tcg").path), "-accel", "tcg", "-nodefaults", "-display", "none"]
    argv += ["-S", "-m", "64M", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    qmp = QMPClient("primary")
    try:
        for _ in range(200):
            if qmp_path.exists():
                break
            await asyncio.sleep(0.05)
        await qmp.connect(str(qmp_path))
        caps = [{"capability": "x-colo", "state": True}]
        await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        await qmp.execute("migrate-set-parameters", {"x-checkpoint-delay": 100})
        await qmp.execute("migrate", {"uri": f"unix:{mig_path}"})
        await checkpoint_done.wait()
    finally:
        await qmp.disconnect()
        # SIGKILL: a primary stuck in a checkpoint does not act on SIGTERM.
        proc.kill()
        proc.wait(timeout=10)
        server.close()
        await server.wait_closed()
    assert parser.state is ParserState.COLO_IDLE
    return events


def test_parser_follows_a_live_colo_primary_through_a_checkpoint(tmp_path: Path) -> None:
    events = asyncio.run(asyncio.wait_for(_protect_once(tmp_path), 60))
    assert Command(VmCommand.ENABLE_COLO) in events
    initial_end = next(i for i, e in enumerate(events) if isinstance(e, VmDescription))
    initial_device = events[initial_end - 1]
    assert isinstance(initial_device, DeviceState)

    checkpoint = [e for e in events[initial_end + 1 :] if not isinstance(e, RamZeroPage)]
    assert checkpoint[:2] == [
        ColoEvent(ColoMessage.CHECKPOINT_REQUEST),
        ColoEvent(ColoMessage.VMSTATE_SEND),
    ]
    assert checkpoint[2:4] == [SectionEnd(SectionType.END, 2), LiveStateEnd()]
    size_event, device = checkpoint[4:]
    assert isinstance(size_event, ColoEvent) and isinstance(device, DeviceState)
    assert size_event.message is ColoMessage.VMSTATE_SIZE
    assert size_event.value == len(device.data) + 1
    # Same devices in the same order as the initial state: the first FULL section header
    # (type, section id, idstr, instance, version) is identical.
    header_len = 1 + 4 + 1 + device.data[5] + 8
    assert device.data[:header_len] == initial_device.data[:header_len]
