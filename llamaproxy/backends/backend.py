"""What the gateway knows about one backend: where it is, its key, and its current state.

A ``Backend`` is a small mutable record. Its owner (the supervisor of a local llama-server, or the
monitor of an external one) updates it; the gateway and the health documents only read it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, succeed


class BackendState(enum.Enum):
    """Life-cycle states of a backend, as /health reports them."""

    STARTING = "starting"  # process spawned (or external server not answering yet)
    LOADING = "loading"  # answering, but /health says 503 "Loading model"
    READY = "ready"
    BACKOFF = "backoff"  # crashed; waiting before the next start
    STOPPING = "stopping"
    STOPPED = "stopped"
    #: An external backend that does not answer (connection refused, reset, probe timed out):
    #: not expected back by itself, so requests fail fast instead of waiting for it.
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one GET /health against a backend."""

    at: float  # seconds since the epoch (clock.seconds())
    outcome: str  # "ready", "loading" or "down"
    detail: str = ""
    status_code: int | None = None

    def as_json(self) -> dict[str, object]:
        """The probe as /health shows it."""
        doc: dict[str, object] = {"at": round(self.at, 3), "outcome": self.outcome}
        if self.status_code is not None:
            doc["status_code"] = self.status_code
        if self.detail:
            doc["detail"] = self.detail
        return doc


#: READY as a module name: ``ready`` runs several times per request, and on Python 3.11 reading a
#: member off its Enum class goes through ``EnumType.__getattr__`` (about ten times the cost).
_READY = BackendState.READY

#: States a backend comes back from by itself: requests may wait for it instead of failing.
TRANSIENT_STATES = frozenset({BackendState.STARTING, BackendState.LOADING, BackendState.BACKOFF})


class ModelLoadFailedError(Exception):
    """An on-demand backend's child failed to load its model (503 ``model_load_failed``)."""

    def __init__(self, backend: str, reason: str, retry_at: float | None) -> None:
        super().__init__(f"{backend}: {reason}")
        self.backend = backend
        self.reason = reason
        #: When the next load may be tried (clock seconds), for Retry-After.
        self.retry_at = retry_at


