"""Backend slots leased from Redis, so replicas in front of one backend never overfill it.

Each backend (named by its ``base_url``, so replicas with different backend names still share)
has a sorted set in Redis: one member per slot leased by some replica, scored by when the lease
expires. A replica's :class:`SlotLeases` keeps as many leases as its own queue needs (requests
holding a slot plus requests waiting), never more than the backend's slots, and its
``Admission`` may hold exactly as many slots as it has leases (``set_capacity``). So the sum of
requests in flight to the backend over all replicas is at most its slots, while each replica
keeps its own fair queue.

- Asking: when demand exceeds the leases held, one script drops expired leases and grants what
  is free (one round trip), to replicas in the order they started waiting: an asker gets only
  what is free beyond the queues waiting ahead of it, and joins the line for the rest. It asks
  again every ``retry`` seconds while requests wait (which also keeps its place in line; one
  silent for a second leaves it).
- Sharing: while other replicas wait, a lease held for ``rotate`` seconds (1 s) is not handed to
  this replica's next request; it goes back when its request ends. So a busy replica cannot keep
  a backend to itself, and each replica still orders its own requests with its fair queue.
- Keeping: a slot freed with requests still waiting is handed to the next one locally, lease
  and all (no round trip). Leases beyond the demand go back after ``linger`` seconds (50 ms)
  if still not needed: under steady load a lease serves request after request without a round
  trip, and an idle replica returns its leases within a blink.
- Expiry: leases last ``ttl`` seconds and are renewed every ``rotate`` (at most ``ttl / 3``),
  which also tells the replica whether others wait; a replica that crashed
  or lost Redis for longer than ``ttl`` loses its leases, and the slots come back to the others.
- Redis away: ``open`` gives the replica its own full slot count (no sharing; each replica is
  then bounded by its own slots, as without Redis) until it is connected again (seen at the next
  change of demand or renewal); ``closed`` keeps the leases it has and lets waiters wait (or
  time out).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaproxy.backends.admission import Admission
from llamaproxy.state.limits import PREFIX
from llamaproxy.state.redis_store import RedisState

log = Logger()

# Shared by the scripts: Redis's clock in ms, and the queues (one per replica and backend)
# waiting for this backend's slots, in arrival order; a waiter silent for a second has left.
_WAITERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - 1000)
for _, g in ipairs(gone) do redis.call('ZREM', KEYS[2], g) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 1000)
local function others(tag)
  local n = redis.call('ZCARD', KEYS[2])
  if redis.call('ZSCORE', KEYS[2], tag) then n = n - 1 end
  return n
end
local function keep(ttl)
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl * 3) end
end
"""

#: KEYS: the backend's leases, its waiting queues, when each waiter last asked. ARGV: slots,
#: ttl (ms), the asking queue's tag, then the lease ids wanted. Free slots go to waiters in
#: arrival order: an asker gets what is free beyond those waiting ahead of it, and waits in
#: line for the rest. Returns {granted ids, how many other queues wait}.
ACQUIRE_SCRIPT = _WAITERS + """
local ttl, tag = tonumber(ARGV[2]), ARGV[3]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local mine = redis.call('ZSCORE', KEYS[2], tag)
if mine then
  free = free - redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. mine)
else
  free = free - redis.call('ZCARD', KEYS[2])
end
local granted = {}
for i = 4, #ARGV do
  if free <= 0 then break end
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  free = free - 1
  granted[#granted + 1] = ARGV[i]
end
if #granted < #ARGV - 3 then
  redis.call('ZADD', KEYS[2], 'NX', now, tag)
  redis.call('ZADD', KEYS[3], now, tag)
else
  redis.call('ZREM', KEYS[2], tag)
  redis.call('ZREM', KEYS[3], tag)
end
keep(ttl)
return {granted, others(tag)}
"""

#: KEYS: as ACQUIRE_SCRIPT. ARGV: ttl (ms), the queue's tag, then the lease ids held.
#: Returns {the ids still alive (renewed), how many other queues wait}.
RENEW_SCRIPT = _WAITERS + """
local ttl, tag = tonumber(ARGV[1]), ARGV[2]
local alive = {}
for i = 3, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i])
    alive[#alive + 1] = ARGV[i]
  end
end
keep(ttl)
return {alive, others(tag)}
"""

#: KEYS: the backend's lease set. ARGV: the lease ids given back.
RELEASE_SCRIPT = """
return redis.call('ZREM', KEYS[1], unpack(ARGV))
"""


def replica_id(instance_id: str) -> str:
    """This process's name in lease ids: its instance id, pid and a random part."""
    return f"{instance_id}:{os.getpid()}:{os.urandom(3).hex()}"


