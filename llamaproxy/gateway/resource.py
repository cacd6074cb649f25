"""The gateway's root resource: public routes, the proxied OpenAI API, and 404/405 for the rest.

Routing is by exact path: only the OpenAI paths (and the llama-server extras an operator lists)
reach a backend, so ``/slots``, ``/props`` and the backend's ``/metrics`` are never exposed, and
no spelling of ``..`` can get there either. The route, the method and the API key are all decided
from the headers (``early_check``), before the body is read.
"""

from __future__ import annotations

import io
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaproxy.auth.access import Access, AccessControl
from llamaproxy.auth.keys import AUTH_DISABLED
from llamaproxy.auth.store import KeyLoadError
from llamaproxy.backends.backend import Backend
from llamaproxy.backends.model_admin import ModelAdmin, UnknownOnDemandModelError
from llamaproxy.backends.routing import (
    Router,
)
from llamaproxy.gateway import errors
from llamaproxy.gateway.errors import GatewayError
from llamaproxy.gateway.proxy import (
    MODEL_PREFIX,
    Exchange,
    GatewaySettings,
    ProxyExchanges,
    answer_whole,
)
from llamaproxy.gateway.request import GatewayRequest
from llamaproxy.gateway.request_body import invalid_json, parse_object, read_facts
from llamaproxy.observability.metrics import GatewayMetrics

log = Logger()

#: Proxied OpenAI paths and the methods they accept.
API_ROUTES: dict[bytes, tuple[bytes, ...]] = {
    b"/v1/chat/completions": (b"POST",),
    b"/v1/completions": (b"POST",),
    b"/v1/embeddings": (b"POST",),
    b"/v1/models": (b"GET", b"HEAD"),
}

#: Public routes: no key, never touch a backend.
PUBLIC_ROUTES = (b"/ping", b"/health", b"/readyz")

#: Admin routes: a key listed in ADMIN_KEY_IDS, never touch a backend.
ADMIN_ROUTES: dict[bytes, tuple[bytes, ...]] = {
    b"/reload": (b"POST",),
    b"/v1/route": (b"POST",),
    # Models started on demand (docs/models.md): list, load, unload.
    b"/admin/models": (b"GET",),
    b"/admin/models/load": (b"POST",),
    b"/admin/models/unload": (b"POST",),
}

_JSON = b"application/json"

_NOSNIFF = ((b"X-Content-Type-Options", b"nosniff"),)

#: Bodies larger than this are parsed one per reactor turn (about 1 ms of parsing per 64 KiB).
LARGE_BODY = 1 << 20

#: Status of a /v1/route answer by its error (None: 200).
_EXPLAIN_STATUS = {
    "invalid_model": 400, "model_not_allowed": 403, "model_not_found": 404,
    "no_backend_available": 503,
}



@dataclass(frozen=True)
class Route:
    """Where a request goes: a public route, or a proxied path."""

    # "public", "metrics", "admin", "api" (proxied), "model" (/v1/models/{id}), "preflight"
    kind: str
    path: bytes


#: The Route of each proxied OpenAI path (frozen: one object serves every request).
#: (No API path is also a public, admin or metrics path, so ``resolve`` may look API paths up
#: first: ``RoutingTests.test_no_api_path_is_another_kind_of_path``.)
_API_ROUTE_OF = {path: Route("api", path) for path in API_ROUTES}


def resolve(method: bytes, path: bytes, extra_paths: frozenset[bytes]) -> Route | GatewayError:
    """Map method and path to a Route, or the 404/405 to answer with."""
    if method == b"OPTIONS":
        return Route("preflight", path)
    allowed = API_ROUTES.get(path)
    if allowed is not None and method in allowed:
        return _API_ROUTE_OF[path]  # (no public, admin or metrics path is an API path)
    if path in PUBLIC_ROUTES:
        return Route("public", path)
    if path == b"/metrics":
        return Route("metrics", path)
    if path in ADMIN_ROUTES:
        if method not in ADMIN_ROUTES[path]:
            return errors.method_not_allowed(
                method.decode("latin-1")[:20], tuple(m.decode() for m in ADMIN_ROUTES[path]))
        return Route("admin", path)
    if allowed is None and path in extra_paths:
        allowed = (b"POST",)
    if allowed is None and path.startswith(MODEL_PREFIX) and len(path) > len(MODEL_PREFIX):
        # Answered by the gateway from the backend's /v1/models (llama-server has no
        # /v1/models/{id}); the raw path is never forwarded.
        if method not in (b"GET", b"HEAD"):
            return errors.method_not_allowed(method.decode("latin-1")[:20], ("GET", "HEAD"))
        return Route("model", path)
    if allowed is None:
        return errors.not_found(path.decode("latin-1")[:200])
    if method not in allowed:
        return errors.method_not_allowed(
            method.decode("latin-1")[:20], tuple(m.decode() for m in allowed)
        )
    return Route("api", path)


