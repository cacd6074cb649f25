"""Tests for llamaproxy.fastpath.stream_lane: the fast lane of a relayed stream.

Real sockets on the real reactor with the lean poll loop installed (as ``twistd llamaproxy``
has it): a raw backend that writes chunks when told, a GatewaySite whose resource relays them
with ``StreamRelay``, and a raw client. Each test checks what the client got against what the
usual path would have sent, and that the lane was (or was not) what sent it.
"""

from __future__ import annotations

import errno
import json
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import main
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaproxy.backends import forward
from llamaproxy.fastpath import lean_poll
from llamaproxy.fastpath.backend_client import BackendClient, whole_chunk
from llamaproxy.fastpath.eager_write import Cork
from llamaproxy.fastpath.stream_lane import StreamLane
from llamaproxy.gateway.relay import StreamRelay
from llamaproxy.gateway.request import GatewayRequest
from llamaproxy.gateway.site import GatewaySite
from llamaproxy.gateway.tokens import UsageCollector, carries_counts
from llamaproxy.testing import parse_response

reactor: Any = global_reactor

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def event(text: str) -> bytes:
    """One SSE content event."""
    return b"data: " + json.dumps({"choices": [{"delta": {"content": text}}]}).encode() + b"\n\n"


def chunk(data: bytes, digits: bytes | None = None) -> bytes:
    """``data`` as one chunk (``digits``: the size line as the backend writes it)."""
    return (digits if digits is not None else b"%x" % len(data)) + b"\r\n" + data + b"\r\n"


USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}\n\n'


class Backend(Protocol):
    """The backend's side of one connection: writes what the test tells it to."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.connected.append(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost.append(self)  # type: ignore[attr-defined]


class Client(Protocol):
    """The client: everything it read, and a way to wait for more."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class Relaying(Resource):
    """GET / → the backend's response, relayed by a StreamRelay (as the proxy does)."""

    isLeaf = True

    @staticmethod
    def early_check(request: GatewayRequest) -> None:
        """Let everything through."""

    def __init__(self, client: BackendClient, url: bytes, idle_timeout: float,
                 usage: UsageCollector | None) -> None:
        super().__init__()
        self.client = client
        self.url = url
        self.idle_timeout = idle_timeout
        self.usage = usage
        self.relays: list[StreamRelay] = []

    def render_GET(self, request: GatewayRequest) -> int:  # type: ignore[override]
        def relay(response: Any) -> None:
            request.setHeader(b"content-type", b"text/event-stream")
            stream = StreamRelay(request, reactor, self.idle_timeout, self.usage)
            self.relays.append(stream)
            response.deliverBody(stream)

        self.client.request(b"GET", self.url).addCallback(relay)
        return NOT_DONE_YET


