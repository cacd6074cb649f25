"""Running one piece of work against the shared Redis from a command-line tool.

The tools are synchronous programs; the Redis client is Twisted's. ``with_redis`` runs the
reactor once (a tool's process is its own), connects, awaits ``work(state)``, disconnects, and
returns its result, or raises ``CommandError`` with ``what`` when Redis cannot be used.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from llamaproxy.cli.guard import CommandError
from llamaproxy.state.url import parse_state_url

T = TypeVar("T")


def with_redis(
    text: str, what: str, work: Callable[[Any], Coroutine[Any, Any, T]],
    error: type[CommandError] = CommandError,
) -> T:
    """``work(state)`` with a RedisState connected to STATE_URL-style ``text``."""
    try:
        url = parse_state_url(text)
    except ValueError as e:
        raise error(f"--state-url/--store: {e}") from None
    if url is None:
        raise error("the Redis URL is empty")
    from twisted.internet import reactor  # this command's own process and reactor

    from llamaproxy.state.redis_store import RedisState

    outcome: list[object] = []

    async def session() -> T:
        state = RedisState(url, reactor, "closed", timeout=5.0)
        state.startService()
        try:
            for _ in range(500):
                if state.connected:
                    break
                await deferLater(reactor, 0.01, lambda: None)
            return await work(state)
        finally:
            await state.stopService()

    def run() -> None:
        d = Deferred.fromCoroutine(session())
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    result = outcome[0] if outcome else None
    if isinstance(result, Failure):
        if isinstance(result.value, CommandError):
            raise result.value
        raise error(f"cannot {what} at {url.display()}: {result.getErrorMessage()}")
    return result  # type: ignore[return-value]
