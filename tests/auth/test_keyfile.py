"""Tests for llamaproxy.auth.keyfile: line helpers, verbatim reads, atomic writes, locking."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.auth import keyfile
from llamaproxy.auth.keys import parse_keys

KEY = "sk-abcdefghijklmnop"


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class LineTests(SynchronousTestCase):
    """Key lines: ids, fields, formatting."""

    def test_line_key_id(self) -> None:
        self.assertIsNone(keyfile.line_key_id(""))
        self.assertIsNone(keyfile.line_key_id("   "))
        self.assertIsNone(keyfile.line_key_id("# a:comment"))
        self.assertIsNone(keyfile.line_key_id("  # indented:comment"))
        self.assertIsNone(keyfile.line_key_id("no separator"))
        self.assertEqual(keyfile.line_key_id(f"alice:{KEY}"), "alice")
        self.assertEqual(keyfile.line_key_id(f"  alice : {KEY}\r"), "alice")
        # Invalid lines still count, as in the older tool: they block duplicates, can be removed.
        self.assertEqual(keyfile.line_key_id("bad id:short"), "bad id")

    def test_split_fields_keeps_timestamp_colons(self) -> None:
        self.assertEqual(
            keyfile.split_fields(f"a:{KEY}:120:2026-12-31T23:59:59+00:00"),
            ["a", KEY, "120", "2026-12-31T23:59:59+00:00"],
        )
        self.assertEqual(keyfile.split_fields(f" a : {KEY} "), ["a", KEY])

    def test_find_lines(self) -> None:
        lines = ["# a:b", f"a:{KEY}", "", f"b:{KEY}x", f"a:{KEY}y", "a"]
        self.assertEqual(keyfile.find_lines(lines, "a"), [1, 4])
        self.assertEqual(keyfile.find_lines(lines, "c"), [])

    def test_format_line_omits_trailing_empty_fields(self) -> None:
        exp = "2026-12-31T23:59:59+00:00"
        self.assertEqual(keyfile.format_line("a", KEY), f"a:{KEY}")
        self.assertEqual(keyfile.format_line("a", KEY, 120), f"a:{KEY}:120")
        self.assertEqual(keyfile.format_line("a", KEY, None, exp), f"a:{KEY}::{exp}")
        self.assertEqual(keyfile.format_line("a", KEY, 120, exp), f"a:{KEY}:120:{exp}")
        lines = [
            keyfile.format_line("a", KEY, 5, exp),
            keyfile.format_line("b", KEY + "b", None, exp),
        ]
        keys, warnings = parse_keys(lines)
        self.assertEqual((len(keys), warnings), (2, []))

    def test_format_line_rejects_bad_fields(self) -> None:
        for args in [("bad id", KEY), ("a:b", KEY), ("a", "short"), ("a", KEY + ":x")]:
            self.assertRaises(ValueError, keyfile.format_line, *args)
        self.assertRaises(ValueError, keyfile.format_line, "a", KEY, 0)
        self.assertRaises(ValueError, keyfile.format_line, "a", KEY, None, "2026\n01")

    def test_valid_key_id(self) -> None:
        self.assertTrue(keyfile.valid_key_id("a"))
        self.assertTrue(keyfile.valid_key_id("A-z_09"))
        self.assertTrue(keyfile.valid_key_id("x" * 64))
        for bad in ["", "x" * 65, "a b", "a:b", "é", "a.b", "٣"]:
            self.assertFalse(keyfile.valid_key_id(bad), bad)

    def test_new_api_key(self) -> None:
        first, second = keyfile.new_api_key(), keyfile.new_api_key()
        self.assertNotEqual(first, second)
        self.assertTrue(first.startswith("sk-"))
        self.assertEqual(len(first), 46)
        keys, warnings = parse_keys([f"a:{first}"])
        self.assertEqual(warnings, [])
        self.assertIsNotNone(keys.lookup(first))


class ReadWriteTests(SynchronousTestCase):
    """Verbatim reads and atomic, private writes."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "api_keys.txt")

    def _leftovers(self) -> list[str]:
        return sorted(name for name in os.listdir(self.directory) if name.endswith(".tmp"))

    def test_read_missing_file(self) -> None:
        self.assertEqual(keyfile.read_lines(self.path), [])

    def test_round_trip_is_verbatim(self) -> None:
        original = b"# comment\r\n\r\n  odd line  \nbad:\xff\xfe:x\na:" + KEY.encode() + b"\n"
        Path(self.path).write_bytes(original)
        lines = keyfile.read_lines(self.path)
        self.assertEqual(lines[0], "# comment\r")
        self.assertEqual(lines[2], "  odd line  ")
        keyfile.atomic_write(self.path, lines)
        self.assertEqual(Path(self.path).read_bytes(), original)

    def test_missing_final_newline_is_added(self) -> None:
        Path(self.path).write_text(f"# c\na:{KEY}")
        self.assertEqual(keyfile.read_lines(self.path), ["# c", f"a:{KEY}"])
        keyfile.atomic_write(self.path, keyfile.read_lines(self.path))
        self.assertEqual(Path(self.path).read_text(), f"# c\na:{KEY}\n")

    def test_atomic_write_creates_private_file(self) -> None:
        old_umask = os.umask(0)
        self.addCleanup(os.umask, old_umask)
        keyfile.atomic_write(self.path, ["# a", f"a:{KEY}"])
        self.assertEqual(Path(self.path).read_text(), f"# a\na:{KEY}\n")
        self.assertEqual(_mode(self.path), 0o600)
        self.assertEqual(self._leftovers(), [])

    def test_atomic_write_makes_an_existing_file_private(self) -> None:
        Path(self.path).write_text("old\n")
        os.chmod(self.path, 0o644)
        keyfile.atomic_write(self.path, ["new"])
        self.assertEqual(Path(self.path).read_text(), "new\n")
        self.assertEqual(_mode(self.path), 0o600)

    def test_atomic_write_empty(self) -> None:
        keyfile.atomic_write(self.path, [])
        self.assertEqual(Path(self.path).read_bytes(), b"")

    def test_failed_replace_leaves_target_and_no_temporary_file(self) -> None:
        Path(self.path).write_text("original\n")

        def fail(src: str, dst: str) -> None:
            raise OSError(28, "No space left on device")

        self.patch(os, "replace", fail)
        self.assertRaises(OSError, keyfile.atomic_write, self.path, ["new"])
        self.assertEqual(Path(self.path).read_text(), "original\n")
        self.assertEqual(self._leftovers(), [])

    def test_failed_fsync_leaves_no_temporary_file(self) -> None:
        def fail(fd: int) -> None:
            raise OSError(5, "Input/output error")

        self.patch(os, "fsync", fail)
        self.assertRaises(OSError, keyfile.atomic_write, self.path, ["new"])
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(self._leftovers(), [])

    def test_write_through_symlink_replaces_the_target(self) -> None:
        real = os.path.join(self.directory, "real.txt")
        Path(real).write_text("old\n")
        os.symlink("real.txt", self.path)
        keyfile.atomic_write(self.path, ["new"])
        self.assertTrue(os.path.islink(self.path))
        self.assertEqual(Path(real).read_text(), "new\n")


