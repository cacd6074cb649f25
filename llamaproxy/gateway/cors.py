"""CORS policy as pure functions: which origins may read our responses, and the headers that say so.

``CORS_ORIGINS`` is a comma-separated allowlist (entries trimmed, trailing ``/`` stripped) or ``*``
anywhere in it for wildcard mode; empty disables CORS (no headers, preflight still 204). An origin
matches exactly (no suffix tricks) and is ignored when longer than 2048 characters. Allowlist
responses carry ``Vary: Origin``. The backend's own ``Access-Control-*`` headers never reach a
client (llama-server echoes any Origin); these are the only CORS headers the gateway sends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MAX_ORIGIN_LENGTH = 2048

ALLOW_METHODS = b"GET, POST, OPTIONS"
#: Sent when a preflight does not list the headers it wants.
DEFAULT_ALLOW_HEADERS = b"Authorization, Content-Type, X-Api-Key, X-Request-ID"
#: Response headers a browser script may read (rate limits, retries, request ids).
EXPOSE_HEADERS = (
    b"Retry-After, X-Request-ID, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, "
    b"X-Gateway-Overhead-Ms"
)
MAX_AGE = b"86400"

_HEADER_LIST = re.compile(rb"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class CorsPolicy:
    """Allowed origins (or wildcard) for browser clients."""

    origins: frozenset[bytes] = frozenset()
    wildcard: bool = False

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> CorsPolicy:
        """Build from CORS_ORIGINS entries: trimmed, trailing '/' stripped, '*' = wildcard."""
        cleaned = [e.strip().rstrip("/") for e in entries if e.strip()]
        if "*" in cleaned:
            return cls(wildcard=True)
        return cls(origins=frozenset(e.encode("latin-1") for e in cleaned))

    @property
    def enabled(self) -> bool:
        """False when CORS_ORIGINS is empty: no CORS headers at all."""
        return self.wildcard or bool(self.origins)

    def warnings(self) -> list[str]:
        """Startup warnings: allowlist entries that cannot match a browser's Origin."""
        return [
            f"CORS_ORIGINS entry {o.decode('latin-1')!r} has no http:// or https:// scheme; "
            "browsers send origins with one, so it never matches"
            for o in sorted(self.origins)
            if not o.startswith((b"http://", b"https://"))
        ]

    def allowed_origin(self, origin: bytes | None) -> bytes | None:
        """The Access-Control-Allow-Origin value for this request's Origin, or None."""
        if self.wildcard:
            return b"*"
        if origin is None or len(origin) > MAX_ORIGIN_LENGTH or not self.origins:
            return None
        return origin if origin in self.origins else None

    def response_headers(self, origin: bytes | None) -> Headers:
        """CORS headers for an ordinary (non-preflight) response."""
        allowed = self.allowed_origin(origin)
        if allowed is None:
            return []
        headers = [
            (b"Access-Control-Allow-Origin", allowed),
            (b"Access-Control-Expose-Headers", EXPOSE_HEADERS),
        ]
        if not self.wildcard:
            headers.append((b"Vary", b"Origin"))
        return headers

    def preflight_headers(self, origin: bytes | None, requested: bytes | None) -> Headers:
        """CORS headers for an OPTIONS preflight answer (204)."""
        allowed = self.allowed_origin(origin)
        if allowed is None:
            return []
        allow_headers = DEFAULT_ALLOW_HEADERS
        if requested and len(requested) <= 2048 and _HEADER_LIST.match(requested.strip()):
            # Browsers list what the page's client sends (the openai SDK adds x-stainless-*).
            allow_headers = requested.strip()
        headers = [
            (b"Access-Control-Allow-Origin", allowed),
            (b"Access-Control-Allow-Methods", ALLOW_METHODS),
            (b"Access-Control-Allow-Headers", allow_headers),
            (b"Access-Control-Max-Age", MAX_AGE),
        ]
        if not self.wildcard:
            headers.append((b"Vary", b"Origin"))
        return headers
