"""The live key set: loaded from the key file, replaced whole on reload, kept when a reload fails.

Reloads happen on SIGHUP, on ``POST /reload``, and by themselves when the file's content changes
(``KeyFileWatcher``: at once through inotify where the platform has it, else by polling). A
reload swaps the whole KeySet at once, so a request sees either the old keys or the new ones;
requests already admitted (streams included) are not touched. A file that cannot be read keeps
the previous keys in force and says why.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llamaproxy.auth.keys import KeySet, parse_keys

log = Logger()


class KeyLoadError(Exception):
    """The key file could not be read; the previous keys stay in force."""


class KeyStore:
    """Holds the current KeySet for one key file."""

    def __init__(self, path: str, keys: KeySet | None = None) -> None:
        self.path = path
        self.keys = keys if keys is not None else KeySet({})
        self._fingerprint: tuple[int, int, int] | None = None
        self._content_digest: bytes | None = None

    def __call__(self) -> KeySet:
        return self.keys

    def load(self, reason: str = "startup") -> int:
        """Read the file and swap in its keys; on a read error keep the old ones and raise."""
        try:
            fingerprint = self._stat()
            with open(self.path, "rb") as f:
                raw = f.read()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
            log.error(
                "Cannot read API key file {path} ({reason}): {why}; keeping {count} loaded keys",
                path=self.path, reason=reason, why=why, count=len(self.keys),
            )
            raise KeyLoadError(why) from None
        keys, warnings = parse_keys(text.splitlines())
        for warning in warnings:
            log.warn("API key file {path}, {warning}", path=self.path, warning=warning)
        self.keys = keys
        self._fingerprint = fingerprint
        self._content_digest = hashlib.sha256(raw).digest()
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

    def reload_if_changed(self) -> bool:
        """Reload when the file's content changed since the last load; True if it reloaded."""
        try:
            fingerprint = self._stat()
        except OSError:
            fingerprint = None
        if fingerprint is not None and fingerprint == self._fingerprint:
            return False
        try:
            with open(self.path, "rb") as f:
                digest = hashlib.sha256(f.read()).digest()
        except OSError:
            if self._fingerprint is not None:
                # Reported once per disappearance, not on every poll.
                self._fingerprint = None
                log.error("API key file {path} is gone; keeping the loaded keys", path=self.path)
            return False
        if digest == self._content_digest:
            self._fingerprint = fingerprint
            return False
        try:
            self.load("file changed")
        except KeyLoadError:
            return False
        return True

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

    def _poll(self) -> None:
        # A LoopingCall dies on the first exception: never let one escape.
        try:
            self.store.reload_if_changed()
        except Exception:
            log.failure("Error while checking the API key file {path}", path=self.store.path)
