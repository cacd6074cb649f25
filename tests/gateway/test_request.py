"""Tests for llamaproxy.gateway.request: raw early answers, request ids, JSON 500s."""

from __future__ import annotations

import time

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from llamaproxy.gateway import errors
from llamaproxy.gateway.request import GatewayRequest, raw_response
from llamaproxy.gateway.site import GatewaySite
from llamaproxy.testing import InMemoryClient, parse_response
from tests.gateway.test_resource import GatewayFixture


class Broken(Resource):
    isLeaf = True

    @staticmethod
    def early_check(request: GatewayRequest) -> None:
        """Let everything through (GatewaySite asks before reading a body)."""

    def render(self, request: GatewayRequest) -> bytes:  # type: ignore[override]
        raise RuntimeError("/secret/path/in/a/traceback")


class RequestTests(SynchronousTestCase):
    def test_raw_response(self) -> None:
        raw = raw_response(errors.queue_full(), [(b"X-Extra", b"1")])
        response = parse_response(raw)
        self.assertEqual(response.status, 503)
        self.assertEqual(response.header("connection"), "close")
        self.assertEqual(response.header("retry-after"), "5")
        self.assertEqual(response.header("x-extra"), "1")
        self.assertEqual(response.json()["error"]["code"], "queue_full")

    def test_request_ids(self) -> None:
        gw = GatewayFixture()
        client = gw.client()
        client.request("GET", "/ping", headers={"X-Request-ID": "trace-123.abc"})
        self.assertEqual(client.response().header("x-request-id"), "trace-123.abc")
        client = gw.client()
        client.request("GET", "/ping", headers={"X-Request-ID": "bad id\twith tab"})
        generated = client.response().header("x-request-id")
        self.assertNotIn("bad", generated or "")
        self.assertEqual(len(generated or ""), 16)
        # Absent or empty: a new id as well (request_id_from(None) is new_request_id()).
        for headers in ({}, {"X-Request-ID": ""}):
            client = gw.client()
            client.request("GET", "/ping", headers=headers)
            generated = client.response().header("x-request-id") or ""
            self.assertRegex(generated, "^[0-9a-f]{16}$")

    def test_head_values_are_what_get_header_gives(self) -> None:
        # The channel hands the request the last value of the headers it reads without a
        # lookup (any spelling, repeated, absent, empty): each is what getHeader says.
        seen: list[GatewayRequest] = []
        site = GatewaySite(Resource(), reactor=GatewayFixture().clock,
                           early_check=lambda request: seen.append(request))  # type: ignore[func-returns-value]
        heads = [
            [],
            [b"Authorization: Bearer a", b"x-api-key: k1", b"X-REQUEST-ID: r1"],
            [b"authorization: first", b"X-Api-Key: k1", b"AUTHORIZATION: last",
             b"x-api-key: k2  ", b"x-request-id:", b"X-Request-Id: r2", b"X-Other: o"],
            [b"x-request-id: r3", b"X-Request-ID: "],
        ]
        for lines in heads:
            client = InMemoryClient(site)
            client.send(b"\r\n".join([b"GET /x HTTP/1.1", b"Host: h", *lines]) + b"\r\n\r\n")
            request = seen[-1]
            for name in (b"authorization", b"x-api-key", b"x-request-id"):
                self.assertEqual(request.head_values.get(name), request.getHeader(name),
                                 (lines, name))
        self.assertEqual(len(seen), len(heads))
        self.assertEqual(seen[2].head_values[b"authorization"], b"last")

    def test_date_header_and_options_star(self) -> None:
        import email.utils

        gw = GatewayFixture()
        client = gw.client()
        client.request("GET", "/ping")
        date = client.response().header("date")
        assert date is not None
        self.assertLess(abs(email.utils.parsedate_to_datetime(date).timestamp() - time.time()), 5)
        client = gw.client()
        client.request("OPTIONS", "*")  # twisted.web's own answer: no resource involved
        self.assertEqual(client.response().status, 200)

    def test_a_bug_in_a_resource_is_a_json_500(self) -> None:
        gw = GatewayFixture()
        site = GatewaySite(Broken(), reactor=gw.clock)  # type: ignore[arg-type]
        client = InMemoryClient(site)
        client.request("GET", "/anything")
        response = client.response()
        self.assertEqual(response.status, 500)
        self.assertEqual(response.json()["error"]["code"], "internal_error")
        self.assertNotIn(b"secret", client.written)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class StockMethodTests(SynchronousTestCase):
    def test_the_named_methods_are_what_super_finds(self) -> None:
        # GatewayRequest calls twisted.web's methods it extends by name, not through super():
        # they must be what super() would find (its bases unchanged).
        from llamaproxy.gateway import request as module

        base = super(GatewayRequest, GatewayRequest)
        for name, method in (
            ("gotLength", module._stock_got_length),
            ("handleContentChunk", module._stock_content_chunk),
            ("setResponseCode", module._stock_set_code),
            ("finish", module._stock_finish),
            ("connectionLost", module._stock_connection_lost),
        ):
            self.assertIs(getattr(base, name), method, name)
