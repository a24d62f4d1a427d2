"""The HA arbiter: one agent's view of its VM's record in a real etcd v3 cluster.

An :class:`Arbiter` belongs to one agent (``agent``, an identity unique per agent
process) and one VM.  It holds an etcd **lease** and keeps it alive in a background
task, recording when the last successful renewal was *sent* on the monotonic clock:
etcd sets the lease's expiry when it processes the renewal, which is later, so
``sent + TTL`` is never after the server's expiry.  The lease is **valid** by the
agent's own clock while ``now < sent + TTL - safety_margin`` *and* the lease is the one
bound to the agent's alive key by a transaction it won (a lease granted anew after the
old one was lost backs nothing until :func:`~kemari.ha.record.reattach` or another
transition binds it; meanwhile another agent may have claimed the VM).

Every change of the record is one etcd transaction (:meth:`Arbiter.compare_and_swap`):
compare the record's ``mod_revision`` with the one read (and, for a claim, that the old
active's alive key is absent), then put the new record and this agent's alive key
bound to its lease; on failure the same transaction returns the current state, so a
retry needs no extra read.  Every call has a deadline; a call that fails or runs out
of time raises :class:`~kemari.ha.ArbiterUnreachable` (the outcome of a change is then
unknown: read again) and marks the arbiter unreachable in :meth:`Arbiter.status`.

Several endpoints are tried in order (gRPC ``pick_first``); after a failed call the
channel is rebuilt starting from the next endpoint, so a member that is cut off (not
refusing, just silent) costs one deadline, not a TCP timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.utils
from aetcd import transactions as tx

from kemari.config import ETCD_DEFAULT_PORT, parse_etcd_uri
from kemari.errors import ConfigError
from kemari.ha import ArbiterError, ArbiterUnreachable
from kemari.ha.record import (
    KEY_ROOT,
    Decision,
    Record,
    Refusal,
    Step,
    alive_key,
    check_agent,
    check_vm_name,
    decode_record,
    encode_record,
    record_key,
)

T = TypeVar("T")

DEFAULT_PORT = ETCD_DEFAULT_PORT


def parse_arbiter_uri(uri: str) -> tuple[str, ...]:
    """``etcd://HOST[:PORT],HOST[:PORT],...`` → endpoints ``("HOST:PORT", ...)``.

    With more than one endpoint every host must be an IPv4 address (gRPC's ``ipv4:``
    target); one endpoint may be a host name.  The parser is the config's
    (:func:`kemari.config.parse_etcd_uri`, so ``ha =`` is checked once at load); here
    its error is an :class:`ArbiterError`.
    """
    try:
        return parse_etcd_uri(uri)
    except ConfigError as exc:
        raise ArbiterError(str(exc)) from None


@dataclass(frozen=True)
class ArbiterSettings:
    """Timing of the arbiter; all in seconds."""

    endpoints: tuple[str, ...]
    lease_ttl: int = 2  # etcd grants whole seconds (and at least 2 with default timing)
    safety_margin: float = 0.5  # subtracted from the lease by the agent's own clock
    request_timeout: float = 1.0  # deadline of every etcd call
    keepalive_interval: float = 0.5
    poll_interval: float = 0.1  # how often watch/wait_gone read the record

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ArbiterError("the arbiter needs at least one etcd endpoint")
        if type(self.lease_ttl) is not int or self.lease_ttl < 1:
            raise ArbiterError(f"lease TTL {self.lease_ttl!r}: a whole number of seconds ≥ 1")
        if not 0 <= self.safety_margin < self.lease_ttl:
            raise ArbiterError("the safety margin must be at least 0 and below the lease TTL")
        if not 0 < self.keepalive_interval < self.lease_ttl - self.safety_margin:
            raise ArbiterError("the keepalive interval must be below the lease TTL minus margin")
        if self.request_timeout <= 0 or self.poll_interval <= 0:
            raise ArbiterError("the request timeout and poll interval must be positive")


@dataclass(frozen=True)
class RecordState:
    """The record as read at one etcd revision, with the agents whose lease is alive."""

    record: Record | None
    revision: int  # the record key's mod_revision; 0 when there is no record
    alive: frozenset[str]

    @property
    def active_alive(self) -> bool:
        return self.record is not None and self.record.active in self.alive


@dataclass(frozen=True)
class Won:
    """A transition committed; ``state`` is the record it wrote."""

    state: RecordState


@dataclass(frozen=True)
class Refused:
    """A transition does not apply to ``state`` (the latest record read)."""

    reason: str
    state: RecordState


@dataclass(frozen=True)
class ArbiterStatus:
    """What ``info status`` shows about the arbiter."""

    reachable: bool
    endpoints: tuple[str, ...]
    lease_id: int | None
    lease_valid: bool
    lease_remaining: float | None  # until the lease ends by the agent's clock, margin included
    last_renewal_age: float | None  # since the last successful renewal was sent
    term: int | None
    record: Record | None
    last_error: str | None

    def lines(self) -> list[str]:
        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f} s"

        return [
            f"arbiter: etcd {','.join(self.endpoints)}, "
            + ("reachable" if self.reachable else f"UNREACHABLE ({self.last_error})"),
            f"lease: {self.lease_id if self.lease_id is not None else 'none'}, "
            f"{'valid' if self.lease_valid else 'not valid'}, remaining "
            f"{seconds(self.lease_remaining)}, last renewal {seconds(self.last_renewal_age)} ago",
            "record: " + ("none" if self.record is None else self.record.describe()),
        ]


class Arbiter:
    """One agent's lease and record transactions for one VM (see the module doc)."""

    def __init__(
        self,
        settings: ArbiterSettings,
        vm: str,
        agent: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.vm = check_vm_name(vm)
        self.agent = check_agent(agent)
        self._clock = clock
        self._record_key = record_key(vm)
        self._prefix = f"{KEY_ROOT}/{vm}/".encode()
        self._alive_prefix = f"{KEY_ROOT}/{vm}/alive/".encode()
        self._endpoints = list(settings.endpoints)
        self._client: aetcd.Client | None = None
        self._generation = 0
        self._lease_id: int | None = None
        self._granted_ttl = 0
        self._renewed_at: float | None = None  # monotonic time the last good renewal was sent
        self._attached = False  # the current lease backs our alive key (a CAS we won put it)
        self._keepalive: asyncio.Task[None] | None = None
        self._reachable = False
        self._last_error: str | None = None
        self._last_state: RecordState | None = None

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Arbiter:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, grant a lease and keep it alive in the background."""
        await self.grant_lease()
        self._keepalive = asyncio.create_task(self._keepalive_loop(), name="arbiter-keepalive")

    async def stop_renewing(self) -> None:
        """Stop the keepalive task; the lease runs out by itself (an agent that fenced
        itself, or a test playing a frozen agent)."""
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
            self._keepalive = None

    async def close(self, *, revoke: bool = True) -> None:
        """Stop renewing; revoke the lease (best effort) unless ``revoke`` is False."""
        await self.stop_renewing()
        if revoke and self._lease_id is not None:
            lease_id = self._lease_id
            with contextlib.suppress(ArbiterError):
                await self._call("revoke lease", lambda c: c.revoke_lease(lease_id))
        self._lease_id = None
        self._attached = False
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), self.settings.request_timeout)

    # --- calls with deadlines -------------------------------------------------------

    def _target(self) -> tuple[str, int]:
        if len(self._endpoints) == 1:
            host, _, port = self._endpoints[0].rpartition(":")
            return host, int(port)
        # gRPC's ipv4: target lists every address; aetcd appends ":PORT" to the host.
        *first, last = self._endpoints
        host, _, port = last.rpartition(":")
        return "ipv4:" + ",".join([*first, host]), int(port)

    def _channel(self) -> aetcd.Client:
        if self._client is None:
            host, port = self._target()
            self._client = aetcd.Client(
                host=host,
                port=port,
                timeout=self.settings.request_timeout,
                options={"grpc.enable_retries": 0, "grpc.initial_reconnect_backoff_ms": 100},
                connect_wait_timeout=int(max(1, self.settings.request_timeout)),
            )
        return self._client

    async def _reset_channel(self, generation: int) -> None:
        if generation != self._generation or self._client is None:
            return  # another call rebuilt it already
        self._generation += 1
        self._endpoints.append(self._endpoints.pop(0))  # start from the next member
        client, self._client = self._client, None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), self.settings.request_timeout)

    async def _call(self, what: str, call: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        generation = self._generation
        client = self._channel()
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                result = await call(client)
        except TimeoutError:
            reason = f"no answer within {self.settings.request_timeout:g} s"
        except aetcd.exceptions.ClientError as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if (
                not isinstance(
                    exc,
                    aetcd.exceptions.ConnectionFailedError
                    | aetcd.exceptions.ConnectionTimeoutError,
                )
                and "no leader" not in detail
            ):
                self._reachable = True
                raise ArbiterError(f"etcd refused {what}: {detail}") from None
            reason = detail
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # gRPC cancels the calls of a channel another call closed (_reset_channel)
            reason = "the call was cancelled with its channel"
        except Exception as exc:  # grpc raises its own errors for a closed channel, etc.
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            self._reachable = True
            self._last_error = None
            return result
        self._reachable = False
        self._last_error = f"{what}: {reason}"
        await self._reset_channel(generation)
        raise ArbiterUnreachable(f"etcd {','.join(self.settings.endpoints)}: {what}: {reason}")

    # --- the lease ------------------------------------------------------------------

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    async def grant_lease(self) -> int:
        """A new lease (replacing a lost one); it backs nothing until a transition."""
        ttl = self.settings.lease_ttl
        sent = self._clock()
        lease = await self._call("grant lease", lambda c: c.lease(ttl))
        if lease.ttl <= 0:
            raise ArbiterError(f"etcd granted lease {lease.id} with TTL {lease.ttl}")
        self._lease_id = int(lease.id)
        self._granted_ttl = int(lease.ttl)
        self._renewed_at = sent
        self._attached = False
        return self._lease_id

    async def renew_lease(self) -> bool:
        """One keepalive; False when etcd says the lease is gone (expired or revoked)."""
        lease_id = self._lease_id
        if lease_id is None:
            raise ArbiterError("no lease to renew")
        sent = self._clock()
        reply: Any = await self._call("renew lease", lambda c: c.refresh_lease(lease_id))
        if lease_id != self._lease_id:
            return False
        if reply is None or int(reply.TTL) <= 0:
            self._lease_id = None
            self._attached = False
            return False
        self._granted_ttl = int(reply.TTL)
        self._renewed_at = sent
        return True

    async def _keepalive_loop(self) -> None:
        interval = self.settings.keepalive_interval
        while True:
            started = self._clock()
            try:
                if self._lease_id is None:
                    await self.grant_lease()
                else:
                    await self.renew_lease()
            except ArbiterError:
                pass  # recorded by _call: status shows it, lease_valid() runs out
            except Exception as exc:  # never let the loop die: the lease would just lapse
                self._last_error = f"keepalive: {type(exc).__name__}: {exc}"
            await asyncio.sleep(max(0.0, interval - (self._clock() - started)))

    def lease_remaining(self) -> float | None:
        """Seconds until the lease ends by this agent's clock (margin included), or None."""
        if self._lease_id is None or self._renewed_at is None:
            return None
        end = self._renewed_at + self._granted_ttl - self.settings.safety_margin
        return max(0.0, end - self._clock())

    def lease_valid(self) -> bool:
        """The lease is alive by this agent's clock and backs its alive key."""
        remaining = self.lease_remaining()
        return self._attached and remaining is not None and remaining > 0

    # --- the record -----------------------------------------------------------------

    def _state_from(self, kvs: list[Any]) -> RecordState:
        record = None
        revision = 0
        alive = set()
        for kv in kvs:
            key = bytes(kv.key)
            if key == self._record_key:
                record = decode_record(bytes(kv.value), self.vm)
                revision = int(kv.mod_revision)
            elif key.startswith(self._alive_prefix):
                alive.add(key[len(self._alive_prefix) :].decode(errors="replace"))
        state = RecordState(record, revision, frozenset(alive))
        self._last_state = state
        return state

    async def read(self) -> RecordState:
        """The record and the alive agents, read at one revision (linearizable)."""
        prefix = self._prefix
        result = await self._call("read the record", lambda c: c.get_prefix(prefix))
        return self._state_from(list(result.kvs))

    async def compare_and_swap(self, state: RecordState, step: Step) -> tuple[bool, RecordState]:
        """Commit ``step`` if the record is still at ``state.revision`` (and the agent
        ``step.requires_gone`` has no alive key); put our alive key with our lease in the
        same transaction.  Returns (won, the state now).  A lease etcd no longer knows
        (it expired while we were cut off) is replaced by a new one, once."""
        try:
            return await self._compare_and_swap(state, step)
        except ArbiterError as exc:
            if isinstance(exc, ArbiterUnreachable) or "lease not found" not in str(exc):
                raise
        self._lease_id, self._attached = None, False
        return await self._compare_and_swap(state, step)

    async def _compare_and_swap(self, state: RecordState, step: Step) -> tuple[bool, RecordState]:
        if self._lease_id is None:
            await self.grant_lease()
        lease_id = self._lease_id
        compare: list[Any] = [tx.Mod(self._record_key) == state.revision]
        if step.requires_gone is not None:
            compare.append(tx.Version(alive_key(self.vm, step.requires_gone)) == 0)
        success = [
            tx.Put(self._record_key, encode_record(step.record)),
            tx.Put(alive_key(self.vm, self.agent), b"", lease=lease_id),
            tx.Get(self._prefix, aetcd.utils.prefix_range_end(self._prefix)),
        ]
        failure = [tx.Get(self._prefix, aetcd.utils.prefix_range_end(self._prefix))]
        won, responses = await self._call(
            "compare-and-swap the record",
            lambda c: c.transaction(compare=compare, success=success, failure=failure),
        )
        kvs = [kv for _value, kv in responses[-1]]
        now = self._state_from(kvs)
        if won and lease_id == self._lease_id:
            self._attached = True
            if not self.lease_valid():
                # The lease outlived a time without answers from etcd (a leader election
                # renews every lease) while by our clock it ran out: learn its TTL now,
                # or a new unprotected active fences itself before the next keepalive.
                with contextlib.suppress(ArbiterError):
                    await self.renew_lease()
        return bool(won), now

    async def transition(
        self, decide: Callable[[RecordState], Decision], *, attempts: int = 5
    ) -> Won | Refused:
        """Read, decide, compare-and-swap; on a lost race decide again on the new state.

        ``decide`` is one of :mod:`kemari.ha.record`'s transitions with its arguments
        bound, e.g. ``lambda s: take_over(s.record, me)``.  A claim's ``active_alive``
        comes from the state read: ``lambda s: claim(s.record, vm, me,
        active_alive=s.active_alive)``."""
        state = await self.read()
        for _ in range(attempts):
            decision = decide(state)
            if isinstance(decision, Refusal):
                return Refused(decision.reason, state)
            won, state = await self.compare_and_swap(state, decision)
            if won:
                return Won(state)
        return Refused(f"lost {attempts} compare-and-swap races in a row", state)

    async def watch(self, since: RecordState | None = None) -> AsyncIterator[RecordState]:
        """Yield the state each time the record or the set of alive agents changes
        (polling every ``poll_interval``; read errors raise ArbiterUnreachable)."""
        last = since
        while True:
            state = await self.read()
            if last is None or (state.revision, state.alive) != (last.revision, last.alive):
                last = state
                yield state
            await asyncio.sleep(self.settings.poll_interval)

    async def wait_gone(self, agent: str, timeout: float) -> RecordState:
        """Wait until ``agent`` has no alive key (its lease ended); ArbiterError after
        ``timeout`` seconds.  Read errors in between are retried until the deadline."""
        check_agent(agent)
        deadline = self._clock() + timeout
        while True:
            with contextlib.suppress(ArbiterUnreachable):
                state = await self.read()
                if agent not in state.alive:
                    return state
            if self._clock() >= deadline:
                raise ArbiterError(f"{agent}'s lease still alive after {timeout:g} s")
            await asyncio.sleep(self.settings.poll_interval)

    async def probe(self) -> bool:
        """Read the record once; True if etcd answered (updates the status)."""
        try:
            await self.read()
        except ArbiterError:
            return False
        return True

    def status(self) -> ArbiterStatus:
        record = None if self._last_state is None else self._last_state.record
        age = None if self._renewed_at is None else self._clock() - self._renewed_at
        return ArbiterStatus(
            reachable=self._reachable,
            endpoints=self.settings.endpoints,
            lease_id=self._lease_id,
            lease_valid=self.lease_valid(),
            lease_remaining=self.lease_remaining(),
            last_renewal_age=age,
            term=None if record is None else record.term,
            record=record,
            last_error=self._last_error,
        )
