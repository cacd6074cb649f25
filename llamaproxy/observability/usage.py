"""Per-key token accounting: an in-memory tally flushed to an SQLite ledger, and a tokens/minute
limiter.

:class:`UsageLedger` counts requests and prompt/completion tokens per (UTC day, key_id, model).
``record`` only adds to a dict on the reactor thread; every ``flush_interval`` seconds (only while
there is something to write) the pending totals go to SQLite in one transaction, on a thread-pool
thread, through one connection that no other thread uses. A crash loses at most the last
``flush_interval`` seconds; a failed write keeps the batch in memory for the next try. The
database is in WAL mode, so ``llamaproxy usage`` (:func:`query`) reads it while the gateway
writes. The WAL is checkpointed (and truncated) on the pool thread ``checkpoint_interval``
seconds after a write, and at once after a write that left it over ``wal_limit`` bytes, so it
stays small however long the gateway runs.

:class:`TokenRateLimiter` is the sliding-window counter of :mod:`llamaproxy.auth.ratelimit`
counting tokens instead of requests: ``check`` before a request, ``spend`` after it.

Slightly over 500 lines: the ledger's thread-pool writer, its WAL checkpoints and its reader share
the schema code.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

log = Logger()

#: File name of the ledger under DATA_DIR.
LEDGER_FILE_NAME = "usage.sqlite3"

#: What ``key_id`` / ``model`` are stored as when unknown (auth disabled, no model in the body).
UNKNOWN = "-"

SCHEMA_VERSION = 2

#: Seconds after a write before the WAL is checkpointed into the database and truncated.
CHECKPOINT_INTERVAL = 60.0

#: A write that leaves the WAL at least this big checkpoints it at once (bytes).
WAL_LIMIT = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    partial INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_id, model)
) WITHOUT ROWID
"""

#: Version 1 had no ``partial`` column.
_MIGRATE_FROM_1 = "ALTER TABLE usage ADD COLUMN partial INTEGER NOT NULL DEFAULT 0"

_UPSERT = """
INSERT INTO usage (day, key_id, model, requests, prompt_tokens, completion_tokens, partial)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, key_id, model) DO UPDATE SET
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    partial = partial + excluded.partial
"""

#: (day, key_id, model) → [requests, prompt_tokens, completion_tokens, partial]
_Tally = dict[tuple[str, str, str], list[int]]
_Batch = list[tuple[str, str, str, int, int, int, int]]


def default_ledger_path(data_dir: str) -> str:
    """``DATA_DIR/usage.sqlite3``."""
    return os.path.join(data_dir, LEDGER_FILE_NAME)


def resolve_ledger_path(value: str | None, data_dir: str) -> str | None:
    """``USAGE_LEDGER``: None/empty → the default path; ``off`` (none/false/no/0) → None
    (accounting disabled); anything else is the path."""
    text = (value or "").strip()
    if not text:
        return default_ledger_path(data_dir)
    if text.lower() in {"off", "none", "false", "no", "0", "disabled"}:
        return None
    return text


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Totals of one key_id and model on one UTC day."""

    day: str  # YYYY-MM-DD, UTC
    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    #: Of ``requests``, those whose tokens the gateway estimated (a stream cut before its counts).
    partial: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


def _tokens(value: int | None) -> int:
    """A token count as stored: unknown or negative counts are 0."""
    if value is None:
        return 0
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):
        return 0
    return count if count > 0 else 0  # max(0, count) without the builtin's call


def open_ledger(path: str, wal_limit: int = WAL_LIMIT) -> sqlite3.Connection:
    """Open (creating file 0640, directory and table if needed) the ledger for writing, WAL mode.

    ``wal_limit`` also becomes SQLite's ``journal_size_limit``: what a checkpoint leaves of the
    WAL file when it cannot truncate it (a reader was using it).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o750, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o640))
    connection = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(f"PRAGMA journal_size_limit={int(wal_limit)}")
        connection.execute(_SCHEMA)
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version == 1:
            columns = {row[1] for row in connection.execute("PRAGMA table_info(usage)")}
            if "partial" not in columns:
                connection.execute(_MIGRATE_FROM_1)
        if version in (0, 1):
            connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{path}: ledger schema version {version} is newer than this llamaproxy "
                f"({SCHEMA_VERSION})"
            )
    except BaseException:
        connection.close()
        raise
    return connection


