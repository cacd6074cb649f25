"""Tests for llamaproxy.backends.routing: model resolution, strategies, allowlists, explain,
failover."""

from __future__ import annotations

import builtins
from collections import Counter
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from llamaproxy.backends.admission import Admission, Slot
from llamaproxy.backends.backend import Backend, BackendState, ProbeResult
from llamaproxy.backends.breaker import BreakerState
from llamaproxy.backends.config_file import (
    BackendsTable,
    ModelSpec,
    RemoteBackendSpec,
    Strategy,
    parse_backends_text,
    single_backend_table,
)
from llamaproxy.backends.routing import (
    ModelNotAllowedError,
    Outcome,
    Router,
    UnknownModelError,
    _Plan,
    breaker_outcome,
    is_retryable,
    report,
    should_fail_over,
    status_for,
    within_budget,
)
from llamaproxy.config import load_config

THREE = """
[[backends]]
name = "p1"
model_path = "/m/m.gguf"
models = ["m", "only-local"]
priority = 1
slots = 4

[[backends]]
name = "p2"
base_url = "http://two:9000/v1"
models = ["m"]
priority = 2
slots = 2
breaker = { failure_threshold = 1, reset_timeout = 10 }

[[backends]]
name = "p3"
base_url = "http://three:9000/v1"
models = ["m", "other"]
priority = 3
slots = 4

[models.m]
aliases = ["gpt-4o", "mm"]
"""


class Fixture:
    """A router over ready backends, each with its own Admission, on a Clock."""

    def __init__(self, text: str, environ: dict[str, str] | None = None) -> None:
        self.clock = Clock()
        self.table = parse_backends_text(text, "backends.toml", environ or {},
                                         is_file=lambda path: True)
        self.statuses = {spec.name: status_for(spec) for spec in self.table.backends}
        for status in self.statuses.values():
            status.set_state(BackendState.READY)
        self.loads = {spec.name: Admission(spec.max_concurrent) for spec in self.table.backends}
        self.router = Router.build(self.table, self.clock, self.statuses, self.loads)

    def order(self, model: str = "m", key_id: str | None = None) -> list[str]:
        return [member.name for member in self.router.candidates(model, key_id)]

    def busy(self, name: str, requests: int) -> list[Slot]:
        slots: list[Slot] = []
        for _ in range(requests):
            self.loads[name].acquire("k").addCallback(slots.append)
        return slots


def _old_choose(router: Router, model: str, key_id: str | None,
                prefix: int | None) -> tuple[list[str], str | None]:
    """``Router.choose`` as it was before ``route``'s one-backend path (every model sorted)."""
    spec = router._model(model)
    if not router.allowed(key_id, model):
        raise ModelNotAllowedError(model)
    ready, recovering, unreachable = router._sorted(spec, None)
    recovering += unreachable
    if spec.strategy is not Strategy.CACHE_AFFINITY:
        ready = router._order_ready(spec, ready, commit=True)
        return [m.name for m in (ready + recovering if recovering else ready)], None
    plan = _Plan()
    ready = router._affinity_order(model, ready, prefix, plan)
    if plan.decision is not None:
        router.memory.decided(model, plan.decision)
    return [m.name for m in (ready + recovering if recovering else ready)], plan.decision


_ROUTE_TEXT = """
[[backends]]
name = "a"
base_url = "http://a:9000/v1"
models = ["m", "solo"]
priority = 2
breaker = {{ failure_threshold = 1, reset_timeout = 10 }}

[[backends]]
name = "b"
base_url = "http://b:9000/v1"
models = ["m"]
priority = 1
breaker = {{ failure_threshold = 1, reset_timeout = 10, half_open_max = 2 }}

[models.m]
strategy = '{m}'

[models.solo]
strategy = '{solo}'

[keys.alice]
models = ["solo"]
"""

_STRATEGIES = st.sampled_from(["priority", "round-robin", "least-busy", "cache_affinity"])
_STEPS = st.lists(st.tuples(
    st.sampled_from(["a", "b"]),
    st.sampled_from(["state", "draining", "probe", "on_demand", "fail", "succeed", "hold",
                     "advance", "busy"]),
    st.integers(0, 6),
    st.sampled_from(["m", "solo"]),
    st.sampled_from([None, "alice", "bob"]),
    st.sampled_from([None, 1, 2, 3]),
), min_size=1, max_size=30)


