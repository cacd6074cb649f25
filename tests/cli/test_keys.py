"""Tests for ``llamaproxy keys`` (llamaproxy.cli and llamaproxy.cli.keys)."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.auth import keyfile
from llamaproxy.auth.keys import parse_expiration, parse_keys
from llamaproxy.cli import keys as keys_cli
from llamaproxy.cli import main

KEY_PATTERN = r"sk-[A-Za-z0-9_-]{43}"
GENERATED = re.compile(
    rf"Generated key for '(?P<id>[^']+)': (?P<key>{KEY_PATTERN}) "
    r"\(rate_limit=(?P<limit>\d+/min|default), expires=(?P<expires>\S+|never)\)\n"
)
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


class CliTestCase(SynchronousTestCase):
    """Runs ``main`` with captured output against a key file in a temporary directory."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "api_keys.txt")

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        """Exit code, stdout and stderr of ``llamaproxy *argv``."""
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), stdout=out, stderr=err)
        self.assertNotIn("Traceback", err.getvalue())
        return code, out.getvalue(), err.getvalue()

    def keys(self, *argv: str) -> tuple[int, str, str]:
        """``llamaproxy keys --file <temp file> *argv``."""
        return self.run_cli("keys", "--file", self.path, *argv)

    def generate(self, name: str, *options: str) -> str:
        """Generate a key quietly and return it."""
        code, out, err = self.keys("-q", "generate", "--name", name, *options)
        self.assertEqual((code, err), (0, ""))
        return out.strip()

    def lines(self) -> list[str]:
        return Path(self.path).read_text().splitlines()

    def key_lines(self) -> list[str]:
        return [line for line in self.lines() if keyfile.line_key_id(line) is not None]

    def assert_parses_cleanly(self) -> None:
        """The gateway's parser reads the file without a single warning."""
        _, warnings = parse_keys(self.lines())
        self.assertEqual(warnings, [])


