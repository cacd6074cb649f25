"""Gateway metrics: the older gateway's 11 counters, histograms, per-key series, backend re-export.

Everything lives on an explicit ``CollectorRegistry`` (never prometheus-client's global one), so
tests stay isolated and the process exposes only what the gateway registers. Three render paths
share one ``GatewayMetrics``:

- JSON ``{"gateway": {...}}``, the older gateway's document (the default for ``/metrics``);
- Prometheus text 0.0.4 and OpenMetrics 1.0, chosen from ``Accept`` with prometheus-client's
  ``choose_encoder`` (what scrapers send);
- either text format plus the per-key series, for an authenticated caller or the separate
  metrics listener only (key ids must not leak to the public).

The hot path is ``GatewayMetrics.request_started`` and the ``RequestTimer`` it returns: label
children are resolved once per route and cached per (status, model), time comes from the
injected clock, and nothing is formatted per chunk. The per-request counters and histograms
are ``reactor_series`` families (plain numbers, no lock: they are only updated on the reactor
thread), not prometheus-client's locked ones: one whole proxied request — ``request_started``,
``authenticated``, ``queued``, ``admitted``, ``backend_sent``, ``backend_headers``,
``first_byte_sent``, ``tokens``, ``finished`` — went from 99 000 to 45 000 instructions
(callgrind, 2026-12-03), 12.7 to 5.8 µs with ``timeit`` on the shared 2-core host. Rendering
the text format (no backend families) takes about 2.3 ms, on the reactor thread.

The child's own ``llamacpp:*`` metrics come from ``backend_metrics.BackendMetricsScraper``
(``add_scraper``). Never use ``prometheus_client.twisted``: it renders on the reactor thread
pool and imports the global reactor.

Its size is the metric catalogue: every family the gateway exports is declared here next to the
code that updates it, so docs/metrics.md and the dashboard can be checked against one registry.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from llamaproxy.backends.admission import Admission
from llamaproxy.backends.affinity_metrics import prompt_cache_families
from llamaproxy.backends.backend import Backend, BackendState
from llamaproxy.gateway.errors import GatewayError
from llamaproxy.observability.model_metrics import ModelMetrics
from llamaproxy.observability.reactor_series import ReactorCounter, ReactorHistogram
from llamaproxy.supervision.child_metrics import BackendMetricsScraper

log = Logger()

# --- label vocabularies ----------------------------------------------------------------------

#: The ``route`` label: a small fixed set, never a raw path.
ROUTES = ("chat", "completions", "embeddings", "models", "other")

_ROUTE_OF_PATH: dict[bytes, str] = {
    b"/v1/chat/completions": "chat",
    b"/v1/completions": "completions",
    b"/v1/embeddings": "embeddings",
    b"/v1/models": "models",
}

#: The ``reason`` label of ``llamaproxy_rejections_total``; anything else becomes "other".
REJECTION_REASONS = (
    "auth",  # 401: missing, unknown or expired key (gateway_requests_unauthorized)
    "forbidden",  # 403: a valid key that may not do this (POST /reload by a non-admin)
    "rate_limit",  # 429
    "queue_full",  # 503 queue_full (gateway_queue_rejections)
    "queue_timeout",  # 503 after QUEUE_TIMEOUT waiting for a slot or a ready backend
    "backend_unavailable",  # 503 while the backend loads, restarts or stops
    "payload_too_large",  # 413
    "bad_request",  # 400
    "uri_too_long",  # 414
    "headers_too_large",  # 431
    "client_timeout",  # 408: the client did not send its request in time
    "not_found",  # 404
    "method_not_allowed",  # 405
    "other",
)
_REASONS = frozenset(REJECTION_REASONS)

_REASON_OF_CODE: dict[str | int, str] = {
    "invalid_api_key": "auth",
    "forbidden": "forbidden",
    "rate_limit_exceeded": "rate_limit",
    "queue_full": "queue_full",
    "queue_timeout": "queue_timeout",
    "backend_unavailable": "backend_unavailable",
    "payload_too_large": "payload_too_large",
    "bad_request": "bad_request",
    "uri_too_long": "uri_too_long",
    "header_fields_too_large": "headers_too_large",
    "request_timeout": "client_timeout",
    "not_found": "not_found",
    "model_not_found": "not_found",
    "method_not_allowed": "method_not_allowed",
}
_REASON_OF_STATUS = {
    400: "bad_request", 401: "auth", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 408: "client_timeout", 413: "payload_too_large",
    414: "uri_too_long", 429: "rate_limit", 431: "headers_too_large",
}

#: ``finished(outcome=...)`` values that mean the whole response reached the client.
#: "complete" is StreamRelay's word, "answered" the resource's for a response it wrote itself.
COMPLETE_OUTCOMES = frozenset({"complete", "completed", "answered"})
#: The ``outcome`` label of ``llamaproxy_requests_interrupted_total``; others become "other".
INTERRUPTED_OUTCOMES = (
    "client_gone", "backend_failed", "idle_timeout", "timeout", "shutdown", "other",
)
_INTERRUPTED = frozenset(INTERRUPTED_OUTCOMES)

#: Status label for a client that left before any response byte was sent (nginx's convention).
CLIENT_CLOSED_STATUS = 499

_STATES = tuple(BackendState)

# --- histogram buckets (seconds) -------------------------------------------------------------

#: Whole requests: from a few ms (embeddings, errors) to REQUEST_TIMEOUT (300 s).
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)
#: Time to first byte and backend latency: prompt processing dominates.
FIRST_BYTE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
#: Queue wait: zero for most requests, up to QUEUE_TIMEOUT (60 s default) and beyond.
#: What ``llamaproxy_model_state`` reports (``on_demand.ModelState`` values).
MODEL_STATES = ("stopped", "loading", "ready", "failed", "stopping")
QUEUE_WAIT_BUCKETS = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
#: Gateway overhead: should stay well under a millisecond.
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)

_JSON = b"application/json"


def route_label(path: bytes) -> str:
    """The ``route`` label for a request path (query string already removed)."""
    route = _ROUTE_OF_PATH.get(path)
    if route is not None:
        return route
    if path.startswith(b"/v1/models/"):
        return "models"
    return "other"


def rejection_reason(error: GatewayError) -> str | None:
    """The ``reason`` label for an error the gateway answered itself, or None if not a rejection.

    502, 504 and 500 are failures, not rejections: they return None.
    """
    reason = _REASON_OF_CODE.get(error.code)
    if reason is None:
        reason = _REASON_OF_STATUS.get(error.status)
    return reason


# --- content negotiation ---------------------------------------------------------------------


def choose_format(accept: str | None) -> str:
    """"json", "prometheus" or "openmetrics" for an ``Accept`` header, as SPEC's /metrics says.

    JSON unless ``Accept`` mentions ``text/plain`` or ``application/openmetrics-text``
    (case-insensitive, like the older gateway); then prometheus-client's ``choose_encoder``
    decides between the two text formats (OpenMetrics needs version >= 1.0.0, or none).
    """
    if not accept:
        return "json"
    lowered = accept.lower()
    if "text/plain" not in lowered and "application/openmetrics-text" not in lowered:
        return "json"
    _, content_type = choose_encoder(lowered)
    if content_type.startswith("application/openmetrics-text"):
        return "openmetrics"
    return "prometheus"


def _media_param(content_type: str, name: str) -> str | None:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.strip() == name:
            return value.strip()
    return None


def exit_code_of(last_exit: str | int | None) -> int | None:
    """A numeric exit status from ``Backend.last_exit`` ("exit code 1: …", "signal 9 (…)…").

    A death by signal N is reported as 128 + N, the shell's convention.
    """
    if last_exit is None or isinstance(last_exit, int):
        return last_exit
    match = re.search(r"\bsignal (\d+)", last_exit)
    if match:
        return 128 + int(match.group(1))
    match = re.search(r"\bexit code (-?\d+)", last_exit)
    if match:
        return int(match.group(1))
    return None


class _FunctionCollector(Collector):
    """A collector whose ``collect`` is a function (families built at scrape time)."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class _Combined(Collector):
    """Several registries rendered as one (the public registry plus the per-key series)."""

    def __init__(self, *sources: CollectorRegistry) -> None:
        self._sources = sources

    def collect(self) -> Iterable[Metric]:
        for source in self._sources:
            yield from source.collect()


