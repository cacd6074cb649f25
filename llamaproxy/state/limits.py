"""Request and token limits shared by every replica: the sliding-window counters, kept in Redis.

The same counter as :mod:`llamaproxy.auth.ratelimit` (start ``s``, previous ``p``, current ``c``
per key, rolled by whole windows, ``E = p * (W - e) / W + c``), held in one Redis hash per key and
updated by a Lua script, so a check is atomic across replicas and costs at most one round trip:
the checks of all requests whose headers arrived in the same reactor turn go in one script call,
run one after the other inside Redis exactly as if sent alone (no slack: batching changes the
number of round trips, not the decisions). The script uses Redis's clock (``TIME``), so
replicas whose clocks disagree still share one window. It returns the rolled counts;
``Retry-After``, ``X-RateLimit-Remaining`` and ``-Reset`` are then computed here by the
in-process limiter's own arithmetic (``decision_at``), so the headers mean exactly what they
mean without Redis.

One script checks both limits of a request: the key's token window first (a key over its tokens
per minute is refused without being charged a request), then its request window.

When Redis does not answer, ``STATE_FAILURE`` decides: ``open`` checks the replica's own
in-process limiters instead (each replica then enforces the limits alone, so N replicas admit up
to N times a key's limit while Redis is away), ``closed`` answers 503 with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaproxy.auth.access import Access, TokenLimits
from llamaproxy.auth.ratelimit import RateLimiter
from llamaproxy.gateway import errors
from llamaproxy.gateway.errors import GatewayError
from llamaproxy.state.redis_store import RedisState

log = Logger()

#: Prefix of every key llamaproxy writes in Redis.
PREFIX = "llamaproxy:"

# Shared by the scripts: roll a stored counter to Redis's clock (see auth/ratelimit.py).
_ROLL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function load(key, W)
  local h = redis.call('HMGET', key, 's', 'p', 'c')
  if not h[1] then return now, 0, 0, false end
  local s, p, c = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
  local e = now - s
  if e < 0 then return now, p, c, true end
  if e < W then return s, p, c, true end
  if e < 2 * W then return s + W, c, 0, true end
  return now, 0, 0, true
end
local function store(key, W, s, p, c)
  redis.call('HSET', key, 's', string.format('%.6f', s), 'p', p, 'c', c)
  redis.call('PEXPIRE', key, math.ceil(2 * W * 1000) + 1000)
end
local function estimate(W, s, p, c)
  local off = math.min(math.max(now - s, 0), W)
  return p * (W - off) / W + c
end
"""

#: Checks several requests in order, each exactly as if alone (one round trip for all the
#: requests whose headers arrived in the same reactor turn). KEYS: per request, its request
#: counter and its token counter. ARGV: request window, token window, then per request its
#: request limit (0: none) and token limit (0: none). Returns per request {verdict, now, s, p, c}.
CHECK_SCRIPT = _ROLL + """
local rw, tw = tonumber(ARGV[1]), tonumber(ARGV[2])
local fnow = string.format('%.6f', now)
local function check(rkey, tkey, rlimit, tlimit)
  if tlimit > 0 then
    local s, p, c, found = load(tkey, tw)
    if found then
      store(tkey, tw, s, p, c)
      if estimate(tw, s, p, c) >= tlimit then
        return {'tokens', fnow, string.format('%.6f', s), p, c}
      end
    end
  end
  if rlimit == 0 then return {'ok', fnow} end
  local s, p, c = load(rkey, rw)
  local allowed = estimate(rw, s, p, c) < rlimit
  if allowed then c = c + 1 end
  store(rkey, rw, s, p, c)
  return {allowed and 'ok' or 'rate', fnow, string.format('%.6f', s), p, c}
end
local answers = {}
for i = 1, #KEYS / 2 do
  answers[i] = check(KEYS[2 * i - 1], KEYS[2 * i], tonumber(ARGV[2 * i + 1]),
                     tonumber(ARGV[2 * i + 2]))
end
return answers
"""

#: KEYS: request counter. ARGV: window, when the request was charged (Redis time).
REFUND_SCRIPT = _ROLL + """
local W, charged = tonumber(ARGV[1]), tonumber(ARGV[2])
local s, p, c, found = load(KEYS[1], W)
if not found then return 0 end
if charged >= s then c = math.max(0, c - 1) elseif charged >= s - W then p = math.max(0, p - 1) end
store(KEYS[1], W, s, p, c)
return 1
"""

#: KEYS: token counter. ARGV: window, tokens used.
SPEND_SCRIPT = _ROLL + """
local W = tonumber(ARGV[1])
local s, p, c = load(KEYS[1], W)
store(KEYS[1], W, s, p, c + tonumber(ARGV[2]))
return 1
"""


def state_unavailable() -> GatewayError:
    """503 when the shared state cannot be reached and STATE_FAILURE is ``closed``."""
    return GatewayError(
        503, "Shared state store unavailable; try again shortly", "server_error",
        "state_unavailable", headers=(("Retry-After", "1"),),
    )


