"""The inbox: every message we answered 2xx for, until a worker has finished with it.

kombu's Redis transport takes a message off its queue (BRPOP) and records it as unacknowledged
in a second step; if Redis dies between the two, the message is gone though the provider got a
200 (found by the fault suite, scenario 4). So the receiver also writes the message here before
answering, the task removes it when it ends (written or dead-lettered), and a periodic sweep
re-publishes entries nobody has touched for INBOX_STALE_SECONDS. Every write downstream is
idempotent, so a re-published message that was in fact still alive does no harm.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

ENTRIES = "switchboard:inbox:entries"
INDEX = "switchboard:inbox:index"  # entry key → last time someone vouched for it
# The receiver waits a bounded time for Redis and answers 5xx when it did not hear back; a
# stalled Redis can still run the accept later (what sat in its socket buffer runs when it
# resumes), which would leave an entry for a message the provider was told we refused. So an
# accept carries the time after which nobody waits for it any more, and does nothing past it
# (by Redis's clock; a receiver whose clock is off gets 0 back in time and simply insists).
_ACCEPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if tonumber(ARGV[3]) > 0 and now > tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
return 1
"""
# The Celery message header naming a message's inbox entry (survives retries).
HEADER = "switchboard_inbox"


@dataclass(frozen=True)
class InboxEntry:
    """One accepted message: enough to publish it again."""

    key: str
    task: str
    queue: str
    args: list[Any]


class Inbox:
    """Redis-backed inbox."""

    def __init__(self, client: redis.Redis) -> None:
        self._r: Any = client
        self._accept = self._r.register_script(_ACCEPT)

    def accept(self, key: str, task: str, queue: str, args: list[Any],
               wait_seconds: float | None = None) -> None:
        """Record a message before it is published (raises if Redis did not take it).

        With `wait_seconds`, the caller stops waiting after that long: an accept that reaches
        Redis later does nothing (see _ACCEPT).
        """
        entry = json.dumps({"task": task, "queue": queue, "args": args})
        if wait_seconds is not None:
            deadline = time.time() + wait_seconds
            if self._accept(keys=[ENTRIES, INDEX], args=[key, entry, deadline]):
                return
            # Answered in time, yet "too late": our clock is behind Redis's. Insist.
        self._accept(keys=[ENTRIES, INDEX], args=[key, entry, 0])

    def touch(self, key: str) -> None:
        """The message is alive (being retried or deferred): not stale yet."""
        self._r.zadd(INDEX, {key: time.time()}, xx=True)

    def done(self, key: str) -> None:
        """The message reached an end (written, or safe in the dead-letter store)."""
        pipe = self._r.pipeline()
        pipe.hdel(ENTRIES, key)
        pipe.zrem(INDEX, key)
        pipe.execute()

    def stale(self, older_than: float, limit: int = 500) -> list[InboxEntry]:
        """Entries nobody has touched for `older_than` seconds."""
        keys = self._r.zrangebyscore(INDEX, "-inf", time.time() - older_than, start=0,
                                     num=limit)
        if not keys:
            return []
        out = []
        for key, raw in zip(keys, self._r.hmget(ENTRIES, keys), strict=True):
            if raw:
                data = json.loads(raw)
                out.append(InboxEntry(key.decode() if isinstance(key, bytes) else str(key),
                                      data["task"], data["queue"], data["args"]))
            else:  # finished between the two reads
                self._r.zrem(INDEX, key)
        return out

    def count(self) -> int:
        """Messages accepted and not yet finished."""
        return int(self._r.zcard(INDEX))
