"""Tests for llamaproxy.gateway.tokens: counts read from bodies and streams (passed unchanged)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.gateway.tokens import (
    TIMINGS_MARK,
    USAGE_MARK,
    UsageCollector,
    carries_counts,
    estimate_prompt_tokens,
    parse_json,
)
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


#: JSON documents and text around them (whitespace, garbage, byte-order marks, NULs).
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
_AROUND = st.sampled_from([b"", b" ", b"\n", b" \t\r\n", b"x", b"\x00", b"{", b"}",
                           b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\xed\xa0\x80"])


def _loads_outcome(parse: Any, body: bytes) -> tuple[str, Any]:
    try:
        return "value", parse(body)
    except (ValueError, RecursionError) as error:
        return "error", type(error) if isinstance(error, RecursionError) else ValueError


class ParseJSONTests(SynchronousTestCase):
    """``parse_json`` is ``json.loads`` for every body (it only skips loads' Python layers)."""

    @given(_AROUND, _JSON_VALUES, st.booleans(), _AROUND)
    def test_documents(self, before: bytes, value: Any, ascii: bool, after: bytes) -> None:
        body = before + json.dumps(value, ensure_ascii=ascii).encode("utf-8", "surrogatepass") \
            + after
        self.assertEqual(_loads_outcome(parse_json, body), _loads_outcome(json.loads, body))

    @given(_JSON_VALUES, st.lists(st.sampled_from([" ", "\t", "\n", "\r", "\x0b", "\x0c",
                                                   "\x85", "\xa0", "\u2028", "x", "{}", "1"]),
                                  max_size=4))
    def test_what_follows_an_object(self, value: Any, after: list[str]) -> None:
        body = json.dumps({"v": value}).encode("utf-8", "surrogatepass") \
            + "".join(after).encode()
        self.assertEqual(_loads_outcome(parse_json, body), _loads_outcome(json.loads, body))

    @given(st.binary(max_size=40))
    def test_any_bytes(self, body: bytes) -> None:
        self.assertEqual(_loads_outcome(parse_json, body), _loads_outcome(json.loads, body))

    def test_examples(self) -> None:
        for body in [b'{"usage": {"prompt_tokens": 1}}', b' {"a": 1} \n', b'{"a": 1}x',
                     b'{"a": 1} {}', b"{", b"{\x00\x00\x00", b" \x00{}", b"[1, 2]",
                     b"{\"a\": \"\xed\xa0\x80\"}", b"{" * 100_000,
                     '{"a": "h\u00e9"}'.encode("utf-16"), '{"a": 1}'.encode("utf-16-le"),
                     ' {"a": 1}'.encode("utf-32-le")]:
            self.assertEqual(_loads_outcome(parse_json, body), _loads_outcome(json.loads, body),
                             body[:20])


class CarriesCountsTests(SynchronousTestCase):
    """``carries_counts`` is ``USAGE_MARK in data or TIMINGS_MARK in data``."""

    @given(st.lists(st.sampled_from([b'"usage"', b'"timings"', b'"usag', b'timings"', b'"',
                                     b"usage", b"data: {", b"\n\n", b"x"]), max_size=8))
    def test_same_as_in(self, parts: list[bytes]) -> None:
        data = b"".join(parts)
        self.assertEqual(carries_counts(data), USAGE_MARK in data or TIMINGS_MARK in data)


class _StockFeed(UsageCollector):
    """``feed`` as it was written before its checks were made with slices (the reference)."""

    __slots__ = ()

    def feed(self, data: bytes) -> None:
        if not self.streaming:
            super().feed(data)
            return
        self.events += data.count(b"\n\n")
        if self.held.endswith(b"\n") and data.startswith(b"\n"):
            self.events += 1
        if not self.held and not carries_counts(data):
            if not data.endswith(b"\n\n"):
                self._hold(data.rpartition(b"\n\n")[2])
            return
        buffer = self.held + data if self.held else data
        events, separator, tail = buffer.rpartition(b"\n\n")
        if separator:
            for event in events.split(b"\n\n"):
                if carries_counts(event):
                    self._read_event(event)
        self._hold(tail)


def _state(collector: UsageCollector) -> tuple[Any, ...]:
    return (collector.events, collector.held, collector.prompt_tokens,
            collector.completion_tokens, collector.cached_tokens, collector.model)


class FeedTests(SynchronousTestCase):
    """A stream's ``feed`` counts and reads what the stock checks did, piece by piece."""

    @given(st.sampled_from([STREAM, TIMINGS_STREAM, STREAM + b"\n", b"\n" + TIMINGS_STREAM,
                            b"data: x\n\n\n\ndata: y\n\r\n"]),
           st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
    def test_as_the_stock_checks(self, stream: bytes, cuts: list[int]) -> None:
        ours, stock = UsageCollector(True), _StockFeed(True)
        for piece in split_at(stream, cuts):
            ours.feed(piece)
            stock.feed(piece)
            self.assertEqual(_state(ours), _state(stock), piece)
        ours.finish()
        stock.finish()
        self.assertEqual(_state(ours), _state(stock))
