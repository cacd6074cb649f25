"""The header_fill fast path: a request's headers exactly as ``Headers.addRawHeader`` builds
them, the gateway's own response headers exactly as ``setHeader`` sets them, and the channel's
hostile-input contract unchanged with it on."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llamaproxy.fastpath import first_write
from llamaproxy.fastpath.header_fill import fill, set_values
from llamaproxy.gateway.request import set_each
from llamaproxy.gateway.site import GatewaySite
from tests.gateway import (
    test_async_early_check,
    test_channel,
    test_client_address,
    test_hostile,
    test_request,
    test_wire,
)

#: Header lines as llhttp passes them: any case, repeated, Twisted's special capitalizations,
#: names Twisted has not seen yet, empty values.
LINES = [
    (b"Host", b"x"), (b"content-length", b"12"), (b"X-Custom", b"a"), (b"x-CUSTOM", b"b"),
    (b"dnt", b"1"), (b"ETAG", b'"v"'), (b"www-authenticate", b"Basic"), (b"Accept", b""),
    (b"X-Never-Seen-Before-By-Twisted-4711", b"v a l u e"), (b"te", b"trailers"),
    (b"X-Custom", b"c, d"), (b"!#$%&'*+.^_`|~", b"token chars"),
]


def _stock(lines: list[tuple[bytes, bytes]]) -> Headers:
    headers = Headers()
    for name, value in lines:
        headers.addRawHeader(name, value)
    return headers


class FillTests(SynchronousTestCase):
    def test_the_same_headers_as_add_raw_header(self) -> None:
        filled = Headers()
        fill(filled, LINES)
        stock = _stock(LINES)
        self.assertEqual(list(filled.getAllRawHeaders()), list(stock.getAllRawHeaders()))
        self.assertEqual(filled.getRawHeaders(b"x-custom"), [b"a", b"b", b"c, d"])
        self.assertEqual(filled.getRawHeaders(b"DNT"), [b"1"])

    def test_added_to_what_is_there(self) -> None:
        filled = _stock([(b"X-Custom", b"first")])
        fill(filled, LINES)
        self.assertEqual(list(filled.getAllRawHeaders()),
                         list(_stock([(b"X-Custom", b"first"), *LINES]).getAllRawHeaders()))

    def test_a_name_that_is_not_a_token_is_refused_as_twisted_does(self) -> None:
        # (llhttp never passes one; if it ever did, Twisted's check still runs on a new name)
        from twisted.web.http_headers import InvalidHeaderName

        self.assertRaises(InvalidHeaderName, fill, Headers(), [(b"Bad Name", b"v")])


#: Response header names as the gateway passes them (bytes or str, any case), Twisted's special
#: capitalizations, names its encoder has not seen yet.
_NAMES = st.sampled_from([
    b"Server", b"Date", b"X-Request-ID", b"x-request-id", "X-RateLimit-Limit", "x-ratelimit-limit",
    b"X-Content-Type-Options", b"X-Gateway-Overhead-Ms", b"Content-Length", b"etag", "Dnt",
    b"X-Never-Set-Before-By-Twisted-4712",
]) | st.from_regex(rb"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}\Z").map(bytes)
#: Values the gateway makes itself: no line break (CR, LF) in them.
_VALUES = st.binary(max_size=30).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b""))
_FIELDS = st.lists(st.tuples(_NAMES, _VALUES), max_size=8)


class SetValuesTests(SynchronousTestCase):
    @settings(max_examples=300)
    @given(_FIELDS, _FIELDS)
    def test_the_same_headers_as_set_raw_headers(
        self, before: list[tuple[Any, bytes]], fields: list[tuple[Any, bytes]]
    ) -> None:
        # (on headers already there too: a name set again keeps its place, as setHeader's)
        stock, fast = Headers(), Headers()
        set_each(stock, before)
        set_each(fast, before)
        set_each(stock, fields)
        set_values(fast, fields)
        self.assertEqual(list(fast.getAllRawHeaders()), list(stock.getAllRawHeaders()))

    def test_set_each_is_set_header(self) -> None:
        from twisted.web.http import Request

        class Stub:
            setHeader = Request.setHeader

            def __init__(self) -> None:
                self.responseHeaders = Headers()

        fields = [(b"X-Request-ID", b"a"), ("X-RateLimit-Limit", b"1"), (b"x-request-id", b"b")]
        stub, each = Stub(), Headers()
        for name, value in fields:
            stub.setHeader(name, value)
        set_each(each, fields)
        self.assertEqual(list(each.getAllRawHeaders()),
                         list(stub.responseHeaders.getAllRawHeaders()))

    def test_a_name_that_is_not_a_token_is_refused_as_twisted_does(self) -> None:
        from twisted.web.http_headers import InvalidHeaderName

        self.assertRaises(InvalidHeaderName, set_values, Headers(), [(b"Bad Name", b"v")])


class _WithHeaderFill:
    """Runs a gateway test case with the header_fill fast path on (as ``GatewaySite`` with
    ``fast_headers=True`` has it)."""

    def setUp(self) -> None:
        build = GatewaySite.buildProtocol

        def build_with_fill(site: GatewaySite, addr: Any) -> Any:
            channel = build(site, addr)
            channel.fill_headers = fill
            site.set_headers = set_values
            site.first_write = first_write.write
            return channel

        self.patch(GatewaySite, "buildProtocol", build_with_fill)  # type: ignore[attr-defined]
        super().setUp()  # type: ignore[misc]


class ChannelTests(_WithHeaderFill, test_channel.ChannelTests):
    """test_channel's cases with header_fill on."""