class RouteTests(SynchronousTestCase):
    """``route`` (and ``choose``) order every model's backends as the sorted path did, a
    model with one backend without sorting: a hypothesis test against the old function."""

    @given(_STRATEGIES, _STRATEGIES, _STEPS)
    def test_same_choice_as_the_old_function(
        self, m: str, solo: str, steps: list[tuple[str, str, int, str, str | None, int | None]]
    ) -> None:
        text = _ROUTE_TEXT.format(m=m, solo=solo)
        old, new = Fixture(text), Fixture(text)
        held: list[object] = []
        for name, change, n, model, key_id, prefix in steps:
            for fixture in (old, new):
                status = fixture.statuses[name]
                breaker = fixture.router.member(name).breaker
                if change == "state":
                    status.set_state(list(BackendState)[n])
                elif change == "draining":
                    status.set_draining(n % 2 == 1)
                elif change == "probe":
                    status.last_probe = ProbeResult(0.0, ["ready", "loading", "down"][n % 3])
                elif change == "on_demand":
                    status.on_demand = (lambda: None) if n % 2 else None
                elif change in ("fail", "succeed", "hold"):
                    ticket = breaker.acquire()
                    if ticket is not None and change == "fail":
                        ticket.record_failure()
                    elif ticket is not None and change == "succeed":
                        ticket.record_success()
                    elif ticket is not None:
                        held.append(ticket)  # a half-open trial in flight
                elif change == "advance":
                    fixture.clock.advance(n * 2)
                else:
                    held.extend(fixture.busy(name, n))
            try:
                expected: object = _old_choose(old.router, model, key_id, prefix)
            except (UnknownModelError, ModelNotAllowedError) as e:
                expected = type(e)
            try:
                members, decision = new.router.route(model, key_id, prefix)
                got: object = ([m.name for m in members], decision)
            except (UnknownModelError, ModelNotAllowedError) as e:
                got = type(e)
            self.assertEqual(got, expected)
            if isinstance(got, tuple):
                choice = new.router.choose(model, key_id, prefix)
                expected = _old_choose(old.router, model, key_id, prefix)
                self.assertEqual(([m.name for m in choice.members], choice.decision), expected)

    def test_a_model_with_one_backend_is_not_sorted(self) -> None:
        fixture = Fixture(_ROUTE_TEXT.format(m="priority", solo="priority"))
        self.assertEqual(fixture.router._single, {"solo": "a"})
        fixture.router._sorted = None  # type: ignore[assignment, method-assign]
        members, decision = fixture.router.route("solo", "alice")
        self.assertEqual(([m.name for m in members], decision), (["a"], None))
        with self.assertRaises(ModelNotAllowedError):
            fixture.router.route("m", "alice")  # (a model of two backends: sorted, as before)


