"""The gateway and health ports on real sockets: framing, status lines, banners, slow clients.

Each test listens on 127.0.0.1 with the real reactor and talks raw bytes from a thread (a plain
blocking socket), the way the defects of issue 16 were observed: request smuggling through
``Transfer-Encoding``, chunk sizes held open, "429 Unknown Status", and the health port's
``TwistedWeb`` banner and unlimited uploads.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from llamaproxy.backends.admission import Admission
from llamaproxy.backends.backend import Backend, BackendState
from llamaproxy.gateway import errors
from llamaproxy.gateway.request import raw_response
from llamaproxy.gateway.site import RequestLimits
from llamaproxy.observability.health import HealthState, health_port_site
from tests.gateway.test_resource import KEY, GatewayFixture

AUTH = f"Authorization: Bearer {KEY}\r\n".encode()
CHAT = b'{"messages": [{"role": "user", "content": "hi"}]}'
#: How long a test waits for the server to answer and close (a bound, not a measurement: a
#: server that holds the connection makes the test fail instead of hang).
_WAIT = 10.0


@dataclass
class Wire:
    """What came back on one connection: the raw bytes, and whether the server closed it."""

    data: bytes
    closed: bool
    responses: list[tuple[bytes, dict[str, str], bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        rest = self.data
        while rest.startswith(b"HTTP/"):
            head, _, rest = rest.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.decode().strip().lower()] = value.decode("latin-1").strip()
            length = int(headers.get("content-length", "0"))
            body, rest = rest[:length], rest[length:]
            self.responses.append((lines[0], headers, body))

    @property
    def status_line(self) -> bytes:
        return self.responses[0][0]

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])

    @property
    def headers(self) -> dict[str, str]:
        return self.responses[0][1]

    def error(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.responses[0][2])["error"]
        return doc


def talk(port: int, chunks: list[bytes], pause: float = 0.0) -> Wire:
    """Send ``chunks`` (``pause`` seconds apart), then read until the server closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=_WAIT)
    received = b""
    closed = False
    try:
        for i, chunk in enumerate(chunks):
            if i and pause:
                time.sleep(pause)
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server closed already: read what it said
        deadline = time.monotonic() + _WAIT
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not piece:
                closed = True
                break
            received += piece
    finally:
        sock.close()
    return Wire(received, closed)


def talk_in_thread(port: int, chunks: list[bytes], pause: float = 0.0) -> Deferred[Wire]:
    return deferToThread(talk, port, chunks, pause)


class GatewayPortCase(TestCase):
    """A gateway (on an AgentSpy backend) listening on a real socket."""

    def setUp(self) -> None:
        self.gw = GatewayFixture(clock=reactor, body_limit=1024, client_timeout=_WAIT * 3)
        self.port = reactor.listenTCP(0, self.gw.site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)

    def send(self, *chunks: bytes) -> Deferred[Wire]:
        return talk_in_thread(self.port.getHost().port, list(chunks))


def _post_head(*headers: bytes) -> bytes:
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"".join(
        h + b"\r\n" for h in headers) + b"\r\n"


_MODELS = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n"


@dataclass(frozen=True)
class FramingCase:
    name: str
    raw: bytes
    status: int
    message: str  # a piece of the error message that says what was wrong


