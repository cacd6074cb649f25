"""The live key set: loaded from the key file, replaced whole on reload.

A reload that fails keeps the previous set.
"""

from __future__ import annotations

from twisted.logger import Logger

from llamaproxy.auth.keys import KeySet, parse_keys

log = Logger()


class KeyLoadError(Exception):
    """The key file could not be read; the previous keys stay in force."""


class KeyStore:
    """Holds the current KeySet for one key file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.keys = KeySet({})

    def __call__(self) -> KeySet:
        return self.keys

    def load(self) -> int:
        """Read the file and swap in its keys; on a read error keep the old ones and raise."""
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            log.error(
                "Cannot read API key file {path}: {reason}; keeping {count} loaded keys",
                path=self.path, reason=reason, count=len(self.keys),
            )
            raise KeyLoadError(f"{self.path}: {reason}") from None
        keys, warnings = parse_keys(lines)
        for warning in warnings:
            log.warn("API key file {path}, {warning}", path=self.path, warning=warning)
        self.keys = keys
        if not keys:
            log.warn(
                "No valid API keys in {path}: every API request is refused (401) until keys "
                "are added", path=self.path,
            )
        else:
            log.info("Loaded {count} API keys from {path}", count=len(keys), path=self.path)
        return len(keys)
