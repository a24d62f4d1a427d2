"""The HA arbiter on a real three-member etcd: CAS latency and lease-expiry detection.

    .venv/bin/python benchmarks/etcd_arbiter.py [--rounds 200] [--expiries 5] [--ttl 2]

Starts kemari.testbed.etcd.EtcdLab (three members, each in its own namespace), then
runs the measuring part *inside an agent namespace* (``ip netns exec``) so the client
talks to etcd over the namespaces' veths directly, with no relay in between.  Prints
numbers; asserts nothing.

* CAS latency: one compare-and-swap transaction of the record (publish a standby / drop
  it, alternately, each compared against the revision the previous one returned).
* Lease-expiry detection: an arbiter claims the VM and stops renewing; an observer reads
  every 20 ms; the time from the last keepalive *sent* to the first read without its
  alive key (etcd expires leases at most TTL after the renewal it processed, and its
  lessor checks every 500 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

from kemari.ha.arbiter import Arbiter, ArbiterSettings, Won
from kemari.ha.record import claim, drop_standby, publish_standby
from kemari.testbed.etcd import EtcdLab


def quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, max {ordered[-1] * 1000:.2f} ms"


async def inner(endpoints: tuple[str, ...], rounds: int, expiries: int, ttl: int) -> None:
    settings = ArbiterSettings(endpoints, lease_ttl=ttl)
    vm = f"bench-{int(time.time())}"
    async with Arbiter(settings, vm, "host-a:1") as a, Arbiter(settings, vm, "host-b:1") as b:
        outcome = await a.transition(
            lambda s: claim(s.record, vm, "host-a:1", active_alive=s.active_alive)
        )
        assert isinstance(outcome, Won)
        state = outcome.state
        latencies = []
        for i in range(rounds):
            who = b if i % 2 == 0 else a
            step = (
                publish_standby(state.record, "host-b:1", "tcp:10.231.0.101:4444")
                if i % 2 == 0
                else drop_standby(state.record, "host-a:1")
            )
            start = time.perf_counter()
            won, state = await who.compare_and_swap(state, step)  # type: ignore[arg-type]
            latencies.append(time.perf_counter() - start)
            assert won
        print(f"CAS latency over {rounds} transactions: {quantiles(latencies)}")
        read_latencies = []
        for _ in range(rounds):
            start = time.perf_counter()
            await a.read()
            read_latencies.append(time.perf_counter() - start)
        print(f"linearizable read of the record: {quantiles(read_latencies)}")

    detections = []
    for round_ in range(expiries):
        vm = f"bench-expiry-{round_}-{int(time.time())}"
        async with Arbiter(settings, vm, "host-a:1") as a, Arbiter(settings, vm, "obs:1") as o:
            await a.transition(
                lambda s, vm=vm: claim(s.record, vm, "host-a:1", active_alive=s.active_alive)
            )
            await a.stop_renewing()
            age = a.status().last_renewal_age
            assert age is not None
            sent = time.monotonic() - age
            invalid_at = None
            while "host-a:1" in (await o.read()).alive:
                if invalid_at is None and not a.lease_valid():
                    invalid_at = time.monotonic() - sent
                await asyncio.sleep(0.02)
            detections.append(time.monotonic() - sent)
            print(
                f"  expiry {round_ + 1}: alive key gone {detections[-1]:.2f} s after the last "
                f"keepalive was sent (lease invalid by the holder's clock after "
                f"{invalid_at if invalid_at is not None else float('nan'):.2f} s)"
            )
    print(
        f"lease-expiry detection (TTL {ttl} s): p50 {statistics.median(detections):.2f} s, "
        f"max {max(detections):.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--expiries", type=int, default=5)
    parser.add_argument("--ttl", type=int, default=2)
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        asyncio.run(inner(tuple(args.inner.split(",")), args.rounds, args.expiries, args.ttl))
        return
    start = time.monotonic()
    with EtcdLab(3) as lab:
        print(f"3-member etcd healthy after {time.monotonic() - start:.2f} s")
        agent = lab.add_agent("bench")
        command = [
            sys.executable,
            __file__,
            f"--inner={','.join(lab.endpoints)}",
            f"--rounds={args.rounds}",
            f"--expiries={args.expiries}",
            f"--ttl={args.ttl}",
        ]
        subprocess.run(agent.argv(command), check=True)


if __name__ == "__main__":
    main()
