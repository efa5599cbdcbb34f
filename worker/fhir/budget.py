"""The cluster's FHIR write budget: writes in flight bounded across processes and hosts.

The limit of worker.fhir.contention is meant for the FHIR server, and the server sees every
worker process at once: four processes each allowed its best of 1-2 would put 4-8 writes in
flight. So the budget lives in Redis, shared by every process of the cluster:

- `leases` (sorted set): one member per write in flight, scored by its expiry (Redis' own clock,
  milliseconds). Taking a slot is one Lua script: drop expired leases, count the rest, add one
  if the count is under the limit. Giving it back removes it. A process renews the leases it
  holds every third of the lease time (one thread per process), so a lease outlives a slow
  write but a SIGKILLed worker's leases are dropped within `lease_seconds` and the others go on.
- `control` (hash): the limit in force, its version, and the controller's whole state
  (LimitState as JSON), so every process uses one controller: the cluster's rate at the
  cluster's limit is what is measured, not one process's share of it.
- `window` (hash): the current measurement window, counted by every process's releases
  (writes completed, conflicts, 429s, latency, refused takes). The release that finds the window
  due (contention.window_due) computes the next state with the pure controller and writes it
  back with a compare-and-set on the version; a conflict or 429 does the same at once
  (contention.after_congestion). Two processes racing to close one window: the first wins and
  the second's result is dropped.
- `wake` (list): a release pushes a token and a waiting writer blocks on it (BLPOP, at most
  `WAIT_SLICE_SECONDS`), so a slot freed in one process is taken by a writer of another within
  a Redis round trip, without polling.

Redis unreachable (down, failing over): the process falls back to its own WriteLimit, the same
controller applied to its own threads (docs/reliability.md), logs it once, and tries Redis again
after `RETRY_REDIS_SECONDS`. Leases it held are released or expire. Reads and provider sends
never take a slot.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import redis

from worker.fhir.contention import (
    LimitState,
    Slot,
    Tuning,
    Window,
    WriteLimit,
    after_congestion,
    after_window,
    initial,
    window_due,
)

log = logging.getLogger("switchboard.fhir.budget")

PREFIX = "switchboard:fhir-writes:"
LEASES, CONTROL, WINDOW, WAKE = (PREFIX + k for k in ("leases", "control", "window", "wake"))
# The longest a waiting writer blocks before it looks again (a lease expiring frees a slot
# without a wake token).
WAIT_SLICE_SECONDS = 0.5
# After Redis failed, writes use the process's own limit this long before trying Redis again,
# so an outage does not cost every write a connection attempt.
RETRY_REDIS_SECONDS = 5.0
WAKE_TOKENS_KEPT = 64  # tokens nobody waited for are trimmed to this

# KEYS: leases, control, window. ARGV: lease id, lease ms, limit when none is stored.
# -> {1 taken | 0 full, version}
_TAKE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ctl = redis.call('HMGET', KEYS[2], 'limit', 'version')
local limit = tonumber(ctl[1] or ARGV[3])
redis.call('HSETNX', KEYS[3], 'started', now)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  return {1, tonumber(ctl[2] or 0)}
end
redis.call('HINCRBY', KEYS[3], 'waited', 1)
return {0, tonumber(ctl[2] or 0)}
"""

# KEYS: leases, control, window, wake. ARGV: lease id, outcome, latency (microseconds),
# tokens kept. -> {now ms, window fields..., version, state json or nil}
_GIVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[4], 1)
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[4]) - 1)
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSETNX', KEYS[3], 'started', now)
redis.call('HINCRBY', KEYS[3], 'completed', 1)
redis.call('HINCRBY', KEYS[3], 'latency_us', ARGV[3])
if ARGV[2] == 'congested' then redis.call('HINCRBY', KEYS[3], 'conflicts', 1) end
if ARGV[2] == 'throttled' then redis.call('HINCRBY', KEYS[3], 'throttled', 1) end
local w = redis.call('HMGET', KEYS[3], 'started', 'completed', 'conflicts', 'throttled',
                     'latency_us', 'waited')
