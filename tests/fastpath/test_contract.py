"""Tests for llamaproxy.fastpath: the startup contract check and the one switch (issue 17)."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor, tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy import fastpath
from llamaproxy.fastpath import contract


def _other_do_poll(self: Any, timeout: float | None) -> None:
    """A doPoll as a future Twisted might have it (any change to the source counts)."""
    return None


class ContractTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not isinstance(reactor, EPollReactor):
            self.skipTest("the fast paths are for the epoll reactor (the default on Linux)")

    def test_the_installed_twisted(self) -> None:
        """The release the fast paths were written against passes; another one in the range
        (CI runs the lowest too) fails only on the functions whose source differs."""
        import twisted

        failures = contract.check(reactor)
        if twisted.__version__ == contract.FINGERPRINTED_WITH:
            self.assertEqual(failures, [])
        else:
            self.assertTrue(failures)
            self.assertTrue(all(" changed (source " in f for f in failures), failures)

    def test_a_version_outside_the_tested_range(self) -> None:
        outside = contract.check(reactor, twisted_version="27.1.0")
        self.assertIn("Twisted 27.1.0 is outside the tested range >=26.10,<26.11", outside[0])
        inside = contract.check(reactor, twisted_version="26.10.1")
        self.assertFalse(any("outside the tested range" in f for f in inside))
        self.assertTrue(contract.check(reactor, twisted_version="26.4.0"))
        self.assertTrue(contract.check(reactor, twisted_version="26.3.0"))
        self.assertTrue(contract.check(reactor, twisted_version="not a version"))

    def test_a_changed_function_is_caught(self) -> None:
        """A future Twisted whose doPoll is not the one the lean loop copies."""
        self.patch(EPollReactor, "doPoll", _other_do_poll)
        failures = contract.check(reactor)
        self.assertTrue(any("EPollReactor.doPoll changed" in f for f in failures), failures)

    def test_a_renamed_attribute_is_caught(self) -> None:
        """A future Twisted that renamed a private attribute the eager writes read."""
        owner = next(c for c in tcp.Connection.__mro__ if "_writeDisconnecting" in vars(c))
        original = vars(owner)["_writeDisconnecting"]
        delattr(owner, "_writeDisconnecting")
        try:
            failures = contract.check(reactor)
        finally:
            owner._writeDisconnecting = original
        self.assertIn("twisted.internet.tcp:Connection._writeDisconnecting is gone", failures)

    def test_not_the_epoll_reactor(self) -> None:
        self.assertIn("the reactor is Clock, not the epoll reactor", contract.check(Clock()))


class SwitchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def warnings(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_level") == LogLevel.warn
                and "Fast paths off" in e.get("log_format", "")]

    def test_off(self) -> None:
        chosen = fastpath.select("off", reactor)
        self.assertEqual((chosen.mode, chosen.active), ("off", ()))
        self.assertEqual(chosen.document(), {"mode": "off", "active": []})
        self.assertEqual(self.warnings(), [])

    def test_auto_falls_back_with_one_warning(self) -> None:
        chosen = fastpath.select("auto", Clock())
        self.assertEqual(chosen.active, ())
        self.assertIn("the reactor is Clock, not the epoll reactor", chosen.failed_checks)
        self.assertEqual(len(self.warnings()), 1)
        self.assertNotIn("lean_poll", chosen)
        self.assertIn("failed_checks", chosen.document())

    def test_auto_on_the_real_reactor(self) -> None:
        if not isinstance(reactor, EPollReactor):
            self.skipTest("the fast paths are for the epoll reactor")
        chosen = fastpath.select("auto", reactor)
        if contract.check(reactor):  # a release the fast paths were not checked against
            self.assertEqual((chosen.active, len(self.warnings())), ((), 1))
        else:
            self.assertEqual((chosen.active, self.warnings()), (fastpath.ALL, []))
