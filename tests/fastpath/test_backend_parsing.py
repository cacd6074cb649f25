"""Issue 18.2: what the backend client's llhttp parsing adds to test_backend_client's contract.

The strict parse and the tolerant retry, the chunk-line guard across reads (llhttp streams
through chunk extensions of any length), the chunk-boundary tracking a stream lane relies on,
and what may follow a chunked response on a kept connection.
"""

from __future__ import annotations

from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionAborted
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ParseError
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers, _nameEncoder

from llamaproxy.fastpath.backend_client import _HEAD_END, head_end, whole_chunk
from llamaproxy.fastpath.header_fill import set_fields
from tests.fastpath.test_backend_client import Base

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


class HeadTests(Base):
    def test_bare_lf_head_with_both_framings_goes_the_tolerant_way(self) -> None:
        response, _, transport = self.respond(
            b"HTTP/1.1 200 OK\nContent-Length: 9\nTransfer-Encoding: chunked\nX-A: b\n\n"
            b"2\r\nok\r\n0\r\n\r\n")
        self.assertEqual(response.headers.getRawHeaders(b"x-a"), [b"b"])
        body = self.read(response)
        self.assertEqual(body.data, b"ok")
        body.reasons[0].trap(ResponseDone)
        self.assertTrue(transport.disconnecting)  # both framings: never reused

    def test_equal_lengths_in_one_field_and_a_head_request(self) -> None:
        response, _, _ = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nhi")
        self.assertEqual((response.length, self.read(response).data), (2, b"hi"))
        response, _, _ = self.respond(
            b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 7\r\n\r\n", b"HEAD")
        self.assertEqual(response.length, 0)
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"7"])
        self.assertEqual(self.client.idle_connections(), 1)

    def test_a_refused_head_is_a_parse_error_either_way(self) -> None:
        for raw in (b"HTTP/1.1 200 OK\r\nX:\x01\r\n\r\n", b"HTTP/2.0 200 OK\r\n\r\n",
                    b"HTTP/1.1 200 OK\nContent-Length: 1\nContent-Length: 2\n\n"):
            d, _, transport = self.send()
            self.endpoints.endpoint.connections[-1][0].dataReceived(raw)
            self.failureResultOf(d, ResponseFailed).value.reasons[0].trap(ParseError)
            self.assertTrue(transport.aborted, raw)


class HeaderFieldTests(Base):
    """The response's ``Headers`` is filled without ``addRawHeader`` (``on_header``): it must
    hold what ``addRawHeader`` would have stored, field by field."""

    def test_fields_are_stored_as_add_raw_header_would(self) -> None:
        fields = [(b"content-type", b"application/json"), (b"ETAG", b'"x"'),
                  (b"www-authenticate", b"Bearer"), (b"X-Two", b"a"), (b"x-two", b"b  "),
                  (b"Server", b"llama.cpp"), (b"x-empty", b""), (b"X-Ok", b"a\tb  c")]
        head = b"HTTP/1.1 200 OK\r\n" + b"".join(
            name + b": " + value + b"\r\n" for name, value in fields)
        response, _, _ = self.respond(head + b"Content-Length: 0\r\n\r\n")
        expected = Headers()
        for name, value in fields:
            expected.addRawHeader(name, value.rstrip(b" \t"))
        self.assertEqual(list(response.headers.getAllRawHeaders()),
                         list(expected.getAllRawHeaders()))
        self.assertEqual(response.headers.getRawHeaders(b"etag"), [b'"x"'])

    def test_the_name_map_is_bounded_and_stays_right(self) -> None:
        for round_ in range(3):
            names = [b"x-n%d-%d" % (round_, i) for i in range(300)]
            head = b"HTTP/1.1 200 OK\r\n" + b"".join(n + b": v\r\n" for n in names)
            response, _, _ = self.respond(head + b"Content-Length: 0\r\n\r\n")
            self.assertEqual([name for name, _ in response.headers.getAllRawHeaders()],
                             [b"X-N%d-%d" % (round_, i) for i in range(300)])
            self.assertLessEqual(len(_nameEncoder._canonicalHeaderCache),
                                 _nameEncoder._MAX_CACHED_HEADERS)

    def test_llhttp_refuses_line_breaks_in_a_value(self) -> None:
        # What lets ``on_header`` store values without ``Headers``' cleaning of CR and LF.
        for raw in (b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\n\r\n",
                    b"HTTP/1.1 200 OK\nX-A: a\n b\n\n",
                    b"HTTP/1.1 200 OK\nX-A: a\rb\n\n"):
            d, _, _ = self.send()
            self.endpoints.endpoint.connections[-1][0].dataReceived(raw)
            self.failureResultOf(d, ResponseFailed).value.reasons[0].trap(ParseError)

    def test_set_fields_stores_what_set_raw_headers_would(self) -> None:
        source = Headers({b"content-type": [b"a"], b"etag": [b"e"], b"X-Two": [b"1", b"2"]})
        fast = Headers({b"Etag": [b"old"], b"Server": [b"s"]})
        stock = fast.copy()
        set_fields(fast, [(n, list(v)) for n, v in source.getAllRawHeaders()])
        for name, values in source.getAllRawHeaders():
            stock.setRawHeaders(name, list(values))
        self.assertEqual(list(fast.getAllRawHeaders()), list(stock.getAllRawHeaders()))