class ResolveTests(SynchronousTestCase):
    def test_names_aliases_and_default(self) -> None:
        router = Fixture(THREE).router
        self.assertEqual(router.resolve_model("m"), "m")
        self.assertEqual(router.resolve_model("gpt-4o"), "m")
        self.assertEqual(router.resolve_model("other"), "other")
        self.assertIsNone(router.resolve_model("nope"))
        self.assertEqual(router.resolve_model(None), "m")  # the first declared
        self.assertEqual(router.resolve_model(""), "m")

    def test_declared_default(self) -> None:
        router = Fixture(THREE + "[models.other]\ndefault = true\n").router
        self.assertEqual(router.resolve_model(None), "other")
        self.assertEqual(router.resolve_model("mm"), "m")

    def test_allowlist(self) -> None:
        router = Fixture(THREE + "[keys.alice]\nmodels = ['other']\n"
                                 "[keys.nobody]\nmodels = []\n").router
        self.assertTrue(router.allowed("alice", "other"))
        self.assertFalse(router.allowed("alice", "m"))
        self.assertTrue(router.allowed("bob", "m"))  # no allowlist: everything
        self.assertTrue(router.allowed(None, "m"))  # auth disabled
        self.assertFalse(router.allowed("nobody", "other"))
        # the default model is not alice's: her first allowed model is
        self.assertEqual(router.resolve_model(None, "alice"), "other")
        self.assertEqual(router.resolve_model(None, "bob"), "m")
        self.assertEqual(router.resolve_model(None, "nobody"), "m")  # then candidates() refuses
        self.assertRaises(ModelNotAllowedError, router.candidates, "m", "alice")
        self.assertEqual([m.name for m in router.candidates("other", "alice")], ["p3"])
        self.assertEqual([e.id for e in router.models_for("alice")], ["other"])
        self.assertEqual(router.models_for("nobody"), [])

    def test_unknown_model(self) -> None:
        router = Fixture(THREE).router
        self.assertRaises(UnknownModelError, router.candidates, "nope")
        self.assertRaises(UnknownModelError, router.candidates, "gpt-4o")  # canonical only

    def test_names_are_resolved_as_the_table_looks_them_up(self) -> None:
        # The router's dicts give what BackendsTable.lookup and .model give, the first model
        # with the name or alias winning (even in a table that was not validated).
        fixture = Fixture(THREE)
        table = replace(fixture.table, models=(
            *fixture.table.models, ModelSpec("other", aliases=("mm", "late")),
            ModelSpec("late", aliases=("m",))))
        router = Router(table, fixture.router.members)
        for name in ("m", "gpt-4o", "mm", "other", "only-local", "late", "nope", "M"):
            with self.subTest(name=name):
                self.assertEqual(router.resolve_model(name), table.lookup(name))
                canonical = table.lookup(name)
                if canonical is not None:
                    self.assertIs(router._model(canonical), table.model(canonical))

    def test_models_for(self) -> None:
        text = THREE.replace("priority = 1", "priority = 5")
        entries = Fixture(text).router.models_for(None)
        self.assertEqual([(e.id, e.backends, e.owned_by) for e in entries], [
            ("m", ("p2", "p3", "p1"), "p2"),
            ("only-local", ("p1",), "p1"),
            ("other", ("p3",), "p3"),
        ])
        self.assertEqual(entries[0].as_json(123), {
            "id": "m", "object": "model", "created": 123, "owned_by": "p2",
            "aliases": ["gpt-4o", "mm"], "backends": ["p2", "p3", "p1"], "state": "ready",
        })


class SingleBackendTests(SynchronousTestCase):
    def test_every_name_goes_to_the_one_backend(self) -> None:
        config = load_config({}, {"BACKEND_URL": "http://h:8080", "MODEL_ALIAS": "tiny"},
                             path_exists=lambda p: False, hostname=lambda: "h")
        table = single_backend_table(config)
        (spec,) = table.backends
        status = status_for(spec)
        self.assertEqual((status.name, status.base_url, status.model, status.slots),
                         ("http://h:8080", "http://h:8080", "tiny", None))
        router = Router.build(table, Clock(), {spec.name: status})
        for requested in (None, "tiny", "gpt-4o", "whatever"):
            self.assertEqual(router.resolve_model(requested), "tiny")
        status.set_state(BackendState.READY)
        self.assertEqual([m.name for m in router.candidates("tiny", "anyone")], [spec.name])
        for _ in range(20):  # no breaker: failures never make it skip the backend
            ticket = router.member(spec.name).breaker.acquire()
            assert ticket is not None
            ticket.record_failure()
        self.assertEqual([m.name for m in router.candidates("tiny")], [spec.name])
        self.assertEqual(router.explain({"model": "x"}, None)["resolved_by"],
                         "unknown name, routed to the default model")


