"""Backend slots leased from a real redis-server by several replicas' admissions."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from llamaproxy.backends.admission import Admission, Slot
from llamaproxy.state.redis_store import RedisState
from llamaproxy.state.slot_leases import SlotLeases
from tests.redis_server import RedisServer
from tests.state.test_limits import connected


async def until(predicate: object, what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():  # type: ignore[operator]
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


class SlotLeasesTests(TestCase):
    def setUp(self) -> Deferred[None]:
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        return Deferred.fromCoroutine(self._replicas())

    async def _replicas(self, ttl: float = 10.0) -> None:
        self.admissions: list[Admission] = []
        self.leases: list[SlotLeases] = []
        for n in range(3):
            state = RedisState(self.redis.state_url, reactor, "open")
            state.startService()
            self.addCleanup(state.stopService)
            await connected(state)
            admission = Admission(2, clock=reactor)
            leases = SlotLeases(state, admission, "http://backend:8080", 2, f"r{n}", ttl=ttl)
            leases.start()
            self.addCleanup(leases.stop)
            self.admissions.append(admission)
            self.leases.append(leases)

    def in_flight(self) -> int:
        return sum(a.active for a in self.admissions)

    def test_three_replicas_never_hold_more_than_the_backends_slots(self) -> Deferred[None]:
        async def run() -> None:
            granted: list[Slot] = []
            most = 0

            def got(slot: Slot) -> None:
                nonlocal most
                granted.append(slot)
                most = max(most, self.in_flight())

            for i in range(12):  # 4 requests per replica, each replica allows 2 locally
                self.admissions[i % 3].acquire(f"key{i}").addCallback(got)
            await until(lambda: len(granted) == 2, "two slots granted")
            await deferLater(reactor, 0.2, lambda: None)
            self.assertEqual(len(granted), 2)  # the others wait, on every replica
            served = 2
            while served < 12:
                granted[served - 2].release()
                granted[served - 1].release()
                served += 2
                await until(lambda n=served: len(granted) == n, f"{served} served")
            self.assertEqual(most, 2)
            for slot in granted[-2:]:
                slot.release()
            # Idle replicas give their leases back.
            await until(lambda: all(not leases.held for leases in self.leases), "leases back")
            # (a replica forgets a lease when it sends the release; Redis has it a moment later)
            await until(lambda: self.redis.command(
                "ZCARD", "llamaproxy:slots:http://backend:8080") == "0", "no lease left in Redis")
        return Deferred.fromCoroutine(run())

    def test_a_crashed_replicas_leases_expire(self) -> Deferred[None]:
        async def run() -> None:
            for leases in self.leases:
                leases.stop()
            self.admissions, self.leases = [], []
            await self._replicas(ttl=0.6)
            held: list[Slot] = []
            self.admissions[0].acquire("a").addCallback(held.append)
            self.admissions[0].acquire("b").addCallback(held.append)
            await until(lambda: len(held) == 2, "replica 0 holds both slots")
            # Replica 0 dies without giving anything back: no more renewals, no release.
            crashed = self.leases[0]
            assert crashed._renewer is not None
            crashed._renewer.stop()
            crashed.held = []
            other: list[Slot] = []
            self.admissions[1].acquire("c").addCallback(other.append)
            await until(lambda: len(other) == 1, "the expired lease served replica 1", 5)
        return Deferred.fromCoroutine(run())

    def test_redis_away_open_mode_uses_local_slots_then_shares_again(self) -> Deferred[None]:
        async def run() -> None:
            for leases in self.leases:
                leases.stop()
            self.admissions, self.leases = [], []
            await self._replicas(ttl=0.6)
            admission, leases = self.admissions[0], self.leases[0]
            self.redis.stop()
            await until(lambda: not leases.state.connected, "the connection to drop")
            held: list[Slot] = []
            admission.acquire("a").addCallback(held.append)
            admission.acquire("b").addCallback(held.append)
            # Redis away, failure mode open: this replica's own two slots, unshared.
            await until(lambda: len(held) == 2, "both local slots granted")
            self.assertEqual(leases.status_json()["mode"], "local")
            for slot in held:
                slot.release()
            self.redis.start()
            await until(lambda: leases.status_json()["mode"] == "shared", "sharing again", 15)
            again: list[Slot] = []
            admission.acquire("c").addCallback(again.append)
            await until(lambda: len(again) == 1, "a leased slot")
            self.assertEqual(
                self.redis.command("ZCARD", "llamaproxy:slots:http://backend:8080"), "1"
            )
        return Deferred.fromCoroutine(run())


class SharedSlotsTests(TestCase):
    def setUp(self) -> Deferred[None]:
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.state = RedisState(self.redis.state_url, reactor, "open")
        self.state.startService()
        self.addCleanup(self.state.stopService)
        return Deferred.fromCoroutine(connected(self.state))

    def leases_in_redis(self) -> int:
        return int(self.redis.command("ZCARD", "llamaproxy:slots:http://b:1"))

    def test_a_reloaded_backend_keeps_its_old_requests_leases_until_they_end(
        self,
    ) -> Deferred[None]:
        async def run() -> None:
            from llamaproxy.state.slot_leases import SharedSlots

            shared = SharedSlots(self.state, "test")
            self.addCleanup(shared.stopService)
            old = Admission(2, clock=reactor)
            shared.attach("b", "http://b:1", old, 2)
            held: list[Slot] = []
            old.acquire("k").addCallback(held.append)
            await until(lambda: len(held) == 1, "a leased slot")
            new = Admission(2, clock=reactor)
            shared.attach("b", "http://b:1", new, 2)  # the backends file was reloaded
            await deferLater(reactor, 0.2, lambda: None)
            self.assertEqual(self.leases_in_redis(), 1)  # the old request still holds it
            self.assertEqual(shared.status_json()["b"]["leased"], 0)
            taken: list[Slot] = []
            new.acquire("k").addCallback(taken.append)
            await until(lambda: len(taken) == 1, "the new queue leases the other slot")
            self.assertEqual(self.leases_in_redis(), 2)
            held[0].release()
            shared.retire("b", old)  # the old queue is idle: its leases go back
            await until(lambda: self.leases_in_redis() == 1, "the old lease given back")
            self.assertEqual(shared.retiring, [])
        return Deferred.fromCoroutine(run())

    def test_a_busy_replica_does_not_keep_the_backend_to_itself(self) -> Deferred[None]:
        async def run() -> None:
            states = []
            for _ in range(2):
                state = RedisState(self.redis.state_url, reactor, "open")
                state.startService()
                self.addCleanup(state.stopService)
                await connected(state)
                states.append(state)
            busy, quiet = Admission(2, clock=reactor), Admission(2, clock=reactor)
            for n, (state, admission) in enumerate(zip(states, (busy, quiet), strict=True)):
                leases = SlotLeases(state, admission, "http://b:1", 2, f"r{n}", rotate=0.3)
                leases.start()
                self.addCleanup(leases.stop)
            running: list[Slot] = []
            for i in range(200):  # a long queue on one replica
                busy.acquire(f"k{i % 3}").addCallback(running.append)
            await until(lambda: len(running) == 2, "the busy replica running two")
            served: list[Slot] = []
            quiet.acquire("q").addCallback(served.append)  # one request on the other replica
            finished = 0
            while not served and busy.waiting:
                await deferLater(reactor, 0.05, lambda: None)  # each request takes 50 ms
                done, running[:] = list(running), []
                for slot in done:
                    slot.release()
                finished += len(done)
            # The quiet replica was served while the busy one still had requests waiting.
            self.assertEqual(len(served), 1)
            self.assertGreater(busy.waiting, 0)
            self.assertLessEqual(busy.active + quiet.active, 2)
        return Deferred.fromCoroutine(run())
