"""Manual failover: start QEMU on the standby from the committed replica and resume the guest.

Order (docs/failover.md)::

    hand_over()        open checkpoint discarded, pending apply done, device state and
                       non-shared pages copied, replica marked handed-over
    start QEMU -S      same devices as the primary; main RAM = the replica's file
                       (memory-backend-file,id=pc.ram,share=on); -incoming defer
    x-ignore-shared    QMP migrate-set-capabilities (the stream's configuration section
                       lists it too; QEMU 7.2 refuses a mismatch)
    migrate-incoming   fd:NAME of a socketpair passed with getfd; Kemari writes the
                       synthesized stream: header, configuration, RAM block list,
                       non-shared blocks' pages, device state, EOF, vmdesc
    wait "completed"   query-migrate on the incoming side
    cont               the guest runs from the committed epoch
    x-ignore-shared    off again: this QEMU is the primary now, and a later protection
                       must send all of its RAM

Invariant: the guest runs only from a committed epoch.  Nothing here writes the shared
RAM file; QEMU maps it and, with -incoming, writes nothing into it before it loads the
stream (hw/core/loader.c rom_reset skips ROMs in the inmigrate run state).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from pathlib import Path

from kemari.errors import FailoverError, QemuError, ReplicaError
from kemari.qemu.cmdline import RAM_BACKEND_ID, IncomingDefer, MachineSpec, MemoryFile
from kemari.qemu.machine import QemuMachine
from kemari.replica.applier import FailoverImage, ReplicaApplier
from kemari.stream.format import CAPABILITY_IGNORE_SHARED

FD_NAME = "kemari_failover"
DEFAULT_LOAD_TIMEOUT_S = 30.0
_POLL_S = 0.002
_WRITE_BATCH_BYTES = 1 << 20
_MIB = 1 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class FailoverTimings:
    """Where the time between the failover command and the running guest went (seconds)."""

    hand_over_s: float  # discard/apply, copy device state and non-shared pages, mark
    start_s: float  # QEMU exec → QMP connected
    load_s: float  # migrate-incoming → incoming migration completed
    resume_s: float  # cont → running
    total_s: float  # fail_over() called → guest running


@dataclasses.dataclass(frozen=True)
class FailoverResult:
    """The running failover QEMU and the stream epoch (0 = initial sync) it resumed from."""

    machine: QemuMachine
    epoch: int
    committed_at: float  # time.time() of that epoch's commit on the standby
    timings: FailoverTimings


def _check_spec(spec: MachineSpec, block: str, size: int | None) -> None:
    """Refuse a spec that cannot map the replica's main RAM block or brings its own RAM."""
    if spec.memory_file is not None or spec.incoming is not None:
        raise FailoverError("the VM spec for failover must not set memory_file or incoming")
    if block != RAM_BACKEND_ID or size is None:
        raise FailoverError(
            f"the replica has no RAM block {RAM_BACKEND_ID!r} (QEMU's backend id) to map"
        )
    if spec.memory_mib * _MIB != size:
        raise FailoverError(
            f"the VM spec has {spec.memory_mib} MiB of RAM but the replica's {block} "
            f"holds {size / _MIB:g} MiB"
        )


def failover_spec(spec: MachineSpec, image: FailoverImage) -> MachineSpec:
    """``spec`` (this host's devices) turned into the failover QEMU's: replica RAM, -incoming."""
    _check_spec(spec, image.main_block, image.main_block_size)
    return dataclasses.replace(
        spec,
        memory_file=MemoryFile(image.ram_path, share=True),
        incoming=IncomingDefer(),
        start_paused=True,
    )


