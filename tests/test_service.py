"""Tests for llamaproxy.service: start order, and the stop order that loses nothing."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.service import GatewayService
from llamaproxy.testing import StreamingResponse, sse_chunk
from tests.gateway.test_resource import GatewayFixture


class Recorder(Service):
    """A child service that records start/stop and can hold its stop open."""

    def __init__(self, name: str, log: list[str], hold: bool = False) -> None:
        self.name = name
        self.log = log
        self.hold: Deferred[None] | None = Deferred() if hold else None

    def startService(self) -> None:
        super().startService()
        self.log.append(f"start {self.name}")

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.log.append(f"stop {self.name}")
        return self.hold


class ServiceTests(SynchronousTestCase):
    def build(self, hold_backend: bool = False) -> tuple[GatewayService, list[str], GatewayFixture]:
        log: list[str] = []
        gw = GatewayFixture()
        self.backend_service = Recorder("backend", log, hold=hold_backend)
        service = GatewayService(
            gw.clock, self.backend_service, [Recorder("gateway", log)],
            Recorder("health", log), gw.resource, None, drain_timeout=30,
        )
        return service, log, gw

    def test_start_order(self) -> None:
        service, log, _ = self.build()
        service.startService()
        self.assertEqual(log, ["start backend", "start gateway", "start health"])

    def test_stop_drains_then_stops_backend(self) -> None:
        service, log, gw = self.build(hold_backend=True)
        service.startService()
        log.clear()
        client = gw.chat()
        backend = StreamingResponse()
        gw.agent.requests[0].deferred.callback(backend)
        backend.send(sse_chunk("Hel"))
        stopped = service.stopService()
        self.assertEqual(log, ["stop gateway"])
        self.assertTrue(gw.resource.draining)
        self.assertFalse(gw.health.ready())
        backend.send(sse_chunk("lo"))
        backend.finish()
        self.assertTrue(client.response().complete)  # the stream was not cut
        self.assertEqual(log, ["stop gateway", "stop backend"])
        self.assertNoResult(stopped)  # waits for the child to be reaped
        assert self.backend_service.hold is not None
        self.backend_service.hold.callback(None)
        self.assertEqual(log, ["stop gateway", "stop backend", "stop health"])
        self.successResultOf(stopped)
        self.successResultOf(service.stopService())  # a second stop is harmless

    def test_drain_timeout_cuts_requests(self) -> None:
        service, log, gw = self.build()
        service.startService()
        client = gw.chat()
        backend = StreamingResponse()
        gw.agent.requests[0].deferred.callback(backend)
        backend.send(sse_chunk("Hel"))
        stopped = service.stopService()
        self.assertNoResult(stopped)
        gw.clock.advance(30)
        self.assertTrue(client.closed)
        self.assertTrue(backend.transport.stopped)
        self.successResultOf(stopped)
        self.assertIn("stop backend", log)
