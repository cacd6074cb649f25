"""How many request-body bytes the gateway holds, in all and per key, and the bounds on both.

Every API request holds its body from the moment it is announced (``Content-Length``, or each
piece of a chunked body as it comes) until the request ends: while it arrives, while it waits in
the queue, while a backend works on it (the body stays for failover and for the token estimate of
a cut stream). ``MAX_QUEUE_BYTES`` bounds the sum, ``MAX_QUEUE_BYTES_PER_KEY`` one key's share, so
one key holder sending large bodies can neither take the host's memory nor crowd out the other
keys: beyond either bound the request is refused with 503 ``queue_full`` and ``Retry-After``
before its body is read. 0 means no bound.
"""

from __future__ import annotations


class BodyBudget:
    """Reserve and release body bytes per key within a total and a per-key bound."""

    __slots__ = ("held", "max_per_key", "max_total", "per_key")

    def __init__(self, max_total: int, max_per_key: int) -> None:
        self.max_total = max_total
        self.max_per_key = max_per_key
        #: Bytes held now, in all and per key (keys holding nothing are not listed).
        self.held = 0
        self.per_key: dict[str, int] = {}

    def reserve(self, key_id: str | None, size: int) -> bool:
        """Hold ``size`` more bytes for ``key_id`` (None: no key, only the total applies);
        False, and nothing held, when a bound says no."""
        if size <= 0:
            return True
        if self.max_total and self.held + size > self.max_total:
            return False
        if key_id is None:
            self.held += size
            return True
        mine = self.per_key.get(key_id, 0)
        if self.max_per_key and mine + size > self.max_per_key:
            return False
        self.held += size
        self.per_key[key_id] = mine + size
        return True

    def full_in_total(self, size: int) -> bool:
        """Would ``size`` more bytes pass the total bound (whoever asks)?"""
        return bool(self.max_total) and self.held + size > self.max_total

    def release(self, key_id: str | None, size: int) -> None:
        """Give back ``size`` bytes ``key_id`` held."""
        if size <= 0:
            return
        self.held = max(0, self.held - size)
        if key_id is None:
            return
        left = self.per_key.get(key_id, 0) - size
        if left > 0:
            self.per_key[key_id] = left
        else:
            self.per_key.pop(key_id, None)