class PriorityTests(SynchronousTestCase):
    def test_order_is_failover_order(self) -> None:
        fixture = Fixture(THREE)
        self.assertEqual(fixture.order(), ["p1", "p2", "p3"])
        self.assertEqual(fixture.order("other"), ["p3"])
        self.assertEqual(fixture.router.max_attempts, 3)

    def test_ties_keep_declaration_order(self) -> None:
        fixture = Fixture(THREE.replace("priority = 3", "priority = 1"))
        self.assertEqual(fixture.order(), ["p1", "p3", "p2"])

    def test_not_ready_skipped_for_a_ready_lower_priority(self) -> None:
        fixture = Fixture(THREE)
        fixture.statuses["p1"].set_state(BackendState.LOADING)
        # p1 comes last: the request only waits for it when every ready one failed
        self.assertEqual(fixture.order(), ["p2", "p3", "p1"])
        fixture.statuses["p1"].set_state(BackendState.READY)
        fixture.statuses["p1"].last_probe = ProbeResult(0, "down")  # ready, but failing probes
        self.assertEqual(fixture.order(), ["p2", "p3", "p1"])

    def test_none_ready_highest_priority_recovering_first(self) -> None:
        fixture = Fixture(THREE)
        fixture.statuses["p1"].set_state(BackendState.BACKOFF)
        fixture.statuses["p2"].set_state(BackendState.STARTING)
        fixture.statuses["p3"].set_state(BackendState.STOPPED)
        self.assertEqual(fixture.order(), ["p1", "p2"])
        fixture.statuses["p1"].set_state(BackendState.STOPPING)
        fixture.statuses["p2"].set_state(BackendState.STOPPED)
        self.assertEqual(fixture.order(), [])

    def test_open_breaker_skipped_half_open_admits_a_trial(self) -> None:
        fixture = Fixture(THREE)
        breaker = fixture.router.member("p2").breaker
        ticket = breaker.acquire()
        assert ticket is not None
        ticket.record_failure()  # threshold 1: open
        self.assertEqual(fixture.order(), ["p1", "p3"])
        fixture.clock.advance(10)
        self.assertEqual(fixture.order(), ["p1", "p2", "p3"])  # half-open: one trial
        trial = breaker.acquire()
        assert trial is not None
        self.assertEqual(fixture.order(), ["p1", "p3"])  # its trial slot is taken
        trial.record_success()
        self.assertEqual(breaker.state, BreakerState.HALF_OPEN)  # success_threshold 2
        self.assertEqual(fixture.order(), ["p1", "p2", "p3"])


class RoundRobinTests(SynchronousTestCase):
    def test_smooth_weighted_sequence(self) -> None:
        text = THREE.replace("[models.m]", "[models.m]\nstrategy = 'round-robin'")
        text = text.replace("priority = 1\n", "priority = 1\nweight = 5\n")
        fixture = Fixture(text)
        firsts = [fixture.order()[0] for _ in range(14)]
        # nginx's smooth weighted round-robin for weights 5, 1, 1
        self.assertEqual(firsts, ["p1", "p1", "p2", "p1", "p3", "p1", "p1"] * 2)

    def test_the_others_follow_by_priority(self) -> None:
        fixture = Fixture(THREE.replace("[models.m]", "[models.m]\nstrategy = 'round-robin'"))
        self.assertEqual([fixture.order() for _ in range(4)], [
            ["p1", "p2", "p3"], ["p2", "p1", "p3"], ["p3", "p1", "p2"], ["p1", "p2", "p3"],
        ])

    def test_only_ready_backends_take_turns(self) -> None:
        fixture = Fixture(THREE.replace("[models.m]", "[models.m]\nstrategy = 'round-robin'"))
        fixture.order()
        fixture.statuses["p2"].set_state(BackendState.LOADING)
        self.assertEqual([fixture.order() for _ in range(3)],
                         [["p1", "p3", "p2"], ["p3", "p1", "p2"], ["p1", "p3", "p2"]])
        for name in ("p1", "p3"):
            fixture.statuses[name].set_state(BackendState.BACKOFF)
        self.assertEqual(fixture.order(), ["p1", "p2", "p3"])  # nothing ready: by priority

    def test_explain_does_not_advance_the_rotation(self) -> None:
        fixture = Fixture(THREE.replace("[models.m]", "[models.m]\nstrategy = 'round-robin'"))
        for _ in range(3):
            self.assertEqual(fixture.router.explain({"model": "m"}, None)["backend"], "p1")
        self.assertEqual(fixture.order()[0], "p1")
        self.assertEqual(fixture.router.explain({"model": "m"}, None)["backend"], "p2")

    @given(
        weights=st.lists(st.integers(1, 10), min_size=1, max_size=6),
        cycles=st.integers(1, 3),
        offset=st.integers(0, 20),
    )
    def test_every_cycle_is_exact(self, weights: list[int], cycles: int, offset: int) -> None:
        """Any run of k·sum(weights) consecutive picks gives each backend exactly k·weight."""
        specs = tuple(
            RemoteBackendSpec(name=f"b{i}", models=("m",), weight=w, base_url="http://x")
            for i, w in enumerate(weights)
        )
        table = BackendsTable(specs, (ModelSpec("m", Strategy.ROUND_ROBIN),), "m")
        statuses = {spec.name: Backend(spec.name, spec.base_url) for spec in specs}
        for status in statuses.values():
            status.set_state(BackendState.READY)
        router = Router.build(table, Clock(), statuses)
        for _ in range(offset):
            router.candidates("m")
        picks = Counter(router.candidates("m")[0].name for _ in range(cycles * sum(weights)))
        self.assertEqual(picks, {f"b{i}": cycles * w for i, w in enumerate(weights)})


