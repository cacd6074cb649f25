"""The first_write fast path: the same bytes as ``server.Request.write`` for a gateway
response's first write, twisted.web's HEAD-from-GET included."""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaproxy.fastpath import first_write
from llamaproxy.gateway.site import GatewaySite
from llamaproxy.testing import InMemoryClient


class GetOnly(Resource):
    """A leaf that refuses HEAD, allowing GET: twisted.web fakes HEAD with GET
    (``_inFakeHead``)."""

    isLeaf = True

    def render_HEAD(self, request: Any) -> bytes:
        raise UnsupportedMethod((b"GET",))

    def render_GET(self, request: Any) -> bytes | int:
        if request.uri.startswith(b"/nocontent"):
            request.setResponseCode(204)
        if request.uri.startswith(b"/cookie"):
            request.addCookie(b"k", b"v")
        if request.uri.startswith(b"/etag"):
            request.setETag(b'"e"')
            request.setLastModified(1_000_000_000)
        if request.uri.startswith(b"/length"):
            request.setHeader(b"Content-Length", b"8")
            request.setHeader(b"Transfer-Encoding", b"identity")
        if request.uri.startswith(b"/writes"):
            request.write(b"written ")  # (while HEAD is faked: swallowed)
        if request.uri.startswith(b"/later"):
            request.write(b"then ")
            request.write(b"finished")
            request.finish()
            return NOT_DONE_YET
        return b"returned"


def _exchange(fast: bool, method: str, path: str, version: str = "1.1") -> bytes:
    site = GatewaySite(GetOnly(), reactor=Clock(), fast_headers=fast)  # type: ignore[arg-type]
    client = InMemoryClient(site)
    client.send(
        f"{method} {path} HTTP/{version}\r\nHost: h\r\nX-Request-ID: fixed\r\n\r\n".encode())
    return re.sub(rb"Date: [^\r]*\r\n", b"", client.written)


class FirstWriteTests(SynchronousTestCase):
    def test_the_site_switch(self) -> None:
        from twisted.web import server

        self.assertIs(GatewaySite(Resource(), fast_headers=False).first_write,
                      server.Request.write)
        self.assertIs(GatewaySite(Resource(), fast_headers=True).first_write, first_write.write)

    def test_the_same_bytes_as_server_request_write(self) -> None:
        paths = ("/returns", "/writes", "/later", "/nocontent", "/nocontent/writes", "/cookie",
                 "/etag", "/length", "/length/writes", "/length/later")
        cases = [(m, p) for m in ("GET", "POST") for p in paths]
        cases += [("HEAD", p) for p in ("/returns", "/writes", "/length", "/nocontent")]
        for method, path in cases:
            for version in ("1.1", "1.0"):
                with self.subTest(method=method, path=path, version=version):
                    stock = _exchange(False, method, path, version)
                    self.assertEqual(_exchange(True, method, path, version), stock)
                    self.assertTrue(stock.startswith(b"HTTP/1." + version[-1].encode() + b" "))
        self.assertNotIn(b"returned", _exchange(True, "HEAD", "/returns"))
        head = _exchange(True, "HEAD", "/writes")  # (the write under the faked HEAD: none)
        self.assertNotIn(b"written", head)
        self.assertIn(b"Content-Length: 8\r\n", head)
        self.assertIn(b"8\r\nwritten \r\n8\r\nreturned\r\n", _exchange(True, "GET", "/writes"))


class Logging(GatewaySite):
    """A site with a log of its own: its requests finish the stock way, which calls it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logged: list[Any] = []

    def log(self, request: Any) -> None:
        self.logged.append(request)


class FinishTests(SynchronousTestCase):
    def test_the_site_switch(self) -> None:
        from twisted.web import server

        self.assertIs(GatewaySite(Resource(), fast_headers=False).finish_request,
                      server.Request.finish)
        self.assertIs(GatewaySite(Resource(), fast_headers=True).finish_request,
                      first_write.finish)
        site = Logging(GetOnly(), reactor=Clock(), fast_headers=True)  # type: ignore[arg-type]
        self.assertIs(site.finish_request, server.Request.finish)
        client = InMemoryClient(site)
        client.send(b"GET /returns HTTP/1.1\r\nHost: h\r\n\r\n"
                    b"GET /later HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(len(site.logged), 2)

    def test_twice_and_after_a_lost_connection(self) -> None:
        from twisted.web import server
        from twisted.web.test.requesthelper import DummyChannel

        for finish in (server.Request.finish, first_write.finish):
            request = server.Request(DummyChannel())
            request.finished = 1
            finish(request)  # (twice: twisted.web's warning, nothing written)
            self.assertEqual([w["message"] for w in self.flushWarnings()],
                             ["Warning! request.finish called twice."])
            self.assertEqual(request.channel.transport.written.getvalue(), b"")
            request = server.Request(DummyChannel())
            request._disconnected = True
            self.assertRaises(RuntimeError, finish, request)
