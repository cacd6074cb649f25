"""The root service: starts the parts in order and stops them in the order that loses nothing.

Start: backend (supervisor or external monitor) → gateway listeners → health site.
Stop (SIGTERM): readiness goes 503 → gateway listeners close → in-flight requests finish (up to
``drain_timeout``, then they are cut) → the backend child is stopped (TERM, then KILL) → pooled
backend connections close → health site closes. ``stopService`` returns a Deferred that fires only
when all of that is done, and twistd waits for it before exiting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger

from llamaproxy.fastpath.gc_schedule import GcSchedule
from llamaproxy.gateway.resource import GatewayResource
from llamaproxy.observability.logs import install_observer
from llamaproxy.stop_signals import StopSignals

log = Logger()


class ConnectionPool(Protocol):
    """What the service closes on stop: the backend client's idle connections (the fast
    path's ``BackendClient`` or Twisted's ``HTTPConnectionPool``)."""

    def closeCachedConnections(self) -> Deferred[None]:
        """Close every idle connection; fires when they are closed."""
        ...


class GatewayService(MultiService):
    """All of llamaproxy in one service tree, with ordered start and stop."""

    def __init__(
        self,
        clock: IReactorTime,
        backend_service: IService,
        gateway_listeners: Sequence[IService],
        health_listener: IService | None,
        resource: GatewayResource,
        pool: ConnectionPool | None,
        drain_timeout: float,
        background: Sequence[IService] = (),
        log_observer: ILogObserver | None = None,
        gc_schedule: GcSchedule | None = None,
        stop_signals: StopSignals | None = None,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.backend_service = backend_service
        self.gateway_listeners = list(gateway_listeners)
        self.health_listener = health_listener
        self.resource = resource
        self.pool = pool
        self.drain_timeout = drain_timeout
        #: Timers and watchers (e.g. the key file watcher): started after the backend, stopped last.
        self.background = list(background)
        self.log_observer = log_observer
        self._stopping: Deferred[None] | None = None
        #: The garbage collector's schedule (a fast path: None when it is off).
        self.gc_schedule = gc_schedule
        #: The handlers of SIGTERM/SIGINT (under twistd only), told when a drain cut requests.
        self.stop_signals = stop_signals
        for child in self._in_start_order():
            child.setServiceParent(self)

    def _in_start_order(self) -> list[IService]:
        parts = [self.backend_service, *self.background, *self.gateway_listeners]
        if self.stop_signals is not None:
            parts.insert(0, self.stop_signals)
        if self.health_listener is not None:
            parts.append(self.health_listener)
        return parts

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd, ``parent`` is the Application: give it our log observer (LOG_FORMAT)."""
        if self.log_observer is not None:
            install_observer(parent, self.log_observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        # MultiService starts children in the order they were added: exactly ours.
        super().startService()
        # Last: what start-up built is frozen out of the collector's sight
        # (llamaproxy/fastpath/gc_schedule.py: young collections on allocation, full ones on a
        # timer).
        if self.gc_schedule is not None:
            self.gc_schedule.startService()

    def stopService(self) -> Deferred[None]:
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop())
            self._stopping.addErrback(
                lambda f: log.failure("Error while stopping llamaproxy", f)
            )
        d: Deferred[None] = Deferred()
        self._stopping.addBoth(lambda _: d.callback(None))
        return d

    async def _stop(self) -> None:
        clean = True
        self.running = False
        self.resource.draining = True
        log.info("Stopping: closing the gateway listeners")
        for listener in self.gateway_listeners:
            await _maybe(listener.stopService())
        busy = len(self.resource.in_flight)
        if busy:
            log.info(
                "Draining {count} in-flight requests (up to {timeout}s)",
                count=busy, timeout=self.drain_timeout,
            )
            idle = self.resource.wait_idle()
            timer = self.clock.callLater(self.drain_timeout, idle.cancel)
            try:
                await idle
            except Exception:
                log.warn(
                    "Drain timeout: cutting {count} requests", count=len(self.resource.in_flight)
                )
                self.resource.abort_in_flight()
                clean = False
            else:
                timer.cancel()
        await _maybe(self.backend_service.stopService())
        if self.pool is not None:
            await self.pool.closeCachedConnections()
        if self.health_listener is not None:
            await _maybe(self.health_listener.stopService())
        for part in self.background:
            await _maybe(part.stopService())
        if self.gc_schedule is not None:
            self.gc_schedule.stopService()
        if not clean and self.stop_signals is not None:
            # A drain that lost nothing is a normal exit (status 0); one that cut requests
            # ends by the signal that stopped it (143 for SIGTERM).
            self.stop_signals.requests_were_cut()
        log.info("Stopped" if clean else "Stopped after cutting requests still in flight")


async def _maybe(result: object) -> None:
    if isinstance(result, Deferred):
        await result
