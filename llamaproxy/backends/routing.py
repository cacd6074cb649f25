"""Routing: which backends may serve a request, in what order to try them, and when to fail over.

A ``Router`` joins the validated ``BackendsTable`` (llamaproxy.backends.config_file) with each
backend's
live objects: its ``Backend`` status record, its ``CircuitBreaker`` and its load (the backend's
``Admission``). It resolves model names and aliases, applies per-key allowlists, and orders the
backends of a model by the model's strategy:

- ``priority``: lowest ``priority`` first (ties: declaration order);
- ``round-robin``: smooth weighted round-robin (nginx's), then the others by priority;
- ``least-busy``: fewest in-flight requests (active + queued) per slot, ties by priority;
- ``cache_affinity``: by the prompt's prefix (``llamaproxy.backends.affinity``): the backend that
  served the prefix last, else its place on a consistent-hash ring, within a load bound;
  least-busy for prompts without a reusable prefix. The rest follow in ring order, for failover.

Whatever the strategy, backends whose breaker refuses requests and backends that are down for good
(stopped, stopping) are skipped; ready backends come first, and backends that are recovering by
themselves (starting, loading, backing off) come last, by priority, so a request can wait for one
when nothing is ready. On-demand backends (``Backend.on_demand``) always count as recovering: a
request that waits for one starts it. External backends found unreachable come after those (only
so that a request none can serve is answered with the reason at once). The failover helpers
(``is_retryable``, ``within_budget``, ``breaker_outcome``, ``failure_reason``) are pure
functions of what happened to one attempt. No I/O here.

Over 500 lines because the strategies, the failover plan and ``explain`` (the dry run) must order
backends identically: they share the plan code here.
"""

from __future__ import annotations

import builtins
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
)

from llamaproxy.backends import affinity
from llamaproxy.backends.affinity import AffinityMemory, HashRing
from llamaproxy.backends.backend import Backend, BackendState
from llamaproxy.backends.breaker import BreakerState, CircuitBreaker, SecondsClock, Ticket
from llamaproxy.backends.config_file import (
    BackendsFileError,
    BackendSpec,
    BackendsTable,
    FailoverSettings,
    LocalBackendSpec,
    ModelSpec,
    Strategy,
    TableDiff,
    diff,
    needs_restart,
    single_backend_table,
    upstream_url,
    upstream_url_bytes,
)

__all__ = [
    "UNREACHABLE_REASONS", "BackendSpec", "BackendsFileError", "BackendsTable", "Choice",
    "LoadGauge", "Member", "ModelEntry",
    "ModelNotAllowedError", "Outcome", "Router", "Strategy", "TableDiff", "UnknownModelError",
    "breaker_outcome", "describe_reason", "diff", "failure_reason",
    "is_retryable", "needs_restart", "report", "should_fail_over",
    "single_backend_table", "status_for", "upstream_url", "upstream_url_bytes", "within_budget",
]


# The strategies and outcomes the per-request code compares with, as module names:
# ``Strategy.ROUND_ROBIN`` is looked up through ``EnumType``'s ``__getattr__`` hook, ten times
# slower on Python 3.11.
_ROUND_ROBIN, _LEAST_BUSY = Strategy.ROUND_ROBIN, Strategy.LEAST_BUSY
_CACHE_AFFINITY = Strategy.CACHE_AFFINITY
_UNREACHABLE = BackendState.UNREACHABLE


class LoadGauge(Protocol):
    """How busy a backend is: an ``Admission`` (active = holding a slot, waiting = queued)."""

    active: int
    waiting: int


class UnknownModelError(LookupError):
    """No backend serves the model (404 ``model_not_found``)."""


class ModelNotAllowedError(PermissionError):
    """The key's allowlist does not include the model."""