class StreamLaneTests(TestCase):
    def setUp(self) -> None:
        if not lean_poll.has_read_lanes(reactor):
            if not lean_poll.install(reactor):
                self.skipTest("the lean poll loop needs the epoll reactor")
            self.addCleanup(_uninstall_lean_poll)

    async def start(self, usage: UsageCollector | None = None, idle_timeout: float = 30.0,
                    request: bytes = b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n",
                    ) -> tuple[Relaying, Backend, Client]:
        backends = Factory.forProtocol(Backend)
        backends.connected = []  # type: ignore[attr-defined]
        backends.lost = []  # type: ignore[attr-defined]
        backend_port = reactor.listenTCP(0, backends, interface="127.0.0.1")
        self.addCleanup(backend_port.stopListening)
        cork = Cork()  # eager writes on: the lane needs both sides' senders
        client = BackendClient(reactor, forward.CachedEndpoints(reactor, 5), 4, cork=cork)
        self.addCleanup(client.closeCachedConnections)
        url = b"http://127.0.0.1:%d/" % backend_port.getHost().port
        resource = Relaying(client, url, idle_timeout, usage)
        site = GatewaySite(resource, reactor=reactor, cork=cork)
        site_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(site_port.stopListening)
        self.backends = backends
        user = Client()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", site_port.getHost().port).connect(
            Factory.forProtocol(lambda: user))
        self.addCleanup(_abort, user)
        user.transport.write(request)  # type: ignore[union-attr]
        while not backends.connected:  # type: ignore[attr-defined]
            await _turn()
        return resource, backends.connected[0], user  # type: ignore[attr-defined]

    async def send(self, backend: Backend, user: Client, data: bytes, expect: bytes) -> None:
        """Backend writes ``data`` (one read, on loopback); wait until the client has
        ``expect`` at the end of what it got."""
        backend.transport.write(data)  # type: ignore[union-attr]
        for _ in range(500):
            if user.received.endswith(expect):
                return
            await _turn()
        self.fail(f"the client never got {expect!r}; it has {user.received[-200:]!r}")

    async def test_usual_pieces_take_the_lane_and_count_as_usual(self) -> None:
        usage = UsageCollector(streaming=True)
        resource, backend, user = await self.start(usage)
        first = event("a")
        await self.send(backend, user, HEAD + chunk(first), chunk(first))
        [relay] = resource.relays
        lane = relay._lane
        assert lane is not None and lane.is_open
        pieces = [event(f"token {i}") for i in range(5)]
        for piece in pieces:
            await self.send(backend, user, chunk(piece), chunk(piece))
        self.assertEqual(lane.sent, sum(len(p) for p in pieces))  # the lane sent them
        await self.send(backend, user, chunk(USAGE) + b"0\r\n\r\n", b"0\r\n\r\n")
        await _turn()
        response = parse_response(user.received)
        self.assertTrue(response.complete)
        self.assertEqual(response.body, first + b"".join(pieces) + USAGE)  # as sent
        self.assertEqual((usage.prompt_tokens, usage.completion_tokens), (3, 4))
        self.assertEqual(usage.events, 7)  # the lane's pieces are counted too
        self.assertFalse(lane.is_open)
        self.assertEqual(relay.outcome, "complete")
        self.assertEqual(relay.bytes_sent, len(response.body))
        self.assertEqual(relay.request.sentLength, len(response.body))
        self.assertEqual(reactor.llamaproxy_read_lanes, {})

    async def test_backend_framing_that_is_not_ours_is_framed_anew(self) -> None:
        resource, backend, user = await self.start()
        first = event("a")
        await self.send(backend, user, HEAD + chunk(first), chunk(first))
        lane = resource.relays[0]._lane
        assert lane is not None
        upper = event("upper-case hex: " + "x" * 9)  # 0x4a bytes: "4A"
        zeros = event("leading zeros")
        self.assertEqual(b"%X" % len(upper), b"4A")
        await self.send(backend, user, chunk(upper, b"%X" % len(upper)), chunk(upper))
        await self.send(backend, user, chunk(zeros, b"00%x" % len(zeros)), chunk(zeros))
        self.assertTrue(lane.is_open)
        self.assertEqual(lane.sent, len(upper) + len(zeros))
        await self.send(backend, user, b"0\r\n\r\n", b"0\r\n\r\n")
        self.assertEqual(parse_response(user.received).body, first + upper + zeros)

    async def test_other_reads_go_the_usual_way(self) -> None:
        usage = UsageCollector(streaming=True)
        resource, backend, user = await self.start(usage)
        first = event("a")
        await self.send(backend, user, HEAD + chunk(first), chunk(first))
        lane = resource.relays[0]._lane
        assert lane is not None
        two = event("b") + event("c")
        await self.send(backend, user, chunk(event("b")) + chunk(event("c")), chunk(two))
        # An event cut in two: the collector keeps its first part to read the event whole, so
        # the second (a whole chunk ending an event) must go the usual way, through it.
        partial = b'data: {"choices": [{"delta": {"content": "d"'
        rest = b"}}]}\n\n"
        await self.send(backend, user, chunk(partial), chunk(partial))
        self.assertEqual(usage.held, partial)
        await self.send(backend, user, chunk(rest), chunk(rest))
        self.assertEqual(usage.held, b"")
        self.assertEqual(lane.sent, 0)  # none of those was the lane's
        last = event("e")
        await self.send(backend, user, chunk(last), chunk(last))
        self.assertEqual(lane.sent, len(last))  # and the usual piece after them is
        await self.send(backend, user, b"0\r\n\r\n", b"0\r\n\r\n")
        self.assertEqual(parse_response(user.received).body, first + two + partial + rest + last)

    async def test_no_lane_for_a_body_that_is_not_chunked(self) -> None:
        resource, backend, user = await self.start()
        first, second = event("a"), event("b")
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % (len(first) + len(second)))
        await self.send(backend, user, head + first, chunk(first))
        await self.send(backend, user, second, b"0\r\n\r\n")
        relay = resource.relays[0]
        self.assertIsNone(relay._lane)
        self.assertEqual(parse_response(user.received).body, first + second)
        self.assertEqual(relay.request.sentLength, len(first + second))

    async def test_no_lane_for_a_response_that_is_not_chunked(self) -> None:
        """An HTTP/1.0 client gets the body as it is, to the close: nothing for the lane."""
        resource, backend, user = await self.start(request=b"GET / HTTP/1.0\r\n\r\n")
        pieces = [event("a"), event("b"), event("c")]
        await self.send(backend, user, HEAD + chunk(pieces[0]), pieces[0])
        for piece in pieces[1:]:
            await self.send(backend, user, chunk(piece), piece)
        self.assertIsNone(resource.relays[0]._lane)
        backend.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
        await user.closed
        self.assertTrue(user.received.endswith(b"\r\n\r\n" + b"".join(pieces)))

    async def test_a_client_that_does_not_keep_up_closes_the_lane(self) -> None:
        resource, backend, user = await self.start()
        first = event("a")
        await self.send(backend, user, HEAD + chunk(first), chunk(first))
        relay = resource.relays[0]
        lane = relay._lane
        assert lane is not None
        user.transport.pauseProducing()  # type: ignore[union-attr]
        big = b"data: " + b"x" * 60_000 + b"\n\n"
        sent = 0
        while lane.is_open and sent < 400:
            backend.transport.write(chunk(big))  # type: ignore[union-attr]
            sent += 1
            await _turn()
        self.assertFalse(lane.is_open)  # a send the kernel did not take all of
        backend.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
        user.transport.resumeProducing()  # type: ignore[union-attr]
        for _ in range(2000):
            if user.received.endswith(b"0\r\n\r\n"):
                break
            await _turn()
        response = parse_response(user.received)
        self.assertTrue(response.complete)
        self.assertEqual(response.body, first + sent * big)
        self.assertEqual(relay.request.sentLength, len(response.body))

    async def test_client_gone_closes_the_lane_and_the_backend_connection(self) -> None:
        resource, backend, user = await self.start()
        first = event("a")
        await self.send(backend, user, HEAD + chunk(first), chunk(first))
        relay = resource.relays[0]
        assert relay._lane is not None
        user.transport.abortConnection()  # type: ignore[union-attr]
        for _ in range(500):
            if self.backends.lost:  # type: ignore[attr-defined]
                break
            await _turn()
        self.assertEqual(relay.outcome, "client_gone")
        self.assertIsNone(relay._lane)
        self.assertEqual(reactor.llamaproxy_read_lanes, {})
        self.assertEqual(self.backends.lost, [backend])  # type: ignore[attr-defined]

    async def test_idle_timeout_sees_the_lane_pieces(self) -> None:
        resource, backend, user = await self.start(idle_timeout=0.4)
        first = event("a")
        await self.send(backend, user, HEAD + chunk(first), chunk(first))
        relay = resource.relays[0]
        for i in range(6):  # 1.2 s of pieces 0.2 s apart, all through the lane
            await deferLater(reactor, 0.2, lambda: None)
            piece = event(str(i))
            await self.send(backend, user, chunk(piece), chunk(piece))
        self.assertIsNone(relay.outcome)  # not idle: the lane's pieces count
        self.assertGreater(relay._lane.sent if relay._lane else 0, 0)
        for _ in range(200):  # now quiet: the idle timeout ends it
            if relay.outcome is not None:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(relay.outcome, "idle_timeout")


