"""Tests for llamaproxy.gateway.tokens: counts read from bodies and streams (passed unchanged)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.gateway.tokens import UsageCollector, estimate_prompt_tokens
from llamaproxy.testing import sse_chunk

USAGE_EVENT = b"data: " + json.dumps({
    "choices": [], "model": "tiny", "usage": {"prompt_tokens": 7, "completion_tokens": 3,
                                             "total_tokens": 10}}).encode() + b"\n\n"
STREAM = sse_chunk("Hel") + sse_chunk("lo") + sse_chunk("", finish_reason="length") \
    + USAGE_EVENT + b"data: [DONE]\n\n"
#: How llama-server ends a stream that did not ask for usage: its last chunk carries timings.
TIMINGS_EVENT = b"data: " + json.dumps({
    "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "model": "tiny",
    "timings": {"cache_n": 2, "prompt_n": 5, "predicted_n": 3, "predicted_ms": 1.5}},
).encode() + b"\n\n"
TIMINGS_STREAM = sse_chunk("Hel") + sse_chunk("lo") + TIMINGS_EVENT + b"data: [DONE]\n\n"


def run(collector: UsageCollector, pieces: list[bytes]) -> None:
    for piece in pieces:
        collector.feed(piece)
    collector.finish()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


class TokensTests(SynchronousTestCase):
    def test_non_streamed_body(self) -> None:
        collector = UsageCollector(streaming=False)
        body = json.dumps({"model": "m", "usage": {"prompt_tokens": 4, "completion_tokens": 9},
                           "timings": {"prompt_n": 1, "predicted_n": 1}})
        run(collector, [body[:10].encode(), body[10:].encode()])
        self.assertEqual((collector.prompt_tokens, collector.completion_tokens, collector.model),
                         (4, 9, "m"))
        self.assertTrue(collector.reported)

    def test_stream_with_usage(self) -> None:
        collector = UsageCollector(streaming=True)
        run(collector, [STREAM])
        self.assertEqual((collector.prompt_tokens, collector.completion_tokens), (7, 3))

    def test_stream_with_timings_only(self) -> None:
        """No usage asked for: llama-server's timings give the counts (cached prompt tokens
        included: the prompt had cache_n + prompt_n tokens)."""
        collector = UsageCollector(streaming=True)
        run(collector, [TIMINGS_STREAM])
        self.assertEqual((collector.prompt_tokens, collector.completion_tokens), (7, 3))

    def test_usage_wins_over_timings(self) -> None:
        collector = UsageCollector(streaming=True)
        run(collector, [TIMINGS_EVENT, USAGE_EVENT.replace(b'"choices"', b'"timings": {}, "c"')])
        self.assertEqual((collector.prompt_tokens, collector.completion_tokens), (7, 3))

    @given(st.lists(st.integers(0, 10_000), max_size=8), st.booleans())
    def test_any_split_gives_the_same_result(self, cuts: list[int], timings: bool) -> None:
        collector = UsageCollector(streaming=True)
        stream = TIMINGS_STREAM if timings else STREAM
        run(collector, split_at(stream, cuts))
        self.assertEqual((collector.prompt_tokens, collector.completion_tokens), (7, 3))
        self.assertEqual(collector.events, stream.count(b"\n\n"))

    def test_a_cut_stream_counts_its_events(self) -> None:
        collector = UsageCollector(streaming=True)
        collector.feed(sse_chunk("a") + sse_chunk("b") + sse_chunk("c")[:12])
        self.assertFalse(collector.reported)
        self.assertEqual(collector.events, 2)  # whole events only

    def test_not_sse_is_not_held_forever(self) -> None:
        collector = UsageCollector(streaming=True)
        collector.feed(b"x" * (2 << 20))
        self.assertEqual(collector.held, b"")

    @given(st.lists(st.integers(0, 10_000), max_size=8), st.booleans())
    def test_the_skippable_piece_only_counts_events(self, cuts: list[int], timings: bool) -> None:
        """What the stream lane skips ``feed`` for (whole events without either mark, nothing
        held) changes nothing but the event count, at any point of a stream."""
        collector = UsageCollector(streaming=True)
        piece = sse_chunk("Hel") + sse_chunk("lo")
        for part in split_at(TIMINGS_STREAM if timings else STREAM, cuts):
            if not collector.held:
                before = (collector.held, collector.prompt_tokens, collector.completion_tokens,
                          collector.events)
                collector.feed(piece)
                after = (collector.held, collector.prompt_tokens, collector.completion_tokens,
                         collector.events - 2)
                self.assertEqual(after, before)
            collector.feed(part)

    def test_estimate_prompt_tokens(self) -> None:
        self.assertEqual(estimate_prompt_tokens(b""), 0)
        self.assertEqual(estimate_prompt_tokens(b"x" * 9), 3)


class CachedTokensTests(SynchronousTestCase):
    """What the prompt cache gave: ``timings.cache_n`` or ``prompt_tokens_details``."""

    def test_stream_timings_cache_n(self) -> None:
        collector = UsageCollector(streaming=True)
        run(collector, [TIMINGS_STREAM])
        self.assertEqual((collector.cached_tokens, collector.evaluated_tokens), (2, 5))

    def test_body_with_usage_details(self) -> None:
        collector = UsageCollector(streaming=False)
        body = json.dumps({"usage": {"prompt_tokens": 40, "completion_tokens": 2,
                                     "prompt_tokens_details": {"cached_tokens": 32}}})
        run(collector, [body.encode()])
        self.assertEqual((collector.prompt_tokens, collector.cached_tokens,
                          collector.evaluated_tokens), (40, 32, 8))

    def test_body_with_usage_and_timings(self) -> None:
        """llama-server's whole body has both: the timings give cache_n."""
        collector = UsageCollector(streaming=False)
        body = json.dumps({"usage": {"prompt_tokens": 40, "completion_tokens": 2},
                           "timings": {"cache_n": 30, "prompt_n": 10, "predicted_n": 2}})
        run(collector, [body.encode()])
        self.assertEqual((collector.prompt_tokens, collector.cached_tokens,
                          collector.evaluated_tokens), (40, 30, 10))

    def test_no_cache_information(self) -> None:
        collector = UsageCollector(streaming=True)
        run(collector, [STREAM])
        self.assertEqual((collector.cached_tokens, collector.evaluated_tokens), (None, 7))