@dataclass
class Member:
    """One backend as the router sees it: its description and its live objects."""

    spec: BackendSpec
    status: Backend
    breaker: CircuitBreaker
    load: LoadGauge | None = None

    @property
    def name(self) -> str:
        """The backend's name."""
        return self.spec.name

    @property
    def in_flight(self) -> int:
        """Requests holding or waiting for one of this backend's slots."""
        return 0 if self.load is None else self.load.active + self.load.waiting

    @property
    def slots(self) -> int:
        """How many requests the backend takes at once."""
        return self.spec.max_concurrent

    @property
    def busy(self) -> float:
        """In-flight requests per slot (least-busy's measure)."""
        return self.in_flight / self.slots


def status_for(spec: BackendSpec) -> Backend:
    """A fresh ``Backend`` status record for ``spec`` (state STOPPED until its owner moves it)."""
    return Backend(
        name=spec.name,
        base_url=spec.base_url,
        api_key=spec.api_key,
        model=spec.canonical_model,
        slots=spec.known_slots,
    )


@dataclass(frozen=True)
class ModelEntry:
    """One model of the /v1/models list."""

    id: str
    #: Backends serving it, in priority order.
    backends: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    #: ``ready`` when a backend serving it is ready, else its first backend's model state
    #: (``stopped``, ``loading``, ``failed``, ``stopping``; see ``Backend.model_state``).
    state: str = "ready"

    @property
    def owned_by(self) -> str:
        """The backend that serves it first."""
        return self.backends[0]

    def as_json(self, created: int) -> dict[str, object]:
        """The OpenAI model object (``aliases``, ``backends``, ``state``: llamaproxy's)."""
        return {
            "id": self.id,
            "object": "model",
            "created": created,
            "owned_by": self.owned_by,
            "aliases": list(self.aliases),
            "backends": list(self.backends),
            "state": self.state,
        }


@dataclass
class _Plan:
    """The ordered candidates of one request and why the others were skipped."""

    candidates: list[tuple[Member, str]] = field(default_factory=list)
    skipped: list[tuple[Member, str]] = field(default_factory=list)
    #: ``cache_affinity`` models: the routing decision (``llamaproxy.backends.affinity.DECISIONS``).
    decision: str | None = None
    #: ``cache_affinity`` models: the backend that served the prefix last, if remembered.
    home: str | None = None


class Choice(NamedTuple):
    """The backends to try for one request, best first, and the affinity decision if any.

    (``choose``'s answer; the request path asks ``route``, a plain tuple.)
    """

    members: list[Member]
    decision: str | None = None


@dataclass
class _RoundRobin:
    """Smooth weighted round-robin state of one model (reset when its backend set changes)."""

    names: tuple[str, ...] = ()
    current: dict[str, int] = field(default_factory=dict)