class ChunkedTests(Base):
    def chunked(self) -> tuple[Any, Any, Any]:
        response, protocol, transport = self.respond(CHUNKED_HEAD)
        return self.read(response), protocol, transport

    @given(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b"0", b"1", b"2", b"a", b"A",
                                     b"f", b"x", b";e", b" ", b"data: {}\n\n"]),
                    max_size=12))
    @example([b"1", b"\r\n", b"x", b"\r\n"])
    @example([b"A", b"\r\n", b"data: {}\n\n", b"\r\n"])
    @example([b"a", b"\r\n", b"data: {}\n\n", b"\r\n"])
    @example([b"0", b"a", b"\r\n", b"data: {}\n\n", b"\r\n"])
    @example([b"0", b"\r\n", b"\r\n"])
    def test_a_read_at_a_boundary_as_whole_chunk_says(self, parts: list[bytes]) -> None:
        """``_chunked`` takes a read at a chunk boundary whole exactly when ``whole_chunk``
        says it is one chunk (its in-line copy), and delivers that chunk's data; any other read
        goes to llhttp, and what is delivered is the chunks' data either way."""
        data = b"".join(parts)
        body, protocol, _ = self.chunked()
        protocol.dataReceived(b"1\r\nz\r\n")  # (one chunk first: the body protocol claimed it)
        body.pieces.clear()
        parser = protocol._parser = _RefuseWholeChunks(protocol._parser, data)
        protocol.dataReceived(data)
        self.assertFalse(parser.refused, data)
        span = whole_chunk(data)
        if span is not None:
            self.assertEqual(body.pieces, [data[span[0]:span[1]]])
            self.assertTrue(protocol.at_chunk_start(body))

    def test_a_chunk_line_spread_over_reads_is_limited(self) -> None:
        body, protocol, transport = self.chunked()
        protocol.dataReceived(b"5;")
        for _ in range(4):
            protocol.dataReceived(b"e" * 1000)
        self.assertEqual(body.reasons, [])
        protocol.dataReceived(b"e" * 100)
        body.reasons[0].trap(ResponseFailed)
        self.assertTrue(body.reasons[0].value.reasons[0].check(ParseError))
        self.assertTrue(transport.aborted)

    def test_a_long_trailer_field_is_read(self) -> None:
        body, protocol, _ = self.chunked()
        protocol.dataReceived(b"2\r\nok\r\n0\r\nX-T: ")
        for _ in range(10):
            protocol.dataReceived(b"t" * 1000)
        protocol.dataReceived(b"\r\n\r\n")
        self.assertEqual(body.data, b"ok")
        body.reasons[0].trap(ResponseDone)
        self.assertEqual(self.client.idle_connections(), 1)

    def test_the_trailer_section_is_limited(self) -> None:
        body, protocol, transport = self.chunked()
        protocol.dataReceived(b"0\r\n")
        for i in range(70):
            protocol.dataReceived(b"X-T%d: %s\r\n" % (i, b"t" * 1000))
        body.reasons[0].trap(ResponseFailed)
        self.assertTrue(transport.aborted)

    def test_chunk_boundaries_a_stream_lane_sees(self) -> None:
        body, protocol, _ = self.chunked()
        self.assertTrue(protocol.at_chunk_start(body))
        self.assertFalse(protocol.at_chunk_start(object()))  # not its body protocol
        for data, boundary in (
            (b"5\r\nhel", False), (b"lo\r\n", True), (b"3\r\nabc\r\n", True),  # (whole chunk)
            (b"2\r\nxy\r\n1", False), (b"\r\nz", False), (b"\r", False), (b"\n", True),
            (b"1;e=1\r\nq\r\n", True),
        ):
            protocol.dataReceived(data)
            self.assertEqual(protocol.at_chunk_start(body), boundary, data)
        self.assertEqual(body.data, b"helloabcxyzq")
        protocol.dataReceived(b"0\r\n\r\n")
        self.assertFalse(protocol.at_chunk_start(body))
        body.reasons[0].trap(ResponseDone)

    def test_what_may_follow_a_chunked_response(self) -> None:
        # An empty line is skipped by llhttp (nothing is left to confuse the next response);
        # anything else means the connection is not reused.
        body, protocol, transport = self.chunked()
        protocol.dataReceived(b"2\r\nok\r\n0\r\n\r\n\r\n")
        body.reasons[0].trap(ResponseDone)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.client.idle_connections(), 1)
        body, protocol, transport = self.chunked()
        self.assertEqual(self.client.idle_connections(), 0)
        protocol.dataReceived(b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n")
        self.assertEqual(body.data, b"ok")
        body.reasons[0].trap(ResponseDone)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_a_body_error_after_data_in_the_same_read(self) -> None:
        body, protocol, transport = self.chunked()
        protocol.dataReceived(b"2\r\nok\r\n2\r\nabX")
        self.assertEqual(body.pieces, [b"okab"])
        body.reasons[0].trap(ResponseFailed)
        self.assertTrue(transport.aborted)
        protocol.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(len(body.reasons), 1)


class _RefuseWholeChunks:
    """An llhttp parser that fails the test if it is given a read ``whole_chunk`` takes."""

    def __init__(self, parser: Any, whole: bytes) -> None:
        self.parser = parser
        self.whole = whole
        self.refused = False

    def feed_data(self, data: bytes) -> None:
        if data is self.whole and whole_chunk(data) is not None:
            self.refused = True
            raise AssertionError(f"a whole chunk went to llhttp: {data!r}")
        self.parser.feed_data(data)


class HeadEndTests(SynchronousTestCase):
    """``head_end`` finds what the regular expression it replaces finds."""

    @given(
        st.lists(st.sampled_from([b"\r", b"\n", b"a", b":", b" ", b"\r\n", b"\n\n"]), max_size=24),
        st.integers(min_value=0, max_value=30),
    )
    def test_as_the_regular_expression(self, pieces: list[bytes], start: int) -> None:
        data = b"".join(pieces)
        start = min(start, len(data))
        match = _HEAD_END.search(data, start)
        expected = None if match is None else (match.start(), match.end())
        self.assertEqual(head_end(data, start), expected)

    def test_usual_heads(self) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
        for data, start in ((head + b"ok", 0), (head + b"\n\n", 5), (head, len(head) - 4),
                            (b"HTTP/1.1 200 OK\nA: b\n\n{}", 0), (b"HTTP/1.1 200 OK\r\n", 0),
                            (b"\r\n\r\n", 1), (b"x\r\n\n", 0)):
            match = _HEAD_END.search(data, start)
            expected = None if match is None else (match.start(), match.end())
            self.assertEqual(head_end(data, start), expected, (data, start))
