"""The tail of each llama-server child's output, for the operator page, with secrets redacted.

The supervisor logs every line its child prints as a ``twisted.logger`` event in the
``llamaproxy.supervision.llama_server`` namespace (its ``log_source`` is the supervisor, whose
``backend``
names it). :class:`ChildLogTail` is a log observer keeping the last ``lines`` of each backend in a
``deque``: one append per line, already capped at 4 KiB by the supervisor. Redaction happens when
a page reads the tail (:func:`redact`), so a closed page costs nothing but the append.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.logger import ILogObserver
from zope.interface import implementer

from llamaproxy.supervision.supervisor import CHILD_LOG_NAMESPACE

#: Lines kept per backend.
DEFAULT_LINES = 200
#: Longest line shown (the supervisor already cuts lines at 4096 bytes).
MAX_SHOWN = 1000

_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',]+")
_KEY_VALUE = re.compile(
    r"(?i)((?:api[-_]?key|x-api-key|authorization|token|password|secret)[\"']?\s*[:=]\s*[\"']?)"
    r"[^\s\"',}]+"
)
_GATEWAY_KEY = re.compile(r"\bgateway-[A-Za-z0-9_-]{16,}")
_SK_KEY = re.compile(r"\bsk-[A-Za-z0-9_-]{8,}")
#: llama-server's verbose request/response dumps carry prompts and completions as JSON.
_BODY = re.compile(
    r"(?i)(\"(?:messages|prompt|content|input|text|input_extra|input_prefix|input_suffix|"
    r"tokens|system_prompt|reasoning_content)\"\s*:)"
)

REDACTED = "[redacted]"


def redact(line: str, secrets: Iterable[str] = ()) -> str:
    """``line`` without key material or prompts: known secrets, bearer tokens, ``api_key=…``-like
    values, ``gateway-…``/``sk-…`` keys; a line holding request JSON loses everything from its
    first ``{``. Cut to ``MAX_SHOWN`` characters."""
    for secret in secrets:
        if secret:
            line = line.replace(secret, REDACTED)
    line = _BEARER.sub(lambda m: m.group(1) + REDACTED, line)
    line = _KEY_VALUE.sub(lambda m: m.group(1) + REDACTED, line)
    line = _GATEWAY_KEY.sub(REDACTED, line)
    line = _SK_KEY.sub(REDACTED, line)
    if _BODY.search(line):
        brace = line.find("{")
        cut = brace if brace >= 0 else _BODY.search(line).start()  # type: ignore[union-attr]
        line = line[:cut] + "[request or response body redacted]"
    if len(line) > MAX_SHOWN:
        line = line[:MAX_SHOWN] + " [cut]"
    return line


@dataclass(frozen=True, slots=True)
class ChildLine:
    """One line a child printed."""

    at: float
    stream: str
    text: str


@implementer(ILogObserver)
class ChildLogTail:
    """The last ``lines`` lines of each backend's child, fed by the global log publisher."""

    def __init__(self, lines: int = DEFAULT_LINES) -> None:
        self.lines = lines
        self._tails: dict[str, deque[ChildLine]] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        """An ``ILogObserver``: keep the event when it is a child's output line."""
        if event.get("log_namespace") != CHILD_LOG_NAMESPACE:
            return
        text = event.get("line")
        if not isinstance(text, str):
            return
        backend = getattr(getattr(event.get("log_source"), "backend", None), "name", None)
        self.add(str(backend or "llama-server"), text, str(event.get("stream", "")),
                 float(event.get("log_time") or 0.0))

    def add(self, backend: str, text: str, stream: str = "stdout", at: float = 0.0) -> None:
        """Keep one line of ``backend``'s child."""
        tail = self._tails.get(backend)
        if tail is None:
            tail = self._tails[backend] = deque(maxlen=self.lines)
        tail.append(ChildLine(at, stream, text))

    def backends(self) -> list[str]:
        """Backends that printed something, sorted."""
        return sorted(self._tails)

    def tail(
        self, backend: str, count: int = 50, secrets: Callable[[], Iterable[str]] = tuple
    ) -> list[ChildLine]:
        """The last ``count`` lines of ``backend``, oldest first, redacted."""
        lines = list(self._tails.get(backend, ()))[-count:]
        known = [s for s in secrets() if s]
        return [ChildLine(line.at, line.stream, redact(line.text, known)) for line in lines]