class GenerateTests(CliTestCase):
    """``keys generate``."""

    def test_creates_private_file_with_header_and_parents(self) -> None:
        self.path = os.path.join(self.directory, "a", "b", "api_keys.txt")
        code, out, err = self.keys("generate", "--name", "alice")
        self.assertEqual((code, err), (0, ""))
        match = GENERATED.fullmatch(out)
        assert match is not None, out
        self.assertEqual(match["id"], "alice")
        self.assertEqual((match["limit"], match["expires"]), ("default", "never"))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(self.lines(), [*keyfile.HEADER, f"alice:{match['key']}"])
        keys, warnings = parse_keys(self.lines())
        self.assertEqual(warnings, [])
        found = keys.lookup(match["key"])
        assert found is not None
        self.assertEqual((found.key_id, found.rate_limit, found.expires), ("alice", None, None))

    def test_line_forms(self) -> None:
        exp = "2027-01-01T00:00:00+00:00"
        plain = self.generate("plain")
        limited = self.generate("limited", "--rate-limit", "120")
        expiring = self.generate("expiring", "--expires", exp)
        both = self.generate("both", "--rate-limit", "5", "--expires", exp)
        self.assertEqual(
            self.key_lines(),
            [f"plain:{plain}", f"limited:{limited}:120", f"expiring:{expiring}::{exp}",
             f"both:{both}:5:{exp}"],
        )
        self.assert_parses_cleanly()

    def test_message_with_limit_and_expiry(self) -> None:
        code, out, _ = self.keys(
            "generate", "--name", "bob", "--rate-limit", "120", "--expires", "2027-01-01T00:00:00Z"
        )
        self.assertEqual(code, 0)
        match = GENERATED.fullmatch(out)
        assert match is not None, out
        self.assertEqual((match["limit"], match["expires"]), ("120/min", "2027-01-01T00:00:00Z"))

    def test_quiet_prints_only_the_key(self) -> None:
        code, out, err = self.keys("-q", "generate", "--name", "alice")
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, rf"\A{KEY_PATTERN}\n\Z")
        self.assertEqual(self.key_lines(), [f"alice:{out.strip()}"])

    def test_global_options_after_the_sub_command(self) -> None:
        code, out, _ = self.run_cli("keys", "generate", "--name", "a", "--file", self.path, "-q")
        self.assertEqual(code, 0)
        self.assertRegex(out, rf"\A{KEY_PATTERN}\n\Z")
        code, out, _ = self.run_cli("keys", "-q", "list", "--file", self.path)
        self.assertEqual((code, out), (0, "1 key(s) configured\n"))

    def test_refuses_duplicate_key_id(self) -> None:
        self.generate("alice")
        before = Path(self.path).read_bytes()
        code, out, err = self.keys("generate", "--name", "alice")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("already exists", err)
        self.assertIn("rotate", err)
        self.assertEqual(Path(self.path).read_bytes(), before)

    def test_an_invalid_line_still_blocks_its_key_id(self) -> None:
        Path(self.path).write_text("alice:short\n")
        code, _, err = self.keys("generate", "--name", "alice")
        self.assertEqual(code, 1)
        self.assertIn("already exists", err)

    def test_invalid_arguments_change_nothing(self) -> None:
        cases = [
            (["--name", "bad id"], "invalid key_id"),
            (["--name", "x" * 65], "invalid key_id"),
            (["--name", "a:b"], "invalid key_id"),
            (["--name", "a", "--rate-limit", "0"], "--rate-limit must be a positive integer"),
            (["--name", "a", "--rate-limit", "-5"], "--rate-limit must be a positive integer"),
            (["--name", "a", "--rate-limit", "ten"], "--rate-limit must be a positive integer"),
            (["--name", "a", "--expires", "3w"], "--expires '3w' is not valid"),
            (["--name", "a", "--expires", "tomorrow"], "is not valid"),
            (["--name", "a", "--expires", "30"], "is not valid"),
            (["--name", "a", "--expires", "0d"], "must be positive"),
            (["--name", "a", "--expires", "999999999999d"], "too far"),
        ]
        for argv, message in cases:
            code, out, err = self.keys("generate", *argv)
            self.assertEqual((code, out), (1, ""), argv)
            self.assertTrue(err.startswith("error: "), err)
            self.assertIn(message, err)
        self.assertFalse(os.path.exists(self.path))

    def test_keeps_existing_lines_verbatim(self) -> None:
        original = ["# my keys", "", "  # indented comment", "garbage without separator",
                    f"old:{'k' * 20}:60:2030-01-01T00:00:00", "broken:short", ""]
        Path(self.path).write_text("\n".join(original) + "\n")
        key = self.generate("new")
        self.assertEqual(self.lines(), [*original, f"new:{key}"])

    def test_file_system_error_is_a_message(self) -> None:
        blocker = os.path.join(self.directory, "file")
        Path(blocker).write_text("")
        self.path = os.path.join(blocker, "api_keys.txt")
        code, out, err = self.keys("generate", "--name", "a")
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("error: "), err)
        self.assertEqual(err.count("\n"), 1)

    def test_failed_write_keeps_the_file_and_leaves_no_temporary_file(self) -> None:
        self.generate("alice")
        before = Path(self.path).read_bytes()

        def fail(src: str, dst: str) -> None:
            raise OSError(28, "No space left on device", dst)

        self.patch(os, "replace", fail)
        code, _, err = self.keys("generate", "--name", "bob")
        self.assertEqual(code, 1)
        self.assertIn("No space left on device", err)
        self.assertEqual(Path(self.path).read_bytes(), before)
        self.assertEqual([n for n in os.listdir(self.directory) if n.endswith(".tmp")], [])


