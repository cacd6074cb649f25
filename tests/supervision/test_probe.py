"""Tests for llamaproxy.supervision.probe: probe_health, ProbeLoop and ExternalBackendMonitor."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from llamaproxy.backends.backend import Backend, BackendState, ProbeResult
from llamaproxy.supervision.probe import (
    PROBE_BODY_LIMIT,
    ExternalBackendMonitor,
    ProbeLoop,
    probe_health,
    read_body_bounded,
)
from llamaproxy.testing import AgentSpy, RequestRecord, StubResponse

LOADING_BODY = json.dumps(
    {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
).encode()


class HealthResource(Resource):
    """/health answering with a status the test sets; records the requests' headers."""

    isLeaf = True

    def __init__(self, code: int = 200, body: bytes = b'{"status":"ok"}') -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.seen: list[tuple[bytes, bytes | None]] = []

    def render_GET(self, request: Request) -> bytes:
        self.seen.append((request.path, request.getHeader(b"authorization")))
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        return self.body


class ProbeHealthTests(SynchronousTestCase):
    """probe_health maps llama-server's answers onto ready / loading / down."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def probe(self, agent: Any, timeout: float = 2.0) -> Deferred[ProbeResult]:
        return Deferred.fromCoroutine(
            probe_health(agent, "http://127.0.0.1:8080/", self.clock, timeout)
        )

    def test_ready(self) -> None:
        resource = HealthResource(200)
        result = self.successResultOf(self.probe(RequestTraversalAgent(resource)))
        self.assertEqual(result, ProbeResult(at=1000, outcome="ready", status_code=200))
        self.assertEqual(resource.seen, [(b"/health", None)])  # no Authorization header
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the timeout was cancelled

    def test_loading(self) -> None:
        result = self.successResultOf(
            self.probe(RequestTraversalAgent(HealthResource(503, LOADING_BODY)))
        )
        self.assertEqual(result.outcome, "loading")
        self.assertEqual(result.detail, "Loading model")
        self.assertEqual(result.status_code, 503)

    def test_loading_without_json(self) -> None:
        result = self.successResultOf(self.probe(RequestTraversalAgent(HealthResource(503, b""))))
        self.assertEqual((result.outcome, result.detail), ("loading", "HTTP 503"))

    def test_server_error(self) -> None:
        result = self.successResultOf(self.probe(RequestTraversalAgent(HealthResource(500, b"x"))))
        self.assertEqual(result.outcome, "down")
        self.assertEqual(result.detail, "HTTP 500")
        self.assertEqual(result.status_code, 500)

    def test_error_message_included(self) -> None:
        body = json.dumps({"error": {"message": "boom"}}).encode()
        result = self.successResultOf(self.probe(RequestTraversalAgent(HealthResource(404, body))))
        self.assertEqual(result.detail, "HTTP 404: boom")

    def test_connection_refused(self) -> None:
        agent = AgentSpy(lambda r: r.fail(ConnectionRefusedError()))
        result = self.successResultOf(self.probe(agent))
        self.assertEqual(result, ProbeResult(at=1000, outcome="down", detail="connection refused"))

    def test_other_error(self) -> None:
        agent = AgentSpy(lambda r: r.fail(ValueError("odd")))
        result = self.successResultOf(self.probe(agent))
        self.assertEqual((result.outcome, result.detail), ("down", "ValueError: odd"))

    def test_timeout(self) -> None:
        agent = AgentSpy()
        d = self.probe(agent, timeout=2.0)
        self.assertNoResult(d)
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        result = self.successResultOf(d)
        self.assertEqual(result.outcome, "down")
        self.assertEqual(result.detail, "timed out after 2s")
        self.assertEqual(result.at, 1002)
        self.assertTrue(agent.requests[0].cancelled)

    def test_request(self) -> None:
        agent = AgentSpy()
        self.probe(agent)
        [record] = agent.requests
        self.assertEqual((record.method, record.uri), (b"GET", b"http://127.0.0.1:8080/health"))
        assert record.headers is not None
        self.assertFalse(record.headers.hasHeader(b"authorization"))
        record.respond(200)

    def test_large_body_bounded(self) -> None:
        response = StubResponse(503, b"x" * (PROBE_BODY_LIMIT * 4))
        body = self.successResultOf(read_body_bounded(response))  # type: ignore[arg-type]
        self.assertEqual(len(body), PROBE_BODY_LIMIT)
        self.assertTrue(response.transport.stopped)
        result = self.successResultOf(self.probe(AgentSpy(lambda r: r.respond(503, b"{" * 10000))))
        self.assertEqual((result.outcome, result.detail), ("loading", "HTTP 503"))


class ProbeLoopTests(SynchronousTestCase):
    """ProbeLoop: no overlap, variable interval, survives exceptions, stops cleanly."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.agent = AgentSpy()
        self.results: list[ProbeResult] = []
        self.interval = 1.0

    def make_loop(self) -> ProbeLoop:
        async def probe() -> ProbeResult:
            return await probe_health(self.agent, "http://b", self.clock, 10.0)

        return ProbeLoop(probe, self.results.append, lambda: self.interval, self.clock)

    def test_no_overlap_and_interval(self) -> None:
        loop = self.make_loop()
        loop.start()
        self.assertEqual(len(self.agent.requests), 1)
        self.clock.advance(5)  # still waiting for the answer: no second probe
        self.assertEqual(len(self.agent.requests), 1)
        self.agent.requests[0].respond(200)
        self.assertEqual([r.outcome for r in self.results], ["ready"])
        self.interval = 3.0
        self.agent.on_request = lambda r: r.respond(503)
        self.clock.advance(1.0)  # the interval asked after the first probe was 1.0
        self.assertEqual(len(self.agent.requests), 2)
        self.clock.advance(2.9)
        self.assertEqual(len(self.agent.requests), 2)
        self.clock.advance(0.1)
        self.assertEqual(len(self.agent.requests), 3)
        loop.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_start_later(self) -> None:
        loop = self.make_loop()
        loop.start(now=False)
        self.assertEqual(self.agent.requests, [])
        self.clock.advance(1.0)
        self.assertEqual(len(self.agent.requests), 1)
        loop.stop()

    def test_survives_handler_exception(self) -> None:
        calls: list[ProbeResult] = []

        def on_result(result: ProbeResult) -> None:
            calls.append(result)
            if len(calls) == 1:
                raise ZeroDivisionError()

        async def probe() -> ProbeResult:
            return ProbeResult(at=self.clock.seconds(), outcome="ready")

        loop = ProbeLoop(probe, on_result, lambda: 1.0, self.clock)
        loop.start()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.clock.advance(1.0)
        self.assertEqual(len(calls), 2)
        loop.stop()

    def test_survives_probe_exception(self) -> None:
        count = 0

        async def probe() -> ProbeResult:
            nonlocal count
            count += 1
            raise RuntimeError("probe bug")

        loop = ProbeLoop(probe, self.results.append, lambda: 1.0, self.clock)
        loop.start()
        self.clock.advance(1.0)
        self.assertEqual(count, 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        loop.stop()

    def test_stop_cancels_probe_in_flight(self) -> None:
        loop = self.make_loop()
        loop.start()
        loop.stop()
        self.assertTrue(self.agent.requests[0].cancelled)
        self.assertEqual(self.results, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(loop.running)


class ExternalBackendMonitorTests(SynchronousTestCase):
    """ExternalBackendMonitor maps probes onto the Backend's states."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.agent = AgentSpy()
        self.backend = Backend(name="external", base_url="http://gpu-box:8080")
        self.monitor = ExternalBackendMonitor(
            self.backend, self.agent, self.clock, probe_interval=5.0, health_timeout=2.0
        )

    def last(self) -> RequestRecord:
        return self.agent.requests[-1]

    def test_transitions(self) -> None:
        self.monitor.startService()
        self.assertIs(self.backend.state, BackendState.STARTING)
        self.assertEqual(self.last().uri, b"http://gpu-box:8080/health")
        self.last().fail(ConnectionRefusedError())
        # Refused: not expected back by itself, so unreachable (requests fail fast), probed
        # again every second.
        self.assertIs(self.backend.state, BackendState.UNREACHABLE)
        self.assertFalse(self.backend.recovering)
        self.assertEqual(self.backend.last_probe.detail, "connection refused")  # type: ignore[union-attr]
        self.assertEqual(self.backend.retry_after(self.clock.seconds()), 1)

        self.clock.advance(1.0)
        self.last().respond(503, LOADING_BODY)
        self.assertIs(self.backend.state, BackendState.LOADING)
        self.assertFalse(self.backend.ready)

        self.clock.advance(1.0)
        self.last().respond(200, b'{"status":"ok"}')
        self.assertIs(self.backend.state, BackendState.READY)
        self.assertTrue(self.backend.ready)
        self.assertIsNone(self.backend.retry_at)

        # Ready: probed every probe_interval.
        count = len(self.agent.requests)
        self.clock.advance(4.9)
        self.assertEqual(len(self.agent.requests), count)
        self.clock.advance(0.1)
        self.assertEqual(len(self.agent.requests), count + 1)
        self.last().respond(500)
        self.assertIs(self.backend.state, BackendState.UNREACHABLE)
        self.assertFalse(self.backend.ready)

        # Not ready again: probed fast.
        self.clock.advance(1.0)
        self.assertEqual(len(self.agent.requests), count + 2)
        self.last().respond(200)
        self.assertTrue(self.backend.ready)

    def test_timeout_then_ready(self) -> None:
        self.monitor.startService()
        self.clock.advance(2.0)
        self.assertEqual(self.backend.last_probe.detail, "timed out after 2s")  # type: ignore[union-attr]
        self.clock.advance(1.0)
        self.last().respond(200)
        self.assertIs(self.backend.state, BackendState.READY)

    def test_stop(self) -> None:
        self.monitor.startService()
        d = self.monitor.stopService()
        self.successResultOf(d)
        self.assertIs(self.backend.state, BackendState.STOPPED)
        self.assertTrue(self.last().cancelled)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(len(self.agent.requests), 1)
        self.assertFalse(self.monitor.running)

    def test_listener_told(self) -> None:
        states: list[BackendState] = []
        self.backend.listeners.append(lambda b: states.append(b.state))
        self.agent.on_request = lambda r: r.respond(200)
        self.monitor.startService()
        self.monitor.stopService()
        self.assertEqual(states, [BackendState.STARTING, BackendState.READY, BackendState.STOPPED])


class ProbeNowTests(SynchronousTestCase):
    """ProbeLoop.probe_now (issue 24.1): at once, and a probe begun before is not trusted."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.results: list[str] = []
        self.pending: list[Deferred[str]] = []

        async def probe() -> ProbeResult:
            d: Deferred[str] = Deferred()
            self.pending.append(d)
            return ProbeResult(self.clock.seconds(), await d)

        self.loop = ProbeLoop(probe, lambda r: self.results.append(r.outcome), lambda: 5.0,
                              self.clock)

    def test_idle_loop_probes_at_once(self) -> None:
        self.loop.start()
        self.pending[0].callback("ready")
        self.loop.probe_now()
        self.assertEqual(len(self.pending), 2)  # without waiting the 5 s
        self.pending[1].callback("down")
        self.assertEqual(self.results, ["ready", "down"])
        self.clock.advance(5.0)
        self.assertEqual(len(self.pending), 3)  # the schedule goes on

    def test_result_of_a_probe_in_flight_is_dropped_and_a_new_one_runs(self) -> None:
        self.loop.start()
        self.loop.probe_now()
        self.pending[0].callback("ready")  # began before the failure: not delivered
        self.assertEqual(self.results, [])
        self.clock.advance(0)
        self.assertEqual(len(self.pending), 2)
        self.pending[1].callback("down")
        self.assertEqual(self.results, ["down"])

    def test_not_running(self) -> None:
        self.loop.probe_now()
        self.assertEqual(self.pending, [])
