"""Editing the API key file safely: locking, atomic rewrites, and line-level helpers.

The format and its validation rules live in :mod:`llamaproxy.auth.keys`; this module only reads and
rewrites the file. Every edit is a read-modify-write under an exclusive ``fcntl.flock`` on a sibling
lock file (``.<name>.lock``), so concurrent writers never lose each other's lines, and the new
content replaces the old with ``os.replace`` after an ``fsync``, so readers (the gateway's reload)
see either the old file or the new one, never a torn one. Lines are kept verbatim: comments, blank
and unparsable lines survive every edit untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator, Sequence

from llamaproxy.auth.keys import _API_KEY, _KEY_ID

#: The longest key_id the CLI accepts (the gateway itself has no limit).
KEY_ID_MAX_LENGTH = 64

#: Permissions of the key file, its temporary files and its lock file.
FILE_MODE = 0o600

#: The comment a newly created key file starts with.
HEADER: tuple[str, ...] = (
    "# llamaproxy API keys, one per line: key_id:api_key[:rate_limit][:expiration]",
    "# Managed with `llamaproxy keys`; keep this file private (mode 0600).",
)

# Keep undecodable bytes verbatim across a rewrite instead of failing or mangling them.
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


def valid_key_id(key_id: str) -> bool:
    """True for a key_id the CLI accepts: 1-64 of A-Z a-z 0-9 - _ (the gateway's rule, bounded)."""
    return (
        len(key_id) <= KEY_ID_MAX_LENGTH
        and key_id.isascii()
        and _KEY_ID.fullmatch(key_id) is not None
    )


def new_api_key() -> str:
    """A fresh secret: ``sk-`` + ``secrets.token_urlsafe(32)`` (46 characters)."""
    return "sk-" + secrets.token_urlsafe(32)


def line_key_id(line: str) -> str | None:
    """The key_id of a key line, or None for comments, blank lines and lines without ':'.

    As in the older tool, any non-comment line containing ':' counts as a key line, valid or not,
    so that a broken line for a key_id still blocks a duplicate and can still be removed.
    """
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or ":" not in stripped:
        return None
    return stripped.split(":", 1)[0].strip()


def split_fields(line: str) -> list[str]:
    """A key line's trimmed fields, split on ':' at most 3 times (timestamps keep their colons)."""
    return [field.strip() for field in line.strip().split(":", 3)]


def find_lines(lines: Sequence[str], key_id: str) -> list[int]:
    """Indexes of the key lines whose key_id is ``key_id``, in file order."""
    return [index for index, line in enumerate(lines) if line_key_id(line) == key_id]


def format_line(
    key_id: str, api_key: str, rate_limit: int | None = None, expires: str | None = None
) -> str:
    """One key line, trailing empty fields omitted: ``id:key``, ``id:key:120``, ``id:key::EXP``."""
    if not valid_key_id(key_id):
        raise ValueError(f"invalid key_id {key_id!r}")
    if not _API_KEY.fullmatch(api_key):
        raise ValueError("invalid api_key")
    if rate_limit is not None and rate_limit <= 0:
        raise ValueError("rate_limit must be a positive integer")
    if expires is not None and ("\n" in expires or "\r" in expires):
        raise ValueError("expiration must be on one line")
    fields = [key_id, api_key, "" if rate_limit is None else str(rate_limit), expires or ""]
    while fields[-1] == "":
        fields.pop()
    return ":".join(fields)


def lock_path(path: str) -> str:
    """The lock file guarding ``path``: ``.<name>.lock`` in the same directory."""
    directory, name = os.path.split(os.path.realpath(path))
    return os.path.join(directory, f".{name}.lock")


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``'s lock file for the duration of the block.

    The lock file is created (mode 0600) if needed and never deleted: deleting it would let two
    processes lock two different inodes. The parent directory must exist.
    """
    lock = lock_path(path)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except PermissionError:
        # Someone else's lock file that we may still read: flock works on a read-only descriptor.
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            os.fchmod(fd, FILE_MODE)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_lines(path: str) -> list[str]:
    """The file's lines without their line ends, verbatim; a missing file is an empty list."""
    try:
        with open(path, encoding=_ENCODING, errors=_ERRORS, newline="") as handle:
            text = handle.read()
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def atomic_write(path: str, lines: Iterable[str]) -> None:
    """Replace ``path`` with ``lines`` (each ended by a newline) atomically, mode 0600.

    A temporary file in the same directory is written, flushed and fsynced, then renamed over the
    target with ``os.replace`` and the directory is fsynced; on any failure the temporary file is
    removed and the target is left as it was. A symlinked ``path`` has its target replaced, and an
    existing file keeps its owner when we are allowed to keep it.
    """
    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    text = "".join(line + "\n" for line in lines)
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with open(fd, "w", encoding=_ENCODING, errors=_ERRORS, newline="") as handle:
            os.fchmod(handle.fileno(), FILE_MODE)
            _keep_owner(handle.fileno(), target)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _keep_owner(fd: int, target: str) -> None:
    """Give the new file the old file's owner and group, if it exists and we may (e.g. as root)."""
    try:
        status = os.stat(target)
    except FileNotFoundError:
        return
    if (status.st_uid, status.st_gid) != (os.geteuid(), os.getegid()):
        with contextlib.suppress(OSError):
            os.fchown(fd, status.st_uid, status.st_gid)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable; filesystems that cannot fsync a directory are tolerated."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
