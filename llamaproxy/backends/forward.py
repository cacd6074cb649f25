"""Sending a client's request to a backend: header filtering, the client and its pool, retries.

``BackendClient`` (llamaproxy/fastpath/backend_client.py) speaks HTTP/1.1 with keep-alive. Its
pool's idle timeout stays below llama-server's 5 s keep-alive, and it never writes a request on a
pooled connection the backend has already closed. A request is sent again only when it certainly
did not run (``not_processed``), or when it is an idempotent GET/HEAD (see ``send``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from llamaproxy.fastpath.backend_client import BackendClient, HeadLines
from llamaproxy.fastpath.eager_write import Cork
from llamaproxy.gateway.client_address import FORWARDING_HEADERS

log = Logger()

_DONE = Failure(ConnectionDone())

#: How long an idle backend connection is kept: under llama-server's 5 s keep-alive.
_IDLE_TIMEOUT = 4.0

#: Hop-by-hop headers (RFC 9110 7.6.1 and common legacy ones): never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
        b"proxy-connection", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
    }
)

#: Request headers the backend never sees: the client's credentials, framing the client redoes,
#: cookies, encodings that would stop a stream from passing through untouched, and the
#: client's own forwarding headers (the gateway sends the ones it built, see client_address).
_REQUEST_DROP = HOP_BY_HOP | FORWARDING_HEADERS | {
    b"host", b"content-length", b"authorization", b"x-api-key", b"expect", b"cookie",
    b"accept-encoding",
}

#: Response headers the client never sees from the backend: framing Twisted redoes, headers
#: twisted.web sets itself, and the backend's CORS (llama-server echoes any Origin).
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"date", b"server", b"set-cookie"}


def _connection_tokens(headers: Headers) -> set[bytes]:
    return _tokens(headers.getRawHeaders(b"connection", []))


def _tokens(values: Iterable[bytes]) -> set[bytes]:
    """The lower-cased tokens of a Connection header's values."""
    tokens: set[bytes] = set()
    for value in values:
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def filter_request_headers(client: Headers, backend_key: str | None) -> Headers:
    """Headers for the backend: end-to-end client headers plus the backend's own key."""
    drop = _REQUEST_DROP | _connection_tokens(client)
    out = Headers()
    for name, values in client.getAllRawHeaders():
        if name.lower() not in drop:
            out.setRawHeaders(name, list(values))
    if backend_key:
        out.setRawHeaders(b"authorization", [b"Bearer " + backend_key.encode("ascii")])
    return out


#: Canonical spellings (as ``Headers`` stores names) of the extra header names ``send`` was
#: given: a handful of constants.
_CANONICAL_NAMES: dict[bytes, bytes] = {}


def _canonical_name(name: bytes) -> bytes:
    """``name`` as ``Headers`` spells it (and checks it: not a token raises, as there)."""
    canonical = _CANONICAL_NAMES.get(name)
    if canonical is None:
        spelled = Headers()
        spelled.setRawHeaders(name, [b""])
        canonical = next(iter(spelled.getAllRawHeaders()))[0]
        if len(_CANONICAL_NAMES) < 64:
            _CANONICAL_NAMES[name] = canonical
    return canonical


def _one_line(value: bytes) -> bytes:
    """``value`` as ``Headers`` stores it: line breaks become spaces."""
    if b"\r" in value or b"\n" in value:
        return b" ".join(value.splitlines())
    return value


def request_fields(
    client: Headers, backend_key: str | None, extra_headers: Iterable[tuple[bytes, bytes]] = ()
) -> dict[bytes, list[bytes]]:
    """The header fields ``filter_request_headers`` and then setting each of ``extra_headers``
    would give, in the same order, without the ``Headers`` in between: what ``send`` writes
    with ``BackendClient.request_fields``. (``client``'s fields are stored canonical and on one
    line already: a ``Headers`` never holds them otherwise.)"""
    out: dict[bytes, list[bytes]] = {}
    connection: Sequence[bytes] = ()
    for name, values in client.getAllRawHeaders():
        lowered = name.lower()
        if lowered in _REQUEST_DROP:
            if lowered == b"connection":
                connection = values
            continue
        out[name] = list(values)
    if connection:
        nominated = _tokens(connection)
        if nominated:
            out = {name: values for name, values in out.items()
                   if name.lower() not in nominated}
    if backend_key:
        out[b"Authorization"] = [_one_line(b"Bearer " + backend_key.encode("ascii"))]
    for name, value in extra_headers:
        # (_canonical_name and _one_line, their usual case inline: two calls a header less)
        canonical = _CANONICAL_NAMES.get(name)
        if canonical is None:
            canonical = _canonical_name(name)
        if b"\r" in value or b"\n" in value:
            value = _one_line(value)
        out[canonical] = [value]
    return out


