"""Tests for llamaproxy.fastpath.backend_client: request bytes, response parsing, body delivery,
errors and cancellation (in memory), the keep-alive pool, and a few exchanges over real sockets.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    UserError,
)
from twisted.internet.interfaces import IConsumer, IProtocolFactory, ITCPTransport
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import server
from twisted.web._newclient import (
    ExcessWrite,
    ParseError,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    WrongBodyLength,
)
from twisted.web.client import (
    URI,
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    readBody,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import _DataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.resource import Resource
from zope.interface import implementer
from zope.interface.verify import verifyObject

from llamaproxy.backends import forward
from llamaproxy.backends.routing import is_retryable
from llamaproxy.fastpath.backend_client import BackendClient

URL = b"http://127.0.0.1:8080/v1/chat/completions"
HEAD_200 = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n"


@implementer(ITCPTransport)
class Transport(StringTransport):
    """A StringTransport that records each write, TCP_NODELAY and aborts."""

    nodelay = False
    aborted = False

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.nodelay


class Endpoint:
    """A client endpoint whose connection attempts the test completes (or fails) by hand."""

    def __init__(self, auto: bool) -> None:
        self.auto = auto
        self.attempts: list[tuple[IProtocolFactory, Deferred[Any]]] = []
        self.connections: list[tuple[Any, Transport]] = []
        self.cancelled = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        if self.auto:
            return succeed(self._make(factory))
        d: Deferred[Any] = Deferred(self._cancel)
        self.attempts.append((factory, d))
        return d

    def _cancel(self, d: Deferred[Any]) -> None:
        self.cancelled += 1
        d.errback(ConnectingCancelledError(None))

    def _make(self, factory: IProtocolFactory) -> Any:
        protocol = factory.buildProtocol(None)  # type: ignore[arg-type]
        transport = Transport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return protocol

    def complete(self) -> tuple[Any, Transport]:
        factory, d = self.attempts.pop(0)
        protocol = self._make(factory)
        d.callback(protocol)
        return self.connections[-1]


class Endpoints:
    """``endpointForURI`` for the client: one fake endpoint, the URIs asked about recorded."""

    def __init__(self, auto: bool = True) -> None:
        self.endpoint = Endpoint(auto)
        self.uris: list[URI] = []

    def endpointForURI(self, uri: URI) -> Endpoint:
        self.uris.append(uri)
        return self.endpoint


class Body(Protocol):
    """Records a body: each piece, and how it ended."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.reasons: list[Failure] = []

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reasons.append(reason)


@implementer(IConsumer)
class LaterBody:
    """A body producer that writes when the test says (startProducing's Deferred fires later)."""

    def __init__(self, length: object) -> None:
        self.length = length
        self.consumer: Any = None
        self.done: Deferred[None] = Deferred()
        self.stopped = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self.consumer = consumer
        return self.done

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoints = Endpoints()
        self.client = BackendClient(self.clock, self.endpoints, 4, idle_timeout=4.0)  # type: ignore[arg-type]

    def send(
        self, method: bytes = b"GET", url: bytes = URL, headers: Headers | None = None,
        body: Any = None,
    ) -> tuple[Deferred[IResponse], Any, Transport]:
        connections = self.endpoints.endpoint.connections
        before = [len(t.writes) for _, t in connections]
        d = self.client.request(method, url, headers, body)
        for (protocol, transport), writes in zip(connections, before, strict=False):
            if len(transport.writes) != writes:
                return d, protocol, transport  # a pooled connection was used
        protocol, transport = connections[-1]
        return d, protocol, transport

    def respond(self, raw: bytes, method: bytes = b"GET") -> tuple[IResponse, Any, Transport]:
        d, protocol, transport = self.send(method)
        protocol.dataReceived(raw)
        return self.successResultOf(d), protocol, transport

    def read(self, response: IResponse) -> Body:
        body = Body()
        response.deliverBody(body)
        return body

    def connections(self) -> int:
        return len(self.endpoints.endpoint.connections)


