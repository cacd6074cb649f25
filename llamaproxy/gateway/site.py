"""The gateway's Site: our Request class, our channel, our limits, HTTP/1.1 only.

``GatewaySite`` builds a ``GatewayChannel`` (``gateway.channel``: llhttp parsing, the gateway's
limits and JSON errors) per connection, and gives it the site's limits, CORS policy and the
eager-write state; its requests are ``GatewayRequest``s, checked (``early_check``) before their
bodies are read.
"""

from __future__ import annotations

import io
import tempfile
from typing import Any, BinaryIO

from twisted.web import http, server
from twisted.web.resource import Resource

from llamaproxy.fastpath.eager_write import Cork
from llamaproxy.gateway.body_budget import BodyBudget
from llamaproxy.gateway.channel import GatewayChannel
from llamaproxy.gateway.client_address import TrustedProxies
from llamaproxy.gateway.cors import CorsPolicy
from llamaproxy.gateway.limits import RequestLimits
from llamaproxy.gateway.recorder import RequestRecorder
from llamaproxy.gateway.request import EarlyCheck, GatewayRequest, set_each
from llamaproxy.gateway.resource import GatewayResource

__all__ = ["GatewayChannel", "GatewaySite", "RequestLimits"]


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
        fast_headers: bool = False,
    ) -> None:
        super().__init__(resource, reactor=reactor)
        #: The eager-write fast path's shared state (None: connections write the stock way).
        self.cork = cork
        #: The header_fill fast path's ``fill`` for the channels (None: the stock
        #: ``Headers.addRawHeader``). Imported only when asked for: it reads Twisted's private
        #: header encoder.
        self.fill_headers: Any = None
        #: How its requests set the response headers the gateway makes itself
        #: (``GatewayRequest.set_headers``): ``set_each`` (``setRawHeaders`` each), or the
        #: header_fill fast path's ``set_values``.
        self.set_headers: Any = set_each
        #: How its requests make a response's first write (the head): twisted.web's
        #: ``server.Request.write``, or the first_write fast path's ``write``.
        self.first_write: Any = server.Request.write
        #: How its requests finish a response: twisted.web's ``server.Request.finish``, or the
        #: first_write fast path's ``finish`` (without the call of this site's ``log``, which
        #: does nothing; a subclass with its own ``log`` keeps the stock one).
        self.finish_request: Any = server.Request.finish
        #: How its requests are made and told their body is in, when the request_start fast
        #: path is on (``start_request(request, channel)``, ``request_received(request,
        #: method, uri, version)``); None: twisted.web's constructor and ``requestReceived``.
        self.start_request: Any = None
        self.request_received: Any = None
        if fast_headers:
            from llamaproxy.fastpath import first_write, header_fill, request_start

            self.fill_headers = header_fill.fill
            self.set_headers = header_fill.set_values
            self.first_write = first_write.write
            if type(self).log is GatewaySite.log:
                self.finish_request = first_write.finish
            self.start_request = request_start.start
            self.request_received = request_start.received
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

    def getContentFile(self, length: int | None) -> BinaryIO:
        """Where a request's body is kept while it arrives: in memory under 100 000 bytes,
        else a temporary file (twisted.web's own rule; defined here because its Request looks
        for the site's first, and not finding it costs an exception per request)."""
        if length is not None and length < 100_000:
            return io.BytesIO()
        return tempfile.TemporaryFile()

    @property
    def max_request_body_size(self) -> int:
        """The body limit GatewayRequest enforces."""
        return self.limits.max_body

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.limits = self.limits
        channel.cors = self.cors
        channel.cork = self.cork
        channel.fill_headers = self.fill_headers
        if self.requestFactory.requestReceived is http.Request.requestReceived:
            channel.request_received = self.request_received  # (never past an override)
        return channel

    def acceptableProtocols(self) -> list[bytes]:
        """HTTP/1.1 only: h2 (if installed) has different producer semantics."""
        return [b"http/1.1"]

    def log(self, request: http.Request) -> None:
        """The gateway resource logs each exchange with its real outcome; no second line."""
