"""STATE_URL and STATE_FAILURE parsing: strict, and the password never shown."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.config import ConfigError, load_config
from llamaproxy.state.url import StateURL, parse_failure_mode, parse_state_url


class StateURLTests(SynchronousTestCase):
    def test_valid_urls(self) -> None:
        self.assertIsNone(parse_state_url("  "))
        self.assertEqual(parse_state_url("redis://redis"), StateURL("redis"))
        url = parse_state_url("rediss://user:p%40ss@cache.example:6380/2")
        self.assertEqual(url, StateURL("cache.example", 6380, 2, True, "user", "p@ss"))
        assert url is not None
        self.assertNotIn("p@ss", repr(url))
        self.assertEqual(url.display(), "rediss://cache.example:6380/2")
        only_password = parse_state_url("redis://:secret@[::1]:7000/0")
        assert only_password is not None
        self.assertEqual((only_password.host, only_password.password), ("::1", "secret"))
        self.assertEqual(only_password.display(), "redis://[::1]:7000/0")
        empty = parse_state_url("redis://:@h")
        assert empty is not None
        self.assertIsNone(empty.password)

    def test_invalid_urls(self) -> None:
        for text in ("http://redis:6379", "redis://", "redis://h:99999", "redis://h:0",
                     "redis://h/db1", "redis://h/0?timeout=1", "redis://h:port", "h:6379"):
            with self.assertRaises(ValueError, msg=text):
                parse_state_url(text)

    def test_failure_modes(self) -> None:
        self.assertEqual(parse_failure_mode(" Closed "), "closed")
        with self.assertRaises(ValueError):
            parse_failure_mode("fail-open")

    def test_config_names_the_variable(self) -> None:
        base = {"BACKEND_URL": "http://127.0.0.1:8080"}
        config = load_config({}, base)
        self.assertEqual((config.state_url, config.state_failure), (None, "open"))
        with self.assertRaises(ConfigError) as raised:
            load_config({}, {**base, "STATE_URL": "redis://h:x"})
        self.assertIn("STATE_URL", str(raised.exception))
        with self.assertRaises(ConfigError) as raised:
            load_config({"state_failure": "maybe"}, base)
        self.assertIn("state-failure", str(raised.exception))