async def _turn() -> None:
    await deferLater(reactor, 0.001, lambda: None)


def _abort(user: Client) -> None:
    if user.transport is not None:
        user.transport.abortConnection()  # type: ignore[attr-defined]


def _uninstall_lean_poll() -> None:
    for name in ("doPoll", "doIteration", "llamaproxy_read_lanes"):
        vars(reactor).pop(name, None)


class _StubSocket:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def recv(self, size: int) -> bytes:
        return self.data


class _StubConnection:
    bufferSize = 65536

    def __init__(self, data: bytes) -> None:
        self.socket = _StubSocket(data)


class _StubSender:
    """A sender whose connection's socket gives one read (``receive``, which the lane does in
    line), recording what is delivered or sent (``write_through``'s ``send_now`` when nothing
    is held, which the lane does in line too)."""

    def __init__(self, data: bytes = b"") -> None:
        self.connection = _StubConnection(data)
        self.held: list[bytes] = []
        self.delivered: list[bytes] = []
        self.written: list[bytes] = []

    def deliver(self, data: bytes) -> None:
        self.delivered.append(data)

    def send_now(self, data: bytes) -> bool:
        self.written.append(data)
        return True


class _StubBackend:
    @staticmethod
    def at_chunk_start(protocol: object) -> bool:
        return True


class _StubRelay:
    request: Any = None
    transport: Any = None
    bytes_sent = 0

    def __init__(self, usage: UsageCollector) -> None:
        self.usage = usage


