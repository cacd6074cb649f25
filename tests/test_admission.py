"""Tests for llamaproxy.admission: slots, the bounded queue, round-robin fairness, cancellation."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.admission import Admission, QueueFullError, Slot


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
