"""Log output: the JSON and text log observers for twistd (the access log is access_log.py).

Free of the global reactor:

- **Application log observers.** :class:`JSONLogObserver` writes one compact JSON object per line
  (``ts``, ``level``, ``msg``, ``ns``, the event's scalar fields, ``exc`` for failures, and
  ``worker_type`` / ``instance_id`` when configured); :func:`text_log_observer` is Twisted's
  readable format with the worker/instance tag added. Under twistd, the root service hands one to
  :func:`install_observer` from its ``setServiceParent``: twistd's ``AppLogger.start`` then uses
  the application's ``ILogObserver`` component (unless ``--logger`` was given, which always
  wins). :func:`json_observer_factory` is the ``twistd --logger=...`` alternative.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum
from functools import lru_cache
from math import floor, isfinite
from typing import IO, Any, Literal

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    Logger,
    LoggingFile,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    eventAsText,
    formatEvent,
)
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface import implementer

log = Logger()

LogFormat = Literal["text", "json"]

#: Our names for Twisted's log levels (``warn``, as the older gateway wrote it).
LEVEL_NAMES: Mapping[LogLevel, str] = {
    LogLevel.debug: "debug",
    LogLevel.info: "info",
    LogLevel.warn: "warn",
    LogLevel.error: "error",
    LogLevel.critical: "critical",
}

#: Keys of the JSON record that belong to us; an event field with one of these names is written
#: as ``<name>_`` instead.
RESERVED_KEYS = frozenset({"ts", "level", "msg", "ns", "exc", "worker_type", "instance_id"})

#: Keys that twisted.python.log (legacy) events carry besides ``log_*``: never fields of ours.
_LEGACY_KEYS = frozenset({"message", "isError", "system", "time", "format", "failure", "why"})


def parse_log_format(text: str) -> LogFormat:
    """``LOG_FORMAT``: ``text`` or ``json`` (case-insensitive); anything else is a ValueError."""
    value = text.strip().lower()
    if value == "text":
        return "text"
    if value == "json":
        return "json"
    raise ValueError(f"LOG_FORMAT must be 'text' or 'json', not {text!r}")


def iso_timestamp(seconds: float) -> str:
    """ISO 8601 UTC with milliseconds and ``Z``: ``2026-05-01T12:00:00.123Z``."""
    # The second of the last timestamp made, and its text (the lines of a second share it):
    # ``seconds - whole`` is exact, so ``0 <= offset < 1`` is ``floor(seconds) == whole``.
    offset = seconds - _last_second[0]
    if 0.0 <= offset < 1.0:
        micros = round(offset * 1e6)  # datetime rounds to microseconds, then truncates
        if micros < 1_000_000:
            return _last_second[1] + _MILLISECONDS[micros // 1000]
    return _iso_timestamp(seconds)


def _iso_timestamp(seconds: float) -> str:
    """``iso_timestamp`` worked out in full (and its second remembered for the next call)."""
    if not isfinite(seconds):
        return _EPOCH
    whole = floor(seconds)
    micros = round((seconds - whole) * 1e6)  # datetime rounds to microseconds, then truncates
    if micros >= 1_000_000:
        whole, micros = whole + 1, 0
    prefix = _second_prefix(whole)
    if prefix is None:
        return _EPOCH
    _last_second[:] = (whole, prefix)
    return prefix + _MILLISECONDS[micros // 1000]


_EPOCH = "1970-01-01T00:00:00.000Z"
#: [whole second, its ``2026-05-01T12:00:00`` prefix] of the last timestamp worked out.
_last_second: list[Any] = [math.inf, ""]
#: ``.000Z`` to ``.999Z``: a timestamp's tail by its milliseconds (cheaper than formatting it).
_MILLISECONDS = tuple(f".{ms:03d}Z" for ms in range(1000))


@lru_cache(maxsize=4)
def _second_prefix(whole: int) -> str | None:
    """``2026-05-01T12:00:00`` for a whole second (the log lines of a second share it)."""
    try:
        return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return None


def _scalar(value: object) -> tuple[bool, object]:
    """(True, a JSON-safe scalar) for str/int/float/bool/None (and enums of those), else
    (False, None). Non-finite floats become strings: bare NaN is not JSON."""
    if isinstance(value, Enum):
        value = value.value if isinstance(value.value, str | int | float | bool) else value.name
    if value is None or isinstance(value, str | bool | int):
        return True, value
    if isinstance(value, float):
        return True, value if math.isfinite(value) else str(value)
    return False, None


def event_fields(event: LogEvent) -> dict[str, object]:
    """The event's own structured fields that are JSON scalars: no ``log_*``, no legacy keys."""
    fields: dict[str, object] = {}
    for key, value in event.items():
        if not isinstance(key, str) or key.startswith("log_") or key in _LEGACY_KEYS:
            continue
        ok, scalar = _scalar(value)
        if ok:
            fields[f"{key}_" if key in RESERVED_KEYS else key] = scalar
    return fields


