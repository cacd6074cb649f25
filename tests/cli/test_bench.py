"""Tests for ``llamaproxy bench``: statistics, SSE parsing, the measured requests against the fake
backend of ``bench/`` (in a thread, on a free port), the JSON report, ``--compare`` arithmetic
and ``--gateway-only``. Nothing here asserts a speed: only counts, shapes and order.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bench.fake_backend import BackendConfig, BackendThread
from llamaproxy.cli import main
from llamaproxy.cli.benchclient import (
    Connection,
    SSEParser,
    StreamResult,
    Target,
    chat_body,
    timed_chat_stream,
    timed_get,
)
from llamaproxy.cli.benchreport import (
    BenchSettings,
    TargetRun,
    added,
    build_report,
    percentile,
    render_text,
    summarize,
)

EVENTS = 5


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``llamaproxy <argv>``: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def unused_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class PercentileTests(SynchronousTestCase):
    """Nearest-rank percentiles and series summaries."""

    def test_nearest_rank(self) -> None:
        values = [float(v) for v in range(1, 11)]  # 1..10
        self.assertEqual(percentile(values, 50), 5.0)  # rank ceil(5.0) = 5
        self.assertEqual(percentile(values, 95), 10.0)  # rank ceil(9.5) = 10
        self.assertEqual(percentile(values, 99), 10.0)
        self.assertEqual(percentile(values, 10), 1.0)
        self.assertEqual(percentile(values, 11), 2.0)  # rank ceil(1.1) = 2
        self.assertEqual(percentile(values, 100), 10.0)

    def test_always_a_measured_value(self) -> None:
        values = [1.0, 2.0, 4.0, 8.0]
        self.assertEqual(percentile(values, 50), 2.0)  # no interpolation (would be 3.0)
        self.assertEqual(percentile([7.0], 1), 7.0)

    def test_invalid(self) -> None:
        self.assertRaises(ValueError, percentile, [], 50)
        self.assertRaises(ValueError, percentile, [1.0], 0)
        self.assertRaises(ValueError, percentile, [1.0], 101)

    def test_summarize(self) -> None:
        stats = summarize([0.003, 0.001, 0.002, 0.004], scale=1000)
        assert stats is not None
        self.assertEqual(stats["count"], 4)
        self.assertAlmostEqual(stats["min"], 1.0)
        self.assertAlmostEqual(stats["max"], 4.0)
        self.assertAlmostEqual(stats["mean"], 2.5)
        self.assertAlmostEqual(stats["p50"], 2.0)
        self.assertAlmostEqual(stats["p99"], 4.0)
        self.assertIsNone(summarize([]))

    def test_added(self) -> None:
        measured = summarize([2.0, 4.0, 6.0])
        baseline = summarize([1.0, 2.0, 3.0])
        difference = added(measured, baseline)
        assert difference is not None
        self.assertEqual(difference["p50"], {"added": 2.0, "ratio": 2.0})
        self.assertEqual(difference["min"], {"added": 1.0, "ratio": 2.0})
        self.assertEqual(difference["mean"], {"added": 2.0, "ratio": 2.0})
        self.assertEqual(set(difference), {"min", "mean", "p50", "p95", "p99"})
        zero = added(summarize([1.0]), summarize([0.0]))
        assert zero is not None
        self.assertEqual(zero["p50"], {"added": 1.0, "ratio": None})
        self.assertIsNone(added(measured, None))


class SSEParserTests(SynchronousTestCase):
    """The incremental text/event-stream parser."""

    def test_events_split_anywhere(self) -> None:
        stream = b'data: {"a": 1}\n\ndata: [DONE]\n\n'
        for cut in range(len(stream) + 1):
            parser = SSEParser()
            events = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
            self.assertEqual(events, [b'{"a": 1}', b"[DONE]"], cut)

    def test_crlf_comments_fields_and_multiline_data(self) -> None:
        parser = SSEParser()
        events = parser.feed(
            b": keep-alive\r\n\r\nevent: x\r\nid: 3\r\ndata: one\r\ndata:two\r\n\r\n"
        )
        self.assertEqual(events, [b"one\ntwo"])

    def test_unfinished_event_is_not_returned(self) -> None:
        parser = SSEParser()
        self.assertEqual(parser.feed(b"data: partial\n"), [])
        self.assertEqual(parser.feed(b"data: more"), [])


class TargetTests(SynchronousTestCase):
    """Parsing --url."""

    def test_urls(self) -> None:
        target = Target.from_url("http://127.0.0.1:8000/", "k")
        self.assertEqual((target.host, target.port, target.base_path), ("127.0.0.1", 8000, ""))
        self.assertEqual(target.url, "http://127.0.0.1:8000")
        self.assertEqual(target.api_key, "k")
        prefixed = Target.from_url("https://example.test/api/")
        self.assertEqual((prefixed.port, prefixed.base_path), (443, "/api"))
        self.assertEqual(prefixed.host_header, "example.test")
        self.assertEqual(Target.from_url("http://[::1]:81").host_header, "[::1]:81")

    def test_bad_urls(self) -> None:
        for url in ("ftp://x", "127.0.0.1:8000", "http://", "http://h/?q=1", "http://h:x"):
            self.assertRaises(ValueError, Target.from_url, url)


class BackendTestCase(SynchronousTestCase):
    """Runs the fake backend of bench/ in a thread for each test."""

    config = BackendConfig(events=EVENTS, interval_ms=1.0)

    def setUp(self) -> None:
        self.backend = BackendThread(self.config).start()
        self.addCleanup(self.backend.stop)
        self.url = self.backend.url

    def stream(self, body: bytes, path: str = "/v1/chat/completions") -> StreamResult:
        async def go() -> StreamResult:
            connection = Connection(Target.from_url(self.url), 5, 10)
            try:
                return await timed_chat_stream(connection, body, path)
            finally:
                await connection.close()

        return asyncio.run(go())


class MeasuredRequestTests(BackendTestCase):
    """TTFT, tokens and errors from real streams."""

    def test_stream_with_usage(self) -> None:
        result = self.stream(chat_body("hi", max_tokens=7))
        self.assertTrue(result.ok, result.error)
        self.assertEqual(result.status, 200)
        self.assertEqual((result.tokens, result.token_source), (7, "usage"))
        self.assertEqual(len(result.arrivals), 7)
        assert result.ttft is not None
        self.assertLessEqual(result.ttft, result.latency)
        self.assertEqual(result.ttft, result.arrivals[0])
        self.assertEqual(result.arrivals, sorted(result.arrivals))
        self.assertIsNotNone(result.tokens_per_s)

    def test_stream_without_usage_counts_deltas(self) -> None:
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                           "stream": True}).encode()
        result = self.stream(body)
        self.assertTrue(result.ok, result.error)
        self.assertEqual((result.tokens, result.token_source), (4, "deltas"))

    def test_http_error(self) -> None:
        result = self.stream(chat_body("hi", 3), path="/v1/nowhere")
        self.assertFalse(result.ok)
        self.assertEqual(result.status, 404)
        assert result.error is not None
        self.assertTrue(result.error.startswith("HTTP 404: "), result.error)
        self.assertIsNone(result.tokens_per_s)

    def test_connection_refused(self) -> None:
        self.url = unused_url()
        result = self.stream(chat_body("hi", 3))
        self.assertFalse(result.ok)
        assert result.error is not None
        self.assertIn("Connect", result.error)

    def test_keep_alive_get(self) -> None:
        async def go() -> list[bool]:
            connection = Connection(Target.from_url(self.url), 5, 10)
            try:
                return [(await timed_get(connection, "/health")).ok for _ in range(3)]
            finally:
                await connection.close()

        self.assertEqual(asyncio.run(go()), [True, True, True])


def _stream_then_ask_again(url: str) -> tuple[bytes, bytes]:
    """A streamed chat request on a raw keep-alive connection, read to its last chunk, then a
    ``GET /health`` on the same connection: (the stream's answer, what the second got)."""
    port = int(url.rsplit(":", 1)[1])
    body = chat_body("hi", max_tokens=2)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                     b"\r\n\r\n%s" % (len(body), body))
        answer = b""
        while not answer.endswith(b"\r\n0\r\n\r\n"):
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            second = sock.recv(65536)
        except ConnectionError:
            second = b""
    return answer, second


