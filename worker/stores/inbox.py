"""The inbox: every message we answered 2xx for, until a worker has finished with it.

kombu's Redis transport takes a message off its queue (BRPOP) and records it as unacknowledged
in a second step; if Redis dies between the two, the message is gone though the provider got a
200 (found by the fault suite, scenario 4). So the receiver also writes the message here, in the
same atomic step that queues it (worker/broker/publish.py); the task removes it when it ends
(written or dead-lettered), and a periodic sweep re-publishes entries nobody has touched for
INBOX_STALE_SECONDS. Every write downstream is idempotent, so a re-published message that was
in fact still alive does no harm.

An entry is {"task", "queue", "body"}: the body is the task message's own sealed body
([args, kwargs, embed], worker/crypto.py), so the receiver seals once for both.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from worker.batched import Batched
from worker.broker.celery_app import EMBED as _EMBED
from worker.broker.celery_app import open_body
from worker.crypto import Sealer, Unsealable, is_sealed, text_to_bytes
from worker.stores import Resealed, reseal_hash

ENTRIES = "switchboard:inbox:entries"
INDEX = "switchboard:inbox:index"  # entry key → last time someone vouched for it
# The Celery message header naming a message's inbox entry (survives retries).
HEADER = "switchboard_inbox"


@dataclass(frozen=True)
class InboxEntry:
    """One accepted message: enough to publish it again."""

    key: str
    task: str
    queue: str
    args: list[Any]


# How long a finished message's entry may wait to be removed, gathered with others.
DONE_GATHER_SECONDS = 0.05


class Inbox:
    """Redis-backed inbox."""

    def __init__(self, client: redis.Redis, sealer: Sealer) -> None:
        self._r: Any = client
        self._sealer = sealer
        # Entries of finished messages (and keys to drop with them) not yet removed in Redis.
        self._finished: Batched[tuple[str, tuple[str, ...]]] = Batched(
            self._remove, "inbox-done", gather=DONE_GATHER_SECONDS)

    def touch(self, key: str) -> None:
        """The message is alive (being retried or deferred): not stale yet."""
        self._r.zadd(INDEX, {key: time.time()}, xx=True)

    def done(self, key: str, also_delete: tuple[str, ...] = ()) -> None:
        """The message reached an end (written, or safe in the dead-letter store); `also_delete`
        are keys that go in the same round trip."""
        self._remove([(key, also_delete)])

    def done_soon(self, key: str, also_delete: tuple[str, ...] = ()) -> None:
        """`done` for a message that was written, from a thread of the inbox's own within
        DONE_GATHER_SECONDS, in one round trip with the others finished meanwhile: a task's
        thread does not wait on Redis for it (each round trip costs the worker, whose sends are
        CPU-bound, far more than its bytes: the GIL changes hands on both sides of it).

        If the process dies first, the entry stays and the inbox sweep publishes the message
        again after INBOX_STALE_SECONDS: every write downstream is idempotent and every send
        is recorded, so that is a repeat that changes nothing, never a duplicate. A dead
        letter still ends with `done`, at once: a repeat of it would be a second one."""
        self._finished.add((key, also_delete))

    def flush(self) -> int:
        """Remove the entries `done_soon` has gathered now; how many."""
        return self._finished.flush()

    def _remove(self, finished: list[tuple[str, tuple[str, ...]]]) -> None:
        pipe = self._r.pipeline()  # an entry and its index go together, as they came
        pipe.hdel(ENTRIES, *(key for key, _ in finished))
        pipe.zrem(INDEX, *(key for key, _ in finished))
        extra = [k for _, keys in finished for k in keys]
        if extra:
            pipe.delete(*extra)
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
                                      data["task"], data["queue"], self._args(data)))
            else:  # finished between the two reads
                self._r.zrem(INDEX, key)
        return out

    def _args(self, data: dict[str, Any]) -> list[Any]:
        if "body" not in data:
            return list(data["args"])  # written before sealing (re-sealed by `keys rotate`)
        try:
            token = text_to_bytes(data["body"])
        except Unsealable:
            token = b""  # damaged: the task dead-letters it as undecryptable
        # Unopenable, the placeholder goes out and the task dead-letters it as `undecryptable`
        # with its sealed body kept (replayable once the key is back).
        return list(open_body(self._sealer, token)[0])

    def reseal(self) -> Resealed:
        """Seal every entry with the first key (`switchboard keys rotate`)."""
        def convert(raw: bytes) -> str | None:
            data = json.loads(raw)
            body = data.get("body")
            if is_sealed(body) and self._sealer.is_current(body):
                return None
            if body is None:
                sealed = self._sealer.seal(json.dumps([data["args"], {}, _EMBED]))
            else:
                sealed = self._sealer.reseal(body)
            return json.dumps({"task": data["task"], "queue": data["queue"], "body": sealed})
        return reseal_hash(self._r, ENTRIES, convert)

    def count(self) -> int:
        """Messages accepted and not yet finished."""
        return int(self._r.zcard(INDEX))