def _reference_piece(data: bytes) -> bytes | None:
    """What the lane sends for ``data`` by the functions its in-line checks stand for (the
    code before they were inlined), or None for a read that goes the usual way."""
    span = whole_chunk(data)
    if span is None or not data.endswith(b"\n\n\r\n") or carries_counts(data):
        return None
    start, end = span
    size = end - start
    if data[:start - 2] != b"%x" % size:
        data = b"%x\r\n%b\r\n" % (size, data[start:end])
    return data


_PIECE_PARTS = st.sampled_from([
    b"\r\n", b"\n\n", b"\n", b"\r", b"data: ", b"x", b"0", b"00", b"1", b"2", b"a", b"A", b"f",
    b"F", b";e", b" ", b'"usage"', b'"timings"', b"g",
])


class DoReadTests(SynchronousTestCase):
    """``StreamLane.do_read``'s in-line checks take what the functions they stand for take."""

    def check(self, data: bytes) -> None:
        usage = UsageCollector(True)
        backend, client = _StubSender(data), _StubSender()
        lane = StreamLane(_StubRelay(usage), Clock(), _StubBackend(), backend,  # type: ignore[arg-type]
                          client, usage)
        lane._fd = 1  # (open, without a poll loop)
        if not data:  # the peer closed: doRead's answer, nothing delivered
            self.assertIs(lane.do_read(), main.CONNECTION_DONE)
            self.assertEqual((backend.delivered, client.written), ([], []))
            return
        self.assertIsNone(lane.do_read())
        expected = _reference_piece(data)
        if expected is None:
            self.assertEqual((backend.delivered, client.written), ([data], []), data)
        else:
            self.assertEqual((backend.delivered, client.written), ([], [expected]), data)
            self.assertEqual(usage.events, expected.count(b"\n\n"))
            start, end = cast(tuple[int, int], whole_chunk(data))
            self.assertEqual(lane.sent, end - start)

    @given(st.lists(_PIECE_PARTS, max_size=12))
    def test_as_the_functions_on_any_read(self, parts: list[bytes]) -> None:
        self.check(b"".join(parts))

    @given(st.lists(_PIECE_PARTS, min_size=1, max_size=10),
           st.sampled_from([b"", b"0", b"00"]), st.booleans())
    def test_as_the_functions_on_chunks(self, parts: list[bytes], zeros: bytes,
                                        upper: bool) -> None:
        payload = b"".join(parts) + b"\n\n"
        digits = zeros + (b"%X" if upper else b"%x") % len(payload)
        self.check(digits + b"\r\n" + payload + b"\r\n")

    def lane(self, backend: _StubSender, client: _StubSender,
             kind: type[StreamLane] = StreamLane) -> StreamLane:
        usage = UsageCollector(True)
        lane = kind(_StubRelay(usage), Clock(), _StubBackend(), backend,  # type: ignore[arg-type]
                          client, usage)
        lane._fd = 1  # (open, without a poll loop)
        return lane

    def test_a_piece_behind_held_writes_waits_with_them(self) -> None:
        """As ``write_through``: appended to what the client connection holds, and the lane
        closes (the rest of the stream goes the usual way)."""
        data = chunk(event("a"))
        backend, client = _StubSender(data), _StubSender()
        client.held.append(b"held")
        closed: list[bool] = []

        class Lane(StreamLane):
            __slots__ = ()

            def close(self) -> None:
                closed.append(True)

        lane = self.lane(backend, client, Lane)
        self.assertIsNone(lane.do_read())
        self.assertEqual((client.held, client.written, closed), ([b"held", data], [], [True]))

    def test_read_outcomes_are_receive_s(self) -> None:
        """``receive``'s answers when there is nothing to read or the connection is over."""
        from llamaproxy.fastpath.eager_write import EagerSender

        for error, expected in ((OSError(errno.EWOULDBLOCK, "would block"), None),
                                (OSError(errno.ECONNRESET, "reset"), main.CONNECTION_LOST)):
            backend, client = _StubSender(), _StubSender()

            def fail(size: int, error: OSError = error) -> bytes:
                raise error

            backend.connection.socket.recv = fail  # type: ignore[method-assign]
            self.assertIs(self.lane(backend, client).do_read(), expected)
            self.assertIs(EagerSender.receive(backend), expected)  # type: ignore[arg-type]
            self.assertEqual((backend.delivered, client.written), ([], []))

    def test_usual_pieces(self) -> None:
        for data in (chunk(event("a")), chunk(event("a"), b"0" + b"%x" % len(event("a"))),
                     chunk(b"\n\n"), b"1\r\n\n\r\n", chunk(USAGE), chunk(event("b") * 20),
                     chunk(event("c")) + chunk(event("d")), chunk(b"x" * 26 + b"\n\n")):
            self.check(data)
