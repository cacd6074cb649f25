"""Tests for llamaproxy.observability.reactor_series: the same exposition as prometheus-client's
Counter and Histogram for the same updates."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.observability.reactor_series import ReactorCounter, ReactorHistogram

BUCKETS = (0.0, 0.005, 0.1, 1.0, 10.0)
_CREATED = re.compile(rb"^(\S+_created(?:\{[^}]*\})?) \S+$", re.MULTILINE)


def _without_created_values(text: bytes) -> bytes:
    """The exposition with each ``_created`` timestamp blanked (when a series was made)."""
    return _CREATED.sub(rb"\1 T", text)


def _pair() -> tuple[CollectorRegistry, CollectorRegistry]:
    return CollectorRegistry(), CollectorRegistry()


class SameExpositionTests(SynchronousTestCase):
    @given(st.lists(st.tuples(st.sampled_from(["chat", "embeddings", "other"]),
                              st.floats(min_value=0, max_value=100, allow_nan=False)),
                    max_size=30))
    def test_histogram(self, observations: list[tuple[str, float]]) -> None:
        theirs, ours = _pair()
        reference = Histogram("t_seconds", "Help.", ["route"], registry=theirs, buckets=BUCKETS)
        lean = ReactorHistogram("t_seconds", "Help.", ["route"], registry=ours, buckets=BUCKETS)
        plain_ref = Histogram("w_seconds", "Wait.", registry=theirs, buckets=BUCKETS)
        plain = ReactorHistogram("w_seconds", "Wait.", registry=ours, buckets=BUCKETS)
        for route, value in observations:
            reference.labels(route=route).observe(value)
            lean.labels(route=route).observe(value)
            plain_ref.observe(value)
            plain.observe(value)
        for render in (generate_latest, openmetrics_latest):
            self.assertEqual(_without_created_values(render(ours)),
                             _without_created_values(render(theirs)))

    @given(st.lists(st.tuples(st.sampled_from(["200", "404"]), st.sampled_from(["a", "b"]),
                              st.integers(min_value=0, max_value=10 ** 9)), max_size=30))
    def test_counter(self, increments: list[tuple[str, str, int]]) -> None:
        theirs, ours = _pair()
        reference = Counter("r_total", "Requests.", ["status", "model"], registry=theirs)
        lean = ReactorCounter("r_total", "Requests.", ["status", "model"], registry=ours)
        for status, model, amount in increments:
            reference.labels(status=status, model=model).inc(amount)
            lean.labels(status=status, model=model).inc(amount)
            reference.labels(status, model).inc()
            lean.labels(status, model).inc()
        for render in (generate_latest, openmetrics_latest):
            self.assertEqual(_without_created_values(render(ours)),
                             _without_created_values(render(theirs)))

    def test_sample_values_read_back(self) -> None:
        registry = CollectorRegistry()
        histogram = ReactorHistogram("d_seconds", "D.", ["route"], registry=registry,
                                     buckets=(0.1, 1.0))
        histogram.labels(route="chat").observe(0.1)  # on the bound: in that bucket
        histogram.labels(route="chat").observe(0.5)
        counter = ReactorCounter("n_total", "N.", ["route"], registry=registry)
        counter.labels(route="chat").inc(3)
        get = registry.get_sample_value
        self.assertEqual(get("d_seconds_bucket", {"route": "chat", "le": "0.1"}), 1.0)
        self.assertEqual(get("d_seconds_bucket", {"route": "chat", "le": "+Inf"}), 2.0)
        self.assertEqual(get("d_seconds_sum", {"route": "chat"}), 0.6)
        self.assertEqual(get("n_total", {"route": "chat"}), 3.0)
        self.assertIsNotNone(get("n_created", {"route": "chat"}))

    def test_misuse_is_refused(self) -> None:
        registry = CollectorRegistry()
        counter = ReactorCounter("n_total", "N.", ["route"], registry=registry)
        self.assertRaises(ValueError, counter.labels(route="chat").inc, -1)
        self.assertRaises(ValueError, counter.labels, "a", "b")
        labelled = ReactorHistogram("h_seconds", "H.", ["route"], registry=registry,
                                    buckets=(1.0,))
        self.assertRaises(ValueError, labelled.observe, 1.0)
        self.assertRaises(ValueError, ReactorHistogram, "u_seconds", "U.", buckets=(2.0, 1.0))
        # The registry refuses a second family of the same name, as for prometheus-client's.
        self.assertRaises(ValueError, ReactorCounter, "n_total", "N.", registry=registry)
