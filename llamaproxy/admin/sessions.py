"""Who may use the operator page: login with an admin API key, session cookies, CSRF tokens.

An operator logs in once with an API key whose id is in ``ADMIN_KEY_IDS``; the page then knows
them by a random session token in an ``HttpOnly; SameSite=Strict`` cookie. Only the token's
SHA-256 is stored. A session ends when it expires (``ADMIN_SESSION_TTL``), on logout, or as soon
as its key no longer authenticates: every use re-checks the key's digest against the live key set,
so a key removed, rotated or expired by a key reload ends its sessions at their next request (and
the live stream at its next tick). Each session has a CSRF token that every POST must carry.
Failed logins are limited per client address.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from twisted.internet.interfaces import IReactorTime

from llamaproxy.auth.keys import ApiKey, KeySet, authenticate

#: The session cookie's name, and the login form's double-submit cookie.
SESSION_COOKIE = b"llamaproxy_admin"
LOGIN_COOKIE = b"llamaproxy_login"
#: Sessions held at once (the oldest is dropped beyond it).
MAX_SESSIONS = 64
#: Failed logins allowed per client address per ``FAILURE_WINDOW`` seconds.
MAX_FAILURES = 5
FAILURE_WINDOW = 60.0
#: Client addresses whose failures are remembered at once.
MAX_FAILURE_ENTRIES = 1024


@dataclass(frozen=True)
class Session:
    """A logged-in operator."""

    key_id: str
    key_digest: bytes
    expires_at: float
    csrf: str


class LoginError(Exception):
    """A login attempt that failed; the message is safe to show."""


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii", "replace")).digest()


def _now() -> datetime:
    return datetime.now(UTC)


class SessionStore:
    """Sessions of the operator page, checked against the live key set on every use."""

    def __init__(
        self,
        keys: Callable[[], KeySet],
        admin_key_ids: frozenset[str],
        clock: IReactorTime,
        ttl: float = 3600.0,
        now: Callable[[], datetime] = _now,
    ) -> None:
        self._keys = keys
        self.admin_key_ids = admin_key_ids
        self.clock = clock
        self.ttl = ttl
        self._now = now
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def login(self, presented: str, client: str) -> tuple[str, Session]:
        """Open a session for an admin key: (cookie token, session), else ``LoginError``."""
        if self._blocked(client):
            raise LoginError("Too many failed logins; wait a minute")
        result = authenticate(self._keys(), presented.strip() or None, self._now())
        if not isinstance(result, ApiKey):
            self._failed(client)
            raise LoginError("Unknown, malformed or expired API key")
        if result.key_id not in self.admin_key_ids:
            self._failed(client)
            raise LoginError(f"Key '{result.key_id}' is not an admin key (ADMIN_KEY_IDS)")
        self._failures.pop(client, None)
        token = secrets.token_urlsafe(32)
        session = Session(
            key_id=result.key_id,
            key_digest=result.digest,
            expires_at=self.clock.seconds() + self.ttl,
            csrf=secrets.token_urlsafe(24),
        )
        self._sessions[_hash(token)] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return token, session

    def lookup(self, token: str | None) -> Session | None:
        """The live session of a cookie token, or None (expired, revoked, logged out, unknown)."""
        if not token:
            return None
        hashed = _hash(token)
        session = self._sessions.get(hashed)
        if session is None:
            return None
        if not self.valid(session):
            self._sessions.pop(hashed, None)
            return None
        return session

    def valid(self, session: Session) -> bool:
        """True while ``session`` has not expired and its key still authenticates as an admin."""
        if self.clock.seconds() >= session.expires_at:
            return False
        key = self._keys().by_digest.get(session.key_digest)
        return (
            key is not None
            and key.key_id == session.key_id
            and key.key_id in self.admin_key_ids
            and not key.expired(self._now())
        )

    def logout(self, token: str | None) -> None:
        """End the session of ``token`` (if any)."""
        if token:
            self._sessions.pop(_hash(token), None)

    @staticmethod
    def csrf_ok(session: Session, presented: str | None) -> bool:
        """True when a form's CSRF field matches the session's token."""
        return presented is not None and hmac.compare_digest(
            session.csrf.encode(), presented.encode("utf-8", "replace")
        )

    def _blocked(self, client: str) -> bool:
        entry = self._failures.get(client)
        if entry is None:
            return False
        since, count = entry
        if self.clock.seconds() - since >= FAILURE_WINDOW:
            del self._failures[client]
            return False
        return count >= MAX_FAILURES

    def _failed(self, client: str) -> None:
        now = self.clock.seconds()
        since, count = self._failures.pop(client, (now, 0))
        if now - since >= FAILURE_WINDOW:
            since, count = now, 0
        self._failures[client] = (since, count + 1)
        while len(self._failures) > MAX_FAILURE_ENTRIES:
            self._failures.popitem(last=False)
