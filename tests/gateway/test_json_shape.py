"""Tests for llamaproxy.gateway.json_shape: depth and item count, however the body is split."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.gateway import json_shape
from llamaproxy.gateway.json_shape import _STRING, JsonShape, _as_marker, _walk

#: Strings that look like structure, and escapes that look like string ends.
TRICKY_TEXT = st.sampled_from(["", "x", '[{,:"', "\\", '\\"', "a\\\\", "}]", "\u00e9\u20ac"])
DOCS = st.recursive(
    st.none() | st.booleans() | st.integers() | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY_TEXT, inner, max_size=4),
    max_leaves=40,
)


def depth(doc: Any) -> int:
    if isinstance(doc, list):
        return 1 + max((depth(v) for v in doc), default=0)
    if isinstance(doc, dict):
        return 1 + max((depth(v) for v in doc.values()), default=0)
    return 0


def items(doc: Any) -> int:
    """Keys and values inside containers (what JsonShape counts, give or take empty ones)."""
    if isinstance(doc, list):
        return len(doc) + sum(items(v) for v in doc)
    if isinstance(doc, dict):
        return 2 * len(doc) + sum(items(v) for v in doc.values())
    return 0


def shape_of(raw: bytes, cuts: list[int], max_depth: int, max_items: int = 10**9,
             lazy: bool = False) -> JsonShape:
    shape = JsonShape(max_depth, max_items, lazy)
    points = sorted({c % (len(raw) + 1) for c in cuts})
    for start, end in zip([0, *points], [*points, len(raw)], strict=True):
        shape.feed(raw[start:end])
    return shape


class JsonShapeTests(SynchronousTestCase):
    @settings(max_examples=300)
    @given(DOCS, st.lists(st.integers(0, 10_000), max_size=6), st.booleans())
    def test_depth_exact_at_any_split(self, doc: Any, cuts: list[int], ascii_only: bool) -> None:
        raw = json.dumps(doc, ensure_ascii=ascii_only).encode()
        real = depth(doc)
        self.assertIsNone(shape_of(raw, cuts, max(real, 1)).error)
        if real > 1:
            error = shape_of(raw, cuts, real - 1).error
            self.assertEqual(error, f"JSON body nests deeper than {real - 1} levels")

    @settings(max_examples=200)
    @given(DOCS, st.lists(st.integers(0, 10_000), max_size=6))
    def test_items_bound(self, doc: Any, cuts: list[int]) -> None:
        raw = json.dumps(doc).encode()
        counted = shape_of(raw, cuts, 1000).items
        # Each container is one item more than its members; separators are never miscounted
        # inside strings.
        self.assertGreaterEqual(counted, items(doc))
        self.assertLessEqual(counted, items(doc) + raw.count(b"[") + raw.count(b"{"))

    def test_limit_on_items(self) -> None:
        raw = b"[" + b",".join([b"{}"] * 1000) + b"]"
        self.assertIn("more than 500 items", str(shape_of(raw, [100, 700], 64, 500).error))
        self.assertIsNone(shape_of(raw, [], 64, 5000).error)

    def test_deep_body_of_the_observation(self) -> None:
        raw = b'{"messages":' + b"[" * 10_000 + b"]" * 10_000 + b"}"
        self.assertEqual(shape_of(raw, list(range(0, len(raw), 4096)), 64).error,
                         "JSON body nests deeper than 64 levels")

    def test_escape_split_at_a_piece_boundary(self) -> None:
        raw = b'{"a": "x\\\\", "b": "y\\"[[[[[[[[[[[[", "c": [[1]]}'
        for cut in range(len(raw) + 1):
            self.assertIsNone(shape_of(raw, [cut], 3).error, cut)
            self.assertIsNotNone(shape_of(raw, [cut], 2).error, cut)

    def test_not_json_is_left_to_the_parser(self) -> None:
        for raw in (b"]]]][[", b'"unterminated', b"{[}]"):
            self.assertIsNone(shape_of(raw, [2], 64).error)


#: Bytes of structure and strings, without backslashes (pieces that take the no-escape route).
PLAIN_PIECES = st.binary(max_size=80).map(
    lambda raw: bytes(b'"[]{},: x'[byte % 9] for byte in raw))
#: What the scanner's reduction sees: brackets only.
BRACKETS = st.binary(max_size=40).map(lambda raw: bytes(b"[]{}"[byte % 4] for byte in raw))
#: One reduction pass as the scanner made it before (``_PAIR.sub``).
_PAIR = re.compile(rb"\[\]|\{\}")


def pattern_reduction(shape: JsonShape, brackets: bytes) -> tuple[str | None, bytes]:
    """(error, brackets still open) of ``shape._count`` on a structure of ``brackets``, by the
    regular-expression passes the scanner used before (the reference)."""
    if not brackets:
        return None, shape._open
    left, passes = shape._open + brackets, 0
    while passes <= 8:
        reduced = _PAIR.sub(b"", left)
        if len(reduced) == len(left):
            break
        left, passes = reduced, passes + 1
    else:
        walked = _walk(shape._open + brackets, shape.max_depth)
        if walked is None:
            return f"JSON body nests deeper than {shape.max_depth} levels", shape._open
        left = walked
    if left and left[0] in b"]}":
        return None, shape._open
    if len(left) + passes > shape.max_depth and _walk(shape._open + brackets,
                                                      shape.max_depth) is None:
        return f"JSON body nests deeper than {shape.max_depth} levels", shape._open
    return None, left


class ShortcutTests(SynchronousTestCase):
    """The scanner's shortcuts give what the regular expressions they replaced gave."""

    @settings(max_examples=500)
    @given(PLAIN_PIECES)
    def test_a_piece_without_escapes_is_cut_as_the_string_pattern_cuts_it(
        self, piece: bytes
    ) -> None:
        shape = JsonShape(10**6, 10**9)
        shape.feed(piece)
        reference = JsonShape(10**6, 10**9)
        by_pattern = _STRING.sub(_as_marker, piece)
        reference._count(by_pattern)
        self.assertEqual((shape.items, shape._open, shape.error),
                         (reference.items, reference._open, reference.error))
        self.assertEqual((shape._in_string, shape._escape), (by_pattern.endswith(b"S"), False))

    @settings(max_examples=1000)
    @given(BRACKETS, BRACKETS, st.integers(1, 12))
    def test_pairs_are_removed_as_the_pattern_removed_them(
        self, already_open: bytes, brackets: bytes, max_depth: int
    ) -> None:
        shape = JsonShape(max_depth, 10**9)
        shape._open = already_open
        expected = pattern_reduction(shape, brackets)
        shape._count(brackets)
        self.assertEqual((shape.error, shape._open), expected)

    def test_deep_pairs_are_removed_as_the_pattern_removed_them(self) -> None:
        for depth in range(1, 20):
            for brackets in (b"[" * depth + b"]" * depth, b"[{" * depth + b"}]" * depth + b"]"):
                for max_depth in (depth - 1, depth, 2 * depth):
                    shape = JsonShape(max(max_depth, 1), 10**9)
                    expected = pattern_reduction(shape, brackets)
                    shape._count(brackets)
                    self.assertEqual((shape.error, shape._open), expected)


