"""The access log (one line per request, every status) and request ids.

- :class:`AccessLog` writes one line per request (:class:`AccessEntry`), text (sanitised,
  ``|``-separated) or JSON, buffered and written on a short timer so the reactor never waits on
  the disk for long; :meth:`AccessLog.reopen` makes logrotate's ``create`` mode work.
- :func:`request_id_from` accepts a client's ``X-Request-ID`` when it is safe, else makes a new
  one.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import sys
import unicodedata
from dataclasses import dataclass
from json.encoder import encode_basestring
from math import isfinite

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from llamaproxy.observability.logs import LogFormat, dumps_compact, iso_timestamp, worker_tag

log = Logger()


# --- request ids -------------------------------------------------------------------------------

#: The request/response header carrying the request id.
REQUEST_ID_HEADER = b"X-Request-ID"

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


#: The module ``random``'s own generator's ``getrandbits`` (bound once: no attribute lookup).
_getrandbits = random.getrandbits


def new_request_id() -> str:
    """A fresh request id: 16 hex characters (64 random bits; ids need to be unique, not secret,
    so the fast generator, not the system's CSPRNG, which cost 1 % of a request's CPU)."""
    return f"{_getrandbits(64):016x}"


def request_id_from(header_value: bytes | None) -> str:
    """The client's ``X-Request-ID`` when it is 1-128 characters of ``A-Za-z0-9._:-``, else a
    new id (so a hostile value never reaches a log line or a response header)."""
    if header_value:
        try:
            text = header_value.decode("ascii")
        except UnicodeDecodeError:
            return new_request_id()
        if _REQUEST_ID.fullmatch(text):
            return text
    return new_request_id()


# --- access log --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessEntry:
    """One request, as the access log records it.

    ``ts`` is when the request arrived (epoch seconds); ``path`` is the path without its query
    string (queries may carry secrets); ``key_id`` is None when the request had no valid key;
    ``outcome`` is a short word: ``ok``, ``client_closed``, ``timeout``, ``backend_error``,
    ``rejected``...
    """

    ts: float
    request_id: str
    key_id: str | None
    method: str
    path: str
    status: int
    duration_ms: float
    ttfb_ms: float | None = None
    bytes: int = 0
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    outcome: str = "ok"
    #: The token counts are the gateway's estimate (a stream cut before its counts came).
    tokens_estimated: bool = False
    #: The client's address (the TCP peer, or whom a trusted proxy forwarded for).
    client: str | None = None
    #: The routing decision of a ``cache_affinity`` model (``affinity_hit``, ...), else None.
    route: str | None = None


#: Longest string field written; longer values are cut and end in ``...``.
MAX_FIELD_LENGTH = 2048

#: Unicode categories replaced in text mode: controls, format characters (bidi overrides),
#: line/paragraph separators and lone surrogates.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def sanitize_field(value: str | None) -> str:
    """A text-mode field: ``-`` for None/empty; ``|``, tabs, newlines and every other control,
    format or line-separator character become ``_``; at most ``MAX_FIELD_LENGTH`` characters."""
    if not value:
        return "-"
    if len(value) > MAX_FIELD_LENGTH:
        value = value[: MAX_FIELD_LENGTH - 3] + "..."
    if value.isprintable() and "|" not in value:  # the common case: nothing to replace
        return value
    return "".join(
        "_" if ch == "|" or unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch
        for ch in value
    )


def _json_field(value: str | None) -> str | None:
    return None if value is None else _cut(value)


def _cut(value: str) -> str:
    """``value``, or its start ending in ``...`` when it is over ``MAX_FIELD_LENGTH``."""
    if len(value) > MAX_FIELD_LENGTH:
        value = value[: MAX_FIELD_LENGTH - 3] + "..."
    return value


def _ms(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.1f}ms"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


#: An ``AccessEntry``'s values in field order (``AccessEntry(*fields)`` is the entry): what the
#: recorder hands the access log when nothing else needs the entry object.
AccessFields = tuple[
    float, str, str | None, str, str, int, float, float | None, int, str | None,
    int | None, int | None, str, bool, str | None, str | None,
]


def access_fields(entry: AccessEntry) -> AccessFields:
    """``entry``'s values, in field order."""
    return (
        entry.ts, entry.request_id, entry.key_id, entry.method, entry.path, entry.status,
        entry.duration_ms, entry.ttfb_ms, entry.bytes, entry.model, entry.prompt_tokens,
        entry.completion_tokens, entry.outcome, entry.tokens_estimated, entry.client, entry.route,
    )


