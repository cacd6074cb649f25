"""Tests for llamaproxy.gateway.resource (with site, request, relay and forward), in memory."""

from __future__ import annotations

import gc
import json
import weakref
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from llamaproxy.auth.access import AccessControl
from llamaproxy.auth.keys import KeySet, parse_keys
from llamaproxy.auth.ratelimit import RateLimiter
from llamaproxy.auth.store import KeyStore
from llamaproxy.backends.admission import Admission
from llamaproxy.backends.backend import Backend, BackendState, ProbeResult
from llamaproxy.backends.breaker import BreakerSettings
from llamaproxy.backends.config_file import BackendsTable, ModelSpec, RemoteBackendSpec
from llamaproxy.backends.routing import Router
from llamaproxy.gateway.body_budget import BodyBudget
from llamaproxy.gateway.cors import CorsPolicy
from llamaproxy.gateway.proxy import MODEL_PREFIX, Exchange, GatewaySettings, _model_path
from llamaproxy.gateway.resource import LARGE_BODY, GatewayResource, resolve
from llamaproxy.gateway.site import GatewaySite, RequestLimits
from llamaproxy.observability.health import HealthState
from llamaproxy.testing import AgentSpy, InMemoryClient, StreamingResponse, router_for, sse_chunk

KEY = "sk-unit-test-key-000000000001"
OTHER_KEY = "sk-unit-test-key-000000000002"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()


class GatewayFixture:
    """A gateway site on an AgentSpy backend, driven by a Clock."""

    def __init__(self, auth: bool = True, concurrency: int = 2, queue: int = 0,
                 body_limit: int = 1024, limiter: RateLimiter | None = None,
                 keys_path: str = "/nonexistent/api_keys.txt", client_timeout: float = 30.0,
                 max_queue_per_key: int = 0, clock: Any = None,
                 limits: dict[str, Any] | None = None, cors: CorsPolicy | None = None,
                 **settings: Any) -> None:
        self.keys_path = keys_path
        self.clock = clock if clock is not None else Clock()
        self.agent = AgentSpy()
        self.backend = Backend("test", "http://127.0.0.1:9", api_key="gateway-backend-key",
                               model="fake")
        self.backend.set_state(BackendState.READY)
        self.admission = Admission(concurrency, queue, max_queue_per_key, clock=self.clock)
        self.store = KeyStore(self.keys_path, parse_keys([f"alice:{KEY}", f"bob:{OTHER_KEY}"])[0])
        self.access = AccessControl(self.store, limiter, auth_enabled=auth,
                                    admin_key_ids=frozenset({"alice"}))
        self.resource: GatewayResource
        self.health = HealthState(self.backend, self.admission, self.clock, auth,
                                  lambda: self.resource.draining)
        self.resource = GatewayResource(
            router_for(self.backend, self.admission, self.clock), self.agent, self.clock,
            GatewaySettings(**settings), self.access,
            self.health.document, self.health.ready,
        )
        self.site = GatewaySite(
            self.resource,
            RequestLimits(max_body=body_limit, client_timeout=client_timeout, **(limits or {})),
            cors, reactor=self.clock)

    def with_spare(self, slots: int, breaker: BreakerSettings,
                   retry_non_idempotent: bool = False) -> Backend:
        """Route over two backends: this one first, then a ready "spare" (priority 1), each
        with ``slots`` slots and ``breaker``. Returns the spare."""
        spare = Backend("spare", "http://127.0.0.1:8", model="fake")
        spare.set_state(BackendState.READY)
        specs = (
            RemoteBackendSpec(name="test", models=("fake",), slots=slots, breaker=breaker,
                              base_url=self.backend.base_url,
                              retry_non_idempotent=retry_non_idempotent),
            RemoteBackendSpec(name="spare", models=("fake",), slots=slots, breaker=breaker,
                              base_url=spare.base_url, priority=1),
        )
        table = BackendsTable(backends=specs, models=(ModelSpec("fake", default=True),),
                              default_model="fake", breaker=breaker)
        self.resource.router = Router.build(
            table, self.clock, {"test": self.backend, "spare": spare},
            {"test": self.admission, "spare": Admission(slots, clock=self.clock)})
        return spare

    def client(self) -> InMemoryClient:
        return InMemoryClient(self.site)

    def chat(self, body: bytes = CHAT, headers: dict[str, str] | None = None) -> InMemoryClient:
        client = self.client()
        client.request("POST", "/v1/chat/completions", body, headers or AUTH)
        return client


class RoutingTests(SynchronousTestCase):
    def test_no_api_path_is_another_kind_of_path(self) -> None:
        # resolve() looks API paths up first: a path of two kinds would lose the other.
        from llamaproxy.gateway.resource import ADMIN_ROUTES, API_ROUTES, PUBLIC_ROUTES
        self.assertEqual(set(API_ROUTES) & {*PUBLIC_ROUTES, b"/metrics", *ADMIN_ROUTES}, set())

    def test_resolve(self) -> None:
        extra = frozenset({b"/tokenize"})
        self.assertEqual(resolve(b"POST", b"/v1/chat/completions", extra).kind, "api")  # type: ignore[union-attr]
        self.assertEqual(resolve(b"GET", b"/v1/models/tiny", extra).kind, "model")  # type: ignore[union-attr]
        self.assertEqual(resolve(b"POST", b"/tokenize", extra).kind, "api")  # type: ignore[union-attr]
        self.assertEqual(resolve(b"GET", b"/ping", extra).kind, "public")  # type: ignore[union-attr]
        self.assertEqual(resolve(b"OPTIONS", b"/anything", extra).kind, "preflight")  # type: ignore[union-attr]
        self.assertEqual(resolve(b"GET", b"/metrics", extra).kind, "metrics")  # type: ignore[union-attr]
        for path in (b"/slots", b"/props", b"/v1/../slots", b"/detokenize",
                     b"/v1/models/", b"/v1/chat/completions/", b"//v1/models"):
            self.assertEqual(resolve(b"GET", path, extra).status, 404, path)  # type: ignore[union-attr]
        wrong = resolve(b"GET", b"/v1/chat/completions", extra)
        self.assertEqual(wrong.status, 405)  # type: ignore[union-attr]
        self.assertEqual(dict(wrong.headers)["Allow"], "POST")  # type: ignore[union-attr]


class PublicRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = GatewayFixture()

    def test_ping(self) -> None:
        client = self.gw.client()
        client.request("GET", "/ping")
        response = client.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"")
        self.assertEqual(response.header("server"), "llamaproxy")
        self.assertEqual(self.gw.agent.requests, [])

    def test_health_document(self) -> None:
        client = self.gw.client()
        client.request("GET", "/health")
        doc = client.response().json()
        self.assertEqual(doc["status"], "ok")
        self.assertEqual(doc["backend"]["state"], "ready")
        self.assertEqual(doc["queue"], {"max_concurrent": 2, "max_queue_size": 0, "active": 0,
                                        "waiting": 0})
        self.assertEqual(doc["authentication"], {"enabled": True})
        self.assertNotIn("alice", json.dumps(doc))

    def test_readyz_follows_backend(self) -> None:
        client = self.gw.client()
        client.request("GET", "/readyz")
        self.assertEqual(client.response().status, 200)
        self.gw.backend.set_state(BackendState.LOADING, retry_at=self.gw.clock.seconds() + 7)
        client = self.gw.client()
        client.request("GET", "/readyz")
        response = client.response()
        self.assertEqual(response.status, 503)
        self.assertEqual(response.header("retry-after"), "7")

    def test_preflight(self) -> None:
        client = self.gw.client()
        client.request("OPTIONS", "/v1/chat/completions")
        self.assertEqual(client.response().status, 204)

    def test_unknown_path_is_json_404(self) -> None:
        client = self.gw.client()
        client.request("GET", "/slots", headers=AUTH)
        response = client.response()
        self.assertEqual(response.status, 404)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(response.json()["error"]["code"], "not_found")
        self.assertEqual(self.gw.agent.requests, [])


class AuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = GatewayFixture()

    def assert_401(self, client: InMemoryClient, message: str) -> None:
        response = client.response()
        self.assertEqual(response.status, 401)
        self.assertEqual(response.json(), {"error": {
            "message": message, "type": "invalid_request_error", "code": "invalid_api_key",
            "param": "authorization"}})
        self.assertEqual(response.header("cache-control"), "no-store")
        self.assertEqual(self.gw.agent.requests, [])

    def test_missing_key(self) -> None:
        client = self.gw.client()
        client.request("GET", "/v1/models")
        self.assert_401(client, "Missing Authorization header")

    def test_wrong_key(self) -> None:
        client = self.gw.client()
        client.request("GET", "/v1/models",
                       headers={"Authorization": "Bearer sk-not-a-real-key-0000"})
        self.assert_401(client, "Invalid API key")

    def test_bad_format(self) -> None:
        client = self.gw.client()
        client.request("GET", "/v1/models", headers={"X-Api-Key": "short"})
        self.assert_401(client, "Invalid API key format")

    def test_no_keys_fails_closed(self) -> None:
        self.gw.store.keys = KeySet({})
        client = self.gw.client()
        client.request("GET", "/v1/models", headers=AUTH)
        self.assert_401(client, "Authentication misconfigured: no API keys loaded")

    def test_rejected_before_the_body(self) -> None:
        """A refused request with a body is answered at once and its body is never read."""
        client = self.gw.client()
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n"
                    b"Expect: 100-continue\r\n\r\n")
        self.assert_401(client, "Missing Authorization header")
        self.assertNotIn(b"100 Continue", client.written)
        self.assertTrue(client.closed)
        client.send(b"x" * 900)  # ignored

    def test_x_api_key_and_auth_disabled(self) -> None:
        client = self.gw.client()
        client.request("GET", "/v1/models", headers={"X-Api-Key": KEY})
        self.assertEqual(len(self.gw.agent.requests), 1)
        open_gw = GatewayFixture(auth=False)
        client = open_gw.client()
        client.request("GET", "/v1/models")
        self.assertEqual(len(open_gw.agent.requests), 1)


class ReloadRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        with open(self.path, "w") as f:
            f.write(f"alice:{KEY}\nbob:{OTHER_KEY}\ncarol:sk-carolcarolcarol00\n")
        self.gw = GatewayFixture(keys_path=self.path)

    def reload(self, key: str, method: str = "POST") -> InMemoryClient:
        client = self.gw.client()
        client.request(method, "/reload", headers={"Authorization": f"Bearer {key}"})
        return client

    def test_admin_reloads(self) -> None:
        response = self.reload(KEY).response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json(), {"status": "ok", "keys_loaded": 3})
        self.assertIsNotNone(self.gw.store.keys.lookup("sk-carolcarolcarol00"))
        self.assertEqual(self.gw.agent.requests, [])

    def test_other_keys_get_403(self) -> None:
        response = self.reload(OTHER_KEY).response()
        self.assertEqual(response.status, 403)
        self.assertEqual(response.json()["error"]["code"], "forbidden")
        self.assertIsNone(self.gw.store.keys.lookup("sk-carolcarolcarol00"))
        self.assertEqual(self.reload("sk-nobody-000000000000").response().status, 401)

    def test_unreadable_file_keeps_keys_and_answers_500(self) -> None:
        import os

        os.remove(self.path)
        response = self.reload(KEY).response()
        self.assertEqual(response.status, 500)
        self.assertEqual(response.json()["error"]["code"], "reload_failed")
        self.assertNotIn(self.path, response.json()["error"]["message"])
        self.assertIsNotNone(self.gw.store.keys.lookup(KEY))

    def test_route_dry_run(self) -> None:
        client = self.gw.client()
        client.request("POST", "/v1/route", b'{"model": "anything"}',
                       {"Authorization": f"Bearer {KEY}"})
        answer = client.response().json()
        self.assertEqual((answer["model"], answer["backend"]), ("fake", "test"))
        self.assertEqual(self.gw.agent.requests, [])
        other = self.gw.client()
        other.request("POST", "/v1/route", b"{}", {"Authorization": f"Bearer {OTHER_KEY}"})
        self.assertEqual(other.response().status, 403)

    def test_get_is_405(self) -> None:
        response = self.reload(KEY, "GET").response()
        self.assertEqual(response.status, 405)
        self.assertEqual(response.header("allow"), "POST")


class RateLimitThroughGatewayTests(SynchronousTestCase):
    def test_429_with_retry_after_and_headers(self) -> None:
        clock_holder: list[Clock] = []
        gw = GatewayFixture()
        clock_holder.append(gw.clock)
        limiter = RateLimiter(gw.clock, default_limit=2)
        gw.access.limiter = limiter
        for _ in range(2):
            client = gw.client()
            client.request("GET", "/v1/models", headers=AUTH)
            gw.agent.requests[-1].respond(200, b"{}")
            response = client.response()
            self.assertEqual(response.status, 200)
            self.assertEqual(response.header("x-ratelimit-limit"), "2")
        self.assertEqual(response.header("x-ratelimit-remaining"), "0")
        client = gw.client()
        client.request("GET", "/v1/models", headers=AUTH)
        response = client.response()
        self.assertEqual(response.status, 429)
        self.assertEqual(response.json()["error"], {
            "message": "Rate limit exceeded. Please slow down your requests.",
            "type": "rate_limit_error", "code": "rate_limit_exceeded"})
        self.assertGreaterEqual(int(response.header("retry-after") or 0), 1)
        self.assertEqual(len(gw.agent.requests), 2)
        # another key has its own bucket
        other = gw.client()
        other.request("GET", "/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"})
        self.assertEqual(len(gw.agent.requests), 3)

    def test_limited_post_is_refused_before_its_body(self) -> None:
        gw = GatewayFixture()
        gw.access.limiter = RateLimiter(gw.clock, default_limit=1)
        gw.chat()
        client = gw.client()
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n"
                    + f"Authorization: Bearer {KEY}\r\n\r\n".encode())
        self.assertEqual(client.response().status, 429)
        self.assertTrue(client.closed)


class ProxyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = GatewayFixture(request_timeout=30.0, stream_idle_timeout=5.0)

    def test_headers_forwarded_and_filtered(self) -> None:
        client = self.gw.chat(headers={**AUTH, "Connection": "keep-alive, X-Secret",
                                       "X-Secret": "1", "X-Trace": "abc", "Cookie": "a=b"})
        [record] = self.gw.agent.requests
        self.assertEqual(record.method, b"POST")
        self.assertEqual(record.uri, b"http://127.0.0.1:9/v1/chat/completions")
        assert record.headers is not None
        self.assertEqual(record.headers.getRawHeaders(b"authorization"),
                         [b"Bearer gateway-backend-key"])
        self.assertEqual(record.headers.getRawHeaders(b"x-trace"), [b"abc"])
        for dropped in (b"x-secret", b"cookie", b"host", b"content-length"):
            self.assertIsNone(record.headers.getRawHeaders(dropped), dropped)
        # The client's Connection header is dropped; a stream goes with the gateway's own.
        self.assertEqual(record.headers.getRawHeaders(b"connection"), [b"close"])
        assert record.body_producer is not None
        sent = StringTransport()
        record.body_producer.startProducing(sent)
        # The body as the client sent it (no stream_options forced on it: issue 16.1).
        self.assertEqual(sent.value(), CHAT)
        record.respond(200, b'{"ok": true}', Headers({
            b"content-type": [b"application/json"], b"access-control-allow-origin": [b"*"],
            b"connection": [b"close, x-hop"], b"x-hop": [b"1"], b"x-kept": [b"2"]}))
        response = client.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b'{"ok": true}')
        self.assertEqual(response.header("content-length"), "12")
        self.assertEqual(response.header("x-kept"), "2")
        for dropped in ("access-control-allow-origin", "x-hop"):
            self.assertIsNone(response.header(dropped), dropped)
        self.assertEqual(self.gw.resource.in_flight, set())
        self.assertEqual(self.gw.admission.active, 0)

    def test_answered_requests_are_freed_without_the_garbage_collector(self) -> None:
        # No reference cycle outlives an exchange: its request, exchange and relay are freed
        # by reference counting as soon as it ends (garbage collections cost milliseconds).
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        for streamed in (False, True):
            client = self.gw.chat()
            [exchange] = self.gw.resource.in_flight
            freed = [weakref.ref(exchange), weakref.ref(exchange.request)]
            del exchange
            if streamed:
                backend = StreamingResponse()
                self.gw.agent.requests[-1].deferred.callback(backend)
                backend.send(sse_chunk("Hel"))
                backend.send(b"data: [DONE]\n\n")
                backend.finish()
                del backend  # the fake backend response keeps its body protocol
            else:
                self.gw.agent.requests[-1].respond(200, b'{"ok": true}', Headers({
                    b"content-type": [b"application/json"]}))
            self.assertTrue(client.response().complete)
            freed.append(weakref.ref(self.gw.resource))  # a control that must stay alive
            self.assertEqual([ref() is None for ref in freed], [True, True, False], streamed)

    def test_rate_limited_requests_are_freed_without_the_garbage_collector(self) -> None:
        # Seen in the gateway under load (issue 17.7): with a rate limit, every request held
        # its refund as partial(resource._refund, request, ...), a cycle through the request
        # that only a full collection frees (once a minute under the fast paths' GC schedule):
        # +20 MB of RSS under 50 streams.
        gw = GatewayFixture(limiter=RateLimiter(Clock(), default_limit=1000))
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        for status in (200, 503):
            client = gw.chat()
            [exchange] = gw.resource.in_flight
            self.assertIsNotNone(exchange.request.refund)
            freed = [weakref.ref(exchange.request)]
            del exchange
            gw.agent.requests[-1].respond(status, b'{"ok": true}', Headers({
                b"content-type": [b"application/json"]}))
            self.assertTrue(client.response().complete)
            self.assertEqual([ref() is None for ref in freed], [True], status)

    def test_a_connection_answered_before_its_body_is_freed_without_the_collector(self) -> None:
        # Seen the same way: a request refused from its headers (401 here) with its body
        # still to come left twisted.web's body decoder on the channel, holding a bound method
        # of the channel: a cycle per connection, one more full collection's worth of memory
        # for a client that only sends bad keys.
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        client = self.gw.client()
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
                    b"Authorization: Bearer sk-wrong-key-0000000000000\r\n"
                    b"Content-Length: 100\r\n\r\n")
        self.assertEqual(client.response().status, 401)
        channel = weakref.ref(client.channel)
        client.disconnect()
        del client
        self.assertIsNone(channel())

    def test_stream_is_relayed_event_by_event(self) -> None:
        client = self.gw.chat()
        backend = StreamingResponse()
        self.gw.agent.requests[0].deferred.callback(backend)
        backend.send(sse_chunk("Hel"))
        response = client.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("x-accel-buffering"), "no")
        self.assertEqual(response.header("content-type"), "text/event-stream")
        self.assertIn(b"Hel", client.written)
        self.assertNotIn(b"lo", client.written)
        backend.send(sse_chunk("lo"))
        self.assertIn(b"lo", client.written)
        self.assertFalse(client.response().complete)
        backend.send(b"data: [DONE]\n\n")
        backend.finish()
        response = client.response()
        self.assertTrue(response.complete)
        self.assertTrue(response.body.endswith(b"data: [DONE]\n\n"))
        self.assertEqual(self.gw.admission.active, 0)

    def test_the_exchange_ends_with_its_relay(self) -> None:
        # No coroutine waits for the relay: its end ends the exchange (slot, in-flight set) and
        # tells routing of a completed answer; a broken one is not reported as served.
        served: list[tuple[Any, ...]] = []
        router = self.gw.resource.exchanges.router
        router.served = lambda *args: served.append(args)  # type: ignore[method-assign]
        for ending in ("finish", "fail"):
            client = self.gw.chat()
            backend = StreamingResponse()
            self.gw.agent.requests[-1].deferred.callback(backend)
            backend.send(sse_chunk("Hel"))
            (exchange,) = self.gw.resource.exchanges.in_flight
            self.assertIsNotNone(exchange.task)
            self.assertTrue(exchange.task.called)  # type: ignore[union-attr]
            before = 0 if ending == "finish" else 1
            self.assertEqual((len(served), self.gw.admission.active), (before, 1))
            if ending == "finish":
                backend.send(b"data: [DONE]\n\n")
                backend.finish()
                self.assertTrue(client.response().complete)
                self.assertEqual([args[2].name for args in served], ["test"])
            else:
                backend.fail()
                self.assertTrue(client.closed)
                self.assertEqual(len(served), 1)  # (the first stream's)
            self.assertEqual((self.gw.resource.exchanges.in_flight, self.gw.admission.active),
                             (set(), 0))
            self.assertEqual((exchange.outcome(), exchange.task),
                             ("complete" if ending == "finish" else "backend_failed", None))

    def test_streams_ask_the_backend_to_close_the_connection(self) -> None:
        """llama-server closes a connection after a streamed response though it says
        keep-alive; a streamed request says Connection: close so no client reuses it."""
        self.gw.chat()
        self.gw.chat(json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode())
        stream, plain = self.gw.agent.requests
        assert stream.headers is not None and plain.headers is not None
        self.assertEqual(stream.headers.getRawHeaders(b"connection"), [b"close"])
        self.assertIsNone(plain.headers.getRawHeaders(b"connection"))

    def test_stream_relayed_as_the_backend_sent_it(self) -> None:
        """Usage and timings events reach the client whether or not it asked for usage, and the
        request body reaches the backend unchanged (issue 16.1: nothing is forced)."""
        usage_event = (b'data: {"choices": [], "usage": {"prompt_tokens": 5, '
                       b'"completion_tokens": 2}, "timings": {"prompt_n": 5}}\n\n')
        for asked in (False, True):
            body = json.loads(CHAT)
            if asked:
                body["stream_options"] = {"include_usage": True}
            sent = json.dumps(body).encode()
            client = self.gw.chat(sent)
            record = self.gw.agent.requests[-1]
            assert record.body_producer is not None
            forwarded = StringTransport()
            record.body_producer.startProducing(forwarded)
            self.assertEqual(forwarded.value(), sent)
            backend = StreamingResponse()
            record.deferred.callback(backend)
            backend.send(sse_chunk("Hi") + usage_event + b"data: [DONE]\n\n")
            backend.finish()
            response = client.response()
            self.assertIn(usage_event, response.body)
            self.assertTrue(response.body.endswith(b"data: [DONE]\n\n"))

    def test_overhead_header_and_metrics(self) -> None:
        from llamaproxy.observability.metrics import GatewayMetrics

        self.gw.resource.metrics = GatewayMetrics(self.gw.clock)
        client = self.gw.chat()
        self.gw.clock.advance(0.002)  # the backend's time, not the gateway's
        backend = StreamingResponse()
        self.gw.agent.requests[0].deferred.callback(backend)
        backend.send(sse_chunk("Hi"))
        self.assertEqual(client.response().header("x-gateway-overhead-ms"), "0.00")
        self.assertIsNotNone(client.response().header("x-request-id"))

    def test_backpressure_pauses_the_backend(self) -> None:
        client = self.gw.chat()
        backend = StreamingResponse()
        self.gw.agent.requests[0].deferred.callback(backend)
        client.http_channel.pauseProducing()  # the client's socket buffer is full
        self.assertTrue(backend.transport.paused)
        self.gw.clock.advance(20)  # a paused stream is not idle: the 5 s idle timeout waits
        self.assertFalse(backend.transport.stopped)
        client.http_channel.resumeProducing()
        self.assertFalse(backend.transport.paused)

    def test_client_disconnect_stops_the_backend(self) -> None:
        client = self.gw.chat()
        backend = StreamingResponse()
        self.gw.agent.requests[0].deferred.callback(backend)
        backend.send(sse_chunk("Hel"))
        client.disconnect()
        self.assertTrue(backend.transport.stopped)
        self.assertEqual(self.gw.admission.active, 0)
        self.assertEqual(self.gw.resource.in_flight, set())

    def test_the_exchange_hooks_the_request_only_while_in_flight(self) -> None:
        client = self.gw.chat()
        [exchange] = self.gw.resource.in_flight
        request = exchange.request
        self.assertEqual(request.on_lost, exchange.client_left)
        backend = StreamingResponse()
        self.gw.agent.requests[0].deferred.callback(backend)
        backend.send(sse_chunk("Hi"))
        backend.finish()
        self.assertEqual(client.response().status, 200)
        self.assertIsNone(request.on_lost)  # no request -> exchange reference left behind
        self.assertEqual(self.gw.resource.in_flight, set())
        self.assertEqual(self.gw.admission.active, 0)

    def test_client_disconnect_before_headers_cancels(self) -> None:
        client = self.gw.chat()
        client.disconnect()
        self.assertTrue(self.gw.agent.requests[0].cancelled)
        self.assertEqual(self.gw.admission.active, 0)

    def test_backend_dies_mid_stream_aborts_the_client(self) -> None:
        client = self.gw.chat()
        backend = StreamingResponse()
        self.gw.agent.requests[0].deferred.callback(backend)
        backend.send(sse_chunk("Hel"))
        backend.fail()
        self.assertTrue(client.closed)
        response = client.response()
        self.assertFalse(response.complete)
        self.assertNotIn(b"error", response.body)

    def test_idle_stream_is_aborted(self) -> None:
        client = self.gw.chat()
        backend = StreamingResponse()
        self.gw.agent.requests[0].deferred.callback(backend)
        backend.send(sse_chunk("Hel"))
        self.gw.clock.advance(4)
        backend.send(sse_chunk("lo"))
        self.gw.clock.advance(4)
        self.assertFalse(client.closed)
        self.gw.clock.advance(1.5)
        self.assertTrue(client.closed)
        self.assertTrue(backend.transport.stopped)
        self.assertFalse(client.response().complete)

    def test_one_timer_watches_the_deadline_and_the_relay(self) -> None:
        # The relay starts 3 s after the send: its idle timeout still counts from then.
        client = self.gw.chat()
        [exchange] = self.gw.resource.in_flight
        self.gw.clock.advance(3)
        backend = StreamingResponse()
        self.gw.agent.requests[0].deferred.callback(backend)
        backend.send(sse_chunk("Hel"))
        self.assertEqual(len(self.exchange_timers()), 1)  # one for the deadline and the relay
        self.assertEqual([call for call in self.gw.clock.getDelayedCalls()
                          if getattr(call, "func", None) == exchange.relay._idle_expired], [])
        self.gw.clock.advance(4.9)  # 7.9 s: 4.9 s after the relay's last data
        self.assertFalse(client.closed)
        self.gw.clock.advance(0.2)
        self.assertTrue(client.closed)
        self.assertEqual(exchange.relay.outcome, "idle_timeout")
        self.assertEqual(self.gw.resource.in_flight, set())
        self.assertEqual(self.exchange_timers(), [])

    def exchange_timers(self) -> list[Any]:
        """The reactor timers the exchanges' timers share (one while any is armed)."""
        return [call for call in self.gw.clock.getDelayedCalls()
                if getattr(call, "func", None) == self.gw.resource.exchanges._timers_due]

    def test_exchanges_share_one_timer_and_leave_none_behind(self) -> None:
        gw = GatewayFixture(request_timeout=30.0, stream_idle_timeout=0.0, concurrency=3)
        self.gw = gw
        clients = [gw.chat() for _ in range(3)]
        self.assertEqual(len(self.exchange_timers()), 1)
        for record in gw.agent.requests:
            record.respond(200, b"{}", Headers({b"content-type": [b"application/json"]}))
        self.assertEqual([c.response().status for c in clients], [200, 200, 200])
        self.assertEqual(gw.resource.in_flight, set())
        self.assertEqual(self.exchange_timers(), [])  # the last one took the timer with it

    def test_each_deadline_fires_at_its_own_time_in_order(self) -> None:
        # Deadlines 30 s after each send (at 0, 1 and 2 s): the first exchange is answered at
        # 20 s; the other two still time out at exactly 31 and 32 s, in that order.
        gw = GatewayFixture(request_timeout=30.0, stream_idle_timeout=0.0, concurrency=3)
        self.gw = gw
        clients = []
        for _ in range(3):
            clients.append(gw.chat())
            gw.clock.advance(1)
        timed_out: list[int] = []
        for index, record in enumerate(gw.agent.requests):
            record.deferred.addBoth(
                lambda _, i=index, r=record: timed_out.append(i) if r.cancelled else None)
        gw.clock.advance(17)  # 20 s
        gw.agent.requests[0].respond(200, b"{}", Headers({b"content-type": [b"application/json"]}))
        self.assertEqual(clients[0].response().status, 200)
        gw.clock.advance(10.99)  # 30.99 s: the first one's deadline passed, it is gone
        self.assertEqual(timed_out, [])
        self.assertEqual([call.getTime() for call in self.exchange_timers()], [31.0])
        gw.clock.advance(0.01)
        self.assertEqual(timed_out, [1])
        self.assertEqual(clients[1].response().status, 504)
        self.assertEqual(clients[2].written, b"")
        gw.clock.advance(0.99)
        self.assertEqual(timed_out, [1])
        gw.clock.advance(0.01)
        self.assertEqual(timed_out, [1, 2])
        self.assertEqual(clients[2].response().status, 504)
        self.assertEqual(self.exchange_timers(), [])

    def test_deadlines_due_together_fire_in_the_order_they_were_armed(self) -> None:
        gw = GatewayFixture(request_timeout=30.0, stream_idle_timeout=0.0, concurrency=3)
        self.gw = gw
        clients = [gw.chat() for _ in range(3)]
        timed_out: list[int] = []
        for index, record in enumerate(gw.agent.requests):
            record.deferred.addBoth(
                lambda _, i=index, r=record: timed_out.append(i) if r.cancelled else None)
        gw.clock.advance(100)
        self.assertEqual(timed_out, [0, 1, 2])
        self.assertEqual([c.response().status for c in clients], [504, 504, 504])
        self.assertEqual(self.exchange_timers(), [])

    def test_a_long_stream_meets_its_deadline(self) -> None:
        client = self.gw.chat()
        [exchange] = self.gw.resource.in_flight
        backend = StreamingResponse()
        self.gw.agent.requests[0].deferred.callback(backend)
        for _ in range(7):  # never idle for 5 s, but the request's 30 s pass
            backend.send(sse_chunk("x"))
            self.gw.clock.advance(4)
        self.assertFalse(client.closed)  # 28 s
        backend.send(sse_chunk("x"))
        self.gw.clock.advance(1.9)
        self.assertFalse(client.closed)
        self.gw.clock.advance(0.1)
        self.assertTrue(client.closed)
        self.assertTrue(backend.transport.stopped)
        assert exchange.relay is not None
        self.assertEqual(exchange.relay.outcome, "timeout")

    def test_connection_refused_is_502(self) -> None:
        client = self.gw.chat()
        self.gw.agent.requests[0].fail(ConnectionRefusedError())
        self.assertEqual(client.written, b"")  # a moment for the supervisor to notice a crash
        self.gw.clock.advance(0.5)
        response = client.response()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.json()["error"]["code"], "bad_gateway")
        self.assertEqual(len(self.gw.agent.requests), 1)

    def test_refused_during_a_crash_waits_for_the_restart_and_resends(self) -> None:
        client = self.gw.chat()
        self.gw.backend.set_state(BackendState.BACKOFF, retry_at=self.gw.clock.seconds() + 3)
        self.gw.agent.requests[0].fail(ConnectionRefusedError())
        self.gw.clock.advance(2)
        self.assertEqual(len(self.gw.agent.requests), 1)
        self.gw.backend.set_state(BackendState.READY)
        self.assertEqual(len(self.gw.agent.requests), 2)
        self.gw.agent.requests[1].respond(200, b"{}")
        self.assertEqual(client.response().status, 200)

    def test_refused_and_never_back_is_503(self) -> None:
        client = self.gw.chat()
        self.gw.backend.set_state(BackendState.BACKOFF, retry_at=self.gw.clock.seconds() + 90)
        self.gw.agent.requests[0].fail(ConnectionRefusedError())
        self.gw.clock.advance(60)
        response = client.response()
        self.assertEqual(response.status, 503)
        self.assertEqual(response.header("retry-after"), "30")

    def test_loading_backend_holds_requests_until_ready(self) -> None:
        self.gw.backend.set_state(BackendState.LOADING)
        client = self.gw.chat()
        self.gw.clock.advance(30)
        self.assertEqual(self.gw.agent.requests, [])
        self.gw.backend.set_state(BackendState.READY)
        self.gw.agent.requests[0].respond(200, b"{}")
        self.assertEqual(client.response().status, 200)

    def test_backend_not_ready_in_time_is_503_without_forwarding(self) -> None:
        self.gw.backend.set_state(BackendState.LOADING)
        client = self.gw.chat()
        self.gw.clock.advance(59)
        self.assertEqual(client.written, b"")
        self.gw.clock.advance(1)
        response = client.response()
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json()["error"]["code"], "backend_unavailable")
        self.assertEqual(response.header("retry-after"), "5")
        self.assertEqual(self.gw.agent.requests, [])

    def test_stopped_backend_is_503_at_once(self) -> None:
        self.gw.backend.set_state(BackendState.STOPPED)
        response = self.gw.chat().response()
        self.assertEqual(response.status, 503)

    def test_client_leaving_while_backend_loads(self) -> None:
        self.gw.backend.set_state(BackendState.LOADING)
        client = self.gw.chat()
        client.disconnect()
        self.gw.backend.set_state(BackendState.READY)
        self.assertEqual(self.gw.agent.requests, [])
        self.assertEqual(self.gw.resource.in_flight, set())

    def test_failed_probe_makes_backend_unavailable(self) -> None:
        self.gw.backend.last_probe = ProbeResult(0.0, "down", "timed out")
        client = self.gw.chat()
        self.gw.clock.advance(60)
        self.assertEqual(client.response().status, 503)

    def test_first_byte_timeout_is_504(self) -> None:
        gw = GatewayFixture(first_byte_timeout=10.0)
        client = gw.chat()
        gw.clock.advance(10)
        self.assertTrue(gw.agent.requests[0].cancelled)
        self.assertEqual(client.response().status, 504)

    def test_first_byte_timer_only_when_it_can_fire_first(self) -> None:
        # REQUEST_TIMEOUT is armed before the send: a first-byte timeout due no earlier could
        # only be armed and cancelled, so the send gets no timer of its own.
        timers = {}
        for first_byte in (10.0, 30.0, 60.0):
            gw = GatewayFixture(first_byte_timeout=first_byte, request_timeout=30.0)
            client = gw.chat()
            timers[first_byte] = len(gw.clock.getDelayedCalls())
            due = min(first_byte, 30.0)
            gw.clock.advance(due - 0.1)
            self.assertFalse(gw.agent.requests[0].cancelled)
            gw.clock.advance(0.1)
            self.assertTrue(gw.agent.requests[0].cancelled)
            self.assertEqual(client.response().status, 504)
        self.assertEqual(timers[30.0], timers[10.0] - 1)
        self.assertEqual(timers[60.0], timers[10.0] - 1)

    def test_timeout_before_headers_is_504(self) -> None:
        client = self.gw.chat()
        self.gw.clock.advance(30)
        self.assertTrue(self.gw.agent.requests[0].cancelled)
        response = client.response()
        self.assertEqual(response.status, 504)
        self.assertEqual(response.json()["error"],
                         {"message": "Request timed out", "type": "timeout_error", "code": 504})

    def test_timeout_after_headers_aborts_instead_of_appending(self) -> None:
        client = self.gw.chat()
        backend = StreamingResponse()
        self.gw.agent.requests[0].deferred.callback(backend)
        for _ in range(10):
            backend.send(sse_chunk("x"))
            self.gw.clock.advance(3)
        self.assertTrue(client.closed)
        self.assertNotIn(b"timed out", client.written)
        self.assertEqual(self.gw.resource.in_flight, set())

    def test_unexpected_error_is_502_without_details(self) -> None:
        client = self.gw.chat()
        self.gw.agent.requests[0].fail(ValueError("/secret/path exploded"))
        self.gw.clock.advance(0.5)
        response = client.response()
        self.assertEqual(response.status, 502)
        self.assertNotIn(b"secret", response.body)


