"""Redis helpers shared by workers on every machine: seen-message markers and per-key locks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from worker.errors import TransientError

SEEN_PREFIX = "switchboard:seen:"
LOCK_PREFIX = "switchboard:lock:"


class RedisSeenMessages:
    """`SeenMessages` in Redis with a TTL: provider message ids already written to FHIR."""

    def __init__(self, client: redis.Redis, ttl_seconds: int, namespace: str = "inbound") -> None:
        self._r: Any = client
        self._ttl = ttl_seconds
        self._ns = namespace

    def _key(self, message_id: str) -> str:
        return f"{SEEN_PREFIX}{self._ns}:{hashlib.sha256(message_id.encode()).hexdigest()[:32]}"

    def seen(self, message_id: str) -> bool:
        """True if `message_id` was written before."""
        return bool(self._r.exists(self._key(message_id)))

    def remember(self, message_id: str) -> None:
        """Mark `message_id` as written."""
        self._r.set(self._key(message_id), "1", ex=self._ttl)


class HeldLock:
    """A lock we hold; `confirm()` before acting on what was decided under it."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock

    def confirm(self) -> None:
        """Renew the lock's expiry, or raise TransientError if it expired and another worker
        may have acted meanwhile (the caller retries and decides afresh)."""
        try:
            self._lock.reacquire()
        except redis.exceptions.LockError:
            raise TransientError("lock-lost", "the lock expired during the work") from None


class RedisLocks:
    """Per-key mutual exclusion across all workers (redis-py's Lock, with an expiry so a dead
    worker cannot hold a thread forever)."""

    def __init__(self, client: redis.Redis, timeout: float) -> None:
        self._r = client
        self._timeout = timeout

    @contextmanager
    def hold(self, key: str) -> Iterator[HeldLock]:
        """Hold the lock on `key`; a lock not obtained in time is a TransientError (retry)."""
        lock = self._r.lock(LOCK_PREFIX + key, timeout=self._timeout,
                            blocking_timeout=self._timeout)
        if not lock.acquire():
            raise TransientError("lock-busy", "another worker holds this thread's lock")
        try:
            yield HeldLock(lock)
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:
                pass  # expired while we worked; the next holder already has it


def _h(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Claim:
    """Who claimed a send, and how long ago (by Redis's clock, shared by every worker)."""

    task_id: str
    age: float


# Claim in one atomic step, stamped with Redis's own clock: either take the key (nil back) or
# return the existing claim and the current time, so the caller can tell its age.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local mine = cjson.encode({task_id = ARGV[1], at = now})
if redis.call('SET', KEYS[1], mine, 'NX', 'EX', ARGV[2]) then
  return nil
end
return {redis.call('GET', KEYS[1]), tostring(now)}
"""


class SendLedger:
    """Never send one Communication twice: a claim before the provider call, a sent record
    right after it (before FHIR is updated and before the task is acknowledged).

    Keys: `switchboard:send:claim:<comm>` (who and when; kept 30 days, removed only when the
    provider refused, so a claim never silently expires under a task that died mid-send) and
    `switchboard:send:done:<comm>` (the provider's answer, 30 days).
    """

    CLAIM = "switchboard:send:claim:"
    DONE = "switchboard:send:done:"
    KEEP = 30 * 24 * 3600

    def __init__(self, client: redis.Redis) -> None:
        self._r: Any = client
        self._claim = self._r.register_script(_CLAIM)

    def done(self, communication_id: str) -> dict[str, str] | None:
        """The recorded result of an earlier send of this Communication, if any."""
        raw = self._r.get(self.DONE + communication_id)
        return json.loads(raw) if raw else None

    def now(self) -> float:
        """Redis's clock (shared by every worker)."""
        secs, micros = self._r.time()
        return float(secs) + float(micros) / 1e6

    def claim(self, communication_id: str, task_id: str) -> Claim | None:
        """Take the right to send. Returns None when taken, else the existing claim."""
        found = self._claim(keys=[self.CLAIM + communication_id], args=[task_id, self.KEEP])
        if found is None:
            return None
        held, now = json.loads(found[0]), float(found[1])
        return Claim(str(held.get("task_id", "")), now - float(held.get("at", 0.0)))

    def release(self, communication_id: str) -> None:
        """Give the claim back (the provider refused before sending, so a retry is safe)."""
        self._r.delete(self.CLAIM + communication_id)

    def record(self, communication_id: str, result: dict[str, str]) -> None:
        """Remember that the provider took the message (first thing after its answer)."""
        self._r.set(self.DONE + communication_id, json.dumps(result), ex=self.KEEP)


class OptOuts:
    """Addresses that told a provider to stop (Twilio 21610): later sends are refused locally.

    Kept in Redis as hashes of `<channel>:<address>` (no phone numbers at rest in key names),
    without expiry: an opt-out lasts until the patient texts START (then remove it).
    """

    KEY = "switchboard:optout"

    def __init__(self, client: redis.Redis) -> None:
        self._r: Any = client

    def add(self, channel: str, address: str) -> None:
        """Record an opt-out."""
        self._r.sadd(self.KEY, _h(f"{channel}:{address}"))

    def remove(self, channel: str, address: str) -> None:
        """Forget an opt-out (the patient opted back in)."""
        self._r.srem(self.KEY, _h(f"{channel}:{address}"))

    def has(self, channel: str, address: str) -> bool:
        """True if this address opted out of this channel."""
        return bool(self._r.sismember(self.KEY, _h(f"{channel}:{address}")))


# Token bucket in one atomic step: refill by elapsed time, take a token, say how long to wait.
_BUCKET = """
local key = KEYS[1]
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', key, 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate)
-- Always take the token, going into debt if need be: a waiting sender has reserved its slot
-- (now + wait) and must not ask again, or every waiter would wake and race at each refill.
tokens = tokens - 1
local wait = 0
if tokens < 0 then
  wait = -tokens / rate
end
redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', key, math.ceil(wait + burst / rate) + 60)
return {tostring(wait), tostring(now)}
"""


class RateLimiter:
    """A send rate shared by every worker on every machine (Redis token bucket, Redis clock)."""

    KEY = "switchboard:rate:"

    def __init__(self, client: redis.Redis) -> None:
        self._r: Any = client
        self._script = self._r.register_script(_BUCKET)

    def acquire(self, key: str, rate: float, burst: float = 1.0) -> tuple[float, float]:
        """Reserve one send slot: (seconds to wait before sending, Redis time now).

        0 wait means send now. Otherwise the slot at now + wait is this caller's: it sends
        then without asking again (see worker.outbound)."""
        wait, now = self._script(keys=[self.KEY + _h(key)], args=[rate, burst])
        return float(wait), float(now)
