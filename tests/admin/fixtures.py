"""A small live gateway for the operator page's unit tests: a router of two backends (a
supervised child with a fake restartable service, a remote upstream), metrics, keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.task import Clock

from llamaproxy.admin.activity import ActivityRing
from llamaproxy.admin.childlog import ChildLogTail
from llamaproxy.admin.operations import BackendOperations
from llamaproxy.admin.series import Sampler
from llamaproxy.admin.sessions import SessionStore
from llamaproxy.admin.view import Dashboard
from llamaproxy.auth.keys import parse_keys
from llamaproxy.backends.admission import Admission
from llamaproxy.backends.backend import BackendState
from llamaproxy.backends.breaker import CircuitBreaker
from llamaproxy.backends.config_file import LocalBackendSpec, RemoteBackendSpec
from llamaproxy.backends.routing import Member, status_for
from llamaproxy.observability.access_log import AccessEntry
from llamaproxy.observability.metrics import GatewayMetrics

ADMIN_KEY = "sk-admin-unit-0123456789abcdef"
USER_KEY = "sk-user-unit-0123456789abcdef"
BACKEND_KEY = "gateway-backendsecret0123456789abcdef"
KEY_LINES = [f"boss:{ADMIN_KEY}", f"alice:{USER_KEY}"]


@dataclass
class FakeChild:
    """A supervised child's service: counts restarts; ``stopping`` refuses them."""

    restarts: int = 0
    stopping: bool = False

    def restart(self) -> bool:
        if self.stopping:
            return False
        self.restarts += 1
        return True


@dataclass
class FakeRouter:
    """What the page reads of a Router: its members."""

    members: dict[str, Member] = field(default_factory=dict)


class PageWorld:
    """Everything the page reads, wired as ``admin.service.operator_page`` does."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.keys = parse_keys(KEY_LINES)[0]
        local = LocalBackendSpec(name="local", models=("tiny",), model_path="/m/tiny.gguf",
                                 port=8080, parallel=2)
        remote = RemoteBackendSpec(name="upstream", models=("big",),
                                   base_url="http://10.0.0.2:8000")
        self.router = FakeRouter()
        for spec in (local, remote):
            status = status_for(spec)
            status.set_state(BackendState.READY)
            self.router.members[spec.name] = Member(
                spec, status, CircuitBreaker(spec.name, self.clock),
                Admission(spec.max_concurrent, clock=self.clock),
            )
        self.router.members["local"].status.api_key = BACKEND_KEY
        self.child = FakeChild()
        self.services: dict[str, Any] = {"local": self.child, "upstream": object()}
        self.metrics = GatewayMetrics(self.clock)
        self.activity = ActivityRing(10)
        self.sampler = Sampler(self.metrics.totals, self.metrics.key_totals, self.clock)
        self.child_logs = ChildLogTail(5)
        self.operations = BackendOperations(lambda: self.services)
        self.dashboard = Dashboard(lambda: self.router, self.activity, self.sampler,
                                   self.child_logs, self.operations, self.clock)
        self.sessions = SessionStore(lambda: self.keys, frozenset({"boss"}), self.clock,
                                     ttl=600)


def entry(key_id: str | None = "alice", model: str | None = "tiny", status: int = 200,
          **fields: Any) -> AccessEntry:
    """An access entry with sensible defaults."""
    values: dict[str, Any] = dict(
        ts=1_800_000_000.0, request_id="r1", key_id=key_id, method="POST",
        path="/v1/chat/completions", status=status, duration_ms=1000.0, ttfb_ms=200.0,
        bytes=100, model=model, prompt_tokens=10, completion_tokens=80, outcome="complete",
    )
    values.update(fields)
    return AccessEntry(**values)
