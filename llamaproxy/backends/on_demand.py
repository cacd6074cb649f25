"""One on-demand model's lifecycle: a local child started by a request and unloaded when idle.

``OnDemandModel`` drives the supervisor of a backend whose ``start = "on_demand"``::

    STOPPED --request (or the group's turn)--> LOADING --ready--> READY
    LOADING --the child ends or times out--> FAILED (child stopped; next try after a backoff)
    READY --idle_ttl, a swap or an operator--> STOPPING (drain, then stop) --> STOPPED

A request waiting for the backend (``Backend.wait_ready``) calls ``demand``: a stopped model is
started, through its ``SwapGroup`` when it has one (``llamaproxy.backends.swap_group``). While a
load fails, requests are answered ``ModelLoadFailedError`` at once until the backoff passes, so a
bad model file is not spawned in a tight loop. Unloading drains first: the backend takes no new
request (``Backend.draining``; new ones wait for the next start), its requests in flight and
queued finish, up to a grace, and the child is stopped. A request arriving meanwhile starts it
again once it has stopped.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from llamaproxy.backends.admission import Admission
from llamaproxy.backends.backend import Backend, BackendState, ModelLoadFailedError

if TYPE_CHECKING:
    from llamaproxy.backends.swap_group import SwapGroup

log = Logger()

#: How often a draining backend is checked for its last request, and an idle one for idleness.
CHECK_INTERVAL = 0.1


class ModelState(enum.Enum):
    """What ``/v1/models``, ``/health`` and the metrics say about an on-demand model."""

    STOPPED = "stopped"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


class Child(Protocol):
    """What is started and stopped: a ``LlamaServerSupervisor`` (a fake in tests)."""

    running: int

    def startService(self) -> None: ...

    def stopService(self) -> Deferred[None] | None: ...


class ModelEvents(Protocol):
    """Who hears of loads and unloads (the metrics)."""

    def load_started(self, backend: str, reason: str) -> None: ...

    def load_finished(self, backend: str, seconds: float, ok: bool) -> None: ...

    def unloaded(self, backend: str, reason: str) -> None: ...

    def swapped(self, group: str, stopped: str, started: str) -> None: ...


class OnDemandModel(Service):
    """The lifecycle of one on-demand backend (see the module docstring).

    As a service it owns its child: stopping it stops the child; starting it starts nothing
    (a request, ``preload`` or an operator does).
    """

    def __init__(
        self,
        backend: Backend,
        child: Child,
        load: Admission,
        clock: IReactorTime,
        idle_ttl: float = 0.0,
        group: SwapGroup | None = None,
        backoff_max: float = 60.0,
        jitter: Callable[[], float] = random.random,
        preload: bool = False,
    ) -> None:
        self.backend_name = backend.name
        self.backend = backend
        self.child = child
        self.load = load
        self.clock = clock
        #: Seconds without a request in flight or queued before an unload (0: never).
        self.idle_ttl = idle_ttl
        self.group = group
        #: Started when the service starts (its group's ``preload``).
        self.preload = preload
        self.events: list[ModelEvents] = []
        self._backoff = backoffPolicy(
            initialDelay=1.0, maxDelay=backoff_max, factor=2.0, jitter=jitter)
        self._failures = 0
        #: The last load's failure while its backoff runs (requests get it at once).
        self.failure: ModelLoadFailedError | None = None
        self._loading_since: float | None = None
        self._load_reason = ""
        self._stopping: Deferred[None] | None = None
        self._start_after_stop: str | None = None
        self._drain_call: IDelayedCall | None = None
        self._idle_call: IDelayedCall | None = None
        self._busy_at = clock.seconds()
        #: Clock time of the latest ready (None while not ready).
        self.ready_since: float | None = None
        backend.on_demand = self.demand
        backend.on_demand_status = self.status_json
        backend.listeners.append(self._backend_changed)
        if group is not None:
            group.add(self)

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> ModelState:
        """The model's state now."""
        if self._stopping is not None or self.backend.draining:
            return ModelState.STOPPING
        if not self.child.running:
            return ModelState.FAILED if self.failure is not None else ModelState.STOPPED
        if self.backend.state is BackendState.READY:
            return ModelState.READY
        return ModelState.LOADING

    @property
    def busy(self) -> bool:
        """True while requests hold or wait for its slots."""
        return bool(self.load.active or self.load.waiting)

    @property
    def occupies(self) -> bool:
        """True while its child runs (it counts against its group's ``max_running``)."""
        return bool(self.child.running) or self._stopping is not None

    def status_json(self) -> dict[str, object]:
        """The model's part of /health and of the admin list."""
        doc: dict[str, object] = {"state": self.state.value, "idle_ttl": self.idle_ttl}
        if self.group is not None:
            doc["group"] = self.group.name
        if self.failure is not None:
            doc["load_error"] = self.failure.reason
        return doc

    # -- requests ------------------------------------------------------------------------------

    def demand(self) -> None:
        """A request waits for this model: start it (or ask its group), unless it runs."""
        now = self.clock.seconds()
        self._busy_at = now
        failure = self.failure
        if (failure is not None and not self.child.running and failure.retry_at is not None
                and now < failure.retry_at):
            self.backend.fail_waiters(failure)
            return
        state = self.state
        if state in (ModelState.READY, ModelState.LOADING):
            return
        if self.group is not None:
            self.group.want(self)
        elif state is ModelState.STOPPING:
            self._start_after_stop = "request"
        else:
            self.start("request")

    def start(self, reason: str) -> bool:
        """Start the child now (``reason``: request, swap, preload, operator); False when it
        is stopping (it starts again once stopped) or runs already."""
        if self._stopping is not None or self.backend.draining:
            self._start_after_stop = reason
            return False
        if self.child.running:
            return False
        self.failure = None
        self._loading_since = self.clock.seconds()
        self._busy_at = self._loading_since
        self._load_reason = reason
        log.info("Starting on-demand model {backend} ({reason})", backend=self.backend_name,
                 reason=reason)
        for events in self.events:
            events.load_started(self.backend_name, reason)
        self.child.startService()
        self._arm_idle()
        return True

    def restart(self) -> bool:
        """Restart the running child at an operator's request (the operator page's button);
        False when it does not run (a request or ``load`` starts it)."""
        restart = getattr(self.child, "restart", None)
        if not self.child.running or self._stopping is not None or not callable(restart):
            return False
        return bool(restart())

    def unload(self, reason: str, grace: float) -> Deferred[None]:
        """Drain (no new request; those in flight and queued finish, up to ``grace`` seconds),
        then stop the child. Fires once it has stopped."""
        if self._stopping is not None:
            return _chained(self._stopping)
        if not self.child.running:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._stopping = done
        deadline = self.clock.seconds() + grace
        log.info("Unloading on-demand model {backend} ({reason})", backend=self.backend_name,
                 reason=reason)
        self.backend.set_draining(True)
        self._cancel_idle()

        def check() -> None:
            self._drain_call = None
            if self.busy and self.clock.seconds() < deadline:
                self._drain_call = self.clock.callLater(CHECK_INTERVAL, check)
                return
            maybeDeferred(self.child.stopService).addBoth(stopped)

        def stopped(result: object) -> None:
            self._stopping = None
            self.ready_since = None
            self.backend.set_draining(False)
            for events in self.events:
                events.unloaded(self.backend_name, reason)
            done.callback(None)
            self._after_stop()

        check()
        return _chained(done)

    def _after_stop(self) -> None:
        again, self._start_after_stop = self._start_after_stop, None
        if self.group is not None:
            if self.backend.waited_for:
                self.group.want(self)
            self.group.schedule()
        elif again is not None or self.backend.waited_for:
            self.start(again or "request")

    # -- the child's state ---------------------------------------------------------------------

    def _backend_changed(self, backend: Backend) -> None:
        state = backend.state
        if self._loading_since is None:
            return
        now = self.clock.seconds()
        if state is BackendState.READY:
            seconds = now - self._loading_since
            self._loading_since = None
            self._failures = 0
            self.ready_since = now
            log.info("On-demand model {backend} ready after {seconds:.1f} s",
                     backend=self.backend_name, seconds=seconds)
            for events in self.events:
                events.load_finished(self.backend_name, seconds, True)
            if self.group is not None:
                self.group.schedule()
        elif state is BackendState.BACKOFF:
            # The child ended (or was killed for READY_TIMEOUT) before it was ready.
            seconds = now - self._loading_since
            self._loading_since = None
            delay = self._backoff(self._failures)
            self._failures += 1
            reason = backend.last_exit or "the child ended while loading"
            self.failure = ModelLoadFailedError(self.backend_name, reason, now + delay)
            log.error("On-demand model {backend} failed to load: {reason}; next try in "
                      "{delay:.1f} s", backend=self.backend_name, reason=reason, delay=delay)
            for events in self.events:
                events.load_finished(self.backend_name, seconds, False)
            maybeDeferred(self.child.stopService).addBoth(lambda _: self._load_failed())

    def _load_failed(self) -> None:
        if self.failure is not None:
            self.backend.retry_at = self.failure.retry_at
            self.backend.fail_waiters(self.failure)
        if self.group is not None:
            self.group.forget(self)
            self.group.schedule()

    # -- idle ----------------------------------------------------------------------------------

    def touch(self) -> None:
        """Note activity now (idle_ttl counts from the last)."""
        self._busy_at = self.clock.seconds()

    def _arm_idle(self) -> None:
        if self.idle_ttl > 0 and self._idle_call is None:
            self._idle_call = self.clock.callLater(
                min(self.idle_ttl, max(CHECK_INTERVAL, self.idle_ttl / 10)), self._idle_check)

    def _cancel_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _idle_check(self) -> None:
        self._idle_call = None
        if not self.child.running or self._stopping is not None:
            return
        now = self.clock.seconds()
        if self.busy or self.backend.waited_for or self.state is not ModelState.READY:
            self._busy_at = now
        elif now - self._busy_at >= self.idle_ttl:
            grace = self.group.spec.swap_grace if self.group is not None else 0.0
            self.unload("idle", grace)
            return
        self._arm_idle()

    def set_idle_ttl(self, idle_ttl: float) -> None:
        """A reload changed ``idle_ttl``."""
        self.idle_ttl = idle_ttl
        self._cancel_idle()
        if self.child.running:
            self._arm_idle()

    # -- Service -------------------------------------------------------------------------------

    def startService(self) -> None:
        """Start the child only when preloaded; otherwise the first request does."""
        Service.startService(self)
        if self.preload and self.state is ModelState.STOPPED:
            self.start("preload")

    def stopService(self) -> Deferred[None]:
        """Stop the child (at once: the gateway has drained its requests already)."""
        Service.stopService(self)
        self._cancel_idle()
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        if self.group is not None:
            self.group.remove(self)
        self.backend.on_demand = None
        self.backend.on_demand_status = None
        if self._backend_changed in self.backend.listeners:
            self.backend.listeners.remove(self._backend_changed)
        if not self.child.running:
            return succeed(None)
        return maybeDeferred(self.child.stopService).addCallback(lambda _: None)


def _chained(d: Deferred[None]) -> Deferred[None]:
    """A Deferred that fires when ``d`` does, leaving ``d``'s own result alone."""
    out: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        out.callback(None)
        return result

    d.addBoth(fire)
    return out
