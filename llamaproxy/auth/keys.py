"""The API key file: format, parsing, digests, expiry, and deciding who a request belongs to.

Format (the older gateway's, unchanged): one key per line,
``key_id:api_key[:rate_limit][:expiration]``, ``#`` comments and blank lines ignored. Keys are held
as SHA-256 digests in a dict, so a lookup costs the same with 1 or 100 000 keys; the match is
confirmed with ``hmac.compare_digest``. A KeySet also remembers the header values that matched one
of its keys (``authenticate_headers``; bounded, matches only), so a client presenting the same
key again costs one dict lookup instead of a parse and a SHA-256; a reload replaces the KeySet
and its memo with it. Invalid lines are skipped with a warning naming the line number, never
the key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from llamaproxy.gateway import errors
from llamaproxy.gateway.errors import GatewayError

_KEY_ID = re.compile(r"[A-Za-z0-9_-]+")
_API_KEY = re.compile(r"[A-Za-z0-9_-]{16,128}")

#: The key id requests get when authentication is off.
AUTH_DISABLED = "auth-disabled"

#: Header pairs a KeySet remembers as matching a key (``authenticate_headers``); when full, the
#: memo starts over.
HEADER_MEMO_SIZE = 1024

#: The longest header pair remembered, in bytes (a key is at most 128 characters): longer ones
#: are authenticated in full every time.
HEADER_MEMO_VALUE_MAX = 512

#: A request's ``Authorization`` and ``X-Api-Key`` values as they came (None: absent).
HeaderPair = tuple[bytes | None, bytes | None]


@dataclass(frozen=True)
class ApiKey:
    """One key from the file (the secret itself is kept only as its digest)."""

    key_id: str
    digest: bytes
    rate_limit: int | None = None
    expires: datetime | None = None  # always timezone-aware (UTC when the file said nothing)

    def expired(self, now: datetime) -> bool:
        """True when the key's expiration has passed at ``now`` (aware)."""
        return self.expires is not None and now >= self.expires


def digest(api_key: str) -> bytes:
    """The SHA-256 digest keys are stored and looked up by."""
    return hashlib.sha256(api_key.encode("utf-8")).digest()


def parse_expiration(text: str) -> datetime:
    """An ISO 8601 timestamp; a naive one means UTC."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


@dataclass(frozen=True)
class KeySet:
    """The keys loaded from one read of the key file."""

    by_digest: Mapping[bytes, ApiKey]
    #: Header pairs that matched a key (``authenticate_headers``): the next request with the
    #: same headers needs no parse and no SHA-256. Only matches are remembered, never what
    #: failed, at most ``HEADER_MEMO_SIZE`` pairs of at most ``HEADER_MEMO_VALUE_MAX`` bytes; a
    #: reload makes a new KeySet, so a key removed from the file is forgotten with the old set.
    matched: dict[HeaderPair, ApiKey] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def __len__(self) -> int:
        return len(self.by_digest)

    def lookup(self, presented: str) -> ApiKey | None:
        """The key matching ``presented``, or None."""
        wanted = digest(presented)
        found = self.by_digest.get(wanted)
        if found is not None and hmac.compare_digest(found.digest, wanted):
            return found
        return None


def parse_keys(lines: Iterable[str]) -> tuple[KeySet, list[str]]:
    """Parse key-file lines into a KeySet and warnings (line numbers, never key material)."""
    keys: dict[bytes, ApiKey] = {}
    warnings: list[str] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if ":" not in line:
            warnings.append(f"line {number}: no ':' separator; skipped")
            continue
        fields = [f.strip() for f in line.split(":", 3)]
        key_id, api_key = fields[0], fields[1]
        if not _KEY_ID.fullmatch(key_id):
            warnings.append(f"line {number}: invalid key_id (letters, digits, - and _); skipped")
            continue
        if not _API_KEY.fullmatch(api_key):
            warnings.append(
                f"line {number}: invalid api_key for '{key_id}' "
                "(16-128 of A-Z a-z 0-9 - _); skipped"
            )
            continue
        rate_limit: int | None = None
        if len(fields) > 2 and fields[2]:
            if not re.fullmatch(r"\d+", fields[2]) or int(fields[2]) <= 0:
                warnings.append(
                    f"line {number}: rate_limit for '{key_id}' must be a positive integer; skipped"
                )
                continue
            rate_limit = int(fields[2])
        expires: datetime | None = None
        if len(fields) > 3 and fields[3]:
            try:
                expires = parse_expiration(fields[3])
            except ValueError:
                warnings.append(
                    f"line {number}: expiration for '{key_id}' is not ISO 8601; skipped"
                )
                continue
        key_digest = digest(api_key)
        if key_digest in keys:
            warnings.append(
                f"line {number}: duplicate api_key "
                f"(also used by '{keys[key_digest].key_id}'); skipped"
            )
            continue
        keys[key_digest] = ApiKey(key_id, key_digest, rate_limit, expires)
    return KeySet(keys), warnings


def presented_key(authorization: bytes | None, x_api_key: bytes | None) -> str | None:
    """The key a client presented: ``Authorization: Bearer K`` (or a raw K), else ``X-Api-Key``."""
    if authorization is not None:
        value = authorization.decode("latin-1").strip()
        if value[:7].lower() == "bearer ":
            value = value[7:].strip()
        if value:
            return value
    if x_api_key is not None:
        value = x_api_key.decode("latin-1").strip()
        if value:
            return value
    return None


def authenticate(keys: KeySet, presented: str | None, now: datetime) -> ApiKey | GatewayError:
    """The key a request belongs to, or the 401 to answer with.

    The checks and their messages follow the older gateway, in order.
    """
    return _authenticate(keys, presented, lambda: now)


def authenticate_headers(
    keys: KeySet,
    authorization: bytes | None,
    x_api_key: bytes | None,
    now: Callable[[], datetime],
) -> ApiKey | GatewayError:
    """``authenticate(keys, presented_key(authorization, x_api_key), now())``, with ``now``
    called only for a key that has an expiration (most have none), and matches remembered in
    ``keys.matched`` (the expiration is still checked on every request)."""
    pair = (authorization, x_api_key)
    key = keys.matched.get(pair)
    if key is not None:
        if key.expires is not None and key.expired(now()):
            return errors.unauthorized("API key has expired")
        return key
    result = _authenticate(keys, presented_key(authorization, x_api_key), now)
    if isinstance(result, ApiKey) and (
        len(authorization or b"") + len(x_api_key or b"") <= HEADER_MEMO_VALUE_MAX
    ):
        if len(keys.matched) >= HEADER_MEMO_SIZE:
            keys.matched.clear()
        keys.matched[pair] = result
    return result


def _authenticate(
    keys: KeySet, presented: str | None, now: Callable[[], datetime]
) -> ApiKey | GatewayError:
    if not keys:
        return errors.unauthorized("Authentication misconfigured: no API keys loaded")
    if presented is None:
        return errors.unauthorized("Missing Authorization header")
    if not _API_KEY.fullmatch(presented):
        return errors.unauthorized("Invalid API key format")
    key = keys.lookup(presented)
    if key is None:
        return errors.unauthorized("Invalid API key")
    if key.expires is not None and key.expired(now()):
        return errors.unauthorized("API key has expired")
    return key
