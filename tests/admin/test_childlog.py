"""Tests for llamaproxy.admin.childlog: the child's log tail and its redaction."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.admin.childlog import MAX_SHOWN, REDACTED, ChildLogTail, redact
from llamaproxy.supervision.supervisor import CHILD_LOG_NAMESPACE


class RedactTests(SynchronousTestCase):
    def test_known_secret(self) -> None:
        self.assertEqual(redact("key is abc123secret!", ["abc123secret"]),
                         f"key is {REDACTED}!")

    def test_patterns(self) -> None:
        for line, gone in [
            ("Authorization: Bearer sk-abcdef0123456789", "sk-abcdef0123456789"),
            ("api_key=hunter2hunter2 next", "hunter2hunter2"),
            ('{"x-api-key": "zzzzzzzz"}', "zzzzzzzz"),
            ("using gateway-AbCdEfGhIjKlMnOpQrStUv", "gateway-AbCdEfGhIjKlMnOpQrStUv"),
            ("token: t0k3n", "t0k3n"),
        ]:
            self.assertNotIn(gone, redact(line), line)

    def test_request_bodies(self) -> None:
        line = 'srv log_server_r: request:  {"messages":[{"role":"user","content":"my secret"}]}'
        shown = redact(line)
        self.assertNotIn("my secret", shown)
        self.assertTrue(shown.startswith("srv log_server_r: request:  "))
        self.assertIn("redacted", shown)

    def test_ordinary_lines_untouched_and_cut(self) -> None:
        line = "srv  update_slots: all slots are idle"
        self.assertEqual(redact(line), line)
        self.assertEqual(len(redact("x" * 5000)), MAX_SHOWN + len(" [cut]"))


class ChildLogTailTests(SynchronousTestCase):
    def test_observes_child_lines_only(self) -> None:
        tail = ChildLogTail(lines=3)
        publisher = LogPublisher()
        publisher.addObserver(tail)
        source = SimpleNamespace(backend=SimpleNamespace(name="local"))
        child = Logger(namespace=CHILD_LOG_NAMESPACE, source=source, observer=publisher)
        other = Logger(namespace="llamaproxy.other", observer=publisher)
        for n in range(5):
            child.info("{line}", line=f"line {n}", stream="stderr", pid=1)
        other.info("not a child line")
        child.info("no line field")
        self.assertEqual(tail.backends(), ["local"])
        lines = tail.tail("local")
        self.assertEqual([line.text for line in lines], ["line 2", "line 3", "line 4"])
        self.assertEqual({line.stream for line in lines}, {"stderr"})
        self.assertGreater(lines[0].at, 0)
        self.assertEqual([line.text for line in tail.tail("local", count=1)], ["line 4"])
        self.assertEqual(tail.tail("nobody"), [])

    def test_secrets_redacted_when_read(self) -> None:
        tail = ChildLogTail()
        tail.add("local", "key gateway-xyz is fine? secretvalue")
        [line] = tail.tail("local", secrets=lambda: ["secretvalue", ""])
        self.assertEqual(line.text, f"key gateway-xyz is fine? {REDACTED}")