class LeastBusyTests(SynchronousTestCase):
    def test_fewest_in_flight_per_slot(self) -> None:
        fixture = Fixture(THREE.replace("[models.m]", "[models.m]\nstrategy = 'least-busy'"))
        self.assertEqual(fixture.order(), ["p1", "p2", "p3"])  # all idle: by priority
        fixture.busy("p1", 2)  # 2/4
        fixture.busy("p2", 1)  # 1/2
        fixture.busy("p3", 1)  # 1/4
        self.assertEqual(fixture.order(), ["p3", "p1", "p2"])
        slots = fixture.busy("p3", 6)  # 4 active + 3 queued: 7/4
        self.assertEqual(fixture.router.member("p3").in_flight, 7)
        self.assertEqual(fixture.order(), ["p1", "p2", "p3"])
        for slot in slots:
            slot.release()
        self.assertEqual(fixture.order(), ["p3", "p1", "p2"])

    def test_not_ready_still_last(self) -> None:
        fixture = Fixture(THREE.replace("[models.m]", "[models.m]\nstrategy = 'least-busy'"))
        fixture.busy("p1", 4)
        fixture.busy("p2", 2)
        fixture.statuses["p3"].set_state(BackendState.LOADING)
        self.assertEqual(fixture.order(), ["p1", "p2", "p3"])

    def test_without_load_gauges(self) -> None:
        table = parse_backends_text(THREE, "b.toml", {}, is_file=lambda path: True)
        statuses = {spec.name: status_for(spec) for spec in table.backends}
        router = Router.build(table, Clock(), statuses)
        self.assertEqual(router.member("p1").in_flight, 0)
        self.assertEqual(router.member("p1").busy, 0.0)


class ExplainTests(SynchronousTestCase):
    def test_dry_run(self) -> None:
        fixture = Fixture(THREE)
        fixture.statuses["p1"].set_state(BackendState.LOADING)
        fixture.statuses["p3"].set_state(BackendState.STOPPED)
        fixture.busy("p2", 1)
        result = fixture.router.explain({"model": "gpt-4o", "messages": []}, "k")
        self.assertEqual(result, {
            "requested_model": "gpt-4o",
            "model": "m",
            "resolved_by": "alias",
            "strategy": "priority",
            "backend": "p2",
            "candidates": [
                {"backend": "p2", "kind": "remote", "priority": 2, "weight": 1,
                 "state": "ready", "ready": True, "breaker": "closed", "in_flight": 1,
                 "slots": 2, "why": "ready, priority 2"},
                {"backend": "p1", "kind": "local", "priority": 1, "weight": 1,
                 "state": "loading", "ready": False, "breaker": "closed", "in_flight": 0,
                 "slots": 4, "why": "not ready (loading): a request may wait for it"},
            ],
            "skipped": [
                {"backend": "p3", "kind": "remote", "priority": 3, "weight": 1,
                 "state": "stopped", "ready": False, "breaker": "closed", "in_flight": 0,
                 "slots": 4, "reason": "backend is stopped"},
            ],
            "max_attempts": 3,
            "error": None,
        })

    def test_breaker_reasons(self) -> None:
        fixture = Fixture(THREE)
        ticket = fixture.router.member("p2").breaker.acquire()
        assert ticket is not None
        ticket.record_failure()
        fixture.clock.advance(4)
        result = fixture.router.explain({}, None)
        self.assertEqual(result["resolved_by"], "default model")
        self.assertEqual(result["skipped"][0]["reason"],  # type: ignore[index]
                         "breaker open, half-open in 6s")
        fixture.clock.advance(6)
        why = [c["why"] for c in fixture.router.explain({}, None)["candidates"]]  # type: ignore[attr-defined]
        self.assertEqual(why[1], "ready, priority 2 (breaker half-open: trial request)")
        fixture.router.member("p2").breaker.acquire()
        self.assertEqual(fixture.router.explain({}, None)["skipped"][0]["reason"],  # type: ignore[index]
                         "breaker half-open, 1/1 trial request(s) in flight")

    def test_errors(self) -> None:
        fixture = Fixture(THREE + "[keys.alice]\nmodels = ['other']\n")
        explain = fixture.router.explain
        self.assertEqual(explain([], None)["error"], "invalid_model")
        self.assertEqual(explain({"model": 3}, None)["error"], "invalid_model")
        missing = explain({"model": "nope"}, None)
        self.assertEqual((missing["error"], missing["model"], missing["resolved_by"]),
                         ("model_not_found", None, "unknown"))
        self.assertEqual(missing["message"], "The model 'nope' does not exist")
        refused = explain({"model": "m"}, "alice")
        self.assertEqual((refused["error"], refused["model"], refused["candidates"]),
                         ("model_not_allowed", "m", []))
        for status in fixture.statuses.values():
            status.set_state(BackendState.STOPPED)
        down = explain({"model": "other"}, "alice")
        self.assertEqual((down["error"], down["backend"], len(down["skipped"])),  # type: ignore[arg-type]
                         ("no_backend_available", None, 1))

    def test_status_json(self) -> None:
        fixture = Fixture(THREE)
        documents = fixture.router.status_json()
        self.assertEqual([d["name"] for d in documents], ["p1", "p2", "p3"])
        self.assertEqual(documents[0]["port"], 8080)
        self.assertEqual((documents[1]["kind"], documents[1]["slots"], documents[1]["models"]),
                         ("remote", 2, ["m"]))
        self.assertEqual(documents[1]["breaker"]["state"], "closed")  # type: ignore[index]
        self.assertNotIn("port", documents[1])


