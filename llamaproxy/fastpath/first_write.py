"""A gateway response's first write without ``server.Request.write``'s two header lookups.

twisted.web's ``server.Request.write`` looks up the response's Content-Type and Content-Length
before the first write, to add ``defaultContentType`` when it is missing; the gateway's
requests have none (``GatewayRequest.defaultContentType = None``), so the two lookups
(``getRawHeaders``, ~3 000 instructions each) decide nothing. It then hands the data to
``http.Request.write`` unless it fakes a HEAD request or encodes the body; the gateway does
neither on its own resources, but a resource may (twisted.web's HEAD-from-GET), so
``write(request, data)`` checks both and goes through ``server.Request.write`` when either
holds.

Replaces: ``server.Request.write`` for the first write of a response (the later ones go
straight to the transport: ``GatewayRequest.write``). Assumes: ``server.Request.write`` exactly
as fingerprinted in ``llamaproxy.fastpath.contract``, its private ``_inFakeHead`` and
``_encoder``. Gain: see docs/performance.md ("Per-request cuts").
"""

from __future__ import annotations

from typing import Any

from twisted.web import http, server

_server_write = server.Request.write
_http_write = http.Request.write


def write(request: Any, data: bytes) -> None:
    """``server.Request.write(request, data)`` for a request whose ``defaultContentType`` is
    None (the Content-Type it might add is never added)."""
    if request._inFakeHead or request._encoder is not None:
        _server_write(request, data)
    else:
        _http_write(request, data)
