"""The sizes and times a client's request may take (the HTTP edge's limits)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestLimits:
    """Sizes a request may have (bytes, line terminators included) and how long it may take."""

    max_request_line: int = 8192
    max_header_line: int = 8192
    max_headers: int = 64
    max_body: int = 10 * 1024 * 1024
    client_timeout: float = 30.0
    #: Deepest nesting of ``[`` and ``{`` a JSON body may have.
    max_json_depth: int = 64
    #: Most keys and values a JSON body may hold (see ``gateway.json_shape``).
    max_json_values: int = 200_000
