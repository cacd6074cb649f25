"""The live key set: loaded from the key file, replaced whole on reload, kept when a reload fails.

Reloads happen on SIGHUP, on ``POST /reload``, and by themselves when the file's content changes
(``KeyFileWatcher``: at once through inotify where the platform has it, else by polling). A
reload swaps the whole KeySet at once, so a request sees either the old keys or the new ones;
requests already admitted (streams included) are not touched. A file that cannot be read (or is
not a regular file, or is over 16 MiB) keeps the previous keys in force and says why; the read
and the parse run off the reactor thread.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaproxy.auth.keys import KeySet, parse_keys
from llamaproxy.bounded_file import UnsafeFileError, read_bounded
from llamaproxy.off_thread import OffThread

log = Logger()


class KeyLoadError(Exception):
    """The key file could not be read; the previous keys stay in force."""


@dataclass(frozen=True)
class _Read:
    """What one read of the key file found (made on a pool thread, applied on the reactor's)."""

    fingerprint: tuple[int, int, int]
    digest: bytes
    keys: KeySet | None  # None: the content had not changed, nothing was parsed
    warnings: tuple[str, ...] = ()


class KeyStore:
    """Holds the current KeySet for one key file.

    The file is read with ``read_bounded`` (a regular file of at most ``MAX_CONFIG_FILE_SIZE``
    bytes: a FIFO, a device or a symlink to ``/dev/zero`` is refused and the old keys stay), and
    read and parsed by ``off_thread`` (the reactor's thread pool in the gateway), so a reload
    never stalls the event loop. ``load`` and ``reload_if_changed`` are the synchronous forms
    (startup, tools, tests); ``refresh`` is what the running gateway uses.
    """

    def __init__(
        self, path: str, keys: KeySet | None = None, off_thread: OffThread | None = None
    ) -> None:
        self.path = path
        self.keys = keys if keys is not None else KeySet({})
        self.off_thread = off_thread or OffThread.inline()
        self._fingerprint: tuple[int, int, int] | None = None
        self._content_digest: bytes | None = None

    def __call__(self) -> KeySet:
        return self.keys

    def load(self, reason: str = "startup") -> int:
        """Read the file and swap in its keys; on a read error keep the old ones and raise."""
        try:
            found = self._read(None)
        except KeyLoadError as e:
            self._failed(reason, str(e))
            raise
        return self._apply(found, reason) or 0

    def reload_if_changed(self) -> bool:
        """Reload when the file's content changed since the last load; True if it reloaded."""
        if self._unchanged_on_disk():
            return False
        try:
            found = self._read(self._content_digest)
        except KeyLoadError as e:
            self._gone(str(e))
            return False
        return self._apply(found, "file changed") is not None

    def refresh(self, reason: str, only_if_changed: bool = False) -> Deferred[int | None]:
        """Read (off the reactor thread) and swap in the keys: the count loaded, or None when
        ``only_if_changed`` and the content was the same. Fails with KeyLoadError (old keys kept)
        when the file cannot be read."""
        if only_if_changed and self._unchanged_on_disk():
            return succeed(None)
        known = self._content_digest if only_if_changed else None
        reading = self.off_thread(self._read, known)

        def failed(failure: Failure) -> Failure:
            if failure.check(KeyLoadError):
                if only_if_changed:
                    self._gone(failure.getErrorMessage())
                else:
                    self._failed(reason, failure.getErrorMessage())
            return failure

        def apply(found: _Read) -> int | None:
            return self._apply(found, reason)

        return reading.addCallbacks(apply, failed)

    # -- the pool thread's part -------------------------------------------------------------

    def _read(self, known_digest: bytes | None) -> _Read:
        """Read and parse the file (any thread); parsing is skipped when the content's digest is
        ``known_digest``."""
        try:
            fingerprint = self._stat()
            raw = read_bounded(self.path)
            text = raw.decode("utf-8")
        except UnsafeFileError as e:
            raise KeyLoadError(str(e)) from None
        except OSError as e:
            raise KeyLoadError(e.strerror or str(e)) from None
        except UnicodeDecodeError:
            raise KeyLoadError("not UTF-8 text") from None
        digest = hashlib.sha256(raw).digest()
        if known_digest is not None and digest == known_digest:
            return _Read(fingerprint, digest, None)
        keys, warnings = parse_keys(text.splitlines())
        return _Read(fingerprint, digest, keys, tuple(warnings))

    # -- the reactor thread's part ----------------------------------------------------------

    def _apply(self, found: _Read, reason: str) -> int | None:
        self._fingerprint = found.fingerprint
        if found.keys is None:
            return None
        for warning in found.warnings:
            log.warn("API key file {path}, {warning}", path=self.path, warning=warning)
        keys = found.keys
        self.keys = keys
        self._content_digest = found.digest
        if not keys:
            log.warn(
                "No valid API keys in {path}: every API request is refused (401) until keys "
                "are added", path=self.path,
            )
        else:
            log.info(
                "Loaded {count} API keys from {path} ({reason})",
                count=len(keys), path=self.path, reason=reason,
            )
        return len(keys)

    def _failed(self, reason: str, why: str) -> None:
        log.error(
            "Cannot read API key file {path} ({reason}): {why}; keeping {count} loaded keys",
            path=self.path, reason=reason, why=why, count=len(self.keys),
        )

    def _gone(self, why: str) -> None:
        if self._fingerprint is not None:
            # Reported once per disappearance, not on every poll.
            self._fingerprint = None
            log.error("API key file {path} cannot be read ({why}); keeping the loaded keys",
                      path=self.path, why=why)

    def _unchanged_on_disk(self) -> bool:
        try:
            fingerprint = self._stat()
        except OSError:
            return False
        return fingerprint == self._fingerprint

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)