class ModelRetrievalTests(SynchronousTestCase):
    """GET /v1/models/{id} is answered from the backend's model list (llama-server lacks it)."""

    MODELS = json.dumps({"object": "list", "data": [
        {"id": "tiny", "object": "model", "aliases": ["tiny-alias"]}]}).encode()

    def retrieve(self, path: str) -> tuple[GatewayFixture, InMemoryClient]:
        gw = GatewayFixture()
        client = gw.client()
        client.request("GET", path, headers=AUTH)
        [record] = gw.agent.requests
        self.assertEqual(record.uri, b"http://127.0.0.1:9/v1/models")
        record.respond(200, self.MODELS, Headers({b"content-type": [b"application/json"]}))
        return gw, client

    def test_found_by_id_and_alias(self) -> None:
        for model_id in ("tiny", "tiny-alias"):
            response = self.retrieve(f"/v1/models/{model_id}")[1].response()
            self.assertEqual(response.status, 200)
            self.assertEqual(response.json()["id"], "tiny")

    def test_unknown_model_is_openai_404(self) -> None:
        response = self.retrieve("/v1/models/gpt-4")[1].response()
        self.assertEqual(response.status, 404)
        self.assertEqual(response.json()["error"]["code"], "model_not_found")
        self.assertEqual(response.json()["error"]["param"], "model")

    def test_traversal_never_reaches_another_path(self) -> None:
        response = self.retrieve("/v1/models/../../slots")[1].response()
        self.assertEqual(response.status, 404)

    def test_backend_error_passes_through(self) -> None:
        gw = GatewayFixture()
        client = gw.client()
        client.request("GET", "/v1/models/tiny", headers=AUTH)
        gw.agent.requests[0].respond(503, b'{"error": {"message": "Loading model"}}')
        self.assertEqual(client.response().status, 503)

    def test_garbage_list_is_502(self) -> None:
        gw = GatewayFixture()
        client = gw.client()
        client.request("GET", "/v1/models/tiny", headers=AUTH)
        gw.agent.requests[0].respond(200, b"not json")
        self.assertEqual(client.response().status, 502)


