"""Prompt-cache affinity: send a conversation back to the replica that holds its prefix.

llama-server keeps each slot's KV cache (and, in recent builds, a RAM prompt cache) and reuses
it when the next prompt shares its prefix. Across replicas that only helps if turn 2 of a
conversation goes where turn 1 went. The ``cache_affinity`` strategy does that:

- ``prefix_hash`` reduces a request body to a 64-bit hash of the leading part of its rendered
  conversation (the messages up to and including the first user message, at most
  ``prefix_messages`` of them and ``prefix_chars`` characters), or None for a prompt too short to
  be worth a cache (``min_prompt_chars``). It is computed once, while the body is parsed, with a
  keyed-free hash (BLAKE2b), so every gateway process hashes the same prompt the same way.
- ``HashRing`` is a consistent-hash ring (virtual nodes) of a model's backends: the walk from a
  prefix's point gives its preferred backends, and removing a backend moves only its prefixes.
- ``bounded_choice`` applies consistent hashing with bounded load: a backend whose in-flight
  count would exceed ``load_factor`` times its fair share (by slots) is passed over. A prefix
  that has no home yet is placed with a factor of 1 (no cache to gain from an imbalance).
- ``AffinityMemory`` is the learned part: a bounded LRU of (model, prefix) -> the backend that
  last served it, so a conversation that moved (its backend went down, or overflowed) stays where
  its cache now is. It also counts, per backend, prompt tokens evaluated and taken from the cache.

Nothing here does I/O or imports the gateway.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

#: Ring points per backend (more: a smoother spread, a larger ring).
VIRTUAL_NODES = 64

#: The load bound of prefixes without a (ready) home: no cache is lost by moving them, so they
#: are placed as evenly as least-busy would (``load_factor`` applies to remembered homes).
NEW_PREFIX_LOAD_FACTOR = 1.0

#: Approximate bytes one remembered prefix costs (OrderedDict entry and its int key; the backend
#: name is shared). Measured with tracemalloc on CPython 3.11 (tests/backends/test_affinity.py
#: checks it).
BYTES_PER_ENTRY = 160

#: Routing decisions, as the access log, the metrics and POST /v1/route name them.
AFFINITY_HIT = "affinity_hit"  # the backend that served this prefix last
AFFINITY_MISS = "affinity_miss"  # no (usable) memory of the prefix: the ring's choice
OVERFLOW = "overflow"  # the preferred backend was over its load bound: the next one on the ring
SHORT_PROMPT = "short_prompt"  # no reusable prefix: least-busy
DECISIONS = (AFFINITY_HIT, AFFINITY_MISS, OVERFLOW, SHORT_PROMPT)


@dataclass(frozen=True)
class AffinitySettings:
    """The backends file's ``[affinity]`` table (used by models with ``cache_affinity``)."""

    #: Characters of the rendered conversation hashed (at most).
    prefix_chars: int = 4096
    #: Messages hashed (at most); hashing also stops after the first user message.
    prefix_messages: int = 4
    #: Prompts with fewer characters of text have no reusable prefix: least-busy.
    min_prompt_chars: int = 1024
    #: A backend more than this factor above its fair share of in-flight requests is skipped.
    load_factor: float = 1.25
    #: Prefixes remembered (LRU, all models together); 0 = hash only, learn nothing.
    remembered: int = 10000
    #: Add ``id_slot`` (chosen by the prefix) to requests for backends with several slots.
    pin_slot: bool = False