class RebuildTests(SynchronousTestCase):
    def test_breakers_survive_a_reload_unless_restarted(self) -> None:
        fixture = Fixture(THREE)
        old = fixture.router
        for name in ("p2", "p3"):
            ticket = old.member(name).breaker.acquire()
            assert ticket is not None
            ticket.record_failure()
        changed = parse_backends_text(
            THREE.replace("priority = 2", "priority = 7")
            .replace("reset_timeout = 10", "reset_timeout = 99")
            .replace("http://three", "http://four"),
            "b.toml", {}, is_file=lambda path: True,
        )
        new = Router.build(changed, fixture.clock, fixture.statuses, fixture.loads, previous=old)
        self.assertIs(new.member("p2").breaker, old.member("p2").breaker)
        self.assertEqual(new.member("p2").breaker.settings.reset_timeout, 99)
        self.assertEqual(new.member("p2").breaker.state, BreakerState.OPEN)
        self.assertIsNot(new.member("p3").breaker, old.member("p3").breaker)  # new base_url
        self.assertIs(new.member("p1").load, fixture.loads["p1"])

    def test_missing_live_objects(self) -> None:
        fixture = Fixture(THREE)
        self.assertRaises(ValueError, Router.build, fixture.table, fixture.clock, {})
        self.assertRaises(ValueError, Router, fixture.table, {})