class RequestTests(_WithHeaderFill, test_request.RequestTests):
    """test_request's cases with header_fill on."""


class HostileInputTests(_WithHeaderFill, test_hostile.HostileInputTests):
    """test_hostile's table with header_fill on."""


def _inner(test: Any) -> Any:
    """The undecorated body of one of test_hostile's property-based tests."""
    return test.hypothesis.inner_test


class FuzzTests(_WithHeaderFill, SynchronousTestCase):
    """test_hostile's fuzzing with header_fill on: the same test bodies and strategies (given
    again here: Hypothesis refuses one test run from two classes)."""

    test_any_request_gets_a_sane_answer = settings(max_examples=300)(
        given(st.lists(test_hostile._LINE, max_size=6), st.binary(max_size=64), st.booleans())(
            _inner(test_hostile.FuzzTests.test_any_request_gets_a_sane_answer)))
    test_any_body_to_chat = settings(max_examples=200)(
        given(st.binary(max_size=200))(_inner(test_hostile.FuzzTests.test_any_body_to_chat)))


class CorsTests(_WithHeaderFill, test_hostile.CorsTests):
    """test_hostile's CORS cases with header_fill on."""


class FramingTests(_WithHeaderFill, test_wire.FramingTests):
    """test_wire's raw-socket framing cases with header_fill on."""


class StatusLineTests(_WithHeaderFill, test_wire.StatusLineTests):
    """test_wire's raw-socket status lines with header_fill on."""


class AsyncEarlyCheckTests(_WithHeaderFill, test_async_early_check.AsyncEarlyCheckTests):
    """test_async_early_check's cases with header_fill on."""


class ThroughTheGatewayTests(_WithHeaderFill, test_client_address.ThroughTheGatewayTests):
    """test_client_address's forwarding headers with header_fill on."""


class SiteSwitchTests(SynchronousTestCase):
    def test_fast_headers_gives_the_channels_the_fast_path(self) -> None:
        from twisted.internet.task import Clock
        from twisted.web.resource import Resource

        from llamaproxy.testing import InMemoryClient

        for fast, expected, setter in ((False, None, set_each), (True, fill, set_values)):
            site = GatewaySite(Resource(), reactor=Clock(), fast_headers=fast)
            channel = InMemoryClient(site).channel
            self.assertEqual(channel.fill_headers, expected)
            self.assertEqual(site.set_headers, setter)
