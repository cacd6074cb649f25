"""The request_start fast path: a gateway request made and received as twisted.web's
constructor and ``requestReceived`` make and receive it."""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http, server
from twisted.web.resource import Resource

from llamaproxy.fastpath import request_start
from llamaproxy.gateway.request import GatewayRequest
from llamaproxy.gateway.site import GatewaySite
from llamaproxy.testing import InMemoryClient


def _state(request: Any) -> dict[str, Any]:
    """What a request holds, comparable between two requests on one channel."""
    state = dict(vars(request))
    for name in GatewayRequest.__slots__:
        if hasattr(request, name):
            state[name] = getattr(request, name)
    for name in ("requestHeaders", "responseHeaders"):
        state[name] = list(state[name].getAllRawHeaders())
    state.pop("started_at", None)
    return state


class Processed(GatewayRequest):
    """Remembers its process instead of serving."""

    def process(self) -> None:
        self.processed = True


class RequestStartTests(SynchronousTestCase):
    def _channel(self, fast: bool) -> Any:
        site = GatewaySite(Resource(), reactor=Clock(), fast_headers=fast)
        return InMemoryClient(site).channel

    def test_the_site_switch(self) -> None:
        self.assertIsNone(GatewaySite(Resource(), fast_headers=False).start_request)
        self.assertIsNone(self._channel(False).request_received)
        site = GatewaySite(Resource(), fast_headers=True)
        self.assertIs(site.start_request, request_start.start)
        self.assertIs(site.request_received, request_start.received)
        self.assertIs(self._channel(True).request_received, request_start.received)

    def test_no_fast_receive_past_an_override(self) -> None:
        class Own(GatewayRequest):
            def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
                raise AssertionError("never bypassed")

        site = GatewaySite(Resource(), reactor=Clock(), fast_headers=True)
        site.requestFactory = Own
        self.assertIsNone(InMemoryClient(site).channel.request_received)

    def test_made_as_the_stock_constructor_makes_it(self) -> None:
        channel = self._channel(True)
        fast = GatewayRequest(channel)
        stock = GatewayRequest.__new__(GatewayRequest)
        # The stock constructor on the same channel, with the fast path out of the way.
        site, channel.site = channel.site, None
        try:
            GatewayRequest.__init__(stock, channel)
        finally:
            channel.site = site
        stock._clock = fast._clock
        self.assertEqual(_state(fast).keys(), _state(stock).keys())
        for name, value in _state(stock).items():
            with self.subTest(name=name):
                if isinstance(value, (list, dict)):
                    self.assertEqual(_state(fast)[name], value)
                    self.assertEqual(type(_state(fast)[name]), type(value))
                else:
                    self.assertIs(_state(fast)[name], value)
        self.assertIsNot(fast.requestHeaders, fast.responseHeaders)
        self.assertIsNot(fast.notifications, GatewayRequest(channel).notifications)

    def test_received_as_requestReceived_receives_it(self) -> None:
        channel = self._channel(False)
        cases = [(b"POST", b"/v1/chat/completions", b"HTTP/1.1"),
                 (b"GET", b"/v1/models?a=1&b=&a=2", b"HTTP/1.0"),
                 (b"GET", b"/x?", b"HTTP/1.1")]
        for command, path, version in cases:
            with self.subTest(path=path):
                requests = []
                for receive in (http.Request.requestReceived, request_start.received):
                    request = Processed(channel)
                    request.content = io.BytesIO(b"a=1")
                    request.content.seek(3)
                    request.requestHeaders.setRawHeaders(
                        b"content-type", [b"application/x-www-form-urlencoded"])
                    receive(request, command, path, version)
                    self.assertTrue(request.processed)
                    self.assertEqual(request.content.tell(), 0)
                    state = _state(request)
                    del state["content"]  # (each its own)
                    requests.append(state)
                self.assertEqual(requests[1], requests[0])

    def test_a_form_parsing_request_goes_through_requestReceived(self) -> None:
        channel = self._channel(False)
        request: Any = server.Request(channel, parsePOSTFormSubmission=True)
        request.process = lambda: None
        request.content = io.BytesIO(b"a=1")
        request.content.seek(3)  # (as the body left it)
        request.requestHeaders.setRawHeaders(
            b"content-type", [b"application/x-www-form-urlencoded"])
        request_start.received(request, b"POST", b"/form?b=2", b"HTTP/1.1")
        self.assertEqual(request.args, {b"a": [b"1"], b"b": [b"2"]})