def format_access_text(
    entry: AccessEntry, worker_type: str | None = None, instance_id: str | None = None
) -> str:
    """One text line (with newline): ``ts | request_id | key_id | METHOD path | status |
    duration | ttfb=… | bytes=… | model=… | tokens=prompt/completion | outcome`` (plus
    client=… (plus ``| worker@instance`` when configured); ``-`` marks a missing value."""
    return _text_line(access_fields(entry), worker_type, instance_id)


def _text_line(fields: AccessFields, worker_type: str | None, instance_id: str | None) -> str:
    (ts, request_id, key_id, method, path, status, duration_ms, ttfb_ms, size, model,
     prompt_tokens, completion_tokens, outcome, tokens_estimated, client, route) = fields
    parts = [
        iso_timestamp(ts),
        sanitize_field(request_id),
        sanitize_field(key_id),
        f"{sanitize_field(method)} {sanitize_field(path)}",
        str(int(status)),
        _ms(duration_ms),
        f"ttfb={_ms(ttfb_ms)}",
        f"bytes={int(size)}",
        f"model={sanitize_field(model)}",
        f"tokens={'~' if tokens_estimated else ''}"
        f"{_count(prompt_tokens)}/{_count(completion_tokens)}",
        sanitize_field(outcome),
        f"client={sanitize_field(client)}",
    ]
    if route is not None:
        parts.append(f"route={sanitize_field(route)}")
    tag = worker_tag(worker_type, instance_id)
    if tag:
        parts.append(sanitize_field(tag))
    return " | ".join(parts) + "\n"


def format_access_json(
    entry: AccessEntry, worker_type: str | None = None, instance_id: str | None = None
) -> str:
    """One compact JSON object (with newline); ``ts`` as ISO 8601, None values as null.

    Written by hand (one line per request is on the hot path); the same text as
    ``dumps_compact`` of ``access_record``, which it falls back to when a field holds a lone
    surrogate (ASCII escapes then).
    """
    line = _json_line(access_fields(entry), worker_type, instance_id)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return dumps_compact(access_record(entry, worker_type, instance_id)) + "\n"
    return line


#: Below this, ``repr(round(ms, 1))`` (what the JSON encoder writes for ``_round_ms``) is
#: ``f"{ms:.1f}"``: ``round`` is the correctly rounded one-decimal value, and floats are closer
#: than 0.05 apart there, so no shorter decimal names the same float; the f-string costs half.
_SHORT_MS = 1e14


#: Most fragments ``_json_line`` remembers per kind; when full, it starts over (paths and
#: client addresses are the client's to vary).
_FRAGMENTS_KEPT = 256

#: ``,"key_id":…,"method":…,"path":…,"status":…`` by (key_id, method, path, status).
_HEAD_FRAGMENTS: dict[tuple[object, ...], str] = {}

#: ``,"outcome":…,"client":…`` plus route, worker_type and instance_id, by those five values.
_TAIL_FRAGMENTS: dict[tuple[object, ...], str] = {}


def _json_line(fields: AccessFields, worker_type: str | None, instance_id: str | None) -> str:
    """``format_access_json``'s line before its surrogate check: what ``access_record`` does
    to each value (``_json_field``'s cut, ``_round_ms``, null for None), written out.

    The runs of fields that repeat from request to request (key, method, path and status;
    outcome, client, route and the worker's tag) are written once and remembered as text
    (``_head_fragment``, ``_tail_fragment``): equal values write equal text."""
    (ts, request_id, key_id, method, path, status, duration_ms, ttfb_ms, size, model,
     prompt_tokens, completion_tokens, outcome, tokens_estimated, client, route) = fields
    head = _HEAD_FRAGMENTS.get((key_id, method, path, status))
    if head is None:
        head = _head_fragment(key_id, method, path, status)
    tail = _TAIL_FRAGMENTS.get((outcome, client, route, worker_type, instance_id))
    if tail is None:
        tail = _tail_fragment(outcome, client, route, worker_type, instance_id)
    return "".join((
        '{"ts":"', iso_timestamp(ts),
        '","request_id":', _json_text(request_id),
        head,
        ',"duration_ms":', _json_ms(duration_ms),
        ',"ttfb_ms":', _json_ms(ttfb_ms),
        ',"bytes":', str(int(size)),
        ',"model":', _json_text(model),
        ',"prompt_tokens":', "null" if prompt_tokens is None else str(prompt_tokens)
        if type(prompt_tokens) is int else dumps_compact(prompt_tokens),
        ',"completion_tokens":', "null" if completion_tokens is None else str(completion_tokens)
        if type(completion_tokens) is int else dumps_compact(completion_tokens),
        ',"tokens_estimated":true' if tokens_estimated else "",
        tail,
    ))