class Router:
    """Routes model names to ordered backend candidates; rebuilt (cheaply) on every reload."""

    def __init__(self, table: BackendsTable, members: Mapping[str, Member]) -> None:
        missing = [name for name in table.backend_names if name not in members]
        if missing:
            raise ValueError(f"no live objects for backend(s) {', '.join(missing)}")
        self.table = table
        self.members = {name: members[name] for name in table.backend_names}
        self._order = {name: index for index, name in enumerate(table.backend_names)}
        self._round_robin: dict[str, _RoundRobin] = {}
        self._rings: dict[str, HashRing] = {}
        #: The name of the one backend of each model that has one and orders nothing (a
        #: ``priority`` or ``least-busy`` model): ``route`` needs no sorting for it
        #: (``_sorted``'s outcome in line; a round-robin model advances its rotation, an
        #: affinity model decides).
        self._single: dict[str, str] = {}
        self._key_models = table.key_models
        for model in table.models:
            specs = table.backends_for(model.name)
            if len(specs) == 1 and model.strategy is not _ROUND_ROBIN \
                    and model.strategy is not _CACHE_AFFINITY:
                self._single[model.name] = specs[0].name
        #: Learned prefix homes and prompt-cache counts (a reload passes them on).
        self.memory = AffinityMemory(table.affinity.remembered)

    @classmethod
    def build(
        cls,
        table: BackendsTable,
        clock: SecondsClock,
        statuses: Mapping[str, Backend],
        loads: Mapping[str, LoadGauge] | None = None,
        previous: Router | None = None,
    ) -> Router:
        """A router over ``statuses`` and ``loads`` (by backend name), making the breakers.

        With ``previous`` (a reload), a backend that did not need a restart keeps its breaker,
        with the new thresholds.
        """
        members: dict[str, Member] = {}
        for spec in table.backends:
            old = previous.members.get(spec.name) if previous is not None else None
            if old is not None and not needs_restart(old.spec, spec):
                breaker = old.breaker
                breaker.update_settings(spec.breaker)
            else:
                breaker = CircuitBreaker(spec.name, clock, spec.breaker)
            if spec.name not in statuses:
                raise ValueError(f"no Backend status for backend {spec.name!r}")
            members[spec.name] = Member(
                spec, statuses[spec.name], breaker, (loads or {}).get(spec.name)
            )
        router = cls(table, members)
        if previous is not None:
            memory = previous.memory
            for name in previous.members:
                if name not in members or needs_restart(previous.members[name].spec,
                                                        members[name].spec):
                    memory.forget(name)  # a new process has an empty cache
            memory.resize(table.affinity.remembered)
            router.memory = memory
        return router

    # -- models --------------------------------------------------------------------------------

    @property
    def max_attempts(self) -> int:
        """``[failover] max_attempts``."""
        return self.table.failover.max_attempts

    @property
    def failover(self) -> FailoverSettings:
        """The ``[failover]`` settings."""
        return self.table.failover

    def member(self, name: str) -> Member:
        """The backend called ``name`` (KeyError when there is none)."""
        return self.members[name]

    def resolve_model(self, requested: str | None, key_id: str | None = None) -> str | None:
        """The canonical model for a request's "model", or None when it is unknown.

        Aliases resolve to their model; a missing (or empty) name means the default model: the
        ``default = true`` one, else the first declared; for a key with an allowlist that does
        not include it, the key's first allowed model.
        """
        return self._resolve(requested, key_id)[0]

    def _resolve(self, requested: str | None, key_id: str | None) -> tuple[str | None, str]:
        if requested:
            canonical = self.table.lookup(requested)
            if canonical is not None:
                return canonical, "name" if canonical == requested else "alias"
            if not self.table.route_unknown_models:
                return None, "unknown"
            how = "unknown name, routed to the default model"
        else:
            how = "default model"
        default = self.table.default_model
        if not self.allowed(key_id, default):
            permitted = [m.name for m in self.table.models if self.allowed(key_id, m.name)]
            if permitted:
                return permitted[0], "the key's first allowed model"
        return default, how

    def allowed(self, key_id: str | None, model: str) -> bool:
        """May ``key_id`` use ``model`` (canonical)? Keys without an allowlist may use all."""
        if key_id is None:
            return True
        allowlist = self.table.key_models.get(key_id)
        return allowlist is None or model in allowlist

    def models_for(self, key_id: str | None) -> list[ModelEntry]:
        """The /v1/models list for ``key_id``: allowed models, each with its backends."""
        entries = []
        for model in self.table.models:
            if not self.allowed(key_id, model.name):
                continue
            specs = sorted(self.table.backends_for(model.name), key=self._priority_key_spec)
            states = [self.members[s.name].status.model_state for s in specs]
            state = "ready" if "ready" in states else states[0]
            entries.append(ModelEntry(model.name, tuple(s.name for s in specs), model.aliases,
                                      state))
        return entries

    # -- candidates ----------------------------------------------------------------------------

    def candidates(self, model: str, key_id: str | None = None) -> list[Member]:
        """The backends to try for ``model`` (canonical), best first.

        Raises ``UnknownModelError`` or ``ModelNotAllowedError``. An empty list means every
        backend of the model is skipped (breaker open, or stopped): answer 503. A round-robin
        model advances its rotation with each call; ``explain`` does not.
        """
        return self.choose(model, key_id).members

    def choose(self, model: str, key_id: str | None = None, prefix: int | None = None) -> Choice:
        """``candidates``, with the prompt's prefix hash for a ``cache_affinity`` model."""
        members, decision = self.route(model, key_id, prefix)
        return Choice(members, decision)

    def route(
        self, model: str, key_id: str | None = None, prefix: int | None = None
    ) -> tuple[list[Member], str | None]:
        """``choose``'s members and decision as a plain tuple: what the request path asks
        (a NamedTuple costs about 3 000 instructions to make, a tuple about 50)."""
        name = self._single.get(model)
        if name is not None:
            single = self.members[name]
            if key_id is not None:  # (allowed, inline)
                allowlist = self._key_models.get(key_id)
                if allowlist is not None and model not in allowlist:
                    raise ModelNotAllowedError(model)
            # (_sorted for one backend: tried unless its breaker refuses or it is down for good)
            status = single.status
            if single.breaker.allow() and (status.ready or status.recovering
                                           or status.state is _UNREACHABLE):
                return [single], None
            return [], None
        spec = self._model(model)
        if not self.allowed(key_id, model):
            raise ModelNotAllowedError(model)
        ready, recovering, unreachable = self._sorted(spec, None)
        recovering += unreachable  # (tried after the ready ones, in this order)
        if spec.strategy is not _CACHE_AFFINITY:
            ready = self._order_ready(spec, ready, commit=True)
            return (ready + recovering if recovering else ready), None
        plan = _Plan()
        ready = self._affinity_order(model, ready, prefix, plan)
        if plan.decision is not None:
            self.memory.decided(model, plan.decision)
        return (ready + recovering if recovering else ready), plan.decision

    def served(
        self, model: str | None, prefix: int | None, member: Member,
        evaluated: int | None, reused: int | None,
    ) -> None:
        """``member`` answered a request successfully: learn its prefix, count its tokens.

        ``evaluated`` and ``reused`` are the prompt tokens the response reported (None: not
        said). The prefix is remembered only for ``cache_affinity`` models.
        """
        self.memory.served(member.name, evaluated, reused)
        if prefix is None or model is None:
            return
        try:
            strategy = self.table.model(model).strategy
        except KeyError:
            return
        if strategy is Strategy.CACHE_AFFINITY:
            self.memory.remember(model, prefix, member.name)

    def pinned_slot(self, model: str | None, prefix: int | None, member: Member) -> int | None:
        """The ``id_slot`` to add for ``member`` (``[affinity] pin_slot``), or None."""
        if prefix is None or model is None or member.slots < 2:
            return None
        spec = self.table.model(model)
        if spec.strategy is not Strategy.CACHE_AFFINITY:
            return None
        pin = self.table.affinity.pin_slot if spec.pin_slot is None else spec.pin_slot
        return affinity.slot_for(prefix, member.slots) if pin else None

    def _model(self, model: str) -> ModelSpec:
        try:
            return self.table.model(model)
        except KeyError:
            raise UnknownModelError(model) from None

    def _priority_key(self, member: Member) -> tuple[int, int]:
        return member.spec.priority, self._order[member.name]

    def _priority_key_spec(self, spec: BackendSpec) -> tuple[int, int]:
        return spec.priority, self._order[spec.name]

    def _plan(self, model: ModelSpec, commit: bool, prefix: int | None = None) -> _Plan:
        """Order the model's backends, each with why (``explain``; ``choose``, the request
        path, orders them the same way without the reasons)."""
        plan = _Plan()
        ready, recovering, unreachable = self._sorted(model, plan.skipped)
        if model.strategy is Strategy.CACHE_AFFINITY:
            ready = self._affinity_order(model.name, ready, prefix, plan)
        else:
            ready = self._order_ready(model, ready, commit)
        trial = " (breaker half-open: trial request)"
        note = {m.name: trial if m.breaker.state is BreakerState.HALF_OPEN else "" for m in ready}
        if model.strategy is Strategy.ROUND_ROBIN and ready:
            pick = ready[0]
            plan.candidates.append(
                (pick, f"round-robin turn (weight {pick.spec.weight}){note[pick.name]}")
            )
            plan.candidates += [
                (m, f"failover, priority {m.spec.priority}{note[m.name]}") for m in ready[1:]
            ]
        elif model.strategy is Strategy.LEAST_BUSY or (
            model.strategy is Strategy.CACHE_AFFINITY and prefix is None
        ):
            plan.candidates += [
                (m, f"{m.in_flight}/{m.slots} slots busy{note[m.name]}") for m in ready
            ]
        elif model.strategy is Strategy.CACHE_AFFINITY and ready:
            first = {
                affinity.AFFINITY_HIT: "served this prefix last",
                affinity.AFFINITY_MISS: "the prefix's place on the hash ring" + (
                    "" if plan.home is None else f" ({plan.home}, its last home, is not ready)"),
                affinity.OVERFLOW: "next on the hash ring: the preferred backend is over "
                f"load_factor {self.table.affinity.load_factor}",
            }[plan.decision or affinity.AFFINITY_MISS]
            plan.candidates.append(
                (ready[0], f"{first}, {ready[0].in_flight}/{ready[0].slots} slots busy"
                           f"{note[ready[0].name]}"))
            plan.candidates += [
                (m, f"failover, next on the hash ring{note[m.name]}") for m in ready[1:]
            ]
        else:
            plan.candidates += [
                (m, f"ready, priority {m.spec.priority}{note[m.name]}") for m in ready
            ]
        plan.candidates += [
            (m, f"not ready ({m.status.state.value}): a request may wait for it")
            for m in recovering
        ]
        plan.candidates += [
            (m, "unreachable: a request gets 502 at once, without waiting") for m in unreachable
        ]
        return plan

    def _sorted(
        self, model: ModelSpec, skipped: list[tuple[Member, str]] | None
    ) -> tuple[list[Member], list[Member], list[Member]]:
        """The model's backends that may be tried: ready, recovering and unreachable ones, each
        by priority; the others go to ``skipped`` with their reason (None: not wanted)."""
        ready: list[Member] = []
        recovering: list[Member] = []
        unreachable: list[Member] = []
        members = self.members
        for spec in self.table.backends_for(model.name):
            member = members[spec.name]
            breaker = member.breaker
            if not breaker.allow():
                if skipped is not None:
                    skipped.append((member, _breaker_refusal(breaker)))
            elif member.status.ready:
                ready.append(member)
            elif member.status.recovering:
                recovering.append(member)
            elif member.status.state is BackendState.UNREACHABLE:
                unreachable.append(member)
            elif skipped is not None:
                skipped.append((member, f"backend is {member.status.state.value}"))
        if len(ready) > 1:
            ready.sort(key=self._priority_key)
        if len(recovering) > 1:
            recovering.sort(key=self._priority_key)
        if len(unreachable) > 1:
            unreachable.sort(key=self._priority_key)
        return ready, recovering, unreachable

    def _order_ready(self, model: ModelSpec, ready: list[Member], commit: bool) -> list[Member]:
        """``ready`` (by priority) in the order a ``priority``, ``round-robin`` or
        ``least-busy`` model tries them (``cache_affinity``: ``_affinity_order``)."""
        strategy = model.strategy
        if strategy is _ROUND_ROBIN and ready:
            pick = self._round_robin_pick(model.name, ready, commit)
            ready.remove(pick)
            ready.insert(0, pick)
        elif strategy is _LEAST_BUSY and len(ready) > 1:
            ready.sort(key=lambda m: (m.busy, *self._priority_key(m)))
        return ready

    def _affinity_order(
        self, model: str, ready: list[Member], prefix: int | None, plan: _Plan
    ) -> list[Member]:
        """``ready`` for a ``cache_affinity`` model: the chosen backend, then ring order."""
        if prefix is None:
            plan.decision = affinity.SHORT_PROMPT
            ready.sort(key=lambda m: (m.busy, *self._priority_key(m)))
            return ready
        ring = self._rings.get(model)
        if ring is None:
            names = [spec.name for spec in self.table.backends_for(model)]
            ring = self._rings[model] = HashRing(names)
        by_name = {m.name: m for m in ready}
        ordered = [by_name[name] for name in ring.walk(prefix) if name in by_name]
        if not ordered:
            return ordered
        plan.home = home = self.memory.home(model, prefix)
        plan.decision = affinity.AFFINITY_MISS
        if home is not None and home in by_name:
            ordered.remove(by_name[home])
            ordered.insert(0, by_name[home])
            plan.decision = affinity.AFFINITY_HIT
        # A prefix with no home has no cache to gain from an imbalance: it is placed strictly.
        factor = self.table.affinity.load_factor if plan.decision is affinity.AFFINITY_HIT \
            else affinity.NEW_PREFIX_LOAD_FACTOR
        index, moved = affinity.bounded_choice(ordered, factor)
        if moved:
            ordered.insert(0, ordered.pop(index))
            plan.decision = affinity.OVERFLOW
        return ordered

    def _round_robin_pick(self, model: str, ready: list[Member], commit: bool) -> Member:
        """nginx's smooth weighted round-robin over ``ready`` (in priority order)."""
        state = self._round_robin.setdefault(model, _RoundRobin())
        names = tuple(m.name for m in ready)
        current = dict(state.current) if state.names == names else dict.fromkeys(names, 0)
        total = 0
        for member in ready:
            current[member.name] += member.spec.weight
            total += member.spec.weight
        best = ready[0]
        for member in ready[1:]:
            if current[member.name] > current[best.name]:
                best = member
        current[best.name] -= total
        if commit:
            state.names, state.current = names, current
        return best

    # -- dry run and status --------------------------------------------------------------------

    def explain(self, body: object, key_id: str | None) -> dict[str, object]:
        """What ``POST /v1/route`` answers: which backend would serve ``body`` and why.

        Nothing changes (the round-robin rotation does not advance). ``error`` is None or one of
        ``invalid_model`` (400), ``model_not_found`` (404), ``model_not_allowed`` (403) and
        ``no_backend_available`` (503).
        """
        requested = body.get("model") if isinstance(body, dict) else None
        result: dict[str, object] = {
            "requested_model": requested,
            "model": None,
            "resolved_by": None,
            "strategy": None,
            "backend": None,
            "candidates": [],
            "skipped": [],
            "max_attempts": self.max_attempts,
            "error": None,
        }
        if not isinstance(body, dict):
            return _with_error(result, "invalid_model", "The request body must be a JSON object")
        if requested is not None and not isinstance(requested, str):
            return _with_error(result, "invalid_model", "'model' must be a string")
        model, how = self._resolve(requested, key_id)
        result["resolved_by"] = how
        if model is None:
            return _with_error(
                result, "model_not_found", f"The model '{requested}' does not exist"
            )
        result["model"] = model
        spec = self._model(model)
        result["strategy"] = spec.strategy.value
        if not self.allowed(key_id, model):
            return _with_error(
                result, "model_not_allowed", f"This key may not use the model '{model}'"
            )
        prefix = None
        if spec.strategy is Strategy.CACHE_AFFINITY and self.table.prefix_rule is not None:
            prefix = affinity.prefix_hash(body, self.table.prefix_rule)
        plan = self._plan(spec, commit=False, prefix=prefix)
        if spec.strategy is Strategy.CACHE_AFFINITY:
            result["affinity"] = {
                "prefix_hash": None if prefix is None else f"{prefix:016x}",
                "decision": plan.decision,
                "remembered_backend": plan.home,
                "memory": self.memory.memory_json(),
            }
        result["candidates"] = [
            {**self._describe(member), "why": why} for member, why in plan.candidates
        ]
        result["skipped"] = [
            {**self._describe(member), "reason": why} for member, why in plan.skipped
        ]
        if not plan.candidates:
            return _with_error(
                result, "no_backend_available", f"No backend can serve '{model}' now"
            )
        result["backend"] = plan.candidates[0][0].name
        return result

    def _describe(self, member: Member) -> dict[str, object]:
        return {
            "backend": member.name,
            "kind": member.spec.kind,
            "priority": member.spec.priority,
            "weight": member.spec.weight,
            "state": member.status.state.value,
            "ready": member.status.ready,
            "breaker": member.breaker.state.value,
            "in_flight": member.in_flight,
            "slots": member.slots,
        }

    def status_json(self) -> list[dict[str, object]]:
        """The backends section of /health: status, breaker and load of each backend."""
        documents = []
        for member in self.members.values():
            doc = member.status.status_json()
            doc.update(
                kind=member.spec.kind,
                models=list(member.spec.models),
                priority=member.spec.priority,
                weight=member.spec.weight,
                in_flight=member.in_flight,
                slots=member.slots,
                breaker=member.breaker.status_json(),
            )
            if isinstance(member.spec, LocalBackendSpec):
                doc["port"] = member.spec.port
            prompt_tokens = self.memory.prompt_tokens_json(member.name)
            if prompt_tokens is not None:
                doc["prompt_tokens"] = prompt_tokens
            documents.append(doc)
        return documents


