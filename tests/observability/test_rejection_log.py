"""Tests for llamaproxy.observability.rejection_log: a line per reason, then summaries."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.observability.rejection_log import RejectionLog


class RejectionLogTests(SynchronousTestCase):
    def test_first_at_once_then_one_summary_per_window(self) -> None:
        clock = Clock()
        rejections = RejectionLog(clock, window=60)
        for _ in range(1000):
            rejections.rejected(401, "auth")
        rejections.rejected(400, "invalid_json")
        self.assertEqual(rejections.lines, 2)  # the first of each reason
        clock.advance(60)
        self.assertEqual(rejections.lines, 3)  # "999 more" for auth; nothing more for 400
        clock.advance(60)
        self.assertEqual(rejections.lines, 3)  # quiet: no line, timer not re-armed
        self.assertEqual(clock.getDelayedCalls(), [])
        rejections.rejected(401, "auth")
        self.assertEqual(rejections.lines, 4)  # after a quiet window: at once again
        rejections.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
