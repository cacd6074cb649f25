"""The operator page's activity view: the last N requests, kept in a bounded ring.

The gateway's ``RequestRecorder`` builds one ``AccessEntry`` per finished request for the access
log; :meth:`ActivityRing.observe` keeps that same object (plus the request's queue wait and whether
it streamed) in a ``deque`` of fixed length: one append per request, nothing formatted, nothing
else computed until a page asks. Entries never hold a prompt or a key: the access entry has the
key id, the path without its query string, and counts.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from llamaproxy.observability.access_log import AccessEntry

#: Requests kept (about 0.6 KiB each: see docs/operations.md).
DEFAULT_SIZE = 500

#: Probes and scrapes, not activity: never kept.
PUBLIC_PATHS = frozenset({"/ping", "/health", "/readyz", "/metrics"})


@dataclass(frozen=True)
class ActivityRow:
    """One request as the activity table shows it."""

    ts: float
    key_id: str
    model: str
    path: str
    status: int
    queue_wait_ms: float | None
    ttft_ms: float | None
    duration_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None
    tokens_per_second: float | None
    client_gone: bool

    def as_json(self) -> dict[str, object]:
        """The row as the page's JSON shows it."""
        return {
            "ts": round(self.ts, 3),
            "key_id": self.key_id,
            "model": self.model,
            "path": self.path,
            "status": self.status,
            "queue_wait_ms": _round(self.queue_wait_ms),
            "ttft_ms": _round(self.ttft_ms),
            "duration_ms": _round(self.duration_ms),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_per_second": _round(self.tokens_per_second),
            "client_gone": self.client_gone,
        }


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 1)


class ActivityRing:
    """The last ``size`` finished requests (oldest dropped first)."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 1:
            raise ValueError("the activity ring needs room for at least one request")
        self.size = size
        self._entries: deque[tuple[AccessEntry, float | None, bool]] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._entries)

    def observe(self, entry: AccessEntry, request: Any) -> None:
        """A request finished (a ``RequestRecorder`` observer): keep its entry."""
        if entry.path in PUBLIC_PATHS:
            return
        exchange = request.exchange
        timer = exchange.timer if exchange is not None else None
        wait = timer.queue_wait if timer is not None else None
        self._entries.append((entry, wait, request.facts.stream))

    def add(
        self, entry: AccessEntry, queue_wait: float | None = None, stream: bool = False
    ) -> None:
        """Keep ``entry`` directly (tests, replays)."""
        self._entries.append((entry, queue_wait, stream))

    def rows(
        self, key_id: str | None = None, model: str | None = None, limit: int = 100
    ) -> list[ActivityRow]:
        """The newest ``limit`` requests first, optionally only one key's and/or one model's."""
        found: list[ActivityRow] = []
        for entry, wait, stream in reversed(self._entries):
            if key_id and entry.key_id != key_id:
                continue
            if model and entry.model != model:
                continue
            found.append(_row(entry, wait, stream))
            if len(found) >= limit:
                break
        return found

    def key_ids(self) -> list[str]:
        """Key ids seen in the ring (for the filter's choices), sorted."""
        return sorted({e.key_id for e, _, _ in self._entries if e.key_id})

    def models(self) -> list[str]:
        """Models seen in the ring (for the filter's choices), sorted."""
        return sorted({e.model for e, _, _ in self._entries if e.model})

    def __iter__(self) -> Iterator[AccessEntry]:
        return (entry for entry, _, _ in self._entries)


def _row(entry: AccessEntry, wait: float | None, stream: bool) -> ActivityRow:
    ttft = entry.ttfb_ms
    completion = entry.completion_tokens
    rate = None
    if completion:
        # A stream's generation time runs from its first event to its end; a plain response's
        # is the whole request minus its queue wait.
        if stream and ttft is not None:
            generating = entry.duration_ms - ttft
        else:
            generating = entry.duration_ms - (wait or 0.0) * 1000
        if generating > 0:
            rate = completion / (generating / 1000)
    return ActivityRow(
        ts=entry.ts,
        key_id=entry.key_id or "-",
        model=entry.model or "-",
        path=entry.path,
        status=entry.status,
        queue_wait_ms=None if wait is None else wait * 1000,
        ttft_ms=ttft,
        duration_ms=entry.duration_ms,
        prompt_tokens=entry.prompt_tokens,
        completion_tokens=completion,
        tokens_per_second=rate,
        client_gone=entry.outcome == "client_gone" or entry.status == 499,
    )
