"""The metrics of models on demand (``observability.model_metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.observability.model_metrics import ModelMetrics


class ModelMetricsTests(SynchronousTestCase):
    def test_each_event_lands_in_its_family(self) -> None:
        registry = CollectorRegistry()
        metrics = ModelMetrics(registry)
        metrics.load_started("a", "request")
        metrics.load_started("a", "swap")
        metrics.load_finished("a", 0.3, ok=True)
        metrics.load_finished("b", 2.0, ok=False)
        metrics.unloaded("a", "idle")
        metrics.swapped("gpu0", "a", "b")
        metrics.load_waited(0.4)

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, labels)

        self.assertEqual(value("llamaproxy_model_loads_total", backend="a", reason="swap"), 1)
        self.assertEqual(value("llamaproxy_model_unloads_total", backend="a", reason="idle"), 1)
        self.assertEqual(value("llamaproxy_model_swaps_total", group="gpu0"), 1)
        self.assertEqual(value("llamaproxy_model_load_seconds_bucket", backend="a",
                               outcome="ready", le="0.5"), 1)
        self.assertEqual(value("llamaproxy_model_load_seconds_count", backend="b",
                               outcome="failed"), 1)
        self.assertEqual(value("llamaproxy_model_load_wait_seconds_count"), 1)
