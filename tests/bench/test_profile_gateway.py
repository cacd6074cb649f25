"""Tests for :mod:`bench.profile_gateway`'s reading of py-spy's collapsed stacks: which samples of
the reactor thread are it waiting in ``epoll`` (idle) and which are work, with the stock loop and
with the lean loop of ``FAST_PATHS``. No process is started."""

from __future__ import annotations

import inspect

from twisted.internet import epollreactor
from twisted.trial.unittest import SynchronousTestCase

from bench import profile_gateway
from llamaproxy.fastpath import lean_poll

_STACK = ("thread (1): MainThread;<module> (twistd:1);ReactorBase.mainLoop "
          "(twisted/internet/base.py:690)")


def _line_of(function: object, code: str) -> int:
    """The line of ``function``'s file where its source says ``code``."""
    lines, first = inspect.getsourcelines(function)  # type: ignore[arg-type]
    for offset, text in enumerate(lines):
        if code in text:
            return first + offset
    raise AssertionError(f"{code!r} not found")


class IdleSamplesTests(SynchronousTestCase):
    """The reactor's loop waiting in ``epoll`` is idle; the same loop dispatching is busy."""

    def _profile(self, leaf: str, count: int = 10) -> profile_gateway.Profile:
        return profile_gateway.analyse(f"{_STACK};{leaf} {count}\n")

    def test_the_lean_loop_waiting_in_epoll_is_idle(self) -> None:
        line = _line_of(lean_poll.install, "_poller.poll(")
        profile = self._profile(
            f"install.<locals>.do_poll (/srv/llamaproxy/fastpath/lean_poll.py:{line})")
        self.assertEqual((profile.samples, profile.busy), (10, 0))

    def test_the_lean_loop_dispatching_events_is_busy(self) -> None:
        line = _line_of(lean_poll.install, "for fd, event in ready")
        profile = self._profile(
            f"install.<locals>.do_poll (/srv/llamaproxy/fastpath/lean_poll.py:{line})")
        self.assertEqual((profile.samples, profile.busy), (10, 10))
        self.assertEqual(profile.own[("install.<locals>.do_poll",
                                      "llamaproxy/fastpath/lean_poll.py")], 10)

    def test_the_stock_loop_waiting_in_epoll_is_idle_and_dispatching_is_busy(self) -> None:
        path = "/venv/lib/python3.11/site-packages/twisted/internet/epollreactor.py"
        line = _line_of(epollreactor.EPollReactor.doPoll, "_poller.poll(")
        waiting = self._profile(f"EPollReactor.doPoll ({path}:{line})")
        self.assertEqual(waiting.busy, 0)
        line = _line_of(epollreactor.EPollReactor.doPoll, "for fd, event in")
        dispatching = self._profile(f"EPollReactor.doPoll ({path}:{line})")
        self.assertEqual(dispatching.busy, 10)

    def test_work_below_the_loop_is_busy_and_pool_threads_waiting_are_idle(self) -> None:
        raw = (f"{_STACK};EagerSender.send_now (/srv/llamaproxy/fastpath/eager_write.py:140) 7\n"
               "thread (2): PoolThread-usage-ledger-0;Thread.run (threading.py:975);"
               "Condition.wait (threading.py:320) 5\n")
        profile = profile_gateway.analyse(raw)
        self.assertEqual((profile.samples, profile.busy), (7, 7))
        self.assertEqual(profile.threads["PoolThread-usage-ledger-0"], [5, 0])