def write_batch(connection: sqlite3.Connection, batch: _Batch) -> None:
    """Add ``batch`` to the ledger in one transaction."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.executemany(_UPSERT, batch)
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def query(
    path: str,
    key: str | None = None,
    since: date | None = None,
    until: date | None = None,
) -> list[UsageRow]:
    """Rows of the ledger at ``path`` (oldest day first), optionally for one key_id and from
    ``since`` to ``until`` (inclusive, UTC days). Synchronous: for the CLI, or a thread.

    Raises FileNotFoundError when there is no ledger. Safe while the gateway writes (WAL); the
    last ``flush_interval`` seconds of a running gateway are not in the file yet.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(2, "no usage ledger", path)
    connection = _connect_for_reading(path)
    try:
        clauses: list[str] = []
        params: list[str] = []
        if key is not None:
            clauses.append("key_id = ?")
            params.append(key)
        if since is not None:
            clauses.append("day >= ?")
            params.append(since.isoformat())
        if until is not None:
            clauses.append("day <= ?")
            params.append(until.isoformat())
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        try:
            columns = {row[1] for row in connection.execute("PRAGMA table_info(usage)")}
            partial = "partial" if "partial" in columns else "0"  # (a version 1 ledger)
            rows = connection.execute(
                "SELECT day, key_id, model, requests, prompt_tokens, completion_tokens, "
                f"{partial} FROM usage{where} ORDER BY day, key_id, model",
                params,
            ).fetchall()
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return []
            raise
    finally:
        connection.close()
    return [UsageRow(*row) for row in rows]


def _connect_for_reading(path: str) -> sqlite3.Connection:
    """A connection that never creates the file; read-only when the file is not writable."""
    uri = "file:" + _uri_path(path)
    try:
        return sqlite3.connect(f"{uri}?mode=rw", uri=True, timeout=10.0)
    except sqlite3.OperationalError:
        return sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=10.0)


def _uri_path(path: str) -> str:
    from urllib.parse import quote

    return quote(os.path.abspath(path))


