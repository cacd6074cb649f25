"""Circuit breakers: one per backend, so a failing backend is skipped instead of retried forever.

closed ── ``failure_threshold`` consecutive failures ──▶ open ── ``reset_timeout`` ──▶ half-open
half-open: at most ``half_open_max`` trial requests at once; ``success_threshold`` successes ──▶
closed, any failure ──▶ open again.

A request takes a ``Ticket`` (``acquire()``) and reports through it exactly once
(``record_success``, ``record_failure``, or ``release`` when there is nothing to report, e.g. the
client left). A trial ticket that never reports cannot wedge a half-open breaker: its slot is
reclaimed after ``reset_timeout``. Outcomes reported by tickets issued before the latest state
change update the counters but not the state (they describe the backend as it was).

Time comes from an injected clock (``clock.seconds()``); the open → half-open move is made lazily,
the next time the breaker is looked at, so the breaker owns no timer.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.logger import Logger

log = Logger()


class SecondsClock(Protocol):
    """The part of ``IReactorTime`` a breaker uses (a reactor or a ``task.Clock``)."""

    def seconds(self) -> float:
        """The current time in seconds."""
        ...


class BreakerState(enum.Enum):
    """The three states of a circuit breaker, as /health shows them."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerSettings:
    """Thresholds of one breaker (the ``[breaker]`` table, overridable per backend)."""

    failure_threshold: int = 5
    reset_timeout: float = 60.0
    success_threshold: int = 2
    half_open_max: int = 1
    #: False: the breaker never opens (single-backend mode keeps today's behaviour).
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.success_threshold < 1 or self.half_open_max < 1:
            raise ValueError("breaker thresholds must be at least 1")
        if not self.reset_timeout > 0:
            raise ValueError("breaker reset_timeout must be > 0")


# The states as module names for the per-request checks below: ``BreakerState.CLOSED`` is
# looked up through ``EnumType``'s ``__getattr__`` hook, ten times slower on Python 3.11.
_CLOSED, _HALF_OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN

#: (breaker, old state, new state)
BreakerListener = Callable[["CircuitBreaker", BreakerState, BreakerState], None]


