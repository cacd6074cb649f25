"""A ``[[groups]]`` of on-demand models sharing a budget: at most ``max_running`` run at once.

Models asked for wait in arrival order (``want``). The first waiting model starts as soon as the
group has room. When it has none, a running model is chosen to make room (the least busy, then
the one ready longest) and is swapped out once the swap is *due*:

- it has had no request in flight or queued for ``IDLE_BEFORE_SWAP`` seconds (nothing is lost
  by stopping it; the short wait keeps a client that sends its next request as soon as the
  last one is answered from being swapped out between the two), or
- it served ``swap_batch`` more requests since the waiting model began to wait, or
- the waiting model has waited ``swap_wait`` seconds (a waiting model is never starved).

Swapping out drains it (its requests in flight finish, up to ``swap_grace``, and new requests for
it wait for its next turn), stops it, and starts the waiting model. So when two models are asked
for alternately, each runs for a batch of requests instead of being swapped on every request, and
a waiting model is running within ``swap_wait + swap_grace`` plus its load time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from llamaproxy.backends.config_file import GroupSpec
from llamaproxy.backends.on_demand import ModelEvents, ModelState, OnDemandModel

#: How often a group with a waiting model looks again whether a swap is due.
TICK = 0.1
#: How long a running model must stay idle (nothing in flight or queued) to be swapped out
#: before its batch is served.
IDLE_BEFORE_SWAP = 0.5


@dataclass
class _Wait:
    """A model waiting for room in the group."""

    model: OnDemandModel
    since: float
    #: ``Admission.served`` of each member when the wait began (for ``swap_batch``).
    served: dict[str, int] = field(default_factory=dict)
    #: True once a model was swapped out to make room for it.
    swapped: bool = False
    #: Why it was asked for (``request`` or ``operator``).
    reason: str = "request"


class SwapGroup:
    """Schedules the starts and swaps of one group's models (see the module docstring)."""

    def __init__(self, spec: GroupSpec, clock: IReactorTime) -> None:
        self.spec = spec
        self.clock = clock
        self.members: dict[str, OnDemandModel] = {}
        self._waiting: list[_Wait] = []
        self._tick: IDelayedCall | None = None
        #: When each idle running model was first seen idle (by name).
        self._idle_since: dict[str, float] = {}
        #: Swaps started (a model stopped to make room for another).
        self.swaps = 0
        #: Told of each swap (the metrics).
        self.events: list[ModelEvents] = []

    @property
    def name(self) -> str:
        """The group's name."""
        return self.spec.name

    def update(self, spec: GroupSpec) -> None:
        """A reload changed the group's settings; a model newly in ``preload`` starts now
        when the group has room (otherwise its first request starts it, as for any model)."""
        added = [name for name in spec.preload if name not in self.spec.preload]
        self.spec = spec
        for model in self.members.values():
            model.preload = model.backend_name in spec.preload
        for name in added:
            member = self.members.get(name)
            if member is None or member.state is not ModelState.STOPPED:
                continue  # a backend this reload adds is preloaded when it starts
            running = [m for m in self.members.values() if m.occupies]
            if not spec.max_running or len(running) < spec.max_running:
                member.start("preload")
        self.schedule()

    def add(self, model: OnDemandModel) -> None:
        """``model`` belongs to this group."""
        self.members[model.backend_name] = model

    def remove(self, model: OnDemandModel) -> None:
        """``model`` left the group (removed by a reload, or the gateway stops)."""
        if self.members.get(model.backend_name) is model:
            del self.members[model.backend_name]
        self.forget(model)
        self.schedule()

    def forget(self, model: OnDemandModel) -> None:
        """``model`` no longer waits (its load failed, or it left)."""
        self._waiting = [w for w in self._waiting if w.model is not model]

    @property
    def waiting(self) -> list[str]:
        """Names of the models waiting for room, first first."""
        return [w.model.backend_name for w in self._waiting]

    def want(self, model: OnDemandModel, reason: str = "request") -> None:
        """A request (or an operator) waits for ``model``: start it when the group has room
        (see ``schedule``)."""
        if any(w.model is model for w in self._waiting):
            return
        self._waiting.append(_Wait(
            model, self.clock.seconds(),
            {m.backend_name: m.load.served for m in self.members.values()}, reason=reason))
        self.schedule()

    def schedule(self) -> None:
        """Start waiting models while there is room; start a swap when one is due."""
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        self._tick = None
        while self._waiting:
            wait = self._waiting[0]
            model = wait.model
            if model.state in (ModelState.READY, ModelState.LOADING):
                self._waiting.pop(0)
                continue
            if model.state is ModelState.STOPPING:
                break  # it starts again once stopped (``OnDemandModel._after_stop``)
            others = [m for m in self.members.values() if m is not model and m.occupies]
            if not self.spec.max_running or len(others) < self.spec.max_running:
                self._waiting.pop(0)
                model.start("swap" if wait.swapped else wait.reason)
                continue
            if any(m.state is ModelState.STOPPING for m in others):
                break  # room is being made
            victim = min(others, key=lambda m: (
                m.load.active + m.load.waiting, m.ready_since or float("inf")))
            if self._due(wait, victim):
                self._idle_since.pop(victim.backend_name, None)
                wait.swapped = True
                self.swaps += 1
                for events in self.events:
                    events.swapped(self.name, victim.backend_name, model.backend_name)
                victim.unload("swap", self.spec.swap_grace)
            else:
                self._tick = self.clock.callLater(TICK, self.schedule)
            break

    def _due(self, wait: _Wait, victim: OnDemandModel) -> bool:
        now = self.clock.seconds()
        if victim.busy or victim.backend.waited_for:
            self._idle_since.pop(victim.backend_name, None)
        elif now - self._idle_since.setdefault(victim.backend_name, now) >= IDLE_BEFORE_SWAP:
            return True
        served = victim.load.served - wait.served.get(victim.backend_name, victim.load.served)
        if served >= self.spec.swap_batch:
            return True
        return now - wait.since >= self.spec.swap_wait

    def status_json(self) -> dict[str, object]:
        """The group's part of /health."""
        return {
            "name": self.name,
            "max_running": self.spec.max_running,
            "running": [m.backend_name for m in self.members.values() if m.occupies],
            "waiting": self.waiting,
            "swaps": self.swaps,
        }
