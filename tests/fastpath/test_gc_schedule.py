"""Tests for llamaproxy.fastpath.gc_schedule: young collections on allocation, full ones on a
timer."""

from __future__ import annotations

import gc

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.fastpath.gc_schedule import FULL_INTERVAL, YOUNG_THRESHOLD, GcSchedule


class GcScheduleTests(SynchronousTestCase):
    def setUp(self) -> None:
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)

    def test_young_on_allocation_full_on_the_timer(self) -> None:
        clock = Clock()
        schedule = GcSchedule(clock)
        before = gc.get_threshold()
        schedule.startService()
        young, older, oldest = gc.get_threshold()
        self.assertEqual(young, YOUNG_THRESHOLD)
        self.assertGreater(min(older, oldest), 10**6)  # never on allocation
        self.assertGreater(gc.get_freeze_count(), 0)  # start-up objects out of sight
        full = gc.get_stats()[2]["collections"]
        clock.advance(FULL_INTERVAL - 1)
        self.assertEqual(schedule.full_collections, 0)
        clock.advance(1)
        self.assertEqual(schedule.full_collections, 1)
        self.assertGreater(gc.get_stats()[2]["collections"], full)
        clock.advance(FULL_INTERVAL)
        self.assertEqual(schedule.full_collections, 2)  # and again, every interval
        schedule.stopService()
        self.assertEqual(gc.get_threshold(), before)
        self.assertEqual(clock.getDelayedCalls(), [])
        schedule.stopService()  # twice: nothing more to undo
        self.assertEqual(gc.get_threshold(), before)

    def test_cyclic_garbage_is_collected_by_the_timer(self) -> None:
        import weakref

        class Node:
            other: object = None

        clock = Clock()
        schedule = GcSchedule(clock, full_interval=5)
        schedule.startService()
        self.addCleanup(schedule.stopService)
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        gc.collect(0)  # a young collection moves the pair to generation 1: out of its reach
        del a, b
        gc.collect(0)
        self.assertIsNotNone(gone())  # the young generation no longer sees it
        clock.advance(5)
        self.assertIsNone(gone())
