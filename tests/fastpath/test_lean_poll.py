"""Tests for llamaproxy.fastpath.lean_poll: the epoll loop without callWithLogger, on real epoll."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.testing import MemoryReactor
from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.fastpath import lean_poll


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


class EpollCase(SynchronousTestCase):
    """A fresh epoll reactor (not the global one) and a socket pair for each test."""

    def setUp(self) -> None:
        self.reactor = EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.ends = socket.socketpair()
        for end in self.ends:
            self.addCleanup(end.close)


class LeanPollTests(EpollCase):
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


class Lane:
    """A read lane that reads its socket itself, or says the connection is over."""

    def __init__(self, sock: socket.socket, why: object = None) -> None:
        self.sock = sock
        self.why = why
        self.read: list[bytes] = []

    def do_read(self) -> object:
        self.read.append(self.sock.recv(100))
        return self.why


class ReadLaneTests(EpollCase):
    def test_a_lane_reads_instead_of_do_read_until_removed(self) -> None:
        lean_poll.install(self.reactor)
        self.assertTrue(lean_poll.has_read_lanes(self.reactor))
        reader, lane = Reader(self.ends[0]), Lane(self.ends[0])
        self.reactor.addReader(reader)  # type: ignore[arg-type]
        fd = lean_poll.add_read_lane(self.reactor, reader, lane)
        self.assertEqual(fd, self.ends[0].fileno())
        self.ends[1].send(b"one")
        self.reactor.doIteration(1)
        self.assertEqual((lane.read, reader.read), ([b"one"], []))
        assert fd is not None
        lean_poll.remove_read_lane(self.reactor, fd, Lane(self.ends[0]))  # not that one: stays
        self.ends[1].send(b"two")
        self.reactor.doIteration(1)
        self.assertEqual(lane.read, [b"one", b"two"])
        lean_poll.remove_read_lane(self.reactor, fd, lane)
        self.ends[1].send(b"three")
        self.reactor.doIteration(1)
        self.assertEqual((lane.read, reader.read), ([b"one", b"two"], [b"three"]))
        self.reactor.removeReader(reader)  # type: ignore[arg-type]

    def test_what_a_lane_returns_ends_the_connection(self) -> None:
        lean_poll.install(self.reactor)
        reader = Reader(self.ends[0])
        self.reactor.addReader(reader)  # type: ignore[arg-type]
        lean_poll.add_read_lane(self.reactor, reader, Lane(self.ends[0], why=CONNECTION_DONE))
        self.ends[1].send(b"last")
        self.reactor.doIteration(1)
        self.assertEqual(len(reader.lost), 1)
        self.assertNotIn(reader, self.reactor.getReaders())

    def test_a_lane_left_behind_never_reads_another_selectable(self) -> None:
        """The number is the same, the selectable is not (a closed connection's fd reused)."""
        lean_poll.install(self.reactor)
        old, lane = Reader(self.ends[0]), Lane(self.ends[0])
        self.reactor.addReader(old)  # type: ignore[arg-type]
        lean_poll.add_read_lane(self.reactor, old, lane)
        self.reactor.removeReader(old)  # type: ignore[arg-type]
        new = Reader(self.ends[0])
        self.reactor.addReader(new)  # type: ignore[arg-type]
        self.ends[1].send(b"for the new one")
        self.reactor.doIteration(1)
        self.assertEqual((lane.read, new.read), ([], [b"for the new one"]))
        self.reactor.removeReader(new)  # type: ignore[arg-type]

    def test_no_lanes_without_the_lean_loop(self) -> None:
        self.assertFalse(lean_poll.has_read_lanes(self.reactor))
        reader = Reader(self.ends[0])
        self.assertIsNone(lean_poll.add_read_lane(self.reactor, reader, Lane(self.ends[0])))
        lean_poll.remove_read_lane(self.reactor, 3, Lane(self.ends[0]))  # nothing to do
        lean_poll.install(self.reactor)
        reader.fileno = lambda: -1  # type: ignore[method-assign]
        self.assertIsNone(lean_poll.add_read_lane(self.reactor, reader, Lane(self.ends[0])))
