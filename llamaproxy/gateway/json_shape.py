"""The shape of a JSON body, measured as it arrives: nesting depth and number of items.

A body that is valid JSON can still be a weapon: ten megabytes of ``[{},{},…]`` is 3.5 million
objects once parsed (300 MB for one request), and ``[`` x 10 000 makes the parser recurse until
it fails. ``JsonShape`` looks at each piece of a body as it is received, at C speed (regular
expressions and ``bytes`` methods, no Python loop per character), and says when the body nests
deeper than ``max_depth`` or holds more than ``max_items`` items, so the gateway refuses it before
it builds anything from it.

What it counts: strings are cut out first (a comma or a bracket inside a string is text, not
structure); then every ``,``, ``:``, ``[`` and ``{`` left starts an item (a value, or an object's
key), so the count is the number of keys and values, close to the number of objects a parser
would make. The depth is that of ``[`` and ``{``. The scanner does not validate: ``json.loads``
does that afterwards, on a body whose cost is now bounded. It keeps O(max_depth) bytes of state
across pieces (the open brackets), whatever the body's size.

A ``lazy`` shape (what requests use) scans nothing while a bound proves the body within both
limits: items are counted bytes, so a body of at most ``max_items`` bytes has at most that many,
and its depth is at most its number of ``[`` and ``{`` (strings included). The usual request body
is one small piece with a few brackets: two ``bytes.count`` instead of the scan.
"""

from __future__ import annotations

import re

#: A JSON string, quotes included, or one that runs to the end of the piece (group 1: closed).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:(")|\\?\Z)')
#: The rest of a string that started earlier: up to (not including) its closing quote.
_STRING_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*')
#: Every byte but the four brackets (deleted to keep the structure alone).
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_CLOSERS = frozenset(b"]}")
#: The bytes that start an item outside strings.
_ITEM_BYTES = b",:[{"
#: Reduction passes tried before walking a piece's brackets one by one instead.
_PASSES = 8
#: Most body bytes a lazy shape keeps unscanned (past them, it scans what it kept and goes on).
MAX_UNSCANNED = 1 << 16


class JsonShape:
    """Depth and item count of one JSON body, fed piece by piece (see the module docstring)."""

    __slots__ = ("_escape", "_in_string", "_open", "_unscanned", "_unscanned_openers",
                 "_unscanned_size", "error", "items", "max_depth", "max_items")

    def __init__(self, max_depth: int, max_items: int, lazy: bool = False) -> None:
        self.max_depth = max_depth
        self.max_items = max_items
        #: Keys and values seen so far.
        self.items = 0
        #: Why the body is refused (it passed a limit), or None.
        self.error: str | None = None
        self._in_string = False
        self._escape = False  # the last piece ended inside a string, on a backslash
        self._open = b""  # the brackets open at the end of what was fed
        #: Lazy: the pieces not scanned yet, while the bound holds (None: every piece is scanned;
        #: ``items`` and the state above only count scanned pieces).
        self._unscanned: list[bytes] | None = [] if lazy else None
        self._unscanned_size = 0
        self._unscanned_openers = 0

    def feed(self, data: bytes) -> None:
        """One more piece of the body (pieces may split anything, even an escape)."""
        unscanned = self._unscanned
        if unscanned is not None:
            size = self._unscanned_size + len(data)
            openers = self._unscanned_openers + data.count(b"[") + data.count(b"{")
            if size <= MAX_UNSCANNED and size <= self.max_items and openers <= self.max_depth:
                unscanned.append(data)
                self._unscanned_size, self._unscanned_openers = size, openers
                return
            self._unscanned = None  # the bound no longer holds: scan, in order, from the start
            for piece in unscanned:
                self._scan(piece)
        self._scan(data)

    def _scan(self, data: bytes) -> None:
        if self.error is not None or not data:
            return
        start = 0
        if self._in_string:
            if self._escape:
                self._escape = False
                start = 1  # the escaped byte
            end = _STRING_BODY.match(data, start).end()  # type: ignore[union-attr]
            if end >= len(data):
                return  # still inside the string
            if data[end] != 0x22:  # a backslash, the piece's last byte
                self._escape = True
                return
            self._in_string = False
            start = end + 1
        rest = data[start:] if start else data
        if rest.find(b"\\") == -1:  # (find: see tokens.carries_counts on `in`)
            # No escapes (the usual piece): every quote opens or closes a string, so what lies
            # between them is the structure, at the cost of a split instead of a match per
            # string; an odd number of quotes leaves the last string running on.
            strings = rest.split(b'"')
            structure = b"".join(strings[::2])
            if len(strings) % 2 == 0:
                self._in_string = True
        else:
            # Each string becomes ``S"``; one that runs past this piece becomes ``S`` (the match
            # runs to the end rather than failing, so no position is scanned twice).
            structure = _STRING.sub(_as_marker, rest)
            if structure.endswith(b"S"):
                self._in_string = True
                trailing = len(rest) - len(rest.rstrip(b"\\"))
                self._escape = trailing % 2 == 1  # it stopped on a backslash that escapes nothing
        self._count(structure)

    def _count(self, structure: bytes) -> None:
        # The item bytes, counted as what deleting them takes away (one pass, not four).
        self.items += len(structure) - len(structure.translate(None, _ITEM_BYTES))
        if self.items > self.max_items:
            self.error = f"JSON body has more than {self.max_items} items (keys and values)"
            return
        brackets = structure.translate(None, _NOT_BRACKETS)
        if not brackets:
            return
        # Pairs closed inside this piece vanish, innermost first, one level per pass (at C
        # speed: a shallow structure, however wide, takes a few passes).
        left = self._open + brackets
        passes = 0
        while passes <= _PASSES:
            # Every ``[]`` and ``{}`` of ``left`` goes, and no pair a removal makes: a ``.``
            # stands in for each ``[]`` while the ``{}`` go (one level, as one regular
            # expression ``sub`` would remove, at a third of its cost).
            reduced = left.replace(b"[]", b".").replace(b"{}", b"").replace(b".", b"")
            if len(reduced) == len(left):
                break
            left = reduced
            passes += 1
            if not left:
                break  # everything closed: one more pass would only confirm it
        else:
            # Deep structure in this piece: one walk, which stops where it passes the limit.
            walked = _walk(self._open + brackets, self.max_depth)
            if walked is None:
                self.error = f"JSON body nests deeper than {self.max_depth} levels"
                return
            left = walked
        if left and left[0] in _CLOSERS:
            return  # unbalanced: not JSON, and json.loads will say so
        if len(left) + passes > self.max_depth and _walk(self._open + brackets,
                                                         self.max_depth) is None:
            self.error = f"JSON body nests deeper than {self.max_depth} levels"
            return
        self._open = left


def _as_marker(match: re.Match[bytes]) -> bytes:
    """A string's stand-in: ``S"`` when it closed in this piece, ``S`` when it runs on (a
    function is faster here than a template with a group reference)."""
    return _CLOSED if match.group(1) is not None else _RUNS_ON


_CLOSED, _RUNS_ON = b'S"', b"S"


def _walk(brackets: bytes, max_depth: int) -> bytes | None:
    """The brackets still open after ``brackets``, or None as soon as the depth passes
    ``max_depth`` (exact; a Python loop, so only for deep structure)."""
    stack = bytearray()
    for byte in brackets:
        if byte in _CLOSERS:
            if stack:
                stack.pop()
            else:
                return bytes([byte])  # a closer with nothing open: not JSON (the parser says so)
        else:
            stack.append(byte)
            if len(stack) > max_depth:
                return None
    return bytes(stack)
