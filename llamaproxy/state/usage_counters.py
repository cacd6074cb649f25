"""Usage counted for all replicas in Redis: requests and tokens per UTC day, key_id and model.

Each replica still writes its own SQLite ledger (:mod:`llamaproxy.observability.usage`, the durable
record of what *it* served); this adds the one truth across replicas, which ``llamaproxy usage
--state-url`` reads. Requests are tallied in memory and added to Redis once a second by one script
(``HINCRBY`` per counter: additions commute, so replicas never overwrite each other). A flush that
fails is merged back and retried with the next one: nothing counted is dropped while Redis is away
(only when the replica itself stops before Redis returns; its SQLite ledger still has it).

Layout: hash ``llamaproxy:usage:<day>`` with fields ``<key_id>\\x1f<model>\\x1f<r|p|c|e>``
(requests, prompt tokens, completion tokens, estimated requests), and the set
``llamaproxy:usage:days`` of the days that have counters.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaproxy.observability.usage import UNKNOWN, UsageRow
from llamaproxy.state.limits import PREFIX
from llamaproxy.state.redis_store import RedisState

log = Logger()

DAYS_KEY = f"{PREFIX}usage:days"
_SEP = "\x1f"
_COLUMNS = ("r", "p", "c", "e")

#: ARGV: triples (day, field, increment).
FLUSH_SCRIPT = """
for i = 1, #ARGV, 3 do
  redis.call('HINCRBY', KEYS[1] .. ARGV[i], ARGV[i + 1], ARGV[i + 2])
  redis.call('SADD', KEYS[2], ARGV[i])
end
return #ARGV / 3
"""

_Tally = dict[tuple[str, str, str], list[int]]


class SharedUsage(Service):
    """Adds this replica's usage to the counters in Redis, once per ``flush_interval``."""

    def __init__(self, state: RedisState, flush_interval: float = 1.0) -> None:
        self.state = state
        self.clock = state.clock
        self.flush_interval = flush_interval
        self._pending: _Tally = {}
        self._timer: Any = None
        self._flushing: Deferred[None] | None = None

    def record(
        self, key_id: str | None, model: str | None, prompt_tokens: int | None,
        completion_tokens: int | None, partial: bool = False,
    ) -> None:
        """Count one request (O(1); sent to Redis within flush_interval)."""
        day = datetime.fromtimestamp(self.clock.seconds(), UTC).date().isoformat()
        slot = (day, key_id or UNKNOWN, model or UNKNOWN)
        totals = self._pending.get(slot)
        if totals is None:
            totals = self._pending[slot] = [0, 0, 0, 0]
        totals[0] += 1
        totals[1] += max(0, prompt_tokens or 0)
        totals[2] += max(0, completion_tokens or 0)
        totals[3] += bool(partial)
        self._arm()

    def _arm(self) -> None:
        if self._timer is None and self._flushing is None and self.running:
            self._timer = self.clock.callLater(self.flush_interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> Deferred[None]:
        """Send what is pending; fires when Redis has it (or it was put back after a failure)."""
        if self._flushing is not None:
            return self._flushing
        tally, self._pending = self._pending, {}
        if not tally:
            return succeed(None)
        args: list[Any] = []
        for (day, key_id, model), totals in tally.items():
            for column, value in zip(_COLUMNS, totals, strict=True):
                if value:
                    args += [day, _SEP.join((key_id, model, column)), value]
        d = self.state.eval(FLUSH_SCRIPT, [f"{PREFIX}usage:", DAYS_KEY], args)
        flushing: Deferred[None] = d.addCallbacks(lambda _: None, self._put_back,
                                                  errbackArgs=(tally,))
        self._flushing = flushing

        def done(result: None) -> None:
            self._flushing = None
            if self._pending:
                self._arm()

        flushing.addBoth(done)
        return flushing

    def _put_back(self, failure: Failure, tally: _Tally) -> None:
        """Redis did not take it: keep it for the next flush (merged with what came since)."""
        for slot, totals in tally.items():
            mine = self._pending.setdefault(slot, [0, 0, 0, 0])
            for i, value in enumerate(totals):
                mine[i] += value

    @property
    def pending(self) -> int:
        """(day, key, model) counters not in Redis yet."""
        return len(self._pending)

    def startService(self) -> None:
        super().startService()
        if self._pending:
            self._arm()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d = self.flush()
        d.addErrback(lambda f: None)
        if self._pending:
            log.warn("Shared usage: Redis unreachable at stop; {n} counters only in SQLite",
                     n=len(self._pending))
        return d


async def read_usage(
    state: RedisState, key: str | None = None, since: date | None = None,
    until: date | None = None,
) -> list[UsageRow]:
    """The counters in Redis as ledger rows (oldest day first), like ``usage.query``."""
    days = sorted(_text(d) for d in (await state.command("smembers", DAYS_KEY) or ()))
    rows: list[UsageRow] = []
    for day in days:
        if since is not None and day < since.isoformat():
            continue
        if until is not None and day > until.isoformat():
            continue
        fields = await state.command("hgetall", f"{PREFIX}usage:{day}") or {}
        rows.extend(_rows(day, fields.items(), key))
    return rows


def _rows(day: str, fields: Iterable[tuple[Any, Any]], key: str | None) -> list[UsageRow]:
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for name, value in fields:
        key_id, model, column = _text(name).split(_SEP)
        if key is not None and key_id != key:
            continue
        counts.setdefault((key_id, model), {})[column] = int(value)
    return [
        UsageRow(day, key_id, model, c.get("r", 0), c.get("p", 0), c.get("c", 0), c.get("e", 0))
        for (key_id, model), c in sorted(counts.items())
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