def _with_error(result: dict[str, object], code: str, message: str) -> dict[str, object]:
    result["error"] = code
    result["message"] = message
    return result


def _breaker_refusal(breaker: CircuitBreaker) -> str:
    if breaker.state is BreakerState.OPEN:
        retry_in = breaker.retry_in
        return "breaker open" + ("" if retry_in is None else f", half-open in {retry_in:.0f}s")
    return (
        f"breaker half-open, {breaker.trials_in_flight}/{breaker.settings.half_open_max} "
        "trial request(s) in flight"
    )


# -- failover policy --------------------------------------------------------------------------


class Outcome(enum.Enum):
    """What one attempt tells a backend's circuit breaker."""

    SUCCESS = "success"
    FAILURE = "failure"
    NONE = "none"  # nothing about the backend (the client left, our own error)


# (as module names, for the reason given for ``_ROUND_ROBIN``)
_SUCCESS, _FAILURE, _NO_OUTCOME = Outcome.SUCCESS, Outcome.FAILURE, Outcome.NONE


_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    internet_error.ConnectError,  # refused, no route, connect timeout, TCP timeout
    internet_error.ConnectionClosed,  # lost / done before a response
    internet_error.DNSLookupError,
    defer.TimeoutError,  # our first-byte timeout (Deferred.addTimeout)
    builtins.TimeoutError,
    builtins.ConnectionError,
    OSError,
    RequestNotSent,
)

