"""An external backend that goes away: the same answer wherever the probe cycle was (issue 24.1).

A fake external llama-server (an ``AgentSpy`` answering the gateway's requests and the
monitor's probes alike) is killed at several phases of the 5 s probe cycle, driven by a
``Clock``. Each time, clients get the same immediate 502 saying the connection was refused,
/health says ``unreachable`` and /readyz 503 from the first failed request on, and the gateway
serves again within a second of the backend coming back.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llamaproxy.backends.backend import BackendState
from llamaproxy.supervision.probe import ExternalBackendMonitor
from llamaproxy.testing import RequestRecord
from tests.gateway.test_resource import AUTH, GatewayFixture

PROBE_INTERVAL = 5.0
JSON = Headers({b"content-type": [b"application/json"]})
ANSWER = json.dumps({"choices": [{"message": {"content": "hi"}}]}).encode()
BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()


class FakeExternalBackend:
    """Answers probes and requests while alive; refuses connections once killed.

    ``hold_probes``: probes stay unanswered (in flight) until ``answer_held_probes``.
    """

    def __init__(self) -> None:
        self.alive = True
        self.hold_probes = False
        self.held: list[RequestRecord] = []
        self.refused = 0

    def __call__(self, record: RequestRecord) -> None:
        probe = record.uri.endswith(b"/health")
        if probe and self.hold_probes:
            self.held.append(record)
        elif not self.alive:
            self.refused += 0 if probe else 1
            record.fail(ConnectionRefusedError())
        elif probe:
            record.respond(200, b'{"status":"ok"}')
        else:
            record.respond(200, ANSWER, JSON)

    def answer_held_probes(self) -> None:
        """The probes in flight get the answer of a backend that was alive when they began."""
        held, self.held = self.held, []
        for record in held:
            record.respond(200, b'{"status":"ok"}')


class UnreachableExternalBackendTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = GatewayFixture()
        self.fake = FakeExternalBackend()
        self.gw.agent.on_request = self.fake
        self.gw.backend.set_state(BackendState.STOPPED)
        self.monitor = ExternalBackendMonitor(
            self.gw.backend, self.gw.agent, self.gw.clock, probe_interval=PROBE_INTERVAL,
            health_timeout=2.0,
        )
        self.monitor.startService()
        self.addCleanup(self.monitor.stopService)
        self.assertTrue(self.gw.backend.ready)  # the first probe, at once

    def chat(self) -> Any:
        client = self.gw.client()
        client.request("POST", "/v1/chat/completions", BODY, AUTH)
        return client

    def get(self, path: str) -> Any:
        client = self.gw.client()
        client.request("GET", path)
        return client.response()

    def assert_unreachable_answer(self) -> None:
        """What every client sees during the outage: the same 502, at once (no clock advance)."""
        for _ in range(3):
            response = self.chat().response()
            self.assertEqual(response.status, 502)
            self.assertEqual(response.json()["error"], {
                "message": "Could not reach the backend: connection refused",
                "type": "server_error",
                "code": "backend_unreachable",
            })
            self.assertEqual(response.header("retry-after"), "1")
        self.assertEqual(self.get("/readyz").status, 503)
        health = self.get("/health").json()
        self.assertEqual(health["status"], "unavailable")
        self.assertEqual(health["backend"]["state"], "unreachable")
        self.assertEqual(health["backend"]["last_probe"]["detail"], "connection refused")

    def assert_back_within_a_second(self) -> None:
        self.fake.alive = True
        self.fake.hold_probes = False
        self.gw.clock.advance(1.0)
        self.assertEqual(self.get("/readyz").status, 200)
        self.assertEqual(self.chat().response().status, 200)

    def test_killed_just_before_a_probe(self) -> None:
        self.gw.clock.advance(PROBE_INTERVAL - 0.3)
        self.fake.alive = False
        self.gw.clock.advance(0.3)  # the probe finds it down before any request does
        self.assert_unreachable_answer()
        self.assertEqual(self.fake.refused, 0)  # nobody waited for, or tried, a dead backend
        self.assert_back_within_a_second()

    def test_killed_just_after_a_probe(self) -> None:
        self.gw.clock.advance(0.2)
        self.fake.alive = False
        self.gw.clock.advance(0.3)  # 4.5 s before the next scheduled probe
        self.assert_unreachable_answer()
        self.assertEqual(self.fake.refused, 1)  # the first request found it; the others knew
        self.assert_back_within_a_second()

    def test_killed_while_a_probe_is_in_flight(self) -> None:
        self.fake.hold_probes = True
        self.gw.clock.advance(PROBE_INTERVAL)  # a probe begins and waits for its answer
        self.assertEqual(len(self.fake.held), 1)
        self.fake.alive = False
        self.fake.hold_probes = False
        first = self.chat().response()  # refused: the backend is marked down at once
        self.assertEqual(first.status, 502)
        # The probe that began before the failure answers "ready": too old to vouch for it.
        self.fake.answer_held_probes()
        self.assert_unreachable_answer()
        self.assert_back_within_a_second()

    def test_refusals_counted_with_their_reason(self) -> None:
        self.gw.clock.advance(0.2)
        self.fake.alive = False
        self.chat().response()
        breaker = self.gw.resource.router.members[self.gw.backend.name].breaker
        self.assertEqual(breaker.failure_reasons, {"refused": 1})
        self.assertEqual(breaker.failures, 1)