local ctl = redis.call('HMGET', KEYS[2], 'version', 'state')
return {now, w[1], w[2], w[3] or 0, w[4] or 0, w[5], w[6] or 0, ctl[1] or 0, ctl[2]}
"""

# KEYS: control, window, wake. ARGV: version seen, new version, new limit, state json,
# window start seen, now ms, wake tokens. -> 1 written | 0 someone else changed it first
_SET_STATE = """
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or 0)
if version ~= tonumber(ARGV[1]) or redis.call('HGET', KEYS[2], 'started') ~= ARGV[5] then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'limit', ARGV[3], 'state', ARGV[4])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'started', ARGV[6])
for i = 1, tonumber(ARGV[7]) do redis.call('LPUSH', KEYS[3], 1) end
return 1
"""

# KEYS: leases. ARGV: lease ms, lease ids... Renews those still held (XX: an expired lease is
# not brought back, its slot may be taken already).
_RENEW = """
local t = redis.call('TIME')
local expiry = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
return 1
"""


@dataclass
class _Held:
    lease: str | None  # None: taken from the process's own limit (Redis unavailable)
    slot: Slot


class ClusterWriteBudget:
    """Slots for FHIR writes, bounded across every worker process through Redis."""

    def __init__(self, client: redis.Redis, tuning: Tuning, lease_seconds: float,
                 local: WriteLimit, on_state: Callable[[LimitState], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._r: Any = client
        self.tuning = tuning
        self.local = local  # the fallback while Redis is unreachable
        self._lease_ms = max(1, int(lease_seconds * 1000))
        self._renew_every = lease_seconds / 3
        self._on_state = on_state
        self._clock = clock
        self._take = self._r.register_script(_TAKE)
        self._give = self._r.register_script(_GIVE)
        self._set_state = self._r.register_script(_SET_STATE)
        self._renew = self._r.register_script(_RENEW)
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._redis_down_until = 0.0

    @property
    def using_redis(self) -> bool:
        """False while the process runs on its own limit (Redis unavailable)."""
        return self._clock() >= self._redis_down_until

    @contextmanager
    def slot(self) -> Iterator[Slot]:
        """Wait for room in the cluster's budget and hold it for one write; set
        `slot.outcome` before leaving."""
        held = self._acquire()
        if held.lease is None:
            with self.local.slot() as slot:
                yield slot
            return
        started = self._clock()
        try:
            yield held.slot
        finally:
            self._release(held, self._clock() - started)

    def state(self) -> LimitState:
        """The cluster's controller state as stored (a fresh one when none is)."""
        raw = self._r.hget(CONTROL, "state")
        return initial(self.tuning) if raw is None else LimitState.from_json(raw, self.tuning)

    # -- plumbing -----------------------------------------------------------------------------

    def _acquire(self) -> _Held:
        lease = uuid.uuid4().hex
        while self.using_redis:
            try:
                taken, version = self._take(keys=[LEASES, CONTROL, WINDOW], args=[
                    lease, self._lease_ms, initial(self.tuning).limit])
                if taken:
                    self._hold(lease)
                    return _Held(lease, Slot(int(version)))
                self._r.blpop([WAKE], timeout=WAIT_SLICE_SECONDS)
            except redis.RedisError as exc:
                self._fall_back(exc)
        return _Held(None, Slot(0))

    def _release(self, held: _Held, seconds: float) -> None:
        assert held.lease is not None
        with self._lock:
            self._held.discard(held.lease)
        try:
            reply = self._give(keys=[LEASES, CONTROL, WINDOW, WAKE], args=[
                held.lease, held.slot.outcome, int(seconds * 1_000_000), WAKE_TOKENS_KEPT])
            self._learn(held.slot, reply)
        except redis.RedisError as exc:  # the lease expires by itself
            self._fall_back(exc)

    def _learn(self, slot: Slot, reply: list[Any]) -> None:
        now_ms, started, completed, conflicts, throttled, latency_us, waited, version, raw = \
            reply
        # The stored version is the truth the compare-and-set checks (a state that did not
        # parse starts afresh, under that version).
        version = int(version)
        stored = initial(self.tuning) if raw is None else LimitState.from_json(raw, self.tuning)
        state = replace(stored, version=version)
        now = int(now_ms) / 1000
        window = Window(seconds=(int(now_ms) - int(started)) / 1000, completed=int(completed),
                        conflicts=int(conflicts), throttled=int(throttled),
                        latency_sum=int(latency_us) / 1_000_000, waited=int(waited))
        new = after_congestion(self.tuning, state, slot.outcome, now, slot.version)
        if new is state and window_due(self.tuning, state.limit, window):
            new = after_window(self.tuning, state, window, now)
        if new is state:
            return
        written = self._set_state(keys=[CONTROL, WINDOW, WAKE], args=[
            version, new.version, new.limit, new.to_json(), started, now_ms,
            max(0, new.limit - state.limit)])
        if written and self._on_state is not None:
            self._on_state(new)

    def _hold(self, lease: str) -> None:
        with self._lock:
            self._held.add(lease)
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_loop, daemon=True,
                                                 name="fhir-write-leases")
                self._renewer.start()

    def _renew_loop(self) -> None:
        """Keep this process's leases alive while their writes run (one thread per process)."""
        while True:
            time.sleep(self._renew_every)
            with self._lock:
                leases = sorted(self._held)
            if not leases:
                continue
            try:
                self._renew(keys=[LEASES], args=[self._lease_ms, *leases])
            except redis.RedisError as exc:
                log.warning("fhir write budget: renewing leases failed: %s",
                            type(exc).__name__)

    def _fall_back(self, exc: Exception) -> None:
        if self.using_redis:
            log.warning("fhir write budget: Redis unavailable (%s); this process uses its own "
                        "write limit for %.0f s", type(exc).__name__, RETRY_REDIS_SECONDS)
        self._redis_down_until = self._clock() + RETRY_REDIS_SECONDS
