"""What an operator may do from the page: restart a supervised llama-server child.

Loading and unloading models belong to on-demand backends, which llamaproxy does not have yet; the
page shows no such buttons until it does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.logger import Logger

log = Logger()


class Restartable(Protocol):
    """A backend service that can restart its child (``LlamaServerSupervisor``)."""

    def restart(self) -> bool:
        """Restart now; False when it cannot (stopped, stopping)."""
        ...


class OperationError(Exception):
    """An operation that cannot be done; the message is safe to show."""


class BackendOperations:
    """Admin operations on the live backends (their services, by backend name)."""

    def __init__(self, services: Callable[[], Mapping[str, Any]]) -> None:
        self._services = services

    def can_restart(self, name: str) -> bool:
        """True when ``name`` is a supervised child (a remote upstream cannot be restarted)."""
        return callable(getattr(self._services().get(name), "restart", None))

    def restart(self, name: str, operator: str) -> str:
        """Restart backend ``name``'s child; returns what happened, in words."""
        service = self._services().get(name)
        restart = getattr(service, "restart", None)
        if not callable(restart):
            raise OperationError(f"Backend '{name}' is not a supervised llama-server child")
        if not restart():
            raise OperationError(f"Backend '{name}' is stopping; not restarted")
        log.info("Operator {operator} restarted backend {backend}", operator=operator,
                 backend=name)
        return f"Backend '{name}' is restarting"
