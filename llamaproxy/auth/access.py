"""Access decisions from the headers alone: who the caller is, whether they may, and how often.

``AccessControl.check`` runs when a request's headers have arrived, before its body is read: it
authenticates the key (401), checks admin rights for admin routes (403), and applies the key's
rate limit (429). What it lets through carries the key id and the ``X-RateLimit-*`` headers the
response must show.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from llamaproxy.auth.keys import AUTH_DISABLED, authenticate, presented_key
from llamaproxy.auth.ratelimit import RateLimiter
from llamaproxy.auth.store import KeyStore
from llamaproxy.gateway import errors
from llamaproxy.gateway.errors import GatewayError


@dataclass(frozen=True)
class Access:
    """A request that may go on: its key id and the headers its response carries."""

    key_id: str
    headers: tuple[tuple[str, str], ...] = ()


def _now() -> datetime:
    return datetime.now(UTC)


class AccessControl:
    """Authentication, admin rights and rate limits for one gateway."""

    def __init__(
        self,
        store: KeyStore,
        limiter: RateLimiter | None,
        auth_enabled: bool = True,
        admin_key_ids: frozenset[str] = frozenset(),
        now: Callable[[], datetime] = _now,
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.auth_enabled = auth_enabled
        self.admin_key_ids = admin_key_ids
        self.now = now

    def check(
        self, authorization: bytes | None, x_api_key: bytes | None, admin: bool = False
    ) -> Access | GatewayError:
        """The caller's Access, or the 401/403/429 to answer with."""
        if not self.auth_enabled:
            # No keys, no identities: every caller is "auth-disabled" and nothing is limited.
            return Access(AUTH_DISABLED)
        result = authenticate(
            self.store.keys, presented_key(authorization, x_api_key), self.now()
        )
        if isinstance(result, GatewayError):
            return result
        if admin and result.key_id not in self.admin_key_ids:
            return errors.forbidden(f"Key '{result.key_id}' is not allowed to do this")
        if self.limiter is None:
            return Access(result.key_id)
        decision = self.limiter.check(result.key_id, result.rate_limit)
        if not decision.allowed:
            return errors.rate_limited(decision.headers())
        return Access(result.key_id, decision.headers())
