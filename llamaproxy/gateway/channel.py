"""The gateway's HTTP/1.1 server connection: llhttp parses, twisted.web Requests answer.

``GatewayChannel`` is an ordinary ``twisted.internet.protocol.Protocol``: ``httptools``
(llhttp, the parser behind uvicorn) parses each request at C speed, and the channel hands it to
the site's twisted.web ``Request`` class (``GatewayRequest``) through the same public methods
twisted.web's own ``HTTPChannel`` offers a Request (``requestDone``, ``write``,
``writeHeaders``, ``registerProducer``, ``getPeer``...). It replaces twisted.web's
``HTTPChannel``, whose parsing errors (a bare ``400``, a silent close) and body framing could only
be refined through its private hooks; nothing here touches a private Twisted name, so both
``FAST_PATHS`` modes use it.

The gateway's rules, all answered with OpenAI-shaped JSON errors: request line (414), header
line, header count and head size (431), exactly one body framing (one ``Content-Length`` or one
``Transfer-Encoding: chunked``; anything else is 400 or 501 and closes: no request smuggling),
a chunk that *says* it is larger than the body limit (413 at its size line), and
``client_timeout`` seconds, from a request's first byte, for it to arrive completely (408).

llhttp is fed exactly one message at a time: the head up to its empty line, then the body by its
framing (the ``Content-Length``, or chunk by chunk: the channel reads each chunk's size line,
which llhttp does not expose), so a pipelined request or a body behind an unfinished early check
waits unparsed in the channel's buffer, as it did in twisted.web, and the transport stops reading
when that buffer passes 16 KiB. llhttp validates every byte it is given; the channel's own
reading of sizes only decides how much to give it next. A ``Content-Length`` body, in which
llhttp has nothing to check (it counts its bytes), goes to the request without it.

(Over 500 lines: it is one state machine, the connection, whose parts (feeding llhttp, its
callbacks, the producer sides, the one timer) share its state; split, one class would span
modules. The framing rules are apart, in ``gateway.framing``.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import httptools
from httptools import HttpParserError, HttpParserUpgrade
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from llamaproxy.fastpath.eager_write import Cork, EagerSender, send_eagerly
from llamaproxy.gateway import errors
from llamaproxy.gateway.cors import CorsPolicy
from llamaproxy.gateway.errors import GatewayError
from llamaproxy.gateway.framing import TRANSFER_ENCODING, framing_header, llhttp_refusal
from llamaproxy.gateway.limits import RequestLimits
from llamaproxy.gateway.request import raw_response

log = Logger()

_CONNECTION_DONE = Failure(ConnectionDone())

#: What the channel gives llhttp next (GatewayChannel._state).
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER = range(5)

#: What the connection's timer waits for (GatewayChannel._waiting_for); _STARTED: a request's
#: first byte came in the read being parsed, and its arrival timer is armed only if the request
#: is still incomplete once that read is parsed (most come whole in one read, and need none).
_NOTHING, _IDLE, _ARRIVAL, _STARTED = range(4)

#: Why reading from the transport is paused (bits of GatewayChannel._read_paused).
_WRITES_BLOCKED = 1  # the client does not read its responses (not while a request is handled)
_PIPELINED = 2  # over 16 KiB arrived while a request is being handled
_EARLY_CHECK = 4  # the request's body waits for an asynchronous early check

#: How much may arrive, unparsed, while a request is handled, before reading stops (as
#: twisted.web's HTTPChannel).
_PIPELINE_BUFFER = 0x4000

#: The longest chunk size line (size, extensions, CRLF) accepted.
_MAX_CHUNK_SIZE_LINE = 4096

_HTTP_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}

#: The headers the channel reads itself (their first value, lower-case name: what
#: ``getRawHeaders(name)[0]`` gives), noted as they are parsed rather than looked up after.
_NOTED = frozenset({
    b"content-length", b"transfer-encoding", b"connection", b"expect", b"cookie"})

#: The headers its request reads (their last value, lower-case name: what ``getHeader(name)``
#: gives), noted as they are parsed and handed to the request (``GatewayRequest.head_values``).
_HANDED_OVER = frozenset({b"authorization", b"x-api-key", b"x-request-id"})

_DEFAULT_LIMITS = RequestLimits()
_NO_CORS = CorsPolicy()


class _Refused(Exception):  # noqa: N818 - a signal, not an error
    """Raised from an llhttp callback to stop parsing once the request was refused."""


class GatewayChannel(Protocol):
    """One client connection: requests parsed by llhttp, one at a time, answered by the
    site's Request class; the gateway's limits, timeouts and JSON errors."""

    # Per open connection: slots keep its dict small.
    __slots__ = (
        "_abort_call", "_buffer", "_chunk_left", "_deadline", "_declared", "_framing",
        "_framing_error", "_head_fits", "_head_lines", "_head_seen", "_head_tail", "_header_count",
        "_headers",
        "_host", "_in_parse", "_line_length", "_method", "_noted", "_parser", "_peer",
        "_producer", "_read_paused", "_request", "_secure", "_state", "_stopped", "_url",
        "_version", "_waiting_for",
        "_writes_blocked", "callLater", "cork", "cors", "direct_client", "factory",
        "fill_headers", "limits", "persistent", "requestFactory", "request_received", "sender",
        "site",
    )

    #: Idle time allowed between requests (seconds; the site's ``timeOut`` replaces it).
    timeOut: int | None = 60 * 60 * 12
    #: Seconds after an idle timeout's graceful close before the connection is aborted.
    abortTimeout = 15

    def __init__(self) -> None:
        self.limits = _DEFAULT_LIMITS
        self.cors = _NO_CORS
        #: Set by the site (``Site.buildProtocol``).
        self.site: Any = None
        self.requestFactory: Any = None
        self.factory: Any = None
        self.callLater: Any = None
        #: The connection's eager sender (None when it is not plain TCP, e.g. TLS, or the
        #: eager-write fast path is off).
        self.sender: EagerSender | None = None
        #: The eager writes' shared state when that fast path is on (the site's), else None.
        self.cork: Cork | None = None
        #: Puts a head's header lines in its request's Headers when the fast paths are on
        #: (``llamaproxy.fastpath.header_fill.fill``); None: ``Headers.addRawHeader`` each.
        self.fill_headers: Callable[[Headers, list[tuple[bytes, bytes]]], None] | None = None
        #: Tells a request its body is in when the fast paths are on
        #: (``llamaproxy.fastpath.request_start.received``); None: its ``requestReceived``.
        self.request_received: Callable[[Any, bytes, bytes, bytes], None] | None = None
        #: Who the client is when no proxy is trusted (the same for every request on the
        #: connection: its peer, and TLS or not), kept by the first request that asked.
        self.direct_client: Any = None
        #: False once a request asked for the connection to end after its response.
        self.persistent = True
        self._parser: Any = None
        self._buffer = b""
        self._state = _HEAD
        #: The request being received or handled (one at a time).
        self._request: Any = None
        self._producer: Any = None
        self._read_paused = 0
        self._writes_blocked = False
        self._stopped = False
        self._in_parse = False
        #: The connection's one timer, for what it waits for (``_waiting_for``): the next
        #: request (idle, ``timeOut``: moved later after each response) or the rest of one
        #: (``client_timeout``: armed only for a request not all in after the read it began in).
        self._deadline: IDelayedCall | None = None
        self._waiting_for = _NOTHING
        self._abort_call: IDelayedCall | None = None
        self._host: Any = None
        self._peer: Any = None
        self._secure: bool | None = None
        self._reset_message()

    def _reset_message(self) -> None:
        """Forget the request being parsed (the next bytes start a new one)."""
        self._url = b""
        #: The request's method and HTTP version, noted once its head is in.
        self._method = b""
        self._version = b""
        #: The head's header lines as llhttp gave them (name, value), in order, until the
        #: request that gets them is made.
        self._headers: list[tuple[bytes, bytes]] = []
        #: The first value of each header the channel itself reads (_NOTED) and the last of
        #: each its request reads (_HANDED_OVER), by lower-case name.
        self._noted: dict[bytes, bytes] = {}
        self._framing = 0
        #: The error to answer once the head is in (None: no framing problem seen).
        self._framing_error: GatewayError | None = None
        self._head_lines = 0
        self._header_count = 0
        #: True while llhttp is given a whole head that is within the header line and count
        #: limits (checked at once: on_header need not check each line).
        self._head_fits = False
        self._head_seen = 0
        self._head_tail = b""
        self._line_length = 0
        self._chunk_left = 0
        self._declared = 0

    # -- the connection ----------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        if self.cork is not None:
            sender = send_eagerly(transport, self.cork)
            # Under TLS the sender is the TCP connection's, below the encryption: never ours
            # to write to.
            if sender is not None and sender.connection is transport:
                self.sender = sender
        if self.timeOut:
            self._expect(_IDLE, self.timeOut)
        transport.registerProducer(self, True)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._waiting_for = _NOTHING
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self._stopped = True
        self._buffer = b""
        # The parser holds this channel's callbacks: drop it, or the two form a cycle that
        # only a full collection frees (once a minute under the fast paths' GC schedule).
        self._parser = None
        request, self._request = self._request, None
        self._producer = None
        if request is not None:
            request.connectionLost(reason)

    def timeoutConnection(self) -> None:
        """Idle between requests for ``timeOut`` seconds: close, and abort if that hangs."""
        log.info("Timing out idle client: {peer}", peer=str(self.getPeer()))
        self.loseConnection()
        if self.abortTimeout is not None and self.callLater is not None:
            self._abort_call = self.callLater(self.abortTimeout, self._force_abort)

    def _force_abort(self) -> None:
        self._abort_call = None
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    # -- what a twisted.web Request uses -----------------------------------------------------

    def getPeer(self) -> Any:
        """The client's address, asked of the transport once per connection (it does not
        change; each asking builds a new address object)."""
        if self._peer is None:
            self._peer = self.transport.getPeer()  # type: ignore[union-attr]
        return self._peer

    def getHost(self) -> Any:
        """The local address, asked of the socket once per connection, not once per request."""
        if self._host is None:
            self._host = self.transport.getHost()  # type: ignore[union-attr]
        return self._host

    def isSecure(self) -> bool:
        """True when the connection is TLS (decided once per connection)."""
        if self._secure is None:
            self._secure = bool(ISSLTransport.providedBy(self.transport))
        return self._secure

    def write(self, data: bytes) -> None:
        """A piece of a response."""
        self.transport.write(data)  # type: ignore[union-attr]

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """Pieces of a response (twisted.web's chunked writes pass a tuple)."""
        self.transport.writeSequence(data)  # type: ignore[union-attr]

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        """A response's status line and headers, in one write (joined here: a transport's
        writeSequence checks each of the ~40 pieces in a Python loop)."""
        sequence = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            if len(values) == 1:  # (most fields: no loop over their values)
                sequence += (name, b": ", values[0], b"\r\n")
            else:
                for value in values:
                    sequence += (name, b": ", value, b"\r\n")
        sequence.append(b"\r\n")
        self.transport.write(b"".join(sequence))  # type: ignore[union-attr]

    def loseConnection(self) -> None:
        """Close once everything written is sent."""
        transport: Any = self.transport
        if transport is None:
            return
        self._stopped = True
        transport.unregisterProducer()
        transport.loseConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """A response's producer: paused while the client does not read."""
        if not streaming:
            raise ValueError("GatewayChannel takes push producers only")
        if self._producer is not None:
            raise RuntimeError(f"Producer {self._producer!r} was never unregistered")
        self._producer = producer
        if self._writes_blocked:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        """The response's producer is done."""
        self._producer = None

    def requestDone(self, request: Any) -> None:
        """The response to ``request`` is complete: read the next request, or close."""
        if request is not self._request:
            raise TypeError(f"{request!r} is not this channel's current request")
        self._request = None
        if not self.persistent:
            self.loseConnection()
            return
        if self._read_paused & _PIPELINED:
            self._resume_reading(_PIPELINED)
        if self.timeOut:
            self._expect(_IDLE, self.timeOut)
        if self._buffer and not self._stopped:
            self._parse()

    # -- the transport's producer (the client's read side of the connection) -------------

    def pauseProducing(self) -> None:
        """The client stopped reading: pause the response, and stop reading its requests
        (unless one is being handled: a client leaving must still be noticed)."""
        self._writes_blocked = True
        if self._producer is not None:
            self._producer.pauseProducing()
        if self._request is None:
            self._pause_reading(_WRITES_BLOCKED)

    def resumeProducing(self) -> None:
        """The client reads again."""
        self._writes_blocked = False
        if self._producer is not None:
            self._producer.resumeProducing()
        self._resume_reading(_WRITES_BLOCKED)

    def stopProducing(self) -> None:
        """The transport is going away."""
        if self._producer is not None:
            self._producer.stopProducing()

    def _pause_reading(self, why: int) -> None:
        if not self._read_paused:
            transport: Any = self.transport
            if transport is not None:
                transport.pauseProducing()
        self._read_paused |= why

    def _resume_reading(self, why: int) -> None:
        if self._read_paused & why:
            self._read_paused &= ~why
            if not self._read_paused:
                transport: Any = self.transport
                if transport is not None:
                    transport.resumeProducing()

    # -- what GatewayRequest uses ------------------------------------------------------------

    def request_target(self) -> tuple[bytes, bytes]:
        """The current request's method and target (its head is in)."""
        return self._method, self._url

    def pause_parsing(self) -> None:
        """Read no more of this request (its body) until ``resume_parsing``."""
        self._pause_reading(_EARLY_CHECK)

    def resume_parsing(self) -> None:
        """Go on reading the request after ``pause_parsing``."""
        self._resume_reading(_EARLY_CHECK)
        if self._buffer and not self._stopped:
            self._parse()

    # -- reading -------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        if self._waiting_for == _IDLE and self.limits.client_timeout <= 0 and self.timeOut:
            self._expect(_IDLE, self.timeOut)  # (no arrival timeout: any byte is activity)
        if self._buffer:
            self._buffer += data
        else:
            self._buffer = data
        if self._request is not None and self._state == _HEAD:
            self._bound_pipelined()  # a request is being handled: what follows waits
            return
        self._parse()

    def _bound_pipelined(self) -> None:
        """Stop reading once over 16 KiB wait behind the request being handled (as
        twisted.web's channel does: a client leaving must still be noticed before that)."""
        if len(self._buffer) > _PIPELINE_BUFFER:
            self._pause_reading(_PIPELINED)

    def _expect(self, what: int, seconds: float) -> None:
        """Wait ``seconds`` for ``what`` (_IDLE: a next request; _ARRIVAL: the rest of this
        one), on the connection's one timer."""
        self._waiting_for = what
        call = self._deadline
        if call is not None and call.active():
            if what != _ARRIVAL:
                call.reset(seconds)  # later: the reactor re-files it only once it comes due
                return
            # The arrival timeout is sooner than the idle one (seconds against hours): a reset
            # sooner makes the reactor search its whole timer heap for the call; a new call
            # costs a push.
            call.cancel()
            self._deadline = self.callLater(seconds, self._deadline_passed)
        elif self.callLater is not None:
            self._deadline = self.callLater(seconds, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline = None
        waited, self._waiting_for = self._waiting_for, _NOTHING
        if waited in (_ARRIVAL, _STARTED):
            self._reject(errors.request_timeout(self.limits.client_timeout))
        elif waited == _IDLE:
            self.timeoutConnection()

    def _parse(self) -> None:
        """Give llhttp what it may have next, one message at a time."""
        if self._in_parse:
            return  # (a callback finished a request or resumed: the running loop goes on)
        self._in_parse = True
        buffer = self._buffer
        view = memoryview(buffer)
        end = len(buffer)
        at = 0
        try:
            while at < end and not self._stopped and not self._read_paused & _EARLY_CHECK:
                state = self._state
                before = at
                if state == _HEAD:
                    if self._request is not None:
                        break  # the previous request is being handled: the next one waits
                    at = self._feed_head(buffer, view, at, end)
                elif state == _BODY:
                    take = min(self._chunk_left, end - at)
                    self._chunk_left -= take
                    self._take_body(buffer[at:at + take])
                    at += take
                elif state == _CHUNK_DATA:
                    take = min(self._chunk_left, end - at)
                    self._chunk_left -= take
                    if not self._chunk_left:
                        self._state = _CHUNK_SIZE
                    self._feed(view[at:at + take], "Malformed chunked body: ")
                    at += take
                elif state == _CHUNK_SIZE:
                    at = self._feed_chunk_size(buffer, view, at, end)
                else:
                    at = self._feed_trailer(buffer, view, at, end)
                if at < 0:
                    at = end  # (refused: nothing more is read)
                    break
                if at == before:
                    break  # (a line not complete yet: held for the next read)
        finally:
            view.release()
            self._in_parse = False
        if self._stopped:
            self._buffer = b""
        else:
            self._buffer = buffer[at:] if at else buffer
            if self._request is not None and self._state == _HEAD:
                self._bound_pipelined()
            if self._waiting_for == _STARTED:  # a request not all in yet: its time runs
                self._expect(_ARRIVAL, self.limits.client_timeout)

    def _new_parser(self) -> Any:
        """A parser for the next request (one per request, not per connection: a connection
        that waits, idle or queued, holds none)."""
        parser = httptools.HttpRequestParser(self)
        # The gateway's own framing rules (on_header) refuse everything these let through,
        # with its reasons and statuses: without them llhttp refuses first, with its own.
        parser.set_dangerous_leniencies(
            lenient_transfer_encoding=True, lenient_chunked_length=True)
        self._parser = parser
        return parser

    def _feed(self, piece: Any, what: str) -> None:
        """Give llhttp ``piece``; a refusal in its words (prefixed by ``what``) if it fails."""
        parser = self._parser
        if parser is None:
            parser = self._new_parser()
        try:
            parser.feed_data(piece)
        except HttpParserUpgrade:
            # "Connection: upgrade" (or CONNECT): llhttp stops after the message, which the
            # gateway answered as any other; the connection goes on with HTTP/1.1.
            pass
        except HttpParserError as e:
            if self._stopped:
                return  # refused from a callback (_Refused), already answered
            cause = e.__context__
            if cause is not None and not isinstance(cause, _Refused):
                self._callback_failed(Failure(cause))
                return
            reason = str(e)
            self._reject(llhttp_refusal(reason, self._framing) if not what
                         else errors.bad_request(what + reason))

    def _take_body(self, piece: bytes) -> None:
        """Give the request a piece of its Content-Length body, and complete it with the
        last: what llhttp would call back with (it only counts such a body's bytes, so it is
        not given them), and what ``_feed`` does when a callback fails."""
        try:
            request = self._request  # (on_body, one call less)
            if request is not None:
                request.handleContentChunk(piece)
                if self._stopped:
                    raise _Refused()
            if not self._chunk_left:
                self.on_message_complete()
        except Exception:
            if self._stopped:
                return  # refused from a callback (_Refused), already answered
            self._callback_failed(Failure())

    def _callback_failed(self, failure: Failure) -> None:
        """A callback handing the request its head or body raised: logged, answered 500."""
        log.failure("Error while reading a request", failure)
        self._reject(errors.internal_error())

    def _feed_head(self, buffer: bytes, view: Any, at: int, end: int) -> int:
        """Feed a request head up to its empty line (all of it when it is in); the new
        offset, or -1 if refused."""
        if self._waiting_for in (_NOTHING, _IDLE) and self.limits.client_timeout > 0:
            # A request's first byte: its time to arrive starts (the timer, if the read being
            # parsed does not bring all of it: see the end of _parse).
            self._waiting_for = _STARTED
        tail = self._head_tail
        found = -1
        if tail:  # the empty line may straddle two reads
            joined = tail + buffer[at:at + 3]
            index = joined.find(b"\r\n\r\n")
            if index >= 0:
                found = at + index + 4 - len(tail)
        if found < 0:
            index = buffer.find(b"\r\n\r\n", at)
            if index >= 0:
                found = index + 4
        if found < 0:
            if not self._head_within_limits(buffer, at, end):
                return -1
            self._head_tail = (tail + buffer[max(at, end - 3):end])[-3:]
            self._head_fits = False
            self._feed(view[at:end], "")
            return end
        self._head_tail = b""
        self._head_fits = self._head_seen == 0 and self._fits(buffer, at, found)
        self._feed(view[at:found], "")
        return found

    def _fits(self, buffer: bytes, at: int, end: int) -> bool:
        """Whether a whole head, ``buffer[at:end]``, has no header line over the limit (it is
        shorter than one) and no more header lines than allowed (its request line and empty
        line are two of its lines): what on_header checks for each of its lines."""
        limits = self.limits
        # A header's name and value, with its colon and line end, are bytes of the head after
        # its request line: len(name) + len(value) + 4 <= end - at + 3 <= max_header_line.
        return end - at + 3 <= limits.max_header_line and (
            buffer.count(b"\n", at, end) <= limits.max_headers + 2)

    def _head_within_limits(self, buffer: bytes, at: int, end: int) -> bool:
        """Check an incomplete head's lines as they arrive (a complete one is checked by
        the callbacks); False once it was refused."""
        limits = self.limits
        lines = buffer.count(b"\n", at, end)
        last = buffer.rfind(b"\n", at, end)
        if self._head_seen == 0:  # blank lines before a request are skipped, as llhttp does
            while buffer.startswith(b"\r\n", at):
                at += 2
                lines -= 1
        self._line_length = end - last - 1 if last >= 0 else self._line_length + end - at
        self._head_lines += lines
        self._head_seen += end - at
        line = self._line_length + 2
        if self._head_lines == 0:
            if line > limits.max_request_line:
                self._reject(errors.uri_too_long(limits.max_request_line))
                return False
        elif line > limits.max_header_line or self._head_lines > limits.max_headers + 1 or (
            self._head_seen > self._head_limit()
        ):
            self._reject(errors.headers_too_large())
            return False
        return True

    def _head_limit(self) -> int:
        limits = self.limits
        return limits.max_request_line + limits.max_headers * (limits.max_header_line + 2) + 2

    def _feed_chunk_size(self, buffer: bytes, view: Any, at: int, end: int) -> int:
        """Feed one chunk size line once it is in; refuse a body that says it is too large."""
        newline = buffer.find(b"\n", at, end)
        if newline < 0:
            if end - at > _MAX_CHUNK_SIZE_LINE:
                self._reject(errors.bad_request(
                    f"Malformed chunk size line: longer than {_MAX_CHUNK_SIZE_LINE} bytes"))
                return -1
            return at  # (held until its end arrives)
        line = buffer[at:newline + 1]
        self._feed(view[at:newline + 1], "Malformed chunk size line: ")
        if self._stopped:
            return -1
        try:
            size = int(line.split(b";", 1)[0].strip(b" \t\r\n"), 16)
        except ValueError:  # (llhttp took it: it cannot be, but never guess a size)
            self._reject(errors.bad_request("Malformed chunk size line"))
            return -1
        self._declared += size
        if self._declared > self.limits.max_body:
            self._reject(errors.payload_too_large(self.limits.max_body))
            return -1
        if size:
            self._state = _CHUNK_DATA
            self._chunk_left = size + 2  # (and the CRLF after the data)
        else:
            self._state = _TRAILER
        return newline + 1

    def _feed_trailer(self, buffer: bytes, view: Any, at: int, end: int) -> int:
        """Feed the trailer section (usually just its empty line) once it is all in."""
        if buffer.startswith(b"\r\n", at):
            found = at + 2
        else:
            index = buffer.find(b"\r\n\r\n", at, end)
            if index < 0:
                if end - at > self._head_limit():
                    self._reject(errors.headers_too_large())
                    return -1
                return at  # (held until its end arrives)
            found = index + 4
        self._feed(view[at:found], "Malformed chunked body: ")
        return -1 if self._stopped else found

    # -- llhttp's callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._request is not None:
            # Never parse a request while another is in: llhttp is given one message at a
            # time, so this means the channel misread a message's end. Refuse, never guess.
            self._reject(errors.bad_request("Malformed request framing"))
            raise _Refused()
        self._headers = []
        self._noted = {}

    def on_url(self, url: bytes) -> None:
        self._url += url
        limits = self.limits
        # The request line: method, space, target, space, HTTP/1.1, CRLF. (The method is kept
        # for on_headers_complete: llhttp builds it anew each time it is asked.)
        method = self._method = self._parser.get_method()
        if len(method) + len(self._url) + 12 > limits.max_request_line:
            self._reject(errors.uri_too_long(limits.max_request_line))
            raise _Refused()

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_fits:  # (a head in pieces, or a trailer: each line checked)
            limits = self.limits
            self._header_count += 1
            if len(name) + len(value) + 4 > limits.max_header_line or (
                self._header_count > limits.max_headers
            ):
                self._reject(errors.headers_too_large())
                raise _Refused()
        if value[-1:] in (b" ", b"\t"):
            value = value.rstrip(b" \t")
        self._headers.append((name, value))
        lowered = name.lower()
        if lowered in _NOTED:
            self._noted.setdefault(lowered, value)
            if lowered == b"content-length" or lowered == b"transfer-encoding":
                self._note_framing(lowered, value)
        elif lowered in _HANDED_OVER:
            self._noted[lowered] = value

    def _note_framing(self, name: bytes, value: bytes) -> None:
        """Remember the first framing problem of the request being parsed (both framings
        together is always the one said)."""
        self._framing, error, decisive = framing_header(self._framing, name, value)
        if error is not None and (decisive or self._framing_error is None):
            self._framing_error = error

    def on_headers_complete(self) -> None:
        # (a trailer's lines count on from the head's, and are checked each)
        self._header_count = len(self._headers)
        self._head_fits = False
        error = self._framing_error
        if error is not None:
            self._reject(error)
            raise _Refused()
        parser = self._parser
        version = _HTTP_VERSIONS.get(parser.get_http_version())
        if version is not None:
            if not self._method:  # (on_url keeps it: llhttp gives a URL before the headers)
                self._method = parser.get_method()
            self._version = version
        else:
            self._reject(errors.bad_request(
                f"Unsupported HTTP version {parser.get_http_version()!r}: HTTP/1.1 or 1.0"))
            raise _Refused()
        noted = self._noted
        chunked = bool(self._framing & TRANSFER_ENCODING)
        length: int | None = None
        if not chunked:
            # (digits only: framing_header refused any other first value)
            length = int(noted.get(b"content-length", b"0"))
        if (chunked or length) and parser.should_upgrade():
            # llhttp would skip the body of an upgrade request: never let it be read as the
            # next request.
            self._reject(errors.bad_request(
                "An Upgrade or CONNECT request with a body is not supported"))
            raise _Refused()
        request = self.requestFactory(self)
        request.head_values = noted
        headers = request.requestHeaders
        fill = self.fill_headers
        if fill is None:
            for name, value in self._headers:
                headers.addRawHeader(name, value)
        else:
            fill(headers, self._headers)
        self._headers = []
        self._request = request
        connection = noted.get(b"connection")
        if connection is None and version == b"HTTP/1.1":
            self.persistent = True  # (what _persistent says, without the call)
        else:
            self.persistent = self._persistent(connection, version, request)
        if b"cookie" in noted:  # (without one, parseCookies finds none)
            request.parseCookies()
        request.gotLength(length)
        if self._stopped:  # refused before its body (the request answered and closes)
            raise _Refused()
        if chunked:
            self._state = _CHUNK_SIZE
        elif length:
            self._state = _BODY
            self._chunk_left = length
        # (read from the request's headers: its early check may have removed it)
        expect = headers.getRawHeaders(b"expect") if b"expect" in noted else None
        if expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]

    @staticmethod
    def _persistent(connection: bytes | None, version: bytes, request: Any) -> bool:
        """Whether the connection may carry another request after this one (twisted.web's
        rule: HTTP/1.1 without ``Connection: close`` in its first Connection header; HTTP/1.0
        never)."""
        if version != b"HTTP/1.1":
            return False
        if connection is not None and b"close" in connection.lower().replace(b",", b" ").split():
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return True

    def on_body(self, body: bytes) -> None:
        request = self._request
        if request is not None:
            request.handleContentChunk(body)
            if self._stopped:
                raise _Refused()

    def on_message_complete(self) -> None:
        request = self._request
        if request is None or self._stopped:
            return
        self._waiting_for = _NOTHING  # (the timer fires for nothing, or is moved first)
        self._state = _HEAD
        method, url, version = self._method, self._url, self._version
        self._reset_message()
        # Dropped between requests: ~1 KiB (the parser, its C state, a bound method per
        # callback) per waiting connection, 10 000 queued requests' worth of 10 MB.
        self._parser = None
        received = self.request_received
        if received is None:
            request.requestReceived(method, url, version)
        else:
            received(request, method, url, version)

    # -- answering without a request -------------------------------------------------------

    def _reject(self, error: GatewayError) -> None:
        """Write ``error`` as the whole response, stop reading, and close once it is sent."""
        self._waiting_for = _NOTHING
        transport: Any = self.transport
        if self._stopped or transport is None or getattr(transport, "disconnecting", False):
            self._stopped = True
            return  # already answered (e.g. refused before its body) and closing
        self._stopped = True
        # The Origin is not known yet (or not trusted): CORS headers only in wildcard mode.
        transport.write(raw_response(error, self.cors.response_headers(None)))
        recorder = getattr(self.site, "recorder", None)
        if recorder is not None:
            recorder.refused(error, getattr(transport.getPeer(), "host", None))
        self.loseConnection()

