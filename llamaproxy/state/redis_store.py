"""The connection to the Redis that replicas share, its health, and how its scripts are run.

Uses txredisapi (Twisted-native, maintained): its ``RedisFactory`` keeps one connection up and
reconnects with backoff (a Twisted ``ClientService`` underneath). We give it our own endpoint,
built on the injected reactor: plain TCP for ``redis://``, TLS with the server's certificate and
host name verified (``optionsForClientTLS``, service-identity) for ``rediss://``.

A call made while the connection is down fails at once with :class:`StateUnavailableError` (the
client library would otherwise wait for the next connection), and every call has a deadline of
``timeout`` seconds: the gateway never waits long on its state store. What to do with a failure
(serve with local state, or refuse) is the caller's choice; see ``STATE_FAILURE``.

Scripts go through ``EVALSHA`` (``EVAL`` once when Redis does not know them yet, after a restart
for instance): one round trip per call.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaproxy.fastpath.eager_write import Cork, send_eagerly
from llamaproxy.state.url import StateURL

log = Logger()

#: Seconds a call to Redis may take before it counts as failed.
DEFAULT_TIMEOUT = 1.0

#: Seconds between PINGs (status and latency stay current when no request asks Redis).
PING_INTERVAL = 5.0


class StateUnavailableError(Exception):
    """Redis could not be asked (not connected, timed out, or it answered an error)."""


class RedisState(Service):
    """One replica's connection to the shared Redis (a Service: connects on start, closes on stop).

    ``status`` is ``connecting``, ``up`` or ``down``; ``latency`` the last round trip in seconds.
    """

    name = "redis-state"

    def __init__(
        self,
        url: StateURL,
        reactor: Any,
        failure_mode: str = "open",
        timeout: float = DEFAULT_TIMEOUT,
        connect: Any = None,
        cork: Cork | None = None,
    ) -> None:
        self.url = url
        #: The eager writes' shared state when that fast path runs (None: stock writes).
        self.cork = cork
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.failure_mode = failure_mode
        self.timeout = timeout
        #: Builds the client-side endpoint (tests may give their own).
        self._connect = connect
        self._factory: Any = None
        self.status = "connecting"
        self.latency: float | None = None
        self.calls = 0
        self.failures = 0
        self.last_error: str | None = None
        self.down_since: float | None = None
        self._pinger: LoopingCall | None = None
        self._eager: weakref.WeakSet[Any] = weakref.WeakSet()

    # -- the connection --------------------------------------------------------------------

    def endpoint(self) -> Any:
        """The client endpoint for the URL: TCP, or TLS verified against the host name."""
        reactor: IReactorTCP = self.reactor
        tcp = HostnameEndpoint(reactor, self.url.host, self.url.port, timeout=self.timeout * 5)
        if not self.url.tls:
            return tcp
        return wrapClientTLS(optionsForClientTLS(self.url.host), tcp)

    def startService(self) -> None:
        super().startService()
        import txredisapi  # type: ignore[import-untyped]  # only a gateway with STATE_URL loads it

        factory = txredisapi.RedisFactory(
            self.url.display(), self.url.db, 1, isLazy=True, password=self.url.password,
            username=self.url.username, replyTimeout=self.timeout, convertNumbers=True,
        )
        factory.maxDelay = 2  # come back quickly when Redis does
        self._factory = factory
        factory.deferred.addErrback(self._cannot_connect)
        factory.startConnecting(self._connect() if self._connect else self.endpoint())
        log.info("Shared state: connecting to {url}", url=self.url.display())
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = self.clock
        self._pinger.start(PING_INTERVAL, now=False).addErrback(
            lambda f: log.failure("Shared state: ping loop stopped", f)
        )

    def _cannot_connect(self, failure: Failure) -> None:
        """txredisapi gave up on a connection (e.g. authentication refused): say so."""
        self.status = "down"
        self.last_error = failure.getErrorMessage()
        log.error("Shared state: cannot use Redis at {url}: {error}", url=self.url.display(),
                  error=self.last_error)

    def _ping(self) -> None:
        self.command("ping").addErrback(lambda f: None)  # _failed has counted and logged it

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        factory, self._factory = self._factory, None
        if factory is None:
            return succeed(None)
        d: Deferred[None] = factory.disconnect()
        d.addErrback(lambda f: None)
        return d

    @property
    def connected(self) -> bool:
        """True while a connection to Redis is open."""
        return self._factory is not None and self._factory.size > 0

    # -- calls -------------------------------------------------------------------------------

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        """Run ``script`` (EVALSHA, EVAL when unknown); fails with StateUnavailableError."""
        return self._call("eval", script, keys, args)

    def command(self, name: str, *args: Any) -> Deferred[Any]:
        """Run one txredisapi command by method name (e.g. ``hgetall``)."""
        return self._call(name, *args)

    def _call(self, method: str, *args: Any) -> Deferred[Any]:
        self.calls += 1
        factory = self._factory
        if factory is None or factory.size == 0:
            return self._failed(Failure(StateUnavailableError("not connected to Redis")))
        started = self.clock.seconds()
        # The connection itself (txredisapi pipelines commands on it), not the pool handler:
        # the handler's per-call connection lookup costs more than the command. Its reply
        # timeout (``replyTimeout``) fails the call and drops the connection, which reconnects.
        connection = factory.pool[0]
        if self.cork is not None and connection not in self._eager:
            # Commands made while a client's request is read leave with that read's writes, in
            # one send, instead of a write registration and a loop turn each (a fast path).
            send_eagerly(connection.transport, self.cork)
            self._eager.add(connection)
        d: Deferred[Any] = getattr(connection, method)(*args)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(started,))
        return d

    def _answered(self, result: Any, started: float) -> Any:
        self.latency = self.clock.seconds() - started
        if self.status != "up":
            if self.status == "down":
                log.info("Shared state: Redis at {url} answers again", url=self.url.display())
            self.status = "up"
            self.down_since = None
        return result

    def _failed(self, failure: Failure) -> Deferred[Any]:
        self.failures += 1
        self.last_error = failure.getErrorMessage() or repr(failure.value)
        if self.status != "down":
            self.status = "down"
            self.down_since = self.clock.seconds()
            log.warn(
                "Shared state: Redis at {url} does not answer ({error}); failure mode {mode}",
                url=self.url.display(), error=self.last_error, mode=self.failure_mode,
            )
        d: Deferred[Any] = Deferred()
        d.errback(Failure(StateUnavailableError(self.last_error)))
        return d

    # -- reporting ---------------------------------------------------------------------------

    @property
    def health(self) -> str:
        """``up``, ``down`` or ``connecting`` (never connected nor failed yet)."""
        if not self.connected:
            return "connecting" if self.status == "connecting" else "down"
        return "down" if self.status == "down" else "up"

    def status_json(self) -> dict[str, Any]:
        """The ``state_store`` section of /health."""
        return {
            "backend": "redis",
            "url": self.url.display(),
            "status": self.health,
            "failure_mode": self.failure_mode,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 2),
            "calls": self.calls,
            "failures": self.failures,
            "last_error": self.last_error,
        }
