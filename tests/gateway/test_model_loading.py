"""Requests for on-demand models through the gateway: start, LOAD_TIMEOUT, load failure."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.backends.backend import BackendState
from llamaproxy.backends.on_demand import ModelState, OnDemandModel
from tests.backends.test_on_demand import FakeChild
from tests.gateway.test_resource import GatewayFixture


class ModelLoadingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = GatewayFixture(load_timeout=30.0, queue_timeout=5.0)
        self.gw.backend.set_state(BackendState.STOPPED)
        self.child = FakeChild(self.gw.backend, self.gw.clock)
        self.model = OnDemandModel(self.gw.backend, self.child, self.gw.admission, self.gw.clock,
                                   jitter=lambda: 0.0)

    def test_request_starts_the_model_and_is_served_once_ready(self) -> None:
        client = self.gw.chat()
        self.assertEqual((self.child.starts, self.model.state), (1, ModelState.LOADING))
        self.gw.clock.advance(20)  # longer than QUEUE_TIMEOUT: loading has its own budget
        self.assertEqual((client.written, len(self.gw.agent.requests)), (b"", 0))
        self.child.loaded()
        self.assertEqual(len(self.gw.agent.requests), 1)
        self.gw.agent.requests[0].respond(200, b'{"ok": true}')
        self.assertEqual(client.response().status, 200)

    def test_load_timeout_is_503_model_loading(self) -> None:
        client = self.gw.chat()
        self.gw.clock.advance(29)
        self.assertEqual(client.written, b"")
        self.gw.clock.advance(1)
        response = client.response()
        self.assertEqual(response.status, 503)
        error = response.json()["error"]
        self.assertEqual(error["code"], "model_loading")
        self.assertIn("is loading", error["message"])
        self.assertIsNotNone(response.header("retry-after"))
        self.assertEqual(len(self.gw.agent.requests), 0)

    def test_load_failure_is_503_model_load_failed_with_the_reason(self) -> None:
        client = self.gw.chat()
        self.child.crash("exit code 1: gguf_init_from_file: invalid magic characters")
        response = client.response()
        self.assertEqual(response.status, 503)
        error = response.json()["error"]
        self.assertEqual(error["code"], "model_load_failed")
        self.assertIn("'fake'", error["message"])
        self.assertIn("invalid magic characters", error["message"])
        self.assertEqual(response.header("retry-after"), "1")
        # Within the backoff the next request fails at once, without a new start.
        again = self.gw.chat().response()
        self.assertEqual(again.json()["error"]["code"], "model_load_failed")
        self.assertEqual(self.child.starts, 1)