FRAMING_CASES = [
    FramingCase("identity then a pipelined GET",
                _post_head(b"Transfer-Encoding: identity") + _MODELS, 501,
                "Unsupported Transfer-Encoding 'identity'"),
    FramingCase("identity with Content-Length",
                _post_head(b"Transfer-Encoding: identity", b"Content-Length: 2") + b"{}", 400,
                "Content-Length and Transfer-Encoding together"),
    FramingCase("Content-Length then identity",
                _post_head(b"Content-Length: 2", b"Transfer-Encoding: identity") + b"{}", 400,
                "Content-Length and Transfer-Encoding together"),
    FramingCase("chunked with Content-Length",
                _post_head(b"Transfer-Encoding: chunked", b"Content-Length: 5")
                + b"0\r\n\r\n", 400, "Content-Length and Transfer-Encoding together"),
    FramingCase("chunked then a second identity header",
                _post_head(b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity")
                + b"2\r\n{}\r\n0\r\n\r\n" + _MODELS, 400, "Repeated Transfer-Encoding header"),
    FramingCase("chunked twice",
                _post_head(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")
                + b"2\r\n{}\r\n0\r\n\r\n", 400, "Repeated Transfer-Encoding header"),
    FramingCase("a list of codings",
                _post_head(b"Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n", 400,
                "lists several codings"),
    FramingCase("chunked, identity", _post_head(b"Transfer-Encoding: chunked, identity")
                + b"0\r\n\r\n", 400, "lists several codings"),
    FramingCase("gzip", _post_head(b"Transfer-Encoding: gzip") + b"xx", 501,
                "Unsupported Transfer-Encoding 'gzip'"),
    FramingCase("empty coding", _post_head(b"Transfer-Encoding: ") + b"{}", 400,
                "Empty Transfer-Encoding header"),
    FramingCase("oversized chunk size",
                _post_head(b"Transfer-Encoding: chunked") + b"ffffffffffffffff\r\nabc", 413,
                "Request body too large"),
    FramingCase("chunk sizes adding up over the limit",
                _post_head(b"Transfer-Encoding: chunked") + b"200\r\n" + b"x" * 512 + b"\r\n"
                + b"201\r\nabc", 413, "Request body too large"),
    FramingCase("malformed chunk size",
                _post_head(b"Transfer-Encoding: chunked") + b"zz\r\n{}\r\n0\r\n\r\n", 400,
                "Malformed chunk size line"),
    FramingCase("chunk without its CRLF",
                _post_head(b"Transfer-Encoding: chunked") + b"2\r\n{}XX0\r\n\r\n", 400,
                "Malformed chunked body"),
    FramingCase("malformed Content-Length",
                _post_head(b"Content-Length: 1e3") + b"{}", 400,
                "Malformed Content-Length header"),
    FramingCase("two Content-Lengths",
                _post_head(b"Content-Length: 2", b"Content-Length: 2") + b"{}" + _MODELS, 400,
                "Repeated Content-Length header"),
]


class FramingTests(GatewayPortCase):
    """Only one Content-Length or one ``Transfer-Encoding: chunked`` frames a request body."""

    def test_every_ambiguous_framing_is_refused_and_closes(self) -> Deferred[None]:
        async def run() -> None:
            for case in FRAMING_CASES:
                wire = await self.send(case.raw)
                self.assertEqual(len(wire.responses), 1, f"{case.name}: {wire.data!r}")
                self.assertEqual(wire.status, case.status, case.name)
                self.assertIn(case.message, wire.error()["message"], case.name)
                self.assertEqual(wire.headers["connection"], "close", case.name)
                self.assertTrue(wire.closed, case.name)
                # Nothing reached the backend: neither the body nor what followed it.
                self.assertEqual(self.gw.agent.requests, [], case.name)

        return Deferred.fromCoroutine(run())

    def test_single_chunked_body_is_accepted(self) -> Deferred[None]:
        async def run() -> None:
            sending = self.send(_post_head(b"Transfer-Encoding: chunked", b"Connection: close")
                                + b"%x\r\n%b\r\n0\r\n\r\n" % (len(CHAT), CHAT))
            while not self.gw.agent.requests:
                await _later(0.01)
            sent = self.gw.agent.requests[0]
            self.assertEqual(getattr(sent.body_producer, "in_memory", None), CHAT)
            sent.respond(200, b'{"ok": true}')
            wire = await sending
            self.assertEqual(wire.status_line, b"HTTP/1.1 200 OK")

        return Deferred.fromCoroutine(run())


def _later(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


class StatusLineTests(TestCase):
    """Every status the gateway sends has its RFC 9110 reason phrase on the wire."""

    def listen(self, **fixture: Any) -> tuple[GatewayFixture, int]:
        fixture.setdefault("body_limit", 1024)
        gw = GatewayFixture(clock=reactor, **fixture)
        port = reactor.listenTCP(0, gw.site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return gw, port.getHost().port

    def test_status_lines(self) -> Deferred[None]:
        from twisted.internet.error import ConnectionRefusedError

        from llamaproxy.auth.ratelimit import RateLimiter

        models = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Connection: close\r\n\r\n"

        async def run() -> None:
            _, port = self.listen(limiter=RateLimiter(reactor, 1))
            await talk_in_thread(port, [models])
            wire = await talk_in_thread(port, [models])
            self.assertEqual(wire.status_line, b"HTTP/1.1 429 Too Many Requests")

            _, port = self.listen(client_timeout=0.5)
            cases = [
                ([b"GET /ping HTTP/1.1\r\n" + b"X-H: 1\r\n" * 70 + b"\r\n"],
                 b"HTTP/1.1 431 Request Header Fields Too Large"),
                ([_post_head(b"Content-Length: 5000")], b"HTTP/1.1 413 Content Too Large"),
                ([b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"], b"HTTP/1.1 414 URI Too Long"),
                ([b"GET /ping HTTP/1.1\r\n"], b"HTTP/1.1 408 Request Timeout"),
                ([_post_head(b"Transfer-Encoding: br")], b"HTTP/1.1 501 Not Implemented"),
            ]
            for chunks, expected in cases:
                wire = await talk_in_thread(port, chunks)
                self.assertEqual(wire.status_line, expected)

            gw, port = self.listen()
            gw.agent.on_request = lambda r: r.fail(ConnectionRefusedError())
            wire = await talk_in_thread(port, [models])
            self.assertEqual(wire.status_line, b"HTTP/1.1 502 Bad Gateway")

            gw, port = self.listen(first_byte_timeout=0.2)
            gw.agent.on_request = None
            wire = await talk_in_thread(port, [models])
            self.assertEqual(wire.status_line, b"HTTP/1.1 504 Gateway Timeout")

            gw.backend.set_state(BackendState.STOPPED)
            wire = await talk_in_thread(port, [models])
            self.assertEqual(wire.status_line, b"HTTP/1.1 503 Service Unavailable")

        return Deferred.fromCoroutine(run())

    def test_reason_table(self) -> None:
        expected = {
            408: b"Request Timeout", 413: b"Content Too Large", 414: b"URI Too Long",
            429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
            501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
            504: b"Gateway Timeout",
        }
        for status, phrase in expected.items():
            self.assertEqual(errors.reason_phrase(status), phrase)
            error = errors.GatewayError(status, "m", "t", "c")
            line = b"HTTP/1.1 %d %b\r\n" % (status, phrase)
            self.assertTrue(raw_response(error).startswith(line))

    def test_options_star_has_no_twisted_banner(self) -> Deferred[None]:
        async def run() -> None:
            _, port = self.listen()
            wire = await talk_in_thread(port, [b"OPTIONS * HTTP/1.1\r\nHost: x\r\n"
                                               b"Connection: close\r\n\r\n"])
            self.assertEqual(wire.status_line, b"HTTP/1.1 200 OK")
            self.assertEqual(wire.headers["server"], "llamaproxy")
            self.assertNotIn(b"TwistedWeb", wire.data)
            wire = await talk_in_thread(port, [b"GET * HTTP/1.1\r\nHost: x\r\n\r\n"])
            self.assertEqual(wire.status, 405)
            self.assertEqual(wire.error()["code"], "method_not_allowed")
            self.assertNotIn(b"TwistedWeb", wire.data)

        return Deferred.fromCoroutine(run())


class HealthPortTests(TestCase):
    """PORT_HEALTH has the gateway's limits: no bodies, header timeouts, JSON errors, no banner."""

    def setUp(self) -> None:
        self.backend = Backend("llama-server", "http://127.0.0.1:1", model="tiny")
        self.backend.set_state(BackendState.READY)
        state = HealthState(self.backend, Admission(1, 0), reactor, True, lambda: False)
        site = health_port_site(state, RequestLimits(client_timeout=1.0), reactor)
        listening = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    def test_liveness_and_readiness(self) -> Deferred[None]:
        async def run() -> None:
            for path in (b"/", b"/anything", b"/readyz"):
                wire = await talk_in_thread(self.port, [
                    b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"])
                self.assertEqual(wire.status_line, b"HTTP/1.1 200 OK", path)
                self.assertEqual(wire.headers["server"], "llamaproxy")
                self.assertNotIn(b"TwistedWeb", wire.data)

        return Deferred.fromCoroutine(run())

    def test_uploads_are_refused_before_the_body(self) -> Deferred[None]:
        chunk = b"100000\r\n" + b"x" * 4096  # announces 1 MiB, sends 4 KiB of it
        async def run() -> None:
            wire = await talk_in_thread(self.port, [
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk])
            self.assertEqual(wire.status_line, b"HTTP/1.1 405 Method Not Allowed")
            self.assertEqual(wire.headers["content-type"], "application/json")
            self.assertEqual(wire.error()["code"], "method_not_allowed")
            self.assertTrue(wire.closed)
            wire = await talk_in_thread(self.port, [
                b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk])
            self.assertEqual(wire.status_line, b"HTTP/1.1 413 Content Too Large")
            self.assertTrue(wire.closed)
            wire = await talk_in_thread(self.port, [
                b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n" + b"x" * 4096])
            self.assertEqual(wire.status, 413)
            self.assertNotIn(b"TwistedWeb", wire.data)

        return Deferred.fromCoroutine(run())

    def test_header_tricklers_are_cut_at_the_header_timeout(self) -> Deferred[None]:
        head = [b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: "] + [b"a"] * 40  # 8 s at 0.2 s a byte

        async def run() -> None:
            wires = await gatherResults([
                deferToThread(talk, self.port, head, 0.2) for _ in range(10)])
            for wire in wires:
                self.assertEqual(wire.status_line, b"HTTP/1.1 408 Request Timeout")
                self.assertEqual(wire.error()["code"], "request_timeout")
                self.assertTrue(wire.closed)

        return Deferred.fromCoroutine(run())

    def test_malformed_request_gets_json(self) -> Deferred[None]:
        async def run() -> None:
            wire = await talk_in_thread(self.port, [b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"])
            self.assertEqual(wire.status, 400)
            self.assertEqual(wire.headers["content-type"], "application/json")
            wire = await talk_in_thread(self.port, [
                b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"])
            self.assertEqual(wire.status_line, b"HTTP/1.1 414 URI Too Long")

        return Deferred.fromCoroutine(run())