class FailoverTests(SynchronousTestCase):
    def test_is_retryable(self) -> None:
        lost = Failure(internet_error.ConnectionLost())
        cancelled = Failure(defer.CancelledError())
        cases: list[tuple[int | None, BaseException | None, int, bool]] = [
            (None, internet_error.ConnectionRefusedError(), 0, True),
            (None, builtins.ConnectionRefusedError(), 0, True),
            (None, internet_error.TimeoutError(), 0, True),  # connect timeout
            (None, internet_error.DNSLookupError(), 0, True),
            (None, defer.TimeoutError(), 0, True),  # no first byte in time
            (None, builtins.TimeoutError(), 0, True),
            (None, internet_error.ConnectionLost(), 0, True),
            (None, ResponseNeverReceived([lost]), 0, True),
            (None, ResponseFailed([lost]), 0, True),  # body cut before we sent anything
            (None, RequestTransmissionFailed([lost]), 0, True),
            (None, RequestNotSent(), 0, True),
            (None, ResponseFailed([lost]), 1, False),  # a byte reached the client
            (None, internet_error.ConnectionRefusedError(), 5, False),
            (None, defer.CancelledError(), 0, False),  # the client left
            (None, internet_error.ConnectingCancelledError(None), 0, False),
            (None, ResponseNeverReceived([cancelled]), 0, False),
            (None, ValueError("our bug"), 0, False),
            (502, ValueError("exception wins"), 0, False),
            (500, None, 0, True),
            (502, None, 0, True),
            (503, None, 0, True),
            (504, None, 0, True),
            (429, None, 0, True),
            (503, None, 1, False),
            (200, None, 0, False),
            (400, None, 0, False),
            (401, None, 0, False),
            (404, None, 0, False),
            (None, None, 0, False),
        ]
        for status, exception, sent, expected in cases:
            self.assertEqual(is_retryable(status, exception, sent), expected,
                             (status, exception, sent))

    def test_budget(self) -> None:
        self.assertTrue(within_budget(1, 3, None, 100.0))
        self.assertTrue(within_budget(2, 3, 10.0, 9.9))
        self.assertFalse(within_budget(3, 3, None, 0.0))
        self.assertFalse(within_budget(1, 3, 10.0, 10.0))
        common = {"bytes_sent_to_client": 0, "max_attempts": 3, "deadline": 10.0}
        self.assertTrue(should_fail_over(status=503, exception=None, attempts_made=1, now=1.0,
                                         **common))  # type: ignore[arg-type]
        self.assertFalse(should_fail_over(status=503, exception=None, attempts_made=3, now=1.0,
                                          **common))  # type: ignore[arg-type]
        self.assertFalse(should_fail_over(status=503, exception=None, attempts_made=1, now=11.0,
                                          **common))  # type: ignore[arg-type]
        self.assertFalse(should_fail_over(status=400, exception=None, attempts_made=1, now=1.0,
                                          **common))  # type: ignore[arg-type]

    def test_breaker_outcome_and_report(self) -> None:
        cases: list[tuple[int | None, BaseException | None, Outcome]] = [
            (200, None, Outcome.SUCCESS),
            (404, None, Outcome.SUCCESS),
            (500, None, Outcome.FAILURE),
            (429, None, Outcome.FAILURE),
            (None, internet_error.ConnectionRefusedError(), Outcome.FAILURE),
            (None, defer.TimeoutError(), Outcome.FAILURE),
            (None, defer.CancelledError(), Outcome.NONE),
            (None, ValueError(), Outcome.NONE),
            (None, None, Outcome.NONE),
        ]
        for status, exception, expected in cases:
            self.assertEqual(breaker_outcome(status, exception), expected, (status, exception))
        breaker = Fixture(THREE).router.member("p1").breaker
        for status, exception, expected in cases:
            ticket = breaker.acquire()
            assert ticket is not None
            self.assertEqual(report(ticket, status, exception), expected)
            self.assertTrue(ticket.done)
        self.assertEqual((breaker.successes, breaker.failures), (2, 4))


class FailureReasonTests(SynchronousTestCase):
    """routing.failure_reason: the reason label of llamaproxy_backend_attempts_total (24.5)."""

    def test_reasons(self) -> None:
        from twisted.internet import defer
        from twisted.internet import error as internet_error
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseNeverReceived

        from llamaproxy.backends.routing import UNREACHABLE_REASONS, failure_reason

        cases = [
            (None, internet_error.ConnectionRefusedError(), "refused"),
            (None, ResponseNeverReceived([Failure(internet_error.ConnectionRefusedError())]),
             "refused"),
            (None, ResponseNeverReceived([Failure(internet_error.ConnectionLost())]), "reset"),
            (None, ConnectionResetError(), "reset"),
            (None, defer.TimeoutError(), "timeout"),
            (None, internet_error.TCPTimedOutError(), "timeout"),
            (None, internet_error.DNSLookupError(), "connect_error"),
            (None, ResponseNeverReceived([Failure(defer.CancelledError())]), "cancelled"),
            (None, defer.CancelledError(), "cancelled"),
            (502, None, "5xx"),
            (429, None, "429"),
            (None, ValueError("ours"), "other"),
        ]
        for status, exception, expected in cases:
            self.assertEqual(failure_reason(status, exception), expected, (status, exception))
        self.assertNotIn("cancelled", UNREACHABLE_REASONS)