# --- per-route series and the request timer --------------------------------------------------


class _RouteSeries:
    """The label children of one route, resolved once."""

    __slots__ = (
        "backend_latency", "backend_responses", "bytes", "duration", "first_byte",
        "interrupted", "metrics", "overhead", "requests", "route",
    )

    def __init__(self, metrics: GatewayMetrics, route: str) -> None:
        self.metrics = metrics
        self.route = route
        self.duration = metrics._duration.labels(route=route)
        self.first_byte = metrics._first_byte.labels(route=route)
        self.backend_latency = metrics._backend_latency.labels(route=route)
        self.overhead = metrics._overhead.labels(route=route)
        self.bytes = metrics._bytes.labels(route=route)
        self.requests: dict[tuple[int, str], Any] = {}
        self.backend_responses: dict[int, Any] = {}
        self.interrupted: dict[str, Any] = {}

    def request_counter(self, status: int, model: str) -> Any:
        child = self.requests.get((status, model))
        if child is None:
            child = self.metrics._requests.labels(
                route=self.route, status=str(status), model=model
            )
            self.requests[(status, model)] = child
        return child

    def backend_counter(self, status: int) -> Any:
        child = self.backend_responses.get(status)
        if child is None:
            child = self.metrics._backend_responses.labels(route=self.route, status=str(status))
            self.backend_responses[status] = child
        return child

    def interrupted_counter(self, outcome: str) -> Any:
        child = self.interrupted.get(outcome)
        if child is None:
            label = outcome if outcome in _INTERRUPTED else "other"
            child = self.metrics._interrupted.labels(route=self.route, outcome=label)
            self.interrupted[outcome] = child
        return child


