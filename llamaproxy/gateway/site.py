"""The gateway's Site and channel: our Request class, our limits, HTTP/1.1 only, JSON errors only.

``GatewayChannel`` replaces twisted.web's parsing-error behaviour (a bare ``400 Bad Request`` with
no body, or a silent close for over-long lines) with the gateway's own OpenAI-shaped errors, and
enforces our limits: request line (414), header line and header count (431), malformed or
conflicting ``Content-Length``/``Transfer-Encoding`` (400, no request smuggling). It also gives
each request ``client_timeout`` seconds, from its first byte, to arrive completely (408):
twisted.web's own idle timeout only fires when nothing arrives at all, so a client trickling one
byte a second could otherwise hold a connection for hours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from llamaproxy.fastpath.eager_write import Cork, EagerSender, send_eagerly
from llamaproxy.gateway import errors
from llamaproxy.gateway.body_budget import BodyBudget
from llamaproxy.gateway.client_address import TrustedProxies
from llamaproxy.gateway.cors import CorsPolicy
from llamaproxy.gateway.errors import GatewayError
from llamaproxy.gateway.recorder import RequestRecorder
from llamaproxy.gateway.request import EarlyCheck, GatewayRequest, raw_response
from llamaproxy.gateway.resource import GatewayResource

log = Logger()

_CONNECTION_DONE = Failure(ConnectionDone())

#: Bits of GatewayChannel._framing: which body-framing header the current request had.
_CONTENT_LENGTH = 1
_TRANSFER_ENCODING = 2

_BOTH_FRAMINGS = errors.bad_request(
    "Content-Length and Transfer-Encoding together: a request may have only one of them"
)


def _shown(value: bytes) -> str:
    """A header value for an error message: quoted, at most 100 characters."""
    return repr(value[:100].decode("latin-1"))


class LimitedChunkedDecoder(http._ChunkedTransferDecoder):
    """Twisted's chunked decoder, refusing a body over the limit as soon as a chunk *says* so.

    Twisted's decoder waits for a chunk's bytes however large its declared size (a size of
    ``ffffffffffffffff`` held the connection until the arrival timeout); this one answers 413
    when the size line arrives, and says what was malformed instead of a generic 400.
    """

    def __init__(
        self,
        data_callback: Callable[[bytes], None],
        finish_callback: Callable[[bytes], None],
        limit: int,
        refuse: Callable[[GatewayError], None],
    ) -> None:
        super().__init__(data_callback, finish_callback)
        self.limit = limit
        self.declared = 0
        self._refuse = refuse

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        try:
            complete = bool(super()._dataReceived_CHUNK_LENGTH())
        except http._MalformedChunkedDataError as e:
            self._refuse(errors.bad_request(f"Malformed chunk size line: {e}"))
            raise
        if complete:
            self.declared += self.length
            if self.declared > self.limit:
                self._refuse(errors.payload_too_large(self.limit))
                raise http._MalformedChunkedDataError("chunk over the body limit")
        return complete

    def _dataReceived_CRLF(self) -> bool:
        try:
            return bool(super()._dataReceived_CRLF())
        except http._MalformedChunkedDataError as e:
            self._refuse(errors.bad_request(f"Malformed chunked body: {e}"))
            raise

    def _dataReceived_TRAILER(self) -> bool:
        try:
            return bool(super()._dataReceived_TRAILER())
        except http._MalformedChunkedDataError as e:
            self._refuse(errors.bad_request(f"Malformed chunked body: {e}"))
            raise


@dataclass(frozen=True)
class RequestLimits:
    """Sizes a request may have (bytes, line terminators included) and how long it may take."""

    max_request_line: int = 8192
    max_header_line: int = 8192
    max_headers: int = 64
    max_body: int = 10 * 1024 * 1024
    client_timeout: float = 30.0
    #: Deepest nesting of ``[`` and ``{`` a JSON body may have.
    max_json_depth: int = 64
    #: Most keys and values a JSON body may hold (see ``gateway.json_shape``).
    max_json_values: int = 200_000


_DEFAULT_LIMITS = RequestLimits()
_NO_CORS = CorsPolicy()


class GatewayChannel(http.HTTPChannel):
    """An HTTPChannel with the gateway's limits, timeouts and JSON error responses."""

    # Slots for the gateway's own state: with them the channel stays under the 30 instance
    # attributes past which CPython gives an object a dict five times the size (see
    # GatewayRequest), and that is per open connection.
    __slots__ = (
        "_arrival_timer", "_framing", "_framing_error", "_header_lines", "_host", "cork", "cors",
        "limits", "request_line", "sender",
    )

    def __init__(self) -> None:
        self.limits = _DEFAULT_LIMITS
        self.cors = _NO_CORS
        self._arrival_timer: IDelayedCall | None = None
        #: Which framing headers the current request had (_CONTENT_LENGTH, _TRANSFER_ENCODING).
        self._framing = 0
        #: The error to answer when Twisted's parser refuses the request (None: a generic 400).
        self._framing_error: GatewayError | None = None
        self._header_lines = 0
        #: The current request's first line, once it arrived (None while one is awaited).
        self.request_line: bytes | None = None
        self._host: Any = None
        #: The connection's eager sender (None when it is not plain TCP, e.g. TLS, or the
        #: eager-write fast path is off).
        self.sender: EagerSender | None = None
        #: The eager writes' shared state when that fast path is on (the site's), else None.
        self.cork: Cork | None = None
        super().__init__()

    def connectionMade(self) -> None:
        # Twisted's own checks must never fire before ours (they would answer a bare 400).
        limits = self.limits
        self.MAX_LENGTH = max(limits.max_request_line, limits.max_header_line) + 2
        self.maxHeaders = limits.max_headers + 1
        self.totalHeadersSize = limits.max_request_line + limits.max_headers * (
            limits.max_header_line + 2
        ) + 2
        if self.cork is not None:
            sender = send_eagerly(self.transport, self.cork)
            # Under TLS the sender is the TCP connection's, below the encryption: never ours
            # to write to.
            if sender is not None and sender.connection is self.transport:
                self.sender = sender
        super().connectionMade()

    def getHost(self) -> Any:
        """The local address, asked of the socket once per connection, not once per request."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    # -- arrival timeout ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if (
            self._arrival_timer is None
            and not self._handlingRequest
            and self.limits.client_timeout > 0
        ):
            self._arrival_timer = self.callLater(self.limits.client_timeout, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_arrival_timer()
        self._framing = 0
        self._header_lines = 0
        self.request_line = None  # the next line is the next request's first
        super().allContentReceived()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._cancel_arrival_timer()
        super().connectionLost(reason)
        # A request answered before its body arrived leaves twisted.web's body decoder in
        # place, holding a bound method of this channel: a reference cycle per connection
        # that only a full collection frees (once a minute under the fast paths' GC schedule).
        self._transferDecoder = None

    def _cancel_arrival_timer(self) -> None:
        if self._arrival_timer is not None and self._arrival_timer.active():
            self._arrival_timer.cancel()
        self._arrival_timer = None

    def _too_slow(self) -> None:
        self._arrival_timer = None
        self._reject(errors.request_timeout(self.limits.client_timeout))

    # -- limits on the request head --------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self.request_line is None:
            if line:  # (an empty line before a request is skipped, as twisted.web does)
                if len(line) + 2 > self.limits.max_request_line:
                    self._reject(errors.uri_too_long(self.limits.max_request_line))
                    return
                self.request_line = line
        elif line:
            self._header_lines += 1
            if len(line) + 2 > self.limits.max_header_line:
                self._reject(errors.headers_too_large())
                return
            if self._header_lines > self.limits.max_headers:
                self._reject(errors.headers_too_large())
                return
        super().lineReceived(line)

    def request_target(self) -> tuple[bytes, bytes]:
        """The current request's method and target, from its first line (its head is in)."""
        parts = (self.request_line or b"").split()
        return (parts[0], parts[1]) if len(parts) == 3 else (b"", b"")

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line longer than any limit, with no end in sight."""
        if self.request_line is None:
            self._reject(errors.uri_too_long(self.limits.max_request_line))
        else:
            self._reject(errors.headers_too_large())

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        """Accept exactly one body framing: one Content-Length, or one ``chunked`` coding.

        Anything else could be read differently by a proxy in front or behind (request
        smuggling), so it is refused once the headers are in (``allHeadersReceived``) and the
        connection closed: both headers together whatever the coding (400), a repeated or
        malformed Content-Length, a repeated Transfer-Encoding header, a list of codings (400),
        or a single coding other than chunked (501, RFC 9112 6.1).
        """
        if header == b"Content-Length":
            seen = self._framing
            self._framing |= _CONTENT_LENGTH
            if seen & _TRANSFER_ENCODING:
                self._framing_error = _BOTH_FRAMINGS
            elif not data.isdigit():
                self._note(errors.bad_request(
                    f"Malformed Content-Length header {_shown(data)}: it must be digits only"))
            elif seen & _CONTENT_LENGTH:
                self._note(errors.bad_request("Repeated Content-Length header: a request has one"))
            elif self._framing_error is None:
                return bool(super()._maybeChooseTransferDecoder(header, data))
            return True
        if header != b"Transfer-Encoding":
            return True
        seen = self._framing
        self._framing |= _TRANSFER_ENCODING
        coding = data.lower()
        if seen & _CONTENT_LENGTH:
            self._framing_error = _BOTH_FRAMINGS
        elif seen & _TRANSFER_ENCODING:
            self._note(errors.bad_request(
                "Repeated Transfer-Encoding header: only a single 'chunked' is accepted"))
        elif not coding.strip(b" \t,"):
            self._note(errors.bad_request("Empty Transfer-Encoding header"))
        elif b"," in coding:
            self._note(errors.bad_request(
                f"Transfer-Encoding {_shown(data)} lists several codings: only a single "
                "'chunked' is accepted"))
        elif coding != b"chunked":
            self._note(errors.unsupported_transfer_encoding(data.decode("latin-1")))
        elif self._framing_error is None:
            self.length = None
            self._transferDecoder = LimitedChunkedDecoder(
                self.requests[-1].handleContentChunk, self._finishRequestBody,
                self.limits.max_body, self._refuse_body,
            )
        return True

    def _note(self, error: GatewayError) -> None:
        """Remember the first framing problem of the request being parsed."""
        if self._framing_error is None:
            self._framing_error = error

    def allHeadersReceived(self) -> None:
        error = self._framing_error
        if error is None:
            super().allHeadersReceived()
            return
        # Refused: no Request ever sees it, and nothing after it on this connection is read.
        self._framing_error = None
        self.length = None
        self._reject(error)

    def _refuse_body(self, error: GatewayError) -> None:
        """The chunked decoder found the body malformed or too large (it raises next)."""
        self._framing_error = error

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted found the request malformed: answer with our JSON error, not a bare 400."""
        error, self._framing_error = self._framing_error, None
        if self.line_mode:  # still in the head: a pending framing note is not why
            error = None
        self._reject(error or errors.bad_request("Malformed request"))

    # -- answering without a request -------------------------------------------------------

    def _reject(self, error: GatewayError) -> None:
        """Write ``error`` as the whole response, stop parsing, and close once it is sent."""
        self._cancel_arrival_timer()
        if self.transport is None or getattr(self.transport, "disconnecting", False):
            return  # already answered (e.g. refused before its body) and closing
        # The Origin is not known yet (or not trusted): CORS headers only in wildcard mode.
        self.transport.write(raw_response(error, self.cors.response_headers(None)))
        recorder = getattr(getattr(self, "site", None), "recorder", None)
        if recorder is not None:
            recorder.refused(error, getattr(self.transport.getPeer(), "host", None))
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        self.lineReceived = lambda line: None  # type: ignore[method-assign]
        self.rawDataReceived = lambda data: None  # type: ignore[method-assign]
        self.loseConnection()


