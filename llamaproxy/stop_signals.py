"""SIGTERM and SIGINT stop the gateway; the exit status says whether the drain lost anything.

twistd's own signal handlers stop the reactor and make the process exit *by* the signal
(status 143 for SIGTERM), however cleanly it stopped: a ``docker stop`` that let every stream
finish would look like a crash to an orchestrator. ``StopSignals`` puts its own handlers in their
place once the reactor runs (public ``signal`` and reactor APIs only): a signal stops the reactor
the same way (``callFromThread(reactor.stop)``, so the drain in ``service.py`` runs), and the
process exits 0 after a drain that lost nothing. When the drain had to cut requests
(``DRAIN_TIMEOUT``), ``requests_were_cut`` arranges for the process to end by the signal that
stopped it, after twistd's own clean-up (the PID file, the logs), as twistd would have.

Only the composition root installs it, and only under twistd: tests and embedders keep their
own handlers.
"""

from __future__ import annotations

import atexit
import os
import signal
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()

#: The signals that stop the gateway.
STOPPING = (signal.SIGTERM, signal.SIGINT)


class StopSignals(Service):
    """The gateway's handlers for the signals that stop it (see the module docstring)."""

    def __init__(
        self,
        reactor: Any,
        signals: Sequence[int] = STOPPING,
        install: Callable[..., Any] = signal.signal,
        at_exit: Callable[[Callable[[], None]], Any] = atexit.register,
        kill: Callable[[int, int], None] = os.kill,
    ) -> None:
        self.reactor = reactor
        self.signals = tuple(signals)
        self._install = install
        self._at_exit = at_exit
        self._kill = kill
        #: The signal that stopped the gateway (None until one arrives).
        self.received: int | None = None

    def startService(self) -> None:
        super().startService()
        # After the reactor installed its own handlers (during its start-up), replace them.
        self.reactor.callWhenRunning(self._take_over)

    def _take_over(self) -> None:
        for number in self.signals:
            self._install(number, self._received)

    def _received(self, number: int, frame: FrameType | None) -> None:
        if self.received is not None:
            log.info("Received {name} again: still stopping", name=signal.Signals(number).name)
            return
        self.received = number
        log.info("Received {name}: stopping", name=signal.Signals(number).name)
        self.reactor.callFromThread(self.reactor.stop)

    def requests_were_cut(self) -> None:
        """The drain cut requests: end the process by the signal that stopped it, once
        everything else is done (an exit that says something was lost)."""
        if self.received is not None:
            self._at_exit(self._end_by_signal)

    def _end_by_signal(self) -> None:
        assert self.received is not None
        self._install(self.received, signal.SIG_DFL)
        self._kill(os.getpid(), self.received)
