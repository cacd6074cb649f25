"""The event-loop lag and collector-pause probe (``observability.loop_probe``)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.observability.loop_probe import LoopProbe


class LoopProbeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.now = 0.0
        self.callbacks: list[Callable[[str, dict[str, Any]], None]] = []
        self.probe = LoopProbe(self.clock, self.registry, timer=lambda: self.now,
                               callbacks=self.callbacks)
        self.probe.startService()
        self.addCleanup(self.probe.stopService)

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def test_a_late_timer_is_lag(self) -> None:
        self.clock.advance(0.1)  # on time
        self.clock.advance(0.135)  # one iteration held the reactor 35 ms past the next tick
        self.assertEqual(self.value("llamaproxy_event_loop_lag_seconds_count"), 2)
        self.assertEqual(self.value("llamaproxy_event_loop_lag_seconds_bucket", le="0.001"), 1)
        self.assertEqual(self.value("llamaproxy_event_loop_lag_seconds_bucket", le="0.02"), 1)
        self.assertEqual(self.value("llamaproxy_event_loop_lag_seconds_bucket", le="0.05"), 2)
        self.assertAlmostEqual(self.value("llamaproxy_event_loop_lag_max_seconds") or 0, 0.035)
        # The worst is per scrape: the next scrape starts again from zero.
        self.assertEqual(self.value("llamaproxy_event_loop_lag_max_seconds"), 0)

    def test_collector_pauses_by_generation(self) -> None:
        [callback] = self.callbacks
        callback("start", {"generation": 2})
        self.now += 0.03
        callback("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
        callback("start", {"generation": 0})
        self.now += 0.0005
        callback("stop", {"generation": 0, "collected": 0, "uncollectable": 0})
        self.assertAlmostEqual(self.value("llamaproxy_gc_pause_seconds_sum", generation="2") or 0,
                               0.03)
        self.assertEqual(self.value("llamaproxy_gc_pause_seconds_count", generation="0"), 1)
        self.assertEqual(self.value("llamaproxy_gc_pause_seconds_bucket", generation="2",
                                    le="0.02"), 0)

    def test_stop_removes_the_callback_and_the_timer(self) -> None:
        self.probe.stopService()
        self.assertEqual(self.callbacks, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_real_collections_are_timed(self) -> None:
        registry = CollectorRegistry()
        probe = LoopProbe(Clock(), registry)
        probe.startService()
        try:
            gc.collect()
        finally:
            probe.stopService()
        self.assertGreater(
            registry.get_sample_value("llamaproxy_gc_pause_seconds_sum", {"generation": "2"}), 0)
