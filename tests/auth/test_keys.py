"""Tests for llamaproxy.auth.keys and llamaproxy.auth.store."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from llamaproxy.auth.keys import (
    HEADER_MEMO_SIZE,
    HEADER_MEMO_VALUE_MAX,
    KeySet,
    authenticate,
    authenticate_headers,
    parse_expiration,
    parse_keys,
    presented_key,
)
from llamaproxy.auth.store import KeyLoadError, KeyStore
from llamaproxy.gateway.errors import GatewayError

KEY = "sk-abcdefghijklmnop"
NOW = datetime(2026, 6, 1, tzinfo=UTC)


class ParseTests(SynchronousTestCase):
    def test_forms(self) -> None:
        keys, warnings = parse_keys([
            "# comment", "", f"a:{KEY}", "b:sk-bbbbbbbbbbbbbbbb:120",
            "c:sk-cccccccccccccccc::2026-03-01T00:00:00",
            "d:sk-dddddddddddddddd:300:2026-12-31T23:59:59+02:00",
        ])
        self.assertEqual(warnings, [])
        self.assertEqual(len(keys), 4)
        self.assertEqual(keys.lookup("sk-bbbbbbbbbbbbbbbb").rate_limit, 120)  # type: ignore[union-attr]
        c = keys.lookup("sk-cccccccccccccccc")
        assert c is not None and c.expires is not None
        self.assertEqual(c.expires, datetime(2026, 3, 1, tzinfo=UTC))
        d = keys.lookup("sk-dddddddddddddddd")
        assert d is not None and d.expires is not None
        self.assertEqual(d.expires.utcoffset(), timedelta(hours=2))

    def test_invalid_lines_warn_with_line_number_only(self) -> None:
        lines = ["nocolon", "bad id:sk-aaaaaaaaaaaaaaaa", "x:short", "y:sk-yyyyyyyyyyyyyyyy:0",
                 "z:sk-zzzzzzzzzzzzzzzz::30d", f"a:{KEY}", f"dup:{KEY}"]
        keys, warnings = parse_keys(lines)
        self.assertEqual(len(keys), 1)
        self.assertEqual([w.split(":")[0] for w in warnings],
                         ["line 1", "line 2", "line 3", "line 4", "line 5", "line 7"])
        for warning in warnings:
            for secret in ("sk-aaaa", "short", "sk-yyyy", "sk-zzzz", KEY):
                self.assertNotIn(secret, warning)

    @given(st.lists(st.text(max_size=60), max_size=10))
    def test_never_raises_and_never_leaks(self, lines: list[str]) -> None:
        _keys, warnings = parse_keys(lines)
        for warning in warnings:
            for line in lines:
                parts = line.split(":")
                if len(parts) > 1 and len(parts[1].strip()) >= 16:
                    self.assertNotIn(parts[1].strip(), warning)

    def test_expiration(self) -> None:
        self.assertEqual(parse_expiration("2026-01-01T00:00:00Z"), datetime(2026, 1, 1, tzinfo=UTC))
        self.assertEqual(parse_expiration("2026-01-01T01:00:00+01:00"),
                         datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))))


class AuthenticateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.keys = parse_keys([f"a:{KEY}", "old:sk-oooooooooooooooo::2026-01-01T00:00:00"])[0]

    def message(self, presented: str | None) -> str:
        result = authenticate(self.keys, presented, NOW)
        assert isinstance(result, GatewayError)
        return result.message

    def test_outcomes(self) -> None:
        self.assertEqual(authenticate(self.keys, KEY, NOW).key_id, "a")  # type: ignore[union-attr]
        self.assertEqual(self.message(None), "Missing Authorization header")
        self.assertEqual(self.message("bad key!"), "Invalid API key format")
        self.assertEqual(self.message("sk-zzzzzzzzzzzzzzzz"), "Invalid API key")
        self.assertEqual(self.message("sk-oooooooooooooooo"), "API key has expired")
        empty = parse_keys([])[0]
        result = authenticate(empty, KEY, NOW)
        assert isinstance(result, GatewayError)
        self.assertEqual(result.message, "Authentication misconfigured: no API keys loaded")

    def test_presented_key(self) -> None:
        self.assertEqual(presented_key(b"Bearer abc", None), "abc")
        self.assertEqual(presented_key(b"bEaReR   abc ", None), "abc")
        self.assertEqual(presented_key(b"abc", None), "abc")
        self.assertEqual(presented_key(None, b" xyz "), "xyz")
        self.assertEqual(presented_key(b"", b"xyz"), "xyz")
        self.assertIsNone(presented_key(None, None))


class AuthenticateHeadersTests(SynchronousTestCase):
    """``authenticate_headers``: ``authenticate`` from the raw headers, reading the clock only
    when it matters."""

    def setUp(self) -> None:
        self.keys = parse_keys([f"a:{KEY}", "soon:sk-ssssssssssssssss::2026-06-01T00:00:10"])[0]
        self.now = NOW
        self.clock_reads = 0

    def read_clock(self) -> datetime:
        self.clock_reads += 1
        return self.now

    def check(self, authorization: bytes | None, x_api_key: bytes | None = None,
              keys: KeySet | None = None) -> str:
        result = authenticate_headers(self.keys if keys is None else keys, authorization,
                                      x_api_key, self.read_clock)
        return result.message if isinstance(result, GatewayError) else result.key_id

    def test_same_answers_as_authenticate(self) -> None:
        empty = parse_keys([])[0]
        pairs: list[tuple[bytes | None, bytes | None]] = [
            (f"Bearer {KEY}".encode(), None), (KEY.encode(), None), (None, KEY.encode()),
            (b"", KEY.encode()), (b"Bearer  ", KEY.encode()), (b"Bearer bad key!", None),
            (b"Bearer sk-zzzzzzzzzzzzzzzz", None), (None, None), (b"   ", None),
            (b"Bearer sk-ssssssssssssssss", None), (f"Bearer {KEY}".encode(), b"other"),
        ]
        for now in (NOW, NOW + timedelta(seconds=10)):
            self.now = now
            for keys in (self.keys, empty):
                for _ in range(2):  # the same again (answered from the memo, where there is one)
                    for authorization, x_api_key in pairs:
                        expected = authenticate(
                            keys, presented_key(authorization, x_api_key), now)
                        want = (expected.message if isinstance(expected, GatewayError)
                                else expected.key_id)
                        self.assertEqual(self.check(authorization, x_api_key, keys), want)

    def test_the_clock_is_read_only_for_keys_that_expire(self) -> None:
        self.check(f"Bearer {KEY}".encode())
        self.check(f"Bearer {KEY}".encode())
        self.assertEqual(self.clock_reads, 0)
        self.assertEqual(self.check(b"Bearer sk-ssssssssssssssss"), "soon")
        self.assertEqual(self.clock_reads, 1)
        self.now = NOW + timedelta(seconds=10)
        self.assertEqual(self.check(b"Bearer sk-ssssssssssssssss"), "API key has expired")
        self.assertEqual(self.clock_reads, 2)


class HeaderMemoTests(AuthenticateHeadersTests):
    """``KeySet.matched``: what ``authenticate_headers`` remembers, and when it forgets."""

    def test_only_matches_are_remembered(self) -> None:
        self.check(b"Bearer sk-zzzzzzzzzzzzzzzz")
        self.check(b"Bearer bad key!")
        self.check(None)
        self.check(b"", b"sk-zzzzzzzzzzzzzzzz")
        self.assertEqual(self.keys.matched, {})
        self.check(f"Bearer {KEY}".encode())
        self.assertEqual(list(self.keys.matched), [(f"Bearer {KEY}".encode(), None)])

    def test_a_remembered_key_still_expires(self) -> None:
        authorization = b"Bearer sk-ssssssssssssssss"
        self.assertEqual(self.check(authorization), "soon")
        self.assertIn((authorization, None), self.keys.matched)
        self.now = NOW + timedelta(seconds=10)
        self.assertEqual(self.check(authorization), "API key has expired")

    def key_file(self, text: str) -> tuple[str, KeyStore]:
        """A key file holding ``text``, and a store that loaded it."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        store = KeyStore(path)
        store.load()
        return path, store

    def test_a_reload_forgets_removed_keys(self) -> None:
        path, store = self.key_file(f"a:{KEY}\n")
        authorization = f"Bearer {KEY}".encode()
        self.assertEqual(self.check(authorization, keys=store.keys), "a")
        self.assertIn((authorization, None), store.keys.matched)
        with open(path, "w") as f:
            f.write("b:sk-bbbbbbbbbbbbbbbb\n")
        store.load("reload")
        self.assertEqual(self.check(authorization, keys=store.keys), "Invalid API key")
        self.assertEqual(self.check(b"Bearer sk-bbbbbbbbbbbbbbbb", keys=store.keys), "b")

    def test_a_reload_that_changes_a_key_id_or_limit_is_seen(self) -> None:
        path, store = self.key_file(f"a:{KEY}:10\n")
        authorization = f"Bearer {KEY}".encode()
        for _ in range(2):
            result = authenticate_headers(store.keys, authorization, None, self.read_clock)
            assert not isinstance(result, GatewayError)
            self.assertEqual((result.key_id, result.rate_limit), ("a", 10))
        with open(path, "w") as f:
            f.write(f"renamed:{KEY}:20\n")
        store.load("reload")
        result = authenticate_headers(store.keys, authorization, None, self.read_clock)
        assert not isinstance(result, GatewayError)
        self.assertEqual((result.key_id, result.rate_limit), ("renamed", 20))

    def test_bounded(self) -> None:
        # One valid key, any number of spellings (or of junk X-Api-Key values beside it).
        for n in range(HEADER_MEMO_SIZE + 10):
            self.assertEqual(self.check(f"Bearer {KEY}".encode(), str(n).encode()), "a")
            self.assertLessEqual(len(self.keys.matched), HEADER_MEMO_SIZE)
        self.assertEqual(len(self.keys.matched), 10)  # started over once, when full
        long = b" " * HEADER_MEMO_VALUE_MAX
        self.assertEqual(self.check(f"Bearer {KEY}".encode(), long), "a")
        self.assertNotIn((f"Bearer {KEY}".encode(), long), self.keys.matched)


