"""Token usage from backend responses, streams included, without changing what clients see.

Non-streamed responses carry ``usage`` in their JSON body. Streams carry it only when the request
said ``stream_options: {"include_usage": true}``; the gateway then asks for it on the client's
behalf (``ask_for_stream_usage``) and removes that extra event (``choices: []`` plus ``usage``)
from the stream when the client had not asked, so clients see exactly what they would see without
the gateway.

The collector is on the streaming hot path: it looks for the byte string ``"usage"`` before
parsing anything, parses only the event that has it, and holds back at most one partial event
(only while it must be able to remove the usage event).
"""

from __future__ import annotations

import json
from typing import Any

#: Most body bytes kept to read ``usage`` from a non-streamed response.
MAX_BODY_KEPT = 1 << 20
#: Most bytes of one partial SSE event held back while filtering.
MAX_EVENT_HELD = 1 << 20

#: What an event carrying usage contains; nothing without it is ever parsed.
USAGE_MARK = b'"usage"'


def ask_for_stream_usage(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The body to send for a streamed request, and whether the client asked for usage itself."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, True
    merged = dict(options) if isinstance(options, dict) else {}
    merged["include_usage"] = True
    return {**body, "stream_options": merged}, False


class UsageCollector:
    """Watches a response body go by and remembers its token usage."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None

    def __init__(self, streaming: bool, remove_usage_event: bool = False) -> None:
        self.streaming = streaming
        self.remove_usage_event = remove_usage_event and streaming
        #: Streaming: the unfinished event at the end of what went by (held back when filtering).
        self.held = b""
        self._kept: list[bytes] = []  # non-streaming: the body, up to MAX_BODY_KEPT
        self._kept_size = 0

    def feed(self, data: bytes) -> bytes:
        """Bytes from the backend; returns what to send to the client now.

        A streamed piece of whole events without ``USAGE_MARK``, when nothing is held, is
        returned as it is and changes nothing: a hot path may skip the call for it.
        """
        if not self.streaming:
            if self._kept_size < MAX_BODY_KEPT:
                self._kept.append(data)
                self._kept_size += len(data)
            return data
        if not self.remove_usage_event:
            self._scan(data)
            return data
        return self._filter(data)

    def finish(self) -> bytes:
        """The body ended cleanly; returns any bytes still held back."""
        if not self.streaming:
            if self._kept_size <= MAX_BODY_KEPT:
                self._read_usage(b"".join(self._kept))
            self._kept = []
            return b""
        rest, self.held = self.held, b""
        if not self.remove_usage_event:
            if USAGE_MARK in rest:
                self._is_usage_event(rest)
            return b""  # already sent as it arrived
        if rest and USAGE_MARK in rest and self._is_usage_event(rest):
            return b""
        return rest

    # -- streams -------------------------------------------------------------------------

    def _scan(self, data: bytes) -> None:
        """Not filtering: record usage from whole events; remember the unfinished tail."""
        buffer = self.held + data if self.held else data
        events, separator, tail = buffer.rpartition(b"\n\n")
        if separator and USAGE_MARK in events:
            for event in events.split(b"\n\n"):
                if USAGE_MARK in event:
                    self._is_usage_event(event)
        self.held = tail if len(tail) <= MAX_EVENT_HELD else b""

    def _filter(self, data: bytes) -> bytes:
        """Filtering: pass whole events through, drop the usage event, hold the partial tail."""
        if not self.held and data.endswith(b"\n\n") and USAGE_MARK not in data:
            return data  # whole events, none of them usage: the usual piece of a stream
        buffer = self.held + data
        complete, separator, tail = buffer.rpartition(b"\n\n")
        if len(tail) > MAX_EVENT_HELD:  # not SSE after all: stop holding anything back
            self.remove_usage_event = False
            self.held = b""
            return buffer
        self.held = tail
        if not separator:
            return b""
        complete += separator
        if USAGE_MARK not in complete:
            return complete
        kept = [
            event for event in complete.split(b"\n\n")
            if event and not (USAGE_MARK in event and self._is_usage_event(event))
        ]
        return b"".join(event + b"\n\n" for event in kept)

    def _is_usage_event(self, event: bytes) -> bool:
        """Record usage from an SSE event; True if it is the usage-only event (no choices)."""
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            try:
                doc = json.loads(line[5:])
            except ValueError:
                return False
            if not isinstance(doc, dict):
                return False
            self._record(doc)
            return doc.get("choices") == [] and "usage" in doc
        return False

    # -- whole bodies ---------------------------------------------------------------------

    def _read_usage(self, body: bytes) -> None:
        if USAGE_MARK not in body:
            return
        try:
            doc = json.loads(body)
        except ValueError:
            return
        if isinstance(doc, dict):
            self._record(doc)

    def _record(self, doc: dict[str, Any]) -> None:
        usage = doc.get("usage")
        if isinstance(doc.get("model"), str):
            self.model = doc["model"]
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int):
            self.prompt_tokens = prompt
        if isinstance(completion, int):
            self.completion_tokens = completion
