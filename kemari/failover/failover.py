"""Manual failover: start QEMU on the standby from the committed replica and resume the guest.

This module is the "QEMU from the replica" part of a failover: :func:`hand_over_replica`,
:func:`load_replica`, :func:`resume_guest` (:func:`fail_over` runs the three).  The
agent's whole order, with the receiver, the held frames and the disks around these
steps, is kemari.roles.failover.

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
from collections.abc import AsyncIterator
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


def hand_over_replica(applier: ReplicaApplier, spec: MachineSpec) -> FailoverImage:
    """The committed replica, handed over for a failover QEMU (after the checks).

    Raises :class:`FailoverError` when there is no committed replica (the initial sync
    has not completed: nothing to resume) or when ``spec`` does not fit it; in both
    cases the replica is left untouched.
    """
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
        return applier.hand_over()
    except ReplicaError as exc:
        raise FailoverError(f"refusing to fail over: {exc}") from exc


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
    :func:`hand_over_replica`, then :func:`start_from_image`.
    """
    started = time.monotonic()
    image = hand_over_replica(applier, spec)
    handed_over = time.monotonic()
    result = await start_from_image(image, spec, binary, load_timeout_s=load_timeout_s)
    return with_hand_over_time(result, handed_over - started)


def with_hand_over_time(result: FailoverResult, hand_over_s: float) -> FailoverResult:
    """``result`` with the hand-over's time added to its timings."""
    timings = dataclasses.replace(
        result.timings, hand_over_s=hand_over_s, total_s=hand_over_s + result.timings.total_s
    )
    return dataclasses.replace(result, timings=timings)


@dataclasses.dataclass(frozen=True)
class LoadedMachine:
    """A failover QEMU, paused, with the replica loaded (:func:`load_replica`)."""

    machine: QemuMachine
    image: FailoverImage
    started: float  # time.monotonic() before QEMU's exec
    connected: float  # QMP connected
    loaded: float  # incoming migration completed


async def start_from_image(
    image: FailoverImage,
    spec: MachineSpec,
    binary: Path,
    *,
    load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
) -> FailoverResult:
    """Start a failover QEMU from a handed-over image (a retry after a failed start may reuse it).

    :func:`load_replica`, then :func:`resume_guest`.  QEMU is shut down again on any
    failure: the guest never runs from a partial load.
    """
    loaded = await load_replica(image, spec, binary, load_timeout_s=load_timeout_s)
    return await resume_guest(loaded)


async def load_replica(
    image: FailoverImage,
    spec: MachineSpec,
    binary: Path,
    *,
    load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
) -> LoadedMachine:
    """QEMU started paused on the replica's RAM (-S, -incoming defer), x-ignore-shared on,
    the synthesized stream loaded.  The guest does not run yet; QEMU is shut down on any
    failure."""
    started = time.monotonic()
    machine = QemuMachine(failover_spec(spec, image), binary)
    try:
        await machine.start()
    except QemuError as exc:
        raise FailoverError(f"the failover QEMU did not start: {exc}") from exc
    async with _shut_down_on_failure(machine):
        connected = time.monotonic()
        await machine.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": CAPABILITY_IGNORE_SHARED, "state": True}]},
        )
        await _load_stream(machine, image, load_timeout_s)
    return LoadedMachine(machine, image, started, connected, time.monotonic())


async def resume_guest(loaded: LoadedMachine) -> FailoverResult:
    """``cont``: the guest runs from the committed epoch; then x-ignore-shared off again.
    QEMU is shut down on any failure."""
    machine = loaded.machine
    async with _shut_down_on_failure(machine):
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
    timings = FailoverTimings(
        hand_over_s=0.0,
        start_s=loaded.connected - loaded.started,
        load_s=loaded.loaded - loaded.connected,
        resume_s=running - loaded.loaded,
        total_s=running - loaded.started,
    )
    return FailoverResult(machine, loaded.image.epoch, loaded.image.committed_at, timings)


@contextlib.asynccontextmanager
async def _shut_down_on_failure(machine: QemuMachine) -> AsyncIterator[None]:
    """Shut ``machine`` down when the block fails; a QEMU error becomes a FailoverError."""
    try:
        yield
    except BaseException as exc:
        await machine.shutdown()
        if isinstance(exc, QemuError) and not isinstance(exc, FailoverError):
            raise FailoverError(f"failover QEMU failed: {exc}") from exc
        raise


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
