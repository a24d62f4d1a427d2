"""A bare QEMU for the stream tests: 64 MiB ``pc``, RAM in a shared file, QMP only.

The stream tests talk to QEMU's migration code directly (captures, incoming loads),
without Kemari's supervision in between, so they start QEMU themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from kemari.qemu.binary import qemu_binary
from kemari.testbed.wait import async_wait_for

MEMORY = "64M"


@contextlib.asynccontextmanager
async def bare_qemu(
    workdir: Path, name: str, ram_file: Path, *, incoming: bool = False
) -> AsyncIterator[QMPClient]:
    """Start QEMU paused with ``pc.ram`` in ``ram_file``; yields a connected QMP client."""
    qmp_path = workdir / f"qmp-{name}.sock"
    argv = [str(qemu_binary("tcg").path), "-accel", "tcg", "-nodefaults", "-display", "none"]
    argv += ["-S", "-m", MEMORY, "-machine", "pc,memory-backend=pc.ram"]
    argv += ["-object", f"memory-backend-file,id=pc.ram,size={MEMORY},mem-path={ram_file},share=on"]
    argv += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    if incoming:
        argv += ["-incoming", "defer"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    qmp = QMPClient(name)
    try:

        def listening() -> bool:
            assert proc.poll() is None, f"QEMU exited ({proc.returncode}): {argv}"
            return qmp_path.exists()

        await async_wait_for(listening, "QEMU's QMP socket", 10)
        await qmp.connect(str(qmp_path))
        yield qmp
    finally:
        await qmp.disconnect()
        proc.kill()
        proc.wait(timeout=10)


async def wait_migration(qmp: QMPClient, timeout: float = 60.0) -> dict[str, Any]:
    """Poll ``query-migrate`` until the migration completed or failed."""

    async def finished() -> dict[str, Any] | None:
        info = await qmp.execute("query-migrate")
        assert isinstance(info, dict)
        return info if info.get("status") in ("completed", "failed") else None

    return await async_wait_for(finished, "the migration to complete or fail", timeout)


async def load_stream(
    qmp: QMPClient, workdir: Path, stream: Iterable[bytes | memoryview]
) -> dict[str, Any]:
    """With x-ignore-shared, feed ``stream`` to an ``incoming`` QEMU; the final migrate info."""
    incoming = workdir / "incoming.sock"
    caps = [{"capability": "x-ignore-shared", "state": True}]
    await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
    await qmp.execute("migrate-incoming", {"uri": f"unix:{incoming}"})
    _, writer = await asyncio.open_unix_connection(str(incoming))
    with contextlib.closing(writer):
        for chunk in stream:
            writer.write(chunk)
        await writer.drain()
        return await wait_migration(qmp)
