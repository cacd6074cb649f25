"""The proxied exchange: route a request to a backend, wait, send, fail over, relay.

``ProxyExchanges`` (one per gateway, held by the resource) serves each API request end to end once
its body was checked (``start``): pick the candidates for its model, wait for a ready backend and a
slot (one QUEUE_TIMEOUT budget), send it, fail over to the next backend when that is safe (nothing
sent to the client yet), and relay the answer with backpressure; it keeps the set in flight that
a drain waits for. ``Exchange`` is one such request in flight.

Over 500 lines because the exchange's steps (route, park, admit, forward, fail over, relay, answer)
share one state object and one failure policy; splitting them would pass that state between
modules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar, cast, overload
from urllib.parse import unquote

from twisted.internet import defer, task
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse

from llamaproxy.auth.keys import AUTH_DISABLED
from llamaproxy.backends import forward
from llamaproxy.backends.admission import Admission, QueueFullError, Slot, Waiter
from llamaproxy.backends.backend import Backend, BackendState, ModelLoadFailedError
from llamaproxy.backends.breaker import BreakerState, Ticket
from llamaproxy.backends.config_file import upstream_url_bytes
from llamaproxy.backends.routing import (
    UNREACHABLE_REASONS,
    Member,
    ModelNotAllowedError,
    Router,
    UnknownModelError,
    describe_reason,
    failure_reason,
    is_retryable,
    report,
)
from llamaproxy.fastpath.backend_client import BackendClient
from llamaproxy.fastpath.header_fill import set_fields
from llamaproxy.gateway import errors
from llamaproxy.gateway.errors import GatewayError
from llamaproxy.gateway.loading_comments import LoadingComments
from llamaproxy.gateway.relay import StreamRelay
from llamaproxy.gateway.request import GatewayRequest
from llamaproxy.gateway.request_body import with_model, with_slot
from llamaproxy.gateway.tokens import UsageCollector
from llamaproxy.observability.metrics import GatewayMetrics, RequestTimer, route_label
from llamaproxy.supervision.probe import read_body_bounded

log = Logger()

_JSON = b"application/json"

#: How long a failed send waits for the supervisor to notice a crash before giving up (seconds).
_CRASH_NOTICE_DELAY = 0.5

_T = TypeVar("_T")

#: Largest backend model list the gateway reads to answer /v1/models/{id}.
_MODEL_LIST_LIMIT = 1 << 20

MODEL_PREFIX = b"/v1/models/"

#: The header a streamed request goes to its backend with (see ``_forward``).
STREAM_CONNECTION = (b"Connection", b"close")

#: Most upstream URLs remembered (all are forgotten when there are more: targets with
#: ever-changing query strings).
_URLS_KEPT = 256

#: Routes whose responses report token usage.
_USAGE_ROUTES = frozenset({b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings"})



@dataclass(eq=False, slots=True, weakref_slot=True)
class Exchange:
    """One proxied request in flight: what a timeout or a disconnect has to stop."""

    request: GatewayRequest
    started: float
    relay: StreamRelay | None = None
    timed_out: bool = False
    #: True while the exchange's timer is armed (see ``ProxyExchanges._arm_deadline``).
    deadline: bool = False
    #: When REQUEST_TIMEOUT passes (clock seconds), while ``deadline`` is armed.
    deadline_at: float = 0.0
    #: When the exchange's timer is due (clock seconds), while ``deadline`` is armed.
    due: float = 0.0
    slot: Slot | None = None
    #: The request body as sent to the backend.
    body: bytes = b""
    #: Token usage seen in the response (chat, completions, embeddings).
    usage: UsageCollector | None = None
    #: Set when the gateway cut the exchange (drain timeout) before it was answered.
    aborted: bool = False
    #: The canonical model the request was routed for.
    model: str | None = None
    #: The routing decision of a ``cache_affinity`` model
    #: (``llamaproxy.backends.affinity.DECISIONS``).
    route: str | None = None
    #: Why the last backend tried could not answer (sent if no other backend can).
    failure: GatewayError | None = None
    #: The metrics timer of this request (when metrics are on).
    timer: RequestTimer | None = None
    #: What cancelling stops the exchange by while it has no relay: its coroutine's Deferred,
    #: or the send ``ProxyExchanges._begin`` made.
    task: Deferred[Any] | None = field(default=None, repr=False)
    #: Its place in a backend's queue while it waits there parked (no coroutine yet).
    parked: ParkedExchange | None = field(default=None, repr=False)
    #: True once a backend may have the request (a send began and did not fail to connect or
    #: send): from then on it is accounted, never refunded.
    sent: bool = False
    #: The backend whose successful answer is being relayed, told to routing if the relay
    #: completes (``ProxyExchanges._relay_ended``).
    relayed_from: Member | None = field(default=None, repr=False)

    def outcome(self) -> str:
        """How the exchange ended, in a word (for logs and metrics)."""
        if self.relay is not None:
            return self.relay.outcome or "unfinished"
        if self.timed_out:
            return "timeout"
        if self.aborted:
            return "shutdown"
        return "client_gone" if self.request.gone and not self.request.finished else "answered"

    def client_left(self) -> None:
        """The client disconnected before the response ended (``GatewayRequest.on_lost``):
        stop the relay, or the exchange's coroutine."""
        if self.request.finished:
            return
        if self.relay is not None:
            # Usually the transport already told the relay (stopProducing); make sure.
            self.relay.stopProducing()
        elif self.task is not None:
            self.task.cancel()


@dataclass
class GatewaySettings:
    """The parts of the configuration the gateway resource uses."""

    request_timeout: float = 300.0
    stream_idle_timeout: float = 120.0
    queue_timeout: float = 60.0
    #: Longest wait for an on-demand model to load (LOAD_TIMEOUT).
    load_timeout: float = 300.0
    first_byte_timeout: float = 300.0
    metrics_auth_enabled: bool = False
    #: Strict-Transport-Security value for HTTPS responses (None: not sent).
    hsts: str | None = None
    #: Log a line per proxied request (off when the access log already records each one).
    log_requests: bool = True
    extra_paths: frozenset[bytes] = frozenset()


