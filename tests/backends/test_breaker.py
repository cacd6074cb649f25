"""Tests for llamaproxy.backends.breaker: the circuit breaker state machine, driven by a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.backends.breaker import (
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
    Ticket,
    log_state_change,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class BreakerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.changes: list[tuple[BreakerState, BreakerState]] = []

    def breaker(self, **settings: object) -> CircuitBreaker:
        breaker = CircuitBreaker(
            "b", self.clock, BreakerSettings(**settings)  # type: ignore[arg-type]
        )
        breaker.add_listener(lambda b, old, new: self.changes.append((old, new)))
        return breaker

    def ticket(self, breaker: CircuitBreaker) -> Ticket:
        ticket = breaker.acquire()
        assert ticket is not None, "the breaker refused"
        return ticket

    def record_failures(self, breaker: CircuitBreaker, times: int = 1) -> None:
        for _ in range(times):
            self.ticket(breaker).record_failure()

    def test_closed_until_threshold_consecutive_failures(self) -> None:
        breaker = self.breaker(failure_threshold=3)
        self.record_failures(breaker, 2)
        self.ticket(breaker).record_success()  # a success resets the run
        self.record_failures(breaker, 2)
        self.assertEqual(breaker.state, CLOSED)
        self.assertEqual(breaker.consecutive_failures, 2)
        self.record_failures(breaker)
        self.assertEqual(breaker.state, OPEN)
        self.assertEqual(self.changes, [(CLOSED, OPEN)])
        self.assertEqual((breaker.failures, breaker.successes, breaker.opens), (5, 1, 1))

    def test_open_rejects_then_half_open_after_reset_timeout(self) -> None:
        breaker = self.breaker(failure_threshold=1, reset_timeout=60)
        self.record_failures(breaker)
        self.assertFalse(breaker.allow())
        self.assertIsNone(breaker.acquire())
        self.assertIsNone(breaker.acquire())
        self.assertEqual(breaker.rejections, 2)
        self.assertEqual(breaker.retry_at, 60.0)
        self.clock.advance(59.5)
        self.assertEqual(breaker.retry_in, 0.5)
        self.assertEqual(breaker.state, OPEN)
        self.clock.advance(0.5)
        self.assertEqual(breaker.state, HALF_OPEN)
        self.assertIsNone(breaker.retry_at)
        self.assertEqual(self.changes, [(CLOSED, OPEN), (OPEN, HALF_OPEN)])

    def test_half_open_limits_trials(self) -> None:
        breaker = self.breaker(failure_threshold=1, reset_timeout=10, half_open_max=2,
                               success_threshold=3)
        self.record_failures(breaker)
        self.clock.advance(10)
        first, second = self.ticket(breaker), self.ticket(breaker)
        self.assertTrue(first.trial and second.trial)
        self.assertFalse(breaker.allow())
        self.assertIsNone(breaker.acquire())
        self.assertEqual(breaker.trials_in_flight, 2)
        first.record_success()  # frees a trial slot, 1 of 3 successes
        self.assertTrue(breaker.allow())
        third = self.ticket(breaker)
        second.record_success()
        self.assertEqual(breaker.state, HALF_OPEN)
        third.record_success()
        self.assertEqual(breaker.state, CLOSED)
        self.assertEqual(breaker.consecutive_failures, 0)
        self.assertEqual(self.changes[-1], (HALF_OPEN, CLOSED))
        self.assertFalse(self.ticket(breaker).trial)

    def test_success_threshold(self) -> None:
        breaker = self.breaker(failure_threshold=1, reset_timeout=5, success_threshold=2)
        self.record_failures(breaker)
        self.clock.advance(5)
        self.ticket(breaker).record_success()
        self.assertEqual(breaker.state, HALF_OPEN)
        self.ticket(breaker).record_success()
        self.assertEqual(breaker.state, CLOSED)

    def test_failure_while_half_open_reopens(self) -> None:
        breaker = self.breaker(failure_threshold=2, reset_timeout=30, success_threshold=2)
        self.record_failures(breaker, 2)
        self.clock.advance(30)
        self.ticket(breaker).record_success()
        self.ticket(breaker).record_failure()
        self.assertEqual(breaker.state, OPEN)
        self.assertEqual(breaker.opens, 2)
        self.assertEqual(breaker.retry_at, 60.0)  # the reset timeout starts again
        self.clock.advance(29)
        self.assertEqual(breaker.state, OPEN)
        self.clock.advance(1)
        self.assertEqual(breaker.state, HALF_OPEN)
        self.assertEqual(self.changes, [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN),
                                        (OPEN, HALF_OPEN)])

    def test_abandoned_trial_does_not_wedge(self) -> None:
        breaker = self.breaker(failure_threshold=1, reset_timeout=20)
        self.record_failures(breaker)
        self.clock.advance(20)
        lost = self.ticket(breaker)  # never reports
        self.assertFalse(breaker.allow())
        self.clock.advance(19)
        self.assertFalse(breaker.allow())
        self.clock.advance(1)
        self.assertTrue(breaker.allow())  # the slot is reclaimed after reset_timeout
        self.assertEqual(breaker.trials_in_flight, 0)
        fresh = self.ticket(breaker)
        self.assertFalse(breaker.allow())
        lost.record_success()  # late, but still from this half-open period: it counts
        self.assertEqual(breaker.state, HALF_OPEN)
        fresh.record_success()
        self.assertEqual(breaker.state, CLOSED)

    def test_release_frees_the_slot_without_outcome(self) -> None:
        breaker = self.breaker(failure_threshold=1, reset_timeout=1)
        self.record_failures(breaker)
        self.clock.advance(1)
        ticket = self.ticket(breaker)
        ticket.release()
        ticket.release()
        ticket.record_failure()  # already settled: ignored
        self.assertEqual(breaker.state, HALF_OPEN)
        self.assertTrue(breaker.allow())
        self.assertEqual((breaker.failures, breaker.successes), (1, 0))

    def test_one_report_per_ticket(self) -> None:
        breaker = self.breaker(failure_threshold=2)
        ticket = self.ticket(breaker)
        ticket.record_failure()
        ticket.record_failure()
        self.assertEqual((breaker.state, breaker.failures), (CLOSED, 1))

    def test_stale_tickets_do_not_move_the_state(self) -> None:
        breaker = self.breaker(failure_threshold=1, reset_timeout=10, success_threshold=1)
        slow = self.ticket(breaker)  # issued while closed
        self.record_failures(breaker)
        self.clock.advance(10)
        self.assertEqual(breaker.state, HALF_OPEN)
        slow.record_success()  # describes the backend before it opened
        self.assertEqual(breaker.state, HALF_OPEN)
        self.assertEqual(breaker.successes, 1)  # still counted
        self.ticket(breaker).record_success()
        self.assertEqual(breaker.state, CLOSED)
        old = self.ticket(breaker)
        breaker.reset()  # closed already: outstanding tickets stay current
        old.record_failure()
        self.assertEqual(breaker.state, OPEN)

    def test_disabled_never_opens(self) -> None:
        breaker = self.breaker(failure_threshold=1, enabled=False)
        self.record_failures(breaker, 10)
        self.assertEqual(breaker.state, CLOSED)
        self.assertTrue(breaker.allow())
        self.assertEqual(breaker.failures, 10)

    def test_update_settings_and_reset(self) -> None:
        breaker = self.breaker(failure_threshold=2)
        self.record_failures(breaker)
        breaker.update_settings(BreakerSettings(failure_threshold=3))
        self.record_failures(breaker)
        self.assertEqual(breaker.state, CLOSED)
        self.record_failures(breaker)
        self.assertEqual(breaker.state, OPEN)
        breaker.reset()
        self.assertEqual((breaker.state, breaker.consecutive_failures), (CLOSED, 0))
        self.record_failures(breaker, 3)
        breaker.update_settings(BreakerSettings(enabled=False))
        self.assertEqual(breaker.state, CLOSED)

    def test_status_json(self) -> None:
        breaker = self.breaker(failure_threshold=1, reset_timeout=60)
        self.assertEqual(breaker.status_json(), {
            "state": "closed", "consecutive_failures": 0, "failures": 0, "successes": 0,
            "opens": 0, "rejections": 0, "trials_in_flight": 0, "retry_in": None,
        })
        self.record_failures(breaker)
        breaker.acquire()
        self.clock.advance(15.25)
        self.assertEqual(breaker.status_json(), {
            "state": "open", "consecutive_failures": 1, "failures": 1, "successes": 0,
            "opens": 1, "rejections": 1, "trials_in_flight": 0, "retry_in": 44.75,
        })

    def test_listeners(self) -> None:
        breaker = self.breaker(failure_threshold=1)

        def broken(b: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
            raise RuntimeError("listener bug")

        breaker.add_listener(broken)
        breaker.add_listener(log_state_change)
        self.record_failures(breaker)
        self.assertEqual(breaker.state, OPEN)
        self.assertEqual(self.changes, [(CLOSED, OPEN)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_settings_validation(self) -> None:
        for bad in ({"failure_threshold": 0}, {"success_threshold": 0}, {"half_open_max": 0},
                    {"reset_timeout": 0}):
            self.assertRaises(ValueError, BreakerSettings, **bad)