class GatewayResource(Resource):
    """Serves /ping, /health, /readyz and proxies the OpenAI API to the backend."""

    isLeaf = True

    def __init__(
        self,
        router: Router,
        agent: IAgent,
        clock: IReactorTime,
        settings: GatewaySettings,
        access: AccessControl,
        health_document: Callable[[], dict[str, object]],
        ready: Callable[[], bool],
        metrics: GatewayMetrics | None = None,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.settings = settings
        self.access = access
        self.health_document = health_document
        self.ready = ready
        #: The proxied requests: routing, queueing, sending, relaying (``gateway.proxy``).
        #: Lists, loads and unloads on-demand models (None: the admin model routes are 404).
        self.model_admin: ModelAdmin | None = None
        self.exchanges = ProxyExchanges(router, agent, clock, settings, metrics)
        #: API requests whose large bodies wait for their turn to be parsed.
        self._large_bodies: deque[tuple[GatewayRequest, bytes]] = deque()

    # -- the exchanges' state, as the service, the tap and the health site see it ----------------

    @property
    def router(self) -> Router:
        """Routes models to backends; replaced whole when the backends file is reloaded."""
        return self.exchanges.router

    @router.setter
    def router(self, router: Router) -> None:
        self.exchanges.router = router

    @property
    def local_model_list(self) -> bool:
        """Answer /v1/models from the router (several backends) instead of asking the backend."""
        return self.exchanges.local_model_list

    @local_model_list.setter
    def local_model_list(self, value: bool) -> None:
        self.exchanges.local_model_list = value

    @property
    def draining(self) -> bool:
        """True once the gateway stops taking new requests (SIGTERM)."""
        return self.exchanges.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.exchanges.draining = value

    @property
    def in_flight(self) -> set[Exchange]:
        """The proxied requests not finished yet."""
        return self.exchanges.in_flight

    @property
    def metrics(self) -> GatewayMetrics | None:
        """The gateway's metrics (None: not measured)."""
        return self.exchanges.metrics

    @metrics.setter
    def metrics(self, metrics: GatewayMetrics | None) -> None:
        self.exchanges.metrics = metrics

    @property
    def agent(self) -> IAgent:
        """The client requests are forwarded with."""
        return self.exchanges.agent

    def wait_idle(self) -> Deferred[None]:
        """A Deferred that fires when no proxied request is in flight."""
        return self.exchanges.wait_idle()

    def abort_in_flight(self) -> None:
        """Cut every exchange still running (the drain timeout passed)."""
        self.exchanges.abort_in_flight()

    # -- decisions from the headers alone ------------------------------------------------------

    def early_check(
        self, request: GatewayRequest
    ) -> GatewayError | Deferred[GatewayError | None] | None:
        """Route, method and API key, decided before the body is read (a Deferred when the
        limits are shared through Redis: the request waits for it, its body unread)."""
        route = resolve(request.method, request.path, self.settings.extra_paths)
        if isinstance(route, GatewayError):
            return route
        request.route = route  # render uses it: resolved once per request
        if route.kind == "metrics" and not self.settings.metrics_auth_enabled:
            return None
        if route.kind not in ("api", "model", "admin", "metrics"):
            return None
        values = request.head_values
        result = self.access.check(
            values.get(b"authorization"), values.get(b"x-api-key"), admin=route.kind == "admin")
        if isinstance(result, Deferred):
            return result.addCallback(self._apply_access, request, route)
        return self._apply_access(result, request, route)

    def _apply_access(
        self, result: Access, request: GatewayRequest, route: Route
    ) -> GatewayError | None:
        """Apply an access decision to ``request``: its key, refund, metrics and headers."""
        # (one unpacking: each NamedTuple field read by name is an unspecialized lookup)
        key_id, headers, error, charged_at, _, _ = result
        request.key_id = key_id
        if error is not None:
            return error
        if charged_at is not None:
            request.refund = partial(self._refund, result)  # no cycle through the request
        metrics = self.exchanges.metrics
        if metrics is not None and key_id != AUTH_DISABLED and route.kind != "metrics":
            metrics.authenticated(key_id)  # type: ignore[arg-type]
        if headers:
            request.set_headers(headers)
        return None

    def _refund(self, access: Access, request: GatewayRequest) -> None:
        """The gateway refused ``request`` itself: it costs no request from the key's window."""
        remaining = self.access.refund(access)
        if remaining is not None and not request.startedWriting:
            request.setHeader(b"X-RateLimit-Remaining", str(remaining).encode())

    # -- rendering ------------------------------------------------------------------------

    def render(self, request: GatewayRequest) -> bytes | int:
        # (Server is set already: GatewayRequest.process, the only caller, sets it first)
        request.set_headers(_NOSNIFF)
        if self.settings.hsts is not None and request.isSecure():
            request.setHeader(b"Strict-Transport-Security", self.settings.hsts.encode())
        request.apply_cors()
        if request.early_error is not None:
            return request.render_error(request.early_error)
        route = request.route or resolve(request.method, request.path, self.settings.extra_paths)
        if isinstance(route, GatewayError):
            return request.render_error(route)
        if route.kind == "preflight":
            request.setResponseCode(204)
            return b""
        if route.kind == "public":
            return self._render_public(request, route.path)
        if route.kind == "admin" and route.path == b"/v1/route":
            return self._explain_route(request)
        if route.kind == "admin" and route.path.startswith(b"/admin/models"):
            return self._model_admin(request, route.path)
        if route.kind == "admin":
            return self._reload_keys(request)
        if route.kind == "metrics":
            return self._render_metrics(request)
        # "api" and "model" routes: both go through admission and the backend.
        if self.draining:
            return request.render_error(errors.backend_unavailable("stopping", 5))
        if request.key_id is None:
            # early_check did not run (it always does on a GatewaySite): fail closed.
            return request.render_error(errors.unauthorized("Missing Authorization header"))
        body = _body_of(request)
        if request.method == b"POST" and len(body) > LARGE_BODY:
            # Parsing it takes tens of milliseconds: large bodies are parsed one per reactor
            # turn, so several arriving together never stall everyone else for their sum.
            self._large_bodies.append((request, body))
            if len(self._large_bodies) == 1:
                self.clock.callLater(0, self._next_large_body)
            return NOT_DONE_YET
        self._serve(request, body)
        return NOT_DONE_YET

    def _next_large_body(self) -> None:
        request, body = self._large_bodies.popleft()
        if self._large_bodies:
            self.clock.callLater(0, self._next_large_body)
        if request.gone:
            return  # its client left while it waited (connectionLost recorded it)
        try:
            self._serve(request, body)
        except Exception:
            request.processingFailed(Failure())

    def _serve(self, request: GatewayRequest, body: bytes) -> None:
        """An API request with its whole body: check the body, route it, queue or send it."""
        if request.method == b"POST":
            facts = read_facts(request.path, body, request.shape, self.router.table.prefix_rule)
            request.shape = None
            if isinstance(facts, GatewayError):
                request.send_error(facts)
                return
            request.facts = facts
        self.exchanges.start(request, body)

    def _render_public(self, request: GatewayRequest, path: bytes) -> bytes:
        if path == b"/ping":
            request.setHeader(b"Content-Length", b"0")
            return b""
        if path == b"/health":
            request.setHeader(b"Content-Type", _JSON)
            request.setHeader(b"Cache-Control", b"no-store")
            return json.dumps(self.health_document(), indent=2).encode() + b"\n"
        ready = self.ready()
        if not ready:
            request.setResponseCode(503)
            request.setHeader(
                b"Retry-After", str(self.backend.retry_after(self.clock.seconds())).encode()
            )
        request.setHeader(b"Content-Type", _JSON)
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps({"ready": ready, "backend": self.backend.condition}).encode() + b"\n"

    @property
    def backend(self) -> Backend:
        """The default model's first backend (what /readyz reports in single-backend mode)."""
        router = self.router
        spec = router.table.backends_for(router.table.default_model)[0]
        return router.members[spec.name].status

    def _render_metrics(self, request: GatewayRequest) -> bytes:
        """/metrics: the older gateway's JSON, or Prometheus/OpenMetrics text for scrapers."""
        if self.metrics is None:
            return request.render_error(errors.not_found("/metrics"))
        accept = request.getHeader(b"accept")
        body, content_type = self.metrics.render(
            accept.decode("latin-1") if accept is not None else None,
            include_per_key=self.settings.metrics_auth_enabled,
        )
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Cache-Control", b"no-store")
        return body

    def _explain_route(self, request: GatewayRequest) -> bytes:
        """POST /v1/route (admin keys): which backend would serve this body, and why."""
        shape = request.shape
        if shape is not None and shape.error is not None:
            return request.render_error(invalid_json(f"Request body refused: {shape.error}"))
        body = parse_object(_body_of(request) or b"{}")
        if isinstance(body, GatewayError):
            return request.render_error(body)
        answer = self.router.explain(body, request.key_id)
        request.setResponseCode(_EXPLAIN_STATUS.get(str(answer.get("error")), 200))
        request.setHeader(b"Content-Type", _JSON)
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(answer).encode() + b"\n"

    def _model_admin(self, request: GatewayRequest, path: bytes) -> bytes | int:
        """/admin/models (GET: list), /admin/models/load and /admin/models/unload (POST with
        ``{"model": NAME}``): the on-demand models (admin keys only)."""
        admin = self.model_admin
        if admin is None:
            return request.render_error(errors.not_found(path.decode("latin-1")))
        if path == b"/admin/models":
            return _json_answer(request, {"object": "list", "data": admin.list()})
        body = parse_object(_body_of(request) or b"{}")
        if isinstance(body, GatewayError):
            return request.render_error(body)
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return request.render_error(errors.bad_request(
                "'model' must name an on-demand model", "invalid_model", "model"))
        try:
            if path == b"/admin/models/load":
                return _json_answer(request, admin.load(name))
            unloading = admin.unload(name)
        except UnknownOnDemandModelError:
            return request.render_error(errors.model_not_found(name))

        def unloaded(doc: dict[str, object]) -> None:
            if not request.gone:
                request.setHeader(b"Content-Type", _JSON)
                request.setHeader(b"Cache-Control", b"no-store")
                answer_whole(request, json.dumps(doc).encode() + b"\n")

        unloading.addCallback(unloaded).addErrback(
            lambda f: log.failure("Unloading {model} failed", f, model=name))
        return NOT_DONE_YET

    def _reload_keys(self, request: GatewayRequest) -> int:
        """POST /reload: re-read the key file now (admin keys only), off the reactor thread."""
        reloading = self.access.store.refresh(f"POST /reload by {request.key_id}")

        def loaded(count: int | None) -> None:
            if request.gone:
                return
            request.setHeader(b"Content-Type", _JSON)
            request.setHeader(b"Cache-Control", b"no-store")
            body = json.dumps({"status": "ok", "keys_loaded": count}).encode() + b"\n"
            answer_whole(request, body)

        def failed(failure: Failure) -> None:
            if failure.check(KeyLoadError):
                request.send_error(errors.reload_failed(failure.getErrorMessage()))
            else:
                log.failure("POST /reload failed", failure)
                request.send_error(errors.internal_error())

        reloading.addCallbacks(loaded, failed)
        return NOT_DONE_YET


def _json_answer(request: GatewayRequest, doc: object) -> bytes:
    request.setHeader(b"Content-Type", _JSON)
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(doc).encode() + b"\n"


def _body_of(request: GatewayRequest) -> bytes:
    """The request's body, taken out of twisted.web's buffer (which is then released)."""
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body = content.read()
    content.close()  # a body over 100 kB is in a temporary file: closing deletes it
    request.content = io.BytesIO()
    return body