class RequestTimer:
    """Measures one request; the gateway calls its methods as the request moves along.

    Order: ``authenticated`` → [``queued``] → ``admitted`` → ``backend_sent`` (once per
    attempt) → ``backend_headers`` → ``first_byte_sent`` → ``finished`` (exactly once, however
    the request ends). Any step may be skipped (a 401 goes straight to ``rejected`` and
    ``finished``); calls after ``finished`` are ignored.
    """

    __slots__ = (
        "_admitted_at", "_done", "_first_byte_at", "_headers_at", "_metrics", "_queued_at",
        "_sent_at", "_sent_first_at", "_series", "_started", "_wait", "key_id",
    )

    def __init__(self, metrics: GatewayMetrics, series: _RouteSeries, started: float) -> None:
        self._metrics = metrics
        self._series = series
        self._started = started
        #: The caller's key id once authenticated (per-key series use it).
        self.key_id: str | None = None
        self._queued_at: float | None = None
        self._admitted_at: float | None = None
        self._wait = 0.0
        self._sent_first_at: float | None = None
        self._sent_at: float | None = None
        self._headers_at: float | None = None
        self._first_byte_at: float | None = None
        self._done = False

    @property
    def route(self) -> str:
        """The request's route label."""
        return self._series.route

    @property
    def queue_wait(self) -> float:
        """Seconds the request waited for a slot or a ready backend (0 until it left the queue)."""
        return self._wait

    def authenticated(self, key_id: str) -> None:
        """A key was verified for this request (not called when authentication is off)."""
        self.key_id = key_id
        self._metrics.authenticated(key_id)

    def queued(self) -> None:
        """The request starts waiting (for a slot or for a ready backend); repeats are ignored."""
        if self._queued_at is None and self._admitted_at is None and not self._done:
            self._queued_at = self._metrics._clock.seconds()
            self._metrics._queue_depth += 1

    def admitted(self) -> None:
        """The request may go to the backend (it holds a slot, or needs none: /v1/models).

        Counts it in ``gateway_requests_total`` and ``gateway_requests_active``; the queue wait
        is measured here from ``queued()`` (0 when it never waited).
        """
        if self._admitted_at is not None or self._done:
            return
        m = self._metrics
        now = self._admitted_at = m._clock.seconds()
        if self._queued_at is None:
            # It never waited: ``m._queue_wait_series.observe(0.0)``, in line (its bucket found
            # once; adding 0.0 to the sum leaves it as it is).
            m._queue_wait_series.counts[m._queue_wait_zero] += 1
        else:
            self._leave_queue(now)
        m._requests_total += 1
        m._active += 1

    #: The brief's name for ``admitted``: the timer measures the wait itself.
    dequeued = admitted

    def _leave_queue(self, now: float) -> None:
        """The request stops waiting (``queued`` was called): count and observe its wait."""
        assert self._queued_at is not None
        wait = now - self._queued_at
        self._queued_at = None
        self._wait = wait
        m = self._metrics
        m._queue_depth -= 1
        m._queue_wait_total += wait
        m._queue_wait_series.observe(wait)

    def backend_sent(self) -> None:
        """The request was handed to the backend agent (call again for a retry)."""
        now = self._metrics._clock.seconds()
        if self._sent_first_at is None:
            self._sent_first_at = now
        self._sent_at = now

    def backend_headers(self, status: int) -> None:
        """The backend's response headers arrived with ``status``."""
        if self._done or self._headers_at is not None:
            return
        now = self._headers_at = self._metrics._clock.seconds()
        series = self._series
        if self._sent_at is not None:
            # ``series.backend_latency.observe(now - self._sent_at)``, in line.
            latency = now - self._sent_at
            histogram = series.backend_latency
            histogram.counts[bisect_left(histogram.bounds, latency)] += 1
            histogram.sum += latency
        # ``series.backend_counter(status).inc()``, in line for a status seen before.
        child = series.backend_responses.get(status)
        if child is None:
            child = series.backend_counter(status)
        child.value += 1

    def first_byte_sent(self) -> float | None:
        """The response starts going out to the client (its first ``request.write``).

        Returns the gateway's overhead in seconds (what the overhead histogram observed; the
        gateway also sends it as ``X-Gateway-Overhead-Ms``), or None when the request never
        reached a backend.
        """
        if self._done or self._first_byte_at is not None:
            return None
        now = self._first_byte_at = self._metrics._clock.seconds()
        series = self._series
        # ``series.first_byte.observe(now - self._started)``, in line.
        elapsed = now - self._started
        histogram = series.first_byte
        histogram.counts[bisect_left(histogram.bounds, elapsed)] += 1
        histogram.sum += elapsed
        if self._sent_first_at is None or self._headers_at is None:
            return None
        before = self._sent_first_at - self._started - self._wait
        after = now - self._headers_at
        # max(0.0, x) without the builtin's call: the same value, NaN and -0.0 included.
        overhead = (before if before > 0.0 else 0.0) + (after if after > 0.0 else 0.0)
        # ``series.overhead.observe(overhead)``, in line.
        histogram = series.overhead
        histogram.counts[bisect_left(histogram.bounds, overhead)] += 1
        histogram.sum += overhead
        return overhead

    def rejected(self, reason: str) -> None:
        """The gateway refused this request (see ``REJECTION_REASONS``)."""
        if not self._done:
            self._metrics.rejected(reason, self.key_id)

    def tokens(self, model: str | None, prompt: int, completion: int) -> None:
        """Token usage reported for this request's response."""
        self._metrics.tokens(self.key_id, model, prompt, completion)

    def finished(self, status: int, model: str | None, bytes_sent: int, outcome: str) -> None:
        """The request is over: final ``status``, body bytes sent, and how it ended.

        ``outcome``: "complete"/"answered" (the whole response went out), "client_gone", or
        why the gateway cut it ("backend_failed", "idle_timeout", "timeout", "shutdown", …).
        ``model``: the model the request was routed to (``Backend.model``), never the
        client-supplied string; None when it never got that far.
        """
        if self._done:
            return
        self._done = True
        m = self._metrics
        now = m._clock.seconds()
        if self._queued_at is not None:
            self._leave_queue(now)
        series = self._series
        complete = outcome in COMPLETE_OUTCOMES
        if not complete:
            series.interrupted_counter(outcome).inc()
            if outcome == "client_gone" and self._first_byte_at is None:
                status = CLIENT_CLOSED_STATUS
        if self._admitted_at is not None:
            m._active -= 1
            m._bytes_sent += bytes_sent
            if complete and status < 500:
                m._success += 1
            elif outcome != "client_gone":
                m._error += 1
        # ``series.request_counter(status, m._model_label(model)).inc()``, in line for a model
        # already seen (its own label) and a (status, model) counted before.
        label = model if model in m._models else m._model_label(model)
        child = series.requests.get((status, label))
        if child is None:
            child = series.request_counter(status, label)
        child.value += 1
        # ``series.duration.observe(now - self._started)``, in line.
        elapsed = now - self._started
        histogram = series.duration
        histogram.counts[bisect_left(histogram.bounds, elapsed)] += 1
        histogram.sum += elapsed
        if bytes_sent:
            series.bytes.inc(bytes_sent)
        if self.key_id is not None:
            per_key = m._key_requests
            per_key[self.key_id] = per_key.get(self.key_id, 0) + 1