@dataclass
class Backend:
    """A backend's address, credentials and live status."""

    name: str
    base_url: str
    api_key: str | None = None
    model: str = "default"
    slots: int | None = None  # the backend's --parallel, when known
    state: BackendState = BackendState.STOPPED
    restarts: int = 0
    last_exit: str | None = None
    #: When the current not-ready period is expected to end (clock seconds), for Retry-After.
    retry_at: float | None = None
    listeners: list[Callable[[Backend], None]] = field(default_factory=list, repr=False)
    #: Its owner's reaction to a request that could not reach it (``send_failed``): mark it
    #: down and probe it at once. None: nobody probes it (tests, a static record).
    on_send_failure: Callable[[str], None] | None = field(default=None, repr=False)
    #: On-demand backends (``llamaproxy.backends.on_demand``): called when a request waits for
    #: the backend while it is not ready, to start it (or queue its swap-in). None: always-on.
    on_demand: Callable[[], None] | None = field(default=None, repr=False)
    #: True while an on-demand backend is being unloaded: it takes no new request (they wait
    #: for its next start) though its child still runs its requests in flight.
    draining: bool = False
    #: On-demand backends: their lifecycle's part of /health (``OnDemandModel.status_json``).
    on_demand_status: Callable[[], dict[str, object]] | None = field(default=None, repr=False)
    _last_probe: ProbeResult | None = field(default=None, repr=False)
    _ready_waiters: list[Deferred[None]] = field(default_factory=list, repr=False)

    @property
    def last_probe(self) -> ProbeResult | None:
        """The outcome of the latest health probe (None before the first)."""
        return self._last_probe

    @last_probe.setter
    def last_probe(self, result: ProbeResult | None) -> None:
        self._last_probe = result
        self._wake_waiters()

    @property
    def ready(self) -> bool:
        """True when requests can be sent: READY and the last probe did not fail."""
        return self.state is _READY and not self.draining and (
            self._last_probe is None or self._last_probe.outcome == "ready"
        )

    @property
    def serving(self) -> bool:
        """``ready``, draining or not: the child still answers the requests it was given."""
        return self.state is _READY and (
            self._last_probe is None or self._last_probe.outcome == "ready"
        )

    @property
    def recovering(self) -> bool:
        """True when the backend is expected to become ready by itself (worth waiting for)."""
        if self.on_demand is not None:
            return True  # a request for it starts it
        return self.state in TRANSIENT_STATES or (
            self.state is BackendState.READY and not self.ready
        )

    @property
    def condition(self) -> str:
        """The state in a word that agrees with ``ready``: "unresponsive" for a READY backend
        whose last health probe failed (e.g. a stopped process), else the state's value."""
        if self.draining:
            return "stopping"
        if self.state is BackendState.READY and not self.ready:
            return "unresponsive"
        return self.state.value

    def set_state(self, state: BackendState, retry_at: float | None = None) -> None:
        """Move to a new state and tell whoever listens."""
        changed = state is not self.state
        self.state = state
        self.retry_at = retry_at
        if changed:
            for listener in list(self.listeners):
                listener(self)
        self._wake_waiters()

    def set_draining(self, draining: bool) -> None:
        """Start or end an on-demand backend's unload (see ``draining``)."""
        if draining is not self.draining:
            self.draining = draining
            for listener in list(self.listeners):
                listener(self)
            self._wake_waiters()

    @property
    def waited_for(self) -> bool:
        """True while a request waits for the backend to be ready."""
        return bool(self._ready_waiters)

    def send_failed(self, detail: str) -> None:
        """A request could not reach the backend (``detail``: "connection refused", ...).

        Its owner marks it down at once and probes it now, so the next requests, /health and
        /readyz agree with what this request saw, wherever the probe cycle was.
        """
        if self.on_send_failure is not None:
            self.on_send_failure(detail)

    def wait_ready(self) -> Deferred[None]:
        """A Deferred that fires when the backend is ready (cancel it to stop waiting).

        An on-demand backend is asked to start (``on_demand``); if its model fails to load the
        Deferred fails with ``ModelLoadFailedError``.
        """
        if self.ready:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._ready_waiters.remove)
        self._ready_waiters.append(waiter)
        if self.on_demand is not None:
            self.on_demand()
        return waiter

    def fail_waiters(self, error: Exception) -> None:
        """Fail every ``wait_ready`` Deferred with ``error`` (an on-demand load failed)."""
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.errback(error)

    def _wake_waiters(self) -> None:
        if not self.ready or not self._ready_waiters:
            return
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def retry_after(self, now: float, default: int = 5) -> int:
        """Whole seconds a client should wait before retrying (>= 1)."""
        if self.retry_at is not None and self.retry_at > now:
            return max(1, int(self.retry_at - now + 0.999))
        return default

    @property
    def model_state(self) -> str:
        """Its model's state for /v1/models: ``stopped``, ``loading``, ``ready``, ``failed`` or
        ``stopping`` (an on-demand backend's lifecycle; an always-on one is ready, loading while
        it starts or recovers, else stopped)."""
        if self.on_demand_status is not None:
            return str(self.on_demand_status()["state"])
        if self.ready:
            return "ready"
        return "loading" if self.recovering else "stopped"

    def status_json(self) -> dict[str, object]:
        """The backend section of /health."""
        doc: dict[str, object] = {
            "name": self.name,
            "state": self.state.value,
            "restarts": self.restarts,
            "last_probe": self.last_probe.as_json() if self.last_probe else None,
            "last_exit": self.last_exit,
        }
        if self.on_demand_status is not None:
            doc["on_demand"] = self.on_demand_status()
        return doc
