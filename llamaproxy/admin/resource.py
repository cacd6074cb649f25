"""The operator page over HTTP: login, the page, its forms, live updates (SSE) and polling.

=========================  =======================================================================
``GET /``                  the page (a static snapshot; ``?key=&model=`` filter the activity), or
                           the login form without a session
``POST /login``            ``api_key`` (+ the form's double-submit token): session cookie, 303 /
``POST /logout``           ends the session (CSRF token required)
``POST /restart``          ``backend`` (+ CSRF): restart its child; without ``confirm=yes`` it
                           answers with a confirmation page (the script asks in the browser)
``GET /events``            Server-Sent Events: every second, the sections' HTML as JSON
``GET /fragments``         the same JSON once (the script's polling fallback)
``GET /state.json``        the snapshot as data (key ids and counts, no secrets, no prompts)
``GET /static/…``          the page's script and style sheet (no CDN, no build step)
=========================  =======================================================================

Every response carries a strict Content-Security-Policy (scripts and styles from this origin
only), ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer`` and ``Cache-Control: no-store``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from importlib import resources
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from llamaproxy.admin import page
from llamaproxy.admin.operations import BackendOperations, OperationError
from llamaproxy.admin.sessions import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    LoginError,
    Session,
    SessionStore,
)
from llamaproxy.admin.view import Dashboard
from llamaproxy.gateway.request import SERVER_NAME

log = Logger()

#: Live streams served at once; more get 503 (and the script falls back to polling).
MAX_STREAMS = 16
#: Seconds between live updates.
TICK = 1.0
#: Largest form body read.
MAX_FORM_BYTES = 16 * 1024

_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_STATIC = {
    b"/static/page.js": ("page.js", b"text/javascript; charset=utf-8"),
    b"/static/page.css": ("page.css", b"text/css; charset=utf-8"),
}


def _static(name: str) -> bytes:
    return resources.files("llamaproxy.admin").joinpath("static", name).read_bytes()


def _arg(request: Any, name: bytes) -> str:
    values = (request.args or {}).get(name) or [b""]
    return str(values[0].decode("utf-8", "replace"))[:4096]


def _query(request: Any, name: bytes) -> str:
    return _arg(request, name) if request.method == b"GET" else ""


@implementer(IPushProducer)
class _Stream:
    """One open ``/events`` response: its session, filters and whether the client keeps up."""

    def __init__(self, request: Request, session: Session, key: str, model: str) -> None:
        self.request = request
        self.session = session
        self.key = key
        self.model = model
        self.paused = False
        self.closed = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.closed = True

    def send(self, data: bytes) -> None:
        if not self.closed and not self.paused:
            self.request.write(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.request.unregisterProducer()
        self.request.finish()


class LiveUpdates:
    """Pushes the sections to open ``/events`` streams every ``TICK`` seconds.

    Its timer runs only while a stream is open: a closed page costs nothing.
    """

    def __init__(self, dashboard: Dashboard, sessions: SessionStore, clock: IReactorTime) -> None:
        self.dashboard = dashboard
        self.sessions = sessions
        self.streams: list[_Stream] = []
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock

    @property
    def running(self) -> bool:
        """True while the timer runs (some page is open)."""
        return self._loop.running

    def open(self, request: Request, session: Session, key: str, model: str) -> _Stream | None:
        """Start streaming to ``request``; None when too many streams are open."""
        if len(self.streams) >= MAX_STREAMS:
            return None
        stream = _Stream(request, session, key, model)
        request.registerProducer(stream, True)
        self.streams.append(stream)
        request.notifyFinish().addBoth(lambda _: self._gone(stream))
        request.write(b"retry: 3000\n\n")
        stream.send(self._payload(session, key, model))
        if not self._loop.running:
            self._loop.start(TICK, now=False).addErrback(
                lambda f: log.failure("Operator page live updates stopped", f)
            )
        return stream

    def _gone(self, stream: _Stream) -> None:
        stream.closed = True
        if stream in self.streams:
            self.streams.remove(stream)
        if not self.streams and self._loop.running:
            self._loop.stop()

    def tick(self) -> None:
        """Send every open stream its update (one rendering per distinct filter)."""
        cache: dict[tuple[str, str, str], bytes] = {}
        for stream in list(self.streams):
            if not self.sessions.valid(stream.session):
                stream.request.write(b"event: logout\ndata: {}\n\n")
                stream.close()
                self._gone(stream)
                continue
            if stream.paused:
                continue  # a slow client skips updates; nothing piles up for it
            which = (stream.key, stream.model, stream.session.csrf)
            data = cache.get(which)
            if data is None:
                data = cache[which] = self._payload(stream.session, stream.key, stream.model)
            stream.send(data)

    def _payload(self, session: Session, key: str, model: str) -> bytes:
        return b"data: " + fragments_json(self.dashboard, session, key, model) + b"\n\n"

    def close_all(self) -> None:
        """End every stream (the service stops)."""
        for stream in list(self.streams):
            stream.close()
            self._gone(stream)


def fragments_json(dashboard: Dashboard, session: Session, key: str, model: str) -> bytes:
    """The sections' HTML as one JSON object (live updates and polling)."""
    snapshot = dashboard.snapshot(key, model)
    document = {
        "at": snapshot.at,
        "sections": page.render_sections(snapshot, session.csrf),
    }
    return json.dumps(document, separators=(",", ":")).encode()


