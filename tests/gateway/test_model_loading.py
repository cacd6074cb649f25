"""Requests for on-demand models through the gateway: start, LOAD_TIMEOUT, load failure, and
the admin routes that list, load and unload them."""

from __future__ import annotations

import json
from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llamaproxy.backends.backend import BackendState
from llamaproxy.backends.model_admin import ModelAdmin
from llamaproxy.backends.on_demand import ModelState, OnDemandModel
from llamaproxy.testing import FakeSupervisor, InMemoryClient, StreamingResponse, sse_chunk
from tests.gateway.test_resource import KEY, OTHER_KEY, GatewayFixture

PLAIN = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()


class ModelLoadingTests(SynchronousTestCase):
    """Non-streaming requests just wait for their model."""

    def setUp(self) -> None:
        self.gw = GatewayFixture(load_timeout=30.0, queue_timeout=5.0)
        self.gw.backend.set_state(BackendState.STOPPED)
        self.child = FakeSupervisor(self.gw.backend, self.gw.clock)
        self.model = OnDemandModel(self.gw.backend, self.child, self.gw.admission, self.gw.clock,
                                   jitter=lambda: 0.0)

    def test_request_starts_the_model_and_is_served_once_ready(self) -> None:
        client = self.gw.chat(PLAIN)
        self.assertEqual((self.child.starts, self.model.state), (1, ModelState.LOADING))
        self.gw.clock.advance(20)  # longer than QUEUE_TIMEOUT: loading has its own budget
        self.assertEqual((client.written, len(self.gw.agent.requests)), (b"", 0))
        self.child.loaded()
        self.assertEqual(len(self.gw.agent.requests), 1)
        self.gw.agent.requests[0].respond(200, b'{"ok": true}')
        self.assertEqual(client.response().status, 200)

    def test_queued_requests_are_served_while_the_model_drains(self) -> None:
        gw = GatewayFixture(concurrency=1)
        gw.backend.set_state(BackendState.STOPPED)
        child = FakeSupervisor(gw.backend, gw.clock)
        model = OnDemandModel(gw.backend, child, gw.admission, gw.clock)
        model.backend.wait_ready()
        child.loaded()
        first, queued = gw.chat(PLAIN), gw.chat(PLAIN)
        self.assertEqual((len(gw.agent.requests), gw.admission.waiting), (1, 1))
        model.unload("swap", grace=30)
        late = gw.chat(PLAIN)  # arrives during the drain: waits for the next start
        gw.agent.requests[0].respond(200, b"{}")
        self.assertEqual(first.response().status, 200)
        self.assertEqual(len(gw.agent.requests), 2)  # the queued one is served, not stuck
        gw.agent.requests[1].respond(200, b"{}")
        self.assertEqual(queued.response().status, 200)
        gw.clock.advance(0.1)
        self.assertEqual((child.stops, child.starts), (1, 2))  # stopped, then started for late
        self.assertEqual(late.written, b"")
        child.loaded()
        gw.agent.requests[2].respond(200, b"{}")
        self.assertEqual(late.response().status, 200)

    def test_load_timeout_is_503_model_loading(self) -> None:
        client = self.gw.chat(PLAIN)
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
        client = self.gw.chat(PLAIN)
        self.child.crash("exit code 1: gguf_init_from_file: invalid magic characters")
        response = client.response()
        self.assertEqual(response.status, 503)
        error = response.json()["error"]
        self.assertEqual(error["code"], "model_load_failed")
        self.assertIn("'fake'", error["message"])
        self.assertIn("invalid magic characters", error["message"])
        self.assertEqual(response.header("retry-after"), "1")
        # Within the backoff the next request fails at once, without a new start.
        again = self.gw.chat(PLAIN).response()
        self.assertEqual(again.json()["error"]["code"], "model_load_failed")
        self.assertEqual(self.child.starts, 1)