#: The ``Authorization`` line a backend key is sent with, by key (a few constants).
_AUTH_LINES: dict[str, bytes] = {}

#: Extra header names (as given) whose field ``request_head`` may write at once as its line,
#: by their canonical spelling: the client's own field of that name is never forwarded, and
#: it is none that ``BackendClient`` writes itself (Host, Content-Length, Transfer-Encoding)
#: or the backend key's Authorization; so no other field can take its place.
_LINE_EXTRAS: dict[bytes, bytes] = {}

_NOT_LINE_EXTRAS = frozenset({b"Host", b"Content-Length", b"Transfer-Encoding", b"Authorization"})


#: What ``request_head`` does with a client's field, by name (as ``Headers`` spells it; a few
#: hundred names at most are remembered): forward it (0), drop it (_DROP), or drop it and read
#: it as the Connection field (_CONNECTION). Names are looked up with their hash kept (the
#: channel's names are Twisted's encoder's cached spellings): no ``lower()`` per field.
_CLIENT_FIELDS: dict[bytes, int] = {}
_DROP, _CONNECTION = 1, 2


def _client_field(name: bytes) -> int:
    lowered = name.lower()
    kind = (_CONNECTION if lowered == b"connection" else _DROP) if lowered in _REQUEST_DROP else 0
    if len(_CLIENT_FIELDS) < 512:
        _CLIENT_FIELDS[name] = kind
    return kind


def _auth_line(backend_key: str) -> bytes:
    line = b"Authorization: " + _one_line(b"Bearer " + backend_key.encode("ascii")) + b"\r\n"
    if len(_AUTH_LINES) < 64:
        _AUTH_LINES[backend_key] = line
    return line


def _line_extra(name: bytes) -> bytes | None:
    """``name``'s canonical spelling when ``request_head`` may write it as it comes, else None
    (``_canonical_name``'s error for a name that is no token)."""
    canonical = _canonical_name(name)
    if canonical.lower() not in _REQUEST_DROP or canonical in _NOT_LINE_EXTRAS:
        return None
    if len(_LINE_EXTRAS) < 64:
        _LINE_EXTRAS[name] = canonical
    return canonical


def request_head(
    client: Headers, backend_key: str | None, extra_headers: Sequence[tuple[bytes, bytes]] = ()
) -> Mapping[bytes, Sequence[bytes]]:
    """``request_fields``'s fields, written as the head's lines in the same pass (a
    ``HeadLines``, which ``BackendClient.request_fields`` writes as they are) in the usual
    case; else ``request_fields`` itself (a client's Connection field naming another field,
    an extra header that a client's field or another extra header of the same name would
    have replaced, or one the backend client writes itself)."""
    lines: list[bytes] = []
    add = lines.extend
    connection: Sequence[bytes] = ()
    for name, values in client.getAllRawHeaders():
        kind = _CLIENT_FIELDS.get(name)
        if kind is None:
            kind = _client_field(name)
        if kind:
            if kind == _CONNECTION:
                connection = values
            continue
        for value in values:
            add((name, b": ", value, b"\r\n"))
    if connection and not _tokens(connection) <= _REQUEST_DROP:
        return request_fields(client, backend_key, extra_headers)  # (it drops a kept field)
    if backend_key:
        auth = _AUTH_LINES.get(backend_key)
        lines.append(auth if auth is not None else _auth_line(backend_key))
    own: list[bytes] = []
    connection = ()
    for name, value in extra_headers:
        canonical = _LINE_EXTRAS.get(name)
        if canonical is None:
            canonical = _line_extra(name)
            if canonical is None:
                return request_fields(client, backend_key, extra_headers)
        if canonical in own:
            return request_fields(client, backend_key, extra_headers)  # (set twice)
        own.append(canonical)
        if 13 in value or 10 in value:  # (CR, LF: an int needle builds no TypeError first)
            value = _one_line(value)
        if canonical == b"Connection":
            connection = (value,)
        add((canonical, b": ", value, b"\r\n"))
    return HeadLines(b"".join(lines), connection)


