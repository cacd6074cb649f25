"""Tests for llamaproxy.gateway.recorder: every request ends in the access log, metrics, ledger."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.auth.access import TokenLimits
from llamaproxy.auth.tokenlimit import TokenRateLimiter
from llamaproxy.gateway.recorder import CLIENT_CLOSED, RequestRecorder
from llamaproxy.observability.access_log import AccessLog, format_access_json
from llamaproxy.observability.metrics import GatewayMetrics
from llamaproxy.testing import StreamingResponse, sse_chunk
from tests.gateway.test_resource import AUTH, GatewayFixture

#: The model the fixture's single backend serves (every request resolves to it).
MODEL = "fake"


class LedgerSpy:
    """Records what the recorder books."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    def record(self, key_id: str, model: str | None, prompt: int | None,
               completion: int | None, partial: bool = False) -> None:
        self.rows.append((key_id, model, prompt, completion, partial))


class RecorderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = GatewayFixture()
        self.path = self.mktemp()
        self.access_log = AccessLog(self.path, "json", self.gw.clock, "test", None)
        self.metrics = GatewayMetrics(self.gw.clock)
        self.gw.resource.metrics = self.metrics
        self.ledger = LedgerSpy()
        self.tokens = TokenLimits(TokenRateLimiter(self.gw.clock), default=1000)
        self.gw.site.recorder = RequestRecorder(
            self.gw.clock, self.access_log, self.metrics, self.ledger,  # type: ignore[arg-type]
            self.tokens,
        )

    def entries(self) -> list[dict[str, Any]]:
        self.access_log.flush()
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    def test_a_stream_with_usage(self) -> None:
        client = self.gw.chat()
        backend = StreamingResponse()
        self.gw.agent.requests[0].deferred.callback(backend)
        backend.send(sse_chunk("Hi"))
        backend.send(b'data: {"choices": [], "model": "fake", "usage": {"prompt_tokens": 4, '
                     b'"completion_tokens": 9}}\n\ndata: [DONE]\n\n')
        backend.finish()
        self.assertTrue(client.response().complete)
        [entry] = self.entries()
        self.assertEqual((entry["status"], entry["key_id"], entry["path"]),
                         (200, "alice", "/v1/chat/completions"))
        self.assertEqual((entry["prompt_tokens"], entry["completion_tokens"]), (4, 9))
        self.assertEqual(entry["request_id"], client.response().header("x-request-id"))
        # The model the router resolved, not what the backend's body says.
        self.assertEqual(self.ledger.rows, [("alice", MODEL, 4, 9, False)])
        self.assertEqual(self.tokens.limiter.used("alice"), 13)
        self.assertEqual(self.metrics.legacy_json()["gateway"]["requests_success"], 1)

    def test_refusals_are_recorded_with_their_status(self) -> None:
        client = self.gw.client()
        client.request("GET", "/v1/models")  # 401
        client = self.gw.client()
        client.send(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")  # 414, no request object
        statuses = [e["status"] for e in self.entries()]
        self.assertEqual(statuses, [401, 414])
        self.assertEqual(self.metrics.legacy_json()["gateway"]["requests_unauthorized"], 1)
        self.assertEqual(self.ledger.rows, [])

    def test_a_client_that_leaves_before_the_answer(self) -> None:
        client = self.gw.client()
        client.request("POST", "/v1/chat/completions",
                       b'{"messages": [{"role": "user", "content": "hi"}]}', AUTH)
        client.disconnect()
        [entry] = self.entries()
        self.assertEqual((entry["status"], entry["outcome"]), (CLIENT_CLOSED, "client_gone"))
        # The backend had it: the prompt is charged, estimated from the body's size.
        body_tokens = -(-len(b'{"messages": [{"role": "user", "content": "hi"}]}') // 4)
        self.assertEqual(self.ledger.rows, [("alice", MODEL, body_tokens, 0, True)])
        self.assertEqual((entry["prompt_tokens"], entry["tokens_estimated"]), (body_tokens, True))


class CutStreamTests(SynchronousTestCase):
    """Issue 15.2: a stream cut by a backend crash or a timeout is charged for what it relayed."""

    def setUp(self) -> None:
        self.gw = GatewayFixture(stream_idle_timeout=5.0)
        self.ledger = LedgerSpy()
        self.tokens = TokenLimits(TokenRateLimiter(self.gw.clock), default=1000)
        self.gw.site.recorder = RequestRecorder(
            self.gw.clock, None, None, self.ledger, self.tokens)  # type: ignore[arg-type]

    def stream_three_events(self) -> StreamingResponse:
        self.client = self.gw.chat()
        backend = StreamingResponse()
        self.gw.agent.requests[0].deferred.callback(backend)
        backend.send(sse_chunk("a") + sse_chunk("b") + sse_chunk("c"))
        return backend

    def assert_charged(self) -> None:
        self.assertTrue(self.client.closed)  # the gateway cut the client: the socket closes
        self.client.disconnect()
        prompt = -(-len(b'{"messages": [{"role": "user", "content": "hi"}], "stream": true}') // 4)
        self.assertEqual(self.ledger.rows, [("alice", MODEL, prompt, 3, True)])
        self.assertEqual(self.tokens.limiter.used("alice"), prompt + 3)

    def test_backend_crash(self) -> None:
        self.stream_three_events().fail(ConnectionLost())
        self.assert_charged()

    def test_idle_timeout(self) -> None:
        self.stream_three_events()
        self.gw.clock.advance(6)
        self.assert_charged()


class ObserverTests(SynchronousTestCase):
    """``RequestRecorder.observers``: the operator page's activity ring gets each request's
    access entry (the same object the access log writes), with its queue wait and stream flag."""

    def setUp(self) -> None:
        from llamaproxy.admin.activity import ActivityRing

        self.gw = GatewayFixture()
        self.metrics = GatewayMetrics(self.gw.clock)
        self.gw.resource.metrics = self.metrics
        self.ring = ActivityRing()
        self.recorder = RequestRecorder(self.gw.clock, None, self.metrics)
        self.recorder.observers.append(self.ring.observe)
        self.gw.site.recorder = self.recorder

    def test_without_an_access_log(self) -> None:
        client = self.gw.chat()
        backend = StreamingResponse()
        self.gw.clock.advance(0.5)
        self.gw.agent.requests[0].deferred.callback(backend)
        backend.send(b'data: {"choices": [], "model": "fake", "usage": {"prompt_tokens": 4, '
                     b'"completion_tokens": 9}}\n\ndata: [DONE]\n\n')
        backend.finish()
        self.assertTrue(client.response().complete)
        client = self.gw.client()
        client.request("GET", "/v1/models")  # 401, no key
        [refused, row] = self.ring.rows()
        self.assertEqual((row.key_id, row.status, row.completion_tokens), ("alice", 200, 9))
        self.assertEqual(row.queue_wait_ms, 0.0)
        self.assertFalse(row.client_gone)
        self.assertEqual((refused.key_id, refused.status), ("-", 401))

    def test_the_access_log_and_the_observers_share_one_entry(self) -> None:
        seen: list[Any] = []
        access_log = AccessLog(self.mktemp(), "json", self.gw.clock)
        recorded: list[Any] = []
        access_log.record = recorded.append  # type: ignore[method-assign]
        self.recorder.access_log = access_log
        self.recorder.observers.append(lambda entry, request: seen.append(entry))
        self.gw.client().request("GET", "/v1/models")
        self.assertEqual(len(seen), 1)
        self.assertIs(seen[0], recorded[0])


    def test_the_access_line_is_the_same_without_observers(self) -> None:
        """Without observers the recorder hands the access log the entry's fields instead of
        an entry: the line is the one the observers' entry makes."""
        path = self.mktemp()
        access_log = AccessLog(path, "json", self.gw.clock, "test", "w")
        self.recorder.access_log = access_log
        self.recorder.observers = []
        self.chat_with_usage()
        seen: list[Any] = []
        self.recorder.observers.append(lambda entry, request: seen.append(entry))
        self.chat_with_usage()
        access_log.flush()
        with open(path) as f:
            without, with_observer = f.read().splitlines(keepends=True)
        [entry] = seen
        self.assertEqual(with_observer, format_access_json(entry, "w", "test"))
        first, second = json.loads(without), json.loads(with_observer)
        self.assertNotEqual(first["ts"], second["ts"])
        self.assertEqual(
            without.replace(first["request_id"], second["request_id"])
            .replace(first["ts"], second["ts"]),
            with_observer,
        )
        self.assertEqual((entry.status, entry.prompt_tokens, entry.completion_tokens,
                          entry.client, entry.ttfb_ms), (200, 4, 9, "127.0.0.1", 500.0))

    def chat_with_usage(self) -> None:
        client = self.gw.chat()
        backend = StreamingResponse()
        self.gw.clock.advance(0.5)
        self.gw.agent.requests[-1].deferred.callback(backend)
        backend.send(b'data: {"choices": [], "model": "fake", "usage": {"prompt_tokens": 4, '
                     b'"completion_tokens": 9}}\n\ndata: [DONE]\n\n')
        self.gw.clock.advance(0.25)
        backend.finish()
        self.assertTrue(client.response().complete)


class RejectionLoggingTests(SynchronousTestCase):
    """Issue 24.3/24.4: rejections go to the access log and metrics; the gateway log is bounded."""

    def setUp(self) -> None:
        from twisted.logger import globalLogPublisher

        self.gw = GatewayFixture()
        self.path = self.mktemp()
        self.access_log = AccessLog(self.path, "text", self.gw.clock, "test", None)
        self.metrics = GatewayMetrics(self.gw.clock)
        self.gw.resource.metrics = self.metrics
        self.recorder = RequestRecorder(self.gw.clock, self.access_log, self.metrics)
        self.gw.site.recorder = self.recorder
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.addCleanup(self.recorder.rejection_log.stop)

    def gateway_lines(self) -> list[dict[str, Any]]:
        """The gateway's own log events, not the access log (a file of its own)."""
        from twisted.logger import LogLevel

        return [e for e in self.events if e.get("log_level", LogLevel.debug) >= LogLevel.info]

    def bad_key_post(self) -> Any:
        client = self.gw.client()
        client.request("POST", "/v1/chat/completions", b'{"messages": []}',
                       {"Authorization": "Bearer sk-wrong-key-000000000000000000"})
        return client

    def test_ten_thousand_bad_keys_write_a_bounded_gateway_log(self) -> None:
        for i in range(10_000):
            client = self.bad_key_post()
            self.assertEqual(client.response().status, 401)
            client.disconnect()
            if i % 100 == 99:
                self.gw.clock.advance(1.0)  # 100 requests/s for 100 s
        self.gw.clock.advance(120)
        lines = self.gateway_lines()
        # The first at once, then one summary per minute of the 100 s: three lines in all.
        self.assertLessEqual(len(lines), 4, [e.get("log_format") for e in lines[:10]])
        self.assertEqual(self.recorder.rejection_log.lines, len(lines))
        summed = sum(e.get("count", 1) for e in lines)
        self.assertEqual(summed, 10_000)
        self.access_log.flush()
        with open(self.path) as f:
            self.assertEqual(sum(1 for _ in f), 10_000)
        body, _ = self.metrics.render("text/plain", include_per_key=False)
        self.assertIn(b'llamaproxy_rejections_total{reason="auth"} 10000.0', body)

    def test_a_quiet_reason_is_logged_at_once_next_time(self) -> None:
        self.bad_key_post().disconnect()
        self.gw.clock.advance(61)
        self.bad_key_post().disconnect()
        self.assertEqual(len(self.gateway_lines()), 2)

    def test_early_rejections_have_bytes_and_ttfb_in_the_access_log(self) -> None:
        client = self.bad_key_post()  # refused before its body was read
        response = client.response()
        self.assertEqual(response.status, 401)
        self.access_log.flush()
        with open(self.path) as f:
            [line] = f.read().splitlines()
        self.assertIn(f"bytes={len(response.body)}", line)
        self.assertNotIn("ttfb=-", line)
        client = self.gw.client()
        client.send(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")  # 414, no request object
        self.access_log.flush()
        with open(self.path) as f:
            last = f.read().splitlines()[-1]
        self.assertIn(" 414 ", f" {last} ".replace("|", " "))
        self.assertNotIn("bytes=0", last)
        self.assertNotIn("ttfb=-", last)
