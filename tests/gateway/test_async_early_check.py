"""An early check that answers later (shared limits ask Redis): the body waits, unread."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from llamaproxy.gateway import errors
from llamaproxy.gateway.errors import GatewayError
from llamaproxy.gateway.request import GatewayRequest
from llamaproxy.gateway.site import GatewaySite
from llamaproxy.testing import InMemoryClient


class Later(Resource):
    """Decides every request later, through a Deferred the test fires; echoes bodies."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Deferred[GatewayError | None]] = []
        self.rendered: list[bytes] = []

    def early_check(self, request: GatewayRequest) -> Deferred[GatewayError | None]:
        request.key_id = "k"
        d: Deferred[GatewayError | None] = Deferred()
        self.pending.append(d)
        return d

    def render(self, request: GatewayRequest) -> bytes:  # type: ignore[override]
        if request.early_error is not None:
            return request.render_error(request.early_error)
        assert request.content is not None
        body = request.content.read()
        self.rendered.append(body)
        request.setHeader(b"Content-Length", str(len(body) + 3).encode())
        return b"ok:" + body


class AsyncEarlyCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = Later()
        self.site = GatewaySite(self.resource, reactor=Clock())  # type: ignore[arg-type]
        self.client = InMemoryClient(self.site)

    def test_the_body_is_not_read_before_the_decision(self) -> None:
        self.client.request("POST", "/x", b'{"a": 1}')
        self.assertEqual(len(self.resource.pending), 1)
        self.assertEqual(self.client.transport.producerState, "paused")  # no more reading
        self.assertEqual(self.client.written, b"")
        self.assertEqual(self.resource.rendered, [])
        self.resource.pending[0].callback(None)
        self.assertEqual(self.client.transport.producerState, "producing")
        self.assertEqual(self.resource.rendered, [b'{"a": 1}'])
        self.assertEqual(self.client.response().status, 200)

    def test_a_refusal_answers_without_reading_the_body(self) -> None:
        self.client.request("POST", "/x", b"x" * 5000)
        refusal = errors.rate_limited((("Retry-After", "7"),))
        self.resource.pending[0].callback(refusal)
        response = self.client.response()
        self.assertEqual((response.status, response.header("retry-after")), (429, "7"))
        self.assertTrue(self.client.closed)
        self.assertEqual(self.resource.rendered, [])

    def test_a_request_without_a_body_renders_after_the_decision(self) -> None:
        self.client.request("GET", "/x")
        self.assertEqual(self.client.written, b"")
        self.resource.pending[0].callback(None)
        self.assertEqual(self.client.response().status, 200)
        client = InMemoryClient(self.site)
        client.request("GET", "/x")
        self.resource.pending[1].callback(errors.forbidden("no"))
        self.assertEqual(client.response().status, 403)

    def test_100_continue_only_once_allowed(self) -> None:
        head = b"POST /x HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        self.client.send(head)
        self.assertEqual(self.client.written, b"")  # not before the decision
        self.resource.pending[0].callback(None)
        self.assertEqual(self.client.written, b"HTTP/1.1 100 Continue\r\n\r\n")
        self.client.send(b"{}")
        self.assertIn(b"ok:{}", self.client.written)

    def test_a_client_gone_before_the_decision(self) -> None:
        self.client.request("POST", "/x", b"{}")
        self.client.disconnect()
        self.resource.pending[0].callback(None)
        self.assertEqual(self.resource.rendered, [])