def _head_fragment(key_id: str | None, method: str, path: str, status: int) -> str:
    """``,"key_id":…,"method":…,"path":…,"status":…``, remembered in ``_HEAD_FRAGMENTS``."""
    text = "".join((
        ',"key_id":', _json_text(key_id),
        ',"method":', _json_text(method),
        ',"path":', _json_text(path),
        ',"status":', str(int(status)),
    ))
    if len(_HEAD_FRAGMENTS) >= _FRAGMENTS_KEPT:
        _HEAD_FRAGMENTS.clear()
    _HEAD_FRAGMENTS[(key_id, method, path, status)] = text
    return text


def _tail_fragment(outcome: str, client: str | None, route: str | None,
                   worker_type: str | None, instance_id: str | None) -> str:
    """``,"outcome":…,"client":…`` with route, worker_type and instance_id and the line's end,
    remembered in ``_TAIL_FRAGMENTS``."""
    text = "".join((
        ',"outcome":', _json_text(outcome),
        ',"client":', _json_text(client),
        ',"route":' + encode_basestring(route) if route else "",
        ',"worker_type":' + encode_basestring(worker_type) if worker_type else "",
        ',"instance_id":' + encode_basestring(instance_id) if instance_id else "",
        "}\n",
    ))
    if len(_TAIL_FRAGMENTS) >= _FRAGMENTS_KEPT:
        _TAIL_FRAGMENTS.clear()
    _TAIL_FRAGMENTS[(outcome, client, route, worker_type, instance_id)] = text
    return text


def _json_text(value: str | None) -> str:
    """A string field as ``access_record`` has it (``_json_field``), in JSON (the field is cut
    only when it is too long: asked first, the usual short field costs no call)."""
    if value is None:
        return "null"
    return encode_basestring(value if len(value) <= MAX_FIELD_LENGTH else _cut(value))


def _json_ms(value: float | None) -> str:
    """A duration as the encoder writes ``_round_ms(value)``: below ``_SHORT_MS``,
    ``f"{ms:.1f}"`` is that text at half the cost."""
    if value is None or not isfinite(value):
        return "null"
    if -_SHORT_MS < value < _SHORT_MS:
        return f"{value:.1f}"
    return repr(round(value, 1))


def access_record(
    entry: AccessEntry, worker_type: str | None = None, instance_id: str | None = None
) -> dict[str, object]:
    """The access log's JSON object for ``entry``, as a dict."""
    record: dict[str, object] = {
        "ts": iso_timestamp(entry.ts),
        "request_id": _json_field(entry.request_id),
        "key_id": _json_field(entry.key_id),
        "method": _json_field(entry.method),
        "path": _json_field(entry.path),
        "status": int(entry.status),
        "duration_ms": _round_ms(entry.duration_ms),
        "ttfb_ms": _round_ms(entry.ttfb_ms),
        "bytes": int(entry.bytes),
        "model": _json_field(entry.model),
        "prompt_tokens": entry.prompt_tokens,
        "completion_tokens": entry.completion_tokens,
    }
    if entry.tokens_estimated:
        record["tokens_estimated"] = True
    record["outcome"] = _json_field(entry.outcome)
    record["client"] = _json_field(entry.client)
    if entry.route:
        record["route"] = entry.route
    if worker_type:
        record["worker_type"] = worker_type
    if instance_id:
        record["instance_id"] = instance_id
    return record


def _round_ms(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 1)


def default_access_log_path(data_dir: str) -> str:
    """``DATA_DIR/logs/api_access.log`` (the older gateway's file, under the real DATA_DIR)."""
    return os.path.join(data_dir, "logs", "api_access.log")


