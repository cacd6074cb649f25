"""A stream's fast lane: one backend read, one client send, nothing in between.

Read after read, a streamed response is one whole chunk from the backend carrying whole SSE
events, relayed as one chunk to the client. Through the layers (the backend connection's
parser, the relay, the usage collector, the request, the client's sender) each such piece touches
a dozen Python objects, and with hundreds of streams open every stream's objects are cold in the
cache when its next event comes: the profile put ~8 µs of Python per event there, where a bare
relay needs ~1 (docs/performance.md).

``StreamLane`` is what the reactor's loop calls instead of the backend connection's ``doRead``
(a read lane, ``llamaproxy.fastpath.lean_poll``) while a relay streams. It reads, and when the
read is the usual piece it sends it to the client's socket itself; any other read goes the usual
way, as it would have without the lane. The usual piece is exactly one chunk, read at a chunk
boundary of a chunked body delivered to this relay, whose data is whole events (ending in a
blank line) without the usage or timings marks while the usage collector holds nothing, for a
client on plain TCP whose response is chunked. For it the lane does what the usual path does:
the same bytes out (the backend's framing when it is the gateway's own, lowercase hex without
leading zeros; framed anew otherwise), counted the same (kept in the lane and added to the
relay's and the request's counts when the lane closes, its events to the usage collector's),
the time of the last piece kept for the idle timeout.
Whatever the client's socket does not take goes to Twisted's buffer and the lane closes: the
rest of the stream goes the usual way, with its backpressure.

A relay opens its lane once its response head is out, and closes it when it pauses, stops or
ends (``StreamRelay``); without the lean poll loop (tests with a ``Clock``, other reactors,
``FAST_PATHS=off``) there is no lane and nothing changes.

Replaces: the backend connection's ``doRead`` and the layers above it, for the usual piece of a
stream. Assumes: the lean poll loop and eager writes (their contract), and the own backend
client's chunk state (``at_chunk_start``). Gain: 8.9 -> 5.3 µs of Python per event and 56 -> 51 %
of a core at 500 streams in an interleaved A/B (docs/performance.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import main
from twisted.internet.tcp import EWOULDBLOCK

from llamaproxy.fastpath import lean_poll
from llamaproxy.gateway.tokens import EVENT_END, TIMINGS_MARK, USAGE_MARK, UsageCollector

_HEX_DIGITS = b"0123456789abcdefABCDEF"

if TYPE_CHECKING:
    from llamaproxy.fastpath.eager_write import EagerSender


class StreamRelay(Protocol):
    """What the lane needs of the relay it serves (``llamaproxy.gateway.relay.StreamRelay``):
    the fast path never imports the gateway's relay."""

    request: Any
    transport: Any
    usage: UsageCollector | None
    bytes_sent: int