class LoadingCommentsTests(SynchronousTestCase):
    """Streaming requests get ``: loading NAME Ns`` comments while their model loads."""

    def setUp(self) -> None:
        self.gw = GatewayFixture(load_timeout=30.0)
        self.gw.backend.set_state(BackendState.STOPPED)
        self.child = FakeSupervisor(self.gw.backend, self.gw.clock)
        self.model = OnDemandModel(self.gw.backend, self.child, self.gw.admission, self.gw.clock,
                                   jitter=lambda: 0.0)

    def test_comments_then_the_backend_stream(self) -> None:
        client = self.gw.chat()  # "stream": true
        self.assertIn(b"HTTP/1.1 200 OK", client.written)
        self.assertIn(b"text/event-stream", client.written.lower())
        self.assertIn(b": loading test 0s\n\n", client.written)
        self.assertEqual(len(self.gw.agent.requests), 0)
        self.gw.clock.advance(5)
        self.gw.clock.advance(5)
        self.assertIn(b": loading test 5s\n\n", client.written)
        self.assertIn(b": loading test 10s\n\n", client.written)
        self.child.loaded()
        stream = StreamingResponse()
        self.gw.agent.requests[0].deferred.callback(stream)
        stream.send(sse_chunk("Hello"))
        stream.send(b"data: [DONE]\n\n")
        stream.finish()
        self.gw.clock.advance(60)  # no comment after the model is ready
        body = client.response().body
        self.assertEqual(body.count(b": loading"), 3)
        self.assertTrue(body.endswith(sse_chunk("Hello") + b"data: [DONE]\n\n"), body)

    def test_load_failure_ends_the_stream_with_an_error_event(self) -> None:
        client = self.gw.chat()
        self.child.crash("exit code 1: bad GGUF version")
        response = client.response()
        self.assertEqual(response.status, 200)
        last = response.body.split(b"\n\n")[-2]
        self.assertTrue(last.startswith(b"data: "), response.body)
        error = json.loads(last[6:])["error"]
        self.assertEqual(error["code"], "model_load_failed")
        self.assertIn("bad GGUF version", error["message"])

    def test_a_whole_body_answer_becomes_one_event(self) -> None:
        client = self.gw.chat()
        self.child.loaded()
        self.gw.agent.requests[0].respond(
            400, b'{"error": {"message": "bad",\n "code": 400}}',
            Headers({b"content-type": [b"application/json"]}))
        body = client.response().body
        self.assertTrue(body.endswith(b'data: {"error": {"message": "bad", "code": 400}}\n\n'),
                        body)

    def test_a_ready_model_sends_no_comment(self) -> None:
        self.model.backend.wait_ready()
        self.child.loaded()
        client = self.gw.chat()
        self.assertEqual(client.written, b"")  # sent to the backend, no head of our own
        self.assertEqual(len(self.gw.agent.requests), 1)


class ModelAdminRouteTests(SynchronousTestCase):
    """/admin/models, /admin/models/load, /admin/models/unload (admin keys only)."""

    def setUp(self) -> None:
        self.gw = GatewayFixture()
        self.gw.backend.set_state(BackendState.STOPPED)
        self.child = FakeSupervisor(self.gw.backend, self.gw.clock)
        self.model = OnDemandModel(self.gw.backend, self.child, self.gw.admission, self.gw.clock,
                                   idle_ttl=60)
        backends = SimpleNamespace(models={"test": self.model}, router=self.gw.resource.router)
        self.gw.resource.model_admin = ModelAdmin(backends, default_grace=10)

    def call(self, method: str, path: str, body: dict[str, object] | None = None,
             key: str = KEY) -> InMemoryClient:
        client = self.gw.client()
        client.request(method, path, json.dumps(body).encode() if body is not None else b"",
                       {"Authorization": f"Bearer {key}"})
        return client

    def test_list_load_unload(self) -> None:
        listed = self.call("GET", "/admin/models").response()
        self.assertEqual(listed.status, 200)
        self.assertEqual(listed.json()["data"], [{
            "backend": "test", "models": ["fake"], "state": "stopped", "idle_ttl": 60.0,
            "in_flight": 0, "queued": 0}])
        # By model name: the backend serving it.
        loaded = self.call("POST", "/admin/models/load", {"model": "fake"}).response()
        self.assertEqual((loaded.status, loaded.json()["state"]), (200, "loading"))
        self.assertEqual(self.child.starts, 1)
        self.child.loaded()
        slot = self.successResultOf(self.gw.admission.acquire("k"))
        unloading = self.call("POST", "/admin/models/unload", {"model": "test"})
        self.gw.clock.advance(1)
        self.assertEqual(unloading.written, b"")  # drains first: a request is in flight
        self.assertEqual(self.child.stops, 0)
        slot.release()
        self.gw.clock.advance(0.2)
        answer = unloading.response()
        self.assertEqual((answer.status, answer.json()["state"]), (200, "stopped"))
        self.assertEqual(self.child.stops, 1)

    def test_admin_keys_only_and_errors(self) -> None:
        refused = self.call("GET", "/admin/models", key=OTHER_KEY).response()
        self.assertEqual(refused.status, 403)
        missing = self.call("POST", "/admin/models/load", {"model": "nope"}).response()
        self.assertEqual((missing.status, missing.json()["error"]["code"]),
                         (404, "model_not_found"))
        bad = self.call("POST", "/admin/models/unload", {"model": 3}).response()
        self.assertEqual(bad.status, 400)
        wrong_method = self.call("POST", "/admin/models", {}).response()
        self.assertEqual(wrong_method.status, 405)
        self.assertEqual(self.child.starts, 0)