# --- the metrics ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricTotals:
    """Cumulative figures a sampler differences over time (see ``GatewayMetrics.totals``)."""

    #: Requests finished, every status.
    requests: int
    #: Completion tokens reported by backends.
    completion_tokens: int
    #: Requests waiting for a slot or a ready backend right now.
    queue_depth: int
    #: Time to first byte of chat and completion requests: (upper bound, cumulative count).
    first_byte_buckets: tuple[tuple[float, float], ...]



class GatewayMetrics:
    """All of the gateway's metrics, on one registry (plus a private one for per-key series)."""

    def __init__(
        self,
        clock: IReactorTime,
        registry: CollectorRegistry | None = None,
        max_models: int = 32,
    ) -> None:
        self._clock = clock
        self.registry = registry if registry is not None else CollectorRegistry()
        #: Per-key series: rendered only with ``include_per_key`` (never on a public endpoint).
        self.per_key_registry = CollectorRegistry()
        self._started_at = clock.seconds()
        self._max_models = max_models
        self._models: set[str] = set()
        # The older gateway's counters, as plain numbers (the cheapest thing to increment).
        self._requests_total = 0
        self._success = 0
        self._error = 0
        self._active = 0
        self._authenticated = 0
        self._unauthorized = 0
        self._bytes_sent = 0
        self._queue_depth = 0
        self._queue_rejections = 0
        self._queue_wait_total = 0.0
        # Per-key counts, by key id.
        self._key_requests: dict[str, int] = {}
        #: [prompt, completion] tokens by key id.
        self._key_tokens: dict[str, list[int]] = {}
        self._key_rejections: dict[tuple[str, str], int] = {}
        self._backends: list[tuple[Backend, list[float | None]]] = []
        self._admission: Admission | None = None
        self._certificate_expiry: Callable[[], float] | None = None
        #: The shared state store (STATE_URL), when there is one: its status and latency.
        self._state_store: Any = None
        self._slot_leases: Any = None
        self._router: Callable[[], Any] | None = None
        self._scrapers: list[BackendMetricsScraper] = []

        reg = self.registry
        self._duration = ReactorHistogram(
            "llamaproxy_request_duration_seconds",
            "Time from the request reaching the gateway to the end of its response.",
            ["route"], registry=reg, buckets=DURATION_BUCKETS)
        self._first_byte = ReactorHistogram(
            "llamaproxy_time_to_first_byte_seconds",
            "Time from the request reaching the gateway to its response starting to go out.",
            ["route"], registry=reg, buckets=FIRST_BYTE_BUCKETS)
        self._queue_wait = ReactorHistogram(
            "llamaproxy_queue_wait_seconds",
            "Time spent waiting for a concurrency slot or a ready backend.",
            registry=reg, buckets=QUEUE_WAIT_BUCKETS)
        #: Its one series (no label names), observed directly.
        self._queue_wait_series = self._queue_wait.labels()
        #: The bucket a wait of 0 falls in (``admitted`` counts it there without ``observe``).
        self._queue_wait_zero = bisect_left(self._queue_wait_series.bounds, 0.0)
        self._backend_latency = ReactorHistogram(
            "llamaproxy_backend_latency_seconds",
            "Time from sending a request to the backend to its response headers.",
            ["route"], registry=reg, buckets=FIRST_BYTE_BUCKETS)
        self._overhead = ReactorHistogram(
            "llamaproxy_gateway_overhead_seconds",
            "Time to first byte spent in the gateway itself: before the backend send "
            "(queue wait excluded) plus from backend headers to the first byte to the client.",
            ["route"], registry=reg, buckets=OVERHEAD_BUCKETS)
        self._requests = ReactorCounter(
            "llamaproxy_requests_total", "Requests by route, final status and model.",
            ["route", "status", "model"], registry=reg)
        self._backend_responses = ReactorCounter(
            "llamaproxy_backend_responses_total", "Backend responses by route and status.",
            ["route", "status"], registry=reg)
        self._interrupted = ReactorCounter(
            "llamaproxy_requests_interrupted_total",
            "Requests whose response did not reach the client whole, by why.",
            ["route", "outcome"], registry=reg)
        self._bytes = ReactorCounter(
            "llamaproxy_response_bytes_total", "Response body bytes sent to clients.",
            ["route"], registry=reg)
        self._rejections = ReactorCounter(
            "llamaproxy_rejections_total", "Requests the gateway refused, by reason.",
            ["reason"], registry=reg)
        self._tokens = ReactorCounter(
            "llamaproxy_tokens_total", "Tokens reported by the backend, by kind and model.",
            ["kind", "model"], registry=reg)
        #: On-demand models' loads, unloads, swaps and load waits.
        self.models = ModelMetrics(reg)
        self._series = {route: _RouteSeries(self, route) for route in ROUTES}
        self._rejection_children = {
            reason: self._rejections.labels(reason=reason) for reason in REJECTION_REASONS
        }
        self._token_children: dict[str, tuple[Any, Any]] = {}
        reg.register(_FunctionCollector(self._legacy_families))
        reg.register(_FunctionCollector(self._live_families))
        reg.register(_FunctionCollector(self._backend_families))
        self.per_key_registry.register(_FunctionCollector(self._per_key_families))
        self._with_per_key = _Combined(self.registry, self.per_key_registry)

    def fast_paths(self, active: tuple[str, ...], known: tuple[str, ...]) -> None:
        """``llamaproxy_fast_path_active{path}``: 1 for each fast path this process runs."""
        gauge = Gauge("llamaproxy_fast_path_active",
                      "1 for each fast path that runs (FAST_PATHS, the startup contract check).",
                      ["path"], registry=self.registry)
        for name in known:
            gauge.labels(path=name).set(1 if name in active else 0)

    # -- events ---------------------------------------------------------------------------

    def request_started(self, route: str, key_id: str | None = None) -> RequestTimer:
        """A request for ``route`` (see ``route_label``) arrived; measure it with the timer.

        ``key_id``: the caller's key when it was already verified (and counted with
        ``authenticated``) before the timer existed, e.g. in the early check.
        """
        series = self._series.get(route) or self._series["other"]
        timer = RequestTimer(self, series, self._clock.seconds())
        timer.key_id = key_id
        return timer

    def authenticated(self, key_id: str) -> None:
        """A key was verified (proxied routes, /reload, an authenticated /metrics)."""
        self._authenticated += 1

    def rejected(self, reason: str, key_id: str | None = None) -> None:
        """The gateway refused a request; ``key_id`` when the caller was already known."""
        if reason not in _REASONS:
            reason = "other"
        self._rejection_children[reason].inc()
        if reason == "auth":
            self._unauthorized += 1
        elif reason == "queue_full":
            self._queue_rejections += 1
        if key_id is not None:
            counts = self._key_rejections
            counts[(key_id, reason)] = counts.get((key_id, reason), 0) + 1

    def tokens(self, key_id: str | None, model: str | None, prompt: int, completion: int) -> None:
        """Token usage of one response (from its ``usage`` object)."""
        label = self._model_label(model)
        children = self._token_children.get(label)
        if children is None:
            children = (
                self._tokens.labels(kind="prompt", model=label),
                self._tokens.labels(kind="completion", model=label),
            )
            self._token_children[label] = children
        if prompt:
            children[0].inc(prompt)
        if completion:
            children[1].inc(completion)
        if key_id is not None:
            counts = self._key_tokens.get(key_id)
            if counts is None:
                counts = self._key_tokens[key_id] = [0, 0]
            counts[0] += prompt
            counts[1] += completion

    def _model_label(self, model: str | None) -> str:
        """``model``, or "none", or "other" once ``max_models`` distinct names were seen."""
        if not model:
            return "none"
        if model in self._models:
            return model
        if len(self._models) >= self._max_models:
            return "other"
        self._models.add(model)
        return model

    # -- live objects read at scrape time -------------------------------------------------

    def watch_backend(self, backend: Backend) -> None:
        """Export ``backend``'s state, restarts, last exit code and uptime (once per backend)."""
        if any(watched is backend for watched, _ in self._backends):
            return
        ready_since: list[float | None] = [
            self._clock.seconds() if backend.state is BackendState.READY else None
        ]

        def on_state(b: Backend) -> None:
            ready_since[0] = self._clock.seconds() if b.state is BackendState.READY else None

        backend.listeners.append(on_state)
        self._backends.append((backend, ready_since))

    def watch_admission(self, admission: Admission) -> None:
        """Export ``admission``'s active and waiting counts and its limits."""
        self._admission = admission

    def add_scraper(self, scraper: BackendMetricsScraper) -> None:
        """Re-export the ``llamacpp:*`` families ``scraper`` fetches (once per scraper)."""
        if scraper in self._scrapers:
            return
        self._scrapers.append(scraper)

    def prune_keys(self, live_key_ids: Collection[str]) -> None:
        """Forget the per-key series of keys no longer configured (e.g. after a reload)."""
        live = set(live_key_ids)
        self._key_requests = {k: v for k, v in self._key_requests.items() if k in live}
        self._key_tokens = {k: v for k, v in self._key_tokens.items() if k in live}
        self._key_rejections = {k: v for k, v in self._key_rejections.items() if k[0] in live}

    # -- totals for samplers (the operator page) -----------------------------------------

    def totals(self) -> MetricTotals:
        """Cumulative counts since start, read at call time (nothing is added per request)."""
        requests = sum(
            s.value for m in self._requests.collect() for s in m.samples
            if s.name.endswith("_total")
        )
        tokens = sum(
            s.value for m in self._tokens.collect() for s in m.samples
            if s.name.endswith("_total") and s.labels.get("kind") == "completion"
        )
        buckets: dict[float, float] = {}
        for m in self._first_byte.collect():
            for s in m.samples:
                if s.name.endswith("_bucket") and s.labels.get("route") in ("chat", "completions"):
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
        return MetricTotals(
            requests=int(requests),
            completion_tokens=int(tokens),
            queue_depth=self._queue_depth,
            first_byte_buckets=tuple(sorted(buckets.items())),
        )

    def key_totals(self) -> dict[str, tuple[int, int, int]]:
        """Per key id: (requests, tokens, 429 refusals) since start (or the key's last prune)."""
        totals: dict[str, tuple[int, int, int]] = {
            key_id: (count, 0, 0) for key_id, count in self._key_requests.items()
        }
        for key_id, (prompt, completion) in self._key_tokens.items():
            r, t, x = totals.get(key_id, (0, 0, 0))
            totals[key_id] = (r, t + prompt + completion, x)
        for (key_id, reason), count in self._key_rejections.items():
            if reason == "rate_limit":
                r, t, x = totals.get(key_id, (0, 0, 0))
                totals[key_id] = (r, t, x + count)
        return totals

    # -- output ---------------------------------------------------------------------------

    def legacy_json(self) -> dict[str, dict[str, int | float]]:
        """The older gateway's ``/metrics`` JSON: ``{"gateway": {...11 fields...}}``."""
        return {"gateway": {
            "requests_total": self._requests_total,
            "requests_success": self._success,
            "requests_error": self._error,
            "requests_active": self._active,
            "requests_authenticated": self._authenticated,
            "requests_unauthorized": self._unauthorized,
            "bytes_sent": self._bytes_sent,
            "queue_depth": self._queue_depth,
            "queue_rejections": self._queue_rejections,
            "queue_wait_seconds_total": round(self._queue_wait_total, 3),
            "uptime_seconds": int(self._clock.seconds() - self._started_at),
        }}

    def render(self, accept_header: str | None, include_per_key: bool) -> tuple[bytes, bytes]:
        """The /metrics body and its content type for ``Accept: accept_header``.

        ``include_per_key`` adds the per-key series to the text formats: only for an
        authenticated caller (``METRICS_AUTH_ENABLED``) or the separate metrics listener.
        The JSON document is the older gateway's and never has per-key data.
        """
        fmt = choose_format(accept_header)
        if fmt == "json":
            return json.dumps(self.legacy_json(), indent=2).encode() + b"\n", _JSON
        source: Collector = self._with_per_key if include_per_key else self.registry
        encoder, content_type = choose_encoder((accept_header or "").lower())
        if fmt == "openmetrics":
            # prometheus-client 0.26 turns ":" into "_" in OpenMetrics sample lines but not in
            # their HELP/TYPE lines (prometheus/client_python#1177), which breaks llamacpp:*
            # names. Every name here is a legal classic name (re-exported ones are checked),
            # so "allow-utf-8" escaping writes them exactly as correct "underscores" would.
            version = _media_param(content_type, "version") or "1.0.0"
            body = openmetrics.generate_latest(source, escaping=openmetrics.ALLOWUTF8,
                                               version=version)
        else:
            body = encoder(source)
        return body, content_type.encode("ascii")

    # -- families built at scrape time ----------------------------------------------------

    def _legacy_families(self) -> Iterator[Metric]:
        """The older gateway's 11 metrics under their exact names.

        prometheus-client appends ``_total`` to every counter sample (and OpenMetrics requires
        it), so the two legacy counters already named ``…_total`` are real counters, and the
        six others (``gateway_requests_success`` …) are exposed as untyped (OpenMetrics
        ``unknown``) to keep their names; the three gauges are gauges.
        """
        doc = self.legacy_json()["gateway"]
        yield CounterMetricFamily(
            "gateway_requests", "Proxied requests admitted to the backend.",
            value=doc["requests_total"])
        for field, help_text in (
            ("requests_success", "Proxied requests completed with a backend status below 500."),
            ("requests_error", "Proxied requests that failed: 502, 504, backend 5xx or cut off."),
        ):
            yield _untyped("gateway_" + field, help_text, doc[field])
        yield GaugeMetricFamily(
            "gateway_requests_active", "Proxied requests in flight.", value=doc["requests_active"])
        for field, help_text in (
            ("requests_authenticated", "Requests with a verified API key."),
            ("requests_unauthorized", "Requests refused with 401 (429s are not counted here)."),
            ("bytes_sent", "Response body bytes sent for proxied requests."),
        ):
            yield _untyped("gateway_" + field, help_text, doc[field])
        yield GaugeMetricFamily(
            "gateway_queue_depth", "Requests waiting for a slot or a ready backend.",
            value=doc["queue_depth"])
        yield _untyped("gateway_queue_rejections", "Requests refused with 503 queue_full.",
                       doc["queue_rejections"])
        yield CounterMetricFamily(
            "gateway_queue_wait_seconds", "Cumulative time requests spent waiting.",
            value=self._queue_wait_total)
        yield GaugeMetricFamily(
            "gateway_uptime_seconds", "Whole seconds since the gateway started.",
            value=doc["uptime_seconds"])

    def watch_router(self, router: Callable[[], Any]) -> None:
        """Export each backend's circuit breaker: state, and attempts by outcome.

        ``router`` returns the live ``routing.Router`` (it is replaced on reloads). Every attempt
        on a backend settles a breaker ticket, so the breaker's counters count the attempts.
        """
        self._router = router

    def _breaker_families(self) -> Iterator[Metric]:
        router = self._router() if self._router is not None else None
        if router is None:
            return
        state = GaugeMetricFamily("llamaproxy_breaker_state",
                                  "1 for the backend's circuit-breaker state, 0 for the others.",
                                  labels=["backend", "state"])
        attempts = CounterMetricFamily(
            "llamaproxy_backend_attempts",
            "Attempts on a backend by outcome and, for failures, reason (refused, reset, "
            "timeout, connect_error, 5xx, 429, other); failover included.",
            labels=["backend", "outcome", "reason"])
        opens = CounterMetricFamily("llamaproxy_breaker_opens",
                                    "Times the backend's breaker opened.", labels=["backend"])
        skipped = CounterMetricFamily("llamaproxy_breaker_rejections",
                                      "Requests that skipped the backend: its breaker was open.",
                                      labels=["backend"])
        # Each backend's own admission (the llamaproxy_admission_* families describe the
        # default model's backend only, as the older gateway's single queue did).
        active = GaugeMetricFamily("llamaproxy_backend_slots_active",
                                   "The backend's concurrency slots in use.", labels=["backend"])
        slots = GaugeMetricFamily("llamaproxy_backend_slots",
                                  "The backend's concurrency slots (max_concurrent).",
                                  labels=["backend"])
        waiting = GaugeMetricFamily("llamaproxy_backend_queue_waiting",
                                    "Requests waiting for one of the backend's slots.",
                                    labels=["backend"])
        model_state = GaugeMetricFamily(
            "llamaproxy_model_state",
            "1 for an on-demand backend's model state (stopped, loading, ready, failed, "
            "stopping), 0 for the others.", labels=["backend", "state"])
        for name, member in router.members.items():
            breaker = member.breaker
            for value in ("closed", "open", "half_open"):
                state.add_metric([name, value], 1.0 if breaker.state.value == value else 0.0)
            attempts.add_metric([name, "success", ""], breaker.successes)
            for reason, count in sorted(breaker.failure_reasons.items()):
                attempts.add_metric([name, "failure", reason], count)
            opens.add_metric([name], breaker.opens)
            skipped.add_metric([name], breaker.rejections)
            slots.add_metric([name], member.slots)
            if member.load is not None:
                active.add_metric([name], member.load.active)
                waiting.add_metric([name], member.load.waiting)
            if member.status.on_demand_status is not None:
                current = member.status.model_state
                for value in MODEL_STATES:
                    model_state.add_metric([name, value], 1.0 if current == value else 0.0)
        yield from (state, attempts, opens, skipped, active, slots, waiting, model_state)
        yield from prompt_cache_families(router)

    def watch_certificate(self, seconds_until_expiry: Callable[[], float]) -> None:
        """Export the TLS certificate's remaining validity (the gateway's own HTTPS listener)."""
        self._certificate_expiry = seconds_until_expiry

    def watch_state_store(self, store: Any, slot_leases: Any = None) -> None:
        """Export the shared state store's status (a ``state.redis_store.RedisState``) and the
        backend slots leased from it (a ``state.slot_leases.SharedSlots``)."""
        self._state_store = store
        self._slot_leases = slot_leases

    def _state_store_families(self) -> Iterator[Metric]:
        store = self._state_store
        yield GaugeMetricFamily(
            "llamaproxy_state_store_up",
            "1 while the shared state store (Redis, STATE_URL) answers, else 0.",
            value=1 if store.health == "up" else 0)
        if store.latency is not None:
            yield GaugeMetricFamily(
                "llamaproxy_state_store_latency_seconds",
                "The last round trip to the shared state store.", value=store.latency)
        yield CounterMetricFamily(
            "llamaproxy_state_store_calls", "Calls made to the shared state store.",
            value=store.calls)
        yield CounterMetricFamily(
            "llamaproxy_state_store_failures",
            "Calls to the shared state store that failed (not connected, timeout, error).",
            value=store.failures)
        shared = self._slot_leases
        if shared is not None:
            leased = GaugeMetricFamily(
                "llamaproxy_backend_slots_leased",
                "Slots of the backend this replica holds leases for (shared through Redis).",
                labels=["backend"])
            local = GaugeMetricFamily(
                "llamaproxy_backend_slots_unshared",
                "1 while Redis is away and this replica uses the backend's slots alone.",
                labels=["backend"])
            for name, leases in shared.by_backend.items():
                leased.add_metric([name], len(leases.held))
                local.add_metric([name], 1 if leases.local else 0)
            yield leased
            yield local

    def _live_families(self) -> Iterator[Metric]:
        """Admission, backend, breaker and certificate state, read from the live objects."""
        yield from self._breaker_families()
        if self._state_store is not None:
            yield from self._state_store_families()
        if self._certificate_expiry is not None:
            yield GaugeMetricFamily(
                "llamaproxy_tls_certificate_expiry_seconds",
                "Seconds until the served TLS certificate's notAfter (negative once expired).",
                value=self._certificate_expiry())
        admission = self._admission
        if admission is not None:
            for name, help_text, value in (
                ("active", "Concurrency slots in use.", admission.active),
                ("waiting", "Requests waiting in the admission queue.", admission.waiting),
                ("slots", "Concurrency slots (MAX_CONCURRENT_REQUESTS).", admission.max_concurrent),
                ("queue_limit", "Queue bound (MAX_QUEUE_SIZE; 0 = unlimited).",
                 admission.max_queue_size),
            ):
                yield GaugeMetricFamily("llamaproxy_admission_" + name, help_text, value=value)
        if not self._backends:
            return
        now = self._clock.seconds()
        info = GaugeMetricFamily("llamaproxy_backend_info", "Backends and their model (always 1).",
                                 labels=["backend", "model"])
        state = GaugeMetricFamily("llamaproxy_backend_state",
                                  "1 for the backend's current state, 0 for the others.",
                                  labels=["backend", "state"])
        ready = GaugeMetricFamily("llamaproxy_backend_ready",
                                  "1 when the backend is ready and its last probe passed.",
                                  labels=["backend"])
        restarts = CounterMetricFamily("llamaproxy_backend_restarts",
                                       "Times the backend ended unexpectedly and was restarted.",
                                       labels=["backend"])
        exit_code = GaugeMetricFamily("llamaproxy_backend_last_exit_code",
                                      "Exit status of the last unexpected exit (signal N: 128+N).",
                                      labels=["backend"])
        uptime = GaugeMetricFamily("llamaproxy_backend_uptime_seconds",
                                   "Seconds since the backend last became ready (0 when not).",
                                   labels=["backend"])
        for backend, ready_since in self._backends:
            name = backend.name
            info.add_metric([name, backend.model], 1)
            for s in _STATES:
                state.add_metric([name, s.value], 1 if backend.state is s else 0)
            ready.add_metric([name], 1 if backend.ready else 0)
            restarts.add_metric([name], backend.restarts)
            code = exit_code_of(backend.last_exit)
            if code is not None:
                exit_code.add_metric([name], code)
            since = ready_since[0]
            uptime.add_metric([name], now - since if since is not None else 0.0)
        yield from (f for f in (info, state, ready, restarts, exit_code, uptime) if f.samples)

    def _backend_families(self) -> Iterator[Metric]:
        """The scrapers' ``llamacpp:*`` families (merged by name) and their scrape status."""
        if not self._scrapers:
            return
        now = self._clock.seconds()
        up = GaugeMetricFamily("llamaproxy_backend_scrape_up",
                               "1 when the last scrape of the backend's /metrics succeeded.",
                               labels=["backend"])
        age = GaugeMetricFamily("llamaproxy_backend_scrape_age_seconds",
                                "Seconds since the last successful scrape of the backend.",
                                labels=["backend"])
        merged: dict[str, Metric] = {}
        for scraper in self._scrapers:
            up.add_metric([scraper.backend.name], 1 if scraper.up else 0)
            if scraper.last_success is not None:
                age.add_metric([scraper.backend.name], now - scraper.last_success)
            for family in scraper.families:
                target = merged.get(family.name)
                if target is None:
                    merged[family.name] = target = Metric(
                        family.name, family.documentation, family.type, family.unit)
                elif target.type != family.type:
                    continue
                target.samples.extend(family.samples)
        yield from (f for f in (up, age) if f.samples)
        yield from merged.values()

    def _per_key_families(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("llamaproxy_key_requests",
                                       "Requests by authenticated key.", labels=["key_id"])
        for key_id, count in self._key_requests.items():
            requests.add_metric([key_id], count)
        tokens = CounterMetricFamily("llamaproxy_key_tokens", "Tokens by key and kind.",
                                     labels=["key_id", "kind"])
        for key_id, (prompt, completion) in self._key_tokens.items():
            tokens.add_metric([key_id, "prompt"], prompt)
            tokens.add_metric([key_id, "completion"], completion)
        rejections = CounterMetricFamily("llamaproxy_key_rejections",
                                         "Refused requests by key and reason.",
                                         labels=["key_id", "reason"])
        for (key_id, reason), count in self._key_rejections.items():
            rejections.add_metric([key_id, reason], count)
        yield from (requests, tokens, rejections)


def _untyped(name: str, help_text: str, value: float) -> Metric:
    metric = Metric(name, help_text, "unknown")
    metric.add_sample(name, {}, value)
    return metric


# --- a resource for the separate metrics listener --------------------------------------------


class MetricsResource(Resource):
    """Serves ``GatewayMetrics.render`` on any path (for the ``METRICS_LISTEN`` endpoint).

    Synchronous, on the reactor thread: rendering reads in-memory numbers only.
    """

    isLeaf = True

    def __init__(self, metrics: GatewayMetrics, include_per_key: bool = True) -> None:
        super().__init__()
        self.metrics = metrics
        self.include_per_key = include_per_key

    def render_GET(self, request: IRequest) -> bytes:
        accept = request.getHeader(b"accept")
        body, content_type = self.metrics.render(
            accept.decode("latin-1") if isinstance(accept, bytes) else accept,
            self.include_per_key,
        )
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Cache-Control", b"no-store")
        return body
