"""Tests for llamaproxy.backends.on_demand and llamaproxy.backends.swap_group (on a Clock)."""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.backends.admission import Admission, Slot
from llamaproxy.backends.backend import Backend, ModelLoadFailedError
from llamaproxy.backends.config_file import GroupSpec
from llamaproxy.backends.on_demand import ModelState, OnDemandModel
from llamaproxy.backends.swap_group import SwapGroup
from llamaproxy.testing import FakeSupervisor


def make_model(
    name: str, clock: Clock, group: SwapGroup | None = None, idle_ttl: float = 0.0,
    load_time: float | None = None, slots: int = 1,
) -> tuple[OnDemandModel, FakeSupervisor]:
    backend = Backend(name, "http://127.0.0.1:1")
    child = FakeSupervisor(backend, clock, load_time)
    model = OnDemandModel(backend, child, Admission(slots, clock=clock), clock,
                          idle_ttl=idle_ttl, group=group, jitter=lambda: 0.0)
    return model, child


class LifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_request_starts_a_stopped_model(self) -> None:
        model, child = make_model("a", self.clock, idle_ttl=5)
        self.assertEqual(model.state, ModelState.STOPPED)
        self.assertEqual(model.backend.model_state, "stopped")
        self.assertEqual(model.backend.status_json()["on_demand"],
                         {"state": "stopped", "idle_ttl": 5.0})
        self.assertTrue(model.backend.recovering)
        waiting = model.backend.wait_ready()
        self.assertEqual((child.starts, model.state), (1, ModelState.LOADING))
        self.assertNoResult(waiting)
        model.backend.wait_ready()  # a second request does not start it again
        self.assertEqual(child.starts, 1)
        self.assertEqual(model.backend.model_state, "loading")
        child.loaded()
        self.successResultOf(waiting)
        self.assertEqual(model.state, ModelState.READY)
        self.assertEqual(model.backend.model_state, "ready")

    def test_load_failure_fails_waiters_with_backoff(self) -> None:
        model, child = make_model("a", self.clock)
        waiting = model.backend.wait_ready()
        self.clock.advance(2)
        child.crash("exit code 1: error loading model: bad magic")
        error = self.failureResultOf(waiting, ModelLoadFailedError).value
        self.assertEqual((error.backend, error.reason),
                         ("a", "exit code 1: error loading model: bad magic"))
        self.assertEqual(model.state, ModelState.FAILED)
        self.assertEqual(model.status_json()["load_error"], error.reason)
        self.assertEqual(child.stops, 1)
        # Within the backoff (1 s), requests fail at once; the child is not started again.
        again = model.backend.wait_ready()
        self.failureResultOf(again, ModelLoadFailedError)
        self.assertEqual(child.starts, 1)
        self.clock.advance(1.0)
        third = model.backend.wait_ready()
        self.assertEqual(child.starts, 2)
        child.crash("exit code 1")
        self.failureResultOf(third, ModelLoadFailedError)
        # The backoff doubles: 2 s now.
        self.clock.advance(1.5)
        self.failureResultOf(model.backend.wait_ready(), ModelLoadFailedError)
        self.clock.advance(0.5)
        fourth = model.backend.wait_ready()
        self.assertEqual(child.starts, 3)
        child.loaded()
        self.successResultOf(fourth)

    def test_idle_ttl_unloads_and_a_request_during_the_stop_starts_it_again(self) -> None:
        model, child = make_model("a", self.clock, idle_ttl=10)
        child.stop_delay = 2.0
        model.backend.wait_ready()
        child.loaded()
        slot: Slot = self.successResultOf(model.load.acquire("k"))
        self.clock.pump([1.0] * 30)  # busy: never idle
        self.assertEqual(model.state, ModelState.READY)
        slot.release()
        self.clock.pump([1.0] * 9)
        self.assertEqual(model.state, ModelState.READY)
        self.clock.pump([1.0] * 2)
        self.assertEqual(model.state, ModelState.STOPPING)
        self.assertFalse(model.backend.ready)
        waiting = model.backend.wait_ready()  # arrives during the stop: waits, does not fail
        self.assertEqual(child.starts, 1)
        self.clock.advance(2.0)
        self.assertEqual(child.starts, 2)
        self.assertNoResult(waiting)
        child.loaded()
        self.successResultOf(waiting)

    def test_restart_only_while_running(self) -> None:
        model, child = make_model("a", self.clock)
        restarted: list[bool] = []
        child.restart = lambda: restarted.append(True) or True  # type: ignore[attr-defined]
        self.assertFalse(model.restart())
        model.backend.wait_ready()
        self.assertTrue(model.restart())
        self.assertEqual(restarted, [True])

    def test_unload_drains_first(self) -> None:
        model, child = make_model("a", self.clock, slots=2)
        model.backend.wait_ready()
        child.loaded()
        first = self.successResultOf(model.load.acquire("k"))
        done = model.unload("operator", grace=30)
        self.assertTrue(model.backend.draining)
        self.clock.advance(5)
        self.assertEqual(child.stops, 0)  # its request in flight still runs
        first.release()
        self.clock.advance(0.1)
        self.assertEqual(child.stops, 1)
        self.successResultOf(done)
        self.assertEqual(model.state, ModelState.STOPPED)

    def test_unload_grace_bounds_the_drain(self) -> None:
        model, child = make_model("a", self.clock)
        model.backend.wait_ready()
        child.loaded()
        self.successResultOf(model.load.acquire("k"))
        model.unload("operator", grace=3)
        self.clock.pump([0.1] * 29)
        self.assertEqual(child.stops, 0)
        self.clock.pump([0.1] * 2)
        self.assertEqual(child.stops, 1)


class GroupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_max_running_swaps_an_idle_model_soon(self) -> None:
        group = SwapGroup(GroupSpec("g", max_running=1), self.clock)
        a, child_a = make_model("a", self.clock, group)
        b, child_b = make_model("b", self.clock, group)
        a.backend.wait_ready()
        child_a.loaded()
        waiting = b.backend.wait_ready()
        self.clock.pump([0.1] * 4)
        self.assertEqual((child_a.stops, group.swaps), (0, 0))  # idle, but not for long yet
        self.clock.pump([0.1] * 2)  # a stopped, then b started
        self.assertEqual((child_a.stops, child_b.starts, group.swaps), (1, 1, 1))
        child_b.loaded()
        self.successResultOf(waiting)
        self.assertEqual(group.status_json()["running"], ["b"])

    def test_a_reload_that_adds_to_preload_starts_the_model_when_there_is_room(self) -> None:
        group = SwapGroup(GroupSpec("g", max_running=1), self.clock)
        a, child_a = make_model("a", self.clock, group)
        b, child_b = make_model("b", self.clock, group)
        group.update(GroupSpec("g", max_running=1, preload=("a",)))
        self.assertEqual((child_a.starts, a.preload), (1, True))
        child_a.loaded()
        # No room for b now: it waits for its first request (no swap for a preload).
        group.update(GroupSpec("g", max_running=1, preload=("b",)))
        self.assertEqual((child_b.starts, b.preload, a.preload), (0, True, False))
        self.assertEqual(child_a.stops, 0)

    def test_no_limit(self) -> None:
        group = SwapGroup(GroupSpec("g", max_running=0), self.clock)
        models = [make_model(n, self.clock, group) for n in "abc"]
        for model, _ in models:
            model.backend.wait_ready()
        self.assertEqual([child.starts for _, child in models], [1, 1, 1])
        self.assertEqual(group.swaps, 0)

    def test_busy_model_serves_its_batch_before_the_swap(self) -> None:
        group = SwapGroup(GroupSpec("g", max_running=1, swap_grace=60, swap_batch=3), self.clock)
        a, child_a = make_model("a", self.clock, group)
        b, child_b = make_model("b", self.clock, group)
        a.backend.wait_ready()
        child_a.loaded()
        slots = [a.load.acquire("k") for _ in range(5)]
        b.backend.wait_ready()
        for served in range(2):
            self.successResultOf(slots[served]).release()
            self.clock.advance(0.1)
            self.assertEqual((child_a.stops, group.swaps), (0, 0), served)
        self.successResultOf(slots[2]).release()
        self.clock.advance(0.1)
        self.assertEqual(group.swaps, 1)
        # Draining: a's queued requests are still served, then it stops and b starts.
        self.successResultOf(slots[3]).release()
        self.successResultOf(slots[4]).release()
        self.clock.advance(0.1)
        self.assertEqual((child_a.stops, child_b.starts), (1, 1))

    def test_waiting_model_is_not_starved(self) -> None:
        group = SwapGroup(GroupSpec("g", max_running=1, swap_grace=5, swap_batch=1000,
                                    swap_wait=5), self.clock)
        a, child_a = make_model("a", self.clock, group)
        b, child_b = make_model("b", self.clock, group)
        a.backend.wait_ready()
        child_a.loaded()
        held = self.successResultOf(a.load.acquire("k"))  # a never goes idle
        b.backend.wait_ready()
        self.clock.pump([0.1] * 49)
        self.assertEqual(group.swaps, 0)
        self.clock.pump([0.1] * 2)
        self.assertEqual(group.swaps, 1)
        self.clock.pump([0.1] * 51)  # the drain is bounded by swap_grace too
        self.assertEqual((child_a.stops, child_b.starts), (1, 1))
        held.release()

    def test_two_keys_alternating_two_models(self) -> None:
        """Two keys, each asking one model in a loop: swaps and waits are bounded."""
        load_time, service, batch, grace, wait = 5.0, 1.0, 4, 10.0, 10.0
        report = simulate(self.clock, load_time, service, GroupSpec(
            "g", max_running=1, swap_grace=grace, swap_batch=batch, swap_wait=wait),
            duration=300)
        print(f"\nswap fairness: swap_batch={batch} swap_wait={wait}: {report}")
        served = report.served
        self.assertGreater(min(served.values()), 20)  # both models make progress
        # Every swap serves at least a batch of the running model (no thrashing) ...
        self.assertLessEqual(report.swaps, sum(served.values()) / batch + 1)
        # ... and no request waits longer than a batch, a drain and a load.
        self.assertLessEqual(report.worst_wait,
                             min(batch * service, wait) + grace + load_time + service)
        naive = simulate(Clock(), load_time, service, GroupSpec(
            "g", max_running=1, swap_grace=grace, swap_batch=1), duration=300)
        print(f"swap fairness: swap_batch=1: {naive}")
        self.assertGreater(naive.swaps, report.swaps)
        self.assertGreater(sum(served.values()), sum(naive.served.values()))