class AdmissionThroughGatewayTests(SynchronousTestCase):
    def test_queue_full_is_503(self) -> None:
        gw = GatewayFixture(concurrency=1, queue=1)
        gw.chat()
        queued = gw.chat()
        rejected = gw.chat()
        self.assertEqual(len(gw.agent.requests), 1)
        response = rejected.response()
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json()["error"]["code"], "queue_full")
        self.assertEqual(response.header("retry-after"), "5")
        gw.agent.requests[0].respond(200, b"{}")
        self.assertEqual(len(gw.agent.requests), 2)
        gw.agent.requests[1].respond(200, b"{}")
        self.assertEqual(queued.response().status, 200)

    def test_model_list_does_not_wait_for_a_slot(self) -> None:
        gw = GatewayFixture(concurrency=1)
        gw.chat()
        client = gw.client()
        client.request("GET", "/v1/models", headers=AUTH)
        self.assertEqual(len(gw.agent.requests), 2)
        self.assertEqual(gw.admission.waiting, 0)

    def test_queued_client_that_leaves_never_reaches_the_backend(self) -> None:
        gw = GatewayFixture(concurrency=1)
        gw.chat()
        queued = gw.chat()
        self.assertEqual(gw.admission.waiting, 1)
        queued.disconnect()
        self.assertEqual(gw.admission.waiting, 0)
        gw.agent.requests[0].respond(200, b"{}")
        self.assertEqual(len(gw.agent.requests), 1)


class QueueTimeoutTests(SynchronousTestCase):
    def test_waiting_too_long_for_a_slot_is_503(self) -> None:
        gw = GatewayFixture(concurrency=1, queue_timeout=20.0)
        gw.chat()
        queued = gw.chat()
        gw.clock.advance(19)
        self.assertEqual(queued.written, b"")
        gw.clock.advance(1)
        response = queued.response()
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json()["error"]["code"], "queue_timeout")
        self.assertIsNotNone(response.header("retry-after"))
        self.assertEqual(gw.admission.waiting, 0)
        gw.agent.requests[0].respond(200, b"{}")
        self.assertEqual(len(gw.agent.requests), 1)

    def test_per_key_queue_bound(self) -> None:
        gw = GatewayFixture(concurrency=1, max_queue_per_key=1)
        gw.chat()
        gw.chat()
        self.assertEqual(gw.chat().response().json()["error"]["code"], "queue_full")
        other = gw.chat(headers={"Authorization": f"Bearer {OTHER_KEY}"})
        self.assertEqual(other.written, b"")  # bob may still queue
        self.assertEqual(gw.admission.waiting, 2)


class ClientTimeoutTests(SynchronousTestCase):
    def test_slow_client_gets_408(self) -> None:
        gw = GatewayFixture(client_timeout=30.0)
        client = gw.client()
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        for _ in range(29):
            client.send(b"X-Slow: 1\r\n")
            gw.clock.advance(1)
        self.assertEqual(client.written, b"")
        gw.clock.advance(1)
        response = client.response()
        self.assertEqual(response.status, 408)
        self.assertEqual(response.json()["error"]["code"], "request_timeout")
        self.assertTrue(client.closed)

    def test_slow_body_gets_408(self) -> None:
        gw = GatewayFixture(client_timeout=5.0)
        client = gw.client()
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                    + f"Authorization: Bearer {KEY}\r\n\r\nabc".encode())
        gw.clock.advance(5)
        self.assertEqual(client.response().status, 408)
        self.assertEqual(gw.agent.requests, [])

    def test_timer_restarts_for_each_request_on_a_connection(self) -> None:
        gw = GatewayFixture(client_timeout=5.0)
        client = gw.client()
        client.request("GET", "/ping")
        gw.clock.advance(4)
        client.request("GET", "/ping")
        gw.clock.advance(4)
        self.assertFalse(client.closed)
        self.assertEqual(client.written.count(b"HTTP/1.1 200"), 2)


class ParkedQueueTests(SynchronousTestCase):
    """A request that must wait for a busy, ready backend waits parked: no exchange running."""

    def parked(self, gw: GatewayFixture) -> list[Exchange]:
        return [e for e in gw.resource.in_flight if e.parked is not None]

    def queue_timers(self, gw: GatewayFixture, admission: Admission) -> int:
        return sum(1 for call in gw.clock.getDelayedCalls() if call.func == admission._expire)

    def test_queued_requests_are_parked_and_served_in_order(self) -> None:
        gw = GatewayFixture(concurrency=1)
        gw.chat()
        bodies = [json.dumps({"messages": [{"role": "user", "content": str(i)}]}).encode()
                  for i in range(20)]
        clients = [gw.chat(body) for body in bodies]
        parked = self.parked(gw)
        self.assertEqual(len(parked), 20)
        self.assertTrue(all(e.task is None and e.slot is None for e in parked))
        self.assertEqual(self.queue_timers(gw, gw.admission), 1)  # one timer for all of them
        for i in range(20):
            gw.agent.requests[i].respond(200, b"{}")
            producer = gw.agent.requests[i + 1].body_producer
            assert producer is not None
            sent = StringTransport()
            producer.startProducing(sent)
            self.assertEqual(json.loads(sent.value())["messages"][0]["content"], str(i))
        gw.agent.requests[20].respond(200, b"{}")
        self.assertEqual([c.response().status for c in clients], [200] * 20)
        self.assertEqual((gw.resource.in_flight, gw.admission.active), (set(), 0))
        self.assertEqual(self.queue_timers(gw, gw.admission), 0)

    def test_client_leaving_a_parked_request_ends_its_exchange(self) -> None:
        gw = GatewayFixture(concurrency=1)
        first = gw.chat()
        queued = gw.chat()
        self.assertEqual(len(self.parked(gw)), 1)
        idle = gw.resource.wait_idle()
        queued.disconnect()
        self.assertEqual((len(gw.resource.in_flight), gw.admission.waiting), (1, 0))
        gw.agent.requests[0].respond(200, b"{}")
        self.successResultOf(idle)
        self.assertEqual(first.response().status, 200)
        self.assertEqual(len(gw.agent.requests), 1)

    def test_drain_timeout_answers_parked_requests_503(self) -> None:
        gw = GatewayFixture(concurrency=1)
        gw.chat()
        queued = gw.chat()
        gw.resource.abort_in_flight()
        response = queued.response()
        self.assertEqual(response.status, 503)
        self.assertEqual(gw.admission.waiting, 0)
        self.assertEqual(len(gw.agent.requests), 1)

    def test_a_backend_not_ready_is_waited_for_without_parking(self) -> None:
        gw = GatewayFixture(concurrency=1)
        gw.chat()
        gw.backend.set_state(BackendState.STARTING)
        gw.chat()
        self.assertEqual(self.parked(gw), [])  # its exchange runs: it waits for the restart
        self.assertEqual(len(gw.resource.in_flight), 2)


