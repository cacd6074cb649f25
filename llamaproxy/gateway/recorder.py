"""What happens when a request ends: its access-log line, its metrics, its tokens in the ledger.

``GatewayRequest`` calls ``RequestRecorder.request_done`` exactly once per request, however it
ended (answered, refused before its body, cut by a timeout, abandoned by its client), so every
status the gateway produced, 401, 429 and 503 included, is logged and counted with its real value.
Requests refused before they were even complete (a 414, a 431, a 408) have no Request object:
the channel reports them with ``refused``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from llamaproxy.auth.access import TokenLimits
from llamaproxy.auth.keys import AUTH_DISABLED
from llamaproxy.gateway.errors import GatewayError
from llamaproxy.gateway.request import GatewayRequest
from llamaproxy.gateway.tokens import estimate_prompt_tokens
from llamaproxy.observability.access_log import AccessEntry, AccessFields, AccessLog
from llamaproxy.observability.metrics import GatewayMetrics, rejection_reason
from llamaproxy.observability.rejection_log import RejectionLog
from llamaproxy.observability.usage import UsageLedger

#: Status recorded for a request whose client left before any response byte (nginx's 499).
CLIENT_CLOSED = 499

#: Called with each finished request's access entry (built once, shared with the access log)
#: and its request, e.g. the operator page's activity ring (llamaproxy.admin.activity).
RequestObserver = Callable[[AccessEntry, GatewayRequest], None]


class RequestRecorder:
    """Fans one finished request out to the access log, the metrics and the usage ledger."""

    def __init__(
        self,
        clock: IReactorTime,
        access_log: AccessLog | None = None,
        metrics: GatewayMetrics | None = None,
        ledger: UsageLedger | None = None,
        token_limits: TokenLimits | None = None,
        rejection_log: RejectionLog | None = None,
    ) -> None:
        self.clock = clock
        #: The gateway log's rate-limited account of rejections (never a line per request).
        self.rejection_log = rejection_log or RejectionLog(clock)
        self.access_log = access_log
        self.metrics = metrics
        self.ledger = ledger
        self.token_limits = token_limits
        #: Extra consumers of each request's access entry (empty unless the operator page is on).
        self.observers: list[RequestObserver] = []
        #: Usage counters shared by replicas (STATE_URL: ``state.usage_counters.SharedUsage``).
        self.shared_usage: Any = None

    def request_done(self, request: GatewayRequest) -> None:
        """Record one request that ended, whichever way."""
        now = self.clock.seconds()
        exchange = request.exchange
        status = request.code
        outcome = "answered"
        if exchange is not None:
            outcome = exchange.outcome()
        client_left = request.gone and not request.finished
        if client_left and not request.startedWriting and request.error is None:
            status, outcome = CLIENT_CLOSED, "client_gone"  # left before anything was sent
        # The model the router resolved (never the raw string a client sent: that would make
        # a ledger row and a metrics label per made-up name).
        model = exchange.model if exchange is not None else None
        charge = _charge(request, exchange)
        prompt, completion, estimated = charge if charge is not None else (None, None, False)
        key_id = request.key_id
        access_log = self.access_log
        observers = self.observers
        if access_log is not None or observers:
            started = request.started_at
            first_byte_at = request.first_byte_at
            # AccessEntry's fields, in order: the entry object is built only for observers.
            fields: AccessFields = (
                started,
                request.request_id,
                key_id,
                request.method.decode("latin-1"),
                request.path.decode("latin-1"),
                status,
                (now - started) * 1000,  # duration_ms
                None if first_byte_at is None else (first_byte_at - started) * 1000,  # ttfb_ms
                request.sentLength,
                model,
                prompt,
                completion,
                outcome,
                estimated,
                request.client_identity.address,
                exchange.route if exchange is not None else None,
            )
            if observers:
                entry = AccessEntry(*fields)
                if access_log is not None:
                    access_log.record(entry)
                for observer in observers:
                    observer(entry, request)
            elif access_log is not None:
                access_log.record_fields(fields)
        if request.error is not None:
            reason = rejection_reason(request.error)
            if reason is not None:
                self.rejection_log.rejected(request.error.status, reason)
        if self.metrics is not None:
            timer = exchange.timer if exchange is not None else None
            if timer is not None:
                if request.error is not None:
                    timer.rejected(rejection_reason(request.error) or "other")
                if prompt is not None or completion is not None:
                    timer.tokens(model, prompt or 0, completion or 0)
                bytes_sent = exchange.relay.bytes_sent if exchange.relay is not None else 0
                timer.finished(status, model, bytes_sent, outcome)
            elif request.error is not None:
                reason = rejection_reason(request.error) or "other"
                self.metrics.rejected(reason, key_id if key_id != AUTH_DISABLED else None)
        if key_id is not None and charge is not None:
            if self.ledger is not None:
                self.ledger.record(key_id, model, prompt, completion, partial=estimated)
            if self.shared_usage is not None:
                self.shared_usage.record(key_id, model, prompt, completion, partial=estimated)
            if self.token_limits is not None:
                self.token_limits.spend(key_id, (prompt or 0) + (completion or 0))

    def refused(self, error: GatewayError, peer: str | None = None) -> None:
        """A request refused before it was complete (no Request exists): 408, 414, 431, 400;
        ``peer`` is the connection's peer address (no forwarding header was read yet)."""
        now = self.clock.seconds()
        self.rejection_log.rejected(error.status, rejection_reason(error) or "other")
        if self.access_log is not None:
            # Answered the moment it was refused: its first byte went out at once.
            self.access_log.record(AccessEntry(
                ts=now, request_id="-", key_id=None, method="-", path="-", status=error.status,
                duration_ms=0.0, ttfb_ms=0.0, bytes=len(error.body()), outcome="rejected",
                client=peer,
            ))
        if self.metrics is not None:
            self.metrics.rejected(rejection_reason(error) or "other")


def _charge(request: GatewayRequest, exchange: Any) -> tuple[int | None, int | None, bool] | None:
    """(prompt, completion, estimated) tokens to account for a request that reached a backend
    on a route that uses tokens; None for any other request (it costs no tokens).

    The response's own counts when it had them; otherwise, when the backend accepted the request
    (no answer yet, or a status below 400) and the response did not end cleanly or said nothing,
    the estimate of ``llamaproxy.gateway.tokens``: every event relayed, and the prompt from the
    body's size. A backend error without counts is a request with 0 tokens.
    """
    if exchange is None or not exchange.sent or exchange.usage is None:
        return None
    usage = exchange.usage
    if usage.reported:
        return usage.prompt_tokens, usage.completion_tokens, False
    if exchange.relay is not None and request.code >= 400:
        return None, None, False
    return estimate_prompt_tokens(exchange.body), usage.events, True
