"""A gateway response's first write without ``server.Request.write``'s two header lookups and
``http.Request.write``'s one.

twisted.web's ``server.Request.write`` looks up the response's Content-Type and Content-Length
before the first write, to add ``defaultContentType`` when it is missing; the gateway's
requests have none (``GatewayRequest.defaultContentType = None``), so the two lookups
(``getRawHeaders``, ~3 000 instructions each) decide nothing. It then hands the data to
``http.Request.write`` unless it fakes a HEAD request or encodes the body; the gateway does
neither on its own resources, but a resource may (twisted.web's HEAD-from-GET), so
``write(request, data)`` checks both and goes through ``server.Request.write`` when either
holds.

``http.Request.write``'s first write looks the Content-Length up again (``getRawHeaders``) to
decide whether to chunk the body, and marks a chunked response with ``setRawHeaders`` (the
name's encoding and the value's sanitizing); ``write`` does the same in the response's field
map (``Headers._rawHeaders``: the canonical names Twisted's encoder spells, its constant
value), and leaves the rare first writes (a request already finished or disconnected, or one
with ``lastModified``, an ``etag`` or cookies to send) to ``http.Request.write``.

``finish(request)`` is ``server.Request.finish`` without ``http.Request.finish``'s call of the
site's ``log`` (a Python call per request) for a site whose ``log`` does nothing
(``GatewaySite``'s: the gateway logs each exchange itself); a request with an encoder (which the
gateway's resources never set) goes through ``server.Request.finish``.

Replaces: ``server.Request.write`` and ``http.Request.write`` for the first write of a response
(the later ones go straight to the transport: ``GatewayRequest.write``), and
``server.Request.finish`` and ``http.Request.finish``. Assumes: the four exactly as fingerprinted in
``llamaproxy.fastpath.contract``, ``server.Request``'s private ``_inFakeHead`` and ``_encoder``,
``http.Request``'s private ``_disconnected`` and ``_cleanup``, and the private
``Headers._rawHeaders``. Gain: see docs/performance.md ("Per-request cuts").
"""

from __future__ import annotations

from typing import Any

from twisted.web import http, server

_server_write = server.Request.write
_http_write = http.Request.write
_server_finish = server.Request.finish
_NO_BODY_CODES = http.NO_BODY_CODES
_to_chunk = http.toChunk


def write(request: Any, data: bytes) -> None:
    """``server.Request.write(request, data)`` for a request whose ``defaultContentType`` is
    None (the Content-Type it might add is never added)."""
    if request._inFakeHead or request._encoder is not None:
        _server_write(request, data)
    elif (request.startedWriting or request.finished or request._disconnected
          or request.lastModified is not None or request.etag is not None or request.cookies):
        _http_write(request, data)
    else:
        _first_write(request, data)


def _first_write(request: Any, data: bytes) -> None:
    """``http.Request.write(request, data)``'s first write, without Last-Modified, ETag and
    Set-Cookie headers to add."""
    request.startedWriting = 1
    version = request.clientproto
    code = request.code
    headers = request.responseHeaders
    raw = headers._rawHeaders
    no_body = code in _NO_BODY_CODES
    if (version == b"HTTP/1.1" and not raw.get(b"Content-Length")
            and request.method != b"HEAD" and not no_body):
        raw[b"Transfer-Encoding"] = [b"chunked"]
        request.chunked = 1
    channel = request.channel
    channel.writeHeaders(version, b"%d" % (code,), request.code_message, headers)
    if request.method == b"HEAD" or no_body:
        request.write = _swallow
        return
    request.sentLength = request.sentLength + len(data)
    if data:
        if request.chunked:
            channel.writeSequence(_to_chunk(data))
        else:
            channel.write(data)


def _swallow(data: bytes) -> None:
    """A response without a body (HEAD, 204, 304) writes nothing more, as twisted.web's
    ``lambda data: None``."""


def finish(request: Any) -> None:
    """``server.Request.finish(request)`` for a request whose site's ``log`` does nothing: the
    same steps, in their order, without that call."""
    if request._encoder is not None or request._disconnected or request.finished:
        _server_finish(request)  # (the encoder's end; or http.Request.finish's error or warning)
        return
    if not request.startedWriting:
        request.write(b"")
    if request.chunked:
        request.channel.write(b"0\r\n\r\n")
    request.finished = 1
    if not request.queued:
        request._cleanup()