class ExpiresTests(CliTestCase):
    """``--expires``: relative durations and ISO 8601 timestamps."""

    def test_relative_forms(self) -> None:
        for text, delta in [("30d", timedelta(days=30)), ("24h", timedelta(hours=24)),
                            ("60m", timedelta(minutes=60))]:
            self.assertEqual(keys_cli.resolve_expires(text, NOW), (NOW + delta).isoformat())
        self.assertEqual(keys_cli.resolve_expires("30d", NOW), "2026-07-01T12:00:00+00:00")
        local = NOW.astimezone(timezone(timedelta(hours=2))).replace(microsecond=123456)
        self.assertEqual(keys_cli.resolve_expires("1m", local), "2026-06-01T12:01:00+00:00")

    def test_iso_kept_as_typed(self) -> None:
        for text in ["2027-01-01T00:00:00", "2027-01-01T00:00:00Z", "2027-01-01T02:00:00+02:00",
                     "2027-01-01"]:
            self.assertEqual(keys_cli.resolve_expires(text, NOW), text)

    def test_written_relative_expiry(self) -> None:
        for name, text, delta in [("d", "30d", timedelta(days=30)),
                                  ("h", "24h", timedelta(hours=24)),
                                  ("m", "60m", timedelta(minutes=60))]:
            before = datetime.now(UTC).replace(microsecond=0)
            key = self.generate(name, "--expires", text)
            after = datetime.now(UTC)
            line = self.key_lines()[-1]
            self.assertTrue(line.startswith(f"{name}:{key}::"))
            written = line.split(":", 3)[3]
            self.assertTrue(written.endswith("+00:00"), written)
            self.assertRegex(written, r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00\Z")
            expires = parse_expiration(written)
            self.assertTrue(before + delta <= expires <= after + delta)
        self.assert_parses_cleanly()

    def older_list(self) -> list[tuple[str, str]]:
        """What the older ``key_mgmt.py list`` does with each expiration: ``fromisoformat`` and a
        comparison with the naive local ``datetime.now()`` (a TypeError on an offset)."""
        rows = []
        for line in self.key_lines():
            fields = line.split(":", 3)
            if len(fields) > 3 and fields[3]:
                expired = datetime.fromisoformat(fields[3]) < datetime.now()
                rows.append((fields[0], "expired" if expired else "active"))
        return rows

    def test_older_format_file_gets_older_timestamps(self) -> None:
        """Issue 16.11: `--expires` wrote +00:00, which the older key_mgmt.py list crashed on."""
        Path(self.path).write_text("# API keys (key_mgmt.py)\n"
                                   "old:sk-olderkey0000000000000000000:10:2030-01-01T00:00:00\n")
        self.generate("new", "--expires", "30d")
        self.generate("typed", "--expires", "2031-01-01T02:00:00+02:00")
        self.keys("-q", "rotate", "--name", "old", "--expires", "24h")
        for line in self.key_lines():
            written = line.split(":", 3)[3]
            self.assertRegex(written, r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\Z")
        self.assertEqual(self.key_lines()[-1].split(":", 3)[3], "2031-01-01T00:00:00")
        self.assertEqual(sorted(self.older_list()),
                         [("new", "active"), ("old", "active"), ("typed", "active")])
        self.assert_parses_cleanly()

    def test_llamaproxy_files_keep_offsets(self) -> None:
        self.generate("first")  # creates the file with llamaproxy's header
        self.generate("new", "--expires", "30d")
        self.assertTrue(self.key_lines()[-1].endswith("+00:00"))
        self.assertFalse(keys_cli.older_format(["# llamaproxy API keys", "a:sk-x"]))
        self.assertFalse(keys_cli.older_format(["a:sk-x:1:2030-01-01T00:00:00Z"]))
        self.assertTrue(keys_cli.older_format(["# keys", "a:sk-x:1:2030-01-01T00:00:00"]))

    def test_past_expiry_warns(self) -> None:
        code, _, err = self.keys("generate", "--name", "old", "--expires", "2020-01-01T00:00:00")
        self.assertEqual(code, 0)
        self.assertIn("in the past", err)


class ListTests(CliTestCase):
    """``keys list``."""

    def test_table_never_shows_keys(self) -> None:
        secrets = [
            self.generate("alice"),
            self.generate("bob", "--rate-limit", "120", "--expires", "2999-01-01T00:00:00+02:00"),
            self.generate("naive-old", "--expires", "2020-01-01T00:00:00"),
            self.generate("aware-old", "--expires", "2020-01-01T00:00:00-05:00"),
        ]
        code, out, err = self.keys("list")
        self.assertEqual((code, err), (0, ""))
        for secret in secrets:
            self.assertNotIn(secret, out)
            self.assertNotIn(secret[:10], out)
        rows = [line.split() for line in out.splitlines()]
        self.assertEqual(rows[0], ["KEY_ID", "RATE_LIMIT", "EXPIRES", "STATUS"])
        self.assertEqual(rows[1:-1], [
            ["alice", "default", "-", "active"],
            ["bob", "120/min", "2999-01-01T00:00:00+02:00", "active"],
            ["naive-old", "default", "2020-01-01T00:00:00+00:00", "expired"],
            ["aware-old", "default", "2020-01-01T00:00:00-05:00", "expired"],
        ])
        self.assertEqual(out.splitlines()[-1], "4 key(s) configured")

    def test_naive_timestamps_mean_utc(self) -> None:
        soon = (datetime.now(UTC) + timedelta(minutes=30)).replace(tzinfo=None)
        self.generate("soon", "--expires", soon.isoformat(timespec="seconds"))
        # In a UTC-5 view this would already be expired; as UTC it is still active.
        _, out, _ = self.keys("list")
        self.assertIn("active", out.splitlines()[1])

    def test_quiet_prints_only_the_count(self) -> None:
        self.generate("a")
        self.generate("b")
        self.assertEqual(self.keys("-q", "list"), (0, "2 key(s) configured\n", ""))

    def test_missing_file(self) -> None:
        code, out, err = self.keys("list")
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"No key file at {self.path}", out)
        self.assertTrue(out.endswith("\n0 key(s) configured\n"))
        self.assertEqual(self.keys("-q", "list"), (0, "0 key(s) configured\n", ""))
        self.assertFalse(os.path.exists(self.path))

    def test_empty_file(self) -> None:
        Path(self.path).write_text("# nothing yet\n")
        code, out, _ = self.keys("list")
        self.assertEqual(code, 0)
        self.assertTrue(out.endswith("0 key(s) configured\n"))

    def test_invalid_lines_are_warned_about_without_their_keys(self) -> None:
        Path(self.path).write_text("good:sk-goodgoodgoodgood\nbad:sk-badbadbadbadbad:zero\nx:tiny\n")
        code, out, err = self.keys("list")
        self.assertEqual(code, 0)
        self.assertTrue(out.endswith("1 key(s) configured\n"))
        self.assertIn("line 2", err)
        self.assertIn("line 3", err)
        for secret in ["sk-goodgoodgoodgood", "sk-badbadbadbadbad", "tiny"]:
            self.assertNotIn(secret, out + err)


class RotateTests(CliTestCase):
    """``keys rotate``."""

    def test_new_key_keeps_limit_and_expiry(self) -> None:
        exp = "2030-01-01T00:00:00"
        old = self.generate("alice", "--rate-limit", "42", "--expires", exp)
        other = self.generate("bob")
        code, out, err = self.keys("rotate", "--name", "alice")
        self.assertEqual((code, err), (0, ""))
        match = re.fullmatch(
            rf"Rotated key for 'alice': ({KEY_PATTERN}) \(rate_limit=42/min, expires={exp}\)\n", out
        )
        assert match is not None, out
        new = match[1]
        self.assertNotEqual(new, old)
        self.assertEqual(self.key_lines(), [f"alice:{new}:42:{exp}", f"bob:{other}"])
        keys, warnings = parse_keys(self.lines())
        self.assertEqual(warnings, [])
        self.assertIsNone(keys.lookup(old))
        self.assertIsNotNone(keys.lookup(new))

    def test_expires_replaces_the_expiry(self) -> None:
        self.generate("alice", "--rate-limit", "7", "--expires", "2030-01-01T00:00:00")
        new = self.keys("-q", "rotate", "--name", "alice", "--expires", "2031-01-01T00:00:00Z")[1]
        self.assertRegex(new, rf"\A{KEY_PATTERN}\n\Z")
        self.assertEqual(self.key_lines(), [f"alice:{new.strip()}:7:2031-01-01T00:00:00Z"])
        self.generate("bob")
        self.keys("-q", "rotate", "--name", "bob", "--expires", "24h")
        self.assertRegex(self.key_lines()[1], rf"\Abob:{KEY_PATTERN}::\S+\+00:00\Z")
        self.assert_parses_cleanly()

    def test_keeps_other_lines_and_position(self) -> None:
        Path(self.path).write_text(f"# head\na:{'a' * 20}\n\n# mid\nb:{'b' * 20}:9\nc:{'c' * 20}\n")
        new = self.keys("-q", "rotate", "--name", "b")[1].strip()
        self.assertEqual(self.lines(), ["# head", f"a:{'a' * 20}", "", "# mid", f"b:{new}:9",
                                        f"c:{'c' * 20}"])

    def test_duplicate_lines_collapse_to_one(self) -> None:
        Path(self.path).write_text(f"a:{'a' * 20}:3\n# x\na:{'b' * 20}:4\n")
        code, out, _ = self.keys("rotate", "--name", "a")
        self.assertEqual(code, 0)
        self.assertIn("2 lines", out)
        self.assertEqual(len(self.key_lines()), 1)
        self.assertTrue(self.key_lines()[0].endswith(":3"))
        self.assertEqual(self.lines()[1], "# x")

    def test_errors(self) -> None:
        code, out, err = self.keys("rotate", "--name", "alice")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("no key file", err)
        self.assertFalse(os.path.exists(self.path))
        self.generate("bob")
        code, _, err = self.keys("rotate", "--name", "alice")
        self.assertEqual(code, 1)
        self.assertIn("'alice' not found", err)
        code, _, err = self.keys("rotate", "--name", "bob", "--expires", "soon")
        self.assertEqual(code, 1)
        self.assertIn("not valid", err)

    def test_broken_line_is_not_rotated_blindly(self) -> None:
        Path(self.path).write_text(f"a:{'a' * 20}:lots\nb:{'b' * 20}::yesterday\n")
        before = Path(self.path).read_bytes()
        code, _, err = self.keys("rotate", "--name", "a")
        self.assertEqual(code, 1)
        self.assertIn("invalid rate_limit", err)
        code, _, err = self.keys("rotate", "--name", "b")
        self.assertEqual(code, 1)
        self.assertIn("invalid expiration", err)
        self.assertEqual(Path(self.path).read_bytes(), before)
        self.assertEqual(self.keys("-q", "rotate", "--name", "b", "--expires", "1d")[0], 0)


class RemoveTests(CliTestCase):
    """``keys remove``."""

    def test_removes_only_that_key_id(self) -> None:
        Path(self.path).write_text(
            f"# head\na:{'a' * 20}\n\nb:{'b' * 20}:9\n# tail\nb:{'c' * 20}\n"
        )
        code, out, err = self.keys("remove", "--name", "b")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, "Removed key 'b' (2 lines)\n")
        self.assertEqual(self.lines(), ["# head", f"a:{'a' * 20}", "", "# tail"])
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(self.keys("-q", "remove", "--name", "a"), (0, "", ""))
        self.assertEqual(self.keys("remove", "--name", "a")[0], 1)

    def test_message(self) -> None:
        self.generate("a")
        self.assertEqual(self.keys("remove", "--name", "a"), (0, "Removed key 'a'\n", ""))
        self.assertEqual(self.keys("-q", "list")[1], "0 key(s) configured\n")

    def test_errors(self) -> None:
        code, out, err = self.keys("remove", "--name", "a")
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"no key file at {self.path}", err)
        self.generate("b")
        code, out, err = self.keys("remove", "--name", "a")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("'a' not found", err)


