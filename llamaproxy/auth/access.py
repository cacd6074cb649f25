"""Access decisions from the headers alone: who the caller is, whether they may, and how often.

``AccessControl.check`` runs when a request's headers have arrived, before its body is read: it
authenticates the key (401), checks admin rights for admin routes (403), and applies the key's
rate limit (429). What it lets through carries the key id and the ``X-RateLimit-*`` headers the
response must show.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NamedTuple

from twisted.internet.defer import Deferred

from llamaproxy.auth.keys import AUTH_DISABLED, authenticate_headers
from llamaproxy.auth.ratelimit import RateLimiter
from llamaproxy.auth.store import KeyStore
from llamaproxy.auth.tokenlimit import TokenRateLimiter
from llamaproxy.gateway import errors
from llamaproxy.gateway.errors import GatewayError

if TYPE_CHECKING:
    from llamaproxy.state.limits import SharedLimits


class Access(NamedTuple):
    """The decision for one request: its key id (when known), response headers, any refusal.

    (Immutable; a NamedTuple rather than a frozen dataclass, whose field-by-field
    ``object.__setattr__`` made one per request cost about 11 000 instructions.)
    """

    key_id: str | None
    #: The response's X-RateLimit-* header fields, in bytes (``RateDecision.fields``).
    headers: tuple[tuple[bytes, bytes], ...] = ()
    #: Set when the request is refused (401, 403, 429).
    error: GatewayError | None = None
    #: When the request limiter counted this request (None: it did not), for ``refund``.
    charged_at: float | None = None
    #: The key's request limit (for ``refund``'s new X-RateLimit-Remaining).
    rate_limit: int | None = None
    #: True when the charge was counted in the shared state (Redis), not in this process.
    shared: bool = False


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
        token_limits: TokenLimits | None = None,
        shared: SharedLimits | None = None,
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.auth_enabled = auth_enabled
        self.admin_key_ids = admin_key_ids
        self.now = now
        self.token_limits = token_limits
        #: Limits shared by replicas through Redis (STATE_URL); None: this process's only.
        self.shared = shared

    def check(
        self, authorization: bytes | None, x_api_key: bytes | None, admin: bool = False
    ) -> Access | Deferred[Access]:
        """Who the caller is and whether they may go on (``Access.error`` when not).

        With shared limits the answer is a Deferred (Redis is asked); otherwise it is immediate.
        """
        if not self.auth_enabled:
            # No keys, no identities: every caller is "auth-disabled" and nothing is limited.
            return Access(AUTH_DISABLED)
        keys = self.store.keys
        # ``authenticate_headers`` in line for a remembered match without an expiration (most
        # requests): the same key it would return.
        key = keys.matched.get((authorization, x_api_key))
        if key is None or key.expires is not None:
            result = authenticate_headers(keys, authorization, x_api_key, self.now)
            if isinstance(result, GatewayError):
                return Access(None, error=result)
            key = result
        key_id = key.key_id
        if admin and key_id not in self.admin_key_ids:
            refusal = errors.forbidden(f"Key '{key_id}' is not allowed to do this")
            return Access(key_id, error=refusal)
        if self.shared is not None and (
            self.limiter is not None or self.token_limits is not None
        ):
            return self.shared.check(
                key_id, key.rate_limit, lambda: self._limit(key_id, key.rate_limit)
            )
        return self._limit(key_id, key.rate_limit)

    def _limit(self, key_id: str, rate_limit: int | None) -> Access:
        """This process's token and request limits for an authenticated key."""
        if self.token_limits is not None:
            retry_after = self.token_limits.retry_after(key_id)
            if retry_after is not None:
                return Access(key_id, error=errors.token_rate_limited(retry_after))
        limiter = self.limiter
        if limiter is None:
            return Access(key_id, (), None, None, rate_limit)
        decision = limiter.check(key_id, rate_limit)
        if not decision[0]:  # (allowed)
            return Access(key_id, error=errors.rate_limited(decision.headers()))
        # Charged when the limiter counted it (its clock's time in that check).
        return Access(key_id, decision.fields(), None, limiter.checked_at, rate_limit)

    def refund(self, access: Access) -> int | None:
        """Give back the request window charge of ``access`` (the gateway refused the request
        before any backend had it); the key's X-RateLimit-Remaining after it, if it has one."""
        if self.limiter is None or access.charged_at is None or access.key_id is None:
            return None
        if access.shared and self.shared is not None:
            return self.shared.refund(access)
        self.limiter.refund(access.key_id, access.charged_at)
        return self.limiter.remaining(access.key_id, access.rate_limit)


@dataclass
class TokenLimits:
    """Optional tokens-per-minute limits per key: a default and per-key overrides (0 = none)."""

    limiter: TokenRateLimiter
    default: int = 0
    per_key: dict[str, int] = field(default_factory=dict)

    def limit_for(self, key_id: str) -> int:
        """The key's tokens-per-minute limit (0: unlimited)."""
        return self.per_key.get(key_id, self.default)

    def retry_after(self, key_id: str) -> int | None:
        """Seconds until the key may send again, or None when it is within its limit."""
        limit = self.limit_for(key_id)
        if limit <= 0:
            return None
        return self.limiter.check(key_id, limit)

    def spend(self, key_id: str, tokens: int) -> None:
        """Count tokens a finished request used."""
        if tokens > 0 and self.limit_for(key_id) > 0:
            self.limiter.spend(key_id, tokens)