#: Agent errors wrapping the reasons (``.reasons``, Failures) a response did not (fully) arrive.
_WRAPPERS: tuple[type[ResponseFailed | RequestTransmissionFailed], ...] = (
    ResponseFailed,  # ResponseNeverReceived is one
    RequestTransmissionFailed,
)


def _cancelled(exception: BaseException) -> bool:
    if isinstance(exception, defer.CancelledError | internet_error.ConnectingCancelledError):
        return True
    if isinstance(exception, _WRAPPERS):
        return any(r.check(defer.CancelledError, internet_error.ConnectingCancelledError)
                   for r in exception.reasons)
    return False


def _transport_failure(exception: BaseException) -> bool:
    """A connection error or timeout: the backend did not (fully) answer."""
    if _cancelled(exception):
        return False
    # ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed (TLS errors arrive inside)
    return isinstance(exception, _WRAPPERS + _TRANSPORT_ERRORS)


def is_retryable(
    status: int | None, exception: BaseException | None, bytes_sent_to_client: int
) -> bool:
    """May this failed attempt be retried on the next backend?

    Yes for connection errors, timeouts, and 5xx or 429 answers, but only while nothing has been
    sent to the client (after its first byte, a response cannot be taken back). Cancellation
    (the client left) is never retried. ``exception`` is ``failure.value``; it wins over
    ``status``.
    """
    if bytes_sent_to_client > 0:
        return False
    if exception is not None:
        return _transport_failure(exception)
    return status is not None and (status >= 500 or status == 429)


