"""Per-key locks shared by workers on every machine (thread matching serialises on them)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from worker.errors import TransientError

LOCK_PREFIX = "switchboard:lock:"


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
