"""Redis helpers shared by workers on every machine: seen-message markers and per-key locks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
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
