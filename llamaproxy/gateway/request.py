"""The gateway's Request: decisions taken when the headers arrive, and JSON error rendering.

twisted.web reads a whole request body before ``render`` runs. Limits and authentication must not
wait for that: ``gotLength`` runs as soon as the headers are in, asks the site's ``early_check``
whether the request may proceed, and rejects it there. A rejected request that still has a body
coming gets its error written at once and the connection closed, so the gateway never reads (or
buffers) a body it has already refused.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, cast
from urllib.parse import unquote_to_bytes as unquote

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers

from llamaproxy import __version__
from llamaproxy.auth.keys import AUTH_DISABLED
from llamaproxy.gateway import errors
from llamaproxy.gateway.body_budget import BodyBudget
from llamaproxy.gateway.client_address import ClientIdentity, TrustedProxies
from llamaproxy.gateway.errors import GatewayError
from llamaproxy.gateway.json_shape import JsonShape
from llamaproxy.gateway.request_body import NO_FACTS, BodyFacts
from llamaproxy.observability.access_log import (
    REQUEST_ID_HEADER,
    new_request_id,
    request_id_from,
)

log = Logger()

_NO_PROXIES = TrustedProxies()

# twisted.web's methods that GatewayRequest's extend, called by name rather than through
# ``super()`` (on Python 3.11 each ``super()`` builds a proxy object: a few hundred instructions,
# several times per request). GatewayRequest's base is ``server.Request``; these are what
# ``super()`` finds there.
_stock_got_length = server.Request.gotLength
_stock_content_chunk = server.Request.handleContentChunk
_stock_set_code = server.Request.setResponseCode
_stock_finish = server.Request.finish
_stock_connection_lost = server.Request.connectionLost

#: What the gateway says it is (no version banner).
SERVER_NAME = b"llamaproxy"

#: Headers on every response the gateway writes itself.
_HYGIENE_HEADERS = (("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"))

#: Response header fields the gateway sets itself: (name, value), values without line breaks.
OwnHeaders = Sequence[tuple[str | bytes, bytes]]


def set_each(target: Headers, fields: OwnHeaders) -> None:
    """``target.setRawHeaders(name, [value])`` for each of ``fields``: what ``setHeader`` does
    (the stock way a ``GatewaySite`` sets a request's own headers; with the fast paths on,
    ``llamaproxy.fastpath.header_fill.set_values`` stores the same in one pass)."""
    for name, value in fields:
        target.setRawHeaders(name, [value])


#: Decides, from the method, path and headers alone, whether a request may go on. Returns the
#: error to answer with, or None, or a Deferred of either (the request then waits for it with its
#: body unread). It may store what it learnt (e.g. the key id) on the request.
EarlyCheck = Callable[
    ["GatewayRequest"], "GatewayError | Deferred[GatewayError | None] | None"
]


class GatewayRequest(server.Request):
    """A Request that is checked before its body is read and renders OpenAI-shaped errors."""

    # The gateway's own per-request state lives in slots: twisted.web's Request already has
    # ~25 attributes, and an instance with 30 or more gets a dict five times the size (1.6 KiB
    # instead of 0.3), which would be most of a queued request's memory.
    __slots__ = (
        "_body_limit", "_body_seen", "_budget", "_checking", "_client", "_clock", "_closed_early",
        "_held", "_recorded", "_site",
        "early_error", "error", "exchange", "facts", "first_byte_at", "head_values", "key_id",
        "loading_stream", "lost", "on_lost", "refund", "request_id", "route", "shape", "started_at",
    )

    #: Set by the early check: the caller's key id ("auth-disabled" without authentication).
    key_id: str | None
    #: The last value of the Authorization, X-Api-Key and X-Request-ID headers (by lower-case
    #: name; absent: no such header), what ``getHeader`` gives for them, handed over by the
    #: channel that parsed them (``GatewayChannel``: no lookup in ``requestHeaders`` each).
    head_values: dict[bytes, bytes]
    #: An error decided before the body arrived, rendered by ``process`` instead of the resource.
    early_error: GatewayError | None
    #: What the resource read from an API request's JSON body (``request_body.BodyFacts``).
    facts: BodyFacts
    #: Measures a JSON body's depth and size while it arrives (POSTs to JSON routes only).
    shape: JsonShape | None
    #: Gives back the rate-limit charge of this request if the gateway refuses it (set by the
    #: early check when it charged one; see ``refuse``). Called with the request, so it holds
    #: no reference to it: a request must never sit in a reference cycle (the fast paths' GC
    #: schedule collects cycles only once a minute, so each one would be held that long).
    refund: Callable[[GatewayRequest], None] | None
    #: The X-Request-ID of this request (the client's when valid, else a new one).
    request_id: str
    #: The proxied exchange serving this request, when it reached one (for the access log).
    exchange: Any
    #: The gateway error this request was answered with, if any.
    error: GatewayError | None
    #: When the response's first byte was written (clock seconds), for time-to-first-byte.
    first_byte_at: float | None
    #: Called once if the connection is lost before the response ends (a parked exchange's
    #: way to leave its queue without a notifyFinish Deferred).
    on_lost: Callable[[], None] | None
    #: True once the client's connection was lost (twisted.web keeps that private).
    lost: bool
    #: When its head was in (clock seconds).
    started_at: float
    #: Where the early check routed it (a ``resource.Route``), so ``render`` need not again.
    route: Any
    #: True once the gateway started this streaming request's response (200,
    #: text/event-stream) itself, to send ``: loading`` comments while its model loads: the
    #: backend's answer is appended, and an error becomes an SSE ``data:`` event.
    loading_stream: bool

    # Never let twisted.web invent a text/html content type for a response.
    defaultContentType = None

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        self.key_id = None
        self.route = None
        self.early_error = None
        self.loading_stream = False
        self.facts = NO_FACTS
        self.shape = None
        self.refund = None
        self.request_id = "-"
        self.exchange = None
        self.error = None
        self.first_byte_at = None
        self.on_lost = None
        self.lost = False
        self._closed_early = False
        #: While an asynchronous early check runs: "waiting", or "process" once the request
        #: is complete and waits for the decision to be rendered; None otherwise.
        self._checking: str | None = None
        self._body_limit: int | None = None
        self._body_seen = 0
        self._budget: BodyBudget | None = None
        self._held = 0  # body bytes reserved in the site's BodyBudget
        self._site: Any = None
        self._recorded = False
        self._client: ClientIdentity | None = None
        site = getattr(channel, "site", None)
        start = getattr(site, "start_request", None)
        if start is not None and not args and not kwargs:
            start(self, channel)  # what the stock constructor below sets, in one call
        else:
            # The gateway never reads form fields: skip twisted.web's Content-Type and form
            # parsing on every POST (13-15 % of the CPU per request in the profile).
            kwargs.setdefault("parsePOSTFormSubmission", False)
            super().__init__(channel, *args, **kwargs)
        self._clock = getattr(site, "reactor", None)
        self.started_at = self._clock.seconds() if self._clock is not None else 0.0

    # -- decisions when the headers are complete ---------------------------------------------

    def gotLength(self, length: int | None) -> None:
        """Headers are in: apply the body limit and the site's early check before any body."""
        site = self._site = cast(Any, self.channel).site
        # The request line is parsed but not yet copied onto the request; do it now.
        self.method, self.uri = self.channel.request_target()  # type: ignore[attr-defined]
        self.path = self.uri.split(b"?", 1)[0]
        given = self.head_values.get(b"x-request-id")
        # (request_id_from(None) is new_request_id(): one call less for most requests)
        self.request_id = request_id_from(given) if given else new_request_id()
        site.set_headers(self.responseHeaders, ((REQUEST_ID_HEADER, self.request_id.encode()),))
        limit: int = site.max_request_body_size
        self._body_limit = limit
        error: GatewayError | None = None
        if length is not None and length > limit:
            error = errors.payload_too_large(limit)
        else:
            check: EarlyCheck | None = getattr(site, "early_check", None)
            if check is not None:
                decision = check(self)
                if isinstance(decision, Deferred):
                    self._await_check(decision, length)
                    return
                error = decision
        self._checked(error, length)

    def _await_check(self, decision: Deferred[GatewayError | None], length: int | None) -> None:
        """Wait for an asynchronous early check without reading the body: the channel stops
        parsing (its transport stops reading) until the decision is in."""
        self._checking = "waiting"
        body_expected = (length or 0) > 0 or (
            length is None and self.requestHeaders.hasHeader(b"transfer-encoding")
        )
        expect = self.requestHeaders.getRawHeaders(b"expect")
        if body_expected:
            # Twisted answers "Expect: 100-continue" right after this; not before the decision.
            self.requestHeaders.removeHeader(b"expect")
            self.channel.pause_parsing()  # type: ignore[attr-defined]
        else:
            # (the channel completes the request at once: render waits)
            _stock_got_length(self, length)

        def decided(error: GatewayError | None) -> None:
            waiting, self._checking = self._checking, None
            if self.lost or self.channel is None or self.channel.transport is None:
                return  # the client left meanwhile (connectionLost recorded it)
            if not body_expected:
                if error is None and self.key_id is not None:
                    error = self._check_budget(0)
                if error is None:
                    self._measure_body()
                self.early_error = error
                if waiting == "process":
                    self.process()
                return
            self._checked(error, length)
            if self._closed_early:
                return
            transport = self.channel.transport
            if expect and expect[0].lower() == b"100-continue" and transport is not None:
                transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.channel.resume_parsing()  # type: ignore[attr-defined]

        def failed(failure: Failure) -> None:
            log.failure("Early check failed", failure)
            decided(errors.internal_error())

        decision.addCallbacks(decided, failed)

    def _measure_body(self) -> None:
        """Measure a JSON body's shape as it arrives (POSTs to JSON routes)."""
        if self.method == b"POST" and getattr(self.route, "kind", None) in ("api", "admin"):
            limits = self.channel.limits  # type: ignore[attr-defined]
            self.shape = JsonShape(limits.max_json_depth, limits.max_json_values, lazy=True)

    def _check_budget(self, length: int) -> GatewayError | None:
        """Reserve the body's bytes in the site's budget (when it has one)."""
        budget: BodyBudget | None = getattr(self._site, "body_budget", None)
        if budget is None:
            return None
        self._budget = budget
        return self._hold(length)

    def _checked(self, error: GatewayError | None, length: int | None) -> None:
        """The early check's decision is in: go on reading the body, or answer now."""
        if error is None and self.key_id is not None:
            error = self._check_budget(length or 0)
        if error is None:
            self._measure_body()
            _stock_got_length(self, length)
            return
        self.early_error = error
        body_expected = length is None and self.requestHeaders.hasHeader(b"transfer-encoding")
        if (length or 0) > 0 or body_expected:
            self.content = io.BytesIO()  # twisted.web expects one; nothing is ever written to it
            self._reject_and_close(error)
        else:
            _stock_got_length(self, length)

    def handleContentChunk(self, data: bytes) -> None:
        """Count body bytes as they arrive (chunked bodies included) and stop at the limit."""
        if self._closed_early:
            return
        self._body_seen += len(data)
        if self._body_limit is not None and self._body_seen > self._body_limit:
            self._reject_and_close(errors.payload_too_large(self._body_limit))
            return
        if self._budget is not None and self._body_seen > self._held:
            refusal = self._hold(self._body_seen - self._held)  # a chunked body: as it comes
            if refusal is not None:
                self._reject_and_close(refusal)
                return
        if self.shape is not None:
            self.shape.feed(data)
        _stock_content_chunk(self, data)

    def _hold(self, size: int) -> GatewayError | None:
        """Reserve ``size`` more body bytes in the site's budget; the refusal when it is full."""
        budget = self._budget
        assert budget is not None
        if budget.reserve(self._budget_key, size):
            self._held += size
            return None
        return errors.body_budget_full(per_key=not budget.full_in_total(size))

    @property
    def _budget_key(self) -> str | None:
        """Whose share body bytes count against (None without authentication: all share)."""
        return None if self.key_id == AUTH_DISABLED else self.key_id

    def _reject_and_close(self, error: GatewayError) -> None:
        """Answer now, before the body, and close the connection once the answer is sent."""
        self._closed_early = True
        self.early_error = error
        # Twisted would answer "Expect: 100-continue" after this; the client must not send.
        self.requestHeaders.removeHeader(b"expect")
        # Not logged here: the access log and the metrics have it, and the gateway log a
        # rate-limited summary (llamaproxy.observability.rejection_log), so bad requests cannot
        # fill a disk.
        transport = self.channel.transport
        if transport is None:  # the client is already gone: nobody to answer
            return
        extra = [*self.cors_headers(), (REQUEST_ID_HEADER, self.request_id.encode("ascii"))]
        self.refuse(error)
        transport.write(raw_response(error, extra))
        # What the access log reports for it: the body written, and when.
        self.sentLength = len(error.body())
        if self.first_byte_at is None and self._clock is not None:
            self.first_byte_at = self._clock.seconds()
        self.channel.loseConnection()
        self.setResponseCode(error.status)
        self._record()

    def process(self) -> None:
        """Serve the request unless it was already answered before its body.

        twisted.web's ``process`` minus what the gateway never uses on its hot path: resource
        traversal (the gateway site has one leaf resource) and a Date string formatted per
        request (once per second here); and never twisted.web's ``Server: TwistedWeb`` banner
        (``OPTIONS *`` included).
        """
        if self._closed_early:
            return
        if self._checking is not None:
            self._checking = "process"  # rendered when the early check's decision is in
            return
        site = self.channel.site  # type: ignore[attr-defined]
        resource = getattr(site, "resource", None)
        self.site = site
        # twisted.web's own process would also send "Server: TwistedWeb/<version>".
        site.set_headers(self.responseHeaders,
                         ((b"Server", SERVER_NAME), (b"Date", _http_date(int(time.time())))))
        self.prepath = []
        if self.path == b"*":
            self._answer_star()
            return
        try:
            if getattr(site, "single_leaf", False):
                self.postpath = []
            else:  # another resource (the health site's Klein app): twisted.web's traversal
                if self.early_error is not None:  # such a tree knows nothing of early errors
                    self.send_error(self.early_error)
                    return
                self.postpath = [unquote(p) for p in self.path[1:].split(b"/")]
                resource = site.getResourceFor(self)
            self.render(resource)
        except BaseException:
            self.processingFailed(Failure())

    def _answer_star(self) -> None:
        """``OPTIONS *`` (RFC 9110 9.3.7): an empty 200; any other method on ``*`` is 405."""
        if self.method == b"OPTIONS":
            self.setResponseCode(200)
            self.setHeader(b"Content-Length", b"0")
            self.finish()
        else:
            self.send_error(errors.method_not_allowed(
                self.method.decode("latin-1", "replace")[:20], ("OPTIONS",)))

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        """Set the status; the reason phrase is always RFC 9110's (never "Unknown Status")."""
        phrase = errors.REASON_PHRASES.get(code)
        _stock_set_code(self, code, phrase if phrase is not None else message or b"Status")

    def processingFailed(self, reason: Failure) -> None:
        """A bug in a render method: log it, answer a JSON 500 (never an HTML traceback page)."""
        log.failure("Error while rendering {path}", reason, path=self.path.decode("latin-1")[:200])
        self.send_error(errors.internal_error())

    def set_headers(self, fields: OwnHeaders) -> None:
        """``setHeader(name, value)`` for each of ``fields``, response headers the gateway made
        itself (no value with a line break), in one pass (the site's ``set_headers``)."""
        self._site.set_headers(self.responseHeaders, fields)

    @property
    def client_identity(self) -> ClientIdentity:
        """Who sent this request: the peer, or whom a trusted proxy says it forwards for.

        Without trusted proxies it depends only on the connection (its peer, TLS or not):
        the connection's channel keeps it for its next requests (``direct_client``).
        """
        if self._client is None:
            channel = getattr(self, "channel", None)  # (gone once the response is finished)
            site = self._site if self._site is not None else getattr(channel, "site", None)
            trusted: TrustedProxies = getattr(site, "trusted_proxies", None) or _NO_PROXIES
            if trusted.networks:
                headers = self.requestHeaders
                self._client = trusted.identify(
                    getattr(self.getClientAddress(), "host", "") or "", self.isSecure(),
                    headers.getRawHeaders(b"x-forwarded-for", []),
                    headers.getRawHeaders(b"forwarded", []),
                    headers.getRawHeaders(b"x-forwarded-proto", []),
                )
                return self._client
            known: ClientIdentity | None = getattr(channel, "direct_client", None)
            if known is None:
                known = trusted.identify(
                    getattr(self.getClientAddress(), "host", "") or "", self.isSecure(),
                    [], [], [])
                if channel is not None and hasattr(channel, "direct_client"):
                    channel.direct_client = known
            self._client = known
        return self._client

    # -- CORS and errors --------------------------------------------------------------------

    def cors_headers(self) -> list[tuple[bytes, bytes]]:
        """The CORS headers this request's response gets (none when CORS is off)."""
        site = self._site if self._site is not None else getattr(self.channel, "site", None)
        policy = getattr(site, "cors", None)
        if policy is None or not policy.enabled:
            return []
        origin = self.requestHeaders.getRawHeaders(b"origin", [None])[-1]
        if self.method == b"OPTIONS":
            requested = self.requestHeaders.getRawHeaders(
                b"access-control-request-headers", [None]
            )[-1]
            return list(policy.preflight_headers(origin, requested))
        return list(policy.response_headers(origin))

    def apply_cors(self) -> None:
        """Put this request's CORS headers on its response."""
        for name, value in self.cors_headers():
            self.setHeader(name, value)

    def refuse(self, error: GatewayError) -> None:
        """The gateway answers ``error``: remember it, and give back the request's rate-limit
        charge unless a backend already had the request (refused requests cost nothing)."""
        self.error = error
        refund, self.refund = self.refund, None
        if refund is not None and not getattr(self.exchange, "sent", False):
            refund(self)

    def render_error(self, error: GatewayError) -> bytes:
        """Set status and headers for ``error`` and return its body (for ``render``)."""
        self.refuse(error)
        self.setResponseCode(error.status)
        self.setHeader(b"Content-Type", b"application/json")
        for name, value in (*_HYGIENE_HEADERS, *error.headers):
            self.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        body = error.body()
        self.setHeader(b"Content-Length", str(len(body)).encode())
        return body

    def send_error(self, error: GatewayError) -> None:
        """Write ``error`` as the whole response (asynchronous handlers), unless too late."""
        if self.finished or self.lost:
            return
        if self.startedWriting and self.loading_stream:
            # Our own event stream (a model was loading): the error is its last event.
            self.refuse(error)
            self.write(b"data: " + error.body() + b"\n\n")
            self.finish()
            return
        if self.startedWriting:
            # Headers are out: an error appended to a partial body would corrupt it.
            self.abort()
            return
        body = self.render_error(error)
        if self.method != b"HEAD":
            self.write(body)
        self.finish()

    def abort(self) -> None:
        """Cut the client connection so a partial response is seen as broken, not complete."""
        if self.channel is not None and self.channel.transport is not None:
            # TCP, UNIX and TLS transports all have abortConnection; ITransport does not declare it.
            cast(Any, self.channel.transport).abortConnection()

    # -- the end of a request --------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.startedWriting and not self.finished and not self.lost:
            # The head is out: a body piece goes to the transport in one write (twisted.web
            # would pass a chunk's size line, data and CRLF through three calls).
            if data:
                self.channel.transport.write(self._body_bytes(data))  # type: ignore[union-attr]
            return
        if self.first_byte_at is None and self._clock is not None:
            self.first_byte_at = self._clock.seconds()
            timer = getattr(self.exchange, "timer", None)
            if timer is not None:
                overhead = timer.first_byte_sent()
                if overhead is not None and not self.startedWriting:
                    self.set_headers(((b"X-Gateway-Overhead-Ms", b"%.2f" % (overhead * 1000)),))
        self._site.first_write(self, data)  # server.Request.write, or its fast path

    def write_piece(self, data: bytes) -> None:
        """Write one piece of a relayed body, sent at once rather than when the read ends.

        For a relay that makes one write per backend read (see ``EagerSender.write_through``);
        the same bytes as ``write``. Before the head is out, or on a connection without its
        own eager sender (TLS), this is ``write``.
        """
        sender = getattr(self.channel, "sender", None)  # (None as well for another channel)
        if sender is None or not self.startedWriting or self.finished or self.lost:
            self.write(data)
        elif data:
            sender.write_through(self._body_bytes(data))

    def _body_bytes(self, data: bytes) -> bytes:
        """A body piece as it goes on the wire once the head is out (counted, and framed as a
        chunk when the response is chunked)."""
        self.sentLength += len(data)
        return b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data

    def finish(self) -> None:
        sender = getattr(self.channel, "sender", None)  # (finishing may release the channel)
        # (http.Request.finish, or the first_write fast path's: the site's)
        getattr(self._site, "finish_request", _stock_finish)(self)
        # The response leaves first; the access log, metrics and ledger follow.
        if sender is not None:
            sender.cork.after_sending(self._record)
        else:
            self._record()

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True
        _stock_connection_lost(self, reason)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()
        self._record()

    def _record(self) -> None:
        """Tell the site's recorder (access log, metrics, ledger) about this request, once."""
        if self._recorded:
            return
        self._recorded = True
        if self._held and self._budget is not None:
            self._budget.release(self._budget_key, self._held)
            self._held = 0
        site = self._site if self._site is not None else getattr(self.channel, "site", None)
        recorder = getattr(site, "recorder", None)
        if recorder is not None:
            recorder.request_done(self)
        if self.exchange is not None and self.exchange.task is None:
            self.exchange = None  # its coroutine has ended: break request <-> exchange

    @property
    def recorded(self) -> bool:
        """True once the access log, metrics and ledger have seen this request."""
        return self._recorded

    @property
    def gone(self) -> bool:
        """True once the client disconnected or the response finished."""
        return bool(self.lost or self.finished)


@lru_cache(maxsize=2)
def _http_date(second: int) -> bytes:
    """The Date header's value for one second (requests in the same second share it)."""
    return datetimeToString(second)


def raw_response(
    error: GatewayError, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> bytes:
    """A whole HTTP/1.1 response for ``error`` that closes the connection, as bytes.

    For answers written straight to the transport, when no Request can answer (before the body
    was read, or before a request was even complete).
    """
    body = error.body()
    reason = errors.reason_phrase(error.status).decode("latin-1")
    lines = [f"HTTP/1.1 {error.status} {reason}"]
    headers = [
        ("Server", SERVER_NAME.decode()),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *_HYGIENE_HEADERS,
        *error.headers,
        *((n.decode("latin-1"), v.decode("latin-1")) for n, v in extra_headers or ()),
    ]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def server_version() -> str:
    """Version string for logs (never sent to clients)."""
    return f"llamaproxy/{__version__}"