class ParkedExchange(Waiter):
    """An exchange waiting for its first backend's slot, before any coroutine of it exists.

    Most of a queued request's memory would be its machinery (the coroutines, Deferreds and
    timers of a running exchange). A request that has to queue for a ready backend is parked
    in that backend's ``Admission`` as this small object instead, and its exchange starts once
    a slot is its (``granted``) or QUEUE_TIMEOUT passed (``expired``: the attempt failed like a
    queue timeout, so the next candidate may still serve it). Its client leaving
    (``client_gone``) or a drain running out (``abort``) takes it out of the queue.
    """

    __slots__ = ("admission", "candidates", "exchange", "exchanges")

    def __init__(
        self, exchanges: ProxyExchanges, exchange: Exchange, candidates: list[Member],
        admission: Admission,
    ) -> None:
        super().__init__(exchange.request.key_id or AUTH_DISABLED)
        self.exchanges: ProxyExchanges | None = exchanges
        self.exchange: Exchange | None = exchange
        self.candidates = candidates
        self.admission = admission

    def _leave(self) -> tuple[ProxyExchanges, Exchange]:
        """Unhook from the request (served, expired or gone) and drop references."""
        exchanges, exchange = self.exchanges, self.exchange
        assert exchanges is not None and exchange is not None
        self.exchanges = self.exchange = None
        exchange.parked = None
        exchange.request.on_lost = None
        return exchanges, exchange

    def granted(self, slot: Slot) -> None:
        exchanges, exchange = self._leave()
        exchange.slot = slot
        exchanges._begin(exchange, self.candidates)

    def expired(self) -> None:
        exchanges, exchange = self._leave()
        status = self.candidates[0].status
        timed_out = errors.queue_timeout(status.retry_after(exchanges.clock.seconds()))
        exchanges._run(exchange, exchanges._attempts(exchange, self.candidates, timed_out))

    def client_gone(self) -> None:
        """The client disconnected while waiting: leave the queue, end the exchange."""
        self.admission.cancel(self)
        exchanges, exchange = self._leave()
        exchanges._exchange_done(exchange)

    def abort(self) -> None:
        """The drain timed out: answer 503 "stopping" and leave the queue."""
        self.admission.cancel(self)
        exchanges, exchange = self._leave()
        exchange.aborted = True
        exchange.request.send_error(errors.backend_unavailable("stopping", 5))
        exchanges._exchange_done(exchange)


