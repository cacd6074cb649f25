"""Tests for llamaproxy.admin.series: sampling the metrics into a 15-minute series."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.admin.series import INTERVAL, POINTS, quantile
from tests.admin.fixtures import PageWorld


class QuantileTests(SynchronousTestCase):
    def test_interpolates_inside_the_bucket(self) -> None:
        buckets = ((0.1, 0.0), (0.5, 50.0), (1.0, 100.0), (float("inf"), 100.0))
        self.assertAlmostEqual(quantile(0.95, buckets) or 0, 0.95)
        self.assertAlmostEqual(quantile(0.5, buckets) or 0, 0.5)

    def test_empty_and_overflow(self) -> None:
        self.assertIsNone(quantile(0.95, ()))
        self.assertIsNone(quantile(0.95, ((1.0, 0.0), (float("inf"), 0.0))))
        self.assertEqual(quantile(0.95, ((1.0, 0.0), (float("inf"), 10.0))), 1.0)


class SamplerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = PageWorld()
        self.metrics = self.world.metrics
        self.sampler = self.world.sampler

    def request(self, key: str, status: int = 200, first_byte: float = 0.2,
                tokens: int = 10) -> None:
        timer = self.metrics.request_started("chat", key)
        timer.admitted()
        self.world.clock.advance(first_byte)
        timer.first_byte_sent()
        timer.tokens("tiny", 5, tokens)
        timer.finished(status, "tiny", 100, "complete")

    def test_rates_queue_and_p95(self) -> None:
        self.sampler.start()
        self.addCleanup(self.sampler.stop)
        self.assertEqual(list(self.sampler.points), [])  # the first reading is the baseline
        for _ in range(10):
            self.request("alice")
        self.metrics.rejected("rate_limit", "bob")
        self.world.clock.advance(INTERVAL - 2.0)
        [point] = self.sampler.points
        self.assertEqual(point.requests_per_second, 10 / INTERVAL)
        self.assertEqual(point.tokens_per_second, 100 / INTERVAL)
        self.assertEqual(point.queue_depth, 0)
        assert point.p95_ttft_ms is not None
        self.assertTrue(100 < point.p95_ttft_ms <= 250)
        rates = {r.key_id: r for r in self.sampler.key_rates()}
        self.assertEqual((rates["alice"].requests, rates["alice"].tokens), (10, 150))
        self.assertEqual(rates["bob"].rate_limited, 1)
        self.assertEqual(self.sampler.minute_covered(), INTERVAL)
        # A quiet interval: zero rates, no p95; the minute still holds alice's requests.
        self.world.clock.advance(INTERVAL)
        self.assertEqual(self.sampler.points[-1].requests_per_second, 0)
        self.assertIsNone(self.sampler.points[-1].p95_ttft_ms)
        self.assertEqual(self.sampler.key_rates()[0].key_id, "alice")
        # After a minute, the key's requests have left the window.
        self.world.clock.pump([INTERVAL] * 12)
        self.assertEqual(self.sampler.key_rates(), [])

    def test_bounded(self) -> None:
        self.sampler.start()
        self.world.clock.pump([INTERVAL] * (POINTS + 20))
        self.assertEqual(len(self.sampler.points), POINTS)
        self.sampler.stop()
        self.assertFalse(self.world.clock.getDelayedCalls())