#: inotify events on the key file's directory that may mean its content changed (an editor's
#: write, ``llamaproxy keys``' rename over it, a delete, a ``chmod``).
_WATCHED = ("IN_CLOSE_WRITE", "IN_MOVED_TO", "IN_CREATE", "IN_DELETE", "IN_MOVED_FROM",
            "IN_ATTRIB")


class KeyFileWatcher(Service):
    """Reloads the key file when its content changes: at once on inotify, else by polling.

    With ``notify_reactor`` (a real reactor) on Linux, ``twisted.internet.inotify`` watches the
    file's directory (so a file replaced by a rename is seen too), and a change is picked up
    before the next request: the README's "generate a key, then curl with it" works back to
    back. Polling every ``interval`` seconds goes on as well, as the fallback (no inotify,
    network filesystems, a directory created later).
    """

    def __init__(
        self, store: KeyStore, clock: IReactorTime, interval: float, notify_reactor: Any = None
    ) -> None:
        self.store = store
        self.interval = interval
        self._loop = LoopingCall(self._poll)
        self._loop.clock = clock
        self._notify_reactor = notify_reactor
        self._notifier: Any = None

    @property
    def notified(self) -> bool:
        """True when inotify watches the file (else only polling does)."""
        return self._notifier is not None

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)
        if self._notify_reactor is not None:
            self._notifier = self._watch(self._notify_reactor)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            notifier.loseConnection()

    def _watch(self, reactor: Any) -> Any:
        """An ``INotify`` on the file's directory, or None (not available: polling only)."""
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath

            notifier = inotify.INotify(reactor)
            mask = 0
            for name in _WATCHED:
                mask |= getattr(inotify, name)
            directory = os.path.dirname(os.path.abspath(self.store.path))
            notifier.watch(FilePath(directory), mask, callbacks=[self._changed])
        except Exception as e:  # no inotify here, or the directory does not exist (yet)
            log.info("Watching the API key file {path} by polling every {interval:g} s ({why})",
                     path=self.store.path, interval=self.interval, why=e)
            return None
        notifier.startReading()
        return notifier

    def _changed(self, _: Any, path: Any, mask: int) -> None:
        if os.fsdecode(path.basename()) != os.path.basename(self.store.path):
            return  # another file in the same directory (e.g. a temporary one)
        self._poll()

    def _poll(self) -> Deferred[None]:
        # A LoopingCall dies on the first failure: never let one escape. It waits for this
        # Deferred, so reads never overlap however slow the file system is.
        try:
            checking = self.store.refresh("file changed", only_if_changed=True)
        except Exception:
            log.failure("Error while checking the API key file {path}", path=self.store.path)
            return succeed(None)

        def done(result: object) -> None:
            if isinstance(result, Failure) and not result.check(KeyLoadError):
                log.failure("Error while checking the API key file {path}", result,
                            path=self.store.path)

        return checking.addBoth(done)