class ProxyExchanges:
    """Every proxied request of one gateway, from routing to its last byte (``start``), and the
    set of those in flight (what a drain waits for, or cuts)."""

    def __init__(
        self,
        router: Router,
        agent: IAgent,
        clock: IReactorTime,
        settings: GatewaySettings,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        #: Routes models to backends; replaced whole when the backends file is reloaded.
        self.router = router
        self.agent = agent
        self.clock = clock
        self.settings = settings
        self.metrics = metrics
        #: Answer /v1/models from the router (several backends) instead of asking the backend.
        self.local_model_list = False
        #: True once the gateway stops taking new requests.
        self.draining = False
        self.in_flight: set[Exchange] = set()
        self.started_at = clock.seconds()
        self._drained: list[Deferred[None]] = []
        #: (backend base URL, request target) -> the URL sent to (``_upstream_url``).
        self._urls: dict[tuple[str, bytes], bytes] = {}
        #: The exchanges whose timer is armed, in the order they were armed (``_arm_deadline``).
        self._timed: dict[Exchange, None] = {}
        #: The one reactor timer over them (armed while ``_timed`` is not empty), and when it
        #: is due: no later than the soonest of their times.
        self._timers_call: IDelayedCall | None = None
        self._timers_at = 0.0

    def start(self, request: GatewayRequest, body: bytes) -> None:
        """Serve an API request whose body was checked: route it, then queue or send it."""
        exchange = Exchange(request, self.clock.seconds(), body=body)
        if request.path in _USAGE_ROUTES:
            exchange.usage = UsageCollector(request.facts.stream)  # counts what the answer used
        request.exchange = exchange
        if self.metrics is not None:
            key_id = request.key_id if request.key_id != AUTH_DISABLED else None
            exchange.timer = self.metrics.request_started(route_label(request.path), key_id)
        candidates = self._route(exchange)
        if candidates is None:  # answered already (the model list, or a model error)
            self._exchange_done(exchange)
            return
        self.in_flight.add(exchange)
        if candidates:
            admission = candidates[0].load
            if type(admission) is Admission and admission.active < admission.max_concurrent \
                    and admission.waiting <= 0:
                # (Admission.full, inline: not full, so _park would not park it)
                self._begin(exchange, candidates)
                return
        if not self._park(exchange, candidates):
            self._begin(exchange, candidates)

    def _begin(self, exchange: Exchange, candidates: list[Member]) -> None:
        """Run ``_attempts`` for ``exchange`` (in ``in_flight``), or its usual first step
        without a coroutine.

        Usually the first candidate is ready, its breaker lets the request through and it has
        a free slot (or the exchange holds one: a parked exchange's): the request is sent here
        and ``_first_answer`` relays a plain answer from the send's callback, as ``_forward``
        would. Anything else (a failed send, an answer to fail over from or to turn into an
        error, a wait) goes on in ``_attempts``, from where it stands (``sent``). A coroutine
        driven by ``Deferred.fromCoroutine`` costs more per request than the callbacks.
        """
        request = exchange.request
        budget = self.router.max_attempts  # (min(len(candidates), it), as _attempts has)
        if len(candidates) < budget:
            budget = len(candidates)
        member = candidates[0] if budget > 0 else None
        if (member is None or request.gone or _model_path(request.path)
                or not member.status.ready or not member.breaker.allow()
                or (exchange.slot is None and not self._take_slot(exchange, member))):
            self._run(exchange, self._attempts(exchange, candidates))
            return
        # What _attempts and _try_member do for a first candidate admitted at once.
        ticket = member.breaker.acquire()
        assert ticket is not None  # (allowed just now)
        last = budget == 1
        if exchange.timer is not None:
            exchange.timer.admitted()
        request.on_lost = exchange.client_left
        try:
            url = self._upstream_url(member.spec.base_url, request.uri)  # (not a model path)
            body = self._request_body(exchange, member)
            sending, again = self._send(exchange, member, request.method, url, body, first=True)
        except Exception:
            ticket.release()
            self._task_ended(Failure(), exchange)
            return
        exchange.task = sending
        args = (exchange, candidates, member, ticket, last)
        sending.addCallbacks(self._first_answer, self._first_failed, callbackArgs=args,
                             errbackArgs=(*args, again))

    def _first_answer(
        self, response: IResponse, exchange: Exchange, candidates: list[Member], member: Member,
        ticket: Ticket, last: bool,
    ) -> None:
        """The answer to ``_begin``'s send: relayed here when it is relayed as it comes
        (``_relays_at_once``), else handed to ``_attempts``."""
        if not _relays_at_once(exchange.request, response, last):
            sent = (ticket, succeed(response))
            self._run(exchange, self._attempts(exchange, candidates, sent=sent))
            return
        failure: Failure | None = None
        try:
            if exchange.timer is not None:
                exchange.timer.backend_headers(response.code)
            report(ticket, response.code, None)
            self._relay(exchange, member, response)
        except Exception:
            failure = Failure()
        ticket.release()  # (a no-op once reported)
        self._task_ended(failure, exchange)

    def _first_failed(
        self, failure: Failure, exchange: Exchange, candidates: list[Member], member: Member,
        ticket: Ticket, last: bool, again: forward.RetryArgs | None,
    ) -> None:
        """``_begin``'s send failed (or was cancelled): sent again when ``forward.send``
        would (``again``: its retry, not yet made), and ``_attempts`` handles the outcome."""
        sending = fail(failure) if again is None else forward.retry(failure, *again)
        self._run(exchange, self._attempts(exchange, candidates, sent=(ticket, sending)))

    def _run(self, exchange: Exchange, work: Coroutine[Any, Any, None]) -> None:
        """Drive ``exchange`` (already in ``in_flight``) with ``work`` (``_attempts``, which
        ends it) until it ends.

        No callback on the coroutine's Deferred and the request's ``on_lost`` hook (no
        ``notifyFinish`` Deferred): the plain path's Deferred layers kept to the one it needs.
        """
        exchange.request.on_lost = exchange.client_left
        task = Deferred.fromCoroutine(work)
        if not task.called:  # (else it ended already, and let go of the request's hook)
            exchange.task = task

    # -- the end of an exchange ----------------------------------------------------------------

    def _task_ended(self, failure: Failure | None, exchange: Exchange) -> None:
        """The exchange's coroutine ended (``failure``: how, if it raised)."""
        if failure is not None:
            self._unexpected(failure, exchange)
        relay = exchange.relay
        if relay is not None and relay.outcome is None:
            # The answer is being relayed: the exchange ends with the relay (its callback,
            # rather than the coroutine waiting for it and resumed just to return).
            relay.on_end = partial(self._relay_ended, exchange)
            return
        self._relay_ended(exchange)

    def _relay_ended(self, exchange: Exchange) -> None:
        """The exchange's coroutine and relay (if any) are over: a completed answer is
        reported to routing (``Router.served``), then the exchange ends."""
        member, exchange.relayed_from = exchange.relayed_from, None
        relay, usage = exchange.relay, exchange.usage
        if member is not None and relay is not None and relay.outcome == "complete" \
                and usage is not None:
            try:
                self.router.served(exchange.model, exchange.request.facts.prefix_hash, member,
                                   usage.evaluated_tokens, usage.cached_tokens)
            except Exception:
                self._unexpected(Failure(), exchange)
        self._exchange_done(exchange)

    def _unexpected(self, failure: Failure, exchange: Exchange) -> None:
        request = exchange.request
        if failure.check(CancelledError):
            if exchange.timed_out:
                request.send_error(errors.gateway_timeout())
            elif exchange.aborted:
                request.send_error(errors.backend_unavailable("stopping", 5))
            return None
        log.failure("Unexpected error while proxying", failure)
        request.send_error(errors.internal_error())
        return None

    def _exchange_done(self, exchange: Exchange) -> None:
        exchange.task = None  # break the exchange <-> coroutine cycle (less work for the GC)
        if exchange.request.on_lost == exchange.client_left:
            exchange.request.on_lost = None  # (and request -> exchange)
        if exchange.request.recorded:
            # The access log and metrics have read it: break request <-> exchange too, so the
            # request's objects are freed now rather than by a garbage collection.
            exchange.request.exchange = None
        self._cancel_deadline(exchange)
        if exchange.slot is not None:
            exchange.slot.release()
        self.in_flight.discard(exchange)
        if self.settings.log_requests:
            self._log_exchange(exchange)
        if not self.in_flight:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    def _log_exchange(self, exchange: Exchange) -> None:
        request, relay = exchange.request, exchange.relay
        log.info(
            "{method} {path} {status} {outcome} {bytes}B {duration_ms}ms key={key_id} "
            "id={request_id}",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1")[:200],
            status=request.code if request.startedWriting or request.finished else 499,
            outcome=exchange.outcome(),
            bytes=relay.bytes_sent if relay is not None else 0,
            duration_ms=round((self.clock.seconds() - exchange.started) * 1000, 1),
            key_id=request.key_id,
            request_id=request.request_id,
        )

    # -- shutdown ------------------------------------------------------------------------------

    def wait_idle(self) -> Deferred[None]:
        """A Deferred that fires when no proxied request is in flight."""
        d: Deferred[None] = Deferred()
        if not self.in_flight:
            d.callback(None)
        else:
            self._drained.append(d)
        return d

    def abort_in_flight(self) -> None:
        """Cut every exchange still running (the drain timeout passed)."""
        # Waiting ones first: a slot freed by cutting a running one must not start them.
        waiting_first = sorted(self.in_flight, key=lambda e: (e.parked is None, e.slot is not None))
        for exchange in waiting_first:
            if exchange.parked is not None:
                exchange.parked.abort()
            elif exchange.relay is not None:
                exchange.relay.abort("shutdown")
            elif exchange.task is not None:
                exchange.aborted = True
                exchange.task.cancel()


    def _answer_model_list(self, request: GatewayRequest) -> None:
        """/v1/models and /v1/models/{id} from the router: the models this key may use."""
        created = int(self.started_at)
        entries = self.router.models_for(request.key_id)
        if request.path.startswith(MODEL_PREFIX):
            wanted = unquote(request.path[len(MODEL_PREFIX):].decode("latin-1"))
            model = self.router.resolve_model(wanted, request.key_id) if wanted else None
            match = [e for e in entries if e.id == model]
            if not match:
                request.send_error(errors.model_not_found(wanted))
                return
            doc: dict[str, object] = match[0].as_json(created)
        else:
            doc = {"object": "list", "data": [e.as_json(created) for e in entries]}
        _answer_json(request, doc)

    def _route(self, exchange: Exchange) -> list[Member] | None:
        """The backends to try for ``exchange``, or None when it was answered already.

        Answers the model list (several backends) and the errors of the requested model.
        """
        request = exchange.request
        router = self.router
        if self.local_model_list and request.path.startswith(b"/v1/models"):
            self._answer_model_list(request)
            return None
        requested = request.facts.model
        model = router.resolve_model(requested, request.key_id)
        try:
            if model is None:
                raise UnknownModelError(requested)
            members, decision = router.route(model, request.key_id, request.facts.prefix_hash)
        except UnknownModelError:
            request.send_error(errors.model_not_found(requested or ""))
            return None
        except ModelNotAllowedError:
            request.send_error(errors.forbidden(f"This key may not use the model '{model}'"))
            return None
        exchange.model = model
        exchange.route = decision
        return members

    def _park(self, exchange: Exchange, candidates: list[Member]) -> bool:
        """Queue ``exchange`` parked (see ``ParkedExchange``) when it has to wait for a slot.

        Only the plain case: an inference request whose first backend is ready, with its
        breaker closed and every slot taken. Anything else runs the exchange at once.
        """
        request = exchange.request
        if request.method != b"POST" or not candidates:
            return False
        member = candidates[0]
        admission = member.load
        if not isinstance(admission, Admission) or admission.clock is None or not admission.full:
            return False
        if not member.status.ready or member.breaker.state is not BreakerState.CLOSED:
            return False
        parked = ParkedExchange(self, exchange, candidates, admission)
        try:
            admission.park(parked, exchange.started + self.settings.queue_timeout)
        except QueueFullError:
            return False  # the exchange answers it (or fails over to the next candidate)
        exchange.parked = parked
        request.on_lost = parked.client_gone
        if exchange.timer is not None:
            exchange.timer.queued()
        return True

    async def _attempts(
        self, exchange: Exchange, candidates: list[Member],
        first_failed: GatewayError | None = None,
        sent: tuple[Ticket, Deferred[IResponse]] | None = None,
    ) -> None:
        """Try ``candidates`` in order until one answers; the failure otherwise. Then the
        exchange ends (``_task_ended``, called here rather than by a callback on the
        coroutine's Deferred: one callback less per request).

        A parked exchange starts here holding its first candidate's slot (``exchange.slot``),
        or with ``first_failed``, how its wait for that slot ended. With ``sent``, the first
        candidate was admitted and sent to already (``_begin``): its ticket and that send.
        """
        failure: Failure | None = None
        try:
            request = exchange.request
            model = exchange.model
            # Waiting, for a ready backend and for a slot, shares one QUEUE_TIMEOUT budget.
            wait_until = exchange.started + self.settings.queue_timeout
            budget = min(len(candidates), self.router.max_attempts)
            attempts = 0
            for member in candidates:
                sending: Deferred[IResponse] | None = None
                if sent is not None:
                    ticket, sending = sent  # (_begin made this attempt's checks)
                    sent = None
                else:
                    if attempts >= budget or request.gone:
                        break
                    acquired = member.breaker.acquire()
                    if acquired is None:
                        # Its breaker just opened: not an attempt (and a slot held for it is
                        # not used).
                        if exchange.slot is not None:
                            exchange.slot.release()
                            exchange.slot = None
                        first_failed = None
                        continue
                    ticket = acquired
                attempts += 1
                last = attempts >= budget or member is candidates[-1]
                try:
                    if first_failed is not None:
                        error, first_failed = first_failed, None
                        if self._give_up(exchange, error, last):
                            return
                    elif await self._try_member(exchange, member, ticket, wait_until, last,
                                                sending):
                        return
                    if exchange.slot is not None:  # (not kept for the next candidate)
                        exchange.slot.release()
                        exchange.slot = None
                finally:
                    # (a no-op once settled; frees it when the client left meanwhile)
                    ticket.release()
                log.info("Failing over {model} from {backend} ({reason})", model=model,
                         backend=member.name, reason=exchange.failure.message
                         if exchange.failure else "breaker")
            if exchange.slot is not None:
                exchange.slot.release()
                exchange.slot = None
            if not request.gone:
                request.send_error(exchange.failure or self._none_available(model))
        except Exception:  # (CancelledError too: a timeout, a drain or a client leaving)
            failure = Failure()
        finally:
            self._task_ended(failure, exchange)

    def _none_available(self, model: str | None) -> GatewayError:
        """Why no backend of ``model`` could be tried: all their breakers open (for how long),
        the gateway stopping, or unavailable."""
        if self.draining:
            return errors.backend_unavailable("stopping", 5)
        router = self.router
        if model is not None:
            breakers = [router.members[spec.name].breaker
                        for spec in router.table.backends_for(model)
                        if spec.name in router.members]
            waits = [b.retry_in for b in breakers if b.state is BreakerState.OPEN]
            if breakers and len(waits) == len(breakers):
                return errors.breaker_open(
                    model, max(1, math.ceil(min(w or 0.0 for w in waits))))
        return errors.backend_unavailable("unavailable", 5)

    def _give_up(self, exchange: Exchange, error: GatewayError, last: bool) -> bool:
        """Answer ``error`` when this was the last candidate (True), else remember it (False)."""
        if last:
            exchange.request.send_error(error)
            return True
        exchange.failure = error
        return False

    def _try_member(
        self, exchange: Exchange, member: Member, ticket: Ticket, wait_until: float, last: bool,
        sending: Deferred[IResponse] | None = None,
    ) -> Coroutine[Any, Any, bool]:
        """One attempt on one backend, to await: True when the request got its answer from it.

        Admitted at once (a ready backend with a free slot, or the slot of a parked exchange,
        served), it is ``_forward`` itself: no coroutine between for an admission that has
        nothing to wait for. ``sending``: admitted and sent already (``_begin``).
        """
        if sending is None:
            if exchange.slot is None and not self._admit_now(exchange, member):
                return self._admit_and_forward(exchange, member, ticket, wait_until, last)
            if exchange.timer is not None:
                exchange.timer.admitted()
        return self._forward(exchange, member, ticket, wait_until, last, sending)

    async def _admit_and_forward(
        self, exchange: Exchange, member: Member, ticket: Ticket, wait_until: float, last: bool
    ) -> bool:
        """``_try_member`` for a request that may have to wait to be admitted."""
        refused = await self._admit(exchange, member, wait_until)
        if refused is not None:
            ticket.release()
            return self._give_up(exchange, refused, last)
        if exchange.timer is not None:
            exchange.timer.admitted()
        return await self._forward(exchange, member, ticket, wait_until, last)

    def _admit_now(self, exchange: Exchange, member: Member) -> bool:
        """True when ``member`` is ready and admits the request without a wait: one of its
        free slots is the request's now (``exchange.slot``), or it needs none (the model list).
        Else ``_admit`` waits (and answers why not)."""
        if not member.status.ready:
            return False
        return self._take_slot(exchange, member)

    def _take_slot(self, exchange: Exchange, member: Member) -> bool:
        """``_admit_now`` for a member known to be ready (``_begin`` just asked)."""
        request = exchange.request
        if request.method in (b"GET", b"HEAD") and request.path.startswith(b"/v1/models"):
            return True  # the model list uses no inference slot: it never waits behind one
        admission: Admission = member.load  # type: ignore[assignment]
        slot = admission.take()
        if slot is None:
            return False
        exchange.slot = slot
        return True

    async def _admit(
        self, exchange: Exchange, member: Member, wait_until: float
    ) -> GatewayError | None:
        """Wait for ``member`` to be ready and for one of its slots (``exchange.slot``).

        None when admitted; else why not (503 not ready, 429 queue full, 503 queue timeout).
        """
        request = exchange.request
        status = member.status
        timer = exchange.timer
        if not status.ready and timer is not None:
            timer.queued()
        if status.on_demand is not None and not status.ready and not self.draining:
            refused = await self._load(exchange, member)
            if refused is not None:
                return refused
            # The load had its own budget (LOAD_TIMEOUT); the slot wait gets QUEUE_TIMEOUT.
            wait_until = max(wait_until, self.clock.seconds() + self.settings.queue_timeout)
        elif not status.ready and not await self._member_ready(member, wait_until):
            return self._not_ready(status)
        if self._admit_now(exchange, member):  # (ready now) a free slot, or none needed
            return None
        admission = cast(Admission, member.load)
        try:
            waiting = admission.acquire(request.key_id or AUTH_DISABLED)
        except QueueFullError:
            return errors.queue_full()
        if not waiting.called and timer is not None:
            timer.queued()
        try:
            # Released when the exchange ends, or by _attempts when failing over.
            exchange.slot = await self._within(waiting, wait_until)
        except defer.TimeoutError:
            return errors.queue_timeout(status.retry_after(self.clock.seconds()))
        return None

    async def _load(self, exchange: Exchange, member: Member) -> GatewayError | None:
        """Wait for an on-demand backend to be started (or swapped in) and ready, up to
        LOAD_TIMEOUT from the request's arrival; None once ready, else the 503 to answer. A
        stream gets ``: loading`` comments meanwhile."""
        request = exchange.request
        began = self.clock.seconds()
        comments: LoadingComments | None = None
        if request.facts.stream and request.method == b"POST" and not request.startedWriting:
            comments = LoadingComments(request, member.name, self.clock)
            comments.start()
        try:
            return await self._wait_ready_or_fail(
                exchange, member, exchange.started + self.settings.load_timeout)
        finally:
            if comments is not None:
                comments.stop()
            if self.metrics is not None:
                self.metrics.models.load_waited(self.clock.seconds() - began)

    async def _wait_ready_or_fail(
        self, exchange: Exchange, member: Member, until: float
    ) -> GatewayError | None:
        status = member.status
        while True:
            try:
                await self._within(status.wait_ready(), until)
            except defer.TimeoutError:
                now = self.clock.seconds()
                return errors.model_loading(
                    member.spec.canonical_model, now - exchange.started, status.retry_after(now))
            except ModelLoadFailedError as e:
                retry_after = 5 if e.retry_at is None else max(
                    1, math.ceil(e.retry_at - self.clock.seconds()))
                return errors.model_load_failed(member.spec.canonical_model, e.reason,
                                                retry_after)
            if status.ready:
                return None

    async def _within(self, waiting: Deferred[_T], until: float) -> _T:
        """Await ``waiting``, cancelling it (defer.TimeoutError) when ``until`` passes."""
        if waiting.called:
            return await waiting  # a free slot: no timer to arm and cancel
        remaining = until - self.clock.seconds()
        if remaining <= 0:
            waiting.cancel()
            waiting.addErrback(lambda _: None)
            raise defer.TimeoutError()
        waiting.addTimeout(remaining, self.clock)
        return await waiting

    async def _member_ready(self, member: Member, until: float, admitted: bool = False) -> bool:
        """True once the backend is ready; a restarting one is waited for, up to ``until``.

        ``admitted``: the request holds one of the backend's slots already, so a backend being
        drained (an on-demand model swapped out or idle) still serves it.
        """
        status = member.status
        if status.ready or (admitted and status.draining and status.serving):
            return True
        if status.recovering and not self.draining:
            try:
                await self._within(status.wait_ready(), until)
                return True
            except defer.TimeoutError:
                pass
        return False

    def _not_ready(self, status: Backend) -> GatewayError:
        """The answer for a backend that cannot take the request now (502 or 503)."""
        retry_after = status.retry_after(self.clock.seconds())
        if self.draining:
            return errors.backend_unavailable("stopping", retry_after)
        if status.state is BackendState.UNREACHABLE:
            probe = status.last_probe
            return errors.backend_unreachable(probe.detail if probe else "", retry_after)
        return errors.backend_unavailable(status.state.value, retry_after)

    def _upstream_url(self, base_url: str, target: bytes) -> bytes:
        """``upstream_url_bytes``, remembered: a backend's requests go to a few targets."""
        key = (base_url, target)
        url = self._urls.get(key)
        if url is None:
            url = upstream_url_bytes(base_url, target)
            if len(self._urls) >= _URLS_KEPT:
                self._urls.clear()
            self._urls[key] = url
        return url

    def _request_body(self, exchange: Exchange, member: Member) -> bytes:
        """The body for ``member``: as the client sent it, or with the upstream's model name."""
        request = exchange.request
        body = exchange.body
        prefix = request.facts.prefix_hash
        if prefix is not None:  # (else pinned_slot says None)
            slot = self.router.pinned_slot(exchange.model, prefix, member)
            if slot is not None:
                body = with_slot(body, slot)  # [affinity] pin_slot
        if not self.local_model_list or exchange.model is None or request.facts.model is None:
            return body
        # Several backends: each gets the name it knows the model by (aliases resolved).
        upstream = member.spec.upstream_model(exchange.model)
        if upstream == request.facts.model:
            return body
        return with_model(body, upstream)

    def _backend_request(
        self, exchange: Exchange, member: Member
    ) -> tuple[bytes, bytes, bytes, str | None]:
        """What goes to ``member``: the method, URL and body, and the model id of a
        ``/v1/models/{id}`` request (the backend is asked for its whole list)."""
        request = exchange.request
        method, target, model_id = request.method, request.uri, None
        if _model_path(request.path):
            model_id = unquote(request.path[len(MODEL_PREFIX):].decode("latin-1"))
            method, target = b"GET", b"/v1/models"
        url = self._upstream_url(member.spec.base_url, target)
        return method, url, self._request_body(exchange, member), model_id

    @overload
    def _send(
        self, exchange: Exchange, member: Member, method: bytes, url: bytes, body: bytes,
        first: Literal[False] = False,
    ) -> Deferred[IResponse]: ...

    @overload
    def _send(
        self, exchange: Exchange, member: Member, method: bytes, url: bytes, body: bytes,
        first: Literal[True],
    ) -> tuple[Deferred[IResponse], forward.RetryArgs | None]: ...

    def _send(
        self, exchange: Exchange, member: Member, method: bytes, url: bytes, body: bytes,
        first: bool = False,
    ) -> Deferred[IResponse] | tuple[Deferred[IResponse], forward.RetryArgs | None]:
        """Send the request to ``member`` (the deadline armed first): the answer's Deferred
        (``forward.send``'s).

        ``first`` (``_begin``'s send): the first attempt's Deferred and the arguments of
        ``forward.retry``, which the caller runs on a failure (``forward.send_first``; no
        pass-through errback on the answer's way); None when the Deferred has the retry
        already (a first-byte timer covers the retry too, as with ``forward.send``)."""
        request = exchange.request
        if not exchange.deadline:
            self._arm_deadline(exchange)
        if exchange.timer is not None:
            exchange.timer.backend_sent()
        exchange.sent = True
        extra = request.client_identity.forwarding_headers()
        if request.facts.stream:
            # llama-server closes the connection after a streamed (chunked) response although
            # it answered "Keep-Alive": a request sent on it next would be lost, and one
            # written whole is never sent again. Say so first: neither client reuses it.
            extra.append(STREAM_CONNECTION)
        if first and exchange.deadline and (  # (not _first_byte_timer_needed, inline)
                self.clock.seconds() + self.settings.first_byte_timeout >= exchange.deadline_at):
            return forward.send_first(self.agent, url, member.status.api_key, method,
                                      request.requestHeaders, body, extra)
        sending = forward.send(
            self.agent, url, member.status.api_key, method, request.requestHeaders, body, extra)
        if self._first_byte_timer_needed(exchange):
            sending.addTimeout(self.settings.first_byte_timeout, self.clock)
        if first:
            return sending, None
        return sending

    async def _forward(
        self, exchange: Exchange, member: Member, ticket: Ticket, wait_until: float, last: bool,
        sending: Deferred[IResponse] | None = None,
    ) -> bool:
        """Send to ``member`` and relay its answer; False to fail over to the next backend.

        ``sending``: the first send, made already (``_begin``).
        """
        request = exchange.request
        status = member.status
        method, url, body, model_id = self._backend_request(exchange, member)
        local = member.spec.kind == "local"
        resend_any = bool(getattr(member.spec, "retry_non_idempotent", False))
        for attempt in (1, 2):
            if sending is None:
                # (status.ready inline: a ready backend needs no coroutine to say so)
                if not status.ready and not await self._member_ready(member, wait_until,
                                                                     admitted=True):
                    ticket.release()
                    return self._give_up(exchange, self._not_ready(status), last)
                sending = self._send(exchange, member, method, url, body)
            try:
                response = await sending
                break
            except CancelledError:
                ticket.release()
                raise
            except defer.TimeoutError as e:
                log.warn("Backend {backend} sent no response within {timeout}s",
                         backend=member.name, timeout=self.settings.first_byte_timeout)
                report(ticket, None, e)
                self._cancel_deadline(exchange)
                # The backend may still be working on it: only a repeatable request moves on.
                return self._give_up(exchange, errors.gateway_timeout(),
                                     last or not forward.may_resend(method, e, resend_any))
            except Exception as e:
                # Accounted only if the backend may have run it (a request that certainly did
                # not reach it costs nothing: the rate-limit charge is given back).
                exchange.sent = not forward.not_processed(e)
                reason = failure_reason(None, e)
                log.warn("Backend {backend} request failed ({reason}): {error}",
                         backend=member.name, reason=reason, error=_describe(e))
                if reason in UNREACHABLE_REASONS:
                    # Not one request's bad luck: the backend is down until a probe says not.
                    status.send_failed(describe_reason(reason))
                # Sent again (to this backend or the next) only if it certainly did not run,
                # or it is idempotent, or the backend said repeats are harmless; a request
                # that reached a local child is sent again only if that child crashed.
                resend = forward.may_resend(method, e, resend_any) or (
                    local and attempt == 1 and await self._backend_went_down(status)
                )
                if resend and not last and is_retryable(None, e, 0):
                    report(ticket, None, e)
                    self._cancel_deadline(exchange)
                    exchange.failure = errors.bad_gateway()
                    return False
                if resend and attempt == 1 and await self._backend_went_down(status):
                    # The backend crashed under us: wait for the restart (that wait belongs to
                    # the queue budget, not to REQUEST_TIMEOUT), then send again.
                    self._cancel_deadline(exchange)
                    sending = None
                    continue
                report(ticket, None, e)
                request.send_error(
                    errors.bad_gateway() if status.ready else self._not_ready(status))
                return True
        if exchange.timer is not None:
            exchange.timer.backend_headers(response.code)
        if model_id is None and _relays_at_once(request, response, last):
            report(ticket, response.code, None)
            self._relay(exchange, member, response)
            return True
        if not last and (response.code >= 500 or response.code == 429) and not request.gone:
            report(ticket, response.code, None)
            _discard(response)
            self._cancel_deadline(exchange)
            exchange.failure = errors.bad_gateway(f"Backend answered {response.code}")
            return False
        report(ticket, response.code, None)
        if request.gone:
            _discard(response)
            return True
        if model_id is not None:
            await self._answer_model(request, response, model_id)
            return True
        if response.code >= 400 and request.method != b"HEAD" and not _json_or_stream(response):
            await _answer_plain_error(request, response)
            return True
        # (what is left: a stream whose head the gateway sent while the model loaded)
        await self._relay_after_loading(exchange, member, response)
        return True

    async def _answer_model(
        self, request: GatewayRequest, response: IResponse, model_id: str
    ) -> None:
        """GET /v1/models/{id}: the matching entry of the backend's model list, or 404."""
        if response.code != 200:
            await self._relay_buffered(request, response)
            return
        raw = await read_body_bounded(response, _MODEL_LIST_LIMIT)
        try:
            entries = json.loads(raw)["data"]
            entry = next(
                m for m in entries if model_id == m.get("id") or model_id in m.get("aliases", ())
            )
        except StopIteration:
            request.send_error(errors.model_not_found(model_id))
            return
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warn("Backend /v1/models answer is not a model list")
            request.send_error(errors.bad_gateway("Backend sent an invalid model list"))
            return
        _answer_json(request, entry)

    async def _relay_buffered(self, request: GatewayRequest, response: IResponse) -> None:
        body = await read_body_bounded(response, _MODEL_LIST_LIMIT)
        request.setResponseCode(response.code, response.phrase)
        for name, values in forward.filter_response_headers(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        answer_whole(request, body)

    def _relay(self, exchange: Exchange, member: Member, response: IResponse) -> None:
        """Start relaying ``member``'s ``response`` (the exchange ends with the relay, see
        ``_task_ended``)."""
        request = exchange.request
        is_stream = _event_stream(response)
        request.setResponseCode(response.code, response.phrase)
        # The backend's end-to-end headers, then the gateway's own (each set, as setHeader does:
        # a name already there keeps its place), in one pass.
        fields = forward.filter_response_headers(response.headers)
        if response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
            fields.append((b"Content-Length", [b"%d" % (response.length,)]))
        if is_stream:
            # (new lists: the client's headers keep them, and may be added to)
            fields += ((b"X-Accel-Buffering", [b"no"]), (b"Cache-Control", [b"no-cache"]))
        if isinstance(self.agent, BackendClient):
            # Fast path: stored as they are (they are as a Headers holds them already).
            set_fields(request.responseHeaders, fields)
        else:
            for name, values in fields:
                request.responseHeaders.setRawHeaders(name, values)
        usage = exchange.usage
        if usage is not None and usage.streaming and not is_stream:
            # A stream was asked for but this is a whole body (an error, typically).
            usage = exchange.usage = UsageCollector(streaming=False)
        self._start_relay(exchange, member, response, usage)

    def _start_relay(
        self, exchange: Exchange, member: Member, response: IResponse,
        usage: UsageCollector | None,
    ) -> None:
        """Relay ``response``'s body to the client, counting ``usage``."""
        relay = StreamRelay(exchange.request, self.clock, self.settings.stream_idle_timeout,
                            usage, watched=exchange.deadline)
        exchange.relay = relay
        if response.code < 400 and usage is not None:
            exchange.relayed_from = member  # routing hears of it if the relay completes
        response.deliverBody(relay)

    async def _relay_after_loading(
        self, exchange: Exchange, member: Member, response: IResponse
    ) -> None:
        """The answer to a stream whose head the gateway sent while the model loaded: the
        backend's events follow the ``: loading`` comments (relayed as ``_relay`` does); a whole
        body (an error, typically) becomes one ``data:`` event."""
        request = exchange.request
        if not _event_stream(response):
            body = await read_body_bounded(response, _MODEL_LIST_LIMIT)
            if not request.gone:
                request.write(b"data: " + b" ".join(body.split()) + b"\n\n")
                request.finish()
            return
        self._start_relay(exchange, member, response, exchange.usage)

    async def _backend_went_down(self, status: Backend) -> bool:
        """After a failed send: is the backend restarting (so the request may wait and retry)?

        A crash and the connection failures it causes reach the gateway in no fixed order, so a
        backend that still looks ready gets a moment for its supervisor to notice.
        """
        if status.ready and not self.draining:
            await task.deferLater(self.clock, _CRASH_NOTICE_DELAY, lambda: None)
        return status.recovering and not self.draining

    # -- ends of an exchange -------------------------------------------------------------------

    def _arm_deadline(self, exchange: Exchange) -> None:
        """Arm the exchange's one timer: REQUEST_TIMEOUT, and the relay's idle timeout.

        One timer per exchange instead of one for the deadline and one for the relay: it is
        armed for the sooner of the two timeouts from now (the relay, once there, starts later
        than now, so it can never be due sooner) and, when it fires before the deadline, asks
        the relay (``StreamRelay.watch``), then waits again for whichever comes next.

        The exchanges' timers share one reactor timer (``_timers_due``): an exchange's timer is
        its place in ``_timed`` and its time (``Exchange.due``), and each fires at that time,
        in the order a timer of its own would (sooner first; at the same time, the one armed
        first). The reactor timer is cancelled once no exchange's timer is armed.
        """
        settings = self.settings
        now = self.clock.seconds()
        exchange.deadline_at = now + settings.request_timeout
        wait = settings.request_timeout
        if 0 < settings.stream_idle_timeout < wait:
            wait = settings.stream_idle_timeout
        # (_schedule, inline: this is on every request's path)
        exchange.deadline = True
        exchange.due = due = now + wait
        self._timed[exchange] = None
        if self._timers_call is None:
            self._timers_at = due
            self._timers_call = self.clock.callLater(wait, self._timers_due)
        elif due < self._timers_at:
            self._schedule(exchange, now, due)

    def _schedule(self, exchange: Exchange, now: float, due: float) -> None:
        """Arm ``exchange``'s timer for ``due`` (clock seconds; ``now``: the clock's time)."""
        exchange.deadline = True
        exchange.due = due
        self._timed[exchange] = None
        call = self._timers_call
        if call is None:
            self._timers_at = due
            self._timers_call = self.clock.callLater(due - now, self._timers_due)
        elif due < self._timers_at:
            call.cancel()
            self._timers_at = due
            self._timers_call = self.clock.callLater(due - now, self._timers_due)

    def _timers_due(self) -> None:
        """The reactor timer: fire the timers due by its time (those armed for the soonest
        time), then wait for the next soonest."""
        self._timers_call = None
        at = self._timers_at
        timed = self._timed
        due = [exchange for exchange in timed if exchange.due <= at]
        due.sort(key=_due_time)  # (stable: at the same time, the one armed first)
        for exchange in due:
            if exchange.deadline and exchange.due <= at:  # (an earlier one may have ended it)
                del timed[exchange]
                exchange.deadline = False
                try:
                    self._timer_fired(exchange)
                except Exception:
                    log.failure("Unexpected error in an exchange's timer", Failure())
        if not timed:
            return
        soonest = min(exchange.due for exchange in timed)
        call = self._timers_call
        if call is not None:  # (armed by an exchange's timer just now)
            if self._timers_at <= soonest:
                return
            call.cancel()
        self._timers_at = soonest
        self._timers_call = self.clock.callLater(
            max(0.0, soonest - self.clock.seconds()), self._timers_due)

    def _timer_fired(self, exchange: Exchange) -> None:
        now = self.clock.seconds()
        left = exchange.deadline_at - now
        if left <= 0.001:
            self._deadline_passed(exchange)
            return
        relay = exchange.relay
        if relay is not None:
            idle_left = relay.watch()
            if relay.outcome is not None:
                return  # it was idle: aborted (or it ended and the exchange ends with it)
            if idle_left is not None and idle_left < left:
                left = idle_left
        elif 0 < self.settings.stream_idle_timeout < left:
            left = self.settings.stream_idle_timeout  # (no relay yet: it starts later)
        self._schedule(exchange, now, now + left)

    def _deadline_passed(self, exchange: Exchange) -> None:
        exchange.timed_out = True
        log.warn(
            "Request exceeded {timeout}s: {method} {path}",
            timeout=self.settings.request_timeout,
            method=exchange.request.method.decode("latin-1"),
            path=exchange.request.path.decode("latin-1")[:200],
        )
        if exchange.relay is not None:
            exchange.relay.abort("timeout")
        elif exchange.task is not None:
            exchange.task.cancel()

    def _first_byte_timer_needed(self, exchange: Exchange) -> bool:
        """Whether a send needs its own FIRST_BYTE_TIMEOUT timer.

        Not when the request's deadline (REQUEST_TIMEOUT, armed before the send) is due no
        later: it fires first (a timer armed earlier for the same time runs first) and cancels
        the send, so the first-byte timer could only be armed and cancelled. With the defaults
        (both 300 s) that is every send: one timer and two callbacks less per request.
        """
        if not exchange.deadline:
            return True
        return self.clock.seconds() + self.settings.first_byte_timeout < exchange.deadline_at

    def _cancel_deadline(self, exchange: Exchange) -> None:
        if exchange.deadline:
            exchange.deadline = False
            timed = self._timed
            del timed[exchange]
            if not timed:
                call = self._timers_call
                if call is not None:
                    self._timers_call = None
                    call.cancel()


def _model_path(path: bytes) -> bool:
    """``path.startswith(MODEL_PREFIX)`` (a /v1/models/{id} request), most paths told by one
    byte first (``startswith`` parses its arguments the slow way on Python 3.11)."""
    return len(path) > 10 and path[10] == 47 and path.startswith(MODEL_PREFIX)  # (47: "/")


def _due_time(exchange: Exchange) -> float:
    return exchange.due


def answer_whole(request: GatewayRequest, body: bytes) -> None:
    """Finish ``request`` with the whole ``body`` (its length set; no body for HEAD)."""
    request.setHeader(b"Content-Length", str(len(body)).encode())
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def _answer_json(request: GatewayRequest, doc: object) -> None:
    """Finish ``request`` with ``doc`` as its JSON body."""
    request.setHeader(b"Content-Type", _JSON)
    answer_whole(request, json.dumps(doc).encode())


#: Most of a backend's non-JSON error body read to put in the JSON error's message.
_PLAIN_ERROR_LIMIT = 64 * 1024


def _event_stream(response: IResponse) -> bool:
    """True when the body is an event stream."""
    return response.headers.getRawHeaders(b"content-type", [b""])[0].startswith(
        b"text/event-stream")


def _relays_at_once(request: GatewayRequest, response: IResponse, last: bool) -> bool:
    """True for the usual answer, relayed as it comes: the client is still there, the status
    is no reason to fail over (or no candidate is left), and it is no plain-text error and no
    stream whose head went out while the model loaded. (``_forward`` answers the others.)"""
    code = response.code
    return (
        (last or (code < 500 and code != 429))
        and not request.gone
        and (code < 400 or request.method == b"HEAD" or _json_or_stream(response))
        and not request.loading_stream
    )


def _json_or_stream(response: IResponse) -> bool:
    """True when the body is JSON or an event stream (relayed as it is)."""
    content_type = response.headers.getRawHeaders(b"content-type", [b""])[0].lower()
    return b"json" in content_type or content_type.startswith(b"text/event-stream")


async def _answer_plain_error(request: GatewayRequest, response: IResponse) -> None:
    """A backend error whose body is not JSON (llama-server's bare "413 Payload Too Large"
    text, an HTML page from a proxy): an OpenAI-shaped JSON error with the backend's status."""
    try:
        raw = await read_body_bounded(response, _PLAIN_ERROR_LIMIT)
    except Exception:
        raw = b""
    text = " ".join(raw.decode("utf-8", "replace").split())[:500]
    phrase = errors.reason_phrase(response.code).decode("ascii")
    message = f"Backend answered {response.code} {phrase}" + (f": {text}" if text else "")
    kind = "server_error" if response.code >= 500 else "invalid_request_error"
    for name, values in forward.filter_response_headers(response.headers):
        request.responseHeaders.setRawHeaders(name, values)
    request.send_error(GatewayError(response.code, message, kind, "backend_error"))


def _discard(response: IResponse) -> None:

    class _Drop(Protocol):
        def connectionMade(self) -> None:
            self.transport.stopProducing()  # type: ignore[union-attr]

    response.deliverBody(_Drop())


def _describe(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        return f"{type(e).__name__}: " + "; ".join(r.getErrorMessage() for r in reasons)
    return f"{type(e).__name__}: {e}"