#: Values of ACCESS_LOG / USAGE_LEDGER that turn the feature off.
OFF_VALUES = frozenset({"off", "none", "false", "no", "0", "disabled"})


def resolve_access_log(value: str | None, data_dir: str) -> str | None:
    """``ACCESS_LOG``: None/empty → the default path; ``off`` (none/false/no/0) → None
    (disabled); ``-`` → standard output; anything else is the path."""
    text = (value or "").strip()
    if not text:
        return default_access_log_path(data_dir)
    if text.lower() in OFF_VALUES:
        return None
    return text


class AccessLog:
    """The access log file: one line per request, buffered, written every ``flush_interval``
    seconds or as soon as ``max_buffer`` bytes are waiting.

    ``path`` None disables it (``record`` does nothing); ``"-"`` writes to standard output.
    The file is opened in append mode (created 0640, its directory 0750), so several writers
    and ``logrotate`` ``copytruncate`` are safe; :meth:`reopen` (on SIGHUP) closes it so the next
    write opens a new file at ``path`` (logrotate ``create`` mode). A write error is logged once
    and the lines of that batch are dropped; the log keeps trying and says when it recovers.
    """

    def __init__(
        self,
        path: str | None,
        fmt: LogFormat,
        clock: IReactorTime,
        instance_id: str | None = None,
        worker_type: str | None = None,
        flush_interval: float = 0.5,
        max_buffer: int = 64 * 1024,
    ) -> None:
        if fmt not in ("text", "json"):
            raise ValueError(f"access log format must be 'text' or 'json', not {fmt!r}")
        self.path = path or None
        self.fmt: LogFormat = fmt
        self.instance_id = instance_id or None
        self.worker_type = worker_type or None
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self._clock = clock
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._timer: IDelayedCall | None = None
        self._fd: int | None = None
        self._failing = False
        self._dropped = 0
        self._closed = False

    @property
    def enabled(self) -> bool:
        """Whether lines are written at all."""
        return self.path is not None

    def format(self, entry: AccessEntry) -> str:
        """The line ``entry`` becomes (with its newline)."""
        if self.fmt == "json":
            return format_access_json(entry, self.worker_type, self.instance_id)
        return format_access_text(entry, self.worker_type, self.instance_id)

    def record(self, entry: AccessEntry) -> None:
        """Queue one line; it is written within ``flush_interval`` seconds."""
        self.record_fields(access_fields(entry))

    def record_fields(self, fields: AccessFields) -> None:
        """``record`` for the entry ``AccessEntry(*fields)``, without building it."""
        if self.path is None or self._closed:
            return
        if self.fmt == "json":
            line = _json_line(fields, self.worker_type, self.instance_id)
            try:
                data = line.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: the JSON encoder's ASCII escapes
                record = access_record(AccessEntry(*fields), self.worker_type, self.instance_id)
                data = (dumps_compact(record) + "\n").encode("utf-8", "backslashreplace")
        else:
            data = _text_line(fields, self.worker_type, self.instance_id).encode(
                "utf-8", "backslashreplace")
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= self.max_buffer:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self.flush_interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write every queued line now."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        lines = len(self._buffer)
        self._buffer, self._buffered = [], 0
        try:
            self._write(data)
        except OSError as error:
            self._close_fd()
            self._dropped += lines
            if not self._failing:
                self._failing = True
                log.error(
                    "Cannot write the access log {path}: {error}; dropping lines until it works",
                    path=self.path, error=str(error),
                )
            return
        if self._failing:
            self._failing = False
            log.info(
                "Access log {path} writable again ({dropped} lines were lost)",
                path=self.path, dropped=self._dropped,
            )
            self._dropped = 0

    def _write(self, data: bytes) -> None:
        fd = self._open()
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        assert self.path is not None
        if self.path == "-":
            self._fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
            return self._fd
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o750, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.path, flags, 0o640)
        return self._fd

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and self.path != "-":
            with contextlib.suppress(OSError):
                os.close(fd)

    def reopen(self) -> None:
        """Flush to the current file, then close it: the next line opens ``path`` afresh (call on
        SIGHUP after logrotate renamed the file)."""
        self.flush()
        self._close_fd()
        if self.path is not None:
            log.info("Access log reopened: {path}", path=self.path)

    def close(self) -> None:
        """Flush and close; later ``record`` calls are ignored."""
        self.flush()
        self._close_fd()
        self._closed = True