def log_state_change(breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
    """A ready-made listener: log each state change (warn when the breaker opens)."""
    emit = log.warn if new is BreakerState.OPEN else log.info
    emit(
        "Circuit breaker of backend {backend}: {old} -> {new} ({failures} consecutive failures)",
        backend=breaker.name, old=old.value, new=new.value,
        failures=breaker.consecutive_failures,
    )


class Ticket:
    """Permission for one request to use a backend; report its outcome exactly once."""

    __slots__ = ("breaker", "done", "epoch", "trial")

    def __init__(self, breaker: CircuitBreaker, epoch: int, trial: bool) -> None:
        self.breaker = breaker
        self.epoch = epoch
        #: True when issued while half-open (it holds one of the ``half_open_max`` slots).
        self.trial = trial
        self.done = False

    def record_success(self) -> None:
        """The backend answered well (any non-5xx, non-429 response)."""
        if not self.done:
            self.done = True
            self.breaker._reported(self, True)

    def record_failure(self, reason: str = "other") -> None:
        """The backend failed (connection error, timeout, 5xx or 429), counted by ``reason``."""
        if not self.done:
            self.done = True
            self.breaker.failure_reasons[reason] = self.breaker.failure_reasons.get(reason, 0) + 1
            self.breaker._reported(self, False)

    def release(self) -> None:
        """Nothing to report (the client left, the request was not sent): free the slot."""
        if not self.done:
            self.done = True
            self.breaker._released(self)


class CircuitBreaker:
    """The breaker of one backend: ``allow()`` to peek, ``acquire()`` to take a ``Ticket``."""

    def __init__(
        self, name: str, clock: SecondsClock, settings: BreakerSettings | None = None
    ) -> None:
        self.name = name
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._epoch = 0
        self._opened_at: float | None = None
        self._trials: dict[Ticket, float] = {}  # trial ticket -> issued at
        self._half_open_successes = 0
        #: Failures in a row while closed.
        self.consecutive_failures = 0
        #: Totals since the breaker was made.
        self.failures = 0
        #: ``failures`` by reason (refused, reset, timeout, 5xx, ...): they add up to it.
        self.failure_reasons: dict[str, int] = {}
        self.successes = 0
        self.opens = 0
        self.rejections = 0
        self.listeners: list[BreakerListener] = []

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker whose ``reset_timeout`` passed is half-open)."""
        if (
            self._state is BreakerState.OPEN
            and self._opened_at is not None
            and self._clock.seconds() >= self._opened_at + self.settings.reset_timeout
        ):
            self._move(BreakerState.HALF_OPEN)
        return self._state

    @property
    def retry_at(self) -> float | None:
        """When an open breaker turns half-open (clock seconds); None unless open."""
        if self.state is not BreakerState.OPEN or self._opened_at is None:
            return None
        return self._opened_at + self.settings.reset_timeout

    @property
    def retry_in(self) -> float | None:
        """Seconds until an open breaker turns half-open; None unless open."""
        retry_at = self.retry_at
        return None if retry_at is None else max(0.0, retry_at - self._clock.seconds())

    @property
    def trials_in_flight(self) -> int:
        """Half-open trial requests holding a slot now."""
        self._expire_trials()
        return len(self._trials)

    def allow(self) -> bool:
        """Would ``acquire()`` give a ticket now? (No side effect besides open → half-open.)"""
        if self._state is _CLOSED:
            return True  # (``state`` changes only an open breaker)
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        return self.trials_in_flight < self.settings.half_open_max

    def acquire(self) -> Ticket | None:
        """A ticket for one request, or None (counted as a rejection) when the breaker refuses."""
        if not self.allow():
            self.rejections += 1
            return None
        trial = self._state is _HALF_OPEN
        ticket = Ticket(self, self._epoch, trial)
        if trial:
            self._trials[ticket] = self._clock.seconds()
        return ticket

    def reset(self) -> None:
        """Close the breaker by hand and forget the current run of failures."""
        self.consecutive_failures = 0
        if self._state is not BreakerState.CLOSED:
            self._move(BreakerState.CLOSED)

    def update_settings(self, settings: BreakerSettings) -> None:
        """Apply new thresholds (configuration reload) keeping the current state."""
        self.settings = settings
        if not settings.enabled and self._state is not BreakerState.CLOSED:
            self.reset()

    def add_listener(self, listener: BreakerListener) -> None:
        """Call ``listener(breaker, old, new)`` on every state change (logs, metrics)."""
        self.listeners.append(listener)

    def status_json(self) -> dict[str, object]:
        """The breaker section of a backend in /health."""
        retry_in = self.retry_in
        return {
            "state": self.state.value,
            "consecutive_failures": self.consecutive_failures,
            "failures": self.failures,
            "successes": self.successes,
            "opens": self.opens,
            "rejections": self.rejections,
            "trials_in_flight": self.trials_in_flight,
            "retry_in": None if retry_in is None else round(retry_in, 3),
        }

    # -- internals ---------------------------------------------------------------------------

    def _expire_trials(self) -> None:
        """Reclaim the slots of trial tickets that never reported (held ``reset_timeout``)."""
        if not self._trials:
            return
        oldest_allowed = self._clock.seconds() - self.settings.reset_timeout
        for ticket, issued_at in list(self._trials.items()):
            if issued_at <= oldest_allowed:
                del self._trials[ticket]

    def _released(self, ticket: Ticket) -> None:
        if ticket.trial:
            self._trials.pop(ticket, None)

    def _reported(self, ticket: Ticket, success: bool) -> None:
        if ticket.trial:
            self._trials.pop(ticket, None)
        if success:
            self.successes += 1
        else:
            self.failures += 1
        if not self.settings.enabled or ticket.epoch != self._epoch:
            return
        if self._state is _CLOSED:
            if success:
                self.consecutive_failures = 0
            else:
                self.consecutive_failures += 1
                if self.consecutive_failures >= self.settings.failure_threshold:
                    self._open()
        elif self._state is BreakerState.HALF_OPEN:
            if not success:
                self._open()
            else:
                self._half_open_successes += 1
                if self._half_open_successes >= self.settings.success_threshold:
                    self.consecutive_failures = 0
                    self._move(BreakerState.CLOSED)

    def _open(self) -> None:
        self.opens += 1
        self._opened_at = self._clock.seconds()
        self._move(BreakerState.OPEN)

    def _move(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._epoch += 1
        self._trials.clear()
        self._half_open_successes = 0
        if new is not BreakerState.OPEN:
            self._opened_at = None
        if old is new:
            return
        for listener in list(self.listeners):
            try:
                listener(self, old, new)
            except Exception:
                log.failure("Circuit breaker listener failed for {backend}", backend=self.name)
