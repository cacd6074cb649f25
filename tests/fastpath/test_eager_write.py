"""Tests for llamaproxy.fastpath.eager_write over real loopback TCP connections."""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import main
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaproxy.fastpath.eager_write import Cork, send_eagerly

#: The cork the connections of these tests share (one per process in the gateway).
CORK = Cork()

reactor: Any = global_reactor


class Collector(Protocol):
    """Client side: everything received, and a Deferred for the close."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[None] = Deferred()
        self.wanted = 0
        self.enough: Deferred[bytes] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.enough is not None and len(self.received) >= self.wanted:
            enough, self.enough = self.enough, None
            enough.callback(self.received)

    def wait_for(self, size: int) -> Deferred[bytes]:
        self.wanted = size
        self.enough = Deferred()
        if len(self.received) >= size:
            enough, self.enough = self.enough, None
            enough.callback(self.received)
        return self.enough  # type: ignore[return-value]

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class Answering(Protocol):
    """Server side: made eager; on each request line, runs ``on_data`` in the read callback."""

    eager: Any = None

    def connectionMade(self) -> None:
        self.eager = send_eagerly(self.transport, CORK)
        self.factory.servers.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.factory.on_data(self, data)  # type: ignore[attr-defined]


def _peek(client: Collector) -> bytes:
    """What waits in the client's socket, unread (b"" for nothing)."""
    try:
        return client.transport.socket.recv(  # type: ignore[union-attr]
            100, socket.MSG_PEEK | socket.MSG_DONTWAIT
        )
    except BlockingIOError:
        return b""