class SlotLeases:
    """The leases one replica holds on one backend's slots, following its Admission's demand."""

    def __init__(
        self,
        state: RedisState,
        admission: Admission,
        backend: str,
        slots: int,
        replica: str,
        ttl: float = 10.0,
        retry: float = 0.05,
        linger: float = 0.05,
        rotate: float = 1.0,
    ) -> None:
        self.state = state
        self.clock = state.clock
        self.admission = admission
        self.backend = backend
        self.key = f"{PREFIX}slots:{backend}"
        self.slots = slots
        self.ttl = ttl
        self.retry = retry
        self.linger = linger
        self.held: list[str] = []
        self.local = False  # open mode with Redis away: the replica's own slots, unshared
        # Unique per queue too: after a reload, the old and the new queue of one backend lease
        # side by side, and a shared id would make two leases count as one.
        self.tag = f"{replica}:{os.urandom(3).hex()}"
        self._ids = (f"{self.tag}:{n}" for n in itertools.count())
        self.keys = [self.key, f"{self.key}:waiting", f"{self.key}:seen"]
        #: Other replicas' queues waiting for this backend's slots (from the last answer).
        self.others = 0
        #: While others wait, a lease held this long goes back when its request ends (instead
        #: of serving this replica's next request), so no replica keeps a backend to itself.
        self.rotate = rotate
        #: How many of the leases held this replica may use (all, unless leases rotate out).
        self.cap = slots
        self._since: dict[str, float] = {}
        self._asking = False
        self._retry_call: IDelayedCall | None = None
        self._renewer: LoopingCall | None = None
        self._release_due: IDelayedCall | None = None
        self._change_due: IDelayedCall | None = None

    def start(self) -> None:
        """Take the admission over: it may hold as many slots as there are leases."""
        self.admission.set_capacity(0)
        self.admission.on_change = self._soon
        self._renewer = LoopingCall(self._renew)
        self._renewer.clock = self.clock
        self._renewer.start(min(self.ttl / 3, self.rotate), now=False).addErrback(
            lambda f: log.failure("Slot leases: renewal loop stopped", f)
        )

    def stop(self) -> Deferred[None]:
        """Give every lease back (best effort) and stop renewing."""
        if self._renewer is not None and self._renewer.running:
            self._renewer.stop()
        for call in (self._retry_call, self._release_due, self._change_due):
            if call is not None and call.active():
                call.cancel()
        self.admission.on_change = None
        held, self.held = self.held, []
        return self._release(held) if held else succeed(None)

    @property
    def demand(self) -> int:
        """Slots this replica could use right now (held plus waiting), at most the backend's."""
        return min(self.slots, self.admission.active + self.admission.waiting)

    def _soon(self) -> None:
        """The admission says its demand moved: look at it after this call (never inside the
        admission's own queueing or hand-over, which a grant must not re-enter)."""
        if self._change_due is None:
            self._change_due = self.clock.callLater(0, self._change_now)

    def _change_now(self) -> None:
        self._change_due = None
        self.changed()

    def changed(self) -> None:
        """The admission's demand moved: ask for leases, or give back those not needed."""
        if self.local:
            if not self.state.connected:
                return
            self._share_again()
        demand = self.demand
        if demand > len(self.held):
            self._ask()
        keep = min(demand, self.cap)
        if len(self.held) > max(keep, self.admission.active) and self._release_due is None:
            # Later: a slot freed and soon taken again needs no round trip (unless it rotates).
            delay = self.linger if self.cap >= len(self.held) else 0
            self._release_due = self.clock.callLater(delay, self._give_back)

    def _use(self) -> None:
        """Let the admission hold as many slots as this replica may use of its leases."""
        now = self.clock.seconds()
        if self.others:
            expired = sum(1 for lease in self.held if now - self._since[lease] >= self.rotate)
            self.cap = len(self.held) - expired
        else:
            self.cap = self.slots
        self.admission.set_capacity(min(len(self.held), self.cap))

    def _ask(self) -> None:
        if self._asking or (self._retry_call is not None and self._retry_call.active()):
            return
        wanted = [next(self._ids) for _ in range(self.demand - len(self.held))]
        if not wanted:
            return
        self._asking = True
        d = self.state.eval(
            ACQUIRE_SCRIPT, self.keys, [self.slots, int(self.ttl * 1000), self.tag, *wanted]
        )
        d.addCallbacks(self._granted, self._unavailable, callbackArgs=(len(wanted),))

    def _granted(self, reply: list[Any], wanted: int) -> None:
        self._asking = False
        got = [_text(lease) for lease in reply[0] or ()]
        self.others = int(reply[1])
        now = self.clock.seconds()
        for lease in got:
            self._since[lease] = now
        self.held.extend(got)
        self._use()
        if len(got) < wanted:
            # The backend is full: ask again shortly (another replica frees a slot meanwhile).
            self._retry_call = self.clock.callLater(self.retry, self._retry)
        else:
            self.changed()  # demand may have moved while Redis answered

    def _retry(self) -> None:
        self._retry_call = None
        self.changed()

    def _give_back(self) -> None:
        self._release_due = None
        surplus = len(self.held) - max(min(self.demand, self.cap), self.admission.active)
        if surplus <= 0 or self.local:
            return
        returned = sorted(self.held, key=self._since.__getitem__)[:surplus]  # oldest first
        self.held = [lease for lease in self.held if lease not in returned]
        self._release(returned)
        self._use()

    def _release(self, leases: list[str]) -> Deferred[None]:
        for lease in leases:
            self._since.pop(lease, None)
        d = self.state.eval(RELEASE_SCRIPT, [self.key], list(leases))
        return d.addCallbacks(lambda _: None, lambda f: None)  # else they expire within ttl

    def _unavailable(self, failure: Failure) -> None:
        self._asking = False
        if self.state.failure_mode == "open":
            if not self.local:
                log.warn(
                    "Slot leases for {backend}: Redis unavailable, using this replica's own "
                    "{slots} slots until it answers", backend=self.backend, slots=self.slots,
                )
            self.local = True
            self.admission.set_capacity(self.slots)
        else:
            self._retry_call = self.clock.callLater(self.retry * 10, self._retry)

    def _renew(self) -> None:
        """Extend the leases held (or, back from local mode, start leasing again)."""
        if self.local:
            if self.state.connected:
                self._share_again()
                self.changed()
            return
        if not self.held:
            return
        held = list(self.held)
        d = self.state.eval(RENEW_SCRIPT, self.keys, [int(self.ttl * 1000), self.tag, *held])
        d.addCallbacks(self._renewed, lambda f: None, callbackArgs=(held,))

    def _share_again(self) -> None:
        """Back from local mode (Redis answers again): lease afresh for what is in flight and
        waiting (leases from before may be gone: a restarted Redis starts empty); until they
        are granted, no new request starts."""
        log.info("Slot leases for {backend}: Redis is back, sharing slots again",
                 backend=self.backend)
        self.local = False
        stale, self.held = self.held, []
        if stale:
            self._release(stale)
        self.cap = self.slots
        self.admission.set_capacity(0)

    def _renewed(self, reply: list[Any], asked: list[str]) -> None:
        living = {_text(lease) for lease in reply[0] or ()}
        self.others = int(reply[1])
        lost = [lease for lease in asked if lease not in living]
        if lost:
            log.warn("Slot leases for {backend}: {n} expired before renewal (stalled replica "
                     "or Redis restart)", backend=self.backend, n=len(lost))
            self.held = [lease for lease in self.held if lease not in set(lost)]
            for lease in lost:
                self._since.pop(lease, None)
        self._use()
        self.changed()

    def status_json(self) -> dict[str, Any]:
        """This backend's leases, for /health."""
        return {
            "slots": self.slots,
            "leased": len(self.held),
            "mode": "local" if self.local else "shared",
        }