class CloseAfterStreamTests(SynchronousTestCase):
    """The fake keeps a connection open after a stream, or closes it as llama-server does."""

    def answers(self, config: BackendConfig) -> tuple[bytes, bytes]:
        backend = BackendThread(config).start()
        self.addCleanup(backend.stop)
        return _stream_then_ask_again(backend.url)

    def test_kept_open_by_default(self) -> None:
        answer, second = self.answers(BackendConfig(events=2, interval_ms=1.0))
        self.assertIn(b"data: [DONE]", answer)
        self.assertTrue(second.startswith(b"HTTP/1.1 200 OK"), second)

    def test_closed_after_the_stream_like_llama_server(self) -> None:
        answer, second = self.answers(
            BackendConfig(events=2, interval_ms=1.0, close_after_stream=True))
        self.assertIn(b"data: [DONE]", answer)
        self.assertEqual(second, b"")


class IdleCloseTests(SynchronousTestCase):
    """A keep-alive connection the server closes just as the next request arrives (llama-server
    closes after 5 idle seconds): the request is sent again on a new connection, not failed."""

    def test_request_resent_after_idle_close(self) -> None:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        self.addCleanup(server.close)
        port = server.getsockname()[1]
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        requests_seen: list[bytes] = []

        def serve() -> None:
            first, _ = server.accept()
            with first:
                requests_seen.append(first.recv(65536))
                first.sendall(answer)
                requests_seen.append(first.recv(65536))  # the 2nd request: closed unanswered
            second, _ = server.accept()
            with second:
                requests_seen.append(second.recv(65536))
                second.sendall(answer)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()

        async def go() -> list[bool]:
            connection = Connection(Target.from_url(f"http://127.0.0.1:{port}"), 5, 5)
            try:
                first = await timed_get(connection, "/health")
                second = await timed_get(connection, "/health")
                return [first.ok, second.ok]
            finally:
                await connection.close()

        self.assertEqual(asyncio.run(go()), [True, True])
        thread.join(5)
        self.assertEqual(len(requests_seen), 3)
        self.assertTrue(all(r.startswith(b"GET /health ") for r in requests_seen))