class WatcherTests(SynchronousTestCase):
    def test_reload_when_content_changes(self) -> None:
        from twisted.internet.task import Clock

        from llamaproxy.auth.store import KeyFileWatcher

        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"a:{KEY}\n")
        store = KeyStore(path)
        store.load()
        clock = Clock()
        watcher = KeyFileWatcher(store, clock, 5)
        watcher.startService()
        self.assertFalse(store.reload_if_changed())
        os.utime(path, (1, 1))  # touched, same content: no reload
        self.assertFalse(store.reload_if_changed())
        with open(path, "a") as f:
            f.write("b:sk-bbbbbbbbbbbbbbbb\n")
        clock.advance(5)
        self.assertIsNotNone(store.keys.lookup("sk-bbbbbbbbbbbbbbbb"))
        os.remove(path)
        clock.advance(5)  # gone: keep the keys, say so once
        clock.advance(5)
        self.assertEqual(len(store.keys), 2)
        with open(path, "w") as f:
            f.write("# emptied\n")
        clock.advance(5)
        self.assertEqual(len(store.keys), 0)
        watcher.stopService()
        self.assertFalse(clock.getDelayedCalls())

    def test_a_failing_check_does_not_stop_the_watcher(self) -> None:
        from twisted.internet.task import Clock

        from llamaproxy.auth.store import KeyFileWatcher

        store = KeyStore(self.mktemp())
        calls: list[int] = []

        def broken(reason: str, only_if_changed: bool = False) -> object:
            calls.append(1)
            raise RuntimeError("boom")

        store.refresh = broken  # type: ignore[method-assign,assignment]
        clock = Clock()
        watcher = KeyFileWatcher(store, clock, 1)
        watcher.startService()
        clock.advance(1)
        clock.advance(1)
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        watcher.stopService()