def _event_level(event: LogEvent) -> str:
    level = event.get("log_level")
    for known, name in LEVEL_NAMES.items():  # LogLevel constants are not instances of LogLevel
        if level is known:
            return name
    return "info"


def _failure_text(failure: object) -> str:
    if not isinstance(failure, Failure):
        return repr(failure)
    try:
        return failure.getTraceback()
    except Exception:  # a broken failure must not lose the whole record
        return f"(unable to render traceback) {failure.getErrorMessage()}"


#: The encoders of ``dumps_compact``, built once (json.dumps builds one per call).
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)
_COMPACT_ASCII = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=str)


def dumps_compact(record: object) -> str:
    """Compact JSON; ASCII-escaped only when the text has lone surrogates (not UTF-8 encodable)."""
    text = _COMPACT.encode(record)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _COMPACT_ASCII.encode(record)
    return text


def format_json_event(
    event: LogEvent, worker_type: str | None = None, instance_id: str | None = None
) -> str:
    """One log event as one line of JSON (without the newline)."""
    record: dict[str, object] = {
        "ts": iso_timestamp(float(event.get("log_time") or 0.0)),
        "level": _event_level(event),
        "msg": formatEvent(event),
        "ns": str(event.get("log_namespace") or "-"),
    }
    if worker_type:
        record["worker_type"] = worker_type
    if instance_id:
        record["instance_id"] = instance_id
    record.update(event_fields(event))
    if "log_failure" in event:
        record["exc"] = _failure_text(event["log_failure"])
    return dumps_compact(record)


def _real_stream(stream: IO[str] | None) -> IO[str]:
    """The stream to write to: never Twisted's stdout redirection (that would loop back here)."""
    chosen = sys.stdout if stream is None else stream
    if isinstance(chosen, LoggingFile):
        return sys.__stdout__ if sys.__stdout__ is not None else sys.stderr
    return chosen


@implementer(ILogObserver)
class JSONLogObserver:
    """Writes each event as a JSON line to a text stream (stdout by default) and flushes."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        worker_type: str | None = None,
        instance_id: str | None = None,
    ) -> None:
        # The stream is chosen now: once twistd begins logging, sys.stdout is redirected into
        # the log system itself.
        self.stream = _real_stream(stream)
        self.worker_type = worker_type or None
        self.instance_id = instance_id or None

    def __call__(self, event: LogEvent) -> None:
        try:
            line = format_json_event(event, self.worker_type, self.instance_id)
        except Exception as error:  # an observer must never raise into the publisher
            line = dumps_compact({
                "ts": iso_timestamp(float(event.get("log_time") or 0.0)),
                "level": "error",
                "msg": f"unable to format a log event: {error!r}",
                "ns": "llamaproxy.observability.logs",
            })
        self.stream.write(line + "\n")
        flush = getattr(self.stream, "flush", None)
        if flush is not None:
            flush()


def worker_tag(worker_type: str | None, instance_id: str | None) -> str:
    """``worker@instance`` (or whichever is set; empty when neither is)."""
    if worker_type and instance_id:
        return f"{worker_type}@{instance_id}"
    return worker_type or instance_id or ""


def format_text_event(
    event: LogEvent, worker_type: str | None = None, instance_id: str | None = None
) -> str:
    """Twisted's classic line, ``<ts> [<ns>#<level>] [<worker@instance>] <text>``, ending in a
    newline; continuation lines are indented with a tab. Empty for events with no text."""
    text = eventAsText(event, includeTraceback=True, includeTimestamp=False, includeSystem=True)
    if not text:
        return ""
    tag = worker_tag(worker_type, instance_id)
    if tag:
        system_end = text.find("] ")
        if system_end != -1:
            text = f"{text[: system_end + 2]}[{tag}] {text[system_end + 2 :]}"
    stamp = iso_timestamp(float(event.get("log_time") or 0.0))
    return f"{stamp} {text.rstrip()}".replace("\n", "\n\t") + "\n"


def text_log_observer(
    stream: IO[str] | None = None,
    worker_type: str | None = None,
    instance_id: str | None = None,
) -> FileLogObserver:
    """A readable observer (Twisted's ``FileLogObserver``) that also names worker and instance."""
    return FileLogObserver(
        _real_stream(stream), lambda event: format_text_event(event, worker_type, instance_id)
    )


def make_observer(
    log_format: LogFormat,
    stream: IO[str] | None = None,
    worker_type: str | None = None,
    instance_id: str | None = None,
) -> ILogObserver:
    """The observer for ``LOG_FORMAT``: JSON lines or readable text, to ``stream`` (stdout)."""
    if log_format == "json":
        return JSONLogObserver(stream, worker_type, instance_id)
    return text_log_observer(stream, worker_type, instance_id)


#: Twisted's note of every client or server factory starting and stopping: one pair per backend
#: connection of the stock ``HTTPConnectionPool`` (and per probe), noise at info level.
_FACTORY_CHATTER = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})


