"""The operator page's numbers over time: a 15-minute series and per-key rates over the last minute.

:class:`Sampler` reads the metrics' cumulative counters every ``interval`` seconds (5 s) and keeps
the differences: requests/s, completion tokens/s, queue depth and p95 time to first byte of the
interval (from the first-byte histogram's buckets, interpolated as Prometheus'
``histogram_quantile`` does), in a ring of ``points`` samples (180: 15 minutes). Per key it keeps
the last minute of differences, only for keys that did something. Nothing is done per request:
the work is one read of the counters per interval, O(keys that ever sent a request).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llamaproxy.observability.metrics import MetricTotals

log = Logger()

#: Seconds between samples, and samples kept (15 minutes).
INTERVAL = 5.0
POINTS = 180


@dataclass(frozen=True, slots=True)
class Point:
    """One interval of the series."""

    at: float
    requests_per_second: float
    tokens_per_second: float
    queue_depth: int
    p95_ttft_ms: float | None


@dataclass(frozen=True)
class KeyRates:
    """One key's last minute."""

    key_id: str
    requests: int
    tokens: int
    rate_limited: int


def quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """The ``q`` quantile of a cumulative histogram ((upper bound, count) sorted by bound), as
    Prometheus' ``histogram_quantile``: linear inside the bucket; None without observations."""
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # the highest finite bound, as Prometheus does
            if count == lower_count:
                return bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def _difference(
    now: tuple[tuple[float, float], ...], before: tuple[tuple[float, float], ...]
) -> tuple[tuple[float, float], ...]:
    earlier = dict(before)
    return tuple((bound, count - earlier.get(bound, 0.0)) for bound, count in now)


class Sampler:
    """Samples ``totals()`` and ``key_totals()`` every ``interval`` seconds into bounded rings."""

    def __init__(
        self,
        totals: Callable[[], MetricTotals],
        key_totals: Callable[[], Mapping[str, tuple[int, int, int]]],
        clock: IReactorTime,
        interval: float = INTERVAL,
        points: int = POINTS,
    ) -> None:
        self._totals = totals
        self._key_totals = key_totals
        self.clock = clock
        self.interval = interval
        self.points: deque[Point] = deque(maxlen=points)
        #: Per-key differences of the last minute, one sparse dict per interval.
        self._key_deltas: deque[dict[str, tuple[int, int, int]]] = deque(
            maxlen=max(1, round(60 / interval))
        )
        self._last: MetricTotals | None = None
        self._last_keys: dict[str, tuple[int, int, int]] = {}
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock

    def start(self) -> None:
        """Take a first reading now and sample every ``interval`` seconds."""
        if not self._loop.running:
            self._loop.start(self.interval, now=True).addErrback(
                lambda f: log.failure("The operator page's sampler stopped", f)
            )

    def stop(self) -> None:
        """Stop sampling."""
        if self._loop.running:
            self._loop.stop()

    def sample(self) -> None:
        """Read the counters once and record the differences since the last reading."""
        now = self.clock.seconds()
        totals = self._totals()
        last = self._last
        self._last = totals
        keys = dict(self._key_totals())
        deltas: dict[str, tuple[int, int, int]] = {}
        previous = self._last_keys
        for key_id, (r, t, x) in keys.items():
            pr, pt, px = previous.get(key_id, (0, 0, 0))
            if (r, t, x) != (pr, pt, px):
                deltas[key_id] = (max(0, r - pr), max(0, t - pt), max(0, x - px))
        self._last_keys = keys
        if last is None:
            return  # the first reading is the baseline
        self._key_deltas.append(deltas)
        elapsed = self.interval
        p95 = quantile(0.95, _difference(totals.first_byte_buckets, last.first_byte_buckets))
        self.points.append(Point(
            at=now,
            requests_per_second=max(0, totals.requests - last.requests) / elapsed,
            tokens_per_second=max(0, totals.completion_tokens - last.completion_tokens) / elapsed,
            queue_depth=totals.queue_depth,
            p95_ttft_ms=None if p95 is None else p95 * 1000,
        ))

    def key_rates(self) -> list[KeyRates]:
        """Keys active in the last minute, busiest first."""
        sums: dict[str, list[int]] = {}
        for deltas in self._key_deltas:
            for key_id, (r, t, x) in deltas.items():
                total = sums.setdefault(key_id, [0, 0, 0])
                total[0] += r
                total[1] += t
                total[2] += x
        rates = [KeyRates(key_id, r, t, x) for key_id, (r, t, x) in sums.items()]
        rates.sort(key=lambda k: (-k.requests, -k.tokens, k.key_id))
        return rates

    def minute_covered(self) -> float:
        """Seconds of the last minute the per-key rates cover (less than 60 just after start)."""
        return len(self._key_deltas) * self.interval
