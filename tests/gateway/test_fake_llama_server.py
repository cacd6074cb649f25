"""The gateway against FakeLlamaServer over an in-memory agent: full path, no sockets."""

from __future__ import annotations

import json

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.auth.access import AccessControl
from llamaproxy.auth.keys import parse_keys
from llamaproxy.auth.store import KeyStore
from llamaproxy.backends.admission import Admission
from llamaproxy.backends.backend import Backend, BackendState
from llamaproxy.gateway.proxy import GatewaySettings
from llamaproxy.gateway.resource import GatewayResource
from llamaproxy.gateway.site import GatewaySite, RequestLimits
from llamaproxy.observability.health import HealthState
from llamaproxy.testing import FakeLlamaServer, InMemoryClient, router_for

KEY = "sk-fake-llama-test-0000001"


class FakeLlamaServerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeLlamaServer(self.clock, api_key="gateway-k", reply="one two three")
        self.agent = RequestTraversalAgent(self.fake)
        backend = Backend("fake", "http://127.0.0.1:8080", api_key="gateway-k", model="fake")
        backend.set_state(BackendState.READY)
        admission = Admission(2)
        health = HealthState(backend, admission, self.clock, True, lambda: False)
        access = AccessControl(KeyStore("unused", parse_keys([f"t:{KEY}"])[0]), None)
        resource = GatewayResource(router_for(backend, admission, self.clock), self.agent,
                                   self.clock, GatewaySettings(), access, health.document,
                                   health.ready)
        self.site = GatewaySite(resource, RequestLimits(max_body=1 << 20), reactor=self.clock)

    def call(self, method: str, path: str, body: object = None) -> InMemoryClient:
        client = InMemoryClient(self.site)
        data = json.dumps(body).encode() if body is not None else b""
        client.request(method, path, data, {"Authorization": f"Bearer {KEY}",
                                            "Content-Type": "application/json"})
        self.agent.flush()
        return client

    def test_models_and_chat(self) -> None:
        models = self.call("GET", "/v1/models").response()
        self.assertEqual(models.json()["data"][0]["id"], "fake")
        chat = self.call("POST", "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "hi"}]}).response()
        self.assertEqual(chat.json()["choices"][0]["message"]["content"], "one two three")
        method, path, headers, _ = self.fake.requests[-1]
        self.assertEqual((method, path), (b"POST", b"/v1/chat/completions"))
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer gateway-k"])

    def test_sse_stream_event_by_event(self) -> None:
        client = self.call("POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hi"}], "stream": True})
        seen = []
        for _ in range(10):
            self.clock.advance(0.1)
            self.agent.flush()
            seen.append(client.written.count(b"data: "))
        self.assertEqual(seen[:3], [1, 2, 3])  # one event per tick, relayed at once
        response = client.response()
        self.assertTrue(response.complete)
        self.assertTrue(response.body.endswith(b"data: [DONE]\n\n"))
        self.assertIsNone(response.header("access-control-allow-origin"))

    def test_loading_backend_passes_its_503(self) -> None:
        self.fake.loading = True
        response = self.call("GET", "/v1/models").response()
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json()["error"]["message"], "Loading model")

    def test_client_leaving_cancels_the_fake_stream(self) -> None:
        client = self.call("POST", "/v1/completions", {"prompt": "hi", "stream": True})
        self.clock.advance(0.1)
        self.agent.flush()
        client.disconnect()
        self.agent.flush()
        self.clock.advance(1)
        self.agent.flush()
        self.assertEqual(self.fake.cancelled, 1)