@dataclass
class Report:
    """What the alternating-keys simulation measured."""

    swaps: int
    served: dict[str, int]
    worst_wait: float
    waits: list[float] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        return (f"{self.swaps} swaps, served {self.served}, worst wait "
                f"{self.worst_wait:.1f} s")


def simulate(clock: Clock, load_time: float, service: float, spec: GroupSpec,
             duration: float) -> Report:
    """Key k1 asks model a, key k2 model b, each sending its next request when the previous
    one is answered; a request waits for its model (``wait_ready``) then for a slot."""
    group = SwapGroup(spec, clock)
    report = Report(0, {"a": 0, "b": 0}, 0.0)
    models = {name: make_model(name, clock, group, load_time=load_time)[0] for name in "ab"}

    def request(name: str, key: str) -> None:
        model = models[name]
        arrived = clock.seconds()

        def admitted(slot: Slot) -> None:
            wait = clock.seconds() - arrived
            report.waits.append(wait)
            report.worst_wait = max(report.worst_wait, wait)

            def done() -> None:
                report.served[name] += 1
                slot.release()
                if clock.seconds() < duration:
                    request(name, key)

            clock.callLater(service, done)

        def ready(_: object) -> None:
            if not model.backend.ready:  # it began draining meanwhile: wait for its next turn
                model.backend.wait_ready().addCallback(ready)
                return
            model.load.acquire(key).addCallback(admitted)

        model.backend.wait_ready().addCallback(ready)

    request("a", "k1")
    request("b", "k2")
    while clock.seconds() < duration + 60:
        clock.advance(0.05)
    report.swaps = group.swaps
    return report