class AdminResource(Resource):
    """The operator page's whole HTTP surface (one leaf resource dispatching on the path)."""

    isLeaf = True

    def __init__(
        self,
        dashboard: Dashboard,
        sessions: SessionStore,
        operations: BackendOperations,
        clock: IReactorTime,
        live: LiveUpdates | None = None,
        static: Callable[[str], bytes] = _static,
    ) -> None:
        super().__init__()
        self.dashboard = dashboard
        self.sessions = sessions
        self.operations = operations
        self.live = live if live is not None else LiveUpdates(dashboard, sessions, clock)
        self._static = static

    # -- dispatch -------------------------------------------------------------------------------

    def render(self, request: Any) -> bytes | int:
        _security_headers(request)
        try:
            return self._dispatch(request)
        except Exception:
            log.failure("Operator page error on {path}", path=request.path)
            return _json_error(request, 500, "Internal error (see the gateway's log)")

    def _dispatch(self, request: Any) -> bytes | int:
        path = request.path
        method = request.method
        if method == b"HEAD":
            method = b"GET"
        if method == b"GET" and path in _STATIC:
            name, content_type = _STATIC[path]
            request.setHeader(b"Content-Type", content_type)
            return self._static(name)
        if method == b"POST":
            length = request.getHeader(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_FORM_BYTES):
                return _json_error(request, 413, "Form too large")
        routes: dict[tuple[bytes, bytes], Callable[[Any], bytes | int]] = {
            (b"GET", b"/"): self._page,
            (b"GET", b"/login"): self._page,
            (b"POST", b"/login"): self._login,
            (b"POST", b"/logout"): self._logout,
            (b"POST", b"/restart"): self._restart,
            (b"GET", b"/events"): self._events,
            (b"GET", b"/fragments"): self._fragments,
            (b"GET", b"/state.json"): self._state,
        }
        handler = routes.get((method, path))
        if handler is None:
            if any(p == path for _, p in routes):
                request.setHeader(b"Allow", b"GET, POST")
                return _json_error(request, 405, "Method not allowed")
            return _json_error(request, 404, "Not found")
        return handler(request)

    def _session(self, request: Any) -> Session | None:
        token = request.getCookie(SESSION_COOKIE)
        return self.sessions.lookup(token.decode("ascii", "replace") if token else None)

    # -- pages and forms ------------------------------------------------------------------------

    def _page(self, request: Any) -> bytes:
        session = self._session(request)
        if session is None:
            return self._login_form(request)
        notice = ""
        restarted = _query(request, b"restarted")
        if restarted and restarted in {b.name for b in self.dashboard.snapshot().backends}:
            notice = f"Backend '{restarted}' is restarting."
        snapshot = self.dashboard.snapshot(_query(request, b"key"), _query(request, b"model"))
        return _html(request, page.dashboard_page(snapshot, session.key_id, session.csrf, notice))

    def _login_form(self, request: Any, error: str = "", status: int = 200) -> bytes:
        token = secrets.token_urlsafe(24)
        _set_cookie(request, LOGIN_COOKIE, token, max_age=600)
        request.setResponseCode(status)
        return _html(request, page.login_page(token, error))

    def _login(self, request: Any) -> bytes:
        expected = request.getCookie(LOGIN_COOKIE)
        given = _arg(request, b"login")
        if not expected or not given or not secrets.compare_digest(
            expected, given.encode("utf-8", "replace")
        ):
            return self._login_form(request, "The login form expired; please try again.", 400)
        client = getattr(request.getClientAddress(), "host", "") or "-"
        try:
            token, session = self.sessions.login(_arg(request, b"api_key"), client)
        except LoginError as e:
            log.warn("Operator page login refused from {client}: {why}", client=client,
                     why=str(e))
            return self._login_form(request, str(e), 403)
        log.info("Operator page login with key {key_id} from {client}", key_id=session.key_id,
                 client=client)
        _set_cookie(request, SESSION_COOKIE, token, max_age=int(self.sessions.ttl))
        _set_cookie(request, LOGIN_COOKIE, "", max_age=0)
        return _redirect(request, b"/")

    def _logout(self, request: Any) -> bytes:
        session = self._session(request)
        if session is not None:
            if not self.sessions.csrf_ok(session, _arg(request, b"csrf")):
                return _csrf_refused(request)
            token = request.getCookie(SESSION_COOKIE)
            self.sessions.logout(token.decode("ascii", "replace") if token else None)
        _set_cookie(request, SESSION_COOKIE, "", max_age=0)
        return _redirect(request, b"/")

    def _restart(self, request: Any) -> bytes:
        session = self._session(request)
        if session is None:
            return _json_error(request, 401, "Log in first")
        if not self.sessions.csrf_ok(session, _arg(request, b"csrf")):
            return _csrf_refused(request)
        backend = _arg(request, b"backend")
        if _arg(request, b"confirm") != "yes":
            return _html(request, page.confirm_page(backend, session.csrf))
        try:
            self.operations.restart(backend, session.key_id)
        except OperationError as e:
            request.setResponseCode(409)
            return _html(request, page.message_page("Not restarted", str(e)))
        return _redirect(request, b"/?restarted=" + backend.encode())

    # -- live data ------------------------------------------------------------------------------

    def _events(self, request: Any) -> bytes | int:
        session = self._session(request)
        if session is None:
            return _json_error(request, 401, "Log in first")
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"X-Accel-Buffering", b"no")
        stream = self.live.open(request, session, _query(request, b"key"),
                                _query(request, b"model"))
        if stream is None:
            request.setHeader(b"Content-Type", b"application/json")
            return _json_error(request, 503, "Too many live pages open; polling instead")
        return NOT_DONE_YET

    def _fragments(self, request: Any) -> bytes:
        session = self._session(request)
        if session is None:
            return _json_error(request, 401, "Log in first")
        request.setHeader(b"Content-Type", b"application/json")
        return fragments_json(self.dashboard, session, _query(request, b"key"),
                              _query(request, b"model"))

    def _state(self, request: Any) -> bytes:
        session = self._session(request)
        if session is None:
            return _json_error(request, 401, "Log in first")
        request.setHeader(b"Content-Type", b"application/json")
        snapshot = self.dashboard.snapshot(_query(request, b"key"), _query(request, b"model"))
        return json.dumps(snapshot.as_json(), indent=1).encode() + b"\n"


def _security_headers(request: Any) -> None:
    request.setHeader(b"Server", SERVER_NAME)
    request.setHeader(b"Content-Security-Policy", _CSP)
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"X-Frame-Options", b"DENY")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.setHeader(b"Cache-Control", b"no-store")


def _set_cookie(request: Any, name: bytes, value: str, max_age: int) -> None:
    request.addCookie(
        name, value.encode("ascii"), path=b"/", max_age=str(max_age).encode(), httpOnly=True,
        secure=bool(request.isSecure()), sameSite=b"Strict",
    )


def _html(request: Any, text: str) -> bytes:
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    return text.encode("utf-8")


def _redirect(request: Any, location: bytes) -> bytes:
    request.setResponseCode(303)
    request.setHeader(b"Location", location)
    return b""


def _csrf_refused(request: Any) -> bytes:
    request.setResponseCode(403)
    return _html(request, page.message_page(
        "Refused", "The form's CSRF token is missing or wrong: reload the page and try again."
    ))


def _json_error(request: Any, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