class CommandLineTests(CliTestCase):
    """The top-level command, its default key file, and the installed entry points."""

    def test_no_command_prints_help(self) -> None:
        code, out, err = self.run_cli()
        self.assertEqual((code, out), (1, ""))
        self.assertIn("usage: llamaproxy", err)
        self.assertIn("keys", err)

    def test_unknown_command_prints_help(self) -> None:
        code, _, err = self.run_cli("frobnicate")
        self.assertEqual(code, 1)
        self.assertIn("unknown command 'frobnicate'", err)
        self.assertIn("usage: llamaproxy", err)

    def test_keys_without_sub_command_prints_its_help(self) -> None:
        code, _, err = self.run_cli("keys")
        self.assertEqual(code, 1)
        self.assertIn("usage: llamaproxy keys", err)
        for command in ["generate", "list", "rotate", "remove"]:
            self.assertIn(command, err)

    def test_help_and_usage_errors(self) -> None:
        code, out, _ = self.run_cli("keys", "generate", "--help")
        self.assertEqual(code, 0)
        self.assertIn("--rate-limit", out)
        code, _, err = self.run_cli("keys", "generate")
        self.assertEqual(code, 2)
        self.assertIn("--name", err)
        self.assertEqual(self.run_cli("keys", "bogus")[0], 2)

    def test_default_file_from_environment(self) -> None:
        self.assertEqual(
            keys_cli.default_key_file({"AUTH_KEYS_FILE": "/k.txt", "DATA_DIR": "/d"}), "/k.txt"
        )
        self.assertEqual(keys_cli.default_key_file({"DATA_DIR": "/d"}), "/d/api_keys.txt")
        self.assertEqual(
            keys_cli.default_key_file({"AUTH_KEYS_FILE": " "}, lambda p: p == "/workspace"),
            "/workspace/api_keys.txt",
        )
        self.assertEqual(keys_cli.default_key_file({}, lambda p: False), "/data/api_keys.txt")

    def test_default_file_is_used(self) -> None:
        self.patch(os, "environ", {"DATA_DIR": self.directory})
        code, out, _ = self.run_cli("keys", "-q", "generate", "--name", "a")
        self.assertEqual(code, 0)
        self.assertIn(out.strip(), Path(self.path).read_text())
        other = os.path.join(self.directory, "other.txt")
        self.patch(os, "environ", {"DATA_DIR": "/nonexistent", "AUTH_KEYS_FILE": other})
        self.assertEqual(self.run_cli("keys", "-q", "generate", "--name", "b")[0], 0)
        self.assertTrue(os.path.exists(other))


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AUTH_KEYS_FILE", None)
    return env


