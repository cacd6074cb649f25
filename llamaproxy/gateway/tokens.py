"""Token usage read from backend responses as they go by, without changing a byte of them.

The gateway never alters what llama-server sends: a stream that did not ask for usage ends, as
it does without the gateway, with a chunk carrying ``timings`` (``prompt_n`` tokens evaluated,
``cache_n`` taken from the prompt cache, ``predicted_n`` generated), and that is what the
gateway counts; a stream that asked for usage (``stream_options.include_usage``) has its usage
chunk, and a whole body has its ``usage``. Those are the reported counts.

A stream cut before its end (the client left, a timeout, the backend broke) has no such chunk.
What reached the client is counted instead: every whole SSE event relayed is one token
(llama-server sends one token per event; the first event, the role, and the last, ``[DONE]``,
are counted too), and the
prompt is estimated from the request body's size (``estimate_prompt_tokens``). Such counts are
``estimated`` (the ledger's ``partial``).

The collector is on the streaming hot path: it counts events (their blank lines) with one
``bytes.count`` per piece, looks for the byte strings ``"usage"`` and ``"timings"`` before parsing
anything, and parses only the event that has one of them.
"""

from __future__ import annotations

import json
from typing import Any

#: Most body bytes kept to read ``usage`` from a non-streamed response.
MAX_BODY_KEPT = 1 << 20
#: Most bytes of one partial SSE event kept to read it when its end comes.
MAX_EVENT_HELD = 1 << 20

#: What an event carrying counts contains; nothing without one of these is ever parsed.
USAGE_MARK = b'"usage"'
TIMINGS_MARK = b'"timings"'
#: What starts each SSE event llama-server sends, and what ends every SSE event.
DATA_MARK = b"data:"
EVENT_END = b"\n\n"



def carries_counts(data: bytes) -> bool:
    """True when ``data`` contains ``"usage"`` or ``"timings"`` (what any event or body with
    counts contains). ``bytes.find``, not ``in``: on Python 3.11 ``needle in data`` first tries
    the needle as an integer and formats the TypeError it then discards (~1 000 instructions)."""
    return data.find(USAGE_MARK) != -1 or data.find(TIMINGS_MARK) != -1


#: ``json.loads``' own decoder (no options).
_DECODER = json.JSONDecoder()

#: Request body bytes per prompt token in the estimate for streams cut before their counts.
BYTES_PER_PROMPT_TOKEN = 4


def parse_json(body: bytes) -> Any:
    """``json.loads(body)``, without its encoding detection for a body that starts with ``{``
    or a space and a non-NUL byte: ``json.detect_encoding`` calls such a body UTF-8 (no
    byte-order mark starts so), and ``loads`` is then ``JSONDecoder.decode`` of its UTF-8 text
    (a request's body, a response's whole body or an SSE event's data: each read once per
    request)."""
    if len(body) < 2 or body[0] not in _PLAIN_START or not body[1]:
        return json.loads(body)
    text = body.decode("utf-8", "surrogatepass")
    if body[0] == 0x7B:
        # No whitespace to skip before the document: ``raw_decode`` is ``decode``'s parse, and
        # ``decode`` accepts what follows the document iff it is JSON whitespace (anything
        # else: ``decode`` again, for its error).
        doc, end = _DECODER.raw_decode(text)
        if end == len(text) or not text[end:].strip(_JSON_WHITESPACE):
            return doc
    return _DECODER.decode(text)


#: What JSON calls whitespace (``json.decoder.WHITESPACE``).
_JSON_WHITESPACE = " \t\n\r"
#: First bytes of a body ``parse_json`` decodes itself (no byte-order mark starts with them).
_PLAIN_START = frozenset(b"{ ")