class ParkedFailoverTests(SynchronousTestCase):
    """Parked requests with two backends for the model: timeouts and breakers fail over."""

    def setUp(self) -> None:
        self.gw = gw = GatewayFixture(concurrency=1, queue_timeout=10.0)
        self.spare = Backend("spare", "http://127.0.0.1:8", model="fake")
        self.spare.set_state(BackendState.READY)
        self.spare_admission = Admission(1, clock=gw.clock)
        breaker = BreakerSettings(failure_threshold=1, reset_timeout=60)
        specs = (
            RemoteBackendSpec(name="test", models=("fake",), slots=1, breaker=breaker,
                              base_url=gw.backend.base_url),
            RemoteBackendSpec(name="spare", models=("fake",), slots=1, breaker=breaker,
                              base_url=self.spare.base_url, priority=1),
        )
        table = BackendsTable(backends=specs, models=(ModelSpec("fake", default=True),),
                              default_model="fake", breaker=breaker)
        gw.resource.router = Router.build(
            table, gw.clock, {"test": gw.backend, "spare": self.spare},
            {"test": gw.admission, "spare": self.spare_admission})

    def test_queue_timeout_on_the_first_backend_fails_over(self) -> None:
        gw = self.gw
        gw.chat()
        queued = gw.chat()
        self.assertEqual(gw.admission.waiting, 1)
        gw.clock.advance(10)
        self.assertEqual(gw.admission.waiting, 0)
        self.assertEqual(gw.agent.requests[1].uri, b"http://127.0.0.1:8/v1/chat/completions")
        gw.agent.requests[1].respond(200, b"{}")
        self.assertEqual(queued.response().status, 200)
        self.assertEqual(self.spare_admission.active, 0)

    def test_a_breaker_opened_meanwhile_sends_the_served_request_elsewhere(self) -> None:
        gw = self.gw
        gw.chat()
        queued = gw.chat()
        gw.agent.requests[0].fail(ConnectionRefusedError())  # opens test's breaker, frees a slot
        self.assertEqual(gw.admission.active, 0)  # the parked one's slot was given back
        self.assertEqual(gw.agent.requests[-1].uri, b"http://127.0.0.1:8/v1/chat/completions")
        gw.agent.requests[-1].respond(200, b"{}")
        self.assertEqual(queued.response().status, 200)


def _json(code: int, body: bytes = b"{}") -> tuple[int, bytes, Headers]:
    return code, body, Headers({b"content-type": [b"application/json"]})


class FirstSendTests(SynchronousTestCase):
    maxDiff = None
    """``ProxyExchanges._begin`` sends a request admitted at once itself and relays a plain
    answer from the send's callback; anything else goes on in ``_attempts``. Each case gives
    what running the whole exchange in ``_attempts`` gives: the client's answer, what each
    backend was sent, the breakers, the slots, the log."""

    #: 20 s: the send has a first-byte timer of its own (and forward.send's retry errback);
    #: 30 s, as the deadline: none, and ``_begin`` runs ``forward.retry`` itself.
    first_byte_timeout = 20.0

    def gateway(self, through_attempts: bool) -> GatewayFixture:
        gw = GatewayFixture(concurrency=1, queue_timeout=10.0, request_timeout=30.0,
                            first_byte_timeout=self.first_byte_timeout)
        gw.with_spare(1, BreakerSettings(failure_threshold=2, reset_timeout=60))
        if through_attempts:
            exchanges = gw.resource.exchanges

            def begin(exchange: Exchange, candidates: Any) -> None:
                exchanges._run(exchange, exchanges._attempts(exchange, candidates))

            exchanges._begin = begin  # type: ignore[method-assign]
        return gw

    def run_case(self, through_attempts: bool, body: bytes,
                 drive: Any) -> tuple[object, ...]:
        gw = self.gateway(through_attempts)
        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace", "").startswith("llamaproxy"):
                lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        try:
            client = gw.chat(body)
            drive(gw, client)
        finally:
            globalLogPublisher.removeObserver(observe)
        response = client.response() if client.written else None
        router = gw.resource.router
        return (
            None if response is None else (
                response.status, response.body, response.complete,
                # (not the ids, nor the Date: the two runs can fall in different seconds)
                sorted((k, v) for k, v in response.headers.items()
                       if k not in ("x-request-id", "date"))),
            client.closed,
            [(r.uri, r.cancelled, r.pending) for r in gw.agent.requests],
            [m.breaker.status_json() | {"reasons": m.breaker.failure_reasons}
             for m in router.members.values()],
            [(m.load.active, m.load.served) for m in router.members.values()
             if isinstance(m.load, Admission)],
            len(gw.resource.in_flight),
            [line.split(" id=")[0] for line in lines],
        )

    def assert_same(self, drive: Any, body: bytes = b"") -> tuple[object, ...]:
        body = body or json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        direct = self.run_case(False, body, drive)
        self.assertEqual(direct, self.run_case(True, body, drive))
        return direct

    def test_a_plain_answer_is_relayed_from_the_sends_callback(self) -> None:
        def drive(gw: GatewayFixture, client: InMemoryClient) -> None:
            [exchange] = gw.resource.in_flight
            self.assertIs(exchange.task is gw.agent.requests[0].deferred,
                          gw.resource.exchanges._begin.__name__ == "_begin")
            gw.agent.requests[0].respond(*_json(200, b'{"ok": 1}'))

        result = self.assert_same(drive)
        self.assertEqual(result[0][:2], (200, b'{"ok": 1}'))  # type: ignore[index]

    def test_a_stream(self) -> None:
        def drive(gw: GatewayFixture, client: InMemoryClient) -> None:
            backend = StreamingResponse()
            gw.agent.requests[0].deferred.callback(backend)
            backend.send(sse_chunk("Hel"))
            backend.send(b"data: [DONE]\n\n")
            backend.finish()

        self.assertEqual(self.assert_same(drive, CHAT)[0][0], 200)  # type: ignore[index]

    def test_answers_failed_over_or_not(self) -> None:
        cases: list[tuple[tuple[int, bytes, Headers], ...]] = [
            (_json(503), _json(200, b'{"ok": 2}')),  # failed over
            (_json(429), _json(200, b'{"ok": 2}')),
            (_json(503), _json(502, b'{"e": 1}')),  # the last candidate's answer is relayed
            (_json(400, b'{"e": 400}'),),  # a JSON error is relayed
            ((400, b"bad things", Headers({b"content-type": [b"text/plain"]})),),
            ((200, b"text", Headers({b"content-type": [b"text/plain"]})),),
        ]
        for answers in cases:
            def drive(gw: GatewayFixture, client: InMemoryClient,
                      answers: Any = answers) -> None:
                for i, answer in enumerate(answers):  # (each failover sends the next request)
                    gw.agent.requests[i].respond(*answer)

            self.assert_same(drive)

    def test_failed_sends(self) -> None:
        for reason in (ConnectionRefusedError(),
                       ResponseNeverReceived([Failure(ConnectionDone())]), ValueError("bug")):
            def drive(gw: GatewayFixture, client: InMemoryClient, reason: Any = reason) -> None:
                gw.agent.requests[0].fail(reason)
                for record in gw.agent.requests[1:]:
                    record.respond(*_json(200))

            self.assert_same(drive)

    def test_the_client_leaving_or_the_time_running_out_before_the_answer(self) -> None:
        def leave(gw: GatewayFixture, client: InMemoryClient) -> None:
            client.disconnect()

        def deadline(gw: GatewayFixture, client: InMemoryClient) -> None:
            gw.clock.advance(30)

        def first_byte(gw: GatewayFixture, client: InMemoryClient) -> None:
            gw.clock.advance(20)

        for drive in (leave, deadline, first_byte):
            result = self.assert_same(drive)
            self.assertTrue(result[2][0][1])  # type: ignore[index]  # (the send was cancelled)

    def test_a_parked_request(self) -> None:
        def drive(gw: GatewayFixture, client: InMemoryClient) -> None:
            second = gw.chat()
            gw.agent.requests[0].respond(*_json(200))
            gw.agent.requests[1].respond(*_json(200, b'{"ok": 2}'))
            self.assertEqual(second.response().body, b'{"ok": 2}')

        self.assert_same(drive)


