"""Concurrency slots and a bounded wait queue served round-robin across key ids.

At most ``max_concurrent`` requests hold a slot (for their whole response, streams included).
Others wait, at most ``max_queue_size`` of them (0 = unlimited) and at most ``max_queue_per_key``
of one key (0 = no per-key bound); beyond that ``QueueFullError``.
Waiters are grouped by key id and served in rotation, so one key's burst cannot starve another
key's single request.

Two ways to wait. ``acquire(key_id)`` gives a Deferred (cancel it to leave the queue, e.g. with
``addTimeout``). ``park(waiter, deadline)`` queues a ``Waiter`` object instead: no Deferred and
no timer of its own. The admission keeps one timer for all parked waiters and calls
``waiter.expired()`` when a deadline passes, ``waiter.granted(slot)`` when a slot is its. That is
what a queue of ten thousand requests is made of, so it is kept small.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Slack when comparing a deadline with the clock (a timer may fire a hair early in float terms).
_EPSILON = 1e-6


class QueueFullError(Exception):
    """The wait queue is at ``max_queue_size`` (or the key's share, ``max_queue_per_key``)."""


class Slot:
    """A held concurrency slot; release it exactly once (later calls do nothing)."""

    __slots__ = ("admission", "released")

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.released = False

    def release(self) -> None:
        """Give the slot back (idempotent)."""
        if not self.released:
            self.released = True
            self.admission._slot_freed()


class Waiter(ABC):
    """A place in the queue. Subclasses say what happens when it is served or times out."""

    __slots__ = ("key_id", "queued")

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        #: True while in the queue (False once served, cancelled or expired).
        self.queued = False

    @abstractmethod
    def granted(self, slot: Slot) -> None:
        """The waiter's turn: ``slot`` is now held on its behalf."""

    @abstractmethod
    def expired(self) -> None:
        """The waiter's deadline passed before a slot was free; it has left the queue."""


class _DeferredWaiter(Waiter):
    """The waiter behind ``acquire``: fires its Deferred with the slot."""

    __slots__ = ("admission", "deferred")

    def __init__(self, key_id: str, admission: Admission) -> None:
        super().__init__(key_id)
        self.admission = admission
        # (waiter -> Deferred -> canceller -> waiter is a cycle until served or cancelled.)
        self.deferred: Deferred[Slot] | None = Deferred(self._cancelled)

    def _cancelled(self, _: Deferred[Slot]) -> None:
        self.deferred = None
        self.admission.cancel(self)

    def granted(self, slot: Slot) -> None:
        d, self.deferred = self.deferred, None
        assert d is not None
        d.callback(slot)

    def expired(self) -> None:  # pragma: no cover - acquire() waiters have no deadline here
        if self.deferred is not None:
            self.deferred.cancel()


class Admission:
    """Slots plus a fair queue. ``acquire(key_id)`` gives a Deferred that fires with a Slot."""

    def __init__(
        self,
        max_concurrent: int,
        max_queue_size: int = 0,
        max_queue_per_key: int = 0,
        clock: IReactorTime | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.max_concurrent = max_concurrent
        self.max_queue_size = max_queue_size
        self.max_queue_per_key = max_queue_per_key
        #: Times parked waiters out (``park`` needs it).
        self.clock = clock
        self.active = 0
        self.waiting = 0
        #: Slots released so far: requests served (how a swap group counts a batch).
        self.served = 0
        # Per key: its waiters in order (cancelled ones stay until reached) and how many are live.
        self._queues: OrderedDict[str, deque[Waiter]] = OrderedDict()
        self._counts: dict[str, int] = {}
        # Parked waiters by deadline: (deadline, sequence, waiter); one timer for the earliest.
        self._deadlines: list[tuple[float, int, Waiter]] = []
        self._sequence = itertools.count()
        self._timer: IDelayedCall | None = None
        self._handing_over = False
        #: Told when the demand for slots grows (a request starts waiting) or shrinks (a slot is
        #: freed): how slots leased from Redis follow it (``state.slot_leases``). None: no one.
        self.on_change: Callable[[], None] | None = None

    def set_capacity(self, slots: int) -> None:
        """Change how many slots may be held at once (0 or more; slots leased from a shared
        store come and go). Waiters are served at once when it grows; when it shrinks, held
        slots stay held and no new one is given until ``active`` is below it."""
        self.max_concurrent = max(0, slots)
        if not self._handing_over:
            self._handing_over = True
            try:
                self._hand_over()
            finally:
                self._handing_over = False

    @property
    def full(self) -> bool:
        """True when a new request would have to wait (every slot held, or others waiting)."""
        return self.active >= self.max_concurrent or self.waiting > 0

    def take(self) -> Slot | None:
        """A free slot now, or None when the request would have to wait (see ``acquire``)."""
        if self.full:
            return None
        self.active += 1
        return Slot(self)

    def acquire(self, key_id: str) -> Deferred[Slot]:
        """A Deferred firing with a Slot; raises QueueFullError when no slot and no room to wait.

        Cancelling the Deferred takes it out of the queue. (``take`` is the synchronous way to
        get a free slot.)
        """
        slot = self.take()
        if slot is not None:
            d: Deferred[Slot] = Deferred()
            d.callback(slot)
            return d
        self._check_room(key_id)
        waiter = _DeferredWaiter(key_id, self)
        self._enqueue(waiter)
        assert waiter.deferred is not None
        return waiter.deferred

    def park(self, waiter: Waiter, deadline: float) -> None:
        """Queue ``waiter`` until a slot is its (``granted``) or ``deadline`` passes (``expired``).

        Raises QueueFullError when there is no room. Only for a full admission (see ``full``):
        with a slot free, take it with ``acquire``.
        """
        if self.clock is None:
            raise RuntimeError("park() needs an Admission with a clock")
        self._check_room(waiter.key_id)
        self._enqueue(waiter)
        heapq.heappush(self._deadlines, (deadline, next(self._sequence), waiter))
        if self._deadlines[0][2] is waiter:
            self._arm()

    def cancel(self, waiter: Waiter) -> None:
        """Take ``waiter`` out of the queue (its client left); nothing if it is not queued."""
        if not waiter.queued:
            return
        waiter.queued = False
        self.waiting -= 1
        key_id = waiter.key_id
        left = self._counts[key_id] - 1
        if left:
            self._counts[key_id] = left
        else:
            # Its last live waiter: drop the key's line (and the cancelled entries in it).
            del self._counts[key_id]
            del self._queues[key_id]
        self._left_queue()
        if self.on_change is not None:
            self.on_change()

    def _check_room(self, key_id: str) -> None:
        if self.max_queue_size and self.waiting >= self.max_queue_size:
            raise QueueFullError()
        if self.max_queue_per_key and self._counts.get(key_id, 0) >= self.max_queue_per_key:
            raise QueueFullError()

    def _enqueue(self, waiter: Waiter) -> None:
        key_id = waiter.key_id
        queue = self._queues.get(key_id)
        if queue is None:
            queue = self._queues[key_id] = deque()
        queue.append(waiter)
        self._counts[key_id] = self._counts.get(key_id, 0) + 1
        waiter.queued = True
        self.waiting += 1
        if self.on_change is not None:
            self.on_change()

    def _slot_freed(self) -> None:
        self.active -= 1
        self.served += 1
        if self._handing_over:
            return  # released by a waiter being served: the loop below, up the stack, goes on
        if self.waiting:  # (else there is no one to serve)
            self._handing_over = True
            try:
                self._hand_over()
            finally:
                self._handing_over = False
        if self.on_change is not None:
            self.on_change()

    def _hand_over(self) -> None:
        """Serve waiters while slots are free (a loop, never a recursion: a waiter may release
        its slot at once, e.g. when its backend's breaker has just opened)."""
        while self.waiting and self.active < self.max_concurrent:
            key_id, queue = next(iter(self._queues.items()))
            waiter = queue.popleft()
            if not waiter.queued:
                continue  # cancelled earlier; the key still has live waiters behind it
            # Rotate: this key goes to the back of the line (or leaves it when done).
            del self._queues[key_id]
            left = self._counts[key_id] - 1
            if left:
                self._counts[key_id] = left
                self._queues[key_id] = queue
            else:
                del self._counts[key_id]
            waiter.queued = False
            self.waiting -= 1
            self.active += 1
            self._left_queue()
            waiter.granted(Slot(self))

    # -- deadlines of parked waiters -----------------------------------------------------------

    def _arm(self) -> None:
        assert self.clock is not None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        delay = max(0.0, self._deadlines[0][0] - self.clock.seconds())
        self._timer = self.clock.callLater(delay, self._expire)

    def _expire(self) -> None:
        assert self.clock is not None
        self._timer = None
        now = self.clock.seconds() + _EPSILON
        due: list[Waiter] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            waiter = heapq.heappop(self._deadlines)[2]
            if waiter.queued:
                self.cancel(waiter)  # (may rebuild self._deadlines: read it afresh each turn)
                due.append(waiter)
        while self._deadlines and not self._deadlines[0][2].queued:
            heapq.heappop(self._deadlines)  # served or cancelled: drop its entry
        if self._deadlines:
            self._arm()
        for waiter in due:
            waiter.expired()

    def _left_queue(self) -> None:
        """A waiter left (served or cancelled): drop deadline entries nobody needs any more."""
        if not self.waiting:
            self._deadlines.clear()
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
        elif len(self._deadlines) > 2 * self.waiting + 64:
            # Mostly served or cancelled entries: keep the live ones (amortised O(1) a waiter).
            self._deadlines = [entry for entry in self._deadlines if entry[2].queued]
            heapq.heapify(self._deadlines)

    def waiting_by_key(self) -> dict[str, int]:
        """How many requests each key has waiting right now (a copy, for the operator page)."""
        return dict(self._counts)

    def status_json(self) -> dict[str, Any]:
        """The queue section of /health."""
        return {
            "max_concurrent": self.max_concurrent,
            "max_queue_size": self.max_queue_size,
            "active": self.active,
            "waiting": self.waiting,
        }
