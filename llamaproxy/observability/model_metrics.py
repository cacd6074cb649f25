"""Metrics of models started on demand: loads, unloads, swaps, load durations and waits.

``ModelMetrics`` is the ``ModelEvents`` listener of every ``OnDemandModel`` and ``SwapGroup``
(``llamaproxy.backends.on_demand``, ``llamaproxy.backends.swap_group``); the per-backend state
gauge is rendered from the router with the breaker families (``GatewayMetrics``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

#: A load takes from a fraction of a second (a tiny model, warm page cache) to minutes.
LOAD_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ModelMetrics:
    """``llamaproxy_model_*``: what on-demand models did (see docs/metrics.md)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._loads = Counter(
            "llamaproxy_model_loads_total",
            "On-demand model loads started, by backend and reason (request, swap, preload, "
            "operator).", ["backend", "reason"], registry=registry)
        self._unloads = Counter(
            "llamaproxy_model_unloads_total",
            "On-demand models stopped, by backend and reason (idle, swap, operator).",
            ["backend", "reason"], registry=registry)
        self._swaps = Counter(
            "llamaproxy_model_swaps_total",
            "Swaps started in a group: a running model stopped to make room for a waiting one.",
            ["group"], registry=registry)
        self._load_seconds = Histogram(
            "llamaproxy_model_load_seconds",
            "Time from starting an on-demand model's child to its being ready (or failing).",
            ["backend", "outcome"], registry=registry, buckets=LOAD_BUCKETS)
        self._load_wait = Histogram(
            "llamaproxy_model_load_wait_seconds",
            "Time requests spent waiting for their on-demand model to be started or swapped in.",
            registry=registry, buckets=LOAD_BUCKETS)

    def load_started(self, backend: str, reason: str) -> None:
        """A model's child was started."""
        self._loads.labels(backend=backend, reason=reason).inc()

    def load_finished(self, backend: str, seconds: float, ok: bool) -> None:
        """A load ended: ready (``ok``) or failed."""
        self._load_seconds.labels(backend=backend, outcome="ready" if ok else "failed").observe(
            seconds)

    def unloaded(self, backend: str, reason: str) -> None:
        """A model's child was stopped."""
        self._unloads.labels(backend=backend, reason=reason).inc()

    def swapped(self, group: str, stopped: str, started: str) -> None:
        """A swap began in ``group``: ``stopped`` makes room for ``started``."""
        self._swaps.labels(group=group).inc()

    def load_waited(self, seconds: float) -> None:
        """A request waited ``seconds`` for its model's load (whatever the outcome)."""
        self._load_wait.observe(seconds)
