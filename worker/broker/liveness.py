"""Dead workers' messages back in their queue within seconds, not after the visibility timeout.

kombu's Redis transport keeps every message a worker has taken in its `unacked` hash until it is
acknowledged. kombu itself gives such a message back in two cases only: the channel closes
(a warm shutdown), or the message has been unacknowledged for `visibility_timeout`, which every
consuming worker sweeps for (every `unacked_restore_interval` seconds, worker/broker/
celery_app.py). That timeout must exceed every retry countdown (kombu would otherwise run a
message waiting for its ETA twice), so it is long: an hour by default. A SIGKILLed or OOM-killed
worker, or a host that died, would therefore delay its patients' messages by up to an hour.
kombu cannot tell a dead worker's message from a live worker's ETA message: what follows is
what it cannot do, and the move itself is kombu's (`QoS.restore_by_tag`).

So every worker process (a Celery worker's main process, where kombu's consumer runs):
- announces itself in `switchboard:workers` and refreshes a heartbeat key with a short expiry;
- records the delivery tag of every message it receives in its own held set (written by a
  thread of its own, batched, so kombu's consumer loop, which feeds every task of the process,
  never waits on Redis for it: up to RECORD_GATHER_SECONDS later, and a worker that dies
  inside that window leaves messages nobody holds, which the orphan sweep below gives back);
- every few seconds, looks for workers whose heartbeat has expired and gives the messages they
  held, and that are still unacknowledged, back to their queue (kombu's restore: at the head,
  marked redelivered), then forgets that worker;
- and gives back any unacknowledged message that no live worker holds and that has been so for
  a while: one taken by a worker that died between kombu's record of it and ours;
- and gives back its own unacknowledged messages that it no longer holds in memory: when the
  broker connection drops (Redis restarted), Celery drops the messages of the old channel and
  their acks are lost; kombu tries to restore them as the channel closes, but Redis is down
  then, so without this they would wait for the visibility timeout.

A worker that was only paused longer than the expiry gets its messages redelivered elsewhere too;
every write downstream is idempotent and every send is claimed, so that costs a repeat, not a
duplicate. Acked tags are pruned from the held sets as the heartbeat goes.

kombu internals relied on (kombu is pinned to the minor release this was written against, and
tests/integration/test_liveness.py fails when they change): the `unacked` hash keyed by delivery
tag, the `unacked_index` sorted set scored by `time.time()` at delivery, and
`kombu.transport.redis.QoS.restore_by_tag`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis

from worker.batched import Batched

log = logging.getLogger("switchboard.liveness")

WORKERS = "switchboard:workers"  # ids of worker processes that announced themselves
ALIVE = "switchboard:worker:alive:"  # + id: heartbeat, expires
HELD = "switchboard:worker:held:"  # + id: delivery tags it received (acked ones pruned)
RECOVERING = "switchboard:worker:recovering:"  # + id: one janitor at a time per dead worker
ORPHAN_SWEEP = "switchboard:worker:orphan-sweep"  # one orphan sweep at a time
RECORD_GATHER_SECONDS = 0.05  # how long a received message may wait to be recorded as held

# Drop the tags of acknowledged messages from a held set (in one step, on Redis).
_PRUNE = """
local gone = 0
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('HEXISTS', KEYS[2], tag) == 0 then
    redis.call('SREM', KEYS[1], tag)
    gone = gone + 1
  end
