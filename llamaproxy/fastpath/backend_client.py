"""A lean HTTP/1.1 client for talking to backends: an ``IAgent`` with its own keep-alive pool.

Twisted's ``Agent`` + ``HTTPConnectionPool`` cost about 40 % of the gateway's CPU per proxied
request (a Request, a Response state machine, a LineReceiver parser, a proxy producer and several
Deferreds per exchange). ``BackendClient`` does the same job for our backends (llama-server and
OpenAI-compatible upstreams) with a few Python calls per request and per body chunk:

- the URI is split once per request with one regular expression; what depends only on the
  scheme and authority (pool key, endpoint, ``Host`` line) is cached per prefix;
- a request whose body producer writes synchronously (``forward.BytesBody``) goes out in one
  ``transport.write``, head and body together;
- one protocol object per connection reads the responses: llhttp (``httptools``, the C parser
  behind uvicorn) parses each head and each chunked body (extensions, trailers); a
  Content-Length body is counted and a read-until-close one passed on as it comes; body pieces
  go straight to the protocol given to ``IResponse.deliverBody``.

It behaves like Agent where the gateway relies on it: the same exception types for connection,
transmission and response failures (so ``forward.not_processed`` and
``routing.is_retryable`` classify them the same way), ``ResponseDone`` / ``PotentialDataLoss`` /
``ResponseFailed`` endings for the body protocol, push-producer backpressure through the body
transport, and cancellation of a request that has no response yet (which aborts its connection).
Differences from Agent are listed in ``BackendClient``'s docstring.

Replaces: ``twisted.web.client.Agent`` + ``HTTPConnectionPool`` (the stock path's client).
Assumes: the private exception types of ``twisted.web._newclient`` and ``twisted.web.http`` it
raises (so that failures classify as Agent's do), the endpoint's ``_WrappingFactory`` attributes
it clears when a connection is lost (a cycle per closed connection otherwise), and how it fails
and cancels, which the client imitates when it dials a plain ``TCP4ClientEndpoint`` itself (with
the attributes that endpoint's ``connect`` passes to ``connectTCP``), ``Headers``'
field map (``_rawHeaders``: canonical name -> values), which it fills from llhttp's fields (llhttp
refuses a CR or LF in a value, so there is nothing for ``addRawHeader`` to clean; names spelled
through ``header_fill``), and the eager writes' contract (checked at startup by
``llamaproxy.fastpath.contract``). Gain: about 40 % of
the gateway's CPU per proxied request; ``tests/fastpath/test_differential.py`` holds it to
Agent's bytes and endings.

Over 500 lines because it is a whole HTTP/1.1 client (request writing, the body framings, the
pool, cancellation); the parsing itself is llhttp's since issue 18.
"""

from __future__ import annotations

import re
import select
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from errno import EALREADY, EINPROGRESS, EISCONN, EWOULDBLOCK
from os import strerror
from typing import Any, cast

import httptools
from httptools import HttpParserError
from twisted.internet import tcp
from twisted.internet.abstract import isIPAddress
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, _WrappingFactory
from twisted.internet.error import (
    ConnectBindError,
    ConnectingCancelledError,
    TimeoutError,
    getConnectError,
)
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IProducer,
    IProtocol,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (
    ExcessWrite,
    ParseError,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    WrongBodyLength,
)
from twisted.web.client import (
    URI,
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import _DataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IClientRequest,
    IResponse,
)
from zope.interface import implementer

from llamaproxy.fastpath.eager_write import Cork, EagerSender, send_eagerly
from llamaproxy.fastpath.header_fill import cached_name as _cached_name
from llamaproxy.fastpath.header_fill import spell_name as _spell_name

__all__ = ["MAX_HEAD_SIZE", "BackendClient"]

log = Logger()

#: Largest response head (status line and header block) accepted, in bytes.
MAX_HEAD_SIZE = 64 * 1024
#: Largest chunk-size line (with chunk extensions), in bytes: llhttp streams through a line of
#: any length, so the client counts the bytes of a read that moved the parser nowhere.
_MAX_CHUNK_LINE = 4096

#: ``scheme://authority`` then the request target; every byte printable ASCII (no spaces or
#: control characters: nothing that could split the request line).
_URI = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*://[!\"$-.0->@-~]*)([!-~]*)")
#: The end of a response head: an empty line (CRLF or a bare LF, as Twisted accepts). What
#: ``head_end`` finds (the reference: a test holds it to this pattern's ``search``).
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_HEX_DIGITS = b"0123456789abcdefABCDEF"
#: A method must be a token (RFC 9110 5.6.2); empty passes, as Twisted's check lets it.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
#: A Content-Length field line, for the rare head llhttp refuses over it (see ``_one_length``).
_LENGTH_LINE = re.compile(rb"(?im)^content-length:([^\r\n]*)\r?\n")

#: What llhttp accepts beyond its strict defaults, to match Twisted's client: bare-LF line ends
#: and Transfer-Encoding with Content-Length (chunked wins, and the connection is not reused; see
#: ``_start_response``) in a head that failed the strict parse; spaces after a chunk size always.
_LENIENT_HEAD = {"lenient_optional_cr_before_lf": True, "lenient_chunked_length": True}

_HTTP11 = (b"HTTP", 1, 1)
_HTTP10 = (b"HTTP", 1, 0)