class UnsafeKeyFileTests(SynchronousTestCase):
    """Issue 15.6: the key file pointing at /dev/zero (the gateway was OOM-killed) or at a FIFO
    (the event loop blocked until someone wrote to it) keeps the old keys and never blocks."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        with open(self.path, "w") as f:
            f.write(f"a:{KEY}\n")
        self.store = KeyStore(self.path)
        self.store.load()

    def point_at(self, target: str) -> None:
        os.remove(self.path)
        os.symlink(os.path.abspath(target), self.path)

    def assert_refused(self, why: str) -> None:
        with self.assertRaises(KeyLoadError) as caught:
            self.store.load("test")
        self.assertIn(why, str(caught.exception))
        failure = self.failureResultOf(self.store.refresh("test"), KeyLoadError)
        self.assertIn(why, failure.getErrorMessage())
        self.assertFalse(self.store.reload_if_changed())
        self.assertEqual(len(self.store.keys), 1)  # the old keys stay in force

    def test_dev_zero(self) -> None:
        self.point_at("/dev/zero")
        self.assert_refused("not a regular file")

    def test_fifo(self) -> None:
        fifo = self.mktemp()
        os.mkfifo(fifo)
        self.point_at(fifo)
        self.assert_refused("not a regular file")  # returns at once: nobody writes to it

    def test_directory(self) -> None:
        self.point_at(os.path.dirname(os.path.abspath(self.path)))
        self.assert_refused("not a regular file")

    def test_too_large(self) -> None:
        from llamaproxy.bounded_file import MAX_CONFIG_FILE_SIZE

        with open(self.path, "ab") as f:
            f.truncate(MAX_CONFIG_FILE_SIZE + 1)
        self.assert_refused("larger than")

    def test_refresh_runs_off_thread(self) -> None:
        """The read and the parse go to the store's OffThread (the reactor's pool in twistd)."""
        from twisted.internet.defer import Deferred

        ran: list[object] = []

        class Recording:
            def __call__(self, f: object, *args: object) -> Deferred[object]:
                ran.append(f)
                return Deferred()

        store = KeyStore(self.path, off_thread=Recording())  # type: ignore[arg-type]
        store.refresh("test")
        self.assertEqual(ran, [store._read])


class StoreTests(SynchronousTestCase):
    def test_load_and_keep_on_failure(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"a:{KEY}\n")
        store = KeyStore(path)
        self.assertEqual(store.load(), 1)
        os.remove(path)
        self.assertRaises(KeyLoadError, store.load)
        self.assertEqual(len(store()), 1)
        with open(path, "w") as f:
            f.write("# nothing\n")
        self.assertEqual(store.load(), 0)


class InotifyWatchTests(TestCase):
    """The key file watched through inotify with the real reactor (issue 16.12)."""

    async def test_a_rename_over_the_file_is_seen_without_polling(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.task import Clock, deferLater

        from llamaproxy.auth.store import KeyFileWatcher

        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "api_keys.txt")
        with open(path, "w") as f:
            f.write(f"a:{KEY}\n")
        store = KeyStore(path)
        store.load()
        polls = Clock()  # never advanced: only inotify can see the change
        watcher = KeyFileWatcher(store, polls, 5, notify_reactor=reactor)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        if not watcher.notified:
            raise SkipTest("no inotify on this platform")
        temporary = path + ".tmp"
        with open(temporary, "w") as f:  # what `llamaproxy keys` does: write, then rename
            f.write(f"a:{KEY}\nb:sk-bbbbbbbbbbbbbbbb\n")
        os.rename(temporary, path)
        for _ in range(100):
            if store.keys.lookup("sk-bbbbbbbbbbbbbbbb") is not None:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertIsNotNone(store.keys.lookup("sk-bbbbbbbbbbbbbbbb"))
