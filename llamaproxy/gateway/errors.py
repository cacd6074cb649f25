"""OpenAI-shaped error responses, one function per situation the gateway answers itself.

Bodies keep the older gateway's messages, types and codes where it had them, so clients written
against it see the same errors. Every error is JSON, ``Cache-Control: no-store``, and sniff-proof.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus

#: RFC 9110's reason phrases where Python's table still has the older RFC 7231/2616 wording.
_RFC_9110_PHRASES = {
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}

#: The reason phrase of every status code the gateway may send, as status-line bytes.
REASON_PHRASES: dict[int, bytes] = {
    status.value: _RFC_9110_PHRASES.get(status.value, status.phrase).encode("ascii")
    for status in HTTPStatus
}


def reason_phrase(status: int) -> bytes:
    """The RFC 9110 reason phrase for ``status`` (a bare "Status" for a code nobody named)."""
    return REASON_PHRASES.get(status, b"Status")


@dataclass(frozen=True)
class GatewayError:
    """A complete error response: status, OpenAI error body and any extra headers."""

    status: int
    message: str
    type: str
    code: str | int
    param: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        """The JSON body: {"error": {"message", "type", "code"[, "param"]}}."""
        error: dict[str, object] = {"message": self.message, "type": self.type, "code": self.code}
        if self.param is not None:
            error["param"] = self.param
        return json.dumps({"error": error}).encode("utf-8")


def bad_request(message: str, code: str = "bad_request", param: str | None = None) -> GatewayError:
    """400: the request is malformed."""
    return GatewayError(400, message, "invalid_request_error", code, param)


def unauthorized(message: str) -> GatewayError:
    """401 with the older gateway's body: param "authorization", code "invalid_api_key"."""
    return GatewayError(401, message, "invalid_request_error", "invalid_api_key", "authorization")


def forbidden(message: str) -> GatewayError:
    """403: a valid key that may not do this (e.g. POST /reload by a non-admin key)."""
    return GatewayError(403, message, "invalid_request_error", "forbidden")


def rate_limited(headers: tuple[tuple[str, str], ...]) -> GatewayError:
    """429 with the older gateway's body, a computed Retry-After and the X-RateLimit-* headers."""
    return GatewayError(
        429,
        "Rate limit exceeded. Please slow down your requests.",
        "rate_limit_error",
        "rate_limit_exceeded",
        headers=headers,
    )


def token_rate_limited(retry_after: int) -> GatewayError:
    """429 when a key used up its tokens-per-minute limit."""
    return GatewayError(
        429,
        "Token rate limit exceeded. Please slow down your requests.",
        "rate_limit_error",
        "token_rate_limit_exceeded",
        headers=(("Retry-After", str(retry_after)),),
    )


def reload_failed(reason: str) -> GatewayError:
    """500 when POST /reload could not read the key file (the previous keys stay in force)."""
    return GatewayError(
        500, f"Failed to reload API keys: {reason}", "server_error", "reload_failed"
    )


def not_found(path: str) -> GatewayError:
    """404 for a path the gateway does not serve."""
    return GatewayError(
        404, f"Unknown path: {path}", "invalid_request_error", "not_found"
    )