class LockTests(SynchronousTestCase):
    """The sibling lock file and its exclusive flock."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "api_keys.txt")

    def test_lock_path(self) -> None:
        self.assertEqual(
            keyfile.lock_path(self.path),
            os.path.join(os.path.realpath(self.directory), ".api_keys.txt.lock"),
        )

    def test_lock_is_exclusive_and_released(self) -> None:
        lock = keyfile.lock_path(self.path)
        with keyfile.locked(self.path):
            self.assertEqual(_mode(lock), 0o600)
            fd = os.open(lock, os.O_RDWR)
            self.addCleanup(os.close, fd)
            # A second open file description cannot take the lock while it is held...
            self.assertRaises(BlockingIOError, fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # ...and can once the block is left.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        self.assertTrue(os.path.exists(lock))  # kept: deleting it would break mutual exclusion

    def test_lock_released_on_error(self) -> None:
        def body() -> None:
            with keyfile.locked(self.path):
                raise RuntimeError("boom")

        self.assertRaises(RuntimeError, body)
        fd = os.open(keyfile.lock_path(self.path), os.O_RDWR)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def test_missing_directory(self) -> None:
        missing = os.path.join(self.directory, "nope", "keys.txt")

        def body() -> None:
            with keyfile.locked(missing):
                pass

        self.assertRaises(FileNotFoundError, body)