@dataclass(frozen=True)
class PrefixRule:
    """What ``prefix_hash`` needs of the settings (given to the body parser)."""

    prefix_chars: int
    prefix_messages: int
    min_prompt_chars: int

    @classmethod
    def of(cls, settings: AffinitySettings) -> PrefixRule:
        """The rule of ``settings``."""
        return cls(settings.prefix_chars, settings.prefix_messages, settings.min_prompt_chars)


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _text_of(content: object) -> str:
    """A message's text: a string, or the text parts of a content array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                texts.append(text if isinstance(text, str) else str(part.get("type", "")))
        return "\x1d".join(texts)
    return ""


def prefix_hash(body: Mapping[str, Any], rule: PrefixRule) -> int | None:
    """The 64-bit hash of the leading part of ``body``'s conversation, or None (short prompt).

    Chat: ``role`` and text of the messages up to and including the first user message (at most
    ``prefix_messages``), cut at ``prefix_chars`` characters; completions: the first
    ``min_prompt_chars`` (at most ``prefix_chars``) characters of a string ``prompt``. Work is
    bounded by those limits (and by ``min_prompt_chars`` for the length check), never by the
    size of the body.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        pieces: list[str] = []
        room = rule.prefix_chars
        for index, message in enumerate(messages):
            if index >= rule.prefix_messages or room <= 0 or not isinstance(message, dict):
                break
            role = message.get("role")
            piece = f"{role}\x1f{_text_of(message.get('content'))}\x1e"[:room]
            pieces.append(piece)
            room -= len(piece)
            if role == "user":
                break
        if not pieces:
            return None
        # Enough text in the whole prompt to be worth a cache? (stops counting once it is)
        total = 0
        for message in messages:
            if isinstance(message, dict):
                total += len(_text_of(message.get("content")))
                if total >= rule.min_prompt_chars:
                    break
        if total < rule.min_prompt_chars:
            return None
        return _hash64("".join(pieces).encode("utf-8", "surrogatepass"))
    prompt = body.get("prompt")
    if isinstance(prompt, str) and len(prompt) >= rule.min_prompt_chars:
        # A raw prompt has no first message: its first min_prompt_chars characters are what
        # every longer prompt of the same conversation shares.
        length = min(rule.prefix_chars, rule.min_prompt_chars or rule.prefix_chars)
        return _hash64(prompt[:length].encode("utf-8", "surrogatepass"))
    return None


class HashRing:
    """A consistent-hash ring of backend names, ``VIRTUAL_NODES`` points each."""

    def __init__(self, names: Iterable[str], virtual_nodes: int = VIRTUAL_NODES) -> None:
        self.names = tuple(dict.fromkeys(names))
        points = sorted(
            (_hash64(f"{name}#{index}".encode()), name)
            for name in self.names for index in range(virtual_nodes)
        )
        self._points = [point for point, _ in points]
        self._owners = [name for _, name in points]

    def walk(self, key: int) -> Iterator[str]:
        """Every backend once, in the order met going clockwise from ``key``'s point."""
        count = len(self._points)
        if not count:
            return
        start = bisect.bisect_left(self._points, key)
        seen: set[str] = set()
        for offset in range(count):
            name = self._owners[(start + offset) % count]
            if name not in seen:
                seen.add(name)
                yield name
                if len(seen) == len(self.names):
                    return

    def owner(self, key: int) -> str:
        """The backend ``key`` belongs to when every backend is available."""
        return next(self.walk(key))


class Loaded(Protocol):
    """A backend as bounded load sees it (a ``routing.Member``)."""

    @property
    def in_flight(self) -> int: ...

    @property
    def slots(self) -> int: ...


def capacity(member: Loaded, total_in_flight: int, total_slots: int, load_factor: float) -> int:
    """Most requests ``member`` may hold, counting the one being placed.

    Its share (by slots) of all in-flight requests plus the new one, times ``load_factor``,
    rounded up. The capacities add up to more than what is in flight, so some backend always
    has room.
    """
    return math.ceil(load_factor * (total_in_flight + 1) * member.slots / total_slots)


def bounded_choice(preferred: Sequence[Loaded], load_factor: float) -> tuple[int, bool]:
    """Index in ``preferred`` of the first backend within its load bound; True if not the first."""
    total = sum(m.in_flight for m in preferred)
    slots = sum(m.slots for m in preferred) or 1
    for index, member in enumerate(preferred):
        if member.in_flight + 1 <= capacity(member, total, slots, load_factor):
            return index, index > 0
    return 0, False  # (unreachable: the capacities leave room somewhere)