class UsageLedger(Service):
    """Request and token totals per (UTC day, key_id, model), persisted to SQLite off the reactor.

    ``clock`` schedules flushes and dates records; ``reactor`` (``callFromThread``) and
    ``threadpool`` run the SQLite work. Without a ``threadpool`` the ledger makes its own
    one-thread pool, started and stopped with the service. As a twistd service: start it with the
    others, stop it after the gateway has drained (so the last requests are counted).
    """

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool | None = None,
        flush_interval: float = 2.0,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        wal_limit: int = WAL_LIMIT,
    ) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self.checkpoint_interval = checkpoint_interval
        self.wal_limit = wal_limit
        #: WAL checkpoints done (scheduled and size-triggered).
        self.checkpoints = 0
        self._checkpoint_timer: IDelayedCall | None = None
        #: The scheduled checkpoint running on the pool thread, if any.
        self.checkpointing: Deferred[None] | None = None
        self._clock = clock
        self._reactor = reactor
        self._own_pool = threadpool is None
        self._pool = threadpool or ThreadPool(minthreads=0, maxthreads=1, name="usage-ledger")
        self._pending: _Tally = {}
        self._timer: IDelayedCall | None = None
        self._flushing: Deferred[None] | None = None
        self._connection: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()  # the connection is used by one pool thread at a time
        self._failing = False
        self._stopped = False
        self._stopping: Deferred[None] | None = None
        self._day = ""
        self._day_start = math.inf
        self._day_end = -math.inf

    # --- the reactor thread --------------------------------------------------------------------

    def _day_at(self, now: float) -> str:
        """The UTC date at ``now`` (a clock reading), cached until midnight."""
        if not self._day_start <= now < self._day_end:
            moment = datetime.fromtimestamp(now, UTC)
            midnight = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
            self._day = moment.date().isoformat()
            self._day_start = midnight.timestamp()
            self._day_end = (midnight + timedelta(days=1)).timestamp()
        return self._day

    def record(
        self,
        key_id: str | None,
        model: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        partial: bool = False,
    ) -> None:
        """Count one request (tokens None = unknown = 0; ``partial``: the tokens are an
        estimate). O(1); written within flush_interval."""
        if self._stopped:
            log.warn("Usage recorded after the ledger stopped: not counted", key_id=key_id)
            return
        # ``self._today()`` in line while the day lasts (one clock read either way).
        now = self._clock.seconds()
        day = self._day if self._day_start <= now < self._day_end else self._day_at(now)
        slot = (day, key_id or UNKNOWN, model or UNKNOWN)
        totals = self._pending.get(slot)
        if totals is None:
            totals = self._pending[slot] = [0, 0, 0, 0]
        totals[0] += 1
        # ``_tokens(count)`` in line for a plain int (what a usage object gives).
        if type(prompt_tokens) is int:
            totals[1] += prompt_tokens if prompt_tokens > 0 else 0
        else:
            totals[1] += _tokens(prompt_tokens)
        if type(completion_tokens) is int:
            totals[2] += completion_tokens if completion_tokens > 0 else 0
        else:
            totals[2] += _tokens(completion_tokens)
        totals[3] += partial
        if self._timer is None and self._flushing is None:
            self._timer = self._clock.callLater(self.flush_interval, self._on_timer)

    @property
    def pending(self) -> list[UsageRow]:
        """What is counted but not written yet."""
        return [
            UsageRow(day, key_id, model, *totals)
            for (day, key_id, model), totals in sorted(self._pending.items())
        ]

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> Deferred[None]:
        """Write what is pending now; fires when it is written (or kept for a retry: never
        fails). If a flush is running, waits for it and then writes what came in meanwhile."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._flushing is not None:
            running = self._flushing
            done: Deferred[None] = Deferred()

            def again(_: object) -> None:
                self.flush().chainDeferred(done)

            running.addBoth(again)
            return done
        if not self._pending:
            return succeed(None)
        tally, self._pending = self._pending, {}
        batch: _Batch = [
            (day, key_id, model, totals[0], totals[1], totals[2], totals[3])
            for (day, key_id, model), totals in tally.items()
        ]
        flushing = deferToThreadPool(self._reactor, self._pool, self._write, batch)
        flushing.addCallbacks(self._written, self._not_written, errbackArgs=(tally,))
        self._flushing = flushing
        return self._chain(flushing)

    def _chain(self, flushing: Deferred[None]) -> Deferred[None]:
        result: Deferred[None] = Deferred()

        def finished(_: object) -> None:
            self._flushing = None
            if self._pending and not self._stopped and self._timer is None:
                self._timer = self._clock.callLater(self.flush_interval, self._on_timer)
            result.callback(None)

        flushing.addBoth(finished)
        return result

    def _written(self, _: None) -> None:
        if self._checkpoint_timer is None and not self._stopped:
            self._checkpoint_timer = self._clock.callLater(
                self.checkpoint_interval, self._checkpoint_due)
        if self._failing:
            self._failing = False
            log.info("Usage ledger {path} writable again", path=self.path)

    def _not_written(self, failure: Failure, tally: _Tally) -> None:
        for slot, totals in tally.items():  # keep the counts for the next try
            mine = self._pending.setdefault(slot, [0, 0, 0, 0])
            for index, value in enumerate(totals):
                mine[index] += value
        if not self._failing:
            self._failing = True
            log.error(
                "Cannot write the usage ledger {path}: {error}; keeping the counts in memory",
                path=self.path, error=failure.getErrorMessage(),
            )

    def _checkpoint_due(self) -> None:
        """The schedule: checkpoint the WAL on the pool thread (never on the reactor's)."""
        self._checkpoint_timer = None
        if self._stopped:
            return
        running = deferToThreadPool(self._reactor, self._pool, self._checkpoint)

        def done(_: object) -> None:
            self.checkpointing = None

        running.addErrback(lambda f: log.warn(
            "Usage ledger {path}: WAL checkpoint failed: {error}", path=self.path,
            error=f.getErrorMessage()))
        running.addBoth(done)
        self.checkpointing = running

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        if self._own_pool:
            self._pool.start()
        opened = deferToThreadPool(self._reactor, self._pool, self._ensure_open)
        opened.addCallbacks(
            lambda _: log.info("Usage ledger: {path}", path=self.path),
            lambda f: log.error(
                "Cannot open the usage ledger {path}: {error}; counting in memory meanwhile",
                path=self.path, error=f.getErrorMessage(),
            ),
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.stop()

    def stop(self) -> Deferred[None]:
        """Write everything pending, close the database (and the own pool); fires when done."""
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop())
        result: Deferred[None] = Deferred()
        self._stopping.addBoth(lambda _: result.callback(None))
        return result

    async def _stop(self) -> None:
        if self._own_pool and not self._pool.started:
            self._pool.start()  # stopped before it started: the pool still has to write and close
        await self.flush()
        self._stopped = True
        if self._timer is not None and self._timer.active():  # a retry after a failed write
            self._timer.cancel()
        self._timer = None
        if self._checkpoint_timer is not None and self._checkpoint_timer.active():
            self._checkpoint_timer.cancel()  # closing the last connection checkpoints anyway
        self._checkpoint_timer = None
        if self._pending:
            rows = self.pending
            log.error(
                "Usage ledger {path}: {count} totals ({requests} requests) could not be written",
                path=self.path, count=len(rows), requests=sum(row.requests for row in rows),
            )
        try:
            await deferToThreadPool(self._reactor, self._pool, self._close)
        except Exception:
            log.failure("Error closing the usage ledger {path}", path=self.path)
        if self._own_pool and self._pool.started:
            self._pool.stop()

    def query(
        self, key: str | None = None, since: date | None = None, until: date | None = None
    ) -> list[UsageRow]:
        """:func:`query` on this ledger's file (blocking: not from the reactor thread)."""
        return query(self.path, key, since, until)

    # --- the pool thread -----------------------------------------------------------------------

    def _ensure_open(self) -> sqlite3.Connection:
        with self._db_lock:
            if self._connection is None:
                self._connection = open_ledger(self.path, self.wal_limit)
            return self._connection

    def _write(self, batch: _Batch) -> None:
        connection = self._ensure_open()
        with self._db_lock:
            try:
                write_batch(connection, batch)
                if self.wal_size() >= self.wal_limit:
                    self._checkpoint_locked(connection)
            except sqlite3.Error:
                # a broken connection (file deleted, disk replaced): reopen on the next try
                self._connection = None
                with contextlib.suppress(sqlite3.Error):
                    connection.close()
                raise

    def wal_size(self) -> int:
        """Bytes in the ledger's WAL file now (0 when there is none)."""
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:
            return 0

    def _checkpoint(self) -> None:
        with self._db_lock:
            if self._connection is not None:
                self._checkpoint_locked(self._connection)

    def _checkpoint_locked(self, connection: sqlite3.Connection) -> None:
        """Copy the WAL into the database and truncate it (a reader in the way: next time)."""
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        self.checkpoints += 1

    def _close(self) -> None:
        with self._db_lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.close()


def totals_by_key(rows: Iterable[UsageRow]) -> dict[str, UsageRow]:
    """Sum ``rows`` per key_id (``day`` and ``model`` of a sum are ``*``)."""
    sums: dict[str, list[int]] = {}
    for row in rows:
        acc = sums.setdefault(row.key_id, [0, 0, 0, 0])
        acc[0] += row.requests
        acc[1] += row.prompt_tokens
        acc[2] += row.completion_tokens
        acc[3] += row.partial
    return {key: UsageRow("*", key, "*", *acc) for key, acc in sorted(sums.items())}


def grand_total(rows: Iterable[UsageRow]) -> UsageRow:
    """Sum of all ``rows``."""
    requests = prompt = completion = partial = 0
    for row in rows:
        requests += row.requests
        prompt += row.prompt_tokens
        completion += row.completion_tokens
        partial += row.partial
    return UsageRow("*", "*", "*", requests, prompt, completion, partial)
