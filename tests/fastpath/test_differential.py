"""The fast path's own backend client against Twisted's Agent: same bytes, same endings.

A raw-socket backend answers each request with a scripted response: a random status, a body of
random size framed by Content-Length, chunked (random chunk sizes, hex case) or by closing the
connection, written in random pieces, and sometimes cut short. ``BackendClient`` and
``twisted.web.client.Agent`` each fetch it, and must report the same status, the same body bytes
and the same kind of ending (clean, possible data loss, failed). Issue 17: the stock path is the
reference, the fast path must be observably identical to it.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, PotentialDataLoss, ResponseDone

from llamaproxy.backends import forward
from llamaproxy.fastpath.backend_client import BackendClient

CASES = 40


def scripted_response(rng: random.Random) -> tuple[bytes, list[int]]:
    """A response's bytes and where to split them; sometimes cut before the end."""
    status = rng.choice([200, 200, 201, 400, 404, 500, 503])
    body = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 17, 300, 5000])))
    framing = rng.choice(["length", "chunked", "close"])
    head = [f"HTTP/1.1 {status} Whatever".encode(), b"Content-Type: text/event-stream"]
    if framing == "length":
        head.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "chunked":
        head.append(b"Transfer-Encoding: chunked")
        payload, rest = b"", body
        while rest:
            size = rng.randint(1, max(1, len(rest)))
            piece, rest = rest[:size], rest[size:]
            size_line = (b"%x" % len(piece)) if rng.random() < 0.7 else (b"%X" % len(piece))
            payload += size_line + b"\r\n" + piece + b"\r\n"
        payload += b"0\r\n\r\n"
    else:
        head.append(b"Connection: close")
        payload = body
    raw = b"\r\n".join(head) + b"\r\n\r\n" + payload
    if framing != "close" and payload and rng.random() < 0.25:
        raw = raw[: len(raw) - rng.randint(1, len(payload))]  # the backend dies mid-body
    cuts = sorted(rng.randint(0, len(raw)) for _ in range(rng.randint(0, 4)))
    return raw, cuts


class Scripted(Protocol):
    """Answers the first request it reads with the factory's script, then closes."""

    def dataReceived(self, data: bytes) -> None:
        if getattr(self, "answered", False) or b"\r\n\r\n" not in data:
            return
        self.answered = True
        raw, cuts = self.factory.script  # type: ignore[attr-defined]
        previous = 0
        for cut in [*cuts, len(raw)]:
            if cut > previous:
                self.transport.write(raw[previous:cut])  # type: ignore[union-attr]
            previous = cut
        self.transport.loseConnection()  # type: ignore[union-attr]


class Collect(Protocol):
    def __init__(self) -> None:
        self.body = b""
        self.done: Deferred[str] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.body += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        if reason is None or reason.check(ResponseDone):
            self.done.callback("complete")
        elif reason.check(PotentialDataLoss):
            self.done.callback("possible data loss")
        else:
            self.done.callback("failed")


async def fetch(agent: Any, url: bytes) -> tuple[object, ...]:
    try:
        response = await agent.request(b"GET", url)
    except Exception as e:
        return ("no response", type(e).__name__)
    collect = Collect()
    response.deliverBody(collect)
    ending = await collect.done
    return (response.code, collect.body, ending)


class DifferentialTests(TestCase):
    async def test_same_answers_as_agent(self) -> None:
        rng = random.Random(20261202)
        factory = Factory.forProtocol(Scripted)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = b"http://127.0.0.1:%d/v1/chat/completions" % port.getHost().port
        own = BackendClient(reactor, forward.CachedEndpoints(reactor, 5), 4)
        pool = HTTPConnectionPool(reactor, persistent=False)
        stock = Agent(reactor, pool=pool)
        self.addCleanup(own.closeCachedConnections)
        self.addCleanup(pool.closeCachedConnections)
        endings = set()
        for case in range(CASES):
            factory.script = scripted_response(rng)  # type: ignore[attr-defined]
            expected = await fetch(stock, url)
            got = await fetch(own, url)
            script = factory.script  # type: ignore[attr-defined]
            self.assertEqual(got, expected, f"case {case}: {script!r}")
            endings.add(expected[-1])
        # The script reached every kind of ending (a test that cannot miss them all).
        self.assertEqual(endings, {"complete", "possible data loss", "failed"})
