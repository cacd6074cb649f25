"""Tests for llamaproxy.observability.health: the /health document, readiness, and the Klein health
site."""

from __future__ import annotations

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.backends.admission import Admission
from llamaproxy.backends.backend import Backend, BackendState, ProbeResult
from llamaproxy.observability.health import HealthSite, HealthState


class HealthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.draining = False
        self.backend = Backend("llama-server", "http://127.0.0.1:1", model="tiny")
        self.state = HealthState(self.backend, Admission(2, 5), self.clock, True,
                                 lambda: self.draining)
        self.treq = StubTreq(HealthSite(self.state).app.resource())

    def get(self, path: str) -> tuple[int, bytes, dict[bytes, list[bytes]]]:
        response = self.successResultOf(self.treq.get("http://health" + path))
        body = self.successResultOf(response.content())
        return response.code, body, dict(response.headers.getAllRawHeaders())

    def test_document(self) -> None:
        self.backend.set_state(BackendState.READY)
        self.backend.restarts = 2
        self.backend.last_probe = ProbeResult(1000.0, "ready", status_code=200)
        self.clock.advance(42)
        doc = self.state.document()
        self.assertEqual(doc["status"], "ok")
        self.assertEqual(doc["uptime_seconds"], 42)
        self.assertEqual(doc["backend"], {
            "name": "llama-server", "state": "ready", "restarts": 2, "last_exit": None,
            "last_probe": {"at": 1000.0, "outcome": "ready", "status_code": 200}})
        self.assertEqual(doc["queue"], {"max_concurrent": 2, "max_queue_size": 5, "active": 0,
                                        "waiting": 0})
        self.backend.set_state(BackendState.BACKOFF)
        self.assertEqual(self.state.document()["status"], "unavailable")
        self.draining = True
        self.assertEqual(self.state.document()["status"], "draining")

    def test_the_older_gateways_fields(self) -> None:
        """Issue 16.11: monitors of the older gateway read `code` and `gateway`."""
        doc = self.state.document()
        self.assertNotIn("code", doc)  # no probe yet: no backend status to report
        self.assertEqual(doc["gateway"], {"status": "ok"})
        self.backend.last_probe = ProbeResult(1000.0, "loading", "Loading model", 503)
        self.state.legacy_metrics = lambda: {"requests_total": 7}
        doc = self.state.document()
        self.assertEqual(doc["code"], 503)
        self.assertEqual(doc["gateway"], {"status": "ok", "metrics": {"requests_total": 7}})
        self.draining = True
        self.assertEqual(self.state.document()["gateway"]["status"], "draining")  # type: ignore[index]

    def test_liveness_on_any_path(self) -> None:
        for path in ("/", "/anything", "/deep/path"):
            code, body, headers = self.get(path)
            self.assertEqual((code, body), (200, b""))
            self.assertEqual(headers[b"Content-Type"], [b"text/plain"])

    def test_readyz(self) -> None:
        self.backend.set_state(BackendState.LOADING, retry_at=self.clock.seconds() + 12)
        code, _, headers = self.get("/readyz")
        self.assertEqual(code, 503)
        self.assertEqual(headers[b"Retry-After"], [b"12"])
        self.backend.set_state(BackendState.READY)
        self.assertEqual(self.get("/readyz")[0], 200)
        self.backend.last_probe = ProbeResult(1001.0, "down", "timed out")
        self.assertEqual(self.get("/readyz")[0], 503)
        self.backend.last_probe = ProbeResult(1002.0, "ready")
        self.draining = True
        self.assertEqual(self.get("/readyz")[0], 503)

    def test_on_demand_default_backend_is_ready_while_stopped(self) -> None:
        self.assertEqual(self.get("/readyz")[0], 503)  # stopped, always-on
        self.backend.on_demand = lambda: None  # a request would start it
        self.backend.on_demand_status = lambda: {"state": "stopped", "idle_ttl": 0.0}
        self.assertEqual(self.get("/readyz")[0], 200)
        self.assertEqual(self.state.document()["status"], "ok")
        self.assertEqual(self.state.document()["backend"]["on_demand"],  # type: ignore[index]
                         {"state": "stopped", "idle_ttl": 0.0})
        self.draining = True
        self.assertEqual(self.get("/readyz")[0], 503)

    def test_listeners_hear_state_changes(self) -> None:
        heard: list[str] = []
        self.backend.listeners.append(lambda b: heard.append(b.state.value))
        self.backend.set_state(BackendState.STARTING)
        self.backend.set_state(BackendState.STARTING)
        self.backend.set_state(BackendState.READY)
        self.assertEqual(heard, ["starting", "ready"])
