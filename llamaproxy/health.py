"""Health: the /health and /readyz documents, and the Klein health site for platform probes.

The health site (PORT_HEALTH) answers 200 to any GET without touching a backend, so a platform's
liveness check never wakes or loads a model. ``/readyz`` on either site is the readiness signal:
200 only when a backend is ready and the gateway is not draining.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from llamaproxy import __version__
from llamaproxy.admission import Admission
from llamaproxy.backend import Backend


class HealthState:
    """Everything /health and /readyz report, read live from the running parts."""

    def __init__(
        self,
        backend: Backend,
        admission: Admission,
        clock: IReactorTime,
        auth_enabled: bool,
        draining: Callable[[], bool],
    ) -> None:
        self.backend = backend
        self.admission = admission
        self.clock = clock
        self.auth_enabled = auth_enabled
        self.draining = draining
        self.started_at = clock.seconds()
        #: The live Router, when there are several backends (their states and breakers).
        self.router: Callable[[], Any] | None = None
        #: The shared state store's status (STATE_URL), when there is one.
        self.state_store: Callable[[], dict[str, Any]] | None = None
        #: False while requests cannot be served for want of the shared state store
        #: (STATE_FAILURE=closed and Redis away): readiness says so, so balancers go elsewhere.
        self.state_store_ready: Callable[[], bool] | None = None

    def ready(self) -> bool:
        """True when requests can be served: backend ready and not draining."""
        if self.state_store_ready is not None and not self.state_store_ready():
            return False
        return self.backend.ready and not self.draining()

    def document(self) -> dict[str, object]:
        """The /health JSON: no key ids, no key counts."""
        if self.draining():
            status = "draining"
        elif self.backend.ready:
            status = "ok"
        else:
            status = "unavailable"
        return {
            "status": status,
            "backend": self.backend.status_json(),
            "model": self.backend.model,
            "queue": self.admission.status_json(),
            "authentication": {"enabled": self.auth_enabled},
            **({"backends": self.router().status_json()}
               if self.router is not None and len(self.router().members) > 1 else {}),
            **({"state_store": self.state_store()} if self.state_store is not None else {}),
            "uptime_seconds": int(self.clock.seconds() - self.started_at),
            "version": __version__,
        }


class HealthSite:
    """The Klein app on PORT_HEALTH: 200 to any GET (liveness), plus /readyz (readiness)."""

    app = Klein()

    def __init__(self, state: HealthState) -> None:
        self.state = state

    @app.route("/readyz", methods=["GET", "HEAD"])
    def readyz(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        request.setHeader(b"Cache-Control", b"no-store")
        if self.state.ready():
            return b"ready\n"
        request.setResponseCode(503)
        now = self.state.clock.seconds()
        request.setHeader(b"Retry-After", str(self.state.backend.retry_after(now)).encode())
        return b"not ready\n"

    @app.route("/", branch=True, methods=["GET", "HEAD"])
    def alive(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        request.setHeader(b"Content-Length", b"0")
        return b""