async def fail_over(
    applier: ReplicaApplier,
    spec: MachineSpec,
    binary: Path,
    *,
    load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
) -> FailoverResult:
    """Start QEMU from ``applier``'s committed replica and resume the guest.

    ``spec`` describes the VM with this host's disks and NICs (same devices, in the same
    order, as the primary's); its RAM and incoming settings are filled in here.
    Raises :class:`FailoverError` when there is no committed replica (the initial sync
    has not completed: nothing to resume) or when the spec does not fit it; in both
    cases the replica is left untouched.
    """
    started = time.monotonic()
    info = applier.stream_info
    if info is None:
        raise FailoverError(
            "refusing to fail over: no committed replica (the initial sync has not "
            "completed, so there is no state to resume the guest from)"
        )
    sizes = {block.name: block.used_length for block in info.blocks}
    # Checked before hand_over(), so a wrong spec leaves the replica untouched.
    _check_spec(spec, RAM_BACKEND_ID, sizes.get(RAM_BACKEND_ID))
    try:
        image = applier.hand_over()
    except ReplicaError as exc:
        raise FailoverError(f"refusing to fail over: {exc}") from exc
    handed_over = time.monotonic()
    result = await start_from_image(image, spec, binary, load_timeout_s=load_timeout_s)
    timings = dataclasses.replace(
        result.timings,
        hand_over_s=handed_over - started,
        total_s=handed_over - started + result.timings.total_s,
    )
    return dataclasses.replace(result, timings=timings)


async def start_from_image(
    image: FailoverImage,
    spec: MachineSpec,
    binary: Path,
    *,
    load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
) -> FailoverResult:
    """Start a failover QEMU from a handed-over image (a retry after a failed start may reuse it).

    QEMU is shut down again on any failure: the guest never runs from a partial load.
    """
    started = time.monotonic()
    machine = QemuMachine(failover_spec(spec, image), binary)
    try:
        await machine.start()
    except QemuError as exc:
        raise FailoverError(f"the failover QEMU did not start: {exc}") from exc
    try:
        connected = time.monotonic()
        await machine.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": CAPABILITY_IGNORE_SHARED, "state": True}]},
        )
        await _load_stream(machine, image, load_timeout_s)
        loaded = time.monotonic()
        await machine.execute("cont")
        status = await machine.query_status()
        if not status.running:
            raise FailoverError(f"the failover QEMU did not resume (status {status.status})")
        running = time.monotonic()
        # The capability stays set otherwise, and a later protection of this QEMU (it is
        # the primary now) would then not send its RAM to the new standby.
        await machine.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": CAPABILITY_IGNORE_SHARED, "state": False}]},
        )
    except BaseException as exc:
        await machine.shutdown()
        if isinstance(exc, QemuError) and not isinstance(exc, FailoverError):
            raise FailoverError(f"failover QEMU failed: {exc}") from exc
        raise
    timings = FailoverTimings(
        hand_over_s=0.0,
        start_s=connected - started,
        load_s=loaded - connected,
        resume_s=running - loaded,
        total_s=running - started,
    )
    return FailoverResult(machine, image.epoch, image.committed_at, timings)


async def _load_stream(machine: QemuMachine, image: FailoverImage, timeout_s: float) -> None:
    """Feed the synthesized stream through a socketpair and wait for the load to complete."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.closing(ours):
        try:
            await machine.pass_fd(FD_NAME, theirs.fileno())
        finally:
            # QEMU holds its own duplicate now (or never got one).
            theirs.close()
        await machine.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
        ours.setblocking(False)
        writer = asyncio.create_task(_write_stream(ours, image), name="failover-stream")
        try:
            async with asyncio.timeout(timeout_s):
                await _wait_incoming_completed(machine, writer)
        except TimeoutError as exc:
            raise FailoverError(
                f"the failover QEMU did not load the replica within {timeout_s:g} s"
            ) from exc
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await writer


async def _write_stream(sock: socket.socket, image: FailoverImage) -> None:
    loop = asyncio.get_running_loop()
    batch: list[bytes | memoryview] = []
    size = 0
    for piece in image.stream():
        batch.append(piece)
        size += len(piece)
        if size >= _WRITE_BATCH_BYTES:
            await loop.sock_sendall(sock, b"".join(batch))
            batch, size = [], 0
    if batch:
        await loop.sock_sendall(sock, b"".join(batch))


async def _wait_incoming_completed(machine: QemuMachine, writer: asyncio.Task[None]) -> None:
    while True:
        info = await machine.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            tail = " | ".join(machine.output_tail()[-5:])
            raise FailoverError(f"the failover QEMU refused the replica's stream: {tail}")
        if writer.done() and writer.exception() is not None:
            raise FailoverError(f"writing the stream to QEMU failed: {writer.exception()}")
        await asyncio.sleep(_POLL_S)