#: Whether a response field is copied to the client, by the name's spelling as received, when
#: no Connection field names more to drop: decided once per spelling (at most 256 remembered;
#: a backend sends the same few), instead of a ``lower()`` and a ``startswith`` per field.
_RESPONSE_KEPT: dict[bytes, bool] = {}


def _response_field_kept(name: bytes, drop: frozenset[bytes] | set[bytes]) -> bool:
    """Whether ``name`` is an end-to-end field to copy (not in ``drop``, not backend CORS)."""
    lowered = name.lower()
    return lowered not in drop and not lowered.startswith(b"access-control-")


def filter_response_headers(backend: Headers) -> list[tuple[bytes, list[bytes]]]:
    """End-to-end response headers to copy to the client (no hop-by-hop, no backend CORS)."""
    connection = backend.getRawHeaders(b"connection")
    if connection:
        drop = _RESPONSE_DROP | _tokens(connection)
        return [(name, list(values)) for name, values in backend.getAllRawHeaders()
                if _response_field_kept(name, drop)]
    kept = _RESPONSE_KEPT
    fields = []
    for name, values in backend.getAllRawHeaders():
        keep = kept.get(name)
        if keep is None:
            keep = _response_field_kept(name, _RESPONSE_DROP)
            if len(kept) < 256:
                kept[name] = keep
        if keep:
            fields.append((name, list(values)))
    return fields


@implementer(IBodyProducer)
class BytesBody:
    """A request body already in memory, written in one go (no Cooperator needed).

    ``in_memory`` lets ``BackendClient`` send it with the request head without producing it.
    """

    def __init__(self, data: bytes) -> None:
        self.in_memory = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.in_memory)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the body is written at once."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """Client endpoints per (scheme, host, port), built once instead of once per request.

    Backends are a few fixed addresses, so their endpoints are cached (Twisted's Agent made a
    HostnameEndpoint per request, IDNA-encoding the host each time: a tenth of the gateway's
    CPU per request in the profile); an IP literal gets a plain TCP endpoint (no name
    resolution on the thread pool); ``https`` backends are wrapped in TLS with Twisted's
    browser-like certificate checks.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.policy = BrowserLikePolicyForHTTPS()
        self._cache: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            endpoint = self._cache[key] = self._build(uri)
        return endpoint

    def _build(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self.reactor, host, uri.port, self.connect_timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self.reactor, host, uri.port, self.connect_timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, host, uri.port, self.connect_timeout)
        if uri.scheme == b"https":
            creator = self.policy.creatorForNetloc(uri.host, uri.port)
            return wrapClientTLS(creator, endpoint)
        if uri.scheme != b"http":
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
        return endpoint


def make_client(
    reactor: Any, max_idle_per_host: int, connect_timeout: float, cork: Cork | None = None
) -> BackendClient:
    """The fast path's client requests are forwarded with: cached endpoints, a keep-alive pool,
    eager writes sharing ``cork`` with the gateway's client connections."""
    return BackendClient(
        reactor, CachedEndpoints(reactor, connect_timeout), max(2, max_idle_per_host),
        idle_timeout=_IDLE_TIMEOUT, cork=cork,
    )


