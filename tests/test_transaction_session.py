"""Tests of the ft-transaction session: transaction rules (pure), URIs, and real TCP sessions."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kemari.checkpoint.sender import TransactionSender
from kemari.errors import TransactionError
from kemari.stream.format import PAGE_SIZE
from kemari.transaction.session import (
    Committed,
    Discarded,
    FrameReader,
    FrameWriter,
    Identity,
    PeerDisconnected,
    PeerRefused,
    PrimarySession,
    SessionEnded,
    SessionFailed,
    StandbySession,
    TransactionState,
    TransactionTracker,
    refuse_busy,
)
from kemari.transaction.transport import (
    PRE_HANDSHAKE_BYTES,
    Listener,
    TcpAddress,
    TcpTransport,
    Transport,
    TransportClosed,
    connect,
    parse_uri,
)
from kemari.transaction.wire import (
    Abort,
    Begin,
    Commit,
    CommitAck,
    DeviceState,
    Goodbye,
    Heartbeat,
    HeartbeatAck,
    HelloAck,
    RamBlock,
    RamBlocks,
    RamPages,
    RefuseReason,
    Role,
    VmDescription,
    page_indices,
)

BLOCKS = (RamBlock("pc.ram", 64 * PAGE_SIZE), RamBlock("vga.vram", 16 * PAGE_SIZE))
PAGE = b"\x5a" * PAGE_SIZE


def _pages(epoch: int, block: int, data: list[int], zero: tuple[int, ...] = ()) -> RamPages:
    return RamPages(epoch, block, page_indices(data), page_indices(zero), PAGE * len(data))


def _initial(tracker: TransactionTracker) -> None:
    tracker.apply(Begin(0))
    tracker.apply(RamBlocks(0, BLOCKS))
    tracker.apply(_pages(0, 0, [0, 1], (2,)))
    tracker.apply(DeviceState(0, b"dev"))
    assert tracker.apply(Commit(0, 2, 1, 3)) == Committed(0, 2, 1, 3)


# --- the transaction state machine (pure) ------------------------------------------------


def test_tracker_commits_a_transaction_and_returns_to_idle():
    tracker = TransactionTracker()
    _initial(tracker)
    assert tracker.state is TransactionState.IDLE
    assert tracker.last_committed == 0
    tracker.apply(Begin(1))
    assert (tracker.state, tracker.open_epoch) == (TransactionState.IN_TRANSACTION, 1)
    tracker.apply(_pages(1, 1, [15]))
    assert tracker.commit_summary() == Commit(1, 1, 0, 0)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([_pages(0, 0, [1])], "RAM_PAGES outside a transaction"),
        ([Begin(0), Begin(1)], "BEGIN of epoch 1 while epoch 0 is still open"),
        ([Begin(0), _pages(0, 0, [1])], "RAM_PAGES before RAM_BLOCKS"),
        ([Begin(0), RamBlocks(0, BLOCKS), _pages(1, 0, [1])], "RAM_PAGES of epoch 1 inside"),
        ([Begin(0), RamBlocks(0, BLOCKS), _pages(0, 2, [1])], "names block 2"),
        ([Begin(0), RamBlocks(0, BLOCKS), _pages(0, 1, [16])], "page 16 lies outside"),
        ([Begin(0), RamBlocks(0, BLOCKS), Commit(0, 1, 0, 0)], r"announces .*\(1, 0, 0\)"),
        ([Begin(0), RamBlocks(0, BLOCKS), Commit(3, 0, 0, 0)], "COMMIT of epoch 3 inside"),
        ([Begin(0), Commit(0, 0, 0, 0)], "before any RAM_BLOCKS"),
        ([Begin(0), RamBlocks(0, BLOCKS), RamBlocks(0, BLOCKS)], "twice"),
        (
            [Begin(0), RamBlocks(0, BLOCKS), VmDescription(0, b"{}"), VmDescription(0, b"{}")],
            "VM_DESCRIPTION outside the first transaction or twice",
        ),
        ([Begin(5), Abort(5, "x"), Begin(5)], "epoch 5 does not follow epoch 5"),
        ([Abort(0, "x")], "ABORT outside a transaction"),
        ([CommitAck(0)], "unexpected COMMIT_ACK"),
        ([HeartbeatAck(0)], "unexpected HEARTBEAT_ACK"),
    ],
)
def test_tracker_rejects_rule_violations(steps, message):
    tracker = TransactionTracker()
    *valid, last = steps
    for step in valid:
        tracker.apply(step)
    state = (tracker.state, tracker.open_epoch, tracker.last_committed)
    with pytest.raises(TransactionError, match=message):
        tracker.apply(last)
    assert (tracker.state, tracker.open_epoch, tracker.last_committed) == state


def test_later_transactions_cannot_replace_the_block_table():
    tracker = TransactionTracker()
    _initial(tracker)
    tracker.apply(Begin(1))
    with pytest.raises(TransactionError, match="RAM_BLOCKS sent twice"):
        tracker.apply(RamBlocks(1, BLOCKS))


def test_abort_and_goodbye_discard_the_open_transaction():
    tracker = TransactionTracker()
    _initial(tracker)
    tracker.apply(Begin(4))
    assert tracker.apply(Abort(4, "qemu failed")) == Discarded(4, "primary aborted: qemu failed")
    tracker.apply(Begin(6))
    assert tracker.apply(Goodbye("bye")) == Discarded(6, "primary said goodbye: bye")
    assert tracker.apply(Heartbeat(1)) is None
    assert tracker.last_committed == 0
    assert tracker.discard("nothing open") is None


@given(
    st.lists(
        st.tuples(
            st.integers(1, 3),
            st.lists(st.tuples(st.integers(0, 1), st.integers(0, 15), st.booleans()), max_size=6),
            st.integers(0, 3),
            st.booleans(),
        ),
        max_size=6,
    )
)
def test_commit_summary_always_satisfies_the_tracker(transactions):
    """What a primary's tracker sums up, a standby's tracker accepts, epoch by epoch."""
    primary, standby = TransactionTracker(), TransactionTracker()
    epoch = 0
    steps: list = [Begin(0), RamBlocks(0, BLOCKS)]
    for gap, pages, device_chunks, abort in transactions:
        for block, page, zero in pages:
            steps.append(_pages(epoch, block, [] if zero else [page], (page,) if zero else ()))
        steps += [DeviceState(epoch, b"d" * (n + 1)) for n in range(device_chunks)]
        for step in steps:
            primary.apply(step)
            standby.apply(step)
        end = Abort(epoch, "test") if abort else primary.commit_summary()
        assert primary.apply(end) == standby.apply(end)
        assert standby.last_committed == primary.last_committed
        epoch += gap
        steps = [Begin(epoch)]


# --- URIs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("kemari:tcp:127.0.0.1:4444", TcpAddress("127.0.0.1", 4444)),
        ("kemari:tcp:[::1]:1", TcpAddress("::1", 1)),
        ("kemari:tcp:standby-host.example:65535", TcpAddress("standby-host.example", 65535)),
    ],
)
def test_parse_uri_accepts_ipv4_ipv6_and_names(uri, expected):
    assert parse_uri(uri) == expected
    assert str(expected) == uri


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("tcp:1.2.3.4:5", "must look like kemari:tcp"),
        ("kemari:tls:1.2.3.4:5", "'tls' is not supported"),
        ("kemari:tcp:1.2.3.4", "lacks HOST:PORT"),
        ("kemari:tcp::5", "lacks HOST:PORT"),
        ("kemari:tcp:1.2.3.4:0", "outside 1-65535"),
        ("kemari:tcp:1.2.3.4:65536", "outside 1-65535"),
        ("kemari:tcp:1.2.3.4:http", "not a number"),
        ("kemari:tcp:300.1.1.1:5", "not an IPv4 address"),
        ("kemari:tcp:::1:5", "in brackets"),
        ("kemari:tcp:[::g]:5", "not an IPv6 address"),
        ("kemari:tcp:[::1:5", "unbalanced"),
        ("kemari:tcp:bad_host:5", "not a valid host name"),
    ],
)
def test_parse_uri_errors_are_clear(uri, message):
    with pytest.raises(TransactionError, match=message):
        parse_uri(uri)


def test_listener_may_use_port_zero():
    assert parse_uri("kemari:tcp:127.0.0.1:0", allow_port_zero=True).port == 0


# --- real TCP sessions on 127.0.0.1 ------------------------------------------------------

DIGEST = bytes(range(32))
STANDBY = Identity("vm1", DIGEST, ("zero-pages", "heartbeat"))
PRIMARY = Identity("vm1", DIGEST, ("heartbeat", "future-thing"))


async def _pair(
    standby_side: Callable[[Transport], Awaitable[object]],
    primary_side: Callable[[Transport], Awaitable[object]],
    *,
    handshake: bool = True,
) -> tuple[object, object]:
    """Run both ends over a real loopback TCP connection; return (standby, primary) results.

    ``handshake=False``: the ends exchange raw bytes, not a session, so the listener's
    pre-handshake byte bound is off."""
    listener = Listener(
        "kemari:tcp:127.0.0.1:0", pre_handshake_bytes=PRE_HANDSHAKE_BYTES if handshake else None
    )
    await listener.start()
    try:

        async def standby() -> object:
            transport = await listener.accept()
            try:
                return await standby_side(transport)
            finally:
                await transport.close()

        async def primary() -> object:
            transport = await connect(str(listener.bound), timeout=5)
            try:
                return await primary_side(transport)
            finally:
                await transport.close()

        results = await asyncio.gather(standby(), primary(), return_exceptions=True)
    finally:
        await listener.close()
    return results[0], results[1]


def test_handshake_agrees_on_shared_capabilities():
    async def standby(transport: Transport) -> StandbySession:
        return await StandbySession.handshake(transport, STANDBY, timeout=5)

    async def primary(transport: Transport) -> PrimarySession:
        return await PrimarySession.handshake(transport, PRIMARY, timeout=5)

    standby_session, primary_session = asyncio.run(_pair(standby, primary))
    assert isinstance(standby_session, StandbySession)
    assert isinstance(primary_session, PrimarySession)
    assert standby_session.capabilities == primary_session.capabilities == ("heartbeat",)
    assert standby_session.primary.vm_name == "vm1"
    assert primary_session.standby.config_digest == DIGEST


def test_config_digest_mismatch_is_refused_on_both_sides():
    async def standby(transport: Transport) -> None:
        await StandbySession.handshake(transport, STANDBY, timeout=5)

    async def primary(transport: Transport) -> None:
        other = Identity("vm1", bytes(32), ())
        await PrimarySession.handshake(transport, other, timeout=5)

    standby_error, primary_error = asyncio.run(_pair(standby, primary))
    assert isinstance(standby_error, TransactionError)
    assert "refused primary" in str(standby_error)
    assert "VM config of 'vm1' differs" in str(standby_error)
    assert isinstance(primary_error, PeerRefused)
    assert primary_error.reason is RefuseReason.CONFIG_DIGEST
    assert "standby refused the primary (CONFIG_DIGEST): VM config of 'vm1' differs" in str(
        primary_error
    )


def test_primary_checks_the_standby_acknowledgement():
    async def lying_standby(transport: Transport) -> None:
        await FrameReader(transport).receive()
        ack = HelloAck(Role.STANDBY, "vm1", bytes(32), ())
        await FrameWriter(transport).send(ack)
        await transport.read_some(1)

    async def primary(transport: Transport) -> None:
        await PrimarySession.handshake(transport, PRIMARY, timeout=5)

    _, primary_error = asyncio.run(_pair(lying_standby, primary))
    assert isinstance(primary_error, TransactionError)
    assert "protects VM 'vm1' with another config" in str(primary_error)


def test_wrong_vm_name_is_refused():
    async def standby(transport: Transport) -> None:
        await StandbySession.handshake(transport, STANDBY, timeout=5)

    async def primary(transport: Transport) -> None:
        await PrimarySession.handshake(transport, Identity("vm2", DIGEST), timeout=5)

    _, primary_error = asyncio.run(_pair(standby, primary))
    assert isinstance(primary_error, PeerRefused)
    assert primary_error.reason is RefuseReason.VM_NAME


def test_heartbeat_measures_a_round_trip():
    async def standby(transport: Transport) -> object:
        session = await StandbySession.handshake(transport, STANDBY, timeout=5)
        return await session.receive()

    async def primary(transport: Transport) -> tuple[float, float]:
        session = await PrimarySession.handshake(transport, PRIMARY, timeout=5)
        rtts = (await session.heartbeat(timeout=5), await session.heartbeat(timeout=5))
        await session.close("bye")
        return rtts

    ended, rtts = asyncio.run(_pair(standby, primary))
    assert ended == SessionEnded("bye", None)
    assert all(0 < rtt < 5 for rtt in rtts)


def test_busy_standby_refuses_a_second_primary():
    async def standby(transport: Transport) -> None:
        await refuse_busy(transport, "already protecting vm1 for 10.0.0.1", timeout=5)

    async def primary(transport: Transport) -> None:
        await PrimarySession.handshake(transport, PRIMARY, timeout=5)

    standby_result, primary_error = asyncio.run(_pair(standby, primary))
    assert standby_result is None
    assert isinstance(primary_error, PeerRefused)
    assert primary_error.reason is RefuseReason.BUSY
    assert "already protecting vm1" in str(primary_error)


def test_many_pages_round_trip_in_one_transaction():
    block = RamBlock("pc.ram", 4096 * PAGE_SIZE)
    memory = os.urandom(len(range(0, 4096, 2)) * PAGE_SIZE)
    indices = list(range(0, 4096, 2))

    async def standby(transport: Transport) -> tuple[bytearray, list[object]]:
        session = await StandbySession.handshake(transport, STANDBY, timeout=5)
        replica = bytearray(block.size)
        events: list[object] = []
        while True:
            event = await session.receive()
            events.append(type(event).__name__)
            if isinstance(event, RamPages):
                for n, page in enumerate(event.data_pages):
                    replica[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = event.page(n)
                for page in event.zero_pages:
                    replica[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
            if isinstance(event, Committed):
                events.append(event)
                await session.acknowledge(event)
            if isinstance(event, SessionEnded):
                return replica, events

    async def primary(transport: Transport) -> Committed:
        session = await PrimarySession.handshake(transport, PRIMARY, timeout=5)
        await session.send(Begin(0))
        await session.send(RamBlocks(0, (block,)))
        for start in range(0, len(indices), 500):
            batch = indices[start : start + 500]
            data = memory[start * PAGE_SIZE : (start + len(batch)) * PAGE_SIZE]
            await session.send(RamPages(0, 0, page_indices(batch), page_indices([1]), data))
        await session.send(DeviceState(0, b"device-state"))
        committed = await session.commit(timeout=5)
        await session.close("done")
        return committed

    (replica, events), committed = asyncio.run(_pair(standby, primary))
    assert committed == Committed(0, len(indices), 5, 12)
    assert committed in events
    assert events[-1] == "SessionEnded"
    for n, page in enumerate(indices):
        assert (
            replica[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
            == memory[n * PAGE_SIZE : (n + 1) * PAGE_SIZE]
        )


def test_primary_disconnect_mid_transaction_discards_it():
    async def standby(transport: Transport) -> tuple[list[object], BaseException]:
        session = await StandbySession.handshake(transport, STANDBY, timeout=5)
        committed: list[object] = []
        while True:
            try:
                event = await session.receive()
            except PeerDisconnected as exc:
                return committed, exc
            if isinstance(event, Committed):
                committed.append(event.epoch)
                await session.acknowledge(event)

    async def primary(transport: Transport) -> None:
        session = await PrimarySession.handshake(transport, PRIMARY, timeout=5)
        await session.send(Begin(0))
        await session.send(RamBlocks(0, BLOCKS))
        await session.commit(timeout=5)
        await session.send(Begin(1))
        await session.send(_pages(1, 0, [3, 4]))
        # The primary host dies here: no COMMIT, no GOODBYE.

    (committed, error), primary_result = asyncio.run(_pair(standby, primary))
    assert primary_result is None
    assert committed == [0]
    assert isinstance(error, PeerDisconnected)
    assert error.discarded is not None
    assert error.discarded.epoch == 1
    assert "epoch 1 discarded" in str(error)


def test_standby_disconnect_before_commit_ack_fails_the_commit():
    async def standby(transport: Transport) -> None:
        session = await StandbySession.handshake(transport, STANDBY, timeout=5)
        while not isinstance(await session.receive(), Committed):
            pass
        # The standby dies before acknowledging.

    async def primary(transport: Transport) -> None:
        session = await PrimarySession.handshake(transport, PRIMARY, timeout=5)
        await session.send(Begin(0))
        await session.send(RamBlocks(0, BLOCKS))
        await session.commit(timeout=5)

    _, primary_error = asyncio.run(_pair(standby, primary))
    assert isinstance(primary_error, TransactionError)
    assert "closed the connection" in str(primary_error)


def test_standby_rejects_a_rule_violation_and_discards_the_transaction():
    async def standby(transport: Transport) -> None:
        session = await StandbySession.handshake(transport, STANDBY, timeout=5)
        while True:
            await session.receive()

    async def primary(transport: Transport) -> None:
        session = await PrimarySession.handshake(transport, PRIMARY, timeout=5)
        await session.send(Begin(0))
        await session.send(RamBlocks(0, BLOCKS))
        # Bypass the primary's own tracker to send a page of another epoch.
        await session._writer.send(_pages(7, 0, [1]))
        await transport.read_some(1)

    standby_error, _ = asyncio.run(_pair(standby, primary))
    assert isinstance(standby_error, SessionFailed)
    assert "RAM_PAGES of epoch 7 inside transaction 0; epoch 0 discarded" in str(standby_error)
    assert standby_error.discarded is not None
    assert standby_error.discarded.epoch == 0


def test_http_client_is_refused_with_a_clear_error():
    async def standby(transport: Transport) -> None:
        await StandbySession.handshake(transport, STANDBY, timeout=5)

    async def http_client(transport: Transport) -> None:
        transport.write(b"GET / HTTP/1.1\r\nHost: standby\r\n\r\n")
        await transport.drain()
        await transport.read_some(100)

    standby_error, _ = asyncio.run(_pair(standby, http_client))
    assert isinstance(standby_error, TransactionError)
    assert "not speaking Kemari's ft-transaction protocol" in str(standby_error)
    assert "GET / HTTP" in str(standby_error)


def test_primary_talking_to_an_http_server_gets_a_clear_error():
    async def http_server(transport: Transport) -> None:
        await transport.read_some(1000)
        transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await transport.drain()

    async def primary(transport: Transport) -> None:
        await PrimarySession.handshake(transport, PRIMARY, timeout=5)

    _, primary_error = asyncio.run(_pair(http_server, primary))
    assert isinstance(primary_error, TransactionError)
    assert "not speaking Kemari's ft-transaction protocol" in str(primary_error)


def test_silent_peer_times_out_the_handshake():
    async def silent(transport: Transport) -> None:
        await transport.read_some(1000)
        # Says nothing until the primary gives up and hangs up (bounded if it never does).
        async with asyncio.timeout(5):
            assert await transport.read_some(1000) == b""

    async def primary(transport: Transport) -> None:
        await PrimarySession.handshake(transport, PRIMARY, timeout=0.1)

    _, primary_error = asyncio.run(_pair(silent, primary))
    assert isinstance(primary_error, TransactionError)
    assert "no HELLO_ACK" in str(primary_error)


def test_sockets_carry_low_latency_options():
    async def standby(transport: Transport) -> int:
        sock = transport._transport.get_extra_info("socket")  # type: ignore[attr-defined]
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    async def primary(transport: Transport) -> int:
        sock = transport._transport.get_extra_info("socket")  # type: ignore[attr-defined]
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    assert asyncio.run(_pair(standby, primary)) == (1, 1)


def test_mixed_reads_return_the_stream_in_order():
    """Exact reads land straight in their buffer, partial reads come from staging; the
    byte stream must come out whole and in order either way (8 MiB, uneven sizes)."""
    sent = os.urandom(8 << 20)
    sizes = [36, 1000, 500_000, 36, 2_000_000, 10, 3_000_000, 300_000]

    async def receiver(transport: Transport) -> bytes:
        received = bytearray()
        for n in itertools.cycle(range(len(sizes))):
            size = min(sizes[n], len(sent) - len(received))
            if size == 0:
                return bytes(received)
            if n % 2:
                received += await transport.read_exactly(size)
            else:
                received += await transport.read_some(size)
        raise AssertionError("unreachable")

    async def sender(transport: Transport) -> None:
        for start in range(0, len(sent), 1 << 20):
            transport.write(memoryview(sent)[start : start + (1 << 20)])
            await transport.drain()
        await transport.read_some(1)  # wait for the receiver to finish and close

    received, _ = asyncio.run(_pair(receiver, sender, handshake=False))
    assert received == sent


def test_exact_read_cut_short_reports_how_much_arrived():
    async def receiver(transport: Transport) -> BaseException | None:
        try:
            await transport.read_exactly(100)
        except TransportClosed as exc:
            return exc
        return None

    async def sender(transport: Transport) -> None:
        transport.write(b"x" * 60)
        await transport.drain()

    error, _ = asyncio.run(_pair(receiver, sender, handshake=False))
    assert isinstance(error, TransportClosed)
    assert "after 60 of 100 bytes" in str(error)


def test_close_returns_even_if_the_peer_stopped_reading():
    writer_done = asyncio.Event()

    async def stuck(transport: Transport) -> None:
        await writer_done.wait()  # never reads; closes only after the writer's close()

    async def writer(transport: Transport) -> str:
        assert isinstance(transport, TcpTransport)
        try:
            transport.write(bytes(32 << 20))  # far more than the socket buffers hold
            # Without the abort, close() would wait for the stuck peer beyond this bound.
            async with asyncio.timeout(1.5):
                await transport.close(grace=0.2)
            return "closed"
        finally:
            writer_done.set()

    _, result = asyncio.run(_pair(stuck, writer, handshake=False))
    assert result == "closed"


def test_connect_to_a_closed_port_fails_clearly():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TransactionError, match=f"cannot connect to kemari:tcp:127.0.0.1:{port}"):
        asyncio.run(connect(f"kemari:tcp:127.0.0.1:{port}", timeout=5))


async def _acknowledging_standby(transport: Transport) -> list[int]:
    """A standby that acknowledges every commit at once; returns the committed epochs."""
    session = await StandbySession.handshake(transport, STANDBY, timeout=5)
    committed: list[int] = []
    while True:
        try:
            event = await session.receive()
        except PeerDisconnected:
            return committed
        if isinstance(event, Committed):
            committed.append(event.epoch)
            await session.acknowledge(event)
        if isinstance(event, SessionEnded):
            return committed


def test_pipelined_commits_are_acknowledged_in_order_with_their_own_send_times():
    async def primary(transport: Transport) -> list[float | None]:
        session = await PrimarySession.handshake(transport, PRIMARY, timeout=5)
        sender = TransactionSender(session)
        await session.send(Begin(0))
        await session.send(RamBlocks(0, BLOCKS))
        await sender.commit(0)
        await sender.acknowledged(0)
        seen = [sender.acked_commit_sent_at]
        # Two checkpoints in flight: COMMIT(1) and COMMIT(2) are sent before any ack is read.
        for epoch in (1, 2):
            await sender.begin(epoch)
            await sender.device_state(epoch, b"state")
            await sender.commit(epoch)
        sent_1, sent_2 = sender._commits_sent[1], sender._commits_sent[2]
        assert sent_1 <= sent_2
        await sender.acknowledged(1)
        # The permit (docs/ha.md rule 2 a) must see COMMIT(1)'s send time, not COMMIT(2)'s.
        seen.append(sender.acked_commit_sent_at)
        assert sender.acked_commit_sent_at == sent_1
        await sender.acknowledged(2)
        seen.append(sender.acked_commit_sent_at)
        assert sender.acked_commit_sent_at == sent_2
        await session.close("done")
        return seen

    committed, seen = asyncio.run(_pair(_acknowledging_standby, primary))
    assert committed == [0, 1, 2]
    assert all(value is not None for value in seen)


def test_an_acknowledgement_out_of_order_fails_the_session():
    async def primary(transport: Transport) -> None:
        session = await PrimarySession.handshake(transport, PRIMARY, timeout=5)
        sender = TransactionSender(session)
        await session.send(Begin(0))
        await session.send(RamBlocks(0, BLOCKS))
        await sender.commit(0)
        await sender.acknowledged(0)
        for epoch in (1, 2):
            await sender.begin(epoch)
            await sender.device_state(epoch, b"state")
            await sender.commit(epoch)
        await sender.acknowledged(2)  # the ack of 1 arrives first: the standby is lost

    _, primary_error = asyncio.run(_pair(_acknowledging_standby, primary))
    assert isinstance(primary_error, TransactionError)
    assert "expected COMMIT_ACK of epoch 2, got COMMIT_ACK of epoch 1" in str(primary_error)
