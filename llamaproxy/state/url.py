"""``STATE_URL`` and ``STATE_FAILURE``: strict parsing of where the shared state lives.

``redis://[[user]:password@]host[:port][/db]`` or ``rediss://...`` (TLS, the server's certificate
verified against the system's trust roots and its host name, through service-identity).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

#: What a replica does when Redis does not answer: keep serving with its local limits, or refuse.
FAILURE_MODES = ("open", "closed")


@dataclass(frozen=True)
class StateURL:
    """A parsed STATE_URL (the password is kept out of ``repr``)."""

    host: str
    port: int = 6379
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def display(self) -> str:
        """The URL without its credentials (for logs, /health and metrics)."""
        scheme = "rediss" if self.tls else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.db}"


def parse_state_url(text: str) -> StateURL | None:
    """Parse STATE_URL; empty means no shared state (None). Anything malformed is an error."""
    value = text.strip()
    if not value:
        return None
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"malformed Redis URL: {e}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"expected a redis:// or rediss:// URL, got scheme {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("a Redis URL needs a host, e.g. redis://127.0.0.1:6379/0")
    if parts.query or parts.fragment:
        raise ValueError("a Redis URL takes no query or fragment")
    path = parts.path.strip("/")
    if path and not re.fullmatch(r"\d{1,5}", path):
        raise ValueError(f"the database must be a number, got {path!r}")
    db = int(path) if path else 0
    if port == 0:
        raise ValueError("the port must be between 1 and 65535")
    return StateURL(
        host=parts.hostname,
        port=port if port is not None else 6379,
        db=db,
        tls=parts.scheme == "rediss",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def parse_failure_mode(text: str) -> str:
    """STATE_FAILURE: ``open`` or ``closed``."""
    value = text.strip().lower()
    if value not in FAILURE_MODES:
        raise ValueError(f"expected 'open' or 'closed', got {text!r}")
    return value