def make_agent(
    reactor: Any, max_idle_per_host: int, connect_timeout: float
) -> tuple[StockAgent, HTTPConnectionPool]:
    """The stock client (fast paths off): Twisted's ``Agent`` over a persistent
    ``HTTPConnectionPool``, with the same endpoints and idle timeout as ``make_client``. Twisted's
    own retry of a failed idempotent request is off: re-sends are the gateway's decision
    (``send``), the same on both paths."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max(2, max_idle_per_host)
    pool.cachedConnectionTimeout = int(_IDLE_TIMEOUT)
    pool.retryAutomatically = False
    return StockAgent(reactor, CachedEndpoints(reactor, connect_timeout), pool), pool


@implementer(IAgent)
class StockAgent:
    """Twisted's ``Agent`` with its keep-alive pool, minus one defect: Twisted pools the
    connection of an HTTP/1.0 response that did not say ``keep-alive``, which the server closes
    after it (RFC 9112 9.3), and a POST written there before the close is seen is lost (and,
    written whole, never sent again: a 502). The first such response from an upstream closes
    the pool's idle connections as its body ends, and later requests to that upstream go on
    fresh connections that are not pooled. (``BackendClient``, the fast path, reads the
    version itself.)"""

    def __init__(self, reactor: Any, endpoints: CachedEndpoints, pool: HTTPConnectionPool) -> None:
        self.pool = pool
        self._pooled = Agent.usingEndpointFactory(reactor, endpoints, pool)
        self._unpooled = Agent.usingEndpointFactory(
            reactor, endpoints, HTTPConnectionPool(reactor, persistent=False))
        #: Upstreams (scheme, host, port) that close the connection after each response.
        self.closing: set[tuple[bytes, bytes, int]] = set()

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,  # noqa: N803 - IAgent's name
    ) -> Deferred[IResponse]:
        parsed = URI.fromBytes(uri)
        upstream = (parsed.scheme, parsed.host, parsed.port)
        if headers is not None and b"close" in _connection_tokens(headers):
            # The caller will not reuse this connection (a stream: llama-server closes after
            # it). Twisted's pool would still take it back, unless the response says close,
            # and the next request written there before the close is seen is lost (RFC 9112
            # 9.6: no request after one that says close). Twisted's unpooled Agent says it.
            kept = headers.copy()
            kept.removeHeader(b"Connection")
            return self._unpooled.request(method, uri, kept, bodyProducer)
        if upstream in self.closing:
            return self._unpooled.request(method, uri, headers, bodyProducer)
        sending = self._pooled.request(method, uri, headers, bodyProducer)
        return sending.addCallback(self._checked, upstream)

    def _checked(self, response: IResponse,
                 upstream: tuple[bytes, bytes, int]) -> IResponse:
        if tuple(response.version[1:]) >= (1, 1):
            return response
        tokens = b",".join(response.headers.getRawHeaders(b"connection", [])).lower()
        if b"keep-alive" in tokens:
            return response
        self.closing.add(upstream)
        return cast(IResponse, _ClosingResponse(response, self.pool))


@implementer(IResponse)
class _ClosingResponse:
    """A response whose connection must not be used again: when its body ends (by then
    Twisted has put the connection back in the pool), the pool's idle connections close."""

    def __init__(self, response: IResponse, pool: HTTPConnectionPool) -> None:
        self._response = response
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._response, name)

    def deliverBody(self, protocol: Any) -> None:
        self._response.deliverBody(_BodyThenClose(protocol, self._pool))


class _BodyThenClose(Protocol):
    """Passes a body on; closes the pool's idle connections before telling the body ended."""

    def __init__(self, inner: Any, pool: HTTPConnectionPool) -> None:
        self.inner = inner
        self.pool = pool

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.pool.closeCachedConnections()
        self.inner.connectionLost(reason)


#: Methods whose repetition changes nothing (RFC 9110 9.2.2) and that the gateway sends bodiless.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})


def not_processed(failure_value: BaseException) -> bool:
    """True when the backend certainly did not process the request: it never got all of it.

    The connection was never made (refused, no route, name not found, connect timeout), the
    request was not written at all (``RequestNotSent``), or its writing failed part-way
    (``RequestTransmissionFailed``: a backend cannot act on half a request). A request that was
    written whole and then got no answer (``ResponseNeverReceived``) may have run: a backend
    can read the whole POST, generate, and die (or close) before answering.
    """
    from twisted.internet.error import ConnectError, DNSLookupError
    from twisted.web.client import RequestNotSent, RequestTransmissionFailed

    return isinstance(
        failure_value, (ConnectError, DNSLookupError, RequestNotSent, RequestTransmissionFailed)
    )


def may_resend(method: bytes, failure_value: BaseException, any_request: bool = False) -> bool:
    """May a request that failed with ``failure_value`` be sent again (here or elsewhere)?

    Yes when it was certainly not processed, when it is idempotent, or when the backend's
    operator said repeats are harmless (``retry_non_idempotent = true``: ``any_request``).
    """
    return any_request or method in IDEMPOTENT_METHODS or not_processed(failure_value)