class RequestBytesTests(Base):
    def test_get_request_line_host_and_headers(self) -> None:
        headers = Headers({b"Accept": [b"text/event-stream"], b"X-Two": [b"a", b"b"]})
        _, _, transport = self.send(b"GET", b"http://127.0.0.1:8080/v1/models?x=1#frag", headers)
        self.assertEqual(transport.value(), (
            b"GET /v1/models?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            b"Accept: text/event-stream\r\nX-Two: a\r\nX-Two: b\r\n\r\n"))
        self.assertTrue(transport.nodelay)
        self.assertEqual(self.endpoints.uris[0].host, b"127.0.0.1")
        self.assertEqual(self.endpoints.uris[0].port, 8080)

    def test_forward_send_writes_the_stock_paths_bytes(self) -> None:
        # forward.send gives a BackendClient the fields without a Headers between: the bytes
        # are those of the stock path's filtered Headers, and IResponse.request has them.
        client = Headers({b"Host": [b"gw"], b"Authorization": [b"Bearer c"],
                          b"Connection": [b"keep-alive, X-Hop"], b"X-Hop": [b"1"],
                          b"Content-Type": [b"application/json"], b"X-Two": [b"a", b"b"]})
        extra = [(b"X-Forwarded-For", b"10.0.0.1"), (b"x-forwarded-proto", b"https"),
                 (b"Connection", b"close")]
        stock = forward.filter_request_headers(client, "k")
        for name, value in extra:
            stock.setRawHeaders(name, [value])
        _, _, expected = self.send(b"POST", URL, stock, forward.BytesBody(b"{}"))
        connections = self.connections()
        sending = forward.send(self.client, URL, "k", b"POST", client, b"{}", extra)
        self.assertEqual(self.connections(), connections + 1)  # (the first is not reusable)
        protocol, transport = self.endpoints.endpoint.connections[-1]
        self.assertEqual(transport.value(), expected.value())
        self.assertIn(b"\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
                      transport.value())
        protocol.dataReceived(HEAD_200 + b"hello")
        request = self.successResultOf(sending).request
        self.assertEqual(list(request.headers.getAllRawHeaders()),
                         list(stock.getAllRawHeaders()))

    def test_host_without_default_port_and_ipv6(self) -> None:
        self.send(b"GET", b"http://backend.example")
        self.send(b"GET", b"http://[::1]:9000/a?b")
        self.send(b"GET", b"https://api.example:443?q=1")
        values = [t.value() for _, t in self.endpoints.endpoint.connections]
        self.assertTrue(values[0].startswith(b"GET / HTTP/1.1\r\nHost: backend.example\r\n"))
        self.assertTrue(values[1].startswith(b"GET /a?b HTTP/1.1\r\nHost: [::1]:9000\r\n"))
        self.assertTrue(values[2].startswith(b"GET /?q=1 HTTP/1.1\r\nHost: api.example\r\n"))

    def test_post_body_in_one_write_with_content_length(self) -> None:
        _, _, transport = self.send(b"POST", URL, Headers({b"Content-Type": [b"x/y"]}),
                                    forward.BytesBody(b'{"a": 1}'))
        self.assertEqual(transport.writes, [
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            b"Content-Type: x/y\r\nContent-Length: 8\r\n\r\n{\"a\": 1}"])

    def test_a_producer_that_writes_at_once_also_goes_in_one_write(self) -> None:
        class Producer(forward.BytesBody):
            in_memory = None  # type: ignore[assignment]  # not recognised: produced

            def __init__(self) -> None:
                self.length = 3

            def startProducing(self, consumer: Any) -> Deferred[None]:
                consumer.write(b"ab")
                consumer.write(b"c")
                return succeed(None)

        d, _, transport = self.send(b"POST", URL, None, Producer())
        self.assertEqual(len(transport.writes), 1)
        self.assertTrue(transport.writes[0].endswith(b"Content-Length: 3\r\n\r\nabc"))
        self.assertNoResult(d)

    def test_post_without_body_says_length_zero(self) -> None:
        _, _, transport = self.send(b"POST")
        self.assertTrue(transport.value().endswith(b"\r\nContent-Length: 0\r\n\r\n"))
        _, _, transport = self.send(b"DELETE")
        self.assertNotIn(b"Content-Length", transport.value())

    def test_given_host_and_framing_headers_are_not_duplicated(self) -> None:
        headers = Headers({b"Host": [b"other"], b"Content-Length": [b"99"],
                           b"Transfer-Encoding": [b"chunked"]})
        _, _, transport = self.send(b"POST", URL, headers, forward.BytesBody(b"abc"))
        self.assertEqual(transport.value(), (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: other\r\n"
            b"Content-Length: 3\r\n\r\nabc"))

    def test_streamed_body_is_written_as_it_comes(self) -> None:
        body = LaterBody(6)
        d, _, transport = self.send(b"POST", URL, None, body)
        self.assertEqual(transport.writes, [
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            b"Content-Length: 6\r\n\r\n"])
        self.assertIs(transport.producer, body)
        body.consumer.write(b"abc")
        body.consumer.write(b"def")
        body.done.callback(None)
        self.assertEqual(transport.writes[1:], [b"abc", b"def"])
        self.assertIsNone(transport.producer)
        self.assertNoResult(d)

    def test_unknown_length_body_is_chunked(self) -> None:
        body = LaterBody(UNKNOWN_LENGTH)
        _, _, transport = self.send(b"POST", URL, None, body)
        body.consumer.write(b"hello")
        body.consumer.write(b"")
        body.consumer.write(b"x" * 17)
        body.done.callback(None)
        self.assertEqual(transport.value(), (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n11\r\n" + b"x" * 17
            + b"\r\n0\r\n\r\n"))

    def test_too_many_body_bytes_fail_the_request(self) -> None:
        body = LaterBody(2)
        d, _, transport = self.send(b"POST", URL, None, body)
        body.consumer.write(b"abc")
        failure = self.failureResultOf(d, RequestGenerationFailed)
        failure.value.reasons[0].trap(WrongBodyLength)
        self.assertTrue(transport.aborted)
        self.assertTrue(body.stopped)

    def test_too_few_body_bytes_fail_the_request(self) -> None:
        body = LaterBody(5)
        d, _, transport = self.send(b"POST", URL, None, body)
        body.consumer.write(b"abc")
        body.done.callback(None)
        self.failureResultOf(d, RequestGenerationFailed).value.reasons[0].trap(WrongBodyLength)
        self.assertTrue(transport.aborted)

    def test_failing_producer_fails_the_request(self) -> None:
        body = LaterBody(5)
        d, _, transport = self.send(b"POST", URL, None, body)
        body.done.errback(ValueError("disk"))
        self.failureResultOf(d, RequestGenerationFailed).value.reasons[0].trap(ValueError)
        self.assertTrue(transport.aborted)

    def test_producer_raising_fails_the_request(self) -> None:
        class Raising(LaterBody):
            def startProducing(self, consumer: Any) -> Deferred[None]:
                raise OSError("nope")

        d, _, transport = self.send(b"POST", URL, None, Raising(5))
        self.failureResultOf(d, RequestGenerationFailed).value.reasons[0].trap(OSError)
        self.assertTrue(transport.aborted)
        self.assertEqual(transport.value(), b"")

    def test_request_saying_connection_close_is_not_reused(self) -> None:
        d, protocol, transport = self.send(headers=Headers({b"Connection": [b"close"]}))
        self.assertIn(b"\r\nConnection: close\r\n", transport.value())
        protocol.dataReceived(HEAD_200 + b"hello")
        self.read(self.successResultOf(d))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_connection_lost_while_writing_is_a_transmission_failure(self) -> None:
        body = LaterBody(5)
        d, protocol, _ = self.send(b"POST", URL, None, body)
        protocol.connectionLost(Failure(ConnectionLost()))
        failure = self.failureResultOf(d, RequestTransmissionFailed)
        failure.value.reasons[0].trap(ConnectionLost)
        self.assertTrue(body.stopped)

    def test_bad_scheme_method_and_uri(self) -> None:
        self.failureResultOf(self.client.request(b"GET", b"ftp://x/y"), SchemeNotSupported)
        self.assertRaises(ValueError, self.client.request, b"GET", b"http://h/a b")
        self.assertRaises(ValueError, self.client.request, b"GET", b"http://h/a\r\nX: y")
        self.assertRaises(ValueError, self.client.request, b"GE T", b"http://h/")
        self.assertRaises(TypeError, self.client.request, "GET", b"http://h/")
        self.assertEqual(self.connections(), 0)

    def test_endpoint_asked_once_per_target(self) -> None:
        for path in (b"/a", b"/b", b"/c?d"):
            self.client.request(b"GET", b"http://127.0.0.1:8080" + path)
        self.client.request(b"GET", b"http://127.0.0.1:8081/a")
        self.assertEqual([u.port for u in self.endpoints.uris], [8080, 8081])

    def test_a_remembered_uri_writes_the_same_request_and_the_memo_is_bounded(self) -> None:
        # Each URI's target and path are remembered (256 at most): a request to a URI seen
        # before writes what the first did; one that could not be split is never kept.
        uris = [b"http://127.0.0.1:8080/v1/x?n=%d#f" % n for n in range(300)]
        uris += [b"http://[::1]:8081/y", b"http://127.0.0.1:8080", b" http://127.0.0.1:8080/z "]
        first = []
        for uri in uris:
            _, _, transport = self.send(b"GET", uri)
            first.append(transport.value())
            transport.clear()
            self.assertLessEqual(len(self.client._splits), 256)
        for uri, written in zip(uris, first, strict=True):
            _, _, transport = self.send(b"GET", uri)
            self.assertEqual(transport.value(), written, uri)
            transport.clear()
        self.assertTrue(first[0].startswith(b"GET /v1/x?n=0 HTTP/1.1\r\nHost: 127.0.0.1:8080"))
        self.assertTrue(first[-3].startswith(b"GET /y HTTP/1.1\r\nHost: [::1]:8081"))
        self.assertTrue(first[-2].startswith(b"GET / HTTP/1.1\r\n"))
        self.assertTrue(first[-1].startswith(b"GET /z HTTP/1.1\r\n"))
        self.failureResultOf(self.client.request(b"GET", b"ftp://x/y"), SchemeNotSupported)
        self.assertRaises(ValueError, self.client.request, b"GET", b"http://h/a b")
        self.assertNotIn(b"ftp://x/y", self.client._splits)
        self.assertNotIn(b"http://h/a b", self.client._splits)


class ResponseTests(Base):
    def test_content_length_body_in_pieces_then_reuse(self) -> None:
        d, protocol, transport = self.send()
        protocol.dataReceived(HEAD_200[:20])
        self.assertNoResult(d)
        protocol.dataReceived(HEAD_200[20:] + b"ab")
        response = self.successResultOf(d)
        self.assertEqual((response.version, response.code, response.phrase, response.length),
                         ((b"HTTP", 1, 1), 200, b"OK", 5))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertIsNone(response.headers.getRawHeaders(b"content-length"))
        self.assertIsNone(response.previousResponse)
        self.assertEqual(response.request.method, b"GET")
        self.assertEqual(response.request.absoluteURI, URL)
        body = self.read(response)
        protocol.dataReceived(b"cd")
        self.assertEqual(body.reasons, [])
        protocol.dataReceived(b"e")
        self.assertEqual(body.pieces, [b"ab", b"cd", b"e"])
        [reason] = body.reasons
        reason.trap(ResponseDone)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.client.idle_connections(), 1)
        _, protocol2, _ = self.send()
        self.assertIs(protocol2, protocol)
        self.assertEqual(self.connections(), 1)
        self.assertEqual(transport.value().count(b"GET "), 2)

    def test_head_and_body_in_one_packet(self) -> None:
        response, _, _ = self.respond(HEAD_200 + b"hello")
        body = self.read(response)
        self.assertEqual(body.data, b"hello")
        body.reasons[0].trap(ResponseDone)
        self.assertEqual(self.client.idle_connections(), 1)

    def test_chunked_body_byte_by_byte(self) -> None:
        raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A:  1 \r\n\r\n"
               b"5;ext=1\r\nhello\r\n1A \r\n" + b"z" * 26 + b"\r\n0\r\nX-Trailer: t\r\n\r\n")
        d, protocol, transport = self.send()
        body = Body()
        d.addCallback(lambda r: r.deliverBody(body) or r)
        for i in range(len(raw)):
            protocol.dataReceived(raw[i:i + 1])
        response = self.successResultOf(d)
        self.assertIs(response.length, UNKNOWN_LENGTH)
        self.assertEqual(response.headers.getRawHeaders(b"x-a"), [b"1"])
        self.assertIsNone(response.headers.getRawHeaders(b"transfer-encoding"))
        self.assertEqual(body.data, b"hello" + b"z" * 26)
        self.assertEqual(len(body.reasons), 1)
        body.reasons[0].trap(ResponseDone)
        self.assertEqual(self.client.idle_connections(), 1)
        self.assertFalse(transport.disconnecting)

    def test_chunked_read_is_one_piece(self) -> None:
        """The chunk data of one read reaches the body protocol as one piece, the framing
        removed; a chunk split across reads goes on as its parts arrive."""
        response, _, _ = self.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        body = self.read(response)
        protocol = self.endpoints.endpoint.connections[-1][0]
        protocol.dataReceived(b"6\r\ndata: \r\n3\r\nab\n\r\n")
        protocol.dataReceived(b"8\r\nlong")
        protocol.dataReceived(b"er")
        protocol.dataReceived(b"!!\r\n2\r")
        protocol.dataReceived(b"\nxy\r\n0\r\n\r\n")
        self.assertEqual(body.pieces, [b"data: ab\n", b"long", b"er", b"!!", b"xy"])
        body.reasons[0].trap(ResponseDone)

    def test_chunk_data_before_a_framing_error_is_delivered_first(self) -> None:
        response, _, transport = self.respond(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        body = self.read(response)
        protocol = self.endpoints.endpoint.connections[-1][0]
        protocol.dataReceived(b"2\r\nok\r\n3\r\nabc\r\nzz\r\n")
        self.assertEqual(body.pieces, [b"okabc"])
        body.reasons[0].trap(ResponseFailed)
        self.assertTrue(transport.aborted)

    def test_whole_chunk_reads(self) -> None:
        """One whole chunk per read (a stream's usual piece), and the cases that are not."""
        response, _, _ = self.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        body = self.read(response)
        protocol = self.endpoints.endpoint.connections[-1][0]
        protocol.dataReceived(b"A\r\ndata: a\r\nb\r\n")  # CRLF inside the payload
        protocol.dataReceived(b"3;ext=1\r\nabc\r\n")  # an extension: the general path
        protocol.dataReceived(b"1\r\nz\r\n0\r\n\r\n")  # a chunk and the end together
        self.assertEqual(body.pieces, [b"data: a\r\nb", b"abc", b"z"])
        body.reasons[0].trap(ResponseDone)

    def test_malformed_chunked_body_fails(self) -> None:
        for bad in (b"zz\r\n", b"0x5\r\nhello\r\n", b"5\r\nhelloXX", b"-1\r\n", b"5 5\r\n"):
            response, protocol, transport = self.respond(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            body = self.read(response)
            protocol.dataReceived(bad)
            self.assertEqual(len(body.reasons), 1, bad)
            body.reasons[0].trap(ResponseFailed)
            self.assertTrue(body.reasons[0].value.reasons[0].check(ParseError), bad)
            self.assertTrue(transport.aborted)
            protocol.connectionLost(Failure(ConnectionAborted()))
            self.assertEqual(len(body.reasons), 1)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_close_delimited_body(self) -> None:
        response, protocol, _ = self.respond(b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\n\r\nxy")
        self.assertIs(response.length, UNKNOWN_LENGTH)
        body = self.read(response)
        protocol.dataReceived(b"z")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(body.data, b"xyz")
        body.reasons[0].trap(PotentialDataLoss)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_no_body_responses(self) -> None:
        for method, raw in (
            (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n"),
            (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
            (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n"),
            (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ):
            d, protocol, _ = self.send(method)
            protocol.dataReceived(raw)
            response = self.successResultOf(d)
            self.assertEqual(response.length, 0)
            body = self.read(response)
            self.assertEqual(body.pieces, [])
            body.reasons[0].trap(ResponseDone)
            if method == b"HEAD":  # an entity header there, kept as Agent does
                self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"42"])
        self.assertEqual(self.connections(), 1)

    def test_chunk_size_line_too_long(self) -> None:
        response, protocol, transport = self.respond(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        body = self.read(response)
        protocol.dataReceived(b"5;" + b"e" * 5000)
        body.reasons[0].trap(ResponseFailed)
        self.assertTrue(transport.aborted)

    def test_interim_responses_are_skipped(self) -> None:
        response, _, _ = self.respond(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n"
            + HEAD_200 + b"hello")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.read(response).data, b"hello")

    def test_switching_protocols_is_an_error(self) -> None:
        d, protocol, transport = self.send()
        protocol.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
        self.failureResultOf(d, ResponseFailed).value.reasons[0].trap(ParseError)
        self.assertTrue(transport.aborted)

    def test_status_line_variants(self) -> None:
        response, _, _ = self.respond(b"HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual((response.code, response.phrase), (404, b""))
        response, _, _ = self.respond(
            b"HTTP/1.0 503 Service Unavailable\nContent-Length: 2\n\nhi")
        self.assertEqual((response.version, response.code, response.phrase),
                         ((b"HTTP", 1, 0), 503, b"Service Unavailable"))
        self.assertEqual(self.read(response).data, b"hi")
        self.assertEqual(self.client.idle_connections(), 0)  # HTTP/1.0: not kept
        self.assertTrue(self.endpoints.endpoint.connections[0][1].disconnecting)

    def test_malformed_heads_fail(self) -> None:
        for raw in (
            b"HTTP/2 200 OK\r\n\r\n",
            b"ICY 200 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nNo-Colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nName : v\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\r\n  folded\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: v\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\n",
        ):
            d, protocol, transport = self.send()
            protocol.dataReceived(raw)
            failure = self.failureResultOf(d, ResponseFailed)
            self.assertNotIsInstance(failure.value, ResponseNeverReceived)
            self.assertTrue(transport.aborted, raw)

    def test_equal_duplicate_content_lengths_are_fine(self) -> None:
        response, _, _ = self.respond(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3, 003\r\n\r\nabc")
        self.assertEqual(response.length, 3)
        self.assertEqual(self.read(response).data, b"abc")

    def test_head_size_limit(self) -> None:
        d, protocol, transport = self.send()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        for _ in range(70):
            protocol.dataReceived(b"X-Pad: " + b"p" * 1000 + b"\r\n")
        self.failureResultOf(d, ResponseFailed).value.reasons[0].trap(ParseError)
        self.assertTrue(transport.aborted)

    def test_transfer_encoding_wins_over_content_length_and_no_reuse(self) -> None:
        response, _, transport = self.respond(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n")
        body = self.read(response)
        self.assertEqual(body.data, b"ok")
        body.reasons[0].trap(ResponseDone)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_non_chunked_transfer_encoding_reads_until_close(self) -> None:
        response, protocol, _ = self.respond(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc")
        self.assertIs(response.length, UNKNOWN_LENGTH)
        body = self.read(response)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(body.data, b"abc")
        body.reasons[0].trap(PotentialDataLoss)


class BodyDeliveryTests(Base):
    def test_buffered_until_delivered_and_reading_paused(self) -> None:
        response, protocol, transport = self.respond(HEAD_200 + b"ab")
        self.assertEqual(transport.producerState, "paused")
        protocol.dataReceived(b"c")
        body = self.read(response)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(body.pieces, [b"ab", b"c"])
        protocol.dataReceived(b"de")
        self.assertEqual(body.data, b"abcde")
        body.reasons[0].trap(ResponseDone)

    def test_body_finished_before_delivery(self) -> None:
        response, protocol, transport = self.respond(HEAD_200 + b"ab")
        protocol.dataReceived(b"cde")
        self.assertEqual(self.client.idle_connections(), 1)
        self.assertEqual(transport.producerState, "producing")
        body = self.read(response)
        self.assertEqual(body.data, b"abcde")
        self.assertEqual(len(body.reasons), 1)
        body.reasons[0].trap(ResponseDone)
        # The connection serves someone else now: the old body transport must not touch it.
        _, protocol2, _ = self.send()
        self.assertIs(protocol2, protocol)
        body_transport: Any = body.transport
        body_transport.stopProducing()
        body_transport.pauseProducing()
        self.assertFalse(transport.aborted)
        self.assertEqual(transport.producerState, "producing")

    def test_deliver_body_twice_raises(self) -> None:
        response, _, _ = self.respond(HEAD_200 + b"hello")
        self.read(response)
        self.assertRaises(RuntimeError, response.deliverBody, Body())

    def test_unclaimed_body_is_given_up_after_a_while(self) -> None:
        response, protocol, transport = self.respond(HEAD_200 + b"ab")
        self.clock.advance(59)
        self.assertFalse(transport.aborted)
        self.clock.advance(2)
        self.assertTrue(transport.aborted)
        protocol.connectionLost(Failure(ConnectionAborted()))
        body = self.read(response)
        self.assertEqual(body.data, b"ab")
        body.reasons[0].trap(ResponseFailed)

    def test_pause_and_resume_reading(self) -> None:
        response, protocol, transport = self.respond(HEAD_200)
        body = self.read(response)
        body_transport: Any = body.transport
        body_transport.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        body_transport.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        body_transport.pauseProducing()
        protocol.dataReceived(b"hello")  # data already read is still delivered
        self.assertEqual(body.data, b"hello")
        self.assertEqual(transport.producerState, "producing")  # back in the pool, reading
        self.assertEqual(self.client.idle_connections(), 1)

    def test_stop_producing_aborts_and_never_reuses(self) -> None:
        response, protocol, transport = self.respond(HEAD_200 + b"ab")
        body = self.read(response)
        body_transport: Any = body.transport
        body_transport.stopProducing()
        self.assertTrue(transport.aborted)
        protocol.dataReceived(b"cde")  # too late: ignored
        self.assertEqual(body.reasons, [])
        protocol.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(body.data, b"ab")
        [reason] = body.reasons
        reason.trap(ResponseFailed)
        self.assertTrue(reason.value.reasons[0].check(ConnectionAborted))
        self.assertEqual(self.client.idle_connections(), 0)
        self.send()
        self.assertEqual(self.connections(), 2)

    def test_stop_producing_from_the_response_callback(self) -> None:
        d, protocol, transport = self.send()

        class Drop(Protocol):
            def connectionMade(self) -> None:
                cast(Any, self.transport).stopProducing()

        d.addCallback(lambda r: r.deliverBody(Drop()))
        protocol.dataReceived(HEAD_200 + b"ab")
        self.assertTrue(transport.aborted)
        self.assertEqual(transport.producerState, "producing")  # never paused
        protocol.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(self.client.idle_connections(), 0)

    def test_body_stopped_while_its_read_is_delivered(self) -> None:
        """The protocol stops the body on the one piece of a read that also held the last
        chunk: the end of that read is not parsed on (no second ending, no pooling)."""
        response, protocol, transport = self.respond(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")

        class StopOnData(Body):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                cast(Any, self.transport).stopProducing()

        body = StopOnData()
        response.deliverBody(body)
        protocol.dataReceived(b"2\r\nok\r\n2\r\nab\r\n0\r\n\r\n")
        self.assertEqual(body.pieces, [b"okab"])
        self.assertTrue(transport.aborted)
        protocol.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(len(body.reasons), 1)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_connection_broken_mid_body(self) -> None:
        for head in (HEAD_200, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n"):
            response, protocol, _ = self.respond(head)
            body = self.read(response)
            protocol.dataReceived(b"ab")
            protocol.connectionLost(Failure(ConnectionLost()))
            [reason] = body.reasons
            reason.trap(ResponseFailed)
            self.assertTrue(reason.value.reasons[0].check(ConnectionLost))
            self.assertTrue(reason.value.reasons[1].check(_DataLoss))

    def test_exception_in_body_protocol_fails_the_body(self) -> None:
        class Broken(Body):
            def dataReceived(self, data: bytes) -> None:
                raise ZeroDivisionError()

        response, protocol, transport = self.respond(HEAD_200)
        body = Broken()
        response.deliverBody(body)
        protocol.dataReceived(b"ab")
        self.assertTrue(transport.aborted)
        body.reasons[0].trap(ResponseFailed)
        self.assertTrue(body.reasons[0].value.reasons[0].check(ZeroDivisionError))

    def test_exception_in_body_protocol_on_the_head_read(self) -> None:
        """The body in the head's read (taken without a second ``dataReceived``): a body
        protocol that raises on it fails the body and the connection as in a read of its own."""
        class Broken(Body):
            def dataReceived(self, data: bytes) -> None:
                raise ZeroDivisionError()

        for extra in (b"", b"HTTP/1.1 200 OK\r\n"):
            d, protocol, transport = self.send()
            body = Broken()
            d.addCallback(lambda r, body=body: r.deliverBody(body))
            protocol.dataReceived(HEAD_200 + b"hello" + extra)
            self.assertTrue(transport.aborted)
            [reason] = body.reasons
            reason.trap(ResponseFailed)
            self.assertTrue(reason.value.reasons[0].check(ZeroDivisionError))
            self.assertEqual(self.client.idle_connections(), 0)

    def test_exception_in_body_protocol_end_is_logged(self) -> None:
        class Broken(Body):
            def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
                raise ZeroDivisionError()

        response, protocol, _ = self.respond(HEAD_200)
        response.deliverBody(Broken())
        protocol.dataReceived(b"hello")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.client.idle_connections(), 1)  # the connection itself is fine

    def test_unclaimed_body_broken_before_delivery(self) -> None:
        response, protocol, _ = self.respond(HEAD_200 + b"ab")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        body = self.read(response)
        self.assertEqual(body.data, b"ab")
        body.reasons[0].trap(ResponseFailed)
        self.assertTrue(body.reasons[0].value.reasons[1].check(_DataLoss))

    def test_read_body_works(self) -> None:
        response, _, _ = self.respond(HEAD_200 + b"hello")
        self.assertEqual(self.successResultOf(readBody(response)), b"hello")


class ErrorTests(Base):
    def test_closed_before_any_response_is_never_received(self) -> None:
        for reason in (ConnectionDone(), ConnectionLost()):
            d, protocol, _ = self.send(b"POST", URL, None, forward.BytesBody(b"x"))
            protocol.connectionLost(Failure(reason))
            failure = self.failureResultOf(d, ResponseNeverReceived)
            self.assertTrue(failure.value.reasons[0].check(type(reason)))
            # Written whole, then no answer: it may have run, so it is not sent again.
            self.assertFalse(forward.not_processed(failure.value))
            self.assertTrue(is_retryable(None, failure.value, 0))

    def test_closed_after_part_of_the_head_is_a_response_failure(self) -> None:
        d, protocol, _ = self.send()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(d, ResponseFailed)
        self.assertNotIsInstance(failure.value, ResponseNeverReceived)
        self.assertFalse(forward.not_processed(failure.value))

    def test_connection_errors_pass_through(self) -> None:
        self.endpoints.endpoint.auto = False
        d = self.client.request(b"GET", URL)
        _, attempt = self.endpoints.endpoint.attempts.pop()
        attempt.errback(ConnectionRefusedError())
        self.failureResultOf(d, ConnectionRefusedError)

    def test_cancel_while_connecting_cancels_the_connection_attempt(self) -> None:
        self.endpoints.endpoint.auto = False
        d = self.client.request(b"GET", URL)
        d.cancel()
        self.assertEqual(self.endpoints.endpoint.cancelled, 1)
        self.failureResultOf(d, ConnectingCancelledError)

    def test_cancel_before_the_head_aborts_the_connection(self) -> None:
        d, protocol, transport = self.send()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(transport.aborted)
        protocol.connectionLost(Failure(ConnectionAborted()))  # nothing fires twice
        self.assertEqual(self.client.idle_connections(), 0)

    def test_timeout_becomes_timeout_error(self) -> None:
        d, _, transport = self.send()
        d.addTimeout(30, self.clock)
        self.clock.advance(31)
        self.failureResultOf(d, defer.TimeoutError)
        self.assertTrue(transport.aborted)

    def test_cancel_while_writing_stops_the_producer(self) -> None:
        body = LaterBody(5)
        d, _, transport = self.send(b"POST", URL, None, body)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(body.stopped)
        self.assertTrue(transport.aborted)
        self.assertRaises(ExcessWrite, body.consumer.write, b"abc")

    def test_cancel_after_the_head_does_nothing(self) -> None:
        d, protocol, transport = self.send()
        protocol.dataReceived(HEAD_200)
        response = self.successResultOf(d)
        d.cancel()
        self.assertFalse(transport.aborted)
        protocol.dataReceived(b"hello")
        self.assertEqual(self.read(response).data, b"hello")

    def test_new_connection_is_used_after_connecting(self) -> None:
        self.endpoints.endpoint.auto = False
        d = self.client.request(b"POST", URL, None, forward.BytesBody(b"abc"))
        protocol, transport = self.endpoints.endpoint.complete()
        self.assertEqual(len(transport.writes), 1)
        self.assertTrue(transport.nodelay)
        protocol.dataReceived(HEAD_200 + b"hello")
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_response_before_the_streamed_request_finished_is_not_reused(self) -> None:
        body = LaterBody(5)
        d, protocol, transport = self.send(b"POST", URL, None, body)
        protocol.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno")
        response = self.successResultOf(d)
        self.assertEqual(self.read(response).data, b"no")
        self.assertTrue(transport.disconnecting)
        self.assertTrue(body.stopped)
        self.assertEqual(self.client.idle_connections(), 0)


class PoolTests(Base):
    def finish(self, protocol: Any, raw: bytes = HEAD_200 + b"hello") -> None:
        protocol.dataReceived(raw)

    def test_most_recently_idle_first_and_limit(self) -> None:
        self.client.max_idle_per_host = 2
        sent = [self.send() for _ in range(3)]
        self.assertEqual(self.connections(), 3)
        for d, protocol, _ in sent:
            self.finish(protocol)
            self.read(self.successResultOf(d))
        transports = [t for _, _, t in sent]
        self.assertTrue(transports[0].disconnecting)  # the oldest idle one went over the limit
        self.assertEqual(self.client.idle_connections(), 2)
        _, protocol, _ = self.send()
        self.assertIs(protocol, sent[2][1])
        _, protocol, _ = self.send()
        self.assertIs(protocol, sent[1][1])
        self.send()
        self.assertEqual(self.connections(), 4)

    def test_idle_timeout_closes(self) -> None:
        d, protocol, transport = self.send()
        self.clock.advance(10)  # a request in flight is not idle
        self.finish(protocol)
        self.read(self.successResultOf(d))
        self.clock.advance(3.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.idle_connections(), 0)
        self.send()
        self.assertEqual(self.connections(), 2)

    def test_idle_connections_share_one_timer(self) -> None:
        # One timer for the pool, due when its longest-idle connection is: none armed and
        # cancelled per request.
        sent = [self.send() for _ in range(3)]
        for d, protocol, _ in sent:
            self.clock.advance(1)
            self.finish(protocol)
            self.read(self.successResultOf(d))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        closed = [[transport.disconnecting for _, _, transport in sent]]
        for _ in range(4):  # idle since 1, 2 and 3 s; now 4.05, 5.1, 6.15, 7.2 s
            self.clock.advance(1.05)  # each is closed 4 s after it went idle, not before
            closed.append([transport.disconnecting for _, _, transport in sent])
        self.assertEqual(closed, [[False, False, False], [False, False, False],
                                  [True, False, False],
                                  [True, True, False], [True, True, True]])
        self.assertEqual(self.client.idle_connections(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reuse_cancels_the_idle_timer(self) -> None:
        d, protocol, transport = self.send()
        self.finish(protocol)
        self.read(self.successResultOf(d))
        self.clock.advance(3)
        d, protocol2, _ = self.send()
        self.assertIs(protocol2, protocol)
        self.clock.advance(3)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.finish(protocol)  # back in the pool at 6 s: idle anew, closed 4 s later
        self.read(self.successResultOf(d))
        self.clock.advance(3.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)

    def test_idle_connection_closed_by_server_is_dropped(self) -> None:
        d, protocol, _ = self.send()
        self.finish(protocol)
        self.read(self.successResultOf(d))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.client.idle_connections(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.send()
        self.assertEqual(self.connections(), 2)

    def test_idle_connection_with_unexpected_bytes_is_dropped(self) -> None:
        d, protocol, transport = self.send()
        self.finish(protocol)
        self.read(self.successResultOf(d))
        protocol.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.assertTrue(transport.aborted)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_bytes_after_the_body_prevent_reuse(self) -> None:
        d, protocol, transport = self.send()
        self.finish(protocol, HEAD_200 + b"helloEXTRA")
        body = self.read(self.successResultOf(d))
        self.assertEqual(body.data, b"hello")
        body.reasons[0].trap(ResponseDone)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_connection_close_prevents_reuse(self) -> None:
        for raw in (
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        ):
            d, protocol, transport = self.send()
            protocol.dataReceived(raw)
            self.successResultOf(d)
            self.assertTrue(transport.disconnecting)
        d, protocol, transport = self.send()
        protocol.dataReceived(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.client.idle_connections(), 1)

    def test_no_idle_connections_kept_when_limit_is_zero(self) -> None:
        self.client.max_idle_per_host = 0
        d, protocol, transport = self.send()
        self.finish(protocol)
        self.read(self.successResultOf(d))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_post_lost_after_writing_is_not_sent_again_by_forward_send(self) -> None:
        d, protocol, _ = self.send()
        self.finish(protocol)
        self.read(self.successResultOf(d))
        sending = forward.send(self.client, URL, "k", b"POST", Headers(), b"{}")
        self.assertEqual(self.connections(), 1)
        protocol.connectionLost(Failure(ConnectionDone()))  # closed after reading the POST
        self.assertEqual(self.connections(), 1)
        self.failureResultOf(sending, ResponseNeverReceived)

    def test_idempotent_get_lost_after_writing_is_sent_again(self) -> None:
        d, protocol, _ = self.send()
        self.finish(protocol)
        self.read(self.successResultOf(d))
        sending = forward.send(self.client, URL, "k", b"GET", Headers(), b"")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.connections(), 2)
        fresh, _ = self.endpoints.endpoint.connections[1]
        fresh.dataReceived(HEAD_200 + b"hello")
        self.assertEqual(self.successResultOf(sending).code, 200)

    def test_pools_are_per_host(self) -> None:
        _, protocol, _ = self.send()
        self.finish(protocol)
        self.send(url=b"http://127.0.0.1:9999/x")
        self.assertEqual(self.connections(), 2)
        self.send(url=b"http://127.0.0.1:8080/other")
        self.assertEqual(self.connections(), 2)

    def test_close_cached_connections(self) -> None:
        sent = [self.send() for _ in range(3)]
        busy_transport = sent.pop()[2]
        for _, protocol, _ in sent:
            self.finish(protocol)
        closed = self.client.closeCachedConnections()
        self.assertNoResult(closed)
        self.assertTrue(all(t.disconnecting for _, _, t in sent))
        self.assertFalse(busy_transport.disconnecting)
        sent[0][1].connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(closed)
        sent[1][1].connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(closed))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.successResultOf(self.client.closeCachedConnections()))

    def test_provides_iagent(self) -> None:
        self.assertTrue(verifyObject(IAgent, self.client))
        response, _, _ = self.respond(HEAD_200 + b"hello")
        self.assertTrue(verifyObject(IResponse, response))


# -- real sockets ---------------------------------------------------------------------------


class Hello(Resource):
    """Content-Length answers at /len, chunked ones at /chunked; counts connections."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes | int:
        body = request.content.read() if request.content else b""
        if request.path == b"/chunked":
            request.write(b"part1;")
            request.write(b"part2;" + body)
            request.finish()
            return server.NOT_DONE_YET
        return b"hello " + body


class CountingSite(server.Site):
    connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        CountingSite.connections += 1
        return super().buildProtocol(addr)


class OneShot(Protocol):
    """Answers each request with ``reply``; closes ``close_after`` seconds after the first one
    (None: never), or, with ``answer_once``, closes instead of answering a second request."""

    reply = b""
    close_after: float | None = 0.0
    answer_once = False

    def connectionMade(self) -> None:
        self.answered = 0
        self.closing: Any = None

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if self.closing is not None and self.closing.active():
            self.closing.cancel()

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        from twisted.internet import reactor

        transport: Any = self.transport
        if self.answer_once and self.answered:
            transport.loseConnection()
            return
        self.answered += 1
        transport.write(self.reply)
        if self.close_after is not None:
            self.closing = cast(Any, reactor).callLater(self.close_after, transport.loseConnection)


class _Endpoint(TCP4ClientEndpoint):
    """A TCP4ClientEndpoint the client does not dial itself (not exactly that type): the
    endpoint path, the reference for the client's own dialling."""


class DialTests(SynchronousTestCase):
    """A plain TCP4ClientEndpoint is dialled by the client itself (``connectTCP`` with the
    request as the factory): the same call, bytes, failures and cancellation as through
    the endpoint."""

    def clients(self) -> list[tuple[MemoryReactorClock, BackendClient]]:
        made = []
        for own in (True, False):
            reactor = MemoryReactorClock()
            endpoints = forward.CachedEndpoints(reactor, 7)
            if not own:
                endpoints._cache[(b"http", b"127.0.0.1", 8080)] = _Endpoint(
                    reactor, "127.0.0.1", 8080, 7)
            made.append((reactor, BackendClient(reactor, endpoints, 4)))
        return made

    def test_dials_as_the_endpoint_does(self) -> None:
        results = []
        for reactor, client in self.clients():
            d = client.request(b"POST", URL, Headers({b"x-a": [b"1"]}), forward.BytesBody(b"hi"))
            host, port, factory, timeout, bind = reactor.tcpClients[-1]
            transport = Transport()
            protocol = factory.buildProtocol(None)
            protocol.makeConnection(transport)
            protocol.dataReceived(HEAD_200 + b"hello")
            response = self.successResultOf(d)
            results.append((host, port, timeout, bind, transport.value(), response.code,
                            self.successResultOf(readBody(response))))
        self.assertEqual(results[0], results[1])
        self.assertEqual(results[0][:4], ("127.0.0.1", 8080, 7, None))

    def test_failed_dial(self) -> None:
        for reactor, client in self.clients():
            d = client.request(b"GET", URL)
            factory = reactor.tcpClients[-1][2]
            refused = Failure(ConnectionRefusedError())
            factory.clientConnectionFailed(reactor.connectors[-1], refused)
            self.failureResultOf(d, ConnectionRefusedError)

    def test_cancel_while_dialling(self) -> None:
        for reactor, client in self.clients():
            d = client.request(b"GET", URL)
            d.cancel()
            self.failureResultOf(d, ConnectingCancelledError)
            connector = reactor.connectors[-1]
            self.assertTrue(connector.stoppedConnecting)
            # What the connector then says changes nothing.
            reactor.tcpClients[-1][2].clientConnectionFailed(connector, Failure(UserError()))
            self.assertEqual(client.idle_connections(), 0)

    def test_cancel_before_the_head_after_dialling(self) -> None:
        for reactor, client in self.clients():
            d = client.request(b"GET", URL)
            transport = Transport()
            reactor.tcpClients[-1][2].buildProtocol(None).makeConnection(transport)
            d.cancel()
            self.failureResultOf(d, CancelledError)
            self.assertTrue(transport.aborted)


class RealSocketTests(TestCase):
    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.client = BackendClient(
            reactor, forward.CachedEndpoints(reactor, 5), 4)  # type: ignore[arg-type]
        self.addCleanup(self.client.closeCachedConnections)

    def listen(self, factory: Any) -> int:
        port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def site(self) -> int:
        CountingSite.connections = 0
        site = CountingSite(Hello())
        site.timeOut = None
        return self.listen(site)

    def raw(self, reply: bytes, close_after: float | None, answer_once: bool = False) -> int:
        factory = Factory.forProtocol(OneShot)
        OneShot.reply = reply
        OneShot.close_after = close_after
        OneShot.answer_once = answer_once
        self.addCleanup(setattr, OneShot, "answer_once", False)
        return self.listen(factory)

    async def _keep_alive(self, port: int) -> None:
        url = b"http://127.0.0.1:%d/len" % port
        for i in range(3):
            response = await forward.send(
                self.client, url, "k", b"POST", Headers(), b"n%d" % i)
            self.assertEqual(response.code, 200)
            self.assertEqual(await readBody(response), b"hello n%d" % i)
        self.assertEqual(CountingSite.connections, 1)
        self.assertEqual(self.client.idle_connections(), 1)
        # The endpoint's pass-through wrapper was taken out of the read path.
        (connection,) = [c for idle in self.client._idle.values() for c in idle]
        self.assertIs(cast(Any, connection.transport).protocol, connection)

    def test_keep_alive_reuse(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._keep_alive(self.site()))

    async def _chunked(self, port: int) -> None:
        url = b"http://127.0.0.1:%d/chunked" % port
        for _ in range(2):
            response = await self.client.request(
                b"POST", url, None, forward.BytesBody(b"body"))
            self.assertIs(response.length, UNKNOWN_LENGTH)
            self.assertEqual(await readBody(response), b"part1;part2;body")
        self.assertEqual(CountingSite.connections, 1)

    def test_chunked_body(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._chunked(self.site()))

    async def _close_delimited(self, port: int) -> None:
        response = await self.client.request(b"GET", b"http://127.0.0.1:%d/" % port)
        body = Body()
        response.deliverBody(body)
        while not body.reasons:
            await deferLater(self.reactor, 0.01, lambda: None)
        self.assertEqual(body.data, b"close-delimited body")
        body.reasons[0].trap(PotentialDataLoss)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_close_delimited_body(self) -> Deferred[None]:
        port = self.raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nclose-delimited body",
                        close_after=0.05)
        return Deferred.fromCoroutine(self._close_delimited(port))

    async def _closed_freed(self, port: int) -> None:
        response = await self.client.request(b"GET", b"http://127.0.0.1:%d/" % port)
        body = Body()
        response.deliverBody(body)
        while not body.reasons:
            await deferLater(self.reactor, 0.01, lambda: None)
        del response
        await deferLater(self.reactor, 0.01, lambda: None)  # the transport's loss is done
        self.assertEqual(self.client.idle_connections(), 0)
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            left = sorted({type(o).__name__ for o in gc.garbage} & {
                "Client", "Connector", "_WrappingFactory", "_Connecting", "_Connection"})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        self.assertEqual(left, [])

    def test_a_closed_connection_is_freed_without_the_collector(self) -> Deferred[None]:
        # Seen in the gateway under load (issue 17.7): every backend connection that closed
        # (every stream's: they go with Connection: close) left its TCP transport, connector,
        # the endpoint's wrapping factory and its Deferred in reference cycles, held until the
        # once-a-minute full collection of the fast paths' GC schedule.
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        port = self.raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        close_after=None)
        return Deferred.fromCoroutine(self._closed_freed(port))

    async def _idle_closed(self, port: int) -> None:
        url = b"http://127.0.0.1:%d/" % port
        response = await self.client.request(b"GET", url)
        self.assertEqual(await readBody(response), b"ok")
        self.assertEqual(self.client.idle_connections(), 1)
        for _ in range(200):  # the server closes the idle connection: the pool notices
            if not self.client.idle_connections():
                break
            await deferLater(self.reactor, 0.01, lambda: None)
        self.assertEqual(self.client.idle_connections(), 0)
        response = await self.client.request(b"GET", url)
        self.assertEqual(await readBody(response), b"ok")
        while self.client.idle_connections():
            await deferLater(self.reactor, 0.01, lambda: None)

    def test_server_closes_idle_pooled_connection(self) -> Deferred[None]:
        port = self.raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", close_after=0.05)
        return Deferred.fromCoroutine(self._idle_closed(port))

    async def _stale(self, port: int) -> None:
        url = b"http://127.0.0.1:%d/" % port
        response = await self.client.request(b"GET", url)
        self.assertEqual(await readBody(response), b"ok")
        # The server never answers a second request on a connection; it closes instead.
        with self.assertRaises(ResponseNeverReceived) as caught:
            await self.client.request(b"GET", url)
        self.assertFalse(forward.not_processed(caught.exception))

    def test_stale_pooled_connection_is_never_received(self) -> Deferred[None]:
        port = self.raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", close_after=None,
                        answer_once=True)
        return Deferred.fromCoroutine(self._stale(port))

    async def _refused(self) -> None:
        port = self.reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        with self.assertRaises(ConnectionRefusedError):
            await self.client.request(b"GET", b"http://127.0.0.1:%d/" % number)

    def test_connection_refused_passes_through(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._refused())


class ThreadedBackend:
    """A backend on its own thread (so the gateway's reactor cannot see its closes early): it
    reads each request whole (head and Content-Length body), records it, then either answers
    with keep-alive and closes at once (``answer_then_close``) or closes without answering."""

    def __init__(self, answer_then_close: bool) -> None:
        import socket
        import threading

        self.answer = answer_then_close
        self.requests: list[tuple[int, bytes]] = []  # (connection number, body)
        self.closed = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(10)
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for number in range(2):
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    data += piece
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), b"0"))
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append((number, body))
                if self.answer:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                 b"Connection: keep-alive\r\n\r\nok")
            self.closed.set()

    def stop(self) -> None:
        import socket

        if self.thread.is_alive():  # wake a pending accept
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                pass
        self.thread.join(10)
        self.server.close()


class ResendOnRealSocketsTests(TestCase):
    """A POST reaches the backend once, and a pooled connection it closed is never written to."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.client = BackendClient(
            reactor, forward.CachedEndpoints(reactor, 5), 4)  # type: ignore[arg-type]
        self.addCleanup(self.client.closeCachedConnections)

    def backend(self, answer_then_close: bool) -> ThreadedBackend:
        backend = ThreadedBackend(answer_then_close)
        self.addCleanup(backend.stop)
        return backend

    async def _read_then_close(self) -> None:
        backend = self.backend(answer_then_close=False)
        url = b"http://127.0.0.1:%d/v1/chat/completions" % backend.port
        with self.assertRaises(ResponseNeverReceived):
            await forward.send(self.client, url, "k", b"POST", Headers(), b'{"n": 1}')
        self.assertEqual(backend.requests, [(0, b'{"n": 1}')])

    def test_post_read_whole_then_closed_reaches_the_backend_once(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._read_then_close())

    async def _closed_while_idle(self) -> None:
        import time

        backend = self.backend(answer_then_close=True)
        url = b"http://127.0.0.1:%d/v1/chat/completions" % backend.port
        response = await forward.send(self.client, url, "k", b"POST", Headers(), b'{"n": 1}')
        self.assertEqual(await readBody(response), b"ok")
        self.assertEqual(self.client.idle_connections(), 1)
        # Block the reactor until the backend closed its end: the pooled connection's close is
        # then in the socket but not yet seen by the reactor (the race a keep-alive expiry makes).
        self.assertTrue(backend.closed.wait(10))
        time.sleep(0.05)
        response = await forward.send(self.client, url, "k", b"POST", Headers(), b'{"n": 2}')
        self.assertEqual(await readBody(response), b"ok")
        self.assertEqual(backend.requests, [(0, b'{"n": 1}'), (1, b'{"n": 2}')])

    def test_pooled_connection_closed_by_the_backend_is_not_written_to(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._closed_while_idle())

    async def _stray_bytes_while_idle(self) -> None:
        import socket
        import threading
        import time

        server = socket.create_server(("127.0.0.1", 0))
        server.settimeout(10)
        self.addCleanup(server.close)
        seen: list[int] = []
        stray_sent = threading.Event()
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
        kept: list[socket.socket] = []

        def serve() -> None:
            for number in range(2):
                conn, _ = server.accept()
                kept.append(conn)
                conn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                seen.append(number)
                conn.sendall(answer)
                if number == 0:  # then bytes nobody asked for, the connection left open
                    time.sleep(0.05)
                    conn.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
                    stray_sent.set()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        self.addCleanup(lambda: [conn.close() for conn in kept])
        url = b"http://127.0.0.1:%d/" % server.getsockname()[1]
        response = await self.client.request(b"GET", url)
        self.assertEqual(await readBody(response), b"ok")
        self.assertEqual(self.client.idle_connections(), 1)
        # Block the reactor until the stray bytes are in the pooled socket, unseen by it.
        self.assertTrue(stray_sent.wait(10))
        time.sleep(0.05)
        response = await self.client.request(b"GET", url)
        self.assertEqual(response.code, 200)
        self.assertEqual(await readBody(response), b"ok")
        thread.join(10)
        self.assertEqual(seen, [0, 1])  # a new connection: the stray bytes were not the answer

    def test_pooled_connection_with_stray_bytes_is_not_written_to(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stray_bytes_while_idle())


class _Recorder(ClientFactory):
    """A client factory recording what its connector tells it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.started: Any = None
        #: Fires with (the reason,) when the connection failed.
        self.failed: Deferred[tuple[Failure]] = Deferred()
        #: Fires with (the address, the protocol) when it is made.
        self.made: Deferred[tuple[Any, Protocol]] = Deferred()

    def startedConnecting(self, connector: Any) -> None:
        self.calls.append("startedConnecting")
        self.started = connector

    def buildProtocol(self, addr: Any) -> Protocol:
        self.calls.append("buildProtocol")
        protocol = Protocol()
        self.made.callback((addr, protocol))
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.calls.append("clientConnectionFailed")
        self.failed.callback((reason,))


class OwnDialTests(TestCase):
    """``_Dialer.connectTCP`` (the client's own ``connectTCP`` for an IPv4 address) makes the
    same connector and client as the reactor's, with the same timeout and calls, and only
    starts connecting a reactor turn sooner."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor

    def dial(self, own: bool, port: int, factory: Any, timeout: float = 7) -> Any:
        from llamaproxy.fastpath.backend_client import _Dialer

        dialer = _Dialer(self.reactor) if own else self.reactor
        connector = dialer.connectTCP("127.0.0.1", port, factory, timeout=timeout)
        self.addCleanup(deferLater, self.reactor, 0.05, lambda: None)  # (the peer closes)
        self.addCleanup(connector.disconnect)
        return connector

    def listen(self) -> tuple[int, Any]:
        port = self.reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port), port

    def test_fits(self) -> None:
        from llamaproxy.fastpath.backend_client import _Dialer

        self.assertTrue(_Dialer.fits(self.reactor, "127.0.0.1", None))
        self.assertFalse(_Dialer.fits(self.reactor, "127.0.0.1", ("127.0.0.1", 0)))
        self.assertFalse(_Dialer.fits(self.reactor, "localhost", None))
        self.assertFalse(_Dialer.fits(self.reactor, "::1", None))
        self.assertFalse(_Dialer.fits(MemoryReactorClock(), "127.0.0.1", None))
        target = BackendClient(
            self.reactor, forward.CachedEndpoints(self.reactor, 5), 4)._target(
            b"http://127.0.0.1:8080")
        self.assertIsInstance(target.dial[0], _Dialer)  # type: ignore[index]
        self.assertIs(target.dial[0].reactor, self.reactor)  # type: ignore[index]

    @staticmethod
    def shape(connector: Any, factory: _Recorder) -> dict[str, Any]:
        client = connector.transport
        # (realAddress, and doConnect as doRead/doWrite, come one turn later on Twisted's
        # way: checked once connected)
        attributes = {k: v for k, v in vars(client).items() if k not in (
            "socket", "fileno", "connector", "doRead", "doWrite", "realAddress")}
        timer = connector.timeoutID
        return {
            "connector": {k: v for k, v in vars(connector).items()
                          if k not in ("transport", "timeoutID", "factory")},
            "client type": type(client), "client": attributes,
            "socket": (client.socket.family, client.socket.type, client.socket.getblocking()),
            "fileno": client.fileno(), "connector is": client.connector is connector,
            # (whole seconds: the reactor's real clock moves between the dial and this read,
            # so 7.0 s can read 6.999; a CI run once failed on that)
            "timeout": (round(timer.getTime() - self_seconds(connector)),
                        timer.func == client.failIfNotConnected,
                        [type(a) for a in timer.args]),
            "calls": list(factory.calls), "started": factory.started is connector,
        }

    async def _same_shape(self) -> None:
        port, _ = self.listen()
        shapes, made = [], []
        for own in (True, False):
            factory = _Recorder()
            connector = self.dial(own, port, factory)
            shape = self.shape(connector, factory)
            shape["fileno"] = None  # (a different socket each)
            shapes.append(shape)
            addr, _ = await factory.made
            made.append((addr, factory.calls, connector.state, connector.timeoutID,
                         connector.transport.realAddress, connector.transport.connected))
            await deferLater(self.reactor, 0, lambda: None)  # (made: out of buildProtocol)
        self.assertEqual(shapes[0], shapes[1])
        self.assertEqual(made[0], made[1])
        self.assertEqual(made[0][1:], (["startedConnecting", "buildProtocol"], "connected",
                                       None, ("127.0.0.1", port), 0))  # (in buildProtocol)

    def test_same_connector_client_and_timeout(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._same_shape())

    def test_connects_at_once(self) -> None:
        import select

        port, listening = self.listen()
        factory = _Recorder()
        self.dial(True, port, factory)
        # No reactor turn yet, and the kernel already has the connection to accept.
        self.assertEqual(select.select([listening.socket], [], [], 1)[0], [listening.socket])

    async def _refused(self) -> None:
        port, listening = self.listen()
        await listening.stopListening()
        for own in (True, False):
            factory = _Recorder()
            self.dial(own, port, factory)
            (reason,) = await factory.failed
            reason.trap(ConnectionRefusedError)
            self.assertEqual(factory.calls, ["startedConnecting", "clientConnectionFailed"])

    def test_refused(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._refused())

    def test_timeout_and_stop(self) -> None:
        from twisted.internet.error import TimeoutError as ConnectTimeout

        port, _ = self.listen()
        for own in (True, False):
            factory = _Recorder()
            connector = self.dial(own, port, factory)
            timer = connector.timeoutID
            timer.func(*timer.args)  # what the reactor does when it is due
            self.successResultOf(factory.failed)[0].trap(ConnectTimeout)
            self.assertFalse(timer.active())
            self.assertEqual(connector.state, "disconnected")
            factory = _Recorder()
            connector = self.dial(own, port, factory)
            connector.stopConnecting()
            self.successResultOf(factory.failed)[0].trap(UserError)

    async def _no_socket(self) -> None:
        from twisted.internet import tcp
        from twisted.internet.error import ConnectBindError

        def refuse(_: object) -> None:
            raise OSError(24, "Too many open files")

        self.patch(tcp.Client, "createInternetSocket", refuse)
        for own in (True, False):
            factory = _Recorder()
            connector = self.dial(own, 1, factory)
            self.assertFalse(factory.failed.called)  # (on the next turn, both ways)
            (reason,) = await factory.failed
            reason.trap(ConnectBindError)
            self.assertEqual(reason.value.args, ("Too many open files",))
            self.assertEqual(connector.state, "disconnected")

    def test_no_socket(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._no_socket())


def self_seconds(connector: Any) -> float:
    """The connector's reactor's clock."""
    return float(connector.reactor.seconds())
