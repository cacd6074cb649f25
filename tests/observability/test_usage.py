"""Tests for llamaproxy.observability.usage: the SQLite usage ledger and the tokens-per-minute
limiter."""

from __future__ import annotations

import copy
import os
import sqlite3
import stat
from datetime import UTC, date, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import LogEvent, Logger, LogLevel
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaproxy.auth.tokenlimit import TokenRateLimiter
from llamaproxy.observability import usage
from llamaproxy.observability.usage import (
    UsageLedger,
    UsageRow,
    grand_total,
    open_ledger,
    query,
    totals_by_key,
    write_batch,
)

#: 2026-06-01T12:00:00Z
NOON = datetime(2026, 6, 1, 12, tzinfo=UTC).timestamp()


class LedgerTests(TestCase):
    """The ledger with a Clock for its timers and a real thread pool for SQLite."""

    def setUp(self) -> None:
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="test-usage")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.clock = Clock()
        self.clock.advance(NOON)
        self.path = os.path.join(os.path.abspath(self.mktemp()), "data", "usage.sqlite3")
        self.events: list[LogEvent] = []
        self.patch(usage, "log", Logger(observer=self.events.append))

    def ledger(self, **kwargs: Any) -> UsageLedger:
        ledger = UsageLedger(self.path, self.clock, reactor, self.pool, **kwargs)
        ledger.startService()
        return ledger

    def test_odd_counts_are_stored_as_tokens_says(self) -> None:
        """``record`` reads a non-negative int itself and leaves the rest to ``_tokens``."""
        ledger = UsageLedger(self.path, self.clock, reactor, self.pool)
        odd: list[Any] = [True, 2.9, "x", -1, 2**70, None, 0, 7]
        for value in odd:
            ledger.record("a", "m", value, value)
        total = sum(usage._tokens(value) for value in odd)
        self.assertEqual(total, 1 + 2 + 2**70 + 7)
        self.assertEqual(ledger.pending,
                         [UsageRow("2026-06-01", "a", "m", len(odd), total, total)])

    @given(st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                     st.booleans()))
    def test_tokens_is_max_of_zero_and_int(self, value: Any) -> None:
        self.assertEqual(usage._tokens(value), max(0, int(value)))
        self.assertIs(type(usage._tokens(value)), int)

    async def test_record_flush_query(self) -> None:
        ledger = self.ledger()
        ledger.record("alice", "qwen", 10, 20)
        ledger.record("alice", "qwen", 1, 2)
        ledger.record("bob", "qwen", 5, None)
        ledger.record(None, None, -3, 4)
        self.assertEqual(len(ledger.pending), 3)
        await ledger.flush()
        self.assertEqual(ledger.pending, [])
        self.assertEqual(
            query(self.path),
            [
                UsageRow("2026-06-01", "-", "-", 1, 0, 4),
                UsageRow("2026-06-01", "alice", "qwen", 2, 11, 22),
                UsageRow("2026-06-01", "bob", "qwen", 1, 5, 0),
            ],
        )
        await ledger.stopService()

    async def test_timer_flushes_and_only_when_needed(self) -> None:
        ledger = self.ledger(flush_interval=2.0)
        self.assertFalse(self.clock.getDelayedCalls())  # idle: no wake-ups
        ledger.record("alice", "m", 1, 1)
        self.clock.advance(1.9)
        self.assertEqual(len(ledger.pending), 1)
        self.clock.advance(0.1)
        self.assertEqual(ledger.pending, [])  # handed to the pool thread
        await ledger.flush()  # waits for the timer's write
        self.assertEqual(query(self.path)[0].requests, 1)
        # Only the WAL checkpoint is scheduled (issue 24.2); no flush wake-ups.
        [checkpoint] = self.clock.getDelayedCalls()
        self.assertEqual(checkpoint.getTime(), self.clock.seconds() + ledger.checkpoint_interval)
        await ledger.stop()

    async def test_wal_stays_bounded_under_sustained_writes(self) -> None:
        """Issue 24.2: without checkpoints the WAL grew by every write (7 MB an hour)."""
        limit = 64 * 1024
        ledger = self.ledger(wal_limit=limit)
        largest = 0
        for flush in range(400):
            for key in range(20):
                ledger.record(f"key-{flush % 50}-{key}", "m", 10, 20)
            await ledger.flush()
            largest = max(largest, ledger.wal_size())
        # At most the limit plus one transaction's pages (a few KiB here).
        self.assertLess(largest, limit + 32 * 1024)
        self.assertGreater(ledger.checkpoints, 0)
        rows = query(self.path)
        self.assertEqual(sum(r.requests for r in rows), 400 * 20)
        await ledger.stop()

    async def test_wal_checkpointed_on_a_schedule(self) -> None:
        ledger = self.ledger(checkpoint_interval=60.0)
        ledger.record("alice", "m", 1, 1)
        await ledger.flush()
        self.assertGreater(ledger.wal_size(), 0)
        self.assertEqual(ledger.checkpoints, 0)
        self.clock.advance(60.0)
        assert ledger.checkpointing is not None
        await ledger.checkpointing
        self.assertEqual(ledger.checkpoints, 1)
        self.assertEqual(ledger.wal_size(), 0)  # truncated
        self.assertFalse(self.clock.getDelayedCalls())  # idle again: no wake-ups
        self.assertEqual(query(self.path)[0].requests, 1)
        await ledger.stop()

    async def test_records_during_a_flush_are_written_next(self) -> None:
        ledger = self.ledger()
        ledger.record("a", "m", 1, 1)
        first = ledger.flush()
        ledger.record("a", "m", 1, 1)
        self.assertFalse(self.clock.getDelayedCalls())  # the running flush reschedules
        await first
        await ledger.flush()
        self.assertEqual(query(self.path)[0].requests, 2)
        await ledger.stop()

    async def test_totals_survive_a_restart(self) -> None:
        first = self.ledger()
        first.record("alice", "qwen", 10, 20)
        await first.stopService()  # stop writes what is pending
        second = self.ledger()
        second.record("alice", "qwen", 1, 2)
        second.record("alice", "other", 3, 4)
        await second.stop()
        rows = {(r.key_id, r.model): r for r in query(self.path)}
        self.assertEqual(rows["alice", "qwen"], UsageRow("2026-06-01", "alice", "qwen", 2, 11, 22))
        self.assertEqual(rows["alice", "other"].total_tokens, 7)

    async def test_days_are_utc(self) -> None:
        self.clock.advance(12 * 3600 - 1)  # 23:59:59
        ledger = self.ledger()
        ledger.record("a", "m", 1, 0)
        self.clock.advance(1)  # midnight
        ledger.record("a", "m", 2, 0)
        await ledger.stop()
        self.assertEqual(
            [(r.day, r.prompt_tokens) for r in query(self.path)],
            [("2026-06-01", 1), ("2026-06-02", 2)],
        )

    async def test_file_mode_and_wal(self) -> None:
        ledger = self.ledger()
        ledger.record("a", "m", 1, 0)
        await ledger.flush()
        umask = os.umask(0)
        os.umask(umask)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640 & ~umask)
        reader = sqlite3.connect(self.path)
        self.addCleanup(reader.close)
        self.assertEqual(reader.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        # a reader inside a transaction does not block the writer
        reader.execute("BEGIN")
        reader.execute("SELECT * FROM usage").fetchall()
        ledger.record("a", "m", 1, 0)
        await ledger.flush()
        reader.execute("COMMIT")
        self.assertEqual(ledger.query()[0].requests, 2)
        await ledger.stop()

    async def test_failed_write_keeps_counts_and_logs_once(self) -> None:
        real = usage.write_batch
        failures = [sqlite3.OperationalError("disk I/O error")] * 2

        def flaky(connection: sqlite3.Connection, batch: Any) -> None:
            if failures:
                raise failures.pop()
            real(connection, batch)

        self.patch(usage, "write_batch", flaky)
        ledger = self.ledger()
        ledger.record("a", "m", 1, 1)
        await ledger.flush()
        ledger.record("a", "m", 1, 1)
        await ledger.flush()
        self.assertEqual(ledger.pending, [UsageRow("2026-06-01", "a", "m", 2, 2, 2)])
        errors = [e for e in self.events if e["log_level"] is LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["error"], "disk I/O error")
        self.assertTrue(self.clock.getDelayedCalls())  # a retry is scheduled
        await ledger.flush()
        self.assertEqual(query(self.path), [UsageRow("2026-06-01", "a", "m", 2, 2, 2)])
        self.assertIn("writable again", self.events[-1]["log_format"])
        await ledger.stop()

    async def test_unwritable_path_counts_in_memory(self) -> None:
        os.makedirs(os.path.dirname(os.path.dirname(self.path)))
        with open(os.path.dirname(self.path), "w") as f:
            f.write("a file where the directory should be")
        ledger = self.ledger()
        ledger.record("a", "m", 1, 1)
        await ledger.stop()
        messages = [e["log_format"] for e in self.events if e["log_level"] is LogLevel.error]
        self.assertTrue(any("Cannot open the usage ledger" in m for m in messages), messages)
        self.assertTrue(any("could not be written" in m for m in messages), messages)
        self.assertFalse(self.clock.getDelayedCalls())

    async def test_stop_is_idempotent_and_later_records_ignored(self) -> None:
        ledger = self.ledger()
        ledger.record("a", "m", 1, 1)
        first, second = ledger.stop(), ledger.stop()
        await first
        await second
        ledger.record("a", "m", 1, 1)
        self.assertEqual(ledger.pending, [])
        self.assertEqual(query(self.path)[0].requests, 1)

    async def test_own_pool(self) -> None:
        ledger = UsageLedger(self.path, self.clock, reactor)
        ledger.startService()
        ledger.record("a", "m", 1, 1)
        await ledger.stopService()
        self.assertFalse(ledger._pool.started)
        self.assertEqual(query(self.path)[0].requests, 1)

    async def test_own_pool_stopped_without_start(self) -> None:
        ledger = UsageLedger(self.path, self.clock, reactor)
        ledger.record("a", "m", 1, 1)
        await ledger.stop()
        self.assertEqual(query(self.path)[0].requests, 1)


class QueryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(os.path.abspath(self.mktemp()), "usage.sqlite3")
        connection = open_ledger(self.path)
        write_batch(connection, [
            ("2026-05-30", "alice", "m1", 1, 10, 100, 0),
            ("2026-05-31", "alice", "m1", 2, 20, 200, 1),
            ("2026-05-31", "bob", "m2", 3, 30, 300, 0),
            ("2026-06-01", "alice", "m2", 4, 40, 400, 0),
        ])
        connection.close()

    def test_filters(self) -> None:
        self.assertEqual(len(query(self.path)), 4)
        self.assertEqual([r.requests for r in query(self.path, key="alice")], [1, 2, 4])
        self.assertEqual([r.requests for r in query(self.path, since=date(2026, 5, 31))],
                         [2, 3, 4])
        self.assertEqual(
            [r.requests for r in query(self.path, "alice", date(2026, 5, 31), date(2026, 5, 31))],
            [2],
        )
        self.assertEqual(query(self.path, key="nobody"), [])

    def test_totals(self) -> None:
        rows = query(self.path)
        by_key = totals_by_key(rows)
        self.assertEqual(by_key["alice"], UsageRow("*", "alice", "*", 7, 70, 700, 1))
        self.assertEqual(by_key["bob"].total_tokens, 330)
        self.assertEqual(grand_total(rows), UsageRow("*", "*", "*", 10, 100, 1000, 1))

    def test_missing_file_not_created(self) -> None:
        missing = self.path + ".missing"
        self.assertRaises(FileNotFoundError, query, missing)
        self.assertFalse(os.path.exists(missing))

    def test_empty_database_file(self) -> None:
        empty = self.path + ".empty"
        open(empty, "w").close()
        self.assertEqual(query(empty), [])

    def test_read_only_file(self) -> None:
        os.chmod(self.path, 0o440)
        self.addCleanup(os.chmod, self.path, 0o640)
        if os.access(self.path, os.W_OK):  # root ignores modes
            self.skipTest("root ignores file modes: no read-only file can be made here")
        self.assertEqual(len(query(self.path)), 4)

    def test_resolve_ledger_path(self) -> None:
        self.assertEqual(usage.resolve_ledger_path(None, "/d"), "/d/usage.sqlite3")
        self.assertIsNone(usage.resolve_ledger_path("off", "/d"))
        self.assertEqual(usage.resolve_ledger_path("/x.db", "/d"), "/x.db")

    def test_newer_schema_refused(self) -> None:
        connection = sqlite3.connect(self.path)
        connection.execute("PRAGMA user_version=99")
        connection.close()
        self.assertRaises(sqlite3.DatabaseError, open_ledger, self.path)


class TokenRateLimiterTests(SynchronousTestCase):
    def make(self) -> tuple[Clock, TokenRateLimiter]:
        clock = Clock()
        clock.advance(1000)
        return clock, TokenRateLimiter(clock)

    def test_allowed_until_spent(self) -> None:
        _, limiter = self.make()
        self.assertIsNone(limiter.check("a", 100))
        limiter.spend("a", 60)
        self.assertIsNone(limiter.check("a", 100))
        limiter.spend("a", 60)  # one request may overshoot
        retry = limiter.check("a", 100)
        assert retry is not None
        self.assertGreaterEqual(retry, 1)
        self.assertIsNone(limiter.check("b", 100))  # other keys are unaffected
        self.assertEqual(limiter.used("a"), 120)

    def test_retry_after_is_exact(self) -> None:
        clock, limiter = self.make()
        limiter.spend("a", 100)
        retry = limiter.check("a", 100)
        self.assertEqual(retry, 61)  # the burst leaves the window after it
        clock.advance(60)
        self.assertIsNotNone(limiter.check("a", 100))
        clock.advance(1)
        self.assertIsNone(limiter.check("a", 100))

    def test_purge(self) -> None:
        clock, limiter = self.make()
        limiter.spend("a", 1)
        clock.advance(121)
        self.assertEqual(limiter.purge(), 1)
        self.assertEqual(len(limiter), 0)
        self.assertEqual(limiter.used("a"), 0.0)

    def test_bad_limit(self) -> None:
        _, limiter = self.make()
        self.assertRaises(ValueError, limiter.check, "a", 0)

    def test_negative_spend_ignored(self) -> None:
        _, limiter = self.make()
        limiter.spend("a", -5)
        self.assertEqual(limiter.used("a"), 0)

    @given(
        st.lists(st.tuples(st.floats(0, 90), st.integers(0, 500)), min_size=1, max_size=20),
        st.integers(1, 1000),
    )
    def test_retry_after_matches_check(self, steps: list[tuple[float, int]], limit: int) -> None:
        clock, limiter = self.make()
        for delay, tokens in steps:
            clock.advance(delay)
            retry = limiter.check("k", limit)
            if retry is not None:
                self.assertGreaterEqual(retry, 1)
                later_clock, later = copy.deepcopy((clock, limiter))
                later_clock.advance(retry)
                self.assertIsNone(later.check("k", limit))
                if retry > 1:
                    earlier_clock, earlier = copy.deepcopy((clock, limiter))
                    earlier_clock.advance(retry - 1)
                    self.assertIsNotNone(earlier.check("k", limit))
            limiter.spend("k", tokens)


class SchemaTests(SynchronousTestCase):
    """The ``partial`` column (issue 15.2): a version 1 ledger gains it when opened."""

    def test_version_1_ledger_is_migrated(self) -> None:
        path = self.mktemp()
        old = sqlite3.connect(path)
        old.execute(
            "CREATE TABLE usage (day TEXT NOT NULL, key_id TEXT NOT NULL, model TEXT NOT NULL, "
            "requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0, "
            "completion_tokens INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (day, key_id, model)) "
            "WITHOUT ROWID")
        old.execute("INSERT INTO usage VALUES ('2026-06-01', 'a', 'm', 2, 20, 200)")
        old.execute("PRAGMA user_version=1")
        old.commit()
        old.close()
        self.assertEqual(query(path), [UsageRow("2026-06-01", "a", "m", 2, 20, 200, 0)])
        connection = open_ledger(path)
        write_batch(connection, [("2026-06-01", "a", "m", 1, 5, 7, 1)])
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], 2)
        connection.close()
        self.assertEqual(query(path), [UsageRow("2026-06-01", "a", "m", 3, 25, 207, 1)])

    def test_partial_is_counted(self) -> None:
        clock = Clock()
        clock.advance(NOON)
        ledger = UsageLedger(self.mktemp(), clock, reactor)
        ledger.record("a", "m", 10, 5, partial=True)
        ledger.record("a", "m", 1, 1)
        self.assertEqual(ledger.pending, [UsageRow("2026-06-01", "a", "m", 2, 11, 6, 1)])