def _lost_before_answer(failure_value: BaseException) -> bool:
    """True when a connection closed after the request was written, before any answer."""
    from twisted.internet.error import ConnectionDone, ConnectionLost
    from twisted.web.client import ResponseNeverReceived

    return isinstance(failure_value, ResponseNeverReceived) and all(
        r.check(ConnectionDone, ConnectionLost) for r in failure_value.reasons
    )


#: Methods sent with a body (and its length) even when it is empty.
_WITH_BODY = (b"POST", b"PUT", b"PATCH")


def send(
    agent: IAgent,
    url: bytes,
    backend_key: str | None,
    method: bytes,
    client_headers: Headers,
    body: bytes,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
) -> Deferred[IResponse]:
    """Send one request to ``url``; send it once more only if it certainly did not run.

    ``BackendClient`` already never writes a request on a pooled connection the backend has
    closed (it checks before writing). What is left to retry here: a request that was not, or
    not completely, written (``RequestNotSent``, ``RequestTransmissionFailed``), and an
    idempotent bodiless request (GET, HEAD) whose connection closed before an answer, as
    Twisted's own pool does. A POST that was written whole is never sent twice by this.

    A Deferred, not a coroutine: this is on every request's path, and cancelling it cancels
    whichever attempt is in flight.
    """
    sending, again = send_first(agent, url, backend_key, method, client_headers, body,
                                extra_headers)
    # (the retry's arguments in the errback's, not in closures made for every request)
    return sending.addErrback(retry, *again)


#: What ``retry`` needs besides the failure: the first attempt's agent, method, URL, header
#: fields, body and whether it has one (``send_first``).
RetryArgs = tuple[IAgent, bytes, bytes, "Mapping[bytes, Sequence[bytes]] | Headers", bytes, bool]


def send_first(
    agent: IAgent,
    url: bytes,
    backend_key: str | None,
    method: bytes,
    client_headers: Headers,
    body: bytes,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
) -> tuple[Deferred[IResponse], RetryArgs]:
    """``send``'s first attempt alone, and the arguments of its second: ``send`` is the first
    attempt's Deferred with ``retry(failure, *args)`` as its errback. For a caller that handles
    the first attempt's failure itself (and then calls ``retry``), without a pass-through
    errback on every answer's way."""
    with_body = True if body else method in _WITH_BODY
    # The fast path's client writes the fields as they are: no Headers between.
    if isinstance(agent, BackendClient):
        fields = request_head(client_headers, backend_key, extra_headers)
        # (_attempt, inline)
        sending = agent.request_fields(method, url, fields, BytesBody(body) if with_body else None)
        return sending, (agent, method, url, fields, body, with_body)
    headers = filter_request_headers(client_headers, backend_key)
    for name, value in extra_headers:
        headers.setRawHeaders(name, [value])
    return (_attempt(agent, method, url, headers, body, with_body),
            (agent, method, url, headers, body, with_body))



def _attempt(
    agent: IAgent, method: bytes, url: bytes, headers: Mapping[bytes, Sequence[bytes]] | Headers,
    body: bytes, with_body: bool,
) -> Deferred[IResponse]:
    """One send of a request ``send`` prepared (``headers``: fields for a ``BackendClient``)."""
    producer = BytesBody(body) if with_body else None
    if isinstance(headers, Headers):
        return agent.request(method, url, headers, producer)
    client: BackendClient = agent  # type: ignore[assignment]
    return client.request_fields(method, url, headers, producer)


def retry(
    failure: Failure, agent: IAgent, method: bytes, url: bytes,
    headers: Mapping[bytes, Sequence[bytes]] | Headers, body: bytes, with_body: bool,
) -> Deferred[IResponse]:
    """``send``'s one second try, when the first certainly did not run (``_send_again``);
    else ``failure``, failed."""
    if not _send_again(failure.value, method, with_body):
        return fail(failure)
    log.debug("Sending {method} {url} again on a fresh connection", method=method, url=url)
    return _attempt(agent, method, url, headers, body, with_body)


def _send_again(failure_value: BaseException | None, method: bytes, with_body: bool) -> bool:
    """The request went (partly) unwritten, or an idempotent one lost its connection."""
    from twisted.web.client import RequestNotSent, RequestTransmissionFailed

    if isinstance(failure_value, (RequestNotSent, RequestTransmissionFailed)):
        return True
    return (
        failure_value is not None and not with_body and method in IDEMPOTENT_METHODS
        and _lost_before_answer(failure_value)
    )
