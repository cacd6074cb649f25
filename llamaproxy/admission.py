"""Concurrency slots and a bounded wait queue served round-robin across key ids.

At most ``max_concurrent`` requests hold a slot (for their whole response, streams included).
Others wait, at most ``max_queue_size`` of them (0 = unlimited) and at most ``max_queue_per_key``
of one key (0 = no per-key bound); beyond that ``QueueFullError``.
Waiters are grouped by key id and served in rotation, so one key's burst cannot starve another
key's single request. A waiter whose Deferred is cancelled (its client left) leaves at once.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from twisted.internet.defer import Deferred


class QueueFullError(Exception):
    """The wait queue is at ``max_queue_size``."""


@dataclass
class Slot:
    """A held concurrency slot; release it exactly once."""

    admission: Admission
    released: bool = False

    def release(self) -> None:
        """Give the slot back (idempotent)."""
        if not self.released:
            self.released = True
            self.admission._slot_freed()


class Admission:
    """Slots plus a fair queue. ``acquire(key_id)`` gives a Deferred that fires with a Slot."""

    def __init__(
        self, max_concurrent: int, max_queue_size: int = 0, max_queue_per_key: int = 0
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.max_concurrent = max_concurrent
        self.max_queue_size = max_queue_size
        self.max_queue_per_key = max_queue_per_key
        self.active = 0
        self.waiting = 0
        self._queues: OrderedDict[str, deque[Deferred[Slot]]] = OrderedDict()

    def acquire(self, key_id: str) -> Deferred[Slot]:
        """A Deferred firing with a Slot; raises QueueFullError when no slot and no room to wait."""
        if self.active < self.max_concurrent and not self.waiting:
            self.active += 1
            d: Deferred[Slot] = Deferred()
            d.callback(Slot(self))
            return d
        if self.max_queue_size and self.waiting >= self.max_queue_size:
            raise QueueFullError()
        queue = self._queues.get(key_id)
        if self.max_queue_per_key and queue is not None and len(queue) >= self.max_queue_per_key:
            raise QueueFullError()
        if queue is None:
            queue = self._queues[key_id] = deque()
        waiter: Deferred[Slot] = Deferred(lambda d: self._cancel(key_id, d))
        queue.append(waiter)
        self.waiting += 1
        return waiter

    def _cancel(self, key_id: str, waiter: Deferred[Slot]) -> None:
        queue = self._queues.get(key_id)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        self.waiting -= 1
        if not queue:
            del self._queues[key_id]

    def _slot_freed(self) -> None:
        self.active -= 1
        while self._queues and self.active < self.max_concurrent:
            key_id, queue = next(iter(self._queues.items()))
            waiter = queue.popleft()
            self.waiting -= 1
            # Rotate: this key goes to the back of the line (or leaves it when empty).
            del self._queues[key_id]
            if queue:
                self._queues[key_id] = queue
            self.active += 1
            waiter.callback(Slot(self))

    def status_json(self) -> dict[str, int]:
        """The queue section of /health."""
        return {
            "max_concurrent": self.max_concurrent,
            "max_queue_size": self.max_queue_size,
            "active": self.active,
            "waiting": self.waiting,
        }
