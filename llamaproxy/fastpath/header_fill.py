"""Header fields stored as ``Headers`` holds them, from what llhttp parsed, without
re-checking each line.

The gateway's channel (``llamaproxy.gateway.channel``) gets each header line of a request from
llhttp, which has already refused a name that is not a token and a value with a CR, an LF or a
NUL in it. ``Headers.addRawHeader`` checks both again for every line: it canonicalizes the name
(``_nameEncoder.encode``, a dictionary lookup once the name was seen) and replaces line breaks in
the value (``_sanitizeLinearWhitespace``, a split and a join), three Python calls per line, six
lines a plain request.

``fill(headers, lines)`` puts the lines in ``headers`` as ``addRawHeader`` would, in order, under
the same canonical names (Twisted's own encoder and its cache: a name not seen before still goes
through ``encode``, its token check included), with one loop and no call per line for a name
already seen. The values go in as they are: llhttp lets no line break through, so the sanitizing
would return them unchanged.

``spell_name``/``cached_name`` give a name as ``Headers`` stores it (Twisted's own encoder and
cache), for the backend client's response fields (``llamaproxy.fastpath.backend_client``), and
``set_fields(target, fields)`` stores fields taken from another ``Headers`` (canonical, one line
each already) as ``setRawHeaders`` would, for the response headers copied from a backend.
``set_values(target, fields)`` stores the gateway's own response headers (its request id, rate
limits, ``Server``, ``Date``...: values it made itself, none with a line break) as
``setHeader`` would, in one pass (``setHeader`` is three Python calls and a sanitizing per
header, nine headers a plain request).

Replaces: ``Headers.addRawHeader`` for the lines of a request head and of a backend's response
head, ``Headers.setRawHeaders`` for the backend's response headers copied to the client and
(through ``Request.setHeader``) for the gateway's own. Assumes: ``Headers.addRawHeader``,
``Headers.setRawHeaders``, ``_NameEncoder.encode`` and ``_sanitizeLinearWhitespace`` exactly as
fingerprinted in ``llamaproxy.fastpath.contract``, the private ``Headers._rawHeaders`` (a dict
of canonical name to list of values) and ``_nameEncoder`` with its ``_canonicalHeaderCache``.
Gain: see docs/performance.md ("Per-request cuts").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from twisted.web.http_headers import Headers, _nameEncoder

_encode = _nameEncoder.encode
_cached = _nameEncoder._canonicalHeaderCache.get

#: ``cached_name(name)``: ``name`` as ``Headers`` stores it if Twisted's encoder has spelled it
#: before, else None. ``spell_name(name)``: always (raises ``InvalidHeaderName`` for a name that
#: is not a token, as ``addRawHeader`` does). Twisted bounds the cache (10 000 names).
cached_name = _cached
spell_name = _encode


def fill(headers: Headers, lines: list[tuple[bytes, bytes]]) -> None:
    """Add ``lines`` (name, value; as llhttp gave them) to ``headers``, as
    ``headers.addRawHeader(name, value)`` for each would."""
    raw = headers._rawHeaders
    for name, value in lines:
        key = _cached(name) or _encode(name)
        values = raw.get(key)
        if values is None:
            raw[key] = [value]
        else:
            values.append(value)


def set_fields(target: Headers, fields: Iterable[tuple[bytes, list[bytes]]]) -> None:
    """``target.setRawHeaders(name, values)`` for each of ``fields``, which are as a ``Headers``
    stores them already (its canonical names; values without line breaks, as ``getAllRawHeaders``
    gives them): what ``setRawHeaders`` would store, without spelling and cleaning each again.
    ``values`` lists are stored as given, not copied."""
    raw = target._rawHeaders
    for name, values in fields:
        raw[name] = values


def set_values(target: Headers, fields: Sequence[tuple[str | bytes, bytes]]) -> None:
    """``target.setRawHeaders(name, [value])`` for each of ``fields``, whose values have no
    line break (the gateway's own: ``setRawHeaders`` would store them unchanged). Names are
    spelled as ``setRawHeaders`` spells them (Twisted's encoder and its cache)."""
    raw = target._rawHeaders
    for name, value in fields:
        raw[_cached(name) or _encode(name)] = [value]