class SharedSlots(Service):
    """Every backend's :class:`SlotLeases` in this replica (replaced when backends reload)."""

    def __init__(self, state: RedisState, instance_id: str, ttl: float = 10.0) -> None:
        super().__init__()
        self.state = state
        self.replica = replica_id(instance_id)
        self.ttl = ttl
        #: The leases of each backend's current queue, by backend name.
        self.by_backend: dict[str, SlotLeases] = {}
        #: Queues replaced or removed by a reload, still finishing their requests (their leases
        #: are kept until ``retire``).
        self.retiring: list[SlotLeases] = []

    def attach(self, name: str, base_url: str, admission: Admission, slots: int) -> SlotLeases:
        """Lease the slots of backend ``name`` (shared by ``base_url``) for ``admission``."""
        old = self.by_backend.pop(name, None)
        if old is not None:
            self.retiring.append(old)  # its requests keep their leases until they end
        leases = SlotLeases(self.state, admission, base_url, slots, self.replica, self.ttl)
        leases.start()
        self.by_backend[name] = leases
        return leases

    def retire(self, name: str, admission: Admission) -> None:
        """A removed or replaced backend's queue has no request left: give its leases back."""
        current = self.by_backend.get(name)
        if current is not None and current.admission is admission:
            del self.by_backend[name]
            current.stop()
        for leases in [x for x in self.retiring if x.admission is admission]:
            self.retiring.remove(leases)
            leases.stop()

    def stopService(self) -> Deferred[None]:
        """Give every lease back (at shutdown, before the Redis connection closes)."""
        super().stopService()
        every = [*self.by_backend.values(), *self.retiring]
        self.retiring = []
        returning = [leases.stop() for leases in every]
        d: Deferred[None] = gatherResults(returning, consumeErrors=True).addBoth(lambda _: None)
        return d

    def status_json(self) -> dict[str, Any]:
        """Per backend: slots, leases held, shared or local."""
        return {name: leases.status_json() for name, leases in self.by_backend.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
