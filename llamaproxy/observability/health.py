"""Health: the /health and /readyz documents, and the Klein health site for platform probes.

The health site (PORT_HEALTH) answers 200 to any GET without touching a backend, so a platform's
liveness check never wakes or loads a model. ``/readyz`` on either site is the readiness signal:
200 only when a backend is ready (or is an on-demand one, which a request starts) and the
gateway is not draining.

The health port is served by the gateway's own channel and request (``health_port_site``): the
same request-line, header and arrival-time limits, JSON errors, no ``TwistedWeb`` banner, and no
request body at all (a body is refused with 413 before it is read).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from llamaproxy import __version__
from llamaproxy.backends.admission import Admission
from llamaproxy.backends.backend import Backend
from llamaproxy.gateway import errors
from llamaproxy.gateway.errors import GatewayError
from llamaproxy.gateway.request import GatewayRequest
from llamaproxy.gateway.site import GatewaySite, RequestLimits


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
        #: The older gateway's 11 counters (``/metrics`` JSON), for ``gateway.metrics``; None
        #: when /metrics needs a key (then /health does not show them either).
        self.legacy_metrics: Callable[[], dict[str, Any]] | None = None
        #: Which fast paths run, and why not (``FastPaths.document``), when the tap says.
        self.fast_paths: dict[str, object] | None = None
        #: The shared state store's status (STATE_URL), when there is one.
        self.state_store: Callable[[], dict[str, Any]] | None = None
        #: False while requests cannot be served for want of the shared state store
        #: (STATE_FAILURE=closed and Redis away): readiness says so, so balancers go elsewhere.
        self.state_store_ready: Callable[[], bool] | None = None

    def ready(self) -> bool:
        """True when requests can be served: backend ready (or started on demand by the first
        request for it) and not draining."""
        if self.state_store_ready is not None and not self.state_store_ready():
            return False
        return self._serving() and not self.draining()

    def _serving(self) -> bool:
        return self.backend.ready or self.backend.on_demand is not None

    def document(self) -> dict[str, object]:
        """The /health JSON: no key ids, no key counts.

        ``code`` (the backend's last /health status) and ``gateway`` ({status, metrics}) are
        the older gateway's fields, kept for the monitors that read them.
        """
        draining = self.draining()
        if draining:
            status = "draining"
        elif self._serving():
            status = "ok"
        else:
            status = "unavailable"
        probe = self.backend.last_probe
        gateway: dict[str, object] = {"status": "draining" if draining else "ok"}
        if self.legacy_metrics is not None:
            gateway["metrics"] = self.legacy_metrics()
        return {
            "status": status,
            **({"code": probe.status_code}
               if probe is not None and probe.status_code is not None else {}),
            "gateway": gateway,
            "backend": self.backend.status_json(),
            "model": self.backend.model,
            "queue": self.admission.status_json(),
            "authentication": {"enabled": self.auth_enabled},
            **({"backends": self.router().status_json()}
               if self.router is not None and len(self.router().members) > 1 else {}),
            **({"state_store": self.state_store()} if self.state_store is not None else {}),
            "uptime_seconds": int(self.clock.seconds() - self.started_at),
            "version": __version__,
            **({"fast_paths": self.fast_paths} if self.fast_paths is not None else {}),
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


#: The only methods the health port answers.
_READ_METHODS = (b"GET", b"HEAD")


def _reads_only(request: GatewayRequest) -> GatewayError | None:
    """The health port's early check: GET and HEAD only, refused before any body is read."""
    if request.method in _READ_METHODS:
        return None
    return errors.method_not_allowed(request.method.decode("latin-1", "replace")[:20],
                                     ("GET", "HEAD"))


def health_port_site(state: HealthState, limits: RequestLimits, reactor: Any) -> GatewaySite:
    """The PORT_HEALTH site: the health app behind the gateway's channel, limits and errors.

    ``limits`` are the gateway's; the body limit is 0 here since no health request has a body.
    """
    return GatewaySite(
        HealthSite(state).app.resource(), replace(limits, max_body=0), reactor=reactor,
        early_check=_reads_only,
    )
