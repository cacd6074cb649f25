"""How long the reactor is away: event-loop lag and garbage-collector pauses, as metrics.

Every byte the gateway relays waits for the reactor iteration it arrives in to end. When one
iteration does too much at once (a burst of work, a full garbage collection, a slow disk write),
every open stream sees it as one late event: the p99 gap between events. ``LoopProbe`` makes
that visible in production, on both the fast and the stock path, with public APIs only:

- **event-loop lag**: a timer due every ``interval`` seconds notes how late it ran
  (``llamaproxy_event_loop_lag_seconds``, a histogram; ``llamaproxy_event_loop_lag_max_seconds``,
  the worst since the previous scrape);
- **collector pauses**: ``gc.callbacks`` time each collection of CPython's cyclic garbage
  collector (``llamaproxy_gc_pause_seconds{generation}``), the usual suspect of a long
  iteration in a Python server.

Its own cost: ten timer calls a second, and two ``perf_counter`` reads per collection.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Seconds between two lag measurements.
INTERVAL = 0.1
#: Buckets of both histograms (seconds): a millisecond is nothing, 20 ms is a late SSE event.
BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LoopProbe(Service):
    """Measures the reactor's lag and the collector's pauses while it runs (see the module)."""

    def __init__(
        self,
        clock: IReactorTime,
        registry: CollectorRegistry,
        interval: float = INTERVAL,
        timer: Callable[[], float] = time.perf_counter,
        callbacks: list[Callable[[str, dict[str, Any]], None]] | None = None,
    ) -> None:
        self.clock = clock
        self.interval = interval
        self._timer = timer
        self._callbacks = gc.callbacks if callbacks is None else callbacks
        self._call: IDelayedCall | None = None
        self._due = 0.0
        self._worst = 0.0
        self._collecting: float | None = None
        self.lag = Histogram(
            "llamaproxy_event_loop_lag_seconds",
            "How late a timer due every 0.1 s ran: the time the reactor spent in one iteration "
            "beyond it (what every open stream waits for).",
            registry=registry, buckets=BUCKETS)
        self.lag_max = Gauge(
            "llamaproxy_event_loop_lag_max_seconds",
            "The worst event-loop lag since the previous scrape.", registry=registry)
        self.lag_max.set_function(self._take_worst)
        self.gc_pause = Histogram(
            "llamaproxy_gc_pause_seconds",
            "Pauses of CPython's cyclic garbage collector, by the generation collected.",
            ["generation"], registry=registry, buckets=BUCKETS)
        self._gc_children = [self.gc_pause.labels(generation=str(n)) for n in range(3)]

    def startService(self) -> None:
        super().startService()
        self._callbacks.append(self._on_collection)
        self._schedule()

    def stopService(self) -> None:
        super().stopService()
        if self._on_collection in self._callbacks:
            self._callbacks.remove(self._on_collection)
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        self._due = self.clock.seconds() + self.interval
        self._call = self.clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        late = max(0.0, self.clock.seconds() - self._due)
        self.lag.observe(late)
        if late > self._worst:
            self._worst = late
        self._schedule()

    def _take_worst(self) -> float:
        worst, self._worst = self._worst, 0.0
        return worst

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._collecting = self._timer()
        elif self._collecting is not None:
            self._gc_children[min(int(info.get("generation", 2)), 2)].observe(
                self._timer() - self._collecting)
            self._collecting = None
