"""Tests for llamaproxy.admin.sessions: admin-only login, expiry, revocation, CSRF, lockout."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.admin.sessions import MAX_FAILURES, MAX_SESSIONS, LoginError
from llamaproxy.auth.keys import parse_keys
from tests.admin.fixtures import ADMIN_KEY, USER_KEY, PageWorld


class SessionStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = PageWorld()
        self.sessions = self.world.sessions

    def test_admin_logs_in(self) -> None:
        token, session = self.sessions.login(ADMIN_KEY, "1.2.3.4")
        self.assertEqual(session.key_id, "boss")
        self.assertIs(self.sessions.lookup(token), session)
        self.assertNotIn(ADMIN_KEY, repr(session))
        self.assertTrue(self.sessions.csrf_ok(session, session.csrf))
        self.assertFalse(self.sessions.csrf_ok(session, "wrong"))
        self.assertFalse(self.sessions.csrf_ok(session, None))
        self.sessions.logout(token)
        self.assertIsNone(self.sessions.lookup(token))

    def test_non_admin_and_unknown_keys_refused(self) -> None:
        with self.assertRaises(LoginError) as e:
            self.sessions.login(USER_KEY, "c")
        self.assertIn("not an admin key", str(e.exception))
        self.assertRaises(LoginError, self.sessions.login, "sk-nobody-0123456789abcdef", "c")
        self.assertRaises(LoginError, self.sessions.login, "", "c")
        self.assertEqual(len(self.sessions), 0)

    def test_expiry(self) -> None:
        token, _ = self.sessions.login(ADMIN_KEY, "c")
        self.world.clock.advance(599)
        self.assertIsNotNone(self.sessions.lookup(token))
        self.world.clock.advance(1)
        self.assertIsNone(self.sessions.lookup(token))
        self.assertEqual(len(self.sessions), 0)

    def test_revoked_when_the_key_is_removed_or_rotated(self) -> None:
        token, _ = self.sessions.login(ADMIN_KEY, "c")
        self.world.keys = parse_keys(["boss:sk-rotated-0123456789abcdef"])[0]
        self.assertIsNone(self.sessions.lookup(token))
        token, _ = self.sessions.login("sk-rotated-0123456789abcdef", "c")
        self.world.keys = parse_keys(["alice:sk-rotated-0123456789abcdef"])[0]
        self.assertIsNone(self.sessions.lookup(token))

    def test_unknown_tokens(self) -> None:
        self.assertIsNone(self.sessions.lookup(None))
        self.assertIsNone(self.sessions.lookup("nope"))

    def test_failed_logins_lock_the_address_for_a_minute(self) -> None:
        for _ in range(MAX_FAILURES):
            self.assertRaises(LoginError, self.sessions.login, USER_KEY, "evil")
        with self.assertRaises(LoginError) as e:
            self.sessions.login(ADMIN_KEY, "evil")
        self.assertIn("Too many failed logins", str(e.exception))
        self.sessions.login(ADMIN_KEY, "friend")  # other addresses are not affected
        self.world.clock.advance(60)
        self.sessions.login(ADMIN_KEY, "evil")

    def test_bounded(self) -> None:
        tokens = [self.sessions.login(ADMIN_KEY, "c")[0] for _ in range(MAX_SESSIONS + 3)]
        self.assertEqual(len(self.sessions), MAX_SESSIONS)
        self.assertIsNone(self.sessions.lookup(tokens[0]))
        self.assertIsNotNone(self.sessions.lookup(tokens[-1]))
