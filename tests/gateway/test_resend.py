"""When the gateway sends a request again: only when it certainly did not run (issue 16.7).

A POST that reached a backend whole and got no answer may have run (and, upstream, been billed):
it is not sent again, to the same backend or the next, unless the backend is a local child that
crashed under it, or the backend sets ``retry_non_idempotent``. A request that never left, or an
idempotent one, may be.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import RequestNotSent
from twisted.web.client import ResponseNeverReceived

from llamaproxy.backends.backend import BackendState
from llamaproxy.backends.breaker import BreakerSettings
from llamaproxy.backends.config_file import (
    BackendsTable,
    LocalBackendSpec,
    ModelSpec,
    RemoteBackendSpec,
)
from llamaproxy.backends.routing import Router
from tests.gateway.test_resource import GatewayFixture

_NO_BREAKER = BreakerSettings(enabled=False)


def _lost() -> ResponseNeverReceived:
    """The backend read the request, then closed the connection without answering."""
    return ResponseNeverReceived([Failure(ConnectionDone())])


class SingleBackendTests(SynchronousTestCase):
    def gateway(self, local: bool) -> GatewayFixture:
        gw = GatewayFixture(concurrency=2)
        spec: LocalBackendSpec | RemoteBackendSpec
        if local:
            spec = LocalBackendSpec(name="test", models=("fake",), slots=2, breaker=_NO_BREAKER,
                                    model_path="/models/fake.gguf", port=9)
        else:
            spec = RemoteBackendSpec(name="test", models=("fake",), slots=2,
                                     breaker=_NO_BREAKER, base_url=gw.backend.base_url)
        table = BackendsTable(backends=(spec,), models=(ModelSpec("fake", default=True),),
                              default_model="fake", breaker=_NO_BREAKER,
                              route_unknown_models=True)
        gw.resource.router = Router.build(table, gw.clock, {"test": gw.backend},
                                          {"test": gw.admission})
        return gw

    def test_remote_post_read_then_closed_is_sent_once(self) -> None:
        gw = self.gateway(local=False)
        client = gw.chat()
        gw.backend.set_state(BackendState.STARTING)  # even if the upstream then looks restarting
        gw.agent.requests[0].fail(_lost())
        gw.clock.advance(60)
        self.assertEqual(len(gw.agent.requests), 1)
        self.assertIn(client.response().status, (502, 503))

    def test_local_child_that_crashed_gets_it_again_after_the_restart(self) -> None:
        gw = self.gateway(local=True)
        client = gw.chat()
        gw.backend.set_state(BackendState.BACKOFF, retry_at=gw.clock.seconds() + 3)
        gw.agent.requests[0].fail(_lost())
        gw.clock.advance(2)
        self.assertEqual(len(gw.agent.requests), 1)
        gw.backend.set_state(BackendState.READY)
        self.assertEqual(len(gw.agent.requests), 2)
        gw.agent.requests[1].respond(200, b"{}")
        self.assertEqual(client.response().status, 200)

    def test_local_child_that_did_not_crash_is_not_sent_it_again(self) -> None:
        gw = self.gateway(local=True)
        client = gw.chat()
        gw.agent.requests[0].fail(_lost())
        gw.clock.advance(60)
        self.assertEqual(len(gw.agent.requests), 1)
        self.assertEqual(client.response().status, 502)

    def test_unsent_request_is_sent_again_after_a_restart(self) -> None:
        gw = self.gateway(local=False)
        client = gw.chat()
        gw.backend.set_state(BackendState.BACKOFF, retry_at=gw.clock.seconds() + 3)
        gw.agent.requests[0].fail(ConnectionRefusedError())
        gw.backend.set_state(BackendState.READY)
        gw.clock.advance(1)
        self.assertEqual(len(gw.agent.requests), 2)
        gw.agent.requests[1].respond(200, b"{}")
        self.assertEqual(client.response().status, 200)


class FailoverTests(SynchronousTestCase):
    def gateway(self, retry_non_idempotent: bool = False) -> GatewayFixture:
        gw = GatewayFixture(concurrency=2, first_byte_timeout=30.0)
        gw.with_spare(2, _NO_BREAKER, retry_non_idempotent)
        return gw

    def test_post_that_may_have_run_does_not_fail_over(self) -> None:
        gw = self.gateway()
        client = gw.chat()
        gw.agent.requests[0].fail(_lost())
        gw.clock.advance(1)
        self.assertEqual(len(gw.agent.requests), 1)
        response = client.response()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.json()["error"]["code"], "bad_gateway")

    def test_post_without_an_answer_in_time_does_not_fail_over(self) -> None:
        gw = self.gateway()
        client = gw.chat()
        gw.clock.advance(30)
        self.assertEqual(len(gw.agent.requests), 1)
        self.assertEqual(client.response().status, 504)

    def test_retry_non_idempotent_lets_it_fail_over(self) -> None:
        gw = self.gateway(retry_non_idempotent=True)
        client = gw.chat()
        gw.agent.requests[0].fail(_lost())
        self.assertEqual(len(gw.agent.requests), 2)
        self.assertEqual(gw.agent.requests[1].uri, b"http://127.0.0.1:8/v1/chat/completions")
        gw.agent.requests[1].respond(200, b"{}")
        self.assertEqual(client.response().status, 200)

    def test_request_that_never_left_fails_over(self) -> None:
        for failure in (ConnectionRefusedError(), RequestNotSent()):
            gw = self.gateway()
            client = gw.chat()
            gw.agent.requests[0].fail(failure)
            self.assertEqual(len(gw.agent.requests), 2, failure)
            gw.agent.requests[1].respond(200, b"{}")
            self.assertEqual(client.response().status, 200)