end
return gone
"""


def restored_within(heartbeat: float, dead_after: float) -> float:
    """The longest a dead worker's messages wait before a live janitor puts them back: its
    heartbeat key, set at most `heartbeat` before it died, expires `dead_after` after being
    set, and every live worker's janitor (a replacement's too) looks every `heartbeat`. A
    message it took but had not yet recorded as held is an orphan once `dead_after` old, found
    by the same janitor rounds: the same bound."""
    return dead_after + heartbeat


def new_worker_id() -> str:
    """A process-unique id: host, pid and a nonce (a pid can be reused after a restart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Liveness:
    """Heartbeat, held-message record and janitor of one worker process."""

    def __init__(self, client: redis.Redis, channel: Any, queues: Iterable[str],
                 interval: float = 2.0, dead_after: float = 8.0, worker_id: str | None = None,
                 on_recovered: Callable[[int], None] | None = None) -> None:
        """`channel`: a kombu Redis channel of the broker (its key names, and its QoS restores);
        used from the liveness thread only."""
        self._r: Any = client
        self._qos = channel.qos
        self.queues = frozenset(queues)
        self._unacked: str = channel.unacked_key
        self._unacked_index: str = channel.unacked_index_key
        self.interval = interval
        self.dead_after = dead_after
        self.worker_id = worker_id or new_worker_id()
        self._on_recovered = on_recovered
        self._prune = self._r.register_script(_PRUNE)
        self._stop = threading.Event()
        # task id -> delivery tags, oldest first, of what this process holds in memory right now
        # (received, not finished). A list, because a retry or a deferral publishes the task
        # again under the same id and this process may receive the new message (an ETA) before
        # the old one finishes: keyed by id alone, the old one's end dropped the new tag, the
        # janitor took the waiting ETA message for lost and ran it twice. Only the threads (and
        # gevent) pools finish tasks in this process; under prefork nothing leaves it, so
        # nothing of ours is ever taken for stale (safe side).
        self._holding: dict[str, list[str]] = {}
        self._holding_lock = threading.Lock()
        self._suspects: set[str] = set()
        self._thread: threading.Thread | None = None
        # Received tags go to the held set from a thread of their own, gathered over
        # RECORD_GATHER_SECONDS (one SADD for several), kept while Redis refuses them.
        self._unrecorded: Batched[str] = Batched(
            lambda tags: self._r.sadd(HELD + self.worker_id, *tags), "switchboard-held",
            gather=RECORD_GATHER_SECONDS, retry=interval)

    def start(self) -> None:
        """Announce this worker and run heartbeat + janitor on a daemon thread."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name="switchboard-liveness",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and leave the registry (a warm shutdown gives its messages back)."""
        self._stop.set()
        self._unrecorded.close()  # the held set goes below: nothing may write it again
        try:
            self._r.srem(WORKERS, self.worker_id)
            self._r.delete(ALIVE + self.worker_id, HELD + self.worker_id)
        except redis.exceptions.RedisError:
            pass  # it will simply look dead, and hold nothing unacked

    def received(self, delivery_tag: str, task_id: str = "") -> None:
        """Record a message this worker took (called from kombu's consumer, per message)."""
        with self._holding_lock:
            self._holding.setdefault(task_id or delivery_tag, []).append(delivery_tag)
        self._unrecorded.add(delivery_tag)

    def record_held(self) -> int:
        """Write the tags received and not yet recorded to the held set now, in one command
        (the recording thread does it by itself a moment after they arrive)."""
        return self._unrecorded.flush()

    def finished(self, task_id: str, delivery_tag: str | None = None) -> None:
        """The task of a message ran to its end here (its ack follows at once). Without the
        tag, of several messages of one task id held the oldest is taken for the one that ran:
        a later copy is usually what the running one published (a retry or a deferral)."""
        with self._holding_lock:
            tags = self._holding.get(task_id)
            if tags:
                if delivery_tag in tags:
                    tags.remove(delivery_tag)
                else:
                    tags.pop(0)
                if not tags:
                    del self._holding[task_id]

    def own_stale(self) -> int:
        """Restore our unacked messages that we no longer hold in memory, once they have been
        so for two rounds in a row (an ack follows a task's end within milliseconds)."""
        tags = [t.decode() if isinstance(t, bytes) else str(t)
                for t in self._r.smembers(HELD + self.worker_id)]
        with self._holding_lock:
            holding = {tag for tags in self._holding.values() for tag in tags}
        candidates = [t for t in tags if t not in holding]
        pipe = self._r.pipeline()
        for tag in candidates:
            pipe.hexists(self._unacked, tag)
        stale = {t for t, unacked in zip(candidates, pipe.execute(), strict=True) if unacked}
        restored = sum(1 for tag in stale & self._suspects if self._restore(tag))
        self._suspects = stale - self._suspects
        if restored:
            log.warning("%d of this worker's messages lost their broker channel (acks lost); "
                        "put back in their queues", restored)
        return restored

    def _restore(self, tag: str) -> bool:
        """Give one unacknowledged message back to its queue as kombu does at the visibility
        timeout (kombu's own move: at the head, marked redelivered, priorities kept); False if
        it was acked or restored meanwhile."""
        raw = self._r.hget(self._unacked, tag)
        if raw is None:
            return False  # acknowledged, or restored by someone else meanwhile
        _payload, exchange, routing_key = json.loads(raw)
        if exchange or routing_key not in self.queues:
            # Another app's message on a Redis database we share: its workers have no heartbeat
            # here, so only kombu's visibility timeout may decide it was abandoned. (Ours are
            # routed by the anonymous exchange to the queue named by the routing key, which
            # kombu's restore resolves without the exchange bindings this channel never saw.)
            log.error("unacked message on an unknown route; left for the visibility timeout")
            return False
        # Atomic in kombu (a WATCHed transaction): a message acked or restored by another
        # janitor between the check above and here is not pushed twice.
        self._qos.restore_by_tag(tag)
        return True

    def beat(self) -> None:
        """Refresh the heartbeat (and the registry entry, in case a janitor dropped us)."""
        pipe = self._r.pipeline()
        pipe.set(ALIVE + self.worker_id, "1", px=int(self.dead_after * 1000))
        pipe.sadd(WORKERS, self.worker_id)
        pipe.execute()

    def sweep(self) -> int:
        """Give back the messages of every dead worker, and unacked messages nobody holds;
        returns how many were restored."""
        restored = 0
        live = [self.worker_id]
        for raw in self._r.smembers(WORKERS):
            other = raw.decode() if isinstance(raw, bytes) else str(raw)
            if other == self.worker_id:
                continue
            if self._r.exists(ALIVE + other):
                live.append(other)
                continue
            if not self._r.set(RECOVERING + other, self.worker_id, nx=True, ex=60):
                continue  # another janitor is on it
            tags = [t.decode() if isinstance(t, bytes) else str(t)
                    for t in self._r.smembers(HELD + other)]
            count = sum(1 for tag in tags if self._restore(tag))
            pipe = self._r.pipeline()
            pipe.srem(WORKERS, other)
            pipe.delete(HELD + other)
            pipe.execute()
            if count:
                log.warning("worker %s stopped beating; %d of its messages put back in their "
                            "queues", other, count)
            restored += count
        restored += self._orphans(live)
        if restored and self._on_recovered is not None:
            self._on_recovered(restored)
        return restored

    def _orphans(self, live: list[str]) -> int:
        """Restore unacked messages older than `dead_after` that no live worker holds: a live
    worker records what it takes within RECORD_GATHER_SECONDS, so such a message was taken by a
    worker that died before recording it, and it comes back as soon as its worker's own held
    messages do (restored_within)."""
        if not self._r.set(ORPHAN_SWEEP, self.worker_id, nx=True, px=int(self.interval * 1000)):
            return 0
        cutoff = time.time() - self.dead_after  # kombu scores unacked_index by time()
        old = self._r.zrangebyscore(self._unacked_index, "-inf", cutoff, start=0, num=500)
        if not old:
            return 0
        held = self._r.sunion([HELD + w for w in live])
        orphans = [t.decode() if isinstance(t, bytes) else str(t) for t in old if t not in held]
        count = sum(1 for tag in orphans if self._restore(tag))
        if count:
            log.warning("%d unacknowledged messages held by no live worker put back in their "
                        "queues", count)
        return count

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
                self._prune(keys=[HELD + self.worker_id, self._unacked])
                recovered = self.own_stale()
                if recovered and self._on_recovered is not None:
                    self._on_recovered(recovered)
                self.sweep()
            except redis.exceptions.RedisError as exc:
                log.warning("liveness round failed (%s); next in %.0fs", type(exc).__name__,
                            self.interval)
