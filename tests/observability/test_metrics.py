"""Tests for llamaproxy.observability.metrics: legacy counters, histograms, formats, per-key
series, re-export."""

from __future__ import annotations

import json
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.test.requesthelper import DummyRequest

from llamaproxy.backends.admission import Admission
from llamaproxy.backends.backend import Backend, BackendState, ProbeResult
from llamaproxy.gateway import errors
from llamaproxy.observability.metrics import (
    CLIENT_CLOSED_STATUS,
    COMPLETE_OUTCOMES,
    GatewayMetrics,
    MetricsResource,
    RequestTimer,
    choose_format,
    exit_code_of,
    rejection_reason,
    route_label,
)
from llamaproxy.supervision.child_metrics import BackendMetricsScraper, relabel_backend_metrics
from llamaproxy.testing import AgentSpy

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)

LEGACY_NAMES = (
    "gateway_requests_total", "gateway_requests_success", "gateway_requests_error",
    "gateway_requests_active", "gateway_requests_authenticated", "gateway_requests_unauthorized",
    "gateway_bytes_sent", "gateway_queue_depth", "gateway_queue_rejections",
    "gateway_queue_wait_seconds_total", "gateway_uptime_seconds",
)

LLAMA_METRICS = b"""\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 6886
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 3469
# HELP llamacpp:n_busy_slots_per_decode Average number of busy slots per llama_decode() call
# TYPE llamacpp:n_busy_slots_per_decode counter
llamacpp:n_busy_slots_per_decode 1.5
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.25
# HELP process_open_fds not ours
# TYPE process_open_fds gauge
process_open_fds 12
"""


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str, openmetrics: bool = False) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    parse = parse_openmetrics if openmetrics else text_string_to_metric_families
    out: Samples = {}
    for family in parse(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


class Harness:
    """A GatewayMetrics on a Clock, with helpers that replay what the gateway does."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.metrics = GatewayMetrics(self.clock)

    def success(self, route: str, key: str, wait: float = 0.0, body: int = 100) -> None:
        t = self.metrics.request_started(route)
        t.authenticated(key)
        if wait:
            t.queued()
            self.clock.advance(wait)
        t.admitted()
        self.clock.advance(0.002)
        t.backend_sent()
        self.clock.advance(0.3)
        t.backend_headers(200)
        self.clock.advance(0.001)
        t.first_byte_sent()
        self.clock.advance(1.0)
        t.tokens("tiny", 10, 20)
        t.finished(200, "tiny", body, "complete")

    def rejected(self, route: str, status: int, reason: str, key: str | None) -> None:
        t = self.metrics.request_started(route)
        if key is not None:
            t.authenticated(key)
        t.rejected(reason)
        t.finished(status, None, 0, "answered")

    def backend_status(self, status: int, key: str, outcome: str = "answered") -> None:
        t = self.metrics.request_started("chat")
        t.authenticated(key)
        t.admitted()
        t.backend_sent()
        self.clock.advance(0.1)
        if status != 504:
            t.backend_headers(status)
            t.first_byte_sent()
        t.finished(status, "tiny", 50 if status != 504 else 0, outcome)

    def known_sequence(self) -> None:
        """2 successes, a 401, a 429, a 503 queue_full, a backend 500, a 504."""
        self.success("chat", "alice", wait=0.25, body=300)
        self.success("embeddings", "bob", body=200)
        self.rejected("chat", 401, "auth", None)
        self.rejected("chat", 429, "rate_limit", "alice")
        self.rejected("completions", 503, "queue_full", "bob")
        self.backend_status(500, "alice")
        self.backend_status(504, "alice")

    def text(self, include_per_key: bool = False) -> str:
        body, _ = self.metrics.render("text/plain", include_per_key)
        return body.decode()


class LegacyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.h.known_sequence()

    def test_legacy_json(self) -> None:
        self.h.clock.advance(10.9)
        self.assertEqual(self.h.metrics.legacy_json(), {"gateway": {
            "requests_total": 4,  # admitted: 2 successes, the backend 500, the 504
            "requests_success": 2,
            "requests_error": 2,  # backend 500 and 504
            "requests_active": 0,
            "requests_authenticated": 6,  # everyone but the 401
            "requests_unauthorized": 1,  # the 401 only, not the 429
            "bytes_sent": 550,
            "queue_depth": 0,
            "queue_rejections": 1,
            "queue_wait_seconds_total": 0.25,
            "uptime_seconds": 13,  # 2.5 s of sequence + 10.9 s, as an int
        }})

    def test_json_rendering(self) -> None:
        for accept in (None, "", "*/*", "application/json"):
            body, content_type = self.h.metrics.render(accept, include_per_key=True)
            self.assertEqual(content_type, b"application/json")
            self.assertEqual(json.loads(body), self.h.metrics.legacy_json())
            self.assertTrue(body.startswith(b'{\n  "gateway": {\n    "requests_total": 4,'))

    def test_wait_rounded_to_three_places(self) -> None:
        h = Harness()
        h.success("chat", "a", wait=0.12345)
        self.assertEqual(h.metrics.legacy_json()["gateway"]["queue_wait_seconds_total"], 0.123)

    def test_legacy_names_in_prometheus_text(self) -> None:
        text = self.h.text()
        for name in LEGACY_NAMES:
            self.assertIn(f"\n# HELP {name} ", text)
            self.assertIn(f"\n# TYPE {name} ", text)
        lines = text.splitlines()
        self.assertIn("# TYPE gateway_requests_total counter", lines)
        self.assertIn("# TYPE gateway_queue_wait_seconds_total counter", lines)
        self.assertIn("# TYPE gateway_requests_success untyped", lines)
        self.assertIn("# TYPE gateway_requests_active gauge", lines)
        found = samples(text)
        self.assertEqual(value(found, "gateway_requests_total"), 4)
        self.assertEqual(value(found, "gateway_requests_success"), 2)
        self.assertEqual(value(found, "gateway_requests_error"), 2)
        self.assertEqual(value(found, "gateway_requests_unauthorized"), 1)
        self.assertEqual(value(found, "gateway_queue_rejections"), 1)
        self.assertEqual(value(found, "gateway_queue_wait_seconds_total"), 0.25)
        self.assertEqual(value(found, "gateway_bytes_sent"), 550)

    def test_counters_by_route_status_model(self) -> None:
        found = samples(self.h.text())

        def requests(route: str, status: str, model: str) -> float:
            return value(found, "llamaproxy_requests_total", route=route, status=status,
                         model=model)

        self.assertEqual(requests("chat", "200", "tiny"), 1)
        self.assertEqual(requests("embeddings", "200", "tiny"), 1)
        self.assertEqual(requests("chat", "401", "none"), 1)
        self.assertEqual(requests("chat", "429", "none"), 1)
        self.assertEqual(requests("completions", "503", "none"), 1)
        self.assertEqual(requests("chat", "500", "tiny"), 1)
        self.assertEqual(requests("chat", "504", "tiny"), 1)
        self.assertEqual(value(found, "llamaproxy_backend_responses_total", route="chat",
                               status="500"), 1)
        for reason, count in (("auth", 1), ("rate_limit", 1), ("queue_full", 1),
                              ("queue_timeout", 0), ("payload_too_large", 0)):
            self.assertEqual(value(found, "llamaproxy_rejections_total", reason=reason), count)
        self.assertEqual(value(found, "llamaproxy_tokens_total", kind="prompt", model="tiny"), 20)
        self.assertEqual(
            value(found, "llamaproxy_tokens_total", kind="completion", model="tiny"), 40)

    def test_openmetrics(self) -> None:
        body, content_type = self.h.metrics.render(PROMETHEUS_ACCEPT, include_per_key=False)
        self.assertTrue(content_type.startswith(b"application/openmetrics-text; version=1.0.0"))
        self.assertTrue(body.endswith(b"# EOF\n"))
        found = samples(body.decode(), openmetrics=True)
        self.assertEqual(value(found, "gateway_requests_total"), 4)
        self.assertEqual(value(found, "gateway_requests_success"), 2)
        self.assertEqual(value(found, "llamaproxy_requests_total", route="chat", status="401",
                               model="none"), 1)

    def test_per_key_only_when_asked(self) -> None:
        public = self.h.text(include_per_key=False)
        self.assertNotIn("llamaproxy_key_", public)
        self.assertNotIn("alice", public)
        body, _ = self.h.metrics.render(PROMETHEUS_ACCEPT, include_per_key=False)
        self.assertNotIn(b"alice", body)
        found = samples(self.h.text(include_per_key=True))
        self.assertEqual(value(found, "llamaproxy_key_requests_total", key_id="alice"), 4)
        self.assertEqual(value(found, "llamaproxy_key_requests_total", key_id="bob"), 2)
        self.assertEqual(value(found, "llamaproxy_key_tokens_total", key_id="alice",
                               kind="completion"), 20)
        self.assertEqual(value(found, "llamaproxy_key_rejections_total", key_id="alice",
                               reason="rate_limit"), 1)
        self.assertEqual(value(found, "llamaproxy_key_rejections_total", key_id="bob",
                               reason="queue_full"), 1)
        self.h.metrics.prune_keys({"bob"})
        self.assertNotIn("alice", self.h.text(include_per_key=True))

    def test_per_key_tokens_lines(self) -> None:
        """Each key's prompt then completion tokens, keys in the order they first had tokens,
        summed over requests; pruned with the key; in ``key_totals``."""
        metrics = GatewayMetrics(Clock())
        metrics.tokens("carol", "m", 3, 0)
        metrics.tokens("alice", "m", 0, 7)
        metrics.tokens(None, "m", 100, 100)
        metrics.tokens("carol", "n", 5, 11)
        body, _ = metrics.render("text/plain", include_per_key=True)
        lines = [line for line in body.decode().splitlines()
                 if line.startswith("llamaproxy_key_tokens_total")]
        self.assertEqual(lines, [
            'llamaproxy_key_tokens_total{key_id="carol",kind="prompt"} 8.0',
            'llamaproxy_key_tokens_total{key_id="carol",kind="completion"} 11.0',
            'llamaproxy_key_tokens_total{key_id="alice",kind="prompt"} 0.0',
            'llamaproxy_key_tokens_total{key_id="alice",kind="completion"} 7.0',
        ])
        self.assertEqual(metrics.key_totals(), {"carol": (0, 19, 0), "alice": (0, 7, 0)})
        metrics.prune_keys({"alice"})
        body, _ = metrics.render("text/plain", include_per_key=True)
        self.assertNotIn(b'key_id="carol"', body)
        self.assertIn(b'llamaproxy_key_tokens_total{key_id="alice",kind="completion"} 7.0', body)

    def test_histograms(self) -> None:
        found = samples(self.h.text())
        for name in ("llamaproxy_request_duration_seconds", "llamaproxy_time_to_first_byte_seconds",
                     "llamaproxy_backend_latency_seconds", "llamaproxy_gateway_overhead_seconds"):
            buckets = sorted(
                (float(dict(labels)["le"]), v) for (n, labels), v in found.items()
                if n == name + "_bucket" and dict(labels)["route"] == "chat"
            )
            counts = [v for _, v in buckets]
            self.assertEqual(counts, sorted(counts), name)  # cumulative
            self.assertEqual(buckets[-1][0], float("inf"))
            self.assertEqual(buckets[-1][1], value(found, name + "_count", route="chat"), name)
        # The chat success: queued 0.25 s, 2 ms in the gateway, 300 ms backend, 1 ms relay.
        self.assertAlmostEqual(
            value(found, "llamaproxy_time_to_first_byte_seconds_sum", route="embeddings"), 0.303)
        self.assertAlmostEqual(
            value(found, "llamaproxy_gateway_overhead_seconds_sum", route="embeddings"), 0.003)
        self.assertAlmostEqual(
            value(found, "llamaproxy_request_duration_seconds_sum", route="embeddings"), 1.303)
        self.assertEqual(value(found, "llamaproxy_gateway_overhead_seconds_bucket",
                               route="embeddings", le="0.0025"), 0)
        self.assertEqual(value(found, "llamaproxy_gateway_overhead_seconds_bucket",
                               route="embeddings", le="0.005"), 1)
        # The chat success waited, and its overhead excludes the wait.
        self.assertEqual(value(found, "llamaproxy_queue_wait_seconds_count"), 4)
        self.assertAlmostEqual(value(found, "llamaproxy_queue_wait_seconds_sum"), 0.25)
        self.assertEqual(value(found, "llamaproxy_queue_wait_seconds_bucket", le="0.001"), 3)
        self.assertAlmostEqual(
            value(found, "llamaproxy_time_to_first_byte_seconds_sum", route="completions"), 0)
        self.assertEqual(
            value(found, "llamaproxy_backend_latency_seconds_count", route="chat"), 2)


class RequestTimerTests(SynchronousTestCase):
    def test_client_gone_while_queued(self) -> None:
        h = Harness()
        t = h.metrics.request_started("chat")
        t.authenticated("a")
        t.queued()
        t.queued()  # repeats are ignored
        self.assertEqual(h.metrics.legacy_json()["gateway"]["queue_depth"], 1)
        h.clock.advance(2)
        t.finished(200, None, 0, "client_gone")  # twisted.web's default code: 200
        t.finished(200, None, 0, "client_gone")  # once only
        doc = h.metrics.legacy_json()["gateway"]
        self.assertEqual((doc["queue_depth"], doc["requests_total"], doc["requests_error"]),
                         (0, 0, 0))
        self.assertEqual(doc["queue_wait_seconds_total"], 2)
        found = samples(h.text())
        self.assertEqual(value(found, "llamaproxy_requests_total", route="chat", status="499",
                               model="none"), 1)
        self.assertEqual(value(found, "llamaproxy_requests_interrupted_total", route="chat",
                               outcome="client_gone"), 1)

    def test_stream_cut_is_an_error_and_client_gone_is_neither(self) -> None:
        h = Harness()
        for outcome in ("backend_failed", "client_gone", "weird"):
            t = h.metrics.request_started("completions")
            t.admitted()
            self.assertEqual(h.metrics.legacy_json()["gateway"]["requests_active"], 1)
            t.backend_sent()
            t.backend_headers(200)
            t.first_byte_sent()
            t.finished(200, "tiny", 10, outcome)
        doc = h.metrics.legacy_json()["gateway"]
        self.assertEqual((doc["requests_total"], doc["requests_success"], doc["requests_error"],
                          doc["requests_active"], doc["bytes_sent"]), (3, 0, 2, 0, 30))
        found = samples(h.text())
        for outcome in ("backend_failed", "client_gone", "other"):
            self.assertEqual(value(found, "llamaproxy_requests_interrupted_total",
                                   route="completions", outcome=outcome), 1)
        # Headers were sent before the client left: its status stays.
        self.assertEqual(value(found, "llamaproxy_requests_total", route="completions",
                               status="200", model="tiny"), 3)

    def test_key_known_before_the_timer(self) -> None:
        h = Harness()
        h.metrics.authenticated("carol")  # the early check, before the body
        t = h.metrics.request_started("chat", key_id="carol")
        t.rejected("queue_full")
        t.finished(503, "tiny", 0, "answered")
        self.assertEqual(h.metrics.legacy_json()["gateway"]["requests_authenticated"], 1)
        found = samples(h.text(include_per_key=True))
        self.assertEqual(value(found, "llamaproxy_key_requests_total", key_id="carol"), 1)
        self.assertEqual(value(found, "llamaproxy_key_rejections_total", key_id="carol",
                               reason="queue_full"), 1)

    def test_backend_4xx_is_a_success(self) -> None:
        h = Harness()
        h.backend_status(400, "a")
        self.assertEqual(h.metrics.legacy_json()["gateway"]["requests_success"], 1)

    def test_model_label_is_bounded(self) -> None:
        clock = Clock()
        metrics = GatewayMetrics(clock, max_models=2)
        for model in ("a", "b", "c", "a", None, ""):
            metrics.request_started("chat").finished(200, model, 0, "answered")
        found = samples(metrics.render("text/plain", False)[0].decode())
        for model, count in (("a", 2), ("b", 1), ("other", 1), ("none", 2)):
            self.assertEqual(value(found, "llamaproxy_requests_total", route="chat",
                                   status="200", model=model), count)

    def test_unknown_route_and_reason(self) -> None:
        h = Harness()
        t = h.metrics.request_started("/v1/secret/path")
        t.rejected("no-such-reason")
        t.finished(404, None, 0, "answered")
        found = samples(h.text())
        self.assertEqual(value(found, "llamaproxy_requests_total", route="other", status="404",
                               model="none"), 1)
        self.assertEqual(value(found, "llamaproxy_rejections_total", reason="other"), 1)

    def test_retry_latency_uses_the_last_send(self) -> None:
        h = Harness()
        t = h.metrics.request_started("chat")
        t.admitted()
        t.backend_sent()
        h.clock.advance(5)  # the first attempt failed; the backend restarted
        t.backend_sent()
        h.clock.advance(0.5)
        t.backend_headers(200)
        t.first_byte_sent()
        t.finished(200, "tiny", 1, "complete")
        found = samples(h.text())
        self.assertEqual(value(found, "llamaproxy_backend_latency_seconds_sum", route="chat"), 0.5)
        self.assertEqual(value(found, "llamaproxy_gateway_overhead_seconds_sum", route="chat"), 0)


    def test_overhead_parts_below_zero_count_as_zero(self) -> None:
        """Each part of the overhead is max(0, part): a clock stepped back does not make the
        overhead negative, and a positive part counts whole."""
        for sent_at, first_byte_at, expected in ((100.5, 100.6, 0.0), (100.5, 101.0, 0.25),
                                                    (101.25, 101.5, 1.0)):
            clock = Clock()
            clock.rightNow = 100.0
            metrics = GatewayMetrics(clock)
            t = metrics.request_started("chat")
            t.queued()
            clock.rightNow = 101.0
            t.admitted()  # waited 1 s
            clock.rightNow = sent_at
            t.backend_sent()
            clock.rightNow = 100.75
            t.backend_headers(200)
            clock.rightNow = first_byte_at
            before, after = sent_at - 100.0 - 1.0, first_byte_at - 100.75
            self.assertEqual(t.first_byte_sent(), max(0.0, before) + max(0.0, after))
            self.assertEqual(max(0.0, before) + max(0.0, after), expected)
            found = samples(metrics.render("text/plain", False)[0].decode())
            self.assertEqual(value(found, "llamaproxy_gateway_overhead_seconds_sum",
                                   route="chat"), expected)


class StockTimer(RequestTimer):
    """``RequestTimer`` as it was before its observations were written in line: each
    histogram through ``observe``, each counter through its lookup and ``inc``."""

    __slots__ = ()

    def admitted(self) -> None:
        if self._admitted_at is not None or self._done:
            return
        m = self._metrics
        now = self._admitted_at = m._clock.seconds()
        if self._queued_at is None:
            m._queue_wait_series.observe(0.0)
        else:
            self._leave_queue(now)
        m._requests_total += 1
        m._active += 1

    def backend_headers(self, status: int) -> None:
        if self._done or self._headers_at is not None:
            return
        now = self._headers_at = self._metrics._clock.seconds()
        if self._sent_at is not None:
            self._series.backend_latency.observe(now - self._sent_at)
        self._series.backend_counter(status).inc()

    def first_byte_sent(self) -> float | None:
        if self._done or self._first_byte_at is not None:
            return None
        now = self._first_byte_at = self._metrics._clock.seconds()
        series = self._series
        series.first_byte.observe(now - self._started)
        if self._sent_first_at is None or self._headers_at is None:
            return None
        before = self._sent_first_at - self._started - self._wait
        after = now - self._headers_at
        overhead = max(0.0, before) + max(0.0, after)
        series.overhead.observe(overhead)
        return overhead

    def finished(self, status: int, model: str | None, bytes_sent: int, outcome: str) -> None:
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
        series.request_counter(status, m._model_label(model)).inc()
        series.duration.observe(now - self._started)
        if bytes_sent:
            series.bytes.inc(bytes_sent)
        if self.key_id is not None:
            per_key = m._key_requests
            per_key[self.key_id] = per_key.get(self.key_id, 0) + 1


_STEP = st.tuples(
    st.sampled_from(("chat", "embeddings", "nowhere")),
    st.booleans(),  # queued
    st.sampled_from((0.0, 0.0004, 0.003, 0.7, 42.0, 1000.0, -0.5)),  # each clock step
    st.booleans(),  # backend_sent
    st.sampled_from((200, 200, 404, 500)),  # backend status
    st.integers(0, 3),  # how far it gets: 0 none, 1 headers, 2 first byte, 3 twice each
    st.sampled_from(("tiny", "tiny", "big", None, "")),
    st.sampled_from(("complete", "answered", "client_gone", "backend_failed")),
    st.sampled_from((0, 0, 17, 4096)),
)


class InlineObservationTests(SynchronousTestCase):
    """The timer's observations written in line give what ``observe`` and ``inc`` gave: the
    same samples and legacy counters as ``StockTimer`` for the same requests."""

    @settings(max_examples=60, deadline=None)
    @given(st.lists(_STEP, min_size=1, max_size=12))
    def test_the_same_samples_as_the_stock_timer(self, steps: list[tuple]) -> None:  # type: ignore[type-arg]
        def run(stock: bool) -> tuple[Samples, dict[str, object]]:
            clock = Clock()
            clock.advance(1000)
            metrics = GatewayMetrics(clock, max_models=2)
            for route, queued, step, sent, status, reach, model, outcome, size in steps:
                if stock:
                    series = metrics._series.get(route) or metrics._series["other"]
                    timer: RequestTimer = StockTimer(metrics, series, clock.seconds())
                    timer.key_id = "k"
                else:
                    timer = metrics.request_started(route, "k")
                if queued:
                    timer.queued()
                    clock.advance(step) if step >= 0 else None
                timer.admitted()
                if sent:
                    timer.backend_sent()
                    clock.rightNow += step
                for _ in range(2 if reach == 3 else 1):
                    if reach >= 1:
                        timer.backend_headers(status)
                        clock.rightNow += step
                    if reach >= 2:
                        timer.first_byte_sent()
                clock.rightNow += step
                timer.finished(status, model, size, outcome)
            found = samples(metrics.render("text/plain", True)[0].decode())
            kept = {k: v for k, v in found.items() if not k[0].endswith("_created")}
            legacy = metrics.legacy_json()["gateway"]
            legacy.pop("uptime_seconds", None)
            return kept, legacy

        self.assertEqual(run(stock=False), run(stock=True))


class NegotiationTests(SynchronousTestCase):
    def test_choose_format(self) -> None:
        for accept, expected in (
            (None, "json"), ("", "json"), ("*/*", "json"), ("application/json", "json"),
            ("text/plain", "prometheus"), ("TEXT/PLAIN; version=0.0.4", "prometheus"),
            ("text/plain;version=1.0.0;escaping=allow-utf-8", "prometheus"),
            ("application/openmetrics-text", "openmetrics"),
            ("Application/OpenMetrics-Text; version=1.0.0", "openmetrics"),
            (PROMETHEUS_ACCEPT, "openmetrics"),
            # OpenMetrics before 1.0 is not something prometheus-client writes.
            ("application/openmetrics-text; version=0.0.1", "prometheus"),
        ):
            self.assertEqual(choose_format(accept), expected, accept)

    def test_prometheus_content_type(self) -> None:
        _, content_type = Harness().metrics.render("text/plain", False)
        self.assertEqual(content_type, b"text/plain; version=0.0.4; charset=utf-8")

    def test_resource(self) -> None:
        h = Harness()
        h.known_sequence()
        request = DummyRequest([b"metrics"])
        request.requestHeaders.setRawHeaders(b"accept", [b"text/plain"])
        body = MetricsResource(h.metrics).render(cast(IRequest, request))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"),
                         [b"text/plain; version=0.0.4; charset=utf-8"])
        self.assertIn(b"llamaproxy_key_requests_total", body)
        request = DummyRequest([b"metrics"])
        body = MetricsResource(h.metrics, include_per_key=False).render(
            cast(IRequest, request))
        self.assertEqual(json.loads(body), h.metrics.legacy_json())


class LiveStateTests(SynchronousTestCase):
    def test_backend_gauges_follow_state(self) -> None:
        h = Harness()
        backend = Backend("llama-server", "http://127.0.0.1:8080", model="tiny")
        h.metrics.watch_backend(backend)

        def current() -> Samples:
            return samples(h.text())

        found = current()
        self.assertEqual(value(found, "llamaproxy_backend_state", backend="llama-server",
                               state="stopped"), 1)
        self.assertEqual(value(found, "llamaproxy_backend_uptime_seconds",
                               backend="llama-server"), 0)
        self.assertNotIn(("llamaproxy_backend_last_exit_code", (("backend", "llama-server"),)),
                         found)
        backend.set_state(BackendState.LOADING)
        found = current()
        self.assertEqual(value(found, "llamaproxy_backend_state", backend="llama-server",
                               state="loading"), 1)
        self.assertEqual(value(found, "llamaproxy_backend_state", backend="llama-server",
                               state="stopped"), 0)
        self.assertEqual(value(found, "llamaproxy_backend_ready", backend="llama-server"), 0)
        backend.set_state(BackendState.READY)
        h.clock.advance(30)
        found = current()
        self.assertEqual(value(found, "llamaproxy_backend_ready", backend="llama-server"), 1)
        self.assertEqual(value(found, "llamaproxy_backend_uptime_seconds",
                               backend="llama-server"), 30)
        self.assertEqual(value(found, "llamaproxy_backend_info", backend="llama-server",
                               model="tiny"), 1)
        backend.last_probe = ProbeResult(h.clock.seconds(), "down", "timed out")
        self.assertEqual(value(current(), "llamaproxy_backend_ready", backend="llama-server"), 0)
        # A crash, as the supervisor records it.
        backend.restarts += 1
        backend.last_exit = "signal 9 (SIGKILL): killed (out of memory, or SIGKILL)"
        backend.set_state(BackendState.BACKOFF)
        found = current()
        self.assertEqual(value(found, "llamaproxy_backend_restarts_total",
                               backend="llama-server"), 1)
        self.assertEqual(value(found, "llamaproxy_backend_last_exit_code",
                               backend="llama-server"), 137)
        self.assertEqual(value(found, "llamaproxy_backend_uptime_seconds",
                               backend="llama-server"), 0)
        self.assertEqual(value(found, "llamaproxy_backend_state", backend="llama-server",
                               state="backoff"), 1)

    def test_admission_gauges(self) -> None:
        h = Harness()
        admission = Admission(max_concurrent=1, max_queue_size=3)
        h.metrics.watch_admission(admission)
        slot = self.successResultOf(admission.acquire("a"))
        waiting = admission.acquire("b")
        found = samples(h.text())
        self.assertEqual(value(found, "llamaproxy_admission_active"), 1)
        self.assertEqual(value(found, "llamaproxy_admission_waiting"), 1)
        self.assertEqual(value(found, "llamaproxy_admission_slots"), 1)
        self.assertEqual(value(found, "llamaproxy_admission_queue_limit"), 3)
        slot.release()
        self.successResultOf(waiting).release()
        found = samples(h.text())
        self.assertEqual(value(found, "llamaproxy_admission_active"), 0)
        self.assertEqual(value(found, "llamaproxy_admission_waiting"), 0)

    def test_helpers(self) -> None:
        self.assertEqual(exit_code_of("exit code 1: bad model file"), 1)
        self.assertEqual(exit_code_of("did not stop; exit code 137: killed"), 137)
        self.assertEqual(exit_code_of("signal 11 (SIGSEGV): segmentation fault"), 139)
        self.assertEqual(exit_code_of(3), 3)
        self.assertIsNone(exit_code_of(None))
        self.assertIsNone(exit_code_of("no idea"))
        self.assertEqual(route_label(b"/v1/chat/completions"), "chat")
        self.assertEqual(route_label(b"/v1/models/tiny"), "models")
        self.assertEqual(route_label(b"/tokenize"), "other")
        self.assertEqual(rejection_reason(errors.unauthorized("x")), "auth")
        self.assertEqual(rejection_reason(errors.rate_limited(())), "rate_limit")
        self.assertEqual(rejection_reason(errors.queue_full()), "queue_full")
        self.assertEqual(rejection_reason(errors.queue_timeout(5)), "queue_timeout")
        self.assertEqual(rejection_reason(errors.payload_too_large(10)), "payload_too_large")
        self.assertEqual(rejection_reason(errors.bad_request("x", code="invalid_json")),
                         "bad_request")
        self.assertIsNone(rejection_reason(errors.bad_gateway()))
        self.assertIsNone(rejection_reason(errors.gateway_timeout()))


class ScraperTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.backend = Backend("llama-server", "http://127.0.0.1:8080/", api_key="gateway-k",
                               model="tiny")
        self.backend.set_state(BackendState.READY)
        self.agent = AgentSpy()
        self.scraper = BackendMetricsScraper(self.backend, self.agent, self.h.clock,
                                             interval=15, timeout=5)
        self.h.metrics.add_scraper(self.scraper)

    def test_reexport_and_keep_last_good(self) -> None:
        self.scraper.startService()
        self.assertEqual(len(self.agent.requests), 1)
        record = self.agent.requests[0]
        self.assertEqual((record.method, record.uri), (b"GET", b"http://127.0.0.1:8080/metrics"))
        assert record.headers is not None
        self.assertEqual(record.headers.getRawHeaders(b"authorization"), [b"Bearer gateway-k"])
        record.respond(200, LLAMA_METRICS)

        def check(text: str, openmetrics: bool = False) -> Samples:
            found = samples(text, openmetrics)
            self.assertEqual(value(found, "llamacpp:prompt_tokens_total", model="tiny"), 6886)
            self.assertEqual(value(found, "llamacpp:kv_cache_usage_ratio", model="tiny"), 0.25)
            self.assertEqual(value(found, "llamacpp:n_busy_slots_per_decode", model="tiny"), 1.5)
            self.assertNotIn(("process_open_fds", (("model", "tiny"),)), found)
            return found

        found = check(self.h.text())
        self.assertEqual(value(found, "llamaproxy_backend_scrape_up", backend="llama-server"), 1)
        self.assertIn("# TYPE llamacpp:prompt_tokens_total counter", self.h.text())
        body, _ = self.h.metrics.render(PROMETHEUS_ACCEPT, False)
        self.assertIn(b"\nllamacpp:prompt_tokens_total{model=\"tiny\"} 6886.0\n", body)
        check(body.decode(), openmetrics=True)

        # Next scrape fails: the last good families stay, "up" says it failed.
        self.h.clock.advance(15)
        self.assertEqual(len(self.agent.requests), 2)
        self.agent.requests[1].respond(500, b"oops")
        found = check(self.h.text())
        self.assertEqual(value(found, "llamaproxy_backend_scrape_up", backend="llama-server"), 0)
        self.assertEqual(value(found, "llamaproxy_backend_scrape_age_seconds",
                               backend="llama-server"), 15)
        self.assertEqual(self.scraper.last_error, "HTTP 500")

        # Then one that never answers: the timeout cancels it, and the loop goes on.
        self.h.clock.advance(15)
        self.h.clock.advance(5)
        self.assertTrue(self.agent.requests[2].cancelled)
        self.assertEqual(self.scraper.last_error, "timed out after 5s")
        check(self.h.text())

        # And garbage.
        self.h.clock.advance(10)
        self.agent.requests[3].respond(200, b"this is { not metrics")
        self.assertIn("unparsable", self.scraper.last_error or "")
        check(self.h.text())

        # A good one again.
        self.h.clock.advance(15)
        self.agent.requests[4].respond(200, LLAMA_METRICS.replace(b"6886", b"7000"))
        found = samples(self.h.text())
        self.assertEqual(value(found, "llamacpp:prompt_tokens_total", model="tiny"), 7000)
        self.assertTrue(self.scraper.up)

        self.h.clock.advance(15)
        self.assertTrue(self.agent.requests[5].pending)
        self.successResultOf(self.scraper.stopService())
        self.assertTrue(self.agent.requests[5].cancelled)
        self.h.clock.advance(60)
        self.assertEqual(len(self.agent.requests), 6)

    def test_not_ready_backend_is_not_scraped(self) -> None:
        self.backend.set_state(BackendState.LOADING)
        self.scraper.startService()
        self.h.clock.advance(30)
        self.assertEqual(self.agent.requests, [])
        self.backend.set_state(BackendState.READY)  # becoming ready triggers a scrape at once
        self.assertEqual(len(self.agent.requests), 1)
        self.agent.requests[0].respond(501, b"start it with --metrics")
        self.assertIn("--metrics", self.scraper.last_error or "")
        self.scraper.stopService()

    def test_two_backends_merge_families(self) -> None:
        other = Backend("second", "http://127.0.0.1:8081", model="big")
        other.set_state(BackendState.READY)
        agent = AgentSpy(lambda r: r.respond(200, LLAMA_METRICS))
        second = BackendMetricsScraper(other, agent, self.h.clock)
        self.h.metrics.add_scraper(second)
        self.agent.on_request = lambda r: r.respond(200, LLAMA_METRICS)
        self.successResultOf(self.scraper.scrape_once())
        self.successResultOf(second.scrape_once())
        text = self.h.text()
        self.assertEqual(text.count("# TYPE llamacpp:prompt_tokens_total counter"), 1)
        found = samples(text)
        self.assertEqual(value(found, "llamacpp:prompt_tokens_total", model="big"), 6886)
        self.assertEqual(value(found, "llamacpp:prompt_tokens_total", model="tiny"), 6886)

    def test_relabel_keeps_existing_labels(self) -> None:
        families = relabel_backend_metrics(
            '# TYPE llamacpp:x gauge\nllamacpp:x{slot="0"} 1\n', "m")
        self.assertEqual([(s.name, s.labels) for s in families[0].samples],
                         [("llamacpp:x", {"slot": "0", "model": "m"})])


class CertificateGaugeTests(SynchronousTestCase):
    def test_expiry_gauge(self) -> None:
        from twisted.internet.task import Clock

        metrics = GatewayMetrics(Clock())
        metrics.watch_certificate(lambda: 86400.0 * 3)
        body, _ = metrics.render("text/plain", include_per_key=False)
        self.assertIn(b"llamaproxy_tls_certificate_expiry_seconds 259200.0", body)


class BreakerMetricsTests(SynchronousTestCase):
    def test_breaker_state_and_attempts(self) -> None:
        from twisted.internet.task import Clock

        from llamaproxy.backends.admission import Admission
        from llamaproxy.testing import router_for

        clock = Clock()
        backend = Backend("b1", "http://127.0.0.1:1", model="m")
        router = router_for(backend, Admission(1), clock)
        member = router.members["b1"]
        assert member.load is not None
        held = member.load.acquire("k")  # type: ignore[attr-defined]
        queued = member.load.acquire("k")  # type: ignore[attr-defined]
        self.assertTrue(held.called)
        self.assertFalse(queued.called)
        member.breaker.acquire().record_success()  # type: ignore[union-attr]
        member.breaker.acquire().record_failure("refused")  # type: ignore[union-attr]
        member.breaker.acquire().record_failure()  # type: ignore[union-attr]
        metrics = GatewayMetrics(clock)
        metrics.watch_router(lambda: router)
        body, _ = metrics.render("text/plain", include_per_key=False)
        self.assertIn(b'llamaproxy_breaker_state{backend="b1",state="closed"} 1.0', body)
        self.assertIn(b'llamaproxy_backend_attempts_total{backend="b1",outcome="success",reason=""}'
                      b' 1.0', body)
        self.assertIn(b'llamaproxy_backend_attempts_total{backend="b1",outcome="failure",'
                      b'reason="refused"} 1.0', body)
        self.assertIn(b'llamaproxy_backend_attempts_total{backend="b1",outcome="failure",'
                      b'reason="other"} 1.0', body)
        self.assertIn(b'llamaproxy_backend_slots_active{backend="b1"} 1.0', body)
        self.assertIn(b'llamaproxy_backend_queue_waiting{backend="b1"} 1.0', body)
        self.assertIn(b'llamaproxy_backend_slots{backend="b1"} 1.0', body)
