"""Sending a client's request to a backend: header filtering, the client and its pool, retries.

``BackendClient`` (llamaproxy/gateway/backend_client.py) speaks HTTP/1.1 with keep-alive. Its
pool's idle timeout stays below llama-server's 5 s keep-alive, and a request that fails because a
pooled connection was closed under it (the backend never saw it) is sent once more on a fresh
connection.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from llamaproxy.gateway.backend_client import BackendClient

log = Logger()

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
#: cookies, and encodings that would stop a stream from passing through untouched.
_REQUEST_DROP = HOP_BY_HOP | {
    b"host", b"content-length", b"authorization", b"x-api-key", b"expect", b"cookie",
    b"accept-encoding",
}

#: Response headers the client never sees from the backend: framing Twisted redoes, headers
#: twisted.web sets itself, and the backend's CORS (llama-server echoes any Origin).
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"date", b"server", b"set-cookie"}


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
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


def filter_response_headers(backend: Headers) -> Iterable[tuple[bytes, list[bytes]]]:
    """End-to-end response headers to copy to the client (no hop-by-hop, no backend CORS)."""
    drop = _RESPONSE_DROP | _connection_tokens(backend)
    for name, values in backend.getAllRawHeaders():
        lowered = name.lower()
        if lowered in drop or lowered.startswith(b"access-control-"):
            continue
        yield name, list(values)


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


def make_client(reactor: Any, max_idle_per_host: int, connect_timeout: float) -> BackendClient:
    """The client requests are forwarded with: cached endpoints, a keep-alive pool."""
    return BackendClient(
        reactor, CachedEndpoints(reactor, connect_timeout), max(2, max_idle_per_host),
        idle_timeout=_IDLE_TIMEOUT,
    )


def _stale_connection(failure_value: BaseException) -> bool:
    """True when a pooled connection died before the backend read our request."""
    from twisted.web._newclient import RequestNotSent, RequestTransmissionFailed
    from twisted.web.client import ResponseNeverReceived

    if isinstance(failure_value, (RequestNotSent, RequestTransmissionFailed)):
        return True
    if isinstance(failure_value, ResponseNeverReceived):
        from twisted.internet.error import ConnectionDone, ConnectionLost

        return all(r.check(ConnectionDone, ConnectionLost) for r in failure_value.reasons)
    return False


def send(
    agent: IAgent,
    url: bytes,
    backend_key: str | None,
    method: bytes,
    client_headers: Headers,
    body: bytes,
) -> Deferred[IResponse]:
    """Send one request to ``url``; retry once if a stale pooled connection swallowed it.

    A Deferred, not a coroutine: this is on every request's path, and cancelling it cancels
    whichever attempt is in flight.
    """
    headers = filter_request_headers(client_headers, backend_key)
    with_body = bool(body) or method in (b"POST", b"PUT", b"PATCH")

    def retry(failure: Failure) -> Deferred[IResponse]:
        if failure.value is None or not _stale_connection(failure.value):
            return fail(failure)
        log.debug("Retrying {method} {url} on a fresh connection", method=method, url=url)
        return agent.request(method, url, headers, BytesBody(body) if with_body else None)

    sending = agent.request(method, url, headers, BytesBody(body) if with_body else None)
    return sending.addErrback(retry)
