"""Running blocking work (file reads, parsing) off the reactor thread, injectably.

``OffThread`` is a callable ``run(f, *args) -> Deferred``: on a reactor's thread pool in the
gateway (``OffThread.pool(reactor)``), or at once on the calling thread in tests and command-line
tools (``OffThread.inline()``), where there is no reactor to keep responsive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

_T = TypeVar("_T")


class OffThread:
    """Runs a blocking function and gives its result as a Deferred."""

    def __init__(self, reactor: Any = None) -> None:
        self._reactor = reactor

    @classmethod
    def pool(cls, reactor: Any) -> OffThread:
        """On ``reactor``'s thread pool (``IReactorThreads.getThreadPool``)."""
        return cls(reactor)

    @classmethod
    def inline(cls) -> OffThread:
        """On the calling thread, at once (no reactor)."""
        return cls(None)

    def __call__(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        if self._reactor is None:
            try:
                return succeed(f(*args))
            except BaseException:
                return fail(Failure())
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)
