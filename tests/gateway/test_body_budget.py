"""Tests for llamaproxy.gateway.body_budget: bytes held in all and per key."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.gateway.body_budget import BodyBudget


class BodyBudgetTests(SynchronousTestCase):
    def test_per_key_and_total(self) -> None:
        budget = BodyBudget(max_total=100, max_per_key=60)
        self.assertTrue(budget.reserve("a", 60))
        self.assertFalse(budget.reserve("a", 1))  # a's share is full
        self.assertTrue(budget.reserve("b", 40))
        self.assertFalse(budget.reserve("c", 1))  # the total is full
        self.assertTrue(budget.full_in_total(1))
        budget.release("a", 60)
        self.assertEqual((budget.held, budget.per_key), (40, {"b": 40}))
        self.assertTrue(budget.reserve("c", 60))

    def test_no_key_and_no_bounds(self) -> None:
        budget = BodyBudget(max_total=10, max_per_key=1)
        self.assertTrue(budget.reserve(None, 10))  # without keys only the total applies
        self.assertFalse(budget.reserve(None, 1))
        budget.release(None, 10)
        self.assertEqual((budget.held, budget.per_key), (0, {}))
        unbounded = BodyBudget(0, 0)
        self.assertTrue(unbounded.reserve("a", 10**12))
        self.assertTrue(unbounded.reserve("a", 0))