def estimate_prompt_tokens(body: bytes) -> int:
    """Prompt tokens of a request whose response reported none: one per 4 body bytes.

    English text is about 4 characters per token, and the JSON around the prompt is counted
    too, so this errs on the side of charging more than the backend evaluated.
    """
    return -(-len(body) // BYTES_PER_PROMPT_TOKEN)


class UsageCollector:
    """Watches a response body go by and remembers its token counts (it never changes it)."""

    __slots__ = ("_kept", "_kept_size", "cached_tokens", "completion_tokens", "events", "held",
                 "model", "prompt_tokens", "streaming")

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        #: Prompt tokens taken from the backend's prompt cache (``timings.cache_n``, or
        #: ``usage.prompt_tokens_details.cached_tokens``), None when the response did not say.
        self.cached_tokens: int | None = None
        self.model: str | None = None
        #: Streams: SSE events relayed so far (a fast path may add its own count here).
        self.events = 0
        #: Streams: the unfinished event at the end of what went by (kept to read it whole).
        self.held = b""
        self._kept: list[bytes] = []  # non-streaming: the body, up to MAX_BODY_KEPT
        self._kept_size = 0

    @property
    def evaluated_tokens(self) -> int | None:
        """Prompt tokens the backend evaluated (not from its cache), when it said."""
        if self.prompt_tokens is None or self.cached_tokens is None:
            return self.prompt_tokens
        return max(self.prompt_tokens - self.cached_tokens, 0)

    @property
    def reported(self) -> bool:
        """True when the response itself said how many tokens it used."""
        return self.prompt_tokens is not None or self.completion_tokens is not None

    def feed(self, data: bytes) -> None:
        """Bytes relayed to the client.

        A streamed piece of whole events without either mark, when nothing is held, only adds
        its events to ``events``: a hot path may do just that instead of calling this.
        """
        if not self.streaming:
            if self._kept_size < MAX_BODY_KEPT:
                self._kept.append(data)
                self._kept_size += len(data)
            return
        # (Slices compared, not ``endswith``/``startswith``: on Python 3.11 those parse their
        # arguments the slow way, ~900 instructions a call; the same answers.)
        self.events += data.count(EVENT_END)
        held = self.held
        if held:
            if held[-1:] == b"\n" and data[:1] == b"\n":
                self.events += 1  # an event whose blank line was split between two pieces
        elif data.find(USAGE_MARK) == -1 and data.find(TIMINGS_MARK) == -1:  # carries_counts
            if data[-2:] != b"\n\n":
                self._hold(data.rpartition(b"\n\n")[2])
            return
        buffer = held + data if held else data
        events, separator, tail = buffer.rpartition(b"\n\n")
        if separator:
            for event in events.split(b"\n\n"):
                if carries_counts(event):
                    self._read_event(event)
        self._hold(tail)

    def finish(self) -> None:
        """The body ended cleanly: read what is still held."""
        if not self.streaming:
            if self._kept_size <= MAX_BODY_KEPT:
                self._read_body(b"".join(self._kept))
            self._kept = []
            return
        rest, self.held = self.held, b""
        if carries_counts(rest):
            self._read_event(rest)

    def _hold(self, tail: bytes) -> None:
        # Only the start of the last event is needed to find its marks once it ends; one that
        # grows past MAX_EVENT_HELD is not SSE from llama-server: stop keeping it.
        self.held = tail if len(tail) <= MAX_EVENT_HELD else b""

    def _read_event(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if line.startswith(DATA_MARK):
                self._read_body(line[len(DATA_MARK):])
                return

    def _read_body(self, body: bytes) -> None:
        if not carries_counts(body):
            return
        try:
            doc = parse_json(body)
        except (ValueError, RecursionError):
            return
        if isinstance(doc, dict):
            self._record(doc)

    def _record(self, doc: dict[str, Any]) -> None:
        if isinstance(doc.get("model"), str):
            self.model = doc["model"]
        usage = doc.get("usage")
        timings = doc.get("timings")
        if isinstance(timings, dict):
            cached = timings.get("cache_n", 0)
            if isinstance(cached, int):
                self.cached_tokens = cached
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int):
                self.prompt_tokens = prompt
            if isinstance(completion, int):
                self.completion_tokens = completion
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                self.cached_tokens = details["cached_tokens"]
            return
        if isinstance(timings, dict) and not self.reported:
            evaluated, cached = timings.get("prompt_n"), timings.get("cache_n", 0)
            predicted = timings.get("predicted_n")
            if isinstance(evaluated, int) and isinstance(cached, int):
                self.prompt_tokens = evaluated + cached
            if isinstance(predicted, int):
                self.completion_tokens = predicted