class EagerWriteTests(TestCase):
    async def connect(self, on_data: Any) -> tuple[Answering, Collector]:
        factory = Factory.forProtocol(Answering)
        factory.servers = []  # type: ignore[attr-defined]
        factory.on_data = on_data  # type: ignore[attr-defined]
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = Collector()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(lambda: client)
        )
        self.addCleanup(lambda: client.transport.abortConnection())  # type: ignore[union-attr]
        while not factory.servers:  # type: ignore[attr-defined]
            await _turn()
        return factory.servers[0], client  # type: ignore[attr-defined]

    async def test_writes_in_a_read_callback_leave_together_in_order(self) -> None:
        def on_data(server: Answering, data: bytes) -> None:
            server.transport.write(b"head ")  # type: ignore[union-attr]
            server.transport.writeSequence([b"body ", b"", b"tail"])  # type: ignore[union-attr]
            # Held until the read callback returns: nothing sent, nothing registered.
            self.assertNotIn(server.transport, IReactorFDSet(reactor).getWriters())

        server, client = await self.connect(on_data)
        self.assertTrue(server.eager)
        client.transport.write(b"go")  # type: ignore[union-attr]
        self.assertEqual(await client.wait_for(14), b"head body tail")
        self.assertNotIn(server.transport, IReactorFDSet(reactor).getWriters())

    async def test_write_through_in_a_read_callback_is_sent_at_once(self) -> None:
        peeked: list[bytes] = []

        def on_data(server: Answering, data: bytes) -> None:
            server.eager.write_through(b"piece")  # type: ignore[union-attr]
            peeked.append(_peek(client))  # already in the client's socket

        _, client = await self.connect(on_data)
        client.transport.write(b"go")  # type: ignore[union-attr]
        self.assertEqual(await client.wait_for(5), b"piece")
        self.assertEqual(peeked, [b"piece"])

    async def test_write_through_waits_behind_held_writes(self) -> None:
        peeked: list[bytes] = []

        def on_data(server: Answering, data: bytes) -> None:
            server.transport.write(b"head ")  # type: ignore[union-attr]
            server.eager.write_through(b"body")  # type: ignore[union-attr]
            peeked.append(_peek(client))  # nothing yet: the head is held, so the body too

        _, client = await self.connect(on_data)
        client.transport.write(b"go")  # type: ignore[union-attr]
        self.assertEqual(await client.wait_for(9), b"head body")
        self.assertEqual(peeked, [b""])

    async def test_a_write_outside_a_read_callback_is_sent_at_once(self) -> None:
        server, client = await self.connect(lambda server, data: None)
        server.transport.write(b"now")  # type: ignore[union-attr]
        self.assertNotIn(server.transport, IReactorFDSet(reactor).getWriters())
        self.assertEqual(await client.wait_for(3), b"now")

    async def test_close_after_held_writes_sends_them_first(self) -> None:
        def on_data(server: Answering, data: bytes) -> None:
            server.transport.write(b"last words")  # type: ignore[union-attr]
            server.transport.loseConnection()  # type: ignore[union-attr]
            server.transport.write(b", really")  # type: ignore[union-attr]

        _, client = await self.connect(on_data)
        client.transport.write(b"bye")  # type: ignore[union-attr]
        await client.closed
        self.assertEqual(client.received, b"last words, really")

    async def test_abort_drops_held_writes(self) -> None:
        def on_data(server: Answering, data: bytes) -> None:
            server.transport.write(b"never sent")  # type: ignore[union-attr]
            server.transport.abortConnection()  # type: ignore[union-attr]

        _, client = await self.connect(on_data)
        client.transport.write(b"go")  # type: ignore[union-attr]
        await client.closed
        self.assertEqual(client.received, b"")

    async def test_what_the_kernel_refuses_goes_through_twisted_in_order(self) -> None:
        big = bytes(range(256)) * 40_000  # 10 MB: far more than a socket buffer
        server, client = await self.connect(lambda server, data: None)
        server.transport.write(big)  # type: ignore[union-attr]
        server.transport.write(b"END")  # type: ignore[union-attr]
        # The rest waits in Twisted's buffer, registered for writability as usual.
        self.assertIn(server.transport, IReactorFDSet(reactor).getWriters())
        self.assertEqual(await client.wait_for(len(big) + 3), big + b"END")

    async def test_read_outcomes_are_twisted_s(self) -> None:
        server, client = await self.connect(lambda server, data: None)
        transport: Any = server.transport
        transport.stopReading()  # only this test reads the server side from here on
        self.addCleanup(transport.abortConnection)
        self.assertIsNone(transport.doRead())  # nothing to read (EWOULDBLOCK): nothing to do
        sock = transport.socket
        transport.socket = _Failing(OSError(104, "Connection reset by peer"))
        self.assertIs(transport.doRead(), main.CONNECTION_LOST)
        transport.socket = sock
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed
        outcome = transport.doRead()
        while outcome is None:  # the FIN may take a turn to arrive
            await _turn()
            outcome = transport.doRead()
        self.assertIs(outcome, main.CONNECTION_DONE)

    async def test_wrong_types_still_raise(self) -> None:
        server, _ = await self.connect(lambda server, data: None)
        self.assertRaises(TypeError, server.transport.write, "text")  # type: ignore[union-attr]
        self.assertRaises(
            TypeError, server.transport.writeSequence, [b"ok", "text"]  # type: ignore[union-attr]
        )


    async def test_an_empty_write_after_a_held_one_flushes_once(self) -> None:
        """Issue 17.5: a held write, then an empty one (which flushes at once), left a queued
        flush of an empty list that raised IndexError in ``deliver``'s ``finally`` and left the
        other connections' held writes unsent."""

        def on_data(server: Answering, data: bytes) -> None:
            server.transport.write(b"first")  # type: ignore[union-attr]
            server.transport.write(b"")  # type: ignore[union-attr]
            other.transport.write(b"for the other")  # type: ignore[union-attr]

        _, client = await self.connect(on_data)
        other_server, other_client = await self.connect(on_data)
        other = other_server
        client.transport.write(b"go")  # type: ignore[union-attr]
        self.assertEqual(await client.wait_for(5), b"first")
        self.assertEqual(await other_client.wait_for(13), b"for the other")
        self.assertEqual(self.flushLoggedErrors(IndexError), [])

    test_an_empty_write_after_a_held_one_flushes_once.timeout = 10  # type: ignore[attr-defined]

    async def test_after_sending_runs_once_the_response_is_in_the_kernel(self) -> None:
        seen: list[bytes] = []

        def on_data(server: Answering, data: bytes) -> None:
            server.transport.write(b"answer")  # type: ignore[union-attr]
            CORK.after_sending(lambda: seen.append(peek(client)))
            CORK.after_sending(lambda: 1 / 0)  # logged, and the next one still runs
            CORK.after_sending(lambda: seen.append(b"after the error"))
            self.assertEqual(seen, [])

        _, client = await self.connect(on_data)
        client.transport.write(b"go")  # type: ignore[union-attr]
        self.assertEqual(await client.wait_for(6), b"answer")
        self.assertEqual(seen, [b"answer", b"after the error"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


def peek(client: Collector) -> bytes:
    """What the client's socket holds, without reading it."""
    sock = client.transport.socket  # type: ignore[union-attr]
    return bytes(sock.recv(100, socket.MSG_PEEK | socket.MSG_DONTWAIT))


class NotTCPTests(SynchronousTestCase):
    def test_after_sending_outside_a_read_callback_runs_now(self) -> None:
        seen: list[int] = []
        Cork().after_sending(lambda: seen.append(1))
        self.assertEqual(seen, [1])


    def test_other_transports_are_left_alone(self) -> None:
        transport = StringTransport()
        write = transport.write
        self.assertFalse(send_eagerly(transport, CORK))
        self.assertFalse(send_eagerly(None, CORK))
        self.assertEqual(transport.write, write)


def _turn() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(0, d.callback, None)
    return d


class _Failing:
    """A socket whose ``recv`` raises ``error``."""

    def __init__(self, error: OSError) -> None:
        self.error = error

    def recv(self, size: int) -> bytes:
        raise self.error


class _Reads:
    """A socket whose ``recv`` gives ``outcome`` (bytes, or raises the OSError)."""

    def __init__(self, outcome: bytes | OSError) -> None:
        self.outcome = outcome
        self.sizes: list[int] = []

    def recv(self, size: int) -> bytes:
        self.sizes.append(size)
        if isinstance(self.outcome, OSError):
            raise self.outcome
        return self.outcome


class _Seen(Protocol):
    """Records what it is given, the cork's depth meanwhile, and writes or raises."""

    def __init__(self, cork: Cork, raises: bool) -> None:
        self.cork = cork
        self.raises = raises
        self.seen: list[tuple[bytes, int]] = []

    def dataReceived(self, data: bytes) -> None:
        self.seen.append((data, self.cork.depth))
        self.cork.after_sending(lambda: self.seen.append((b"after", self.cork.depth)))
        if self.raises:
            raise ValueError("protocol error")


class DoReadInLineTests(SynchronousTestCase):
    """``EagerSender.do_read`` runs ``receive`` and ``deliver`` in line: the same outcome,
    the same delivery, cork depth and flush, for every kind of read."""

    def outcome(self, inline: bool, read: bytes | OSError, raises: bool) -> Any:
        from twisted.internet import tcp

        from llamaproxy.fastpath.eager_write import EagerSender

        cork = Cork()
        connection: Any = tcp.Connection.__new__(tcp.Connection)
        connection.socket = _Reads(read)
        connection.protocol = _Seen(cork, raises)
        sender = EagerSender(connection, cork)

        def reference() -> object:
            data = sender.receive()
            if not isinstance(data, bytes):
                return data
            sender.deliver(data)
            return None

        try:
            result: Any = (sender.do_read if inline else reference)()
        except ValueError as e:
            result = ("raised", str(e))
        return (result, connection.protocol.seen, cork.depth, cork.after,
                connection.socket.sizes)

    def test_same_as_receive_then_deliver(self) -> None:
        reads: list[bytes | OSError] = [
            b"data", b"", OSError(errno.EWOULDBLOCK, "would block"), OSError(104, "reset")]
        for read in reads:
            for raises in (False, True):
                self.assertEqual(self.outcome(True, read, raises),
                                 self.outcome(False, read, raises), (read, raises))
