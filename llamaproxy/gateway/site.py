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

from dataclasses import dataclass
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

from llamaproxy.cors import CorsPolicy
from llamaproxy.eager_write import EagerSender, send_eagerly
from llamaproxy.gateway import errors
from llamaproxy.gateway.errors import GatewayError
from llamaproxy.gateway.recorder import RequestRecorder
from llamaproxy.gateway.request import EarlyCheck, GatewayRequest, raw_response
from llamaproxy.gateway.resource import GatewayResource

log = Logger()

_CONNECTION_DONE = Failure(ConnectionDone())


@dataclass(frozen=True)
class RequestLimits:
    """Sizes a request may have (bytes, line terminators included) and how long it may take."""

    max_request_line: int = 8192
    max_header_line: int = 8192
    max_headers: int = 64
    max_body: int = 10 * 1024 * 1024
    client_timeout: float = 30.0


_DEFAULT_LIMITS = RequestLimits()
_NO_CORS = CorsPolicy()


class GatewayChannel(http.HTTPChannel):
    """An HTTPChannel with the gateway's limits, timeouts and JSON error responses."""

    # Slots for the gateway's own state: with them the channel stays under the 30 instance
    # attributes past which CPython gives an object a dict five times the size (see
    # GatewayRequest), and that is per open connection.
    __slots__ = (
        "_arrival_timer", "_bad_request", "_header_lines", "_host", "cors", "limits", "sender"
    )

    def __init__(self) -> None:
        self.limits = _DEFAULT_LIMITS
        self.cors = _NO_CORS
        self._arrival_timer: IDelayedCall | None = None
        self._bad_request = "Malformed request"
        self._header_lines = 0
        self._host: Any = None
        #: The connection's eager sender (None when it is not plain TCP, e.g. TLS).
        self.sender: EagerSender | None = None
        super().__init__()

    def connectionMade(self) -> None:
        # Twisted's own checks must never fire before ours (they would answer a bare 400).
        limits = self.limits
        self.MAX_LENGTH = max(limits.max_request_line, limits.max_header_line) + 2
        self.maxHeaders = limits.max_headers + 1
        self.totalHeadersSize = limits.max_request_line + limits.max_headers * (
            limits.max_header_line + 2
        ) + 2
        sender = send_eagerly(self.transport)
        # Under TLS the sender is the TCP connection's, below the encryption: never ours to
        # write to.
        self.sender = sender if sender is not None and sender.connection is self.transport else None
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
        self._header_lines = 0
        super().allContentReceived()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._cancel_arrival_timer()
        super().connectionLost(reason)

    def _cancel_arrival_timer(self) -> None:
        if self._arrival_timer is not None and self._arrival_timer.active():
            self._arrival_timer.cancel()
        self._arrival_timer = None

    def _too_slow(self) -> None:
        self._arrival_timer = None
        self._reject(errors.request_timeout(self.limits.client_timeout))

    # -- limits on the request head --------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        first = self._HTTPChannel__first_line  # type: ignore[attr-defined]
        if first and line:
            if len(line) + 2 > self.limits.max_request_line:
                self._reject(errors.uri_too_long(self.limits.max_request_line))
                return
        elif line:
            self._header_lines += 1
            if len(line) + 2 > self.limits.max_header_line:
                self._reject(errors.headers_too_large())
                return
            if self._header_lines > self.limits.max_headers:
                self._reject(errors.headers_too_large())
                return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line longer than any limit, with no end in sight."""
        if self._HTTPChannel__first_line:  # type: ignore[attr-defined]
            self._reject(errors.uri_too_long(self.limits.max_request_line))
        else:
            self._reject(errors.headers_too_large())

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        # Remember why Twisted may refuse this header, for our 400's message.
        if header == b"Content-Length":
            self._bad_request = (
                "Malformed Content-Length header" if not data.isdigit()
                else "Conflicting Content-Length and Transfer-Encoding headers"
            )
        elif header == b"Transfer-Encoding":
            self._bad_request = (
                "Conflicting Content-Length and Transfer-Encoding headers"
                if data.lower() in (b"chunked", b"identity")
                else "Unsupported Transfer-Encoding"
            )
        return bool(super()._maybeChooseTransferDecoder(header, data))

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted found the request malformed: answer with our JSON 400, not a bare one."""
        self._reject(errors.bad_request(self._bad_request))

    # -- answering without a request -------------------------------------------------------

    def _reject(self, error: GatewayError) -> None:
        """Write ``error`` as the whole response, stop parsing, and close once it is sent."""
        self._cancel_arrival_timer()
        if self.transport is None:
            return
        # The Origin is not known yet (or not trusted): CORS headers only in wildcard mode.
        self.transport.write(raw_response(error, self.cors.response_headers(None)))
        recorder = getattr(getattr(self, "site", None), "recorder", None)
        if recorder is not None:
            recorder.refused(error)
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        self.lineReceived = lambda line: None  # type: ignore[method-assign]
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
        resource: GatewayResource,
        limits: RequestLimits | None = None,
        cors: CorsPolicy | None = None,
        reactor: Any = None,
        recorder: RequestRecorder | None = None,
    ) -> None:
        super().__init__(resource, reactor=reactor)
        self.limits = limits or RequestLimits()
        self.cors = cors or CorsPolicy()
        self.recorder = recorder
        self.early_check: EarlyCheck = resource.early_check

    @property
    def max_request_body_size(self) -> int:
        """The body limit GatewayRequest enforces."""
        return self.limits.max_body

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.limits = self.limits
        channel.cors = self.cors
        return channel

    def acceptableProtocols(self) -> list[bytes]:
        """HTTP/1.1 only: h2 (if installed) has different producer semantics."""
        return [b"http/1.1"]

    def log(self, request: http.Request) -> None:
        """The gateway resource logs each exchange with its real outcome; no second line."""
