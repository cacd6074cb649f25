"""Tests for llamaproxy.lean_poll: the epoll loop without callWithLogger, on real epoll."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.testing import MemoryReactor
from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy import lean_poll


class Reader:
    """A selectable for one end of a socket pair; records reads, or raises when told."""

    def __init__(self, sock: socket.socket, explode: bool = False) -> None:
        self.sock = sock
        self.explode = explode
        self.read: list[bytes] = []
        self.lost: list[Any] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "Reader,test"

    def doRead(self) -> None:
        if self.explode:
            raise ZeroDivisionError("bug in a read handler")
        self.read.append(self.sock.recv(100))

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)


class LeanPollTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.ends = socket.socketpair()
        for end in self.ends:
            self.addCleanup(end.close)

    def test_installed_loop_delivers_reads(self) -> None:
        self.assertTrue(lean_poll.install(self.reactor))
        self.assertFalse(lean_poll.install(self.reactor))  # once is enough
        reader = Reader(self.ends[0])
        self.reactor.addReader(reader)  # type: ignore[arg-type]
        self.ends[1].send(b"hello")
        self.reactor.doIteration(1)
        self.assertEqual(reader.read, [b"hello"])
        self.reactor.doIteration(0)  # nothing ready: returns
        self.assertEqual(reader.read, [b"hello"])
        self.reactor.removeReader(reader)  # type: ignore[arg-type]

    def test_a_failing_handler_is_disconnected_and_logged(self) -> None:
        lean_poll.install(self.reactor)
        reader = Reader(self.ends[0], explode=True)
        self.reactor.addReader(reader)  # type: ignore[arg-type]
        self.ends[1].send(b"x")
        self.reactor.doIteration(1)
        # _doReadOrWrite's own handling: the error is logged and the selectable disconnected.
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(reader.lost), 1)
        self.assertNotIn(reader, self.reactor.getReaders())

    def test_an_escaping_error_is_logged_with_the_system(self) -> None:
        def broken(*args: Any) -> None:
            raise RuntimeError("escaped")

        self.reactor._disconnectSelectable = broken  # type: ignore[method-assign]
        lean_poll.install(self.reactor)
        reader = Reader(self.ends[0])
        self.reactor.addReader(reader)  # type: ignore[arg-type]
        seen: list[dict[str, Any]] = []
        log.addObserver(seen.append)
        self.addCleanup(log.removeObserver, seen.append)
        self.ends[1].close()  # readable, and the read says the connection is done
        reader.doRead = lambda: CONNECTION_DONE  # type: ignore[method-assign]
        self.reactor.doIteration(1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn("Reader,test", [e.get("system") for e in seen])
        self.reactor.removeReader(reader)  # type: ignore[arg-type]

    def test_writable_and_closed_sockets_take_twisted_s_path(self) -> None:
        lean_poll.install(self.reactor)
        writer = Reader(self.ends[0])
        wrote: list[bool] = []
        writer.doWrite = lambda: wrote.append(True)  # type: ignore[attr-defined]
        self.reactor.addWriter(writer)  # type: ignore[arg-type]
        self.reactor.doIteration(1)
        self.assertEqual(wrote, [True])
        self.reactor.removeWriter(writer)  # type: ignore[arg-type]
        gone = Reader(self.ends[0])
        self.reactor.addReader(gone)  # type: ignore[arg-type]
        gone.fileno = lambda: -1  # type: ignore[method-assign]
        self.ends[1].send(b"x")
        self.reactor.doIteration(1)
        self.assertEqual((gone.read, len(gone.lost)), ([], 1))  # never read: disconnected

    def test_other_reactors_are_left_alone(self) -> None:
        self.assertFalse(lean_poll.install(MemoryReactor()))

        class OwnLoop(EPollReactor):
            def doPoll(self, timeout: float | None) -> None:
                pass

        own = OwnLoop()
        self.addCleanup(own._poller.close)
        self.assertFalse(lean_poll.install(own))