def model_not_found(model_id: str) -> GatewayError:
    """404 for /v1/models/{id} when the backend has no such model (OpenAI's body)."""
    return GatewayError(
        404,
        f"The model '{model_id[:200]}' does not exist",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def method_not_allowed(method: str, allowed: tuple[str, ...]) -> GatewayError:
    """405 with an Allow header listing what the path accepts."""
    return GatewayError(
        405,
        f"Method {method} is not allowed here; use {', '.join(allowed)}",
        "invalid_request_error",
        "method_not_allowed",
        headers=(("Allow", ", ".join(allowed)),),
    )


def unsupported_transfer_encoding(coding: str) -> GatewayError:
    """501 for a transfer coding other than chunked (RFC 9112 6.1)."""
    shown = coding[:100]
    return GatewayError(
        501,
        f"Unsupported Transfer-Encoding {shown!r}: only a single 'chunked' is accepted",
        "invalid_request_error",
        "unsupported_transfer_encoding",
    )


def uri_too_long(limit: int) -> GatewayError:
    """414 for a request line over MAX_REQUEST_LINE_SIZE (older gateway body)."""
    return GatewayError(
        414, f"Request line too long (max {limit} bytes)", "invalid_request_error", "uri_too_long"
    )


def headers_too_large() -> GatewayError:
    """431 for a header line over MAX_HEADER_LINE_SIZE or more than MAX_HEADERS headers."""
    return GatewayError(
        431,
        "Request headers too large or too many headers",
        "invalid_request_error",
        "header_fields_too_large",
    )


def request_timeout(seconds: float) -> GatewayError:
    """408 when a client did not send its whole request in time (slow-loris protection)."""
    return GatewayError(
        408,
        f"Request not received within {seconds:g} seconds",
        "invalid_request_error",
        "request_timeout",
    )


def queue_timeout(retry_after: int) -> GatewayError:
    """503 when a request waited QUEUE_TIMEOUT for a slot or a ready backend."""
    return GatewayError(
        503,
        "Timed out waiting for a free slot; try again later",
        "server_error",
        "queue_timeout",
        headers=(("Retry-After", str(retry_after)),),
    )


def model_loading(model: str, waited: float, retry_after: int) -> GatewayError:
    """503 when a request waited LOAD_TIMEOUT for an on-demand model to start."""
    return GatewayError(
        503,
        f"The model '{model}' is loading (waited {waited:.0f} s); try again later",
        "server_error",
        "model_loading",
        headers=(("Retry-After", str(retry_after)),),
    )


def model_load_failed(model: str, reason: str, retry_after: int) -> GatewayError:
    """503 when an on-demand model's child failed to load it (the reason from its log)."""
    return GatewayError(
        503,
        f"The model '{model}' failed to load: {reason}",
        "server_error",
        "model_load_failed",
        headers=(("Retry-After", str(retry_after)),),
    )


def payload_too_large(limit: int) -> GatewayError:
    """413 before the body is read (older gateway message)."""
    return GatewayError(
        413,
        f"Request body too large (max {limit} bytes)",
        "invalid_request_error",
        "payload_too_large",
    )


def bad_gateway(detail: str = "Backend unavailable") -> GatewayError:
    """502: the backend could not be reached or broke before answering."""
    return GatewayError(502, detail, "server_error", "bad_gateway")


def backend_unreachable(detail: str, retry_after: int) -> GatewayError:
    """502 at once: an external backend does not answer (it is not expected back by itself)."""
    return GatewayError(
        502,
        f"Could not reach the backend: {detail or 'it does not answer'}",
        "server_error",
        "backend_unreachable",
        headers=(("Retry-After", str(retry_after)),),
    )


def backend_unavailable(state: str, retry_after: int) -> GatewayError:
    """503 while the backend loads its model, restarts, or is stopping."""
    messages = {
        "loading": "The model is loading; retry shortly",
        "starting": "The backend is starting; retry shortly",
        "backoff": "The backend is restarting after a failure; retry shortly",
        "stopping": "The backend is shutting down",
        "stopped": "The backend is not running",
        "ready": "The backend is not answering its health checks",
    }
    return GatewayError(
        503,
        messages.get(state, "The backend is unavailable"),
        "server_error",
        "backend_unavailable",
        headers=(("Retry-After", str(retry_after)),),
    )


def breaker_open(model: str, retry_after: int) -> GatewayError:
    """503 at once when every backend of ``model`` has its circuit breaker open (they failed
    repeatedly): no request is sent or held until a breaker lets a trial through."""
    return GatewayError(
        503,
        f"Every backend for the model '{model[:200]}' is failing (circuit breaker open); "
        f"retry in {retry_after} s",
        "server_error",
        "backend_unavailable",
        headers=(("Retry-After", str(retry_after)),),
    )


def queue_full(retry_after: int = 5, message: str = "Server busy, try again later") -> GatewayError:
    """503 when the wait queue is full (older gateway body and Retry-After: 5)."""
    return GatewayError(
        503,
        message,
        "server_error",
        "queue_full",
        headers=(("Retry-After", str(retry_after)),),
    )


def body_budget_full(per_key: bool) -> GatewayError:
    """503 ``queue_full`` when the request bodies held (in all, or by this key) are at their
    bound (MAX_QUEUE_BYTES, MAX_QUEUE_BYTES_PER_KEY)."""
    whose = "this key's requests" if per_key else "requests"
    return queue_full(5, f"Server busy: the request bodies {whose} hold are at their limit, "
                         "try again later")


def gateway_timeout() -> GatewayError:
    """504 when the backend did not answer in time (older gateway body: integer code)."""
    return GatewayError(504, "Request timed out", "timeout_error", 504)


def internal_error() -> GatewayError:
    """500 for a bug in the gateway: no details leak to the client."""
    return GatewayError(500, "Internal gateway error", "server_error", "internal_error")
