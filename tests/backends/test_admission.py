"""Tests for llamaproxy.backends.admission: slots, the bounded queue, round-robin fairness,
cancellation."""

from __future__ import annotations

from typing import cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.backends.admission import Admission, QueueFullError, Slot, Waiter


class AdmissionTests(SynchronousTestCase):
    def test_slots_then_queue_then_full(self) -> None:
        admission = Admission(max_concurrent=1, max_queue_size=2)
        first = self.successResultOf(admission.acquire("a"))
        second = admission.acquire("a")
        third = admission.acquire("b")
        self.assertNoResult(second)
        self.assertEqual(admission.status_json(),
                         {"max_concurrent": 1, "max_queue_size": 2, "active": 1, "waiting": 2})
        self.assertRaises(QueueFullError, admission.acquire, "c")
        first.release()
        first.release()  # idempotent
        self.assertEqual(admission.active, 1)
        self.successResultOf(second).release()
        self.successResultOf(third).release()
        self.assertEqual((admission.active, admission.waiting), (0, 0))

    def test_take_is_a_free_slot_or_none(self) -> None:
        admission = Admission(max_concurrent=1, max_queue_size=1)
        slot = admission.take()
        assert slot is not None
        self.assertEqual(admission.active, 1)
        self.assertIsNone(admission.take())  # full: nothing taken, nothing queued
        waiting = admission.acquire("a")
        self.assertEqual((admission.active, admission.waiting), (1, 1))
        slot.release()
        self.assertIsNone(admission.take())  # the slot went to the one waiting, not to take()
        self.successResultOf(waiting).release()
        self.assertEqual((admission.active, admission.waiting), (0, 0))

    def test_round_robin_across_keys(self) -> None:
        admission = Admission(max_concurrent=1)
        holder = self.successResultOf(admission.acquire("hog"))
        order: list[str] = []
        slots: list[Slot] = []

        def served(slot: Slot, key: str) -> None:
            order.append(key)
            slots.append(slot)

        for key in ["hog"] * 5 + ["small"] + ["other"]:
            admission.acquire(key).addCallback(served, key)
        holder.release()
        while slots:
            slots.pop(0).release()
        self.assertEqual(order, ["hog", "small", "other", "hog", "hog", "hog", "hog"])

    def test_cancel_leaves_the_queue(self) -> None:
        admission = Admission(max_concurrent=1)
        holder = self.successResultOf(admission.acquire("a"))
        waiter = admission.acquire("a")
        waiter.cancel()
        self.failureResultOf(waiter)
        self.assertEqual(admission.waiting, 0)
        holder.release()
        self.assertEqual(admission.active, 0)

    def test_invalid(self) -> None:
        self.assertRaises(ValueError, Admission, 0)

    @given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=40),
           st.integers(1, 3))
    def test_never_more_active_than_slots(self, ops: list[tuple[str, bool]], slots: int) -> None:
        admission = Admission(slots)
        held: list[Slot] = []
        for key, release in ops:
            if release and held:
                held.pop(0).release()
            else:
                admission.acquire(key).addCallback(held.append)
            self.assertLessEqual(admission.active, slots)
            self.assertEqual(admission.active, len(held))


class Parked(Waiter):
    """A test waiter that records what happened to it."""

    __slots__ = ("events",)

    def __init__(self, key_id: str) -> None:
        super().__init__(key_id)
        self.events: list[object] = []

    def granted(self, slot: Slot) -> None:
        self.events.append(slot)

    def expired(self) -> None:
        self.events.append("expired")


class ParkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.admission = Admission(1, clock=self.clock)
        self.holder = self.successResultOf(self.admission.acquire("hog"))
        self.assertTrue(self.admission.full)

    def test_parked_waiters_share_the_fair_queue_with_deferred_ones(self) -> None:
        first, second = Parked("a"), Parked("a")
        self.admission.park(first, 10)
        self.admission.park(second, 10)
        other = self.admission.acquire("b")
        self.assertEqual(self.admission.waiting, 3)
        self.holder.release()
        self.assertEqual(len(first.events), 1)
        cast(Slot, first.events[0]).release()
        served = self.successResultOf(other)  # b's turn comes before a's second
        self.assertEqual(second.events, [])
        served.release()
        self.assertEqual(len(second.events), 1)
        self.assertEqual((self.admission.waiting, self.admission.active), (0, 1))

    def test_one_timer_expires_waiters_in_deadline_order(self) -> None:
        waiters = [Parked("a") for _ in range(100)]
        for i, waiter in enumerate(waiters):
            self.admission.park(waiter, 10 + (i % 2))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(10)
        self.assertEqual([w.events for w in waiters[::2]], [["expired"]] * 50)
        self.assertEqual([w.events for w in waiters[1::2]], [[]] * 50)
        self.assertEqual(self.admission.waiting, 50)
        self.clock.advance(1)
        self.assertEqual(self.admission.waiting, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.holder.release()
        self.assertEqual(self.admission.active, 0)

    def test_a_later_park_with_an_earlier_deadline_rearms_the_timer(self) -> None:
        late, early = Parked("a"), Parked("b")
        self.admission.park(late, 30)
        self.admission.park(early, 5)
        self.clock.advance(5)
        self.assertEqual((early.events, late.events), (["expired"], []))
        self.clock.advance(25)
        self.assertEqual(late.events, ["expired"])

    def test_cancel_is_lazy_but_exact(self) -> None:
        waiters = [Parked("a") for _ in range(3)]
        for waiter in waiters:
            self.admission.park(waiter, 10)
        self.admission.cancel(waiters[0])
        self.admission.cancel(waiters[0])  # twice: nothing more
        self.assertEqual(self.admission.waiting, 2)
        self.holder.release()  # the cancelled one is skipped
        self.assertEqual((waiters[0].events, len(waiters[1].events)), ([], 1))
        self.admission.cancel(waiters[2])
        self.assertEqual(self.admission.waiting, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # nobody waits: no timer
        cast(Slot, waiters[1].events[0]).release()
        self.assertEqual(self.admission.active, 0)

    def test_stale_deadline_entries_are_dropped(self) -> None:
        keep = Parked("keep")
        self.admission.park(keep, 1000)
        for _ in range(500):
            gone = Parked("a")
            self.admission.park(gone, 10)
            self.admission.cancel(gone)
        self.assertLessEqual(len(self.admission._deadlines), 2 * 1 + 64 + 1)
        self.clock.advance(1000)
        self.assertEqual(keep.events, ["expired"])

    def test_bounds_apply_to_parked_waiters(self) -> None:
        admission = Admission(1, max_queue_size=2, max_queue_per_key=1, clock=self.clock)
        self.successResultOf(admission.acquire("x"))
        admission.park(Parked("a"), 10)
        self.assertRaises(QueueFullError, admission.park, Parked("a"), 10)
        admission.park(Parked("b"), 10)
        self.assertRaises(QueueFullError, admission.park, Parked("c"), 10)

    def test_park_needs_a_clock(self) -> None:
        self.assertRaises(RuntimeError, Admission(1).park, Parked("a"), 10)


class Releasing(Waiter):
    """A waiter that gives its slot back as soon as it is served."""

    __slots__ = ("index", "order")

    def __init__(self, key_id: str, order: list[int], index: int) -> None:
        super().__init__(key_id)
        self.order = order
        self.index = index

    def granted(self, slot: Slot) -> None:
        self.order.append(self.index)
        slot.release()

    def expired(self) -> None:
        raise AssertionError("not expected")


class HandOverTests(SynchronousTestCase):
    def test_waiters_releasing_at_once_do_not_recurse(self) -> None:
        admission = Admission(1, clock=Clock())
        holder = self.successResultOf(admission.acquire("hog"))
        order: list[int] = []
        for i in range(5000):  # far deeper than the interpreter's recursion limit
            admission.park(Releasing("k", order, i), 10)
        holder.release()
        self.assertEqual(order, list(range(5000)))
        self.assertEqual((admission.active, admission.waiting), (0, 0))
