"""Tests for llamaproxy.gateway.tokens: usage from bodies and streams, the usage event removed."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.gateway.tokens import UsageCollector, ask_for_stream_usage
from llamaproxy.testing import sse_chunk

USAGE_EVENT = b"data: " + json.dumps({
    "choices": [], "model": "tiny", "usage": {"prompt_tokens": 7, "completion_tokens": 3,
                                             "total_tokens": 10}}).encode() + b"\n\n"
STREAM = sse_chunk("Hel") + sse_chunk("lo") + sse_chunk("", finish_reason="length") \
    + USAGE_EVENT + b"data: [DONE]\n\n"
WITHOUT_USAGE = STREAM.replace(USAGE_EVENT, b"")


def run(collector: UsageCollector, pieces: list[bytes]) -> bytes:
    out = b"".join(collector.feed(p) for p in pieces)
    return out + collector.finish()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


class TokensTests(SynchronousTestCase):
    def test_ask_for_stream_usage(self) -> None:
        body, asked = ask_for_stream_usage({"stream": True})
        self.assertEqual((body["stream_options"], asked), ({"include_usage": True}, False))
        body, asked = ask_for_stream_usage({"stream": True, "stream_options": {"x": 1}})
        self.assertEqual(body["stream_options"], {"x": 1, "include_usage": True})
        original = {"stream": True, "stream_options": {"include_usage": True}}
        self.assertEqual(ask_for_stream_usage(original), (original, True))

    def test_non_streamed_body(self) -> None:
        collector = UsageCollector(streaming=False)
        body = json.dumps({"model": "m", "usage": {"prompt_tokens": 4, "completion_tokens": 9}})
        self.assertEqual(run(collector, [body[:10].encode(), body[10:].encode()]), body.encode())
        self.assertEqual((collector.prompt_tokens, collector.completion_tokens, collector.model),
                         (4, 9, "m"))

    def test_stream_the_client_asked_for_is_untouched(self) -> None:
        collector = UsageCollector(streaming=True, remove_usage_event=False)
        self.assertEqual(run(collector, [STREAM]), STREAM)
        self.assertEqual((collector.prompt_tokens, collector.completion_tokens), (7, 3))

    def test_usage_event_removed_when_the_gateway_asked(self) -> None:
        collector = UsageCollector(streaming=True, remove_usage_event=True)
        self.assertEqual(run(collector, [STREAM]), WITHOUT_USAGE)
        self.assertEqual((collector.prompt_tokens, collector.completion_tokens), (7, 3))

    @given(st.lists(st.integers(0, 10_000), max_size=8), st.booleans())
    def test_any_split_gives_the_same_result(self, cuts: list[int], remove: bool) -> None:
        collector = UsageCollector(streaming=True, remove_usage_event=remove)
        out = run(collector, split_at(STREAM, cuts))
        self.assertEqual(out, WITHOUT_USAGE if remove else STREAM)
        self.assertEqual((collector.prompt_tokens, collector.completion_tokens), (7, 3))

    def test_events_pass_as_soon_as_complete(self) -> None:
        collector = UsageCollector(streaming=True, remove_usage_event=True)
        first = sse_chunk("Hel")
        self.assertEqual(collector.feed(first[:10]), b"")
        self.assertEqual(collector.feed(first[10:]), first)

    def test_not_sse_is_not_held_forever(self) -> None:
        collector = UsageCollector(streaming=True, remove_usage_event=True)
        big = b"x" * (2 << 20)
        self.assertEqual(collector.feed(big), big)
        self.assertEqual(collector.feed(b"more"), b"more")

    @given(st.lists(st.integers(0, 10_000), max_size=8), st.booleans())
    def test_the_skippable_piece_changes_nothing(self, cuts: list[int], remove: bool) -> None:
        """What the stream lane skips ``feed`` for (whole events without the usage mark, nothing
        held) comes back unchanged and leaves the collector as it was, at any point of a
        stream."""
        collector = UsageCollector(streaming=True, remove_usage_event=remove)
        piece = sse_chunk("Hel") + sse_chunk("lo")
        for part in split_at(STREAM, cuts):
            if not collector.held:
                before = (collector.held, collector.prompt_tokens, collector.completion_tokens)
                self.assertEqual(collector.feed(piece), piece)
                after = (collector.held, collector.prompt_tokens, collector.completion_tokens)
                self.assertEqual(after, before)
            collector.feed(part)
