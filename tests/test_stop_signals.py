"""The gateway's own SIGTERM/SIGINT handlers (``llamaproxy.stop_signals``)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.stop_signals import StopSignals


class FakeReactor:
    def __init__(self) -> None:
        self.when_running: list[Callable[[], None]] = []
        self.from_thread: list[Callable[[], None]] = []
        self.stopped = 0

    def callWhenRunning(self, f: Callable[[], None]) -> None:
        self.when_running.append(f)

    def callFromThread(self, f: Callable[[], None]) -> None:
        self.from_thread.append(f)

    def stop(self) -> None:
        self.stopped += 1


class StopSignalsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.installed: dict[int, Any] = {}
        self.at_exit: list[Callable[[], None]] = []
        self.killed: list[tuple[int, int]] = []
        self.signals = StopSignals(
            self.reactor, install=self.installed.__setitem__, at_exit=self.at_exit.append,
            kill=lambda pid, number: self.killed.append((pid, number)))

    def _start(self) -> None:
        self.signals.startService()
        self.assertEqual(self.installed, {})  # not before the reactor runs (its own go first)
        for f in self.reactor.when_running:
            f()

    def test_handlers_replace_the_reactors_once_it_runs(self) -> None:
        self._start()
        self.assertEqual(sorted(self.installed), sorted([signal.SIGTERM, signal.SIGINT]))

    def test_a_signal_stops_the_reactor_once(self) -> None:
        self._start()
        self.installed[signal.SIGTERM](signal.SIGTERM, None)
        self.installed[signal.SIGINT](signal.SIGINT, None)  # a second one changes nothing
        self.assertEqual(len(self.reactor.from_thread), 1)
        self.reactor.from_thread[0]()
        self.assertEqual(self.reactor.stopped, 1)
        self.assertEqual(self.signals.received, signal.SIGTERM)

    def test_a_clean_stop_exits_normally(self) -> None:
        self._start()
        self.installed[signal.SIGTERM](signal.SIGTERM, None)
        self.assertEqual(self.at_exit, [])  # nothing happens at exit: status 0

    def test_a_drain_that_cut_requests_ends_by_the_signal(self) -> None:
        self._start()
        self.installed[signal.SIGTERM](signal.SIGTERM, None)
        self.signals.requests_were_cut()
        [end] = self.at_exit
        self.assertEqual(self.killed, [])  # only at exit, after twistd's clean-up
        end()
        self.assertEqual(self.installed[signal.SIGTERM], signal.SIG_DFL)
        self.assertEqual([number for _, number in self.killed], [signal.SIGTERM])

    def test_cut_without_a_signal_changes_nothing(self) -> None:
        self._start()
        self.signals.requests_were_cut()  # stopped some other way (e.g. an embedding program)
        self.assertEqual(self.at_exit, [])