@dataclass
class PromptCounts:
    """Prompt tokens one backend evaluated and took from its cache (as its responses said)."""

    evaluated: int = 0
    reused: int = 0
    responses: int = 0

    @property
    def reuse_ratio(self) -> float:
        """Share of prompt tokens taken from the cache (0 before any)."""
        total = self.evaluated + self.reused
        return self.reused / total if total else 0.0


@dataclass
class AffinityMemory:
    """What routing learned: recent prefix -> backend (bounded LRU), and prompt-cache counts.

    One per gateway process; a reload hands it to the new router (``capacity`` may change).
    """

    capacity: int = AffinitySettings.remembered
    _homes: OrderedDict[int, str] = field(default_factory=OrderedDict)
    counts: dict[str, PromptCounts] = field(default_factory=dict)
    decisions: dict[tuple[str, str], int] = field(default_factory=dict)

    @staticmethod
    def key(model: str, prefix: int) -> int:
        """The memory's key of ``prefix`` for ``model`` (models never share a home)."""
        return prefix ^ _hash64(model.encode())

    def home(self, model: str, prefix: int) -> str | None:
        """The backend that last served ``prefix`` of ``model`` (no LRU update)."""
        return self._homes.get(self.key(model, prefix))

    def remember(self, model: str, prefix: int, backend: str) -> None:
        """``backend`` served ``prefix`` of ``model``: it is now its home (most recent)."""
        if self.capacity <= 0:
            return
        key = self.key(model, prefix)
        homes = self._homes
        homes[key] = backend
        homes.move_to_end(key)
        while len(homes) > self.capacity:
            homes.popitem(last=False)

    def resize(self, new_capacity: int) -> None:
        """Keep at most ``new_capacity`` prefixes (the most recent)."""
        self.capacity = new_capacity
        while len(self._homes) > max(new_capacity, 0):
            self._homes.popitem(last=False)

    def forget(self, backend: str) -> None:
        """Drop every prefix whose home is ``backend`` (removed by a reload)."""
        for key in [k for k, name in self._homes.items() if name == backend]:
            del self._homes[key]
        self.counts.pop(backend, None)

    def __len__(self) -> int:
        return len(self._homes)

    @property
    def approximate_bytes(self) -> int:
        """Memory the remembered prefixes take, approximately."""
        return len(self._homes) * BYTES_PER_ENTRY

    def decided(self, model: str, decision: str) -> None:
        """Count one routing decision of a ``cache_affinity`` model."""
        key = (model, decision)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def served(self, backend: str, evaluated: int | None, reused: int | None) -> None:
        """A response from ``backend`` reported its prompt tokens (evaluated, from cache)."""
        if evaluated is None and reused is None:
            return
        counts = self.counts.get(backend)
        if counts is None:
            counts = self.counts[backend] = PromptCounts()
        counts.evaluated += evaluated or 0
        counts.reused += reused or 0
        counts.responses += 1

    def prompt_tokens_json(self, backend: str) -> dict[str, object] | None:
        """``backend``'s prompt-cache counts for /health, or None before any."""
        counts = self.counts.get(backend)
        if counts is None:
            return None
        return {"evaluated": counts.evaluated, "reused": counts.reused,
                "reuse_ratio": round(counts.reuse_ratio, 4)}

    def memory_json(self) -> dict[str, object]:
        """How much is remembered (POST /v1/route's ``affinity`` object)."""
        return {"remembered": len(self._homes), "capacity": self.capacity,
                "approximate_bytes": self.approximate_bytes}


def slot_for(prefix: int, slots: int) -> int:
    """The slot ``pin_slot`` gives ``prefix`` on a backend with ``slots`` slots."""
    return (prefix >> 7) % slots
