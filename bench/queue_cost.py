"""What 10 000 queued requests cost: memory per waiting request and admission latency.

Two measurements, both in memory (no sockets, so the numbers are the gateway's own):

1. ``Admission`` alone: memory per waiter (a Deferred one from ``acquire``, and a parked one, as
   the gateway queues requests), and the time to hand a freed slot to the next waiter.
2. The whole gateway path: N clients send a chat request to a ``GatewaySite`` whose one slot is
   busy; memory per queued request (request, channel, transport, buffered body, queue entry),
   then the time from a slot being freed to the next request being sent to the backend.

    .venv/bin/python -m bench.queue_cost [-n 10000]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc

from llamaproxy.backends.admission import Admission, Slot, Waiter
from tests.gateway.test_resource import AUTH, GatewayFixture


def admission_only(n: int) -> None:
    admission = Admission(1)
    holder = admission.acquire("hog").result
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    slots: list[Slot] = []
    for i in range(n):
        admission.acquire(f"key{i % 100}").addCallback(slots.append)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    started = time.perf_counter()
    holder.release()
    while slots:
        slots.pop().release()
    elapsed = time.perf_counter() - started
    print(f"Admission alone, {n} waiters over 100 keys: {used / n:.0f} bytes per waiter, "
          f"{elapsed / n * 1e6:.2f} µs per slot hand-over")


class _Parked(Waiter):
    """The smallest waiter: served slots are given back at once."""

    __slots__ = ()

    def granted(self, slot: Slot) -> None:
        slot.release()

    def expired(self) -> None:
        pass


def parked_only(n: int) -> None:
    from twisted.internet import reactor

    admission = Admission(1, clock=reactor)
    holder = admission.acquire("hog").result
    keys = [f"key{i % 100}" for i in range(n)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for key in keys:
        admission.park(_Parked(key), 600.0)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    started = time.perf_counter()
    holder.release()  # each served waiter releases at once: the whole queue drains
    elapsed = time.perf_counter() - started
    assert admission.waiting == 0 and admission.active == 0
    print(f"Admission, {n} parked waiters (the gateway's way) over 100 keys: {used / n:.0f} bytes "
          f"per waiter (the gateway's ParkedExchange is 32 more), {elapsed / n * 1e6:.2f} µs per "
          f"slot hand-over")


def gateway_path(n: int) -> None:
    # The real reactor's timers (a heap), not the test Clock (a list re-sorted on every call);
    # the reactor is never run: nothing here needs time to pass.
    from twisted.internet import reactor

    gw = GatewayFixture(concurrency=1, body_limit=1 << 20, clock=reactor)
    body = json.dumps({"messages": [{"role": "user", "content": "hello"}]}).encode()
    gw.chat(body)  # takes the only slot
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    clients = []
    for _ in range(n):
        client = gw.client()
        client.request("POST", "/v1/chat/completions", body, AUTH)
        clients.append(client)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert gw.admission.waiting == n, gw.admission.waiting
    latencies = []
    for i in range(min(n, 2000)):
        started = time.perf_counter()
        gw.agent.requests[i].respond(200, b"{}")  # frees the slot: the next one is sent
        latencies.append(time.perf_counter() - started)
        assert len(gw.agent.requests) == i + 2
    latencies.sort()
    for client in clients:  # leave nothing pending behind (clean interpreter exit)
        client.disconnect()
    print(f"Gateway path, {n} queued chat requests: {used / n / 1024:.1f} KiB per queued request "
          f"(body {len(body)} bytes); release → next request sent: median "
          f"{latencies[len(latencies) // 2] * 1e6:.0f} µs, p99 "
          f"{latencies[int(len(latencies) * 0.99)] * 1e6:.0f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000)
    args = parser.parse_args()
    admission_only(args.n)
    parked_only(args.n)
    gateway_path(args.n)


if __name__ == "__main__":
    main()
