"""The dead-letter store: every message that cannot be processed, durable and replayable.

Celery on Redis has no native dead-letter queue (ARCHITECTURE.md A), so this is one: a Redis hash
of entries (JSON) and a sorted set indexing them by last failure time. An entry's id is derived
from the task name and payload, so the same message failing again (say, after a replay) updates
its one entry instead of adding another, and a replay that succeeds can remove it by that id.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

ENTRIES_KEY = "switchboard:dlq:entries"
INDEX_KEY = "switchboard:dlq:index"
# The Celery message header a replay carries, naming the entry it replays.
REPLAY_HEADER = "switchboard_replay_of"


@dataclass(frozen=True)
class DeadLetter:
    """One message that could not be processed, with why and how often it was tried."""

    id: str
    task: str
    queue: str
    args: list[Any]
    kwargs: dict[str, Any]
    reason: str
    detail: str
    attempts: int
    first_failed_at: float
    last_failed_at: float
    failures: int = 1  # how many times this message reached the store (replays that failed again)


def entry_id(task: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    """Deterministic id of a message: same task and payload, same entry."""
    raw = json.dumps([task, args, kwargs], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


class DeadLetterStore:
    """Redis-backed dead-letter entries."""

    def __init__(self, client: redis.Redis) -> None:
        self._r: Any = client  # redis-py types every call as sync-or-async

    def record(self, task: str, queue: str, args: list[Any], kwargs: dict[str, Any],
               reason: str, detail: str, attempts: int, now: float | None = None) -> DeadLetter:
        """Store (or update) the entry for this message; returns it."""
        now = time.time() if now is None else now
        eid = entry_id(task, args, kwargs)

        def merge(pipe: Any) -> DeadLetter:
            raw = pipe.hget(ENTRIES_KEY, eid)
            old = _load(raw) if raw else None
            entry = DeadLetter(
                id=eid, task=task, queue=queue, args=args, kwargs=kwargs, reason=reason,
                detail=detail,
                attempts=attempts + (old.attempts if old else 0),
                first_failed_at=old.first_failed_at if old else now,
                last_failed_at=now,
                failures=(old.failures + 1) if old else 1,
            )
            pipe.multi()
            pipe.hset(ENTRIES_KEY, eid, json.dumps(asdict(entry)))
            pipe.zadd(INDEX_KEY, {eid: now})
            return entry

        result: DeadLetter = self._r.transaction(merge, ENTRIES_KEY, value_from_callable=True)
        return result

    def get(self, eid: str) -> DeadLetter | None:
        """The entry with this id, if any."""
        raw = self._r.hget(ENTRIES_KEY, eid)
        return _load(raw) if raw else None

    def list(self, limit: int = 100) -> list[DeadLetter]:
        """Entries, most recent failure first."""
        ids = self._r.zrevrange(INDEX_KEY, 0, max(limit, 1) - 1)
        if not ids:
            return []
        raws = self._r.hmget(ENTRIES_KEY, ids)
        return [_load(r) for r in raws if r]

    def count(self) -> int:
        """How many entries are stored."""
        return int(self._r.hlen(ENTRIES_KEY))

    def remove(self, eid: str) -> bool:
        """Delete one entry; True if it existed."""
        pipe = self._r.pipeline()
        pipe.hdel(ENTRIES_KEY, eid)
        pipe.zrem(INDEX_KEY, eid)
        removed, _ = pipe.execute()
        return bool(removed)

    def purge(self) -> int:
        """Delete every entry; returns how many there were."""
        pipe = self._r.pipeline()
        pipe.hlen(ENTRIES_KEY)
        pipe.delete(ENTRIES_KEY, INDEX_KEY)
        n, _ = pipe.execute()
        return int(n)


def _load(raw: bytes | str) -> DeadLetter:
    return DeadLetter(**json.loads(raw))