class SharedLimits:
    """Request and token limits of every key, counted in Redis for all replicas at once.

    ``limiter`` and ``token_limits`` are the replica's in-process ones: their arithmetic turns
    the script's counts into headers, and they decide alone while Redis is away (``open``).
    """

    def __init__(
        self,
        state: RedisState,
        limiter: RateLimiter | None,
        token_limits: TokenLimits | None,
    ) -> None:
        self.state = state
        self.limiter = limiter
        self.token_limits = token_limits
        self.request_window = limiter.window if limiter is not None else 60.0
        self.token_window = (
            token_limits.limiter.window if token_limits is not None else 60.0
        )
        self.fallbacks = 0
        self.checks = 0
        self.batches = 0
        #: Checks waiting for the end of this reactor turn: (key_id, limit, token limit, answer).
        self._batch: list[tuple[str, int, int, Deferred[list[Any]]]] = []

    def check(
        self, key_id: str, rate_limit: int | None, fallback: Callable[[], Access]
    ) -> Deferred[Access]:
        """Count one request of ``key_id`` in Redis; the Access it gets (``fallback()`` when
        Redis fails and the failure mode is open)."""
        limiter = self.limiter
        limit = 0
        if limiter is not None:
            limit = rate_limit if rate_limit is not None else limiter.default_limit
        token_limit = 0 if self.token_limits is None else self.token_limits.limit_for(key_id)
        self.checks += 1
        answer: Deferred[list[Any]] = Deferred()
        self._batch.append((key_id, limit, token_limit, answer))
        if len(self._batch) == 1:
            self.state.clock.callLater(0, self._send_batch)
        access: Deferred[Access] = answer.addCallbacks(
            self._decided, self._unavailable,
            callbackArgs=(key_id, rate_limit, limit, token_limit),
            errbackArgs=(key_id, fallback),
        )
        return access

    def _send_batch(self) -> None:
        """One script call for every check asked for during the last reactor turn."""
        batch, self._batch = self._batch, []
        keys: list[str] = []
        args: list[Any] = [self.request_window, self.token_window]
        for key_id, limit, token_limit, _ in batch:
            keys += [f"{PREFIX}rl:{key_id}", f"{PREFIX}tl:{key_id}"]
            args += [limit, token_limit]
        self.batches += 1
        sent = self.state.eval(CHECK_SCRIPT, keys, args)

        def answered(replies: list[Any]) -> None:
            for (_, _, _, d), reply in zip(batch, replies, strict=True):
                d.callback(reply)

        def failed(failure: Failure) -> None:
            for _, _, _, d in batch:
                d.errback(failure)

        sent.addCallbacks(answered, failed)

    def _decided(
        self, reply: list[Any], key_id: str, rate_limit: int | None, limit: int, token_limit: int
    ) -> Access:
        verdict = _text(reply[0])
        now = float(_text(reply[1]))
        if verdict == "ok" and limit == 0:
            return Access(key_id, rate_limit=rate_limit)
        start, previous, current = float(_text(reply[2])), int(reply[3]), int(reply[4])
        if verdict == "tokens":
            assert self.token_limits is not None
            retry = self.token_limits.limiter.retry_after_at(
                start, previous, current, now, token_limit
            )
            return Access(key_id, error=errors.token_rate_limited(retry))
        assert self.limiter is not None
        decision = self.limiter.decision_at(
            start, previous, current, now, limit, allowed=verdict == "ok"
        )
        if not decision.allowed:
            return Access(key_id, error=errors.rate_limited(decision.headers()))
        return Access(
            key_id, decision.fields(), charged_at=now, rate_limit=rate_limit, shared=True
        )

    def _unavailable(
        self, failure: Failure, key_id: str, fallback: Callable[[], Access]
    ) -> Access:
        if self.state.failure_mode == "closed":
            return Access(key_id, error=state_unavailable())
        self.fallbacks += 1
        return fallback()

    def status_json(self) -> dict[str, int]:
        """Checks made, script calls they took (batches), and local decisions (Redis away)."""
        return {"checks": self.checks, "batches": self.batches, "local_fallbacks": self.fallbacks}

    def refund(self, access: Access) -> int | None:
        """Give back a request charged in Redis (fire and forget); X-RateLimit-Remaining after it
        (one more than the check left, as far as this replica knows)."""
        if access.key_id is None or access.charged_at is None:
            return None
        d = self.state.eval(
            REFUND_SCRIPT, [f"{PREFIX}rl:{access.key_id}"],
            [self.request_window, f"{access.charged_at:.6f}"],
        )
        d.addErrback(lambda f: None)  # Redis away: the charge stays (logged by RedisState)
        for name, value in access.headers:
            if name == b"X-RateLimit-Remaining":
                remaining = int(value) + 1
                limits = dict(access.headers)
                return min(remaining, int(limits.get(b"X-RateLimit-Limit", remaining)))
        return None

    def spend(self, key_id: str, tokens: int) -> None:
        """Count the tokens a finished request used in Redis (locally when Redis is away)."""
        d = self.state.eval(
            SPEND_SCRIPT, [f"{PREFIX}tl:{key_id}"], [self.token_window, int(tokens)]
        )
        d.addErrback(self._spend_locally, key_id, tokens)

    def _spend_locally(self, failure: Failure, key_id: str, tokens: int) -> None:
        if self.token_limits is not None:
            self.token_limits.limiter.spend(key_id, tokens)


class SharedTokenLimits(TokenLimits):
    """TokenLimits whose spending goes to Redis (what the recorder calls at a request's end)."""

    shared: SharedLimits | None = None

    def spend(self, key_id: str, tokens: int) -> None:
        """Count tokens a finished request used, for every replica."""
        if tokens > 0 and self.limit_for(key_id) > 0:
            if self.shared is None:
                super().spend(key_id, tokens)
            else:
                self.shared.spend(key_id, tokens)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