class CommandTests(BackendTestCase):
    """``llamaproxy bench`` end to end against the fake backend."""

    def test_json_shape(self) -> None:
        code, out, err = run_cli("bench", "--url", self.url, "--requests", "4", "--concurrency",
                                 "2", "--max-tokens", "3", "--output", "json")
        self.assertEqual(code, 0, err)
        report = json.loads(out)
        self.assertEqual(set(report), {"settings", "wall_time_s", "target", "compare", "added"})
        self.assertEqual(report["settings"]["concurrency"], 2)
        self.assertIsNone(report["compare"])
        self.assertIsNone(report["added"])
        target = report["target"]
        self.assertEqual(set(target["overhead"]), {"/ping", "/health"})
        health = target["overhead"]["/health"]
        self.assertEqual(health["requests"], {"total": 4, "success": 4, "failed": 0})
        self.assertEqual(set(health["latency_ms"]),
                         {"count", "min", "mean", "p50", "p95", "p99", "max"})
        ping = target["overhead"]["/ping"]  # the fake, like llama-server, has no /ping
        self.assertEqual(ping["requests"]["failed"], 4)
        self.assertIsNone(ping["latency_ms"])
        self.assertTrue(ping["errors"][0].startswith("HTTP 404"))
        inference = target["inference"]
        self.assertEqual(inference["requests"], {"total": 4, "success": 4, "failed": 0})
        self.assertEqual(inference["token_source"], "usage")
        self.assertEqual(inference["tokens"]["p50"], 3)
        for series in ("ttft_ms", "latency_ms", "tokens_per_s"):
            self.assertEqual(inference[series]["count"], 4)
        self.assertLessEqual(inference["ttft_ms"]["max"], inference["latency_ms"]["max"])
        self.assertNotIn("values", json.dumps(report))  # no raw value lists

    def test_text_output(self) -> None:
        code, out, err = run_cli("bench", "--url", self.url, "--requests", "2",
                                 "--max-tokens", "2")
        self.assertEqual(code, 0, err)
        for expected in ("TTFT (ms)", "latency (ms)", "tokens/s", "/health", "2 success"):
            self.assertIn(expected, out)
        self.assertEqual(err, "")  # no progress bar: stderr is not a terminal

    def test_progress_bar(self) -> None:
        code, _, err = run_cli("bench", "--url", self.url, "--requests", "2", "--max-tokens",
                               "2", "--progress")
        self.assertEqual(code, 0, err)
        self.assertIn("6/6 requests", err)  # 2 /ping + 2 /health + 2 chats
        self.assertTrue(err.endswith("\n"))

    def test_progress_object(self) -> None:
        import io

        from llamaproxy.cli.bench import Progress

        stream = io.StringIO()
        progress = Progress(stream, total=4, enabled=True, width=4)
        progress.advance(4)
        progress.close()
        self.assertIn("[####] 4/4 requests", stream.getvalue())
        quiet = io.StringIO()
        disabled = Progress(quiet, total=4, enabled=False)
        disabled.advance(4)
        disabled.close()
        self.assertEqual(quiet.getvalue(), "")

    def test_gateway_only(self) -> None:
        code, out, err = run_cli("bench", "--url", self.url, "--gateway-only", "--requests", "3",
                                 "--warmup", "0", "--output", "json")
        self.assertEqual(code, 0, err)
        report = json.loads(out)
        self.assertIsNone(report["wall_time_s"])
        self.assertIsNone(report["target"]["inference"])
        self.assertEqual(report["target"]["overhead"]["/health"]["requests"]["success"], 3)

    def test_compare(self) -> None:
        other = BackendThread(self.config).start()
        self.addCleanup(other.stop)
        code, out, err = run_cli("bench", "--url", self.url, "--compare", other.url,
                                 "--requests", "3", "--max-tokens", "2", "--output", "json")
        self.assertEqual(code, 0, err)
        report = json.loads(out)
        self.assertEqual(report["settings"]["compare_url"], other.url)
        for side in ("target", "compare"):
            self.assertEqual(report[side]["inference"]["requests"]["success"], 3)
        added_ = report["added"]
        self.assertEqual(set(added_), {"overhead", "ttft_ms", "latency_ms"})
        self.assertEqual(set(added_["overhead"]), {"/health"})  # /ping failed on both
        ttft = added_["ttft_ms"]["p50"]
        self.assertAlmostEqual(
            ttft["added"],
            report["target"]["inference"]["ttft_ms"]["p50"]
            - report["compare"]["inference"]["ttft_ms"]["p50"],
        )

    def test_unreachable_url_fails(self) -> None:
        code, out, err = run_cli("bench", "--url", unused_url(), "--requests", "2",
                                 "--warmup", "0", "--connect-timeout", "2")
        self.assertEqual(code, 1)
        self.assertIn("error: every chat request to", err)
        self.assertIn("0 success", out)

    def test_bad_arguments(self) -> None:
        code, _, err = run_cli("bench", "--url", "ftp://nowhere")
        self.assertEqual(code, 1)
        self.assertIn("error: expected an http://", err)
        code, _, _ = run_cli("bench", "--url", self.url, "--concurrency", "0")
        self.assertEqual(code, 2)
        code, _, _ = run_cli("bench")  # --url is required
        self.assertEqual(code, 2)


