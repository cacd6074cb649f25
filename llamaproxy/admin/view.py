"""What the operator page shows, read from the live objects when a page asks (never before).

:class:`Dashboard` joins the router (backends, their status, breakers and queues), the activity
ring, the sampler (series and per-key minute rates) and the child logs into one
:class:`Snapshot`. Nothing here holds an API key or a prompt: key ids, counts and redacted log
lines only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime

from llamaproxy.admin.activity import ActivityRing, ActivityRow
from llamaproxy.admin.childlog import ChildLine, ChildLogTail
from llamaproxy.admin.operations import BackendOperations
from llamaproxy.admin.series import Point, Sampler

#: Rows of the activity table and lines of each child's log on the page.
ACTIVITY_ROWS = 50
LOG_LINES = 40


@dataclass(frozen=True)
class BackendRow:
    """One backend as the page shows it."""

    name: str
    kind: str
    models: tuple[str, ...]
    state: str
    ready: bool
    busy: int
    slots: int
    queued: int
    breaker: str
    restarts: int
    last_error: str | None
    restartable: bool

    def as_json(self) -> dict[str, object]:
        """The row as the page's JSON shows it."""
        return {
            "name": self.name, "kind": self.kind, "models": list(self.models),
            "state": self.state, "ready": self.ready, "busy": self.busy, "slots": self.slots,
            "queued": self.queued, "breaker": self.breaker, "restarts": self.restarts,
            "last_error": self.last_error, "restartable": self.restartable,
        }


@dataclass(frozen=True)
class KeyRow:
    """One key's last minute, as the page shows it."""

    key_id: str
    requests_per_minute: int
    tokens_per_minute: int
    queued: int
    rate_limited: int

    def as_json(self) -> dict[str, object]:
        """The row as the page's JSON shows it."""
        return {
            "key_id": self.key_id, "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute, "queued": self.queued,
            "rate_limited_per_minute": self.rate_limited,
        }


@dataclass(frozen=True)
class Snapshot:
    """Everything one rendering of the page shows."""

    at: float
    backends: list[BackendRow]
    activity: list[ActivityRow]
    activity_keys: list[str]
    activity_models: list[str]
    keys: list[KeyRow]
    minute_covered: float
    points: list[Point]
    logs: dict[str, list[ChildLine]]
    key_filter: str = ""
    model_filter: str = ""
    notices: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        """The snapshot as JSON (``/state.json``)."""
        return {
            "at": round(self.at, 3),
            "backends": [b.as_json() for b in self.backends],
            "activity": [a.as_json() for a in self.activity],
            "keys": [k.as_json() for k in self.keys],
            "series": [
                {"at": round(p.at, 3), "requests_per_second": round(p.requests_per_second, 3),
                 "tokens_per_second": round(p.tokens_per_second, 3),
                 "queue_depth": p.queue_depth,
                 "p95_ttft_ms": None if p.p95_ttft_ms is None else round(p.p95_ttft_ms, 1)}
                for p in self.points
            ],
            "logs": {
                name: [{"at": round(line.at, 3), "stream": line.stream, "text": line.text}
                       for line in lines]
                for name, lines in self.logs.items()
            },
        }


class Dashboard:
    """Builds snapshots of the gateway for the operator page."""

    def __init__(
        self,
        router: Callable[[], Any],
        activity: ActivityRing,
        sampler: Sampler,
        child_logs: ChildLogTail,
        operations: BackendOperations,
        clock: IReactorTime,
    ) -> None:
        self.router = router
        self.activity = activity
        self.sampler = sampler
        self.child_logs = child_logs
        self.operations = operations
        self.clock = clock

    def snapshot(self, key_filter: str = "", model_filter: str = "") -> Snapshot:
        """The page's content right now (activity filtered by key id and/or model)."""
        router = self.router()
        members = list(router.members.values()) if router is not None else []
        queued_by_key: dict[str, int] = {}
        backends = []
        for member in members:
            load = member.load
            waiting_by_key = getattr(load, "waiting_by_key", None)
            if callable(waiting_by_key):
                for key_id, count in waiting_by_key().items():
                    queued_by_key[key_id] = queued_by_key.get(key_id, 0) + count
            status = member.status
            probe = status.last_probe
            last_error = status.last_exit
            if probe is not None and probe.outcome == "down" and probe.detail:
                last_error = f"probe: {probe.detail}"
            backends.append(BackendRow(
                name=member.name,
                kind=member.spec.kind,
                models=tuple(member.spec.models),
                state=status.state.value,
                ready=status.ready,
                busy=load.active if load is not None else 0,
                slots=member.slots,
                queued=load.waiting if load is not None else 0,
                breaker=member.breaker.state.value,
                restarts=status.restarts,
                last_error=last_error,
                restartable=self.operations.can_restart(member.name),
            ))
        rates = {r.key_id: r for r in self.sampler.key_rates()}
        keys = [
            KeyRow(key_id, r.requests, r.tokens, queued_by_key.get(key_id, 0), r.rate_limited)
            for key_id, r in rates.items()
        ]
        keys.extend(
            KeyRow(key_id, 0, 0, count, 0)
            for key_id, count in sorted(queued_by_key.items()) if key_id not in rates
        )
        secrets = self._secrets(members)
        logs = {
            name: self.child_logs.tail(name, LOG_LINES, lambda: secrets)
            for name in self.child_logs.backends()
        }
        return Snapshot(
            at=self.clock.seconds(),
            backends=backends,
            activity=self.activity.rows(key_filter or None, model_filter or None, ACTIVITY_ROWS),
            activity_keys=self.activity.key_ids(),
            activity_models=self.activity.models(),
            keys=keys,
            minute_covered=self.sampler.minute_covered(),
            points=list(self.sampler.points),
            logs=logs,
            key_filter=key_filter,
            model_filter=model_filter,
        )

    @staticmethod
    def _secrets(members: Iterable[Any]) -> list[str]:
        """Backend keys the log lines must not show."""
        return [m.status.api_key for m in members if m.status.api_key]