#: Request header names (as ``Headers`` spells them) the client writes itself.
_OWN_REQUEST_HEADERS = frozenset({b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection"})
#: Response headers about the connection rather than the content: like Twisted's
#: ``HTTPParser.CONNECTION_CONTROL_HEADERS``, they are not put in ``IResponse.headers``.
_CONNECTION_CONTROL = frozenset({
    b"content-length", b"connection", b"keep-alive", b"te", b"trailers", b"transfer-encoding",
    b"upgrade", b"proxy-connection",
})
_NO_BODY_CODES = frozenset({204, 304})
_BODYLESS_METHODS_WITH_LENGTH = frozenset({b"POST", b"PUT"})

# Connection phases.
_IDLE = 0  # no exchange: new, or in the pool
_HEAD = 1  # request sent (or being sent), waiting for the response head
_LENGTH = 2  # reading a Content-Length body
_CHUNKED = 3  # reading a chunked body
_UNTIL_CLOSE = 4  # reading a body delimited by the end of the connection
_STOPPED = 5  # body abandoned (stopProducing, error): aborting, the body protocol told on close
_CLOSING = 6  # no exchange, the connection is being closed
_CLOSED = 7

#: Methods known to be tokens; any other is checked on each request (nothing is cached).
#: ``doConnect``'s "still connecting" results.
_IN_PROGRESS = frozenset({EWOULDBLOCK, EINPROGRESS, EALREADY})

_KNOWN_METHODS = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"})


def _ignore(_: object) -> None:
    return None


#: How every body that ended cleanly ends: one Failure for all, as Twisted's own
#: ``connectionDone`` is for every connection (body protocols only read it; Agent builds one
#: per response, a tenth of a response head's Python here).
_RESPONSE_DONE = Failure(ResponseDone("Response body fully received"))


def _host_value(scheme: bytes, host: bytes, port: int) -> bytes:
    """The ``Host`` header value, as Agent computes it (brackets for IPv6, port if not default)."""
    if b":" in host:
        host = b"[" + host + b"]"
    if (scheme, port) in ((b"http", 80), (b"https", 443)):
        return host
    return b"%b:%d" % (host, port)


def _tokens(values: list[bytes]) -> list[bytes]:
    """The lower-cased, comma-separated tokens of a list header."""
    return [t for t in (v.strip(b" \t").lower() for v in b",".join(values).split(b",")) if t]


def _content_length(values: list[bytes]) -> int:
    """The body length from Content-Length values; equal duplicates allowed (RFC 9110 8.6)."""
    lengths = set()
    for value in b",".join(values).split(b","):
        value = value.strip(b" \t")
        if not value.isdigit() or len(value) > 18:
            raise ParseError("invalid Content-Length", b",".join(values))
        lengths.add(int(value))
    if len(lengths) != 1:
        raise ParseError("conflicting Content-Length values", b",".join(values))
    return lengths.pop()


def _one_length(head: bytes) -> bytes:
    """``head`` with its Content-Length fields, if equal (``_content_length``), as one."""
    values = _LENGTH_LINE.findall(head)
    length = _content_length([value.strip(b" \t") for value in values])
    head = _LENGTH_LINE.sub(b"", head)
    status_end = head.index(b"\n") + 1
    return b"%bContent-Length: %d\r\n%b" % (head[:status_end], length, head[status_end:])


def head_end(data: bytes, start: int) -> tuple[int, int] | None:
    """Where ``_HEAD_END.search(data, start)`` matches, as (start, end); None where it does not.

    Two ``bytes.find`` within the head instead of the regular expression, whose optional
    ``\\r`` made it try a match at every byte of the head (~100 instructions a byte): the
    match's first LF is the first one followed by LF or CRLF, and a CR just before it (not
    before ``start``) is part of it.
    """
    crlf = data.find(b"\n\r\n", start)
    if crlf != -1:
        bare = data.find(b"\n\n", start, crlf + 1)  # (only one before it)
        if bare == -1:
            lf, end = crlf, crlf + 3
        else:
            lf, end = bare, bare + 2
    else:
        bare = data.find(b"\n\n", start)
        if bare == -1:
            return None
        lf, end = bare, bare + 2
    if lf > start and data[lf - 1] == 13:  # b"\r"
        return lf - 1, end
    return lf, end


def whole_chunk(data: bytes) -> tuple[int, int] | None:
    """Where the data of ``data`` is, as (start, end), when ``data`` is exactly one chunk of a
    chunked body with data (a size line without extensions, the data, CRLF); else None.

    A stream's usual read is one: the decoder (and a stream's read lane) pass it on without
    their general path.
    """
    newline = data.find(b"\r\n", 0, 18)
    if newline > 0:
        digits = data[:newline]
        if not digits.strip(_HEX_DIGITS):
            start = newline + 2
            end = start + int(digits, 16)
            if end > start and len(data) == end + 2 and data[-2:] == b"\r\n":  # (endswith: slower)
                return start, end
    return None


#: What ``IResponse.request`` is made of: method, absolute URI, path, header fields.
_Meta = tuple[bytes, bytes, bytes, Headers | Mapping[bytes, Sequence[bytes]]]


class _Target:
    """What depends only on a URI's scheme and authority, computed once per prefix."""

    __slots__ = ("dial", "endpoint", "factory", "host_line", "key")

    def __init__(
        self, key: tuple[bytes, bytes, int], endpoint: IStreamClientEndpoint,
        factory: _ConnectionFactory, host_line: bytes,
    ) -> None:
        self.key = key
        self.endpoint = endpoint
        self.factory = factory
        self.host_line = host_line
        #: For a plain ``TCP4ClientEndpoint``: what its ``connect`` passes to ``connectTCP``
        #: (reactor, host, port, timeout, bind address), for the client to dial it itself.
        self.dial: tuple[Any, str, int, float, Any] | None = None
        if type(endpoint) is TCP4ClientEndpoint:
            reactor = endpoint._reactor
            if _Dialer.fits(reactor, endpoint._host, endpoint._bindAddress):
                reactor = _Dialer(reactor)  # (its connectTCP: the reactor's, one turn sooner)
            self.dial = (
                reactor, endpoint._host, endpoint._port, endpoint._timeout,
                endpoint._bindAddress,
            )


class _Dialer:
    """``connectTCP`` of a POSIX reactor for one IPv4 address (no bind address), without the
    reactor turn Twisted waits before it starts connecting.

    Every stream opens a new backend connection (``Connection: close``). Twisted's
    ``connectTCP`` makes a ``tcp.Connector`` and ``connect``s it: its ``tcp.Client`` is made
    with a ``callLater(0)`` to a ``resolveAddress`` that wraps the (literal) address in a
    Deferred, whose callbacks set ``realAddress`` and call ``doConnect``, whose first call
    starts the non-blocking ``connect``. Here the same objects are made with the same
    attributes (the connector by its own constructor; the client as ``_BaseTCPClient`` and
    ``_finishInit`` make it for a literal IPv4 address), the connector's connect timeout is
    armed as ``connect`` arms it, the factory told ``startedConnecting``, then the ``connect``
    is started at once, as ``doConnect``'s first call does: no DelayedCall, no Deferred, and
    the backend gets the connection a reactor turn sooner. Whatever is not "in progress" (the
    kernel connected at once, refused at once, or no socket could be made) is left to Twisted's
    own code on the next turn, as before: ``doConnect`` when connected, ``failIfNotConnected``
    with the error ``doConnect`` or ``_BaseTCPClient`` would have made.

    Assumes: ``PosixReactorBase.connectTCP``, ``BaseConnector.connect``,
    ``tcp.Connector._makeTransport``, ``_BaseTCPClient.__init__``, ``_finishInit``,
    ``resolveAddress``, ``_setRealAddress`` and ``doConnect`` as fingerprinted in
    ``llamaproxy.fastpath.contract`` (a reactor with its own ``connectTCP`` is not dialled so).
    Gain: two DelayedCall-or-Deferred rounds per new backend connection.
    """

    __slots__ = ("reactor",)

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    @staticmethod
    def fits(reactor: Any, host: str, bind: object) -> bool:
        """Whether ``connectTCP(host, ...)`` on ``reactor`` may be made this way."""
        connect = getattr(type(reactor), "connectTCP", None)
        return (
            connect is PosixReactorBase.connectTCP
            and "connectTCP" not in vars(reactor)
            and bind is None
            and isinstance(host, str)
            and isIPAddress(host)
        )

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = 30.0,
        bindAddress: Any = None,  # noqa: N803
    ) -> tcp.Connector:
        """The reactor's ``connectTCP``: the connector, connecting (see the class)."""
        reactor = self.reactor
        connector = tcp.Connector(host, port, factory, timeout, bindAddress, reactor)
        # BaseConnector.connect (a new connector is "disconnected", its factory not started).
        connector.state = "connecting"
        if not connector.factoryStarted:
            factory.doStart()
            connector.factoryStarted = 1
        # tcp.Connector._makeTransport: tcp.Client(host, port, None, connector, reactor), which
        # for a literal IPv4 address and no bind address is this, up to _finishInit's callLater.
        client = tcp.Client.__new__(tcp.Client)
        client.connector = connector
        client.addr = (connector.host, connector.port)
        client._requiresResolution = False
        error: Exception | None = None
        try:
            skt = client.createInternetSocket()
        except OSError as se:
            error = ConnectBindError(se.args[0], se.args[1])
        else:
            tcp.Connection.__init__(client, skt, None, reactor)  # type: ignore[arg-type]
        connector.transport = client
        if connector.timeout is not None:
            connector.timeoutID = reactor.callLater(
                connector.timeout, client.failIfNotConnected, TimeoutError())
        factory.startedConnecting(connector)
        if error is not None:
            reactor.callLater(0, client.failIfNotConnected, error)
            return connector
        # resolveAddress -> _setRealAddress -> doConnect's first call (on a new socket, whose
        # SO_ERROR is 0): start connecting, and wait for the socket to say how it went.
        client.realAddress = client.addr
        client.doWrite = client.doConnect  # type: ignore[method-assign]
        client.doRead = client.doConnect  # type: ignore[method-assign]
        try:
            result = skt.connect_ex(client.realAddress)
        except OSError as se:
            result = se.args[0]
        if result in _IN_PROGRESS:
            client.startReading()
            client.startWriting()
        elif not result or result == EISCONN:
            reactor.callLater(0, client.doConnect)  # (connected: doConnect says so)
        else:
            reactor.callLater(
                0, client.failIfNotConnected, getConnectError((result, strerror(result))))
        return connector


@implementer(IClientRequest)
class _RequestInfo:
    """``IResponse.request``: the request a response answers (built only when asked for)."""

    __slots__ = ("absoluteURI", "headers", "method", "uri")
    persistent = True

    def __init__(
        self, method: bytes, uri: bytes, path: bytes,
        headers: Headers | Mapping[bytes, Sequence[bytes]],
    ) -> None:
        self.method = method
        self.absoluteURI = uri
        self.uri = path
        self.headers = headers if isinstance(headers, Headers) else Headers(headers)


@implementer(IPushProducer)
class _BodyTransport:
    """The transport a body protocol gets: pause, resume or stop reading the backend socket.

    It is detached (every call does nothing) once the body ended, since the connection may then
    serve another request.
    """

    __slots__ = ("_connection",)
    #: Like Twisted's ``TransportProxyProducer``: some protocols look at it.
    disconnecting = False

    def __init__(self, connection: _Connection | None) -> None:
        self._connection = connection

    @property
    def connection(self) -> _Connection | None:
        """The backend connection the body is read from (None once the body ended or was
        stopped): what a read lane reads (``llamaproxy.fastpath.stream_lane``)."""
        return self._connection

    def pauseProducing(self) -> None:
        connection = self._connection
        if connection is not None:
            connection.pause_body()

    def resumeProducing(self) -> None:
        connection = self._connection
        if connection is not None:
            connection.resume_body()

    def stopProducing(self) -> None:
        """Give up the body: the backend connection is aborted and never reused."""
        connection = self._connection
        if connection is not None:
            self._connection = None
            connection.stop_body()

    #: ``readBody`` and Agent-style callers abort through these.
    loseConnection = stopProducing
    abortConnection = stopProducing


@implementer(IResponse)
class _Response:
    """One response: head fields, and the body as it arrives (buffered until ``deliverBody``)."""

    __slots__ = (
        "_buffer", "_claimed", "_connection", "_end", "_meta", "_protocol", "_transport",
        "code", "headers", "length", "phrase", "previousResponse", "version",
    )

    def __init__(
        self, version: tuple[bytes, int, int], code: int, phrase: bytes, headers: Headers,
        length: int | object, meta: _Meta,
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self.previousResponse: IResponse | None = None
        self._meta = meta
        self._connection: _Connection | None = None
        self._protocol: IProtocol | None = None
        self._transport: _BodyTransport | None = None
        self._buffer: list[bytes] | None = []
        self._end: Failure | None = None
        self._claimed = False

    @property
    def request(self) -> IClientRequest:
        """The request this response answers."""
        return _RequestInfo(*self._meta)

    def setPreviousResponse(self, previousResponse: IResponse) -> None:  # noqa: N803
        self.previousResponse = previousResponse

    def deliverBody(self, protocol: IProtocol) -> None:
        """Connect ``protocol`` to the body: data so far, then the rest as it arrives.

        The protocol's transport is a push producer (pause, resume, stop reading the backend).
        It gets exactly one ``connectionLost``: ``ResponseDone``, ``PotentialDataLoss`` (the
        body ended with the connection) or ``ResponseFailed``.
        """
        if self._claimed:
            raise RuntimeError("Response already has a body protocol, cannot deliverBody again")
        self._claimed = True
        connection = self._connection
        transport = self._transport = _BodyTransport(connection)
        protocol.makeConnection(cast(ITransport, transport))
        buffered = self._buffer
        self._buffer = None
        if buffered:
            for data in buffered:
                protocol.dataReceived(data)
        end = self._end
        if end is not None:
            transport._connection = None
            protocol.connectionLost(end)
            return
        self._protocol = protocol
        if connection is not None and connection.response is self:
            connection.claim(protocol)

    def finish(self, reason: Failure) -> None:
        """The body ended (cleanly or not): tell the protocol, or keep it for ``deliverBody``."""
        self._connection = None
        transport = self._transport
        if transport is not None:
            transport._connection = None
        protocol = self._protocol
        if protocol is None:
            self._end = reason
            return
        self._protocol = None
        protocol.connectionLost(reason)


@implementer(IConsumer)
class _BodyWriter:
    """The consumer a request body producer writes to: length enforcement or chunked framing.

    While ``startProducing`` runs, writes are collected (``pending``, the request head first)
    so that a body produced at once leaves in the same ``transport.write`` as the head.
    """

    __slots__ = ("_chunked", "_connection", "_registered", "_remaining", "pending", "producer")

    def __init__(self, connection: _Connection, producer: IBodyProducer, head: bytes) -> None:
        self._connection: _Connection | None = connection
        self.producer = producer
        length = producer.length
        self._chunked = length is UNKNOWN_LENGTH
        self._remaining = 0 if self._chunked else cast(int, length)
        self._registered = False
        self.pending: list[bytes] | None = [head]

    def write(self, data: bytes) -> None:
        connection = self._connection
        if connection is None:
            raise ExcessWrite()
        if not data:
            return
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        else:
            remaining = self._remaining - len(data)
            if remaining < 0:
                connection.request_failed(
                    RequestGenerationFailed, Failure(WrongBodyLength("too many bytes written")),
                    stop_producer=True,
                )
                return
            self._remaining = remaining
        pending = self.pending
        if pending is not None:
            pending.append(data)
        else:
            connection.write(data)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """Nothing to do: the client registers the body producer with the socket itself."""

    def unregisterProducer(self) -> None:
        """Nothing to do (see ``registerProducer``)."""

    def watch(self, producing: Deferred[None]) -> None:
        """Follow the producer's Deferred; register it with the socket if it is not done yet."""
        producing.addCallbacks(self._produced, self._failed)
        connection = self._connection
        if connection is not None and not producing.called:
            connection.transport.registerProducer(self.producer, True)  # type: ignore[union-attr]
            self._registered = True

    def detach(self, stop_producer: bool) -> None:
        """Accept no more writes; unregister (and stop) the producer."""
        connection = self._connection
        self._connection = None
        self.pending = None
        if self._registered and connection is not None:
            self._registered = False
            connection.transport.unregisterProducer()  # type: ignore[union-attr]
        if stop_producer:
            # Best effort: the socket may have stopped it already, and some producers (a
            # FileBodyProducer's task) raise when stopped twice.
            with suppress(Exception):
                self.producer.stopProducing()

    def _produced(self, _: object) -> None:
        connection = self._connection
        if connection is None:
            return
        if self._chunked:
            connection.write(b"0\r\n\r\n")
            if self._connection is None:
                return
        elif self._remaining:
            connection.request_failed(
                RequestGenerationFailed, Failure(WrongBodyLength("too few bytes written")),
                stop_producer=False,
            )
            return
        self.detach(stop_producer=False)
        connection.request_written(self)

    def _failed(self, reason: Failure) -> None:
        connection = self._connection
        if connection is not None:
            connection.request_failed(RequestGenerationFailed, reason, stop_producer=False)


@implementer(IProtocol)
class _Connection:
    """One backend connection: writes requests, reads responses, goes back to the pool.

    A response head (found by its blank line) and a chunked body are parsed by llhttp
    (``httptools.HttpResponseParser``, a new one per head), which calls the ``on_*`` methods
    below; a Content-Length or read-until-close body is only counted or passed on.
    """

    __slots__ = (
        "_boundary", "_client", "_close_waiters", "_complete", "_consumer_paused", "_control",
        "_fields", "_got_bytes", "_head_buffer", "_headers", "_in_trailer", "_keep_alive",
        "_meta", "_method", "_parser", "_phase", "_phrase", "_pieces", "_poll", "_progress",
        "_protocol", "_remaining", "_stalled", "_trailer_size", "_unclaimed_call", "_waiting",
        "_writer", "dialing", "idle_since", "key", "response", "sender", "transport",
    )

    def __init__(self, client: BackendClient, key: tuple[bytes, bytes, int]) -> None:
        self._client = client
        self.key = key
        self.transport: ITransport | None = None
        #: The TCP connection's eager sender (None for TLS).
        self.sender: EagerSender | None = None
        self._phase = _IDLE
        self._waiting: Deferred[IResponse] | None = None
        self._writer: _BodyWriter | None = None
        self._method = b""
        self._meta: _Meta | None = None
        self._head_buffer = b""
        self._got_bytes = False
        self._keep_alive = True
        self.response: _Response | None = None
        self._protocol: IProtocol | None = None
        self._remaining = 0
        # What llhttp reports, head by head (``_start_response``) and read by read (``_chunked``).
        self._parser: Any = None
        self._headers = Headers()
        #: ``_headers``' own field map, which ``on_header`` fills.
        self._fields: dict[bytes, list[bytes]] = self._headers._rawHeaders
        self._phrase = b""
        #: The head's connection control fields (``_CONNECTION_CONTROL``), by lower-case name.
        self._control: dict[bytes, list[bytes]] = {}
        #: Chunk data of the read being parsed; None while a head is parsed.
        self._pieces: list[bytes] | None = None
        self._complete = False
        self._progress = False
        self._boundary = False
        self._in_trailer = False
        self._stalled = 0
        self._trailer_size = 0
        self._consumer_paused = False
        self._unclaimed_call: IDelayedCall | None = None
        #: When it went back to the pool (the reactor's clock); None while not in the pool.
        self.idle_since: float | None = None
        self._close_waiters: list[Deferred[None]] | None = None
        #: A poll set of this socket alone, for ``peer_closed`` (made on its first use).
        self._poll: Any = None
        #: The request that dialled this connection itself, told once it is made.
        self.dialing: _Connecting | None = None

    # -- IProtocol ---------------------------------------------------------------------------

    def makeConnection(self, transport: ITransport) -> None:
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        sender = send_eagerly(transport, self._client.cork)
        # Under TLS the sender is the TCP connection's, below the encryption: not ours to use.
        self.sender = sender if sender is not None and sender.connection is transport else None
        if self.sender is not None:
            wrapper = getattr(transport, "protocol", None)
            if getattr(wrapper, "_wrappedProtocol", None) is self:
                # The endpoint's wrapper only relays each call to us: take its place, one call
                # less per piece of every stream (plain TCP only; TLS keeps its wrapper).
                transport.protocol = self  # type: ignore[union-attr]
        dialing = self.dialing
        if dialing is not None:
            self.dialing = None
            dialing.connected(self)

    def logPrefix(self) -> str:
        return "BackendConnection"

    def at_chunk_start(self, protocol: IProtocol) -> bool:
        """True when this connection reads a chunked body for ``protocol`` and the next byte
        is a chunk's size line: a read that is exactly one chunk is then one piece of it, with
        nothing to change here (a read lane may pass it on itself)."""
        return self._phase == _CHUNKED and self._boundary and self._protocol is protocol

    def dataReceived(self, data: bytes) -> None:
        try:
            phase = self._phase
            if phase == _LENGTH:
                remaining = self._remaining
                if len(data) < remaining:
                    self._remaining = remaining - len(data)
                    protocol = self._protocol
                    if protocol is not None:
                        protocol.dataReceived(data)
                    else:
                        self._buffer(data)
                    return
                self._length_end(data, remaining)
            elif phase == _CHUNKED:
                self._chunked(data)
            elif phase == _HEAD:
                self._head(data)
            elif phase == _UNTIL_CLOSE:
                protocol = self._protocol
                if protocol is not None:
                    protocol.dataReceived(data)
                else:
                    self._buffer(data)
            elif phase == _IDLE:
                # Nothing was asked: a broken or confused server. Never reuse this connection.
                self._client.forget(self)
                self._phase = _CLOSING
                self.transport.abortConnection()  # type: ignore[union-attr]
        except Exception:
            self._internal_error(Failure())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        phase = self._phase
        self._phase = _CLOSED
        # A TCP client transport and its connector refer to each other for good: a reference
        # cycle per closed backend connection (every stream's, since streams go with
        # ``Connection: close``) that only a full collection frees, once a minute under
        # ``gc_schedule``. The connector has no more use for the transport once it is lost.
        # The endpoint's wrapping factory holds the connector and a Deferred whose canceller
        # is the factory's own method: two more cycles, cut the same way.
        # A connection the client dialled itself has its request as the connector's factory,
        # which refers to the connection: cut that too.
        connector = getattr(self.transport, "connector", None)
        if connector is not None:
            connector.transport = None
            wrapping = getattr(connector, "factory", None)
            if isinstance(wrapping, _WrappingFactory):
                wrapping._connector = None
                wrapping._onConnection = None  # type: ignore[assignment]
            elif type(wrapping) is _Connecting:
                wrapping.connection = None
        if self.idle_since is not None:
            self._client.forget(self)
        if self._unclaimed_call is not None:
            if self._unclaimed_call.active():
                self._unclaimed_call.cancel()
            self._unclaimed_call = None
        writer = self._writer
        if writer is not None:
            self._writer = None
            writer.detach(stop_producer=True)
        waiting = self._waiting
        if waiting is not None:
            self._waiting = None
            failure: Exception
            if writer is not None:
                failure = RequestTransmissionFailed([reason])
            elif self._got_bytes:
                failure = ResponseFailed([reason])
            else:
                failure = ResponseNeverReceived([reason])
            waiting.errback(Failure(failure))
        elif self.response is not None:
            if phase == _UNTIL_CLOSE:
                end = Failure(PotentialDataLoss())
            else:
                end = Failure(ResponseFailed([reason, Failure(_DataLoss())]))
            self._end_body(end, reusable=False)
        waiters = self._close_waiters
        if waiters is not None:
            self._close_waiters = None
            for waiter in waiters:
                waiter.callback(None)

    # -- sending -----------------------------------------------------------------------------

    def send(
        self, waiting: Deferred[IResponse], method: bytes, head: bytes,
        producer: IBodyProducer | None, keep_alive: bool, meta: _Meta,
    ) -> None:
        """Write one request; ``waiting`` fires with the response once its head arrived."""
        self._waiting = waiting
        self._method = method
        self._meta = meta
        self._phase = _HEAD
        self._head_buffer = b""
        self._got_bytes = False
        self._keep_alive = keep_alive
        self._consumer_paused = False
        if producer is None:
            self.write(head, whole=True)
            return
        in_memory = getattr(producer, "in_memory", None)
        if type(in_memory) is bytes and producer.length == len(in_memory):
            # A body already in memory (forward.BytesBody): one write, no producer protocol.
            self.write(head + in_memory, whole=True)
            return
        writer = self._writer = _BodyWriter(self, producer, head)
        try:
            producing = producer.startProducing(writer)
        except Exception:
            self.request_failed(RequestGenerationFailed, Failure(), stop_producer=False)
            return
        pending = writer.pending
        if pending is not None:  # (None: the writer failed already, too many bytes)
            writer.pending = None
            self.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if self._writer is writer:
            writer.watch(producing)
        else:
            producing.addErrback(_ignore)  # the request failed: what the producer says is moot

    def write(self, data: bytes, whole: bool = False) -> None:
        """Write request bytes; a transport that raises fails the request.

        A ``whole`` request (head and body in one piece) is the connection's one write in the
        read callback that makes it: on an eager connection it leaves at once
        (``EagerSender.write_through``), not held until that callback returns to gather nothing.
        """
        try:
            sender = self.sender
            if whole and sender is not None:
                sender.write_through(data)
            else:
                self.transport.write(data)  # type: ignore[union-attr]
        except Exception:
            self.request_failed(RequestTransmissionFailed, Failure(), stop_producer=True)

    def request_written(self, writer: _BodyWriter) -> None:
        """The producer finished the body."""
        if self._writer is writer:
            self._writer = None

    def request_failed(
        self, wrapper: Callable[[list[Failure]], Exception], reason: Failure, stop_producer: bool
    ) -> None:
        """Writing the request failed: fail the request (or the body) and abort the connection."""
        writer = self._writer
        if writer is not None:
            self._writer = None
            writer.detach(stop_producer)
        self._keep_alive = False
        waiting = self._waiting
        phase = self._phase
        if waiting is not None:
            self._waiting = None
            self._phase = _CLOSING
            self.transport.abortConnection()  # type: ignore[union-attr]
            waiting.errback(Failure(wrapper([reason])))
        elif phase in (_LENGTH, _CHUNKED, _UNTIL_CLOSE):
            self._phase = _STOPPED
            self.transport.abortConnection()  # type: ignore[union-attr]
        elif phase != _CLOSED and phase != _STOPPED:
            self._phase = _CLOSING
            self.transport.abortConnection()  # type: ignore[union-attr]

    def cancel(self, waiting: Deferred[IResponse]) -> None:
        """The request Deferred was cancelled before the response head: abort the connection.

        ``Deferred.cancel`` then fails it with ``CancelledError``.
        """
        if self._waiting is not waiting:
            return
        self._waiting = None
        self._keep_alive = False
        writer = self._writer
        if writer is not None:
            self._writer = None
            writer.detach(stop_producer=True)
        if self._phase != _CLOSED:
            self._phase = _CLOSING
            self.transport.abortConnection()  # type: ignore[union-attr]

    # -- the response head -------------------------------------------------------------------

    def _head(self, data: bytes) -> None:
        self._got_bytes = True
        buffered = self._head_buffer
        if buffered:
            start = len(buffered) - 3 if len(buffered) > 3 else 0
            data = buffered + data
            self._head_buffer = b""
        else:
            start = 0
        while True:
            span = head_end(data, start)
            if span is None:
                if len(data) > MAX_HEAD_SIZE:
                    raise ParseError("response head too long", data[:100])
                self._head_buffer = data
                return
            head_stop, end = span
            if head_stop > MAX_HEAD_SIZE:
                raise ParseError("response head too long", data[:100])
            rest = data[end:]
            if self._start_response(data[:end], rest):
                return
            if not rest:
                return
            data = rest  # an interim (1xx) response: the real one follows
            start = 0

    def _start_response(self, head: bytes, rest: bytes) -> bool:
        """Handle one head (its blank line included); False for an interim (1xx) response."""
        try:
            parser = self._parse_head(head, False)
        except HttpParserError:
            # Strict llhttp refused it. Parse it again with Twisted's tolerances; and llhttp
            # refuses any repeated Content-Length, where RFC 9110 8.6 (and Twisted) accept equal
            # ones: those are checked here and merged first. (Rare: a wrong head costs twice.)
            try:
                if _LENGTH_LINE.search(head):
                    head = _one_length(head)
                parser = self._parse_head(head, True)
            except HttpParserError as e:
                raise ParseError(f"invalid response head: {e}", head[:100]) from None
        version_text = parser.get_http_version()
        if version_text == "1.1":
            version = _HTTP11
        elif version_text == "1.0":
            version = _HTTP10
        else:
            raise ParseError("not an HTTP/1.x status line", head[:100])
        code = parser.get_status_code()
        if code < 200:
            return False  # (101 failed in llhttp already: it pauses on an upgrade)
        phrase = self._phrase
        headers = self._headers
        control = self._control
        lengths = control.get(b"content-length")
        codings = control.get(b"transfer-encoding")
        connection = control.get(b"connection")
        method = self._method
        if lengths is not None and method == b"HEAD":
            for value in lengths:
                headers.addRawHeader(b"Content-Length", value)

        keep_alive = self._keep_alive
        if connection is not None:
            tokens = _tokens(connection)
            if b"close" in tokens or (version is not _HTTP11 and b"keep-alive" not in tokens):
                keep_alive = False
        elif version is not _HTTP11:
            keep_alive = False

        phase = _IDLE
        length: int | object = 0
        if method == b"HEAD" or code in _NO_BODY_CODES:
            pass
        elif codings is not None:
            # RFC 9112 6.3: chunked last → chunked; otherwise the body lasts until the close.
            # Content-Length is ignored, and a message with both is not trusted for reuse.
            length = UNKNOWN_LENGTH
            phase = _CHUNKED if _tokens(codings)[-1:] == [b"chunked"] else _UNTIL_CLOSE
            if lengths is not None or version is not _HTTP11:
                keep_alive = False
        elif lengths is not None:
            # (llhttp let through one Content-Length of digits; more were merged into one)
            length = int(lengths[0])
            if length:
                phase = _LENGTH
        else:
            length = UNKNOWN_LENGTH
            phase = _UNTIL_CLOSE
        self._keep_alive = keep_alive
        assert self._meta is not None
        response = _Response(version, code, phrase, headers, length, self._meta)
        self._meta = None  # (the response keeps it; an idle connection should not)
        waiting = self._waiting
        self._waiting = None
        assert waiting is not None
        if phase == _IDLE:
            # No body: the connection is free before anyone sees the response (as in Agent).
            response._buffer = None
            response._end = _RESPONSE_DONE
            self.response = response
            self._end_body(response._end, reusable=not rest)
            waiting.callback(response)
            return True

        self.response = response
        response._connection = self
        self._phase = phase
        self._protocol = None
        if phase == _LENGTH:
            self._remaining = cast(int, length)
        elif phase == _CHUNKED:
            self._parser = parser  # it reads the chunks on from where the head ended
            parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
            self._boundary = True
            self._in_trailer = False
            self._stalled = 0
            self._trailer_size = 0
        waiting.callback(response)
        if self.response is not response or self._phase != phase:
            return True  # stopped, or already failed, from the callback
        if rest:
            remaining = self._remaining
            if phase == _LENGTH and len(rest) >= remaining:
                self._length_end(rest, remaining)  # (the usual answer: its whole body came too)
            else:
                self.dataReceived(rest)
        if self.response is response and response._protocol is None and self._phase < _STOPPED:
            self._await_claim()
        return True

    def _parse_head(self, head: bytes, lenient: bool) -> Any:
        """A new llhttp parser that has read ``head``; the fields are in ``_headers`` etc."""
        headers = self._headers = Headers()
        self._fields = headers._rawHeaders
        self._phrase = b""
        self._control = {}
        self._pieces = None
        self._complete = False
        parser = httptools.HttpResponseParser(self)
        if lenient:
            parser.set_dangerous_leniencies(**_LENIENT_HEAD)
        parser.feed_data(head)
        return parser

    # -- llhttp's callbacks (an exception in one fails ``feed_data``) ------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise ParseError("bytes after the response", b"")  # (stops llhttp: not reused)

    def on_status(self, status: bytes) -> None:
        self._phrase = status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._pieces is not None:  # a trailer field: ignored, as Twisted does
            self._progress = True
            self._trailer_size += len(name) + len(value) + 4
            if self._trailer_size > MAX_HEAD_SIZE:
                raise ParseError("trailer section too long", b"")
            return
        value = value.rstrip(b" \t")  # (llhttp strips the leading whitespace)
        lowered = name.lower()
        if lowered in _CONNECTION_CONTROL:
            self._control.setdefault(lowered, []).append(value)
            return
        # What ``addRawHeader`` stores, without its per-field work: the name spelled once per
        # name seen, the value as it is (llhttp refuses any CR or LF in a value: nothing for
        # ``Headers`` to clean; ``test_backend_parsing`` holds llhttp to that).
        canonical = _cached_name(name) or _spell_name(name)
        values = self._fields.get(canonical)
        if values is None:
            self._fields[canonical] = [value]
        else:
            values.append(value)

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)  # type: ignore[union-attr]  # (a head never has a body here)
        self._boundary = False
        self._in_trailer = False

    def on_chunk_header(self) -> None:
        self._progress = True
        self._boundary = False
        self._in_trailer = True  # until data comes: the last chunk's trailer section

    def on_chunk_complete(self) -> None:
        self._progress = True
        self._boundary = True
        self._in_trailer = False

    def on_message_complete(self) -> None:
        if self._pieces is not None:
            self._complete = True

    # -- the response body -------------------------------------------------------------------

    def _buffer(self, data: bytes) -> None:
        response = self.response
        assert response is not None and response._buffer is not None
        response._buffer.append(data)

    def _deliver(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(data)
        else:
            self._buffer(data)

    def _length_end(self, data: bytes, remaining: int) -> None:
        response = self.response
        if len(data) == remaining:
            rest = b""
        else:
            rest = data[remaining:]
            data = data[:remaining]
        self._remaining = 0
        if data:
            self._deliver(data)
            if self.response is not response or self._phase != _LENGTH:
                return
        self._end_body(_RESPONSE_DONE, reusable=not rest)

    def _chunked(self, data: bytes) -> None:
        if self._boundary:
            # The common case on a stream: ``data`` is exactly one whole chunk (size line, data,
            # CRLF), read at a chunk boundary. Deliver it without the parser, which is left at
            # a boundary as it was.
            # (``whole_chunk`` in line: a call and a tuple less per piece)
            newline = data.find(b"\r\n", 0, 18)
            if newline > 0:
                digits = data[:newline]
                if not digits.strip(_HEX_DIGITS):
                    start = newline + 2
                    end = start + int(digits, 16)
                    if end > start and len(data) == end + 2 and data[-2:] == b"\r\n":
                        protocol = self._protocol
                        if protocol is not None:
                            protocol.dataReceived(data[start:end])
                            return
        # Otherwise llhttp. The data of every chunk in this read is delivered as one piece, once
        # the read is parsed (or before the body ends or fails): the body protocol gets one call
        # per read, as on a stream, and writes once (see StreamRelay).
        response = self.response
        pieces: list[bytes] = []
        self._pieces = pieces
        self._progress = False
        error: HttpParserError | None = None
        try:
            self._parser.feed_data(data)
        except HttpParserError as e:
            error = e
        if pieces:
            self._deliver(pieces[0] if len(pieces) == 1 else b"".join(pieces))
            if self.response is not response or self._phase != _CHUNKED:
                return  # the body protocol stopped the body
        if self._complete:
            # (an error after the end: bytes nobody asked for followed it)
            self._end_body(_RESPONSE_DONE, reusable=error is None)
        elif error is not None:
            self._body_error(ParseError(f"invalid chunked body: {error}", data[:100]))
        elif self._progress or pieces:
            self._stalled = 0
            # At a boundary only if the read ended there: bytes after a chunk's end that moved
            # no callback are the start of a size line, which cannot end in LF.
            self._boundary = self._boundary and data[-1:] == b"\n"
        else:
            self._stalled += len(data)
            if self._stalled > (MAX_HEAD_SIZE if self._in_trailer else _MAX_CHUNK_LINE):
                self._body_error(ParseError("chunk line too long", data[:100]))
            else:
                self._boundary = False

    def _body_error(self, error: Exception) -> None:
        """A malformed body: fail it and abort the connection."""
        self._keep_alive = False
        self._phase = _CLOSING
        self.transport.abortConnection()  # type: ignore[union-attr]
        self._end_body(Failure(ResponseFailed([Failure(error), Failure(_DataLoss())])), False)

    def _end_body(self, reason: Failure, reusable: bool) -> None:
        """The body ended: free the connection (pool or close), then tell the body protocol."""
        response = self.response
        assert response is not None
        self.response = None
        self._protocol = None
        self._parser = None
        call = self._unclaimed_call
        if call is not None:
            self._unclaimed_call = None
            if call.active():
                call.cancel()
        phase = self._phase
        if reusable and self._keep_alive and self._writer is None and phase < _STOPPED:
            self._phase = _IDLE
            if self._consumer_paused or call is not None:
                self._consumer_paused = False
                cast(IPushProducer, self.transport).resumeProducing()
            self._client.put(self)
        elif phase < _STOPPED:
            self._phase = _CLOSING
            writer = self._writer
            if writer is not None:
                self._writer = None
                writer.detach(stop_producer=True)
            self.transport.loseConnection()  # type: ignore[union-attr]
        response.finish(reason)

    def _await_claim(self) -> None:
        """Nobody took the body yet: stop reading until someone does (or give up later)."""
        timeout = self._client.unclaimed_body_timeout
        self._unclaimed_call = self._client.reactor.callLater(timeout, self._unclaimed_expired)
        cast(IPushProducer, self.transport).pauseProducing()

    def _unclaimed_expired(self) -> None:
        self._unclaimed_call = None
        self.stop_body()

    def claim(self, protocol: IProtocol) -> None:
        """``deliverBody`` was called: deliver the rest as it arrives, reading again."""
        self._protocol = protocol
        call = self._unclaimed_call
        if call is not None:
            self._unclaimed_call = None
            if call.active():
                call.cancel()
            if not self._consumer_paused and self._phase < _STOPPED:
                cast(IPushProducer, self.transport).resumeProducing()

    def pause_body(self) -> None:
        """The body protocol's consumer is full: stop reading the backend."""
        if not self._consumer_paused and self.response is not None and self._phase < _STOPPED:
            self._consumer_paused = True
            cast(IPushProducer, self.transport).pauseProducing()

    def resume_body(self) -> None:
        """Read the backend again."""
        if self._consumer_paused:
            self._consumer_paused = False
            if self._unclaimed_call is None and self._phase < _STOPPED:
                cast(IPushProducer, self.transport).resumeProducing()

    def stop_body(self) -> None:
        """Abandon the body: abort the connection; the body protocol hears of it on close."""
        if self.response is None or self._phase >= _STOPPED:
            return
        self._phase = _STOPPED
        self._keep_alive = False
        call = self._unclaimed_call
        if call is not None:
            self._unclaimed_call = None
            if call.active():
                call.cancel()
        writer = self._writer
        if writer is not None:
            self._writer = None
            writer.detach(stop_producer=True)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _internal_error(self, failure: Failure) -> None:
        """An exception while handling received data: fail what is in progress, abort."""
        self._keep_alive = False
        waiting = self._waiting
        if waiting is not None:
            self._waiting = None
            self._phase = _CLOSING
            self.transport.abortConnection()  # type: ignore[union-attr]
            waiting.errback(Failure(ResponseFailed([failure])))
        elif self.response is not None and self._phase < _STOPPED:
            self._phase = _CLOSING
            self.transport.abortConnection()  # type: ignore[union-attr]
            self._end_body(Failure(ResponseFailed([failure, Failure(_DataLoss())])), False)
        else:
            log.failure("Error in a backend response's body protocol", failure=failure)

    # -- the pool ----------------------------------------------------------------------------

    def peer_closed(self) -> bool:
        """True when this idle connection is unusable: closed or reset by the backend, or with
        bytes nobody asked for waiting (asked of the socket without reading, plain TCP only).

        A zero-timeout poll of the socket alone: readable (an end of stream, a reset, stray
        bytes) or in error means unusable. It is a third of the cost of the ``recv(MSG_PEEK)``
        it replaces, whose every "still open" answer raised a BlockingIOError.
        """
        poll = self._poll
        if poll is None:
            if not isinstance(self.transport, tcp.Connection):  # (TLS: the bytes are records)
                return False
            poll = self._poll = select.poll()
            poll.register(self.transport.getHandle(), select.POLLIN)
        return bool(poll.poll(0))

    def close(self) -> Deferred[None]:
        """Close this idle connection; the Deferred fires once it is closed."""
        closed: Deferred[None] = Deferred()
        if self._phase == _CLOSED:
            closed.callback(None)
            return closed
        if self._close_waiters is None:
            self._close_waiters = []
        self._close_waiters.append(closed)
        if self._phase != _CLOSING:
            self._phase = _CLOSING
            self.transport.loseConnection()  # type: ignore[union-attr]
        return closed


class _ConnectionFactory(Factory):
    """Builds the connections of one pool key; quiet (no log line per connection)."""

    noisy = False

    def __init__(self, client: BackendClient, key: tuple[bytes, bytes, int]) -> None:
        self.client = client
        self.key = key

    def buildProtocol(self, addr: IAddress) -> _Connection:  # type: ignore[override]
        return _Connection(self.client, self.key)


class _Connecting(ClientFactory):
    """A request waiting for its new connection: what it sends once connected, and what its
    Deferred's canceller needs.

    Through an endpoint, ``connected`` and ``failed`` are the callbacks of its ``connect``.
    For a plain ``TCP4ClientEndpoint`` the client dials with ``connectTCP`` itself and this is
    the connector's factory, as the endpoint's wrapping factory would be (the same calls, the
    same failures, the same ``ConnectingCancelledError`` when cancelled), without that factory,
    its protocol wrapper and its Deferred: a stream's connection is a new one every time.
    """

    noisy = False

    def __init__(
        self, client: BackendClient, key: tuple[bytes, bytes, int], method: bytes, head: bytes,
        producer: IBodyProducer | None, keep_alive: bool, meta: _Meta,
    ) -> None:
        self.client = client
        self.key = key
        #: The request's Deferred (its canceller is ``cancel``) until it is sent or failed,
        #: then None: a Deferred and its canceller's object do not keep each other.
        self.waiting: Deferred[IResponse] | None = None
        #: What ``_Connection.send`` gets once connected (then None).
        self.request: tuple[bytes, bytes, IBodyProducer | None, bool, _Meta] | None = (
            method, head, producer, keep_alive, meta)
        #: The endpoint's Deferred, or the connector, while connecting.
        self.connecting: Deferred[Any] | None = None
        self.connector: Any = None
        self.connection: _Connection | None = None

    def cancel(self, waiting: Deferred[IResponse]) -> None:
        if self.connection is not None:
            self.connection.cancel(waiting)
        elif self.connecting is not None:
            self.connecting.cancel()
        elif self.connector is not None:
            # What the endpoint's wrapping factory does when its Deferred is cancelled.
            connector = self.connector
            self.connector = self.waiting = self.request = None
            waiting.errback(ConnectingCancelledError(connector.getDestination()))
            connector.stopConnecting()

    def connected(self, connection: _Connection) -> None:
        waiting, request = self.waiting, self.request
        self.connecting = self.connector = self.waiting = self.request = None
        if waiting is None or waiting.called:
            # Cancelled meanwhile, the endpoint could not stop: keep the connection.
            self.client.put(connection)
            return
        self.connection = connection
        connection.send(waiting, *request)  # type: ignore[misc]

    def failed(self, reason: Failure) -> None:
        waiting = self.waiting
        self.connecting = self.connector = self.waiting = self.request = None
        if waiting is not None and not waiting.called:
            waiting.errback(reason)

    # -- as the connector's factory ---------------------------------------------------------

    def startedConnecting(self, connector: Any) -> None:
        self.connector = connector

    def buildProtocol(self, addr: IAddress) -> _Connection:  # type: ignore[override]
        connection = _Connection(self.client, self.key)
        connection.dialing = self  # (its connectionMade calls connected)
        return connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.failed(reason)


class HeadLines(Mapping[bytes, Sequence[bytes]]):
    """Request header fields already written as the head's lines: what ``request_fields``
    writes for them, in one piece (``forward.request_head`` builds both in one pass).

    ``lines``: each field as ``Name: value\\r\\n``, in order (canonical names, values without
    line breaks, no Host, Content-Length or Transfer-Encoding field, a name's values on
    consecutive lines); ``connection``: the values of its Connection field, if any (a ``close``
    there: the connection is not reused). As a mapping (``IResponse.request``'s headers,
    rarely read) it is the fields the lines hold, read back from them when first asked.
    """

    __slots__ = ("_fields", "connection", "lines")

    def __init__(self, lines: bytes, connection: Sequence[bytes] = ()) -> None:
        self.lines = lines
        self.connection = connection
        self._fields: dict[bytes, list[bytes]] | None = None

    def _read(self) -> dict[bytes, list[bytes]]:
        fields = self._fields
        if fields is None:
            fields = {}
            for line in self.lines.split(b"\r\n")[:-1]:
                name, _, value = line.partition(b": ")
                fields.setdefault(name, []).append(value)
            self._fields = fields
        return fields

    def __getitem__(self, name: bytes) -> Sequence[bytes]:
        return self._read()[name]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())


@implementer(IAgent)
class BackendClient:
    """An ``IAgent`` for backends: HTTP/1.1 over its own keep-alive connection pool.

    ``endpoints`` gives the client endpoint for a URI (``forward.CachedEndpoints``). Idle
    connections are kept per (scheme, host, port), at most ``max_idle_per_host`` of them, each
    closed after ``idle_timeout`` seconds unused; the most recently used is reused first. A
    connection goes back to the pool only when its response ended cleanly with known framing,
    without ``Connection: close``, its request was fully written and its body was not stopped.

    A response whose ``deliverBody`` is not called at once stops the backend socket from being
    read (as Agent does); if nobody calls it within ``unclaimed_body_timeout`` seconds, the
    connection is aborted and a later ``deliverBody`` gets what was read, then a failure.

    Known differences from Agent: cancelling a request before its response head fails it with
    ``CancelledError`` itself (Agent: ``ResponseNeverReceived([CancelledError])``, which
    ``Deferred.addTimeout`` does not turn into a ``TimeoutError``); a response head that arrives
    while a streamed request body is still being written fires the request at once (and the
    connection is not reused); a body abandoned with ``stopProducing`` ends with
    ``ResponseFailed`` even when it was read-until-close; HTTP/1.0 responses without
    ``Connection: keep-alive``, responses with both Transfer-Encoding and Content-Length, and
    connections with bytes left after a response are never reused; no automatic retry of
    idempotent requests (the gateway's pool had it off too).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoints: IAgentEndpointFactory,
        max_idle_per_host: int,
        idle_timeout: float = 4.0,
        unclaimed_body_timeout: float = 60.0,
        cork: Cork | None = None,
    ) -> None:
        self.reactor = reactor
        #: The eager writes' shared state (the same as the gateway's client connections').
        self.cork = cork if cork is not None else Cork()
        self.endpoints = endpoints
        self.max_idle_per_host = max_idle_per_host
        self.idle_timeout = idle_timeout
        self.unclaimed_body_timeout = unclaimed_body_timeout
        self._targets: dict[bytes, _Target] = {}
        self._splits: dict[bytes, tuple[_Target, bytes]] = {}
        self._factories: dict[tuple[bytes, bytes, int], _ConnectionFactory] = {}
        self._idle: dict[tuple[bytes, bytes, int], list[_Connection]] = {}
        #: The pool's one idle timer, due when its longest-idle connection is.
        self._sweep: IDelayedCall | None = None

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,  # noqa: N803 - IAgent's name
    ) -> Deferred[IResponse]:
        """Send a request; the Deferred fires with the response once its head arrived.

        Like Agent: an invalid method or URI raises ``TypeError``/``ValueError``, an unsupported
        scheme fails the Deferred with ``SchemeNotSupported``, connection errors pass through,
        a connection lost before a response gives ``ResponseNeverReceived`` (or
        ``ResponseFailed`` if part of one came), ``RequestTransmissionFailed`` while the body was
        being written, ``RequestGenerationFailed`` when the body producer failed.
        """
        if headers is None:
            headers = Headers()
        return self.request_fields(
            method, uri, dict(headers.getAllRawHeaders()), bodyProducer, headers)

    def request_fields(
        self,
        method: bytes,
        uri: bytes,
        fields: Mapping[bytes, Sequence[bytes]],
        bodyProducer: IBodyProducer | None = None,  # noqa: N803 - as in request
        headers: Headers | None = None,
    ) -> Deferred[IResponse]:
        """``request`` with the header fields as ``Headers`` holds them (canonical names, values
        without line breaks; ``forward.request_fields`` builds them so), written as they are,
        in their order: no ``Headers`` is made or read. A ``HeadLines`` (``forward.request_head``)
        is written as it is, its lines made already. ``headers``, if given, is the
        ``Headers`` they are from (``IResponse.request`` has it; else one is made if asked)."""
        if method not in _KNOWN_METHODS:
            if not isinstance(method, bytes):
                raise TypeError(f"method={method!r} is {type(method)}, but must be bytes")
            if _TOKEN.fullmatch(method) is None:
                raise ValueError(f"Invalid method {method!r}")
        split = self._splits.get(uri)
        if split is None:
            try:
                split = self._split(uri)
            except SchemeNotSupported:
                return fail()
        target, path = split

        keep_alive = True
        if type(fields) is HeadLines:
            # (the fields' lines, written already: the usual request, from forward.request_head)
            parts = [method, b" ", path, b" HTTP/1.1\r\n", target.host_line, fields.lines]
            if fields.connection and b"close" in _tokens(list(fields.connection)):
                keep_alive = False
        else:
            parts = [method, b" ", path, b" HTTP/1.1\r\n", target.host_line]
            extend = parts.extend
            for name, values in fields.items():
                if name in _OWN_REQUEST_HEADERS:
                    if name == b"Host":
                        parts[4] = b"Host: " + values[0] + b"\r\n"
                        continue
                    if name != b"Connection":
                        continue
                    if b"close" in _tokens(list(values)):
                        keep_alive = False
                for value in values:
                    extend((name, b": ", value, b"\r\n"))
        if bodyProducer is None:
            if method in _BODYLESS_METHODS_WITH_LENGTH:
                parts.append(b"Content-Length: 0\r\n\r\n")
            else:
                parts.append(b"\r\n")
        elif bodyProducer.length is UNKNOWN_LENGTH:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            parts.append(b"Content-Length: %d\r\n\r\n" % (bodyProducer.length,))
        head = b"".join(parts)
        meta = (method, uri, path, headers if headers is not None else fields)

        idle = self._idle.get(target.key)
        while idle:
            connection = idle.pop()
            connection.idle_since = None
            if connection.peer_closed():
                # The backend closed it (its keep-alive ran out) and the reactor has not seen
                # that yet: a request written there would be lost, and then nobody could know
                # whether it ran. Drop it, never write to it.
                connection.close()
                continue
            waiting: Deferred[IResponse] = Deferred(connection.cancel)
            connection.send(waiting, method, head, bodyProducer, keep_alive, meta)
            return waiting

        pending = _Connecting(self, target.key, method, head, bodyProducer, keep_alive, meta)
        waiting = pending.waiting = Deferred(pending.cancel)
        dial = target.dial
        if dial is None:
            connecting = target.endpoint.connect(target.factory)
            pending.connecting = connecting
            connecting.addCallbacks(pending.connected, pending.failed)
        else:
            reactor, host, port, timeout, bind = dial
            try:  # (what TCP4ClientEndpoint.connect does, with the request as the factory)
                reactor.connectTCP(host, port, pending, timeout=timeout, bindAddress=bind)
            except BaseException:
                pending.failed(Failure())
        return waiting

    def _split(self, uri: bytes) -> tuple[_Target, bytes]:
        """``uri``'s target (per scheme and authority) and request path, remembered per URI
        (bounded, as the targets are: what they hold depends on the URI alone)."""
        match = _URI.fullmatch(uri)
        if match is None:
            match = _URI.fullmatch(uri.strip())
            if match is None:
                raise ValueError(f"Invalid URI {uri!r}")
        prefix, path = match.groups()
        target = self._targets.get(prefix)
        if target is None:
            target = self._target(prefix)
        if not path or path[0] != 47:  # b"/"
            path = b"/" + path
        if b"#" in path:
            path = path.partition(b"#")[0]
        if len(self._splits) >= 256:
            self._splits.clear()
        self._splits[uri] = (target, path)
        return target, path

    def _target(self, prefix: bytes) -> _Target:
        parsed = URI.fromBytes(prefix + b"/")
        if parsed.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"Unsupported scheme: {parsed.scheme!r}")
        endpoint = self.endpoints.endpointForURI(parsed)
        key = (parsed.scheme, parsed.host, parsed.port)
        factory = self._factories.get(key)
        if factory is None:
            factory = self._factories[key] = _ConnectionFactory(self, key)
        host_line = b"Host: " + _host_value(parsed.scheme, parsed.host, parsed.port) + b"\r\n"
        target = _Target(key, endpoint, factory, host_line)
        if len(self._targets) >= 256:
            self._targets.clear()
        self._targets[prefix] = target
        return target

    # -- the pool ----------------------------------------------------------------------------

    def put(self, connection: _Connection) -> None:
        """Keep an idle connection for reuse (closing the oldest beyond the limit).

        Each list is oldest first (a connection is reused from the end, the most recently
        used). Idle connections share one timer, not one each: a timer armed and cancelled per
        request costs a heap push and a cancellation per request under load.
        """
        idle = self._idle.get(connection.key)
        if idle is None:
            idle = self._idle[connection.key] = []
        if len(idle) >= self.max_idle_per_host:
            if not idle:
                connection.close()
                return
            oldest = idle.pop(0)
            oldest.idle_since = None
            oldest.close()
        connection.idle_since = self.reactor.seconds()
        idle.append(connection)
        if self._sweep is None:
            self._sweep = self.reactor.callLater(self.idle_timeout, self._expire_idle)

    def _expire_idle(self) -> None:
        """Close the connections idle for ``idle_timeout``; wait for the next one to be."""
        self._sweep = None
        now = self.reactor.seconds()
        timeout = self.idle_timeout
        next_due: float | None = None
        for idle in self._idle.values():
            while idle:
                since = idle[0].idle_since
                if since is not None and since + timeout > now:
                    if next_due is None or since + timeout < next_due:
                        next_due = since + timeout
                    break
                expired = idle.pop(0)
                expired.idle_since = None
                expired.close()
        if next_due is not None:
            self._sweep = self.reactor.callLater(next_due - now, self._expire_idle)

    def forget(self, connection: _Connection) -> None:
        """Take a connection out of the pool (it closed or misbehaved)."""
        connection.idle_since = None
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
        sweep = self._sweep
        if sweep is not None and not any(self._idle.values()):
            self._sweep = None  # (rare: no timer left behind by a pool that emptied this way)
            if sweep.active():
                sweep.cancel()

    def idle_connections(self) -> int:
        """How many connections are in the pool."""
        return sum(len(idle) for idle in self._idle.values())

    def closeCachedConnections(self) -> Deferred[None]:
        """Close every idle connection; the Deferred fires once they are all closed."""
        closing = []
        if self._sweep is not None:
            if self._sweep.active():
                self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for connection in idle:
                connection.idle_since = None
                closing.append(connection.close())
        self._idle = {}
        return gatherResults(closing).addCallback(lambda _: None)