class StreamLane:
    """One relay's fast lane (see the module docstring)."""

    __slots__ = (
        "_backend", "_backend_connection", "_backend_sender", "_client_sender", "_fd",
        "_reactor", "_ready", "_relay", "_seconds", "_usage", "last_piece_at", "sent",
    )

    def __init__(
        self,
        relay: StreamRelay,
        reactor: Any,
        backend: Any,
        backend_sender: EagerSender,
        client_sender: EagerSender,
        usage: UsageCollector | None,
    ) -> None:
        self._relay = relay
        self._reactor = reactor
        self._backend = backend
        self._backend_sender = backend_sender
        self._backend_connection = backend_sender.connection
        self._client_sender = client_sender
        self._usage = usage
        self._seconds = reactor.seconds
        self._fd: int | None = None
        self._ready = True  # (open checked)
        #: Body bytes the lane sent (chunk data, as ``Request.sentLength`` counts them).
        self.sent = 0
        #: When the lane last sent a piece (``reactor.seconds()``), 0.0 before.
        self.last_piece_at = 0.0

    @staticmethod
    def possible(relay: StreamRelay, reactor: Any) -> bool:
        """Whether this relay can ever have a lane: the lean poll loop, plain TCP on both
        sides, a chunked response (asked once the response head is out)."""
        request = relay.request
        if not request.chunked:
            return False  # (first: a whole body, as most are, asks nothing more)
        backend = getattr(relay.transport, "connection", None)
        return (
            lean_poll.has_read_lanes(reactor)
            and getattr(request.channel, "sender", None) is not None
            and getattr(backend, "sender", None) is not None
        )

    @classmethod
    def open(cls, relay: StreamRelay, reactor: Any) -> StreamLane | None:
        """The relay's lane, reading its backend connection from now on, if ``possible`` and
        the relay is between pieces now; None otherwise."""
        request = relay.request
        if not request.startedWriting or request.finished or not cls.possible(relay, reactor):
            return None
        backend = relay.transport.connection
        if not _between_pieces(backend, relay, relay.usage):
            return None
        client_sender = request.channel.sender
        lane = cls(relay, reactor, backend, backend.sender, client_sender, relay.usage)
        lane._fd = lean_poll.add_read_lane(reactor, backend.sender.connection, lane)
        return lane if lane._fd is not None else None

    def close(self) -> None:
        """Stop: the backend connection is read the usual way again; the counts go to the
        relay and the request."""
        if self._fd is not None:
            lean_poll.remove_read_lane(self._reactor, self._fd, self)
            self._fd = None
        if self.sent:
            self._relay.bytes_sent += self.sent
            self._relay.request.sentLength += self.sent
            self.sent = 0

    @property
    def is_open(self) -> bool:
        """True until ``close``."""
        return self._fd is not None

    def do_read(self) -> object:
        """The backend connection's ``doRead`` while the lane is open.

        The usual piece is ``whole_chunk``'s one chunk, ending in a blank line, without
        ``carries_counts``' marks: those checks are made here in line, cheapest first (each
        ``bytes`` method call parses its arguments the slow way on Python 3.11: ~1 000
        instructions), and a test holds them to the functions'. The backend sender's
        ``receive`` and the client sender's ``write_through`` are in line too (a call each)."""
        connection = self._backend_connection
        try:  # (receive)
            data = connection.socket.recv(connection.bufferSize)
        except OSError as e:
            # nothing to read, or the connection is over: as doRead says it
            return None if e.args[0] == EWOULDBLOCK else main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        if self._ready and data[-4:] == b"\n\n\r\n":
            newline = data.find(b"\r\n", 0, 18)
            if newline > 0:
                digits = data[:newline]
                if not digits.strip(_HEX_DIGITS):
                    size = int(digits, 16)
                    start = newline + 2
                    if (
                        size
                        and len(data) == start + size + 2
                        and data.find(USAGE_MARK) == -1
                        and data.find(TIMINGS_MARK) == -1
                    ):
                        if digits[0] == 48 or digits.lower() != digits:  # (b"0"; not b"%x")
                            data = b"%x\r\n%b\r\n" % (size, data[start:-2])
                        self.sent += size
                        self.last_piece_at = self._seconds()
                        if self._usage is not None:
                            self._usage.events += data.count(EVENT_END)  # as the collector
                        client = self._client_sender
                        if client.held:  # (write_through)
                            client.held.append(data)
                            self.close()  # behind held writes: the usual way from now on
                        elif not client.send_now(data):
                            self.close()  # the rest waits in Twisted's buffer: the usual way now
                        return None
        self._backend_sender.deliver(data)
        # Only a read that went the usual way can move the backend connection off a chunk
        # boundary or leave the usage collector holding something: ask again now, not per piece.
        self._ready = _between_pieces(self._backend, self._relay, self._usage)
        return None


def _between_pieces(backend: Any, relay: StreamRelay, usage: UsageCollector | None) -> bool:
    """The backend connection is at a chunk boundary of this relay's body and the usage collector
    holds no partial event: a whole chunk of whole events read now is the next piece, as it is."""
    return (usage is None or (usage.streaming and not usage.held)) and bool(
        backend.at_chunk_start(relay)
    )
