"""API keys kept in Redis (``KEYS_STORE=redis``): every replica sees a change within a second.

The keys are the key file's text, stored whole in Redis (``llamaproxy:keys:text``, the same
format as the file: ``key_id:api_key[:rate_limit][:expiration]`` per line) with a version
counter (``llamaproxy:keys:version``) that every change increments. ``llamaproxy keys --store
redis://...`` edits it with the same commands as the file (generate, list, rotate, remove), and
writes back only if the version is still the one it read (compare-and-set in one script), so two
operators never lose each other's change.

Each replica asks every ``interval`` (0.5 s) whether the version changed: one small script call
that returns the text only when it did. A change is therefore in force on every replica within
``interval`` plus one round trip; a version poll that Redis misses (it is away) just keeps the
keys already loaded, and the next one catches up (no notification to lose).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaproxy.auth.keys import parse_keys
from llamaproxy.auth.store import KeyLoadError, KeyStore
from llamaproxy.state.limits import PREFIX
from llamaproxy.state.redis_store import RedisState

log = Logger()

TEXT_KEY = f"{PREFIX}keys:text"
VERSION_KEY = f"{PREFIX}keys:version"

#: KEYS: text, version. ARGV: the version known. Returns {version} or {version, text}.
FETCH_SCRIPT = """
local v = redis.call('GET', KEYS[2]) or '0'
if v == ARGV[1] then return {v} end
return {v, redis.call('GET', KEYS[1]) or ''}
"""

#: KEYS: text, version. ARGV: the version read, the new text. 1 if written, 0 if it had changed.
PUT_SCRIPT = """
local v = redis.call('GET', KEYS[2]) or '0'
if v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('INCR', KEYS[2])
return 1
"""


async def fetch_keys(state: RedisState, known: str = "") -> tuple[str, str | None]:
    """(version, text) of the keys in Redis; text None when the version is ``known``."""
    reply = await state.eval(FETCH_SCRIPT, [TEXT_KEY, VERSION_KEY], [known])
    version = _text(reply[0])
    return version, (_text(reply[1]) if len(reply) > 1 else None)


async def put_keys(state: RedisState, version: str, text: str) -> bool:
    """Write ``text`` if the keys are still at ``version``; False when someone changed them."""
    return bool(await state.eval(PUT_SCRIPT, [TEXT_KEY, VERSION_KEY], [version, text]))


class RedisKeyStore(KeyStore):
    """The live key set, read from Redis instead of a file (same KeySet, same swap)."""

    def __init__(self, state: RedisState) -> None:
        super().__init__(f"{state.url.display()} ({TEXT_KEY})")
        self.state = state
        self.version = ""  # none loaded yet: no keys, every API request gets 401

    def load(self, reason: str = "startup") -> int:
        """Keys come from Redis asynchronously (``refresh``); nothing to read at startup."""
        return len(self.keys)

    def reload_if_changed(self) -> bool:
        """Polling is ``refresh(only_if_changed=True)`` (asynchronous)."""
        return False

    def refresh(self, reason: str, only_if_changed: bool = False) -> Deferred[int | None]:
        """Fetch the keys (only when their version changed, if asked); the count loaded, or
        None when unchanged. Fails with KeyLoadError when Redis does not answer (keys kept)."""
        d = Deferred.fromCoroutine(fetch_keys(self.state, self.version if only_if_changed else ""))

        def loaded(found: tuple[str, str | None]) -> int | None:
            version, text = found
            if text is None:
                return None
            keys, warnings = parse_keys(text.splitlines())
            for warning in warnings:
                log.warn("API keys in {path}, {warning}", path=self.path, warning=warning)
            self.keys = keys
            self.version = version
            log.info("Loaded {count} API keys from {path}, version {version} ({reason})",
                     count=len(keys), path=self.path, version=version, reason=reason)
            return len(keys)

        def failed(failure: Failure) -> Failure:
            if not only_if_changed:
                self._failed(reason, failure.getErrorMessage())
            return Failure(KeyLoadError(f"Redis: {failure.getErrorMessage()}"))

        return d.addCallbacks(loaded, failed)


class KeyPoller(Service):
    """Asks Redis every ``interval`` seconds whether the keys changed, and loads them if so."""

    def __init__(self, store: RedisKeyStore, clock: Any, interval: float = 0.5) -> None:
        self.store = store
        self.clock = clock
        self.interval = interval
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("API keys: Redis polling stopped", f)
        )

    def _poll(self) -> None:
        # Version "" (none loaded yet) never matches: the first answer brings the text.
        reason = "changed in Redis" if self.store.version else "startup"
        self.store.refresh(reason, only_if_changed=True).addErrback(lambda f: None)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