class CompareArithmeticTests(SynchronousTestCase):
    """The report's "added" numbers from known series."""

    def run_of(self, url: str, ttfts_ms: list[float], latencies_ms: list[float]) -> TargetRun:
        run = TargetRun(Target.from_url(url))
        for ttft, latency in zip(ttfts_ms, latencies_ms, strict=True):
            run.streams.append(StreamResult(ok=True, latency=latency / 1000, status=200,
                                            ttft=ttft / 1000, tokens=10))
        run.streams.append(StreamResult(ok=False, latency=0.5, status=500, error="HTTP 500: x"))
        return run

    def test_added_and_ratio(self) -> None:
        gateway = self.run_of("http://127.0.0.1:1", [12, 22, 32], [110, 210, 310])
        direct = self.run_of("http://127.0.0.1:2", [10, 20, 30], [100, 200, 300])
        report = build_report(BenchSettings(requests=4), [gateway, direct], wall_time=2.0)
        ttft = report["added"]["ttft_ms"]
        self.assertAlmostEqual(ttft["p50"]["added"], 2.0)
        self.assertAlmostEqual(ttft["p50"]["ratio"], 1.1)
        self.assertAlmostEqual(ttft["min"]["added"], 2.0)
        self.assertAlmostEqual(ttft["p99"]["ratio"], 32 / 30)
        latency = report["added"]["latency_ms"]
        self.assertAlmostEqual(latency["mean"]["added"], 10.0)
        inference = report["target"]["inference"]
        self.assertEqual(inference["requests"], {"total": 4, "success": 3, "failed": 1})
        self.assertAlmostEqual(inference["requests_per_s"], 1.5)
        self.assertEqual(inference["errors"], ["HTTP 500: x"])
        self.assertAlmostEqual(inference["tokens_per_s"]["min"], 10 / 0.31)
        text = render_text(report)
        self.assertIn("TTFT added", text)
        self.assertIn("+2.000", text)

    def test_missing_series_are_left_out(self) -> None:
        gateway = self.run_of("http://127.0.0.1:1", [1], [2])
        direct = TargetRun(Target.from_url("http://127.0.0.1:2"))
        direct.streams.append(StreamResult(ok=False, latency=0.1, error="timeout"))
        report: dict[str, Any] = build_report(BenchSettings(), [gateway, direct], 1.0)
        self.assertIsNone(report["added"]["ttft_ms"])
        self.assertIn("Added by", render_text(report))