def within_budget(
    attempts_made: int, max_attempts: int, deadline: float | None, now: float
) -> bool:
    """May another backend be tried: fewer than ``max_attempts`` so far and time left?"""
    return attempts_made < max_attempts and (deadline is None or now < deadline)


def should_fail_over(
    *,
    status: int | None,
    exception: BaseException | None,
    bytes_sent_to_client: int,
    attempts_made: int,
    max_attempts: int,
    deadline: float | None,
    now: float,
) -> bool:
    """``is_retryable`` and ``within_budget`` together: try the next candidate?"""
    return is_retryable(status, exception, bytes_sent_to_client) and within_budget(
        attempts_made, max_attempts, deadline, now
    )


def breaker_outcome(status: int | None, exception: BaseException | None) -> Outcome:
    """What an attempt's result means for the backend's breaker.

    Connection errors, timeouts, 5xx and 429 are failures (whenever they happen, mid-stream
    too); other answers, 4xx included, are successes; cancellation and errors that are not about
    the backend say nothing.
    """
    if exception is not None:
        return _FAILURE if _transport_failure(exception) else _NO_OUTCOME
    if status is None:
        return _NO_OUTCOME
    return _FAILURE if status >= 500 or status == 429 else _SUCCESS


#: ``failure_reason`` values meaning the backend could not be reached at all (no response
#: byte): its owner marks it down and probes it at once (``Backend.send_failed``).
UNREACHABLE_REASONS = frozenset({"refused", "reset", "timeout", "connect_error"})