@implementer(ILogFilterPredicate)
class _QuietFactories:
    """Drops Twisted's factory start/stop notes (written at ``LOG_LEVEL=debug`` only)."""

    def __call__(self, event: LogEvent) -> PredicateResult:
        if event.get("log_format") in _FACTORY_CHATTER:
            return PredicateResult.no
        return PredicateResult.maybe


def at_least(observer: ILogObserver, level: str) -> ILogObserver:
    """``observer`` seeing only events at ``level`` (``LOG_LEVEL``: debug, info, ...) or above
    (and, above debug, none of Twisted's factory start/stop notes)."""
    if level == "debug":
        return observer
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    return FilteringLogObserver(observer, [_QuietFactories(), predicate])


def observer_for_twistd(
    log_format: LogFormat,
    server_options: Mapping[str, Any] | None,
    worker_type: str | None = None,
    instance_id: str | None = None,
    min_level: str = "info",
) -> ILogObserver | None:
    """The observer to install for this twistd run, honouring twistd's own options, or None.

    ``server_options`` is twistd's ``ServerOptions`` (the plugin's ``options.parent``). An
    installed observer replaces the one twistd would build from ``--logfile``, so: ``--logfile
    PATH`` is honoured here (the same size-rotated :class:`~twisted.python.logfile.LogFile`
    twistd opens); ``--syslog`` or ``--logger`` return None (twistd's choice stays; with
    ``--logger`` it would win anyway). Without ``-n`` and ``--logfile`` twistd logs to
    ``twistd.log``, and so does this.
    """
    options = server_options or {}
    if options.get("logger") or options.get("syslog"):
        return None
    logfile_name = options.get("logfile") or ""
    nodaemon = bool(options.get("nodaemon", True))
    if logfile_name == "-" or (nodaemon and not logfile_name):
        return at_least(make_observer(log_format, sys.stdout, worker_type, instance_id), min_level)
    log_file: Any = LogFile.fromFullPath(logfile_name or "twistd.log")
    return at_least(make_observer(log_format, log_file, worker_type, instance_id), min_level)


def install_observer(application: object, observer: ILogObserver) -> bool:
    """Make ``observer`` the log observer twistd starts with; True if ``application`` took it.

    Call it from the root service's ``setServiceParent(parent)`` with the ``parent`` argument as
    given: twistd passes its ``Application`` (a ``Componentized``), and ``AppLogger.start``
    reads ``application.getComponent(ILogObserver)`` right after ``makeService`` returns. Any
    other parent (a MultiService in tests) is left alone and False is returned.
    """
    if not isinstance(application, Componentized):
        return False
    application.setComponent(ILogObserver, observer)
    return True


def _env_instance_id(environ: Mapping[str, str]) -> str | None:
    from llamaproxy.config import sanitize_instance_id

    raw = environ.get("INSTANCE_ID", "").strip() or socket.gethostname()
    return sanitize_instance_id(raw) if raw else None


def json_observer_factory() -> ILogObserver:
    """``twistd --logger=llamaproxy.observability.logs.json_observer_factory``: JSON lines on
    stdout, tagged
    with ``$WORKER_TYPE`` and ``$INSTANCE_ID`` (default: the host name)."""
    return JSONLogObserver(
        sys.stdout,
        os.environ.get("WORKER_TYPE", "").strip() or None,
        _env_instance_id(os.environ),
    )


def text_observer_factory() -> ILogObserver:
    """``twistd --logger=llamaproxy.observability.logs.text_observer_factory``: the text format on
    stdout."""
    return text_log_observer(
        sys.stdout,
        os.environ.get("WORKER_TYPE", "").strip() or None,
        _env_instance_id(os.environ),
    )