class FirstSendRetryTests(FirstSendTests):
    """``FirstSendTests`` with no first-byte timer on the send (FIRST_BYTE_TIMEOUT as
    REQUEST_TIMEOUT, the defaults' case): ``_begin`` sends with ``forward.send_first`` and
    runs ``forward.retry`` itself on a failure, where ``_attempts`` uses ``forward.send``; the
    same answers, sends, breakers, slots and log."""

    first_byte_timeout = 30.0

    def test_first_sends_that_fail_and_are_sent_again(self) -> None:
        unsent: list[BaseException] = [RequestNotSent(),
                                       RequestTransmissionFailed([Failure(ConnectionDone())])]
        for first in (*unsent, ConnectionRefusedError(),
                      ResponseNeverReceived([Failure(ConnectionDone())])):
            for then in ("answer", "fail", "leave", "deadline"):
                def drive(gw: GatewayFixture, client: InMemoryClient, first: Any = first,
                          then: str = then) -> None:
                    gw.agent.requests[0].fail(first)
                    if len(gw.agent.requests) == 1:
                        return  # (may have run: neither sent again nor failed over)
                    if gw.agent.requests[-1].uri != gw.agent.requests[0].uri:
                        gw.agent.requests[-1].respond(*_json(200, b'{"ok": 3}'))
                        return  # (not sent again by forward: failed over to the spare)
                    if then == "answer":
                        gw.agent.requests[1].respond(*_json(200, b'{"ok": 2}'))
                    elif then == "fail":
                        gw.agent.requests[1].fail(RequestNotSent())
                    elif then == "leave":
                        client.disconnect()
                    else:
                        gw.clock.advance(30)
                    for record in gw.agent.requests[2:]:
                        if record.pending:
                            record.respond(*_json(200, b'{"ok": 3}'))

                result = self.assert_same(drive)
                sent = cast(list[tuple[bytes, bool, bool]], result[2])
                sent_again = isinstance(first, (RequestNotSent, RequestTransmissionFailed))
                self.assertEqual(len(sent) > 1 and sent[1][0] == sent[0][0], sent_again)

    def test_the_client_leaving_or_the_time_running_out_before_the_answer(self) -> None:
        # (no first-byte timer here: the client leaving and the deadline)
        def leave(gw: GatewayFixture, client: InMemoryClient) -> None:
            client.disconnect()

        def deadline(gw: GatewayFixture, client: InMemoryClient) -> None:
            gw.clock.advance(30)

        for drive in (leave, deadline):
            result = self.assert_same(drive)
            self.assertTrue(result[2][0][1])  # type: ignore[index]  # (the send was cancelled)


class DrainTests(SynchronousTestCase):
    def test_wait_idle_and_draining(self) -> None:
        gw = GatewayFixture()
        client = gw.chat()
        idle = gw.resource.wait_idle()
        self.assertNoResult(idle)
        gw.resource.draining = True
        late = gw.chat()
        self.assertEqual(late.response().status, 503)
        gw.agent.requests[0].respond(200, b"{}")
        self.successResultOf(idle)
        self.assertEqual(client.response().status, 200)

    def test_abort_in_flight(self) -> None:
        gw = GatewayFixture()
        streaming = gw.chat()
        waiting = gw.chat()
        backend = StreamingResponse()
        gw.agent.requests[0].deferred.callback(backend)
        gw.resource.abort_in_flight()
        self.assertTrue(streaming.closed)
        self.assertTrue(backend.transport.stopped)
        self.assertTrue(gw.agent.requests[1].cancelled)
        self.assertEqual(gw.resource.in_flight, set())
        del waiting


class BodyLimitTests(SynchronousTestCase):
    def test_content_length_over_limit_is_413_before_reading(self) -> None:
        gw = GatewayFixture(body_limit=100)
        client = gw.client()
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n"
                    + f"Authorization: Bearer {KEY}\r\n\r\n".encode())
        response = client.response()
        self.assertEqual(response.status, 413)
        self.assertEqual(response.json()["error"]["message"],
                         "Request body too large (max 100 bytes)")
        self.assertTrue(client.closed)

    def test_chunked_body_counted_as_it_arrives(self) -> None:
        gw = GatewayFixture(body_limit=100)
        client = gw.client()
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Transfer-Encoding: chunked\r\n"
                    + f"Authorization: Bearer {KEY}\r\n\r\n".encode())
        client.send(b"40\r\n" + b"a" * 64 + b"\r\n")
        self.assertEqual(client.written, b"")
        client.send(b"40\r\n" + b"a" * 64 + b"\r\n")
        self.assertEqual(client.response().status, 413)
        self.assertTrue(client.closed)
        self.assertEqual(gw.agent.requests, [])

    def test_at_limit_is_allowed(self) -> None:
        gw = GatewayFixture(body_limit=len(CHAT))
        gw.chat()
        self.assertEqual(len(gw.agent.requests), 1)



class BodyIsolationTests(SynchronousTestCase):
    """Issue 15: JSON limits, the request-body byte budget, large bodies one per reactor turn,
    refused requests giving back their rate-limit charge."""

    def test_large_bodies_are_parsed_one_per_turn(self) -> None:
        gw = GatewayFixture(body_limit=4 << 20, concurrency=4)
        pad = "x" * (LARGE_BODY + 10)
        body = json.dumps({"messages": [{"role": "user", "content": pad}]}).encode()
        for _ in range(3):
            gw.chat(body)
        self.assertEqual(len(gw.agent.requests), 0)  # none parsed inside the read callback
        for sent in (1, 2, 3):
            # One turn: the call due now (Clock.advance would also run those it schedules).
            [call] = self.parse_turns(gw)
            gw.clock.calls.remove(call)  # type: ignore[arg-type]
            call.func(*call.args, **call.kw)  # type: ignore[attr-defined]
            self.assertEqual(len(gw.agent.requests), sent)
        self.assertEqual(self.parse_turns(gw), [])

    def parse_turns(self, gw: GatewayFixture) -> list[Any]:
        return [c for c in gw.clock.getDelayedCalls()
                if c.func == gw.resource._next_large_body]  # type: ignore[attr-defined]

    def test_a_large_body_whose_client_left_is_dropped(self) -> None:
        gw = GatewayFixture(body_limit=4 << 20)
        body = json.dumps({"messages": [], "x": "y" * (LARGE_BODY + 1)}).encode()
        gw.chat(body).disconnect()
        gw.clock.advance(0)
        self.assertEqual(gw.agent.requests, [])

    def test_json_limits_are_a_400_naming_the_limit(self) -> None:
        gw = GatewayFixture(body_limit=1 << 20, limits={"max_json_depth": 8,
                                                         "max_json_values": 100})
        deep = b'{"messages": ' + b"[" * 9 + b"]" * 9 + b"}"
        wide = b'{"messages": [], "x": [' + b",".join([b"1"] * 101) + b"]}"
        for body, words in ((deep, "deeper than 8 levels"), (wide, "more than 100 items")):
            response = gw.chat(body).response()
            self.assertEqual(response.status, 400)
            error = response.json()["error"]
            self.assertEqual(error["code"], "invalid_json")
            self.assertIn(words, error["message"])
        self.assertEqual(len(gw.agent.requests), 0)
        gw.chat(b'{"messages": ' + b"[" * 7 + b"]" * 7 + b"}")  # within the limits: sent
        self.assertEqual(len(gw.agent.requests), 1)

    def test_body_budget_refuses_before_the_body(self) -> None:
        gw = GatewayFixture(body_limit=1 << 20)
        gw.site.body_budget = BodyBudget(max_total=3000, max_per_key=2000)
        # alice announces more than her share: 503 before a body byte is read.
        client = gw.client()
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 2500\r\n\r\n")
        response = client.response()
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json()["error"]["code"], "queue_full")
        self.assertIn("this key's requests", response.json()["error"]["message"])
        self.assertEqual(response.header("retry-after"), "5")
        # A request held while it waits counts until it ends, then is given back.
        held = gw.chat()
        self.assertEqual(gw.site.body_budget.per_key, {"alice": len(CHAT)})
        gw.agent.requests[-1].respond(200, b'{"choices": []}')
        self.assertTrue(held.response().complete)
        self.assertEqual((gw.site.body_budget.held, gw.site.body_budget.per_key), (0, {}))

    def test_refused_requests_give_back_their_charge(self) -> None:
        clock = Clock()
        gw = GatewayFixture(limiter=RateLimiter(clock, 2), clock=clock)
        for _ in range(3):
            response = gw.chat(b"{not json").response()
            self.assertEqual(response.status, 400)
            self.assertEqual(response.header("x-ratelimit-remaining"), "2")
        for remaining in ("1", "0"):
            client = gw.chat()
            gw.agent.requests[-1].respond(200, b'{"choices": []}')
            self.assertEqual(client.response().header("x-ratelimit-remaining"), remaining)
        self.assertEqual(gw.chat().response().status, 429)

    def test_queue_full_gives_back_its_charge(self) -> None:
        clock = Clock()
        gw = GatewayFixture(limiter=RateLimiter(clock, 10), clock=clock, concurrency=1, queue=1)
        gw.chat()  # served
        gw.chat()  # waits
        response = gw.chat().response()
        self.assertEqual((response.status, response.json()["error"]["code"]), (503, "queue_full"))
        self.assertEqual(response.header("x-ratelimit-remaining"), "8")  # the two others count


