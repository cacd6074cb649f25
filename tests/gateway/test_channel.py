"""GatewayChannel on its own: llhttp's parsing, one message at a time, and the connection's life.

The hostile-input contract (limits, framing, JSON errors) is tests/gateway/test_wire.py and
test_hostile.py, unchanged from twisted.web's channel; these are what the own channel adds or
must keep: pipelined requests answered in order, bytes split anywhere, keep-alive rules, upgrade
requests, idle timeouts, llhttp's refusals in the gateway's words, no reference cycle.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from llamaproxy.gateway.channel import _PIPELINE_BUFFER, GatewayChannel
from llamaproxy.gateway.framing import llhttp_refusal
from llamaproxy.gateway.limits import RequestLimits
from llamaproxy.gateway.request import GatewayRequest
from llamaproxy.gateway.site import GatewaySite
from llamaproxy.testing import InMemoryClient, parse_response


class Echo(Resource):
    """Answers each request with its method, path and body; holds them when told to."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.held: list[GatewayRequest] = []
        self.seen: list[tuple[bytes, bytes, bytes]] = []

    def render(self, request: GatewayRequest) -> Any:  # type: ignore[override]
        if request.early_error is not None:
            return request.render_error(request.early_error)
        assert request.content is not None
        body = request.content.read()
        self.seen.append((request.method, request.uri, body))
        answer = b"%s %s %s" % (request.method, request.uri, body)
        request.setHeader(b"Content-Length", b"%d" % len(answer))
        if self.hold:
            self.held.append(request)
            request.write(answer)
            from twisted.web.server import NOT_DONE_YET
            return NOT_DONE_YET
        return answer


def responses(raw: bytes) -> list[bytes]:
    """Split what the server wrote into responses (Content-Length framed)."""
    found = []
    while raw:
        response = parse_response(raw)
        found.append(response.body)
        head_end = raw.index(b"\r\n\r\n") + 4
        raw = raw[head_end + len(response.body):]
    return found


class ChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = Echo()
        self.site = GatewaySite(self.resource, RequestLimits(max_body=1000, client_timeout=30),
                                reactor=self.clock)

    def client(self) -> InMemoryClient:
        return InMemoryClient(self.site)

    def test_pipelined_requests_are_answered_in_order_one_at_a_time(self) -> None:
        self.resource.hold = True
        client = self.client()
        client.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz"
                    b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        # Only the first is parsed while it is being handled.
        self.assertEqual([s[1] for s in self.resource.seen], [b"/a"])
        self.resource.held.pop(0).finish()
        self.assertEqual([s[1] for s in self.resource.seen], [b"/a", b"/b"])
        self.resource.held.pop(0).finish()
        self.resource.held.pop(0).finish()
        self.assertEqual(responses(client.written), [b"GET /a ", b"POST /b xyz", b"GET /c "])
        self.assertFalse(client.closed)

    def test_every_split_of_the_bytes_gives_the_same_requests(self) -> None:
        raw = (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
               b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
               b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"1\r\nz\r\n0\r\n\r\n"
               b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n")
        expected = [b"POST /a hello", b"POST /b abcde", b"POST /c z", b"GET /d "]
        for size in (1, 2, 3, 5, 7, 16, len(raw)):
            client = self.client()
            for at in range(0, len(raw), size):
                client.send(raw[at:at + size])
            self.assertEqual(responses(client.written), expected, f"pieces of {size}")
            self.assertFalse(client.closed)

    def test_a_whole_head_is_held_to_the_limits_each_line_is(self) -> None:
        """A head that comes whole in one read is checked at once (``_fits``: on_header then
        skips its per-line checks): the same answers as with each line checked, lines and
        counts at and over each limit, trailers counted on from the head."""
        limits = RequestLimits(max_body=1000, max_header_line=64, max_headers=4)

        def line(size: int) -> bytes:  # a header line of ``size`` bytes, CRLF included
            return b"X-L: " + b"v" * (size - 7) + b"\r\n"

        def chunked(*trailers: bytes) -> bytes:
            return (b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"1\r\nz\r\n0\r\n" + b"".join(trailers) + b"\r\n")

        get = b"GET / HTTP/1.1\r\n"
        heads = {
            get + line(63) + b"\r\n": 200,
            get + line(64) + b"\r\n": 200,  # (name + value + 4 = 64)
            get + line(65) + b"\r\n": 431,
            get + b"X-L:" + b"v" * 57 + b"\r\n\r\n": 200,
            get + b"X-L:" + b"v" * 58 + b"\r\n\r\n": 431,
            get + b"A: 1\r\n" * 4 + b"\r\n": 200,
            get + b"A: 1\r\n" * 5 + b"\r\n": 431,
            b"\r\n\r\n" + get + b"A: 1\r\n" * 4 + b"\r\n": 200,
            get + b"A: 1\r\n" + line(64) + b"\r\n": 200,
            get + b"A: 1\r\n" + line(65) + b"\r\n": 431,
            chunked(b"T: 1\r\n"): 200,  # (the head's 2 and the trailer's: within 4)
            chunked(b"T: 1\r\n", b"U: 2\r\n"): 200,
            chunked(b"T: 1\r\n", b"U: 2\r\n", b"V: 3\r\n"): 431,
            chunked(line(64)): 200,
            chunked(line(65)): 431,
        }
        for each_line in (False, True):
            site = GatewaySite(self.resource, limits, reactor=self.clock)
            for raw, status in heads.items():
                with self.subTest(raw=raw, each_line=each_line):
                    client = InMemoryClient(site)
                    if each_line:
                        client.channel._fits = lambda *_: False  # type: ignore[method-assign]
                    client.send(raw)
                    self.assertEqual(parse_response(client.written).status, status)

    def test_a_client_pipelining_too_much_is_paused_then_resumed(self) -> None:
        self.resource.hold = True
        client = self.client()
        client.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        client.send(b"GET /b HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 4000 + b"\r\n\r\n")
        self.assertEqual(client.transport.producerState, "producing")  # (a leaving client
        client.send(b"x" * _PIPELINE_BUFFER)  # must still be noticed)
        self.assertEqual(client.transport.producerState, "paused")
        self.resource.held.pop(0).finish()
        self.assertEqual(client.transport.producerState, "producing")

    def test_http_1_0_and_connection_close_end_the_connection(self) -> None:
        client = self.client()
        client.send(b"GET /a HTTP/1.0\r\n\r\nGET /ignored HTTP/1.1\r\n\r\n")
        self.assertEqual(responses(client.written), [b"GET /a "])
        self.assertTrue(client.closed)
        self.assertEqual(len(self.resource.seen), 1)
        client = self.client()
        client.send(b"GET /a HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n")
        self.assertEqual(client.response().header("connection"), "close")
        self.assertTrue(client.closed)

    def test_an_upgrade_is_answered_as_http_1_1_and_the_connection_goes_on(self) -> None:
        client = self.client()
        client.send(b"GET /a HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
                    b"GET /b HTTP/1.1\r\n\r\n")
        self.assertEqual(responses(client.written), [b"GET /a ", b"GET /b "])
        self.assertFalse(client.closed)

    def test_an_upgrade_with_a_body_is_refused_never_read_as_the_next_request(self) -> None:
        client = self.client()
        client.send(b"POST /a HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
                    b"Content-Length: 29\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n")
        response = client.response()
        self.assertEqual(response.status, 400)
        self.assertIn("Upgrade", response.json()["error"]["message"])
        self.assertTrue(client.closed)
        self.assertEqual(self.resource.seen, [])

    def test_other_http_versions_and_the_http2_preface_are_refused(self) -> None:
        for raw in (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n",
                    b"GET /\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):
            client = self.client()
            client.send(raw)
            response = client.response()
            self.assertEqual(response.status, 400, raw)
            self.assertEqual(response.header("content-type"), "application/json")
            self.assertTrue(client.closed, raw)
        self.assertEqual(self.resource.seen, [])

    def test_blank_lines_before_a_request_are_skipped(self) -> None:
        client = self.client()
        client.send(b"\r\n\r\nGET /a HTTP/1.1\r\n\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
        self.assertEqual(responses(client.written), [b"GET /a ", b"GET /b "])

    def test_idle_connections_time_out_between_requests_only(self) -> None:
        self.site.timeOut = 60
        client = self.client()
        self.resource.hold = True
        client.send(b"GET /a HTTP/1.1\r\n\r\n")
        self.clock.advance(120)  # a request being handled is never idle
        self.assertFalse(client.closed)
        self.resource.held.pop(0).finish()
        self.clock.advance(59)
        self.assertFalse(client.closed)
        self.clock.advance(2)
        self.assertTrue(client.closed)

    def test_the_arrival_timeout_never_moves_a_timer_sooner(self) -> None:
        # Moving a reactor timer sooner (DelayedCall.reset to an earlier time) makes the reactor
        # search its whole heap of timers for it: per request, with thousands of connections.
        sooner: list[float] = []
        real_call_later = self.clock.callLater

        def call_later(delay: float, f: Any, *args: Any, **kw: Any) -> Any:
            call = real_call_later(delay, f, *args, **kw)
            real_reset = call.reset

            def reset(seconds: float) -> None:
                if self.clock.seconds() + seconds < call.getTime():
                    sooner.append(seconds)
                real_reset(seconds)

            call.reset = reset  # type: ignore[method-assign]
            return call

        self.clock.callLater = call_later  # type: ignore[method-assign]
        self.site.timeOut = 60
        client = self.client()
        client.send(b"GET /a HTTP/1.1\r\n\r\n")
        self.clock.advance(1)
        client.send(b"GET /b HTTP/1.1\r\n")  # idle (60 s) -> arrival (30 s): sooner
        self.assertEqual(sooner, [])
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [31.0])
        self.clock.advance(29.9)
        self.assertFalse(client.closed)
        self.clock.advance(0.2)
        second = client.written[client.written.index(b"HTTP/1.1", 1):]
        self.assertEqual(parse_response(second).status, 408)
        self.assertTrue(client.closed)

    def test_requests_that_come_whole_arm_no_arrival_timer(self) -> None:
        # The connection's one timer is made once; a request that comes in one read needs no
        # arrival timer (it is complete before the read is done), so the timer only ever moves
        # later (idle after each response): no call made or cancelled per request.
        made: list[float] = []
        real_call_later = self.clock.callLater

        def call_later(delay: float, f: Any, *args: Any, **kw: Any) -> Any:
            made.append(delay)
            return real_call_later(delay, f, *args, **kw)

        self.clock.callLater = call_later  # type: ignore[method-assign]
        self.site.timeOut = 60
        client = self.client()
        for path in (b"/a", b"/b", b"/c"):
            self.clock.advance(1)
            client.send(b"POST " + path + b" HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")
        self.assertEqual(responses(client.written), [b"POST /a hi", b"POST /b hi", b"POST /c hi"])
        self.assertEqual(made, [60])
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [63.0])
        client.send(b"POST /d HTTP/1.1\r\nContent-Length: 2\r\n\r\n")  # the body to come
        self.assertEqual(made, [60, 30])
        self.clock.advance(30)
        self.assertEqual(parse_response(client.written[client.written.rindex(b"HTTP/1.1 "):])
                         .status, 408)

    def test_a_declared_chunk_over_the_limit_is_refused_at_its_size_line(self) -> None:
        client = self.client()
        client.send(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n")
        self.assertEqual(client.response().status, 413)
        self.assertTrue(client.closed)

    def test_llhttp_refusals_are_said_in_the_gateways_words(self) -> None:
        # llhttp stops at these before the channel sees the header: its reasons (which this
        # pins, with httptools' range in setup.py) are turned into the gateway's.
        cases = {
            b"Content-Length: 2\r\nContent-Length: 2": "Repeated Content-Length header",
            b"Content-Length: 1e3": "Malformed Content-Length header",
            b"Content-Length: -5": "Malformed Content-Length header",
            b"Transfer-Encoding: chunked\r\nContent-Length: 1e3": "Content-Length and "
                                                                 "Transfer-Encoding together",
            b"Transfer-Encoding: ": "Empty Transfer-Encoding header",
        }
        for headers, message in cases.items():
            client = self.client()
            client.send(b"POST /a HTTP/1.1\r\n" + headers + b"\r\n\r\n{}")
            response = client.response()
            self.assertEqual(response.status, 400, headers)
            self.assertIn(message, response.json()["error"]["message"], headers)
            self.assertTrue(client.closed)
        self.assertIn("Malformed request", llhttp_refusal("Invalid header token", 0).message)

    def test_a_closed_connection_leaves_no_reference_cycle(self) -> None:
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        client = self.client()
        client.send(b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhel")  # answered? no: cut
        client.disconnect()
        channel = weakref.ref(client.channel)
        del client
        self.assertIsNone(channel())  # freed by reference counting alone

    def test_a_waiting_connection_holds_no_parser(self) -> None:
        # Seen with 10 000 queued requests (bench.queue_rss): a parser per connection (its C
        # state and a bound method per callback) was ~1 KiB of each queued request's 9.2 KiB.
        self.resource.hold = True
        client = self.client()
        client.send(b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        self.assertIsNone(client.channel._parser)  # queued (being handled)
        self.resource.held.pop(0).finish()
        self.assertIsNone(client.channel._parser)  # idle between requests
        client.send(b"GET /b HTTP/1.1\r\n\r\n")
        self.assertEqual([s[1] for s in self.resource.seen], [b"/a", b"/b"])

    def test_a_failing_body_callback_is_answered_alike_with_or_without_llhttp(self) -> None:
        # A Content-Length body goes to the request without llhttp (it only counts those
        # bytes); a chunked one through it. A request that fails taking its body gets the same
        # answer and log either way, and a refusal while taking it stops the connection alike.
        class Failing(GatewayRequest):
            def handleContentChunk(self, data: bytes) -> None:
                raise RuntimeError("body trouble")

        self.site.requestFactory = Failing
        answers = []
        for framing in (b"Content-Length: 5\r\n\r\nhello",
                        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"):
            client = self.client()
            client.send(b"POST /a HTTP/1.1\r\nHost: x\r\n" + framing)
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
            self.assertTrue(client.closed)
            response = parse_response(client.written)
            answers.append((response.status, response.json()))
        self.assertEqual(answers[0], answers[1])
        self.assertEqual(answers[0][0], 500)
        self.assertEqual(self.resource.seen, [])

        self.site.requestFactory = GatewayRequest
        for framing in (b"Content-Length: 2000\r\n\r\n" + b"x" * 2000,
                        b"Transfer-Encoding: chunked\r\n\r\n" + b"3e8\r\n" + b"x" * 1000
                        + b"\r\n3e8\r\n" + b"x" * 1000 + b"\r\n0\r\n\r\n"):
            client = self.client()
            client.send(b"POST /a HTTP/1.1\r\nHost: x\r\n" + framing)
            self.assertTrue(client.closed)
            self.assertEqual(parse_response(client.written).status, 413)


class WriteHeadersTests(SynchronousTestCase):
    """``GatewayChannel.writeHeaders`` writes the bytes twisted.web's ``HTTPChannel`` does."""

    def _both(self, headers: Any) -> tuple[bytes, bytes]:
        ours, stock = GatewayChannel(), HTTPChannel()
        ours.transport, stock.transport = StringTransport(), StringTransport()
        ours.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
        stock.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
        return ours.transport.value(), stock.transport.value()

    def test_same_head(self) -> None:
        headers = Headers()
        headers.setRawHeaders(b"X-Request-ID", [b"abc"])
        headers.setRawHeaders(b"Set-Cookie", [b"a=1", b"b=2", b"c=3"])
        headers.setRawHeaders(b"Server", [b"llamaproxy"])
        headers.setRawHeaders(b"Vary", [])
        headers.addRawHeader(b"Link", b"<a>")
        headers.addRawHeader(b"Link", b"<b>")
        headers.setRawHeaders(b"Content-Length", [b"0"])
        ours, stock = self._both(headers)
        self.assertEqual(ours, stock)
        self.assertIn(b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nSet-Cookie: c=3\r\n", ours)

    def test_no_headers(self) -> None:
        ours, stock = self._both(Headers())
        self.assertEqual(ours, b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(ours, stock)
