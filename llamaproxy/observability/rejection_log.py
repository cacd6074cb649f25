"""The gateway log's view of rejected requests: one summary line per reason per minute.

Every rejection (401, 403, 429, 400, 413, 431, ...) is in the access log and the metrics; the
gateway's own log only has to say that they happen. A line per rejection would let anyone on
the network fill the disk with bad keys, so ``RejectionLog`` writes the first rejection of a
reason at once, then at most one line per reason per ``window`` seconds with how many more
there were. A quiet reason costs nothing (its timer is not re-armed).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

#: Seconds between two summary lines of one reason.
WINDOW = 60.0


class RejectionLog:
    """Counts rejections by reason and logs them at a bounded rate (see the module docstring)."""

    def __init__(self, clock: IReactorTime, window: float = WINDOW) -> None:
        self.clock = clock
        self.window = window
        #: Rejections per reason not logged yet.
        self._pending: dict[str, int] = {}
        #: The summary timer of each reason inside its window.
        self._timers: dict[str, Any] = {}
        #: Lines written (for tests and the curious).
        self.lines = 0

    def rejected(self, status: int, reason: str) -> None:
        """One request refused with ``status`` for ``reason`` (the metrics' reason label)."""
        key = f"{status} {reason}"
        if key in self._timers:
            self._pending[key] = self._pending.get(key, 0) + 1
            return
        self.lines += 1
        log.info(
            "Rejected a request: {rejection} (further ones are summed up once a minute; "
            "each is in the access log)",
            rejection=key,
        )
        self._timers[key] = self.clock.callLater(self.window, self._summary, key)

    def _summary(self, key: str) -> None:
        count = self._pending.pop(key, 0)
        if not count:
            del self._timers[key]  # quiet for a whole window: the next one is logged at once
            return
        self.lines += 1
        log.info(
            "Rejected {count} more request(s) in the last {window:g} s: {rejection}",
            count=count, window=self.window, rejection=key,
        )
        self._timers[key] = self.clock.callLater(self.window, self._summary, key)

    def stop(self) -> None:
        """Cancel the timers (the counts not logged yet are dropped)."""
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        self._pending.clear()
