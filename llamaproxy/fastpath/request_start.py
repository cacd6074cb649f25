"""A gateway request made and received without twisted.web's constructors and form lookup.

The gateway's channel (``llamaproxy.gateway.channel``) makes one ``GatewayRequest`` per
request and calls its ``requestReceived`` once the body is in. twisted.web's constructor is
three calls deep (``server.Request.__init__`` repacks its arguments for ``http.Request.__init__``,
then ``Componentized.__init__``) to set a dozen attributes, and ``http.Request.requestReceived``
looks up the Content-Type (``getRawHeaders``, ~3 000 instructions) only to decide whether to
parse a form, which a request made with ``parsePOSTFormSubmission=False`` (every gateway
request) never does.

``start(request, channel)`` sets what ``server.Request.__init__(request, channel,
parsePOSTFormSubmission=False)`` sets, the same attributes to the same values, in one call.
``received(request, command, path, version)`` does what ``http.Request.requestReceived``
does for a request that parses no form (one whose ``_parsePOSTFormSubmission`` is true goes
through it).

Replaces: ``server.Request.__init__`` (with ``http.Request.__init__`` and
``Componentized.__init__``) for the gateway's requests, and ``http.Request.requestReceived``
for those that parse no form. Assumes: the four exactly as fingerprinted in
``llamaproxy.fastpath.contract`` (they set the attributes ``start`` sets), the private
``_parsePOSTFormSubmission`` and ``_adapterCache``. Gain: see docs/performance.md
("Per-request cuts").
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import Request, parse_qs
from twisted.web.http_headers import Headers

_stock_received = Request.requestReceived


def start(request: Any, channel: Any) -> None:
    """``server.Request.__init__(request, channel, parsePOSTFormSubmission=False)``."""
    # (http.Request.__init__, in its order)
    request.notifications = []
    request.channel = channel
    request.client = channel.getPeer()
    request.host = channel.getHost()
    request.requestHeaders = Headers()
    request.received_cookies = {}
    request.responseHeaders = Headers()
    request.cookies = []
    request.transport = channel.transport
    request.queued = False
    request._parsePOSTFormSubmission = False
    # (Componentized.__init__)
    request._adapterCache = {}


def received(request: Any, command: bytes, path: bytes, version: bytes) -> None:
    """``request.requestReceived(command, path, version)``: the body is in."""
    if request._parsePOSTFormSubmission:
        _stock_received(request, command, path, version)
        return
    request.content.seek(0, 0)
    request.method, request.uri = command, path
    request.clientproto = version
    parts = path.split(b"?", 1)
    if len(parts) == 1:
        request.path = path
        request.args = {}
    else:
        request.path, argstring = parts
        request.args = parse_qs(argstring, 1)
    request.process()