_REASON_DETAILS = {
    "refused": "connection refused",
    "reset": "connection closed without a response",
    "timeout": "connect timed out",
    "connect_error": "could not connect",
}


def failure_reason(status: int | None, exception: BaseException | None) -> str:
    """Why an attempt failed, in a word, for ``llamaproxy_backend_attempts_total{reason}``.

    ``refused``, ``reset`` (the connection closed or broke), ``timeout`` (connecting, or no
    first byte in time), ``connect_error`` (no route, DNS, TLS), ``5xx``, ``429``, ``other``;
    ``cancelled`` when the attempt was cancelled (never a failure of the backend).
    """
    if exception is None:
        if status is not None and status >= 500:
            return "5xx"
        return "429" if status == 429 else "other"
    if _cancelled(exception):
        return "cancelled"  # the client left, or our own timeout: nothing about the backend
    failures = [r.value for r in exception.reasons] if isinstance(exception, _WRAPPERS) else [
        exception]
    for value in failures:
        refused = internet_error.ConnectionRefusedError | builtins.ConnectionRefusedError
        if isinstance(value, refused):
            return "refused"
    for value in failures:
        if isinstance(value, defer.TimeoutError | builtins.TimeoutError
                      | internet_error.TimeoutError | internet_error.TCPTimedOutError):
            return "timeout"
    for value in failures:
        if isinstance(value, internet_error.ConnectionClosed | builtins.ConnectionError
                      | RequestNotSent):
            return "reset"
    if isinstance(exception, _WRAPPERS):
        return "reset"  # the exchange broke for a reason of its own (e.g. a TLS alert)
    if isinstance(exception, internet_error.ConnectError | internet_error.DNSLookupError):
        return "connect_error"
    return "other"


def describe_reason(reason: str) -> str:
    """A few words on an unreachable backend for /health and error messages."""
    return _REASON_DETAILS.get(reason, reason)


def report(ticket: Ticket, status: int | None, exception: BaseException | None) -> Outcome:
    """Settle ``ticket`` with ``breaker_outcome(status, exception)``; returns the outcome.

    A failure is counted with its ``failure_reason``.
    """
    outcome = breaker_outcome(status, exception)
    if outcome is _SUCCESS:
        ticket.record_success()
    elif outcome is _FAILURE:
        ticket.record_failure(failure_reason(status, exception))
    else:
        ticket.release()
    return outcome