class ProcessTests(CliTestCase):
    """Real processes: concurrency, locking, ``python -m llamaproxy`` and the console script."""

    def command(self, name: str) -> list[str]:
        return [sys.executable, "-m", "llamaproxy", "keys", "--file", self.path, "-q",
                "generate", "--name", name]

    def test_concurrent_generates_lose_nothing(self) -> None:
        processes = [
            subprocess.Popen(self.command(f"k{i}"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_subprocess_env())
            for i in range(8)
        ]
        printed = {}
        for index, process in enumerate(processes):
            out, err = process.communicate(timeout=120)
            self.assertEqual((process.returncode, err), (0, ""))
            printed[f"k{index}"] = out.strip()
        self.assertEqual(self.lines()[: len(keyfile.HEADER)], list(keyfile.HEADER))
        self.assertEqual(
            sorted(self.key_lines()), sorted(f"{name}:{key}" for name, key in printed.items())
        )
        keys, warnings = parse_keys(self.lines())
        self.assertEqual((len(keys), warnings), (8, []))
        self.assertEqual([n for n in os.listdir(self.directory) if n.endswith(".tmp")], [])

    def test_writer_waits_for_the_lock(self) -> None:
        self.generate("first")
        with keyfile.locked(self.path):
            process = subprocess.Popen(self.command("second"), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=_subprocess_env())
            self.addCleanup(process.kill)
            time.sleep(1.0)  # time enough to start; it must still be waiting for the lock
            self.assertIsNone(process.poll())
            self.assertEqual(len(self.key_lines()), 1)
        out, err = process.communicate(timeout=120)
        self.assertEqual((process.returncode, err), (0, ""))
        self.assertEqual(self.key_lines()[1], f"second:{out.strip()}")

    def test_console_script_is_installed(self) -> None:
        script = os.path.join(os.path.dirname(sys.executable), "llamaproxy")
        self.assertTrue(os.access(script, os.X_OK), f"{script} is not installed")
        result = subprocess.run([script, "keys", "--file", self.path, "list"],
                                capture_output=True, text=True, timeout=120, env=_subprocess_env())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.endswith("0 key(s) configured\n"))
        result = subprocess.run([script], capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 1)
        self.assertIn("usage: llamaproxy", result.stderr)

    def test_user_error_in_a_process_has_no_traceback(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "llamaproxy", "keys", "--file", self.path, "remove",
             "--name", "ghost"],
            capture_output=True, text=True, timeout=120, env=_subprocess_env(),
        )
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(result.stderr, f"error: no key file at {self.path} (set --file or "
                         "AUTH_KEYS_FILE)\n")