class BreakerOpenTests(SynchronousTestCase):
    """Issue 16.3: an upstream whose breaker is open answers at once, saying so (no wait)."""

    def test_every_breaker_open_is_an_immediate_503(self) -> None:
        gw = GatewayFixture(queue_timeout=60.0)
        breaker = BreakerSettings(failure_threshold=1, reset_timeout=30)
        spec = RemoteBackendSpec(name="test", models=("fake",), slots=2, breaker=breaker,
                                 base_url=gw.backend.base_url)
        table = BackendsTable(backends=(spec,), models=(ModelSpec("fake", default=True),),
                              default_model="fake", breaker=breaker)
        gw.resource.router = Router.build(table, gw.clock, {"test": gw.backend},
                                          {"test": gw.admission})
        first = gw.chat()
        gw.agent.requests[0].respond(500, b'{"error": {"message": "boom"}}')  # opens it
        self.assertEqual(first.response().status, 500)
        gw.clock.advance(1)
        response = gw.chat().response()  # answered at once: no clock advance needed
        self.assertEqual(len(gw.agent.requests), 1)  # never sent
        self.assertEqual(response.status, 503)
        error = response.json()["error"]
        self.assertEqual(error["code"], "backend_unavailable")
        self.assertIn("circuit breaker", error["message"])
        self.assertEqual(response.header("retry-after"), "29")


def _same_ids(written: bytes) -> bytes:
    """``written`` with its request id (random) and its Date (two runs can fall in different
    seconds) made constant."""
    import re

    written = re.sub(rb"(?i)(\r\ndate: )[^\r]+", rb"\1DATE", written)
    return re.sub(rb"(?i)(x-request-id: )[0-9a-f]+", rb"\1ID", written)


class FastPathHeaderTests(SynchronousTestCase):
    """The fast path's backend client gets the request's fields without a ``Headers`` between
    (``forward.request_fields``), and the response's headers are stored into the client's
    without ``setRawHeaders`` (``header_fill.set_fields``): the client sees the same bytes
    as through the stock path, and the backend gets the stock path's request bytes."""

    CLIENT_HEADERS = {**AUTH, "Connection": "keep-alive, X-Secret", "X-Secret": "1",
                      "X-Trace": "abc", "Cookie": "a=b", "accept": "*/*", "etag": "e"}
    RESPONSE_HEADERS = [(b"Server", b"llama.cpp"),
                        (b"access-control-allow-origin", b"*"), (b"Connection", b"keep-alive"),
                        (b"Keep-Alive", b"timeout=5"), (b"x-kept", b"2"), (b"X-Kept", b"3"),
                        (b"Cache-Control", b"private"), (b"Set-Cookie", b"s=1"),
                        (b"Date", b"yesterday"), (b"www-authenticate", b"x")]

    def fast_fixture(self) -> tuple[GatewayFixture, Any]:
        from llamaproxy.fastpath.backend_client import BackendClient
        from tests.fastpath.test_backend_client import Endpoints

        gw = GatewayFixture(request_timeout=30.0, stream_idle_timeout=5.0)
        endpoints = Endpoints()
        gw.resource.exchanges.agent = BackendClient(gw.clock, endpoints, 4)  # type: ignore[arg-type]
        return gw, endpoints.endpoint

    def exchange(self, stream: bool) -> None:
        body = CHAT if stream else json.dumps({"messages": [{"role": "user", "content": "x"}]}
                                               ).encode()
        kind = b"text/event-stream" if stream else b"application/json"
        self.RESPONSE_HEADERS = [(b"content-type", kind), *FastPathHeaderTests.RESPONSE_HEADERS]
        # Stock: the AgentSpy's request and a stub response with the same fields.
        stock = GatewayFixture(request_timeout=30.0, stream_idle_timeout=5.0)
        stock_client = stock.chat(body, self.CLIENT_HEADERS)
        [record] = stock.agent.requests
        assert record.headers is not None
        head = Headers()
        for name, value in self.RESPONSE_HEADERS:
            if name.lower() not in (b"connection", b"keep-alive"):  # (Agent keeps them apart)
                head.addRawHeader(name, value)
        # Fast: a BackendClient on a memory transport, answered with raw bytes.
        fast, endpoint = self.fast_fixture()
        fast_client = fast.chat(body, self.CLIENT_HEADERS)
        protocol, transport = endpoint.connections[-1]
        from llamaproxy.fastpath.backend_client import BackendClient
        from tests.fastpath.test_backend_client import Endpoints

        # The backend's bytes: those the stock path's Headers give the same client.
        expected = Endpoints()
        reference = BackendClient(Clock(), expected, 4)  # type: ignore[arg-type]
        reference.request(b"POST", record.uri, record.headers, record.body_producer)
        self.assertEqual(transport.value(), expected.endpoint.connections[-1][1].value())
        self.assertIn(b"\r\nX-Trace: abc\r\n", transport.value())
        self.assertNotIn(b"X-Secret", transport.value())

        raw = b"HTTP/1.1 200 OK\r\n" + b"".join(
            n + b": " + v + b"\r\n" for n, v in self.RESPONSE_HEADERS)
        if stream:
            backend = StreamingResponse(headers=head)
            record.deferred.callback(backend)
            events = [sse_chunk("Hel"), sse_chunk("lo"), b"data: [DONE]\n\n"]
            for event in events:
                backend.send(event)
            backend.finish()
            protocol.dataReceived(raw + b"Transfer-Encoding: chunked\r\n\r\n")
            for event in events:  # (a read each: the client gets a chunk each, as above)
                protocol.dataReceived(b"%x\r\n%b\r\n" % (len(event), event))
            protocol.dataReceived(b"0\r\n\r\n")
        else:
            answer = b'{"ok": true}'
            record.respond(200, answer, head)
            protocol.dataReceived(raw + b"Content-Length: 12\r\n\r\n" + answer)
        self.assertTrue(fast_client.response().complete)
        self.assertEqual(_same_ids(fast_client.written), _same_ids(stock_client.written))
        self.assertIn(b"X-Kept: 2\r\nX-Kept: 3\r\n", fast_client.written)
        self.assertNotIn(b"llama.cpp", fast_client.written)
        self.assertNotIn(b"Access-Control", fast_client.written)

    def test_plain(self) -> None:
        self.exchange(stream=False)

    def test_stream(self) -> None:
        self.exchange(stream=True)


class UpstreamUrlTests(SynchronousTestCase):
    def test_remembered_per_base_url_and_target_and_bounded(self) -> None:
        from llamaproxy.backends.config_file import upstream_url_bytes

        exchanges = GatewayFixture().resource.exchanges
        for base in ("http://h:1", "http://h:9000/v1", "http://h:9000/v1/", "http://h/p/"):
            for target in (b"/v1/chat/completions", b"/tokenize?x=1", b"/v1", b"/v1?a"):
                expected = upstream_url_bytes(base, target)
                self.assertEqual(exchanges._upstream_url(base, target), expected)
                self.assertEqual(exchanges._upstream_url(base, target), expected)
        self.assertEqual(exchanges._upstream_url("http://h:9000/v1", b"/tokenize"),
                         b"http://h:9000/tokenize")
        for i in range(600):
            self.assertEqual(exchanges._upstream_url("http://h:1", b"/v1/x?%d" % i),
                             b"http://h:1/v1/x?%d" % i)
            self.assertLessEqual(len(exchanges._urls), 256)


class ModelPathTests(SynchronousTestCase):
    """``proxy._model_path`` is ``path.startswith(MODEL_PREFIX)``, told by one byte first."""

    @given(st.one_of(
        st.binary(max_size=24),
        st.sampled_from([b"/v1/models/", b"/v1/models", b"/v1/models/x", b"/v1/modelsx/",
                         b"/v1/chat/completions", b"/v1/models//", b"/v2/models/a"]),
        st.builds(lambda tail: b"/v1/models/" + tail, st.binary(max_size=8)),
        st.builds(lambda head, tail: head + b"/" + tail, st.binary(min_size=10, max_size=10),
                  st.binary(max_size=4)),
    ))
    def test_same_as_startswith(self, path: bytes) -> None:
        self.assertEqual(_model_path(path), path.startswith(MODEL_PREFIX))
