"""Sending on a TCP connection when the reactor's read callback ends, not on its next turn.

A Twisted TCP transport buffers every ``write``: it asks the reactor to watch the socket for
writability (an ``epoll_ctl``), sends on the next turn of the loop, then stops watching (a second
``epoll_ctl``). For a proxy that forwards one small SSE event per ``write`` that is three system
calls and a loop turn where one ``send`` would do; the benchmark's profile put about a sixth of
the gateway's CPU under 500 streams in that dance.

``send_eagerly(transport, cork)`` changes one TCP connection so that (``cork``, one ``Cork`` per
process, is what the connections of one reactor share: the read callback's depth and the held
writes):

- a write made while the reactor is delivering data read from one of these connections (the
  ``doRead`` of the client's connection or of a backend connection, and everything it calls:
  request handling, relaying a backend's event) is held until that ``doRead`` returns, then sent
  with one ``send`` per connection: a response's headers and body, a request's head and body,
  leave together, as Twisted's buffered path would have sent them;
- a write made at any other time (a timer, a thread's result) is sent at once;
- ``EagerSender.write_through`` sends at once even inside a read callback, for a caller that
  knows it writes only once per read (a stream relay: one backend read, one client write), so
  there is nothing to gather and holding would only cost the wait;
- whatever the kernel does not take (a full socket buffer), and every case that is not the plain
  one (data already queued in Twisted's buffer, a closing connection, a pull producer that must be
  resumed after each flush, TLS started on the connection), goes through Twisted's own buffered
  path, in order, so backpressure, producers and error handling stay Twisted's.

Replaces: a TCP connection's ``write``, ``writeSequence``, ``doRead`` and ``connectionLost`` (per
instance). Assumes: ``Connection.doRead``/``_dataReceived``, ``FileDescriptor.write``/
``writeSequence``/``doWrite`` and ``Connection.connectionLost`` exactly as fingerprinted in
``llamaproxy.fastpath.contract``, and the private flags ``_aborting``, ``_tempDataBuffer``,
``_writeDisconnecting``, ``_writeDisconnected``. Gain: about a sixth of the gateway's CPU under
500 streams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet import main, tcp
from twisted.internet.tcp import EWOULDBLOCK
from twisted.logger import Logger
from twisted.python.failure import Failure

_TCP = (tcp.Server, tcp.Client)

log = Logger()


class Cork:
    """The connections with writes held until the outermost read callback returns.

    One per process in the gateway (made with the fast paths, shared by the client and backend
    connections of one reactor), passed to each ``send_eagerly``; no module state. A plain
    instance, not class attributes: assigning a class attribute (``depth``, twice per read)
    would invalidate the interpreter's attribute caches for that class.
    """

    __slots__ = ("after", "depth", "pending")

    def __init__(self) -> None:
        self.depth = 0
        self.pending: list[Callable[[], None]] = []
        #: Work to do once the held writes are sent (``after_sending``).
        self.after: list[Callable[[], None]] = []

    def after_sending(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the writes held by the current read callback have been sent.

        For bookkeeping that the client should not wait for (the access log line, metrics):
        inside a read callback of an eager connection it runs right after the flush; anywhere
        else, now.
        """
        if self.depth:
            self.after.append(callback)
        else:
            callback()

    def flush_pending(self) -> None:
        """Send every connection's held writes, then run the work waiting for them. One that
        fails is logged and the others still go out."""
        while self.pending or self.after:
            while self.pending:
                flushes, self.pending = self.pending, []
                for flush in flushes:
                    try:
                        flush()
                    except Exception:
                        log.failure("Unexpected error sending held writes")
            if self.after:
                work, self.after = self.after, []
                for callback in work:
                    try:
                        callback()
                    except Exception:
                        log.failure("Unexpected error after sending a response")


def send_eagerly(transport: object, cork: Cork) -> EagerSender | None:
    """Make ``transport`` send without the reactor's write registration; its sender, or None
    when it is not TCP (it is left as it was).

    A TLS connection's protocol is a TLS wrapper whose own transport is the TCP connection:
    that one is changed, so the encrypted bytes go out the same way.
    """
    if type(transport) not in _TCP:
        transport = getattr(transport, "transport", None)
        if type(transport) not in _TCP:
            return None
    connection: tcp.Connection = transport  # type: ignore[assignment]
    if connection.TLS:
        return None
    sender = EagerSender(connection, cork)
    connection.write = sender.write  # type: ignore[method-assign]
    connection.writeSequence = sender.write_sequence  # type: ignore[method-assign]
    connection.doRead = sender.do_read  # type: ignore[method-assign, assignment]
    connection.connectionLost = sender.connection_lost  # type: ignore[method-assign]
    return sender