#: Bodies for the lazy shape: JSON documents, and bytes that are not JSON at all.
ANY_BODY = DOCS.map(lambda doc: json.dumps(doc).encode()) | st.binary(max_size=60).map(
    lambda raw: bytes(b'"[]{},:\\ x'[byte % 10] for byte in raw))


class LazyShapeTests(SynchronousTestCase):
    """A lazy shape refuses exactly what a shape that scans every piece refuses."""

    @settings(max_examples=500)
    @given(ANY_BODY, st.lists(st.integers(0, 10_000), max_size=6), st.integers(1, 8),
           st.integers(1, 80), st.sampled_from([1 << 16, 7, 30]))
    def test_same_error_as_scanning_every_piece(
        self, raw: bytes, cuts: list[int], max_depth: int, max_items: int, unscanned: int
    ) -> None:
        self.patch(json_shape, "MAX_UNSCANNED", unscanned)
        lazy = shape_of(raw, cuts, max_depth, max_items, lazy=True)
        self.assertEqual(lazy.error, shape_of(raw, cuts, max_depth, max_items).error)

    def test_scans_what_it_kept_once_the_bound_fails(self) -> None:
        self.patch(json_shape, "MAX_UNSCANNED", 16)
        raw = b'{"a": [[1, "x\\\\", "y\\"["], {"b": "[[[["}], "c": ' + b"[" * 20 + b"]" * 20 + b"}"
        for cut in range(len(raw) + 1):
            lazy = shape_of(raw, [cut, cut + 9], 64, 10**6, lazy=True)
            eager = shape_of(raw, [cut, cut + 9], 64, 10**6)
            self.assertEqual((lazy.items, lazy._open, lazy._in_string, lazy.error),
                             (eager.items, eager._open, eager._in_string, eager.error), cut)
            self.assertGreater(lazy.items, 0)

    def test_a_small_body_is_not_scanned(self) -> None:
        shape = shape_of(b'{"model": "m", "messages": [{"role": "user"}]}', [10], 64, 1000,
                         lazy=True)
        self.assertEqual((shape.items, shape.error), (0, None))
        self.assertIsNone(shape_of(b"[" * 64 + b"]" * 64, [3], 64, 1000, lazy=True).error)
        self.assertEqual(shape_of(b"[" * 65 + b"]" * 65, [3], 64, 1000, lazy=True).error,
                         "JSON body nests deeper than 64 levels")
        self.assertIn("more than 10 items",
                      str(shape_of(b"[" + b"1," * 10 + b"1]", [], 64, 10, lazy=True).error))