class GatewaySite(server.Site):
    """A Site that checks requests before their bodies and never negotiates HTTP/2 by accident."""

    requestFactory = GatewayRequest
    # Plain HTTPChannel, not the h2-negotiating wrapper: we only ever speak HTTP/1.1.
    protocol = GatewayChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        resource: GatewayResource | Resource,
        limits: RequestLimits | None = None,
        cors: CorsPolicy | None = None,
        reactor: Any = None,
        recorder: RequestRecorder | None = None,
        body_budget: BodyBudget | None = None,
        early_check: EarlyCheck | None = None,
        trusted_proxies: TrustedProxies | None = None,
        cork: Cork | None = None,
    ) -> None:
        super().__init__(resource, reactor=reactor)
        #: The eager-write fast path's shared state (None: connections write the stock way).
        self.cork = cork
        #: Whose X-Forwarded-For is believed (GatewayRequest.client).
        self.trusted_proxies = trusted_proxies or TrustedProxies()
        self.limits = limits or RequestLimits()
        #: Bounds the request-body bytes held, in all and per key (None: unbounded).
        self.body_budget = body_budget
        self.cors = cors or CorsPolicy()
        self.recorder = recorder
        #: True when the resource is the gateway's (one leaf, no traversal needed).
        self.single_leaf = isinstance(resource, GatewayResource)
        #: Decides from the head alone whether a request may go on (the resource's by default).
        self.early_check: EarlyCheck | None = (
            early_check if early_check is not None else getattr(resource, "early_check", None)
        )

    @property
    def max_request_body_size(self) -> int:
        """The body limit GatewayRequest enforces."""
        return self.limits.max_body

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.limits = self.limits
        channel.cors = self.cors
        channel.cork = self.cork
        return channel

    def acceptableProtocols(self) -> list[bytes]:
        """HTTP/1.1 only: h2 (if installed) has different producer semantics."""
        return [b"http/1.1"]

    def log(self, request: http.Request) -> None:
        """The gateway resource logs each exchange with its real outcome; no second line."""
