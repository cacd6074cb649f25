"""Counters and histograms updated from the reactor thread only: no lock, no checks per update.

prometheus-client's ``Counter`` and ``Histogram`` children take a lock for every ``inc`` and
``observe`` (each histogram observation is two locked increments and a linear scan of the
buckets) and check on every call that they are observable: about 1 µs per observation and
0.5 µs per increment on a slow host, a dozen of them per proxied request. The request
metrics (``GatewayMetrics``) are only ever updated on the reactor thread, which also renders
them, so ``ReactorCounter`` and ``ReactorHistogram`` keep plain numbers (a bisection picks a
histogram's bucket) and build prometheus-client ``Metric`` families when collected: the same
families, samples and label order as prometheus-client's own classes (``_created`` included,
unless prometheus-client's created series are disabled), through its public collector API.

Never update them from another thread (the pool, a scraper's thread): nothing protects them.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import INF, floatToGoString


def _created_series() -> bool:
    """Whether prometheus-client exports ``_created`` series (``PROMETHEUS_DISABLE_CREATED_SERIES``
    and ``disable_created_metrics`` turn them off), read at collection like it does."""
    return bool(getattr(_prometheus_metrics, "_use_created", True))


class CounterSeries:
    """One labelled series of a ``ReactorCounter``."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (not negative: a counter only goes up)."""
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class HistogramSeries:
    """One labelled series of a ``ReactorHistogram``: a count per bucket, and the sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        """Count ``amount`` in the first bucket whose upper bound is not below it."""
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Family(Collector):
    """What counters and histograms share: a name, help, label names and the series by label
    values (in the order they were first asked for, as prometheus-client keeps them)."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], CounterSeries | HistogramSeries] = {}
        if registry is not None:
            registry.register(self)

    def _child(self, labelvalues: tuple[str, ...]) -> CounterSeries | HistogramSeries:
        if len(labelvalues) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}")
        series = self._series.get(labelvalues)
        if series is None:
            series = self._series[labelvalues] = self._new_series()
        return series

    @abstractmethod
    def _new_series(self) -> CounterSeries | HistogramSeries:
        """A new series at zero, of the family's kind."""

    def _metric_name(self) -> str:
        return self.name

    def describe(self) -> Iterable[Metric]:
        return [Metric(self._metric_name(), self.documentation, self.kind)]

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self._metric_name(), self.documentation, self.kind)
        created = _created_series()
        for labelvalues, series in list(self._series.items()):
            self._add_samples(metric, dict(zip(self.labelnames, labelvalues, strict=True)),
                              series, created)
        return [metric]

    def _add_samples(self, metric: Metric, labels: dict[str, str],
                     series: CounterSeries | HistogramSeries, created: bool) -> None:
        """Add one series' samples (prometheus-client's names and labels) to ``metric``."""


class ReactorCounter(_Family):
    """A counter family (prometheus-client ``Counter``'s samples: ``_total``, ``_created``)."""

    kind = "counter"

    def labels(self, *values: str, **labels: str) -> CounterSeries:
        """The series for these label values (created at 0 the first time)."""
        key = tuple(str(v) for v in values) or tuple(str(labels[n]) for n in self.labelnames)
        child = self._child(key)
        assert isinstance(child, CounterSeries)
        return child

    def _new_series(self) -> CounterSeries:
        return CounterSeries()

    def _metric_name(self) -> str:
        return self.name[:-len("_total")] if self.name.endswith("_total") else self.name

    def _add_samples(self, metric: Metric, labels: dict[str, str],
                     series: CounterSeries | HistogramSeries, created: bool) -> None:
        assert isinstance(series, CounterSeries)
        name = self._metric_name()
        metric.add_sample(name + "_total", labels, series.value)
        if created:
            metric.add_sample(name + "_created", dict(labels), series.created)


class ReactorHistogram(_Family):
    """A histogram family (prometheus-client ``Histogram``'s samples: cumulative ``_bucket``
    with ``le``, ``_count``, ``_sum``, ``_created``); without label names it is its own one
    series (``observe``)."""

    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None,
                 buckets: Sequence[float] = ()) -> None:
        bounds = [float(b) for b in buckets]
        if not bounds or bounds != sorted(bounds):
            raise ValueError(f"{name}: buckets must be given, in increasing order")
        if bounds[-1] != INF:
            bounds.append(INF)
        self.bounds = tuple(bounds)
        self._les = tuple(floatToGoString(b) for b in self.bounds)
        super().__init__(name, documentation, labelnames, registry)
        #: A family without label names has its one series from the start (as in
        #: prometheus-client: it is exported before its first observation).
        self._only = None if self.labelnames else self.labels()

    def labels(self, *values: str, **labels: str) -> HistogramSeries:
        """The series for these label values (empty the first time)."""
        key = tuple(str(v) for v in values) or tuple(str(labels[n]) for n in self.labelnames)
        child = self._child(key)
        assert isinstance(child, HistogramSeries)
        return child

    def observe(self, amount: float) -> None:
        """Observe ``amount`` in the family's one series (a family without label names)."""
        if self._only is None:
            raise ValueError(f"{self.name}: a labelled histogram is observed through labels()")
        self._only.observe(amount)

    def _new_series(self) -> HistogramSeries:
        return HistogramSeries(self.bounds)

    def _add_samples(self, metric: Metric, labels: dict[str, str],
                     series: CounterSeries | HistogramSeries, created: bool) -> None:
        assert isinstance(series, HistogramSeries)
        name = self.name
        total = 0.0
        for le, count in zip(self._les, series.counts, strict=True):
            total += count
            metric.add_sample(name + "_bucket", {**labels, "le": le}, total)
        metric.add_sample(name + "_count", dict(labels), total)
        if self.bounds[0] >= 0:
            metric.add_sample(name + "_sum", dict(labels), series.sum)
        if created:
            metric.add_sample(name + "_created", dict(labels), series.created)