class EagerSender:
    """One connection's eager write path (small: there is one per open connection)."""

    __slots__ = (
        "buffered_write", "buffered_write_sequence", "connection", "cork", "held", "lost"
    )

    def __init__(self, connection: tcp.Connection, cork: Cork) -> None:
        self.connection = connection
        self.cork = cork
        self.held: list[bytes] = []
        # Twisted's own methods, from the class (the instance's are replaced by ours).
        self.buffered_write = connection.write
        self.buffered_write_sequence = connection.writeSequence
        self.lost = connection.connectionLost

    def send_now(self, data: bytes) -> bool:
        """``send`` what the kernel takes; Twisted's buffered path gets the rest.

        True when the kernel took all of it at once (nothing waits in Twisted's buffer).
        """
        c = self.connection
        if c._aborting:
            return False  # abortConnection drops whatever was not sent yet, held writes too
        # Send directly only when nothing is queued in Twisted's buffer and nothing needs its
        # buffered path (closing, a pull producer to resume after each flush, TLS).
        if (
            not c.dataBuffer
            and not c._tempDataBuffer
            and c.connected
            and not c.disconnecting
            and not c._writeDisconnecting
            and not c._writeDisconnected
            and (c.producer is None or c.streamingProducer)
            and not c.TLS
        ):
            try:
                sent = c.socket.send(data)
            except OSError:
                # Would block, or the connection broke: Twisted's path meets the error on its
                # next send and closes the connection the way it always does.
                sent = 0
            if sent == len(data):
                return True
            data = data[sent:]
        self.buffered_write(data)
        return False

    def flush(self) -> None:
        """Send what was held during the read callback, as one piece (nothing when an earlier
        flush, e.g. before an empty or unusual write, already sent it)."""
        held = self.held
        if not held:
            return
        data = b"".join(held) if len(held) > 1 else held[0]
        held.clear()
        self.send_now(data)

    def write_through(self, data: bytes) -> bool:
        """Send ``data`` now, behind whatever this connection holds (then it waits with it).

        For a writer that makes one write per read callback: holding it until the callback
        returns would gather nothing. True when it all went to the kernel at once.
        """
        if self.held:
            self.held.append(data)
            return False
        return self.send_now(data)

    def write(self, data: bytes) -> None:
        """The transport's ``write``."""
        if type(data) is not bytes or not data:
            if self.held:
                self.flush()
            self.buffered_write(data)  # Twisted's type check, and nothing to do for b""
        elif self.held:
            self.held.append(data)
        elif self.cork.depth:
            self.held.append(data)
            self.cork.pending.append(self.flush)
        else:
            self.send_now(data)

    def write_sequence(self, iovec: Iterable[bytes]) -> None:
        """The transport's ``writeSequence``."""
        parts = list(iovec)
        for part in parts:
            if type(part) is not bytes:
                break
        else:
            self.write(b"".join(parts))  # (write ignores b"")
            return
        if self.held:
            self.flush()
        self.buffered_write_sequence(parts)  # raises Twisted's TypeError

    def connection_lost(self, reason: Failure) -> None:
        """The transport's ``connectionLost``: Twisted's, then the connection is plain again.

        (Our bound methods on the connection and the connection in ``self`` make a reference
        cycle; removing them lets reference counting free both at once, not the GC. Deleted as
        attributes: asking for the connection's ``__dict__`` would build one first.)
        """
        connection = self.connection
        del connection.write, connection.writeSequence, connection.doRead
        del connection.connectionLost
        self.lost(reason)

    def do_read(self) -> object:
        """The transport's ``doRead``: writes made while it runs leave when it returns.

        Twisted's ``Connection.doRead`` and ``_dataReceived``: ``receive``, then ``deliver``,
        in line (two Python calls fewer per read; a test holds it to them).
        """
        connection = self.connection
        try:
            data = connection.socket.recv(connection.bufferSize)
        except OSError as e:
            return None if e.args[0] == EWOULDBLOCK else main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        cork = self.cork
        cork.depth += 1
        try:
            connection.protocol.dataReceived(data)
        finally:
            cork.depth -= 1
            if not cork.depth and (cork.pending or cork.after):
                cork.flush_pending()
        return None

    def receive(self) -> bytes | object:
        """``recv`` what is there, as Twisted's ``doRead`` does: the bytes read; or what
        ``doRead`` returns when there are none (None: nothing to read now; else why the
        connection is over: an error, or the peer closed it)."""
        connection = self.connection
        try:
            data = connection.socket.recv(connection.bufferSize)
        except OSError as e:
            return None if e.args[0] == EWOULDBLOCK else main.CONNECTION_LOST
        return data if data else main.CONNECTION_DONE

    def deliver(self, data: bytes) -> None:
        """Give ``data``, read from the socket, to the protocol as ``do_read`` does (writes made
        meanwhile leave when it returns). For a read lane that read it and passes it on."""
        cork = self.cork
        cork.depth += 1
        try:
            self.connection.protocol.dataReceived(data)
        finally:
            cork.depth -= 1
            if not cork.depth and (cork.pending or cork.after):
                cork.flush_pending()
