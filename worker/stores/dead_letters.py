"""The dead-letter store: every message that cannot be processed, durable and replayable.

Celery on Redis has no native dead-letter queue (docs/design.md, "Celery settings that
matter"), so this is one: a Redis hash
of entries (JSON) and a sorted set indexing them by last failure time. An entry's id is derived
from the task name and payload, so the same message failing again (say, after a replay) updates
its one entry instead of adding another, and a replay that succeeds can remove it by that id.

Entries are kept for a retention period: `prune` drops those whose last failure is older, and
`record` calls it by itself at most once a minute per store when the store is given a retention.

Sealed at rest (worker/crypto.py): an entry's id, task, queue, reason, attempt counts and times
stay readable, so `dlq list` and its filters work without opening anything; its payload (args,
kwargs) and detail (a FHIR OperationOutcome text can quote a number) are one sealed value. An
entry sealed with a key that is no longer configured is listed as usual and shown as sealed; it
opens again once the key is back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import redis

from worker.broker.celery_app import UNDECRYPTABLE, undecryptable
from worker.crypto import Sealer, Unsealable, is_sealed, text_to_bytes
from worker.stores import Resealed, reseal_hash

ENTRIES_KEY = "switchboard:dlq:entries"
INDEX_KEY = "switchboard:dlq:index"
# Minimal records of messages that could be neither processed nor dead-lettered (newest first).
QUARANTINE_KEY = "switchboard:dlq:quarantine"
QUARANTINE_KEEP = 10000
# The Celery message header a replay carries, naming the entry it replays.
REPLAY_HEADER = "switchboard_replay_of"
# How often `record` may prune, per store (one store per worker process).
PRUNE_INTERVAL_SECONDS = 60.0
# Ids per Redis round trip when scanning, pruning or removing many entries.
_BATCH = 500

# Ids, task names, reasons and counts only: an entry's payload holds phone numbers and bodies.
log = logging.getLogger("switchboard.dlq")


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
    # False when the sealed part (args, kwargs, detail) could not be opened: sealed with a key
    # that is not configured (any more). Those fields are then empty and `detail` says why.
    opened: bool = True

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict, shallow: `dataclasses.asdict` copies the payload recursively
        and fails on a deeply nested one (the poison message of the hardening review)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# (`list` is a method name inside DeadLetterStore.)
Entries = list[DeadLetter]
Args = list[Any]


def entry_id(task: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    """Deterministic id of a message: same task and payload, same entry."""
    raw = json.dumps([task, args, kwargs], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


class DeadLetterStore:
    """Redis-backed dead-letter entries."""

    def __init__(self, client: redis.Redis, sealer: Sealer,
                 retention_seconds: float | None = None) -> None:
        """`retention_seconds`: prune older entries from `record` (None: only when asked)."""
        self._r: Any = client  # redis-py types every call as sync-or-async
        self._sealer = sealer
        self.retention_seconds = retention_seconds
        self._prune_lock = threading.Lock()
        self._next_prune = 0.0

    def record(self, task: str, queue: str, args: list[Any], kwargs: dict[str, Any],
               reason: str, detail: str, attempts: int, now: float | None = None,
               task_id: str = "") -> DeadLetter:
        """Store (or update) the entry for this message; returns it.

        The shape of a payload never makes this fail: one that cannot be stored as JSON (nested
        past the interpreter's recursion limit, say) is replaced by a marker naming why and the
        task id, and the entry is kept with its reason (a poison message ends here, not in a
        redelivery loop).
        """
        now = time.time() if now is None else now
        args, kwargs, unstorable = _storable(args, kwargs, task_id)
        if unstorable:
            detail = f"{detail} (payload not storable: {unstorable})".strip()
        eid = entry_id(task, args, kwargs)

        def merge(pipe: Any) -> DeadLetter:
            raw = pipe.hget(ENTRIES_KEY, eid)
            old = _load_clear(raw) if raw else None
            entry = DeadLetter(
                id=eid, task=task, queue=queue, args=args, kwargs=kwargs, reason=reason,
                detail=detail,
                attempts=attempts + (old.attempts if old else 0),
                first_failed_at=old.first_failed_at if old else now,
                last_failed_at=now,
                failures=(old.failures + 1) if old else 1,
            )
            pipe.multi()
            pipe.hset(ENTRIES_KEY, eid, self._dump(entry))
            pipe.zadd(INDEX_KEY, {eid: now})
            return entry

        result: DeadLetter = self._r.transaction(merge, ENTRIES_KEY, value_from_callable=True)
        self._maybe_prune(now)
        return result

    def get(self, eid: str) -> DeadLetter | None:
        """The entry with this id, if any."""
        raw = self._r.hget(ENTRIES_KEY, eid)
        return self._load(raw) if raw else None

    def list(self, limit: int = 100) -> list[DeadLetter]:
        """Entries, most recent failure first."""
        return self.query(limit=max(limit, 1))

    def query(self, reason: str | None = None, task: str | None = None,
              since: float | None = None, limit: int | None = 100) -> Entries:
        """Entries matching every filter given, most recent failure first; at most `limit`
        (None: all). `since` (epoch seconds, inclusive) bounds the last failure time in Redis;
        reason and task are compared here, as they are only stored inside the entry's JSON."""
        if limit is not None and limit < 1:
            return []
        low = "-inf" if since is None else repr(float(since))
        if reason is None and task is None and limit is not None:
            ids = self._r.zrevrangebyscore(INDEX_KEY, "+inf", low, start=0, num=limit)
        else:
            ids = self._r.zrevrangebyscore(INDEX_KEY, "+inf", low)  # one snapshot of the ids
        found: Entries = []
        for start in range(0, len(ids), _BATCH):
            for raw in self._r.hmget(ENTRIES_KEY, ids[start:start + _BATCH]):
                if not raw:
                    continue  # removed since the ids were read
                clear = _load_clear(raw)
                if (reason is None or clear.reason == reason) and \
                        (task is None or clear.task == task):
                    found.append(self._load(raw))
                    if limit is not None and len(found) >= limit:
                        return found
        return found

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

    def remove_many(self, ids: Sequence[str]) -> int:
        """Delete these entries; returns how many existed."""
        removed = 0
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start:start + _BATCH]
            pipe = self._r.pipeline()
            pipe.hdel(ENTRIES_KEY, *chunk)
            pipe.zrem(INDEX_KEY, *chunk)
            n, _ = pipe.execute()
            removed += int(n)
        return removed

    def purge(self, reason: str | None = None, task: str | None = None,
              since: float | None = None) -> int:
        """Delete every entry, or with filters (as for `query`) only the matching ones;
        returns how many were deleted."""
        if reason is not None or task is not None or since is not None:
            return self.remove_many([e.id for e in self.query(reason, task, since, limit=None)])
        pipe = self._r.pipeline()
        pipe.hlen(ENTRIES_KEY)
        pipe.delete(ENTRIES_KEY, INDEX_KEY)
        n, _ = pipe.execute()
        return int(n)

    def prune(self, older_than_seconds: float, now: float | None = None) -> int:
        """Delete entries whose last failure is more than `older_than_seconds` before `now`;
        returns how many. Each batch is a WATCHed transaction, so an entry that fails again
        while it is being pruned (its index score moves) is kept, not lost."""
        if older_than_seconds <= 0:
            raise ValueError("older_than_seconds must be positive")
        cutoff = (time.time() if now is None else now) - older_than_seconds
        total = 0
        while True:
            pruned = self._prune_batch(cutoff)
            total += pruned
            if pruned < _BATCH:
                return total

    def _prune_batch(self, cutoff: float) -> int:
        def drop(pipe: Any) -> int:
            ids = pipe.zrangebyscore(INDEX_KEY, "-inf", f"({cutoff!r}", start=0, num=_BATCH)
            pipe.multi()
            if ids:
                pipe.hdel(ENTRIES_KEY, *ids)
                pipe.zrem(INDEX_KEY, *ids)
            return len(ids)

        pruned: int = self._r.transaction(drop, INDEX_KEY, ENTRIES_KEY, value_from_callable=True)
        return pruned

    def reseal(self) -> Resealed:
        """Seal every entry with the first key (`switchboard keys rotate`)."""
        def convert(raw: bytes) -> str | None:
            data = json.loads(raw)
            if is_sealed(data.get("sealed")) and self._sealer.is_current(data["sealed"]):
                return None
            entry = self._load(raw)
            if not entry.opened:
                raise Unsealable(entry.detail)
            return self._dump(entry)
        return reseal_hash(self._r, ENTRIES_KEY, convert)

    def replay_payload(self, entry: DeadLetter) -> tuple[Args, dict[str, Any]]:
        """(args, kwargs) to publish for a replay. A message that arrived undecryptable is
        replayed as it was first sent once its key is configured again; raises Unsealable
        while it (or the entry itself) still cannot be opened."""
        if not entry.opened:
            raise Unsealable(entry.detail)
        held = undecryptable(entry.args)
        if held is None:
            return entry.args, entry.kwargs
        body = json.loads(self._sealer.open_bytes(text_to_bytes(held[UNDECRYPTABLE])))
        return list(body[0]), dict(body[1])

    def _dump(self, entry: DeadLetter) -> str:
        data = entry.as_dict()
        secret = {k: data.pop(k) for k in _SEALED_FIELDS}
        data.pop("opened")
        data["sealed"] = self._sealer.seal_json(secret)
        return json.dumps(data)

    def _load(self, raw: bytes | str) -> DeadLetter:
        data = json.loads(raw)
        if "sealed" not in data:
            return DeadLetter(**data)  # written before sealing (re-sealed by `keys rotate`)
        token = data.pop("sealed")
        try:
            secret = self._sealer.open_json(token)
        except Unsealable as exc:
            return DeadLetter(**data, args=[], kwargs={}, detail=f"(sealed: {exc})",
                              opened=False)
        return DeadLetter(**data, **secret)

    def _maybe_prune(self, now: float) -> None:
        """Apply the retention from `record`, at most once per PRUNE_INTERVAL_SECONDS; never
        fails the record (the entry is already stored)."""
        if self.retention_seconds is None:
            return
        with self._prune_lock:
            if now < self._next_prune:
                return
            self._next_prune = now + PRUNE_INTERVAL_SECONDS
        try:
            pruned = self.prune(self.retention_seconds, now=now)
        except Exception as exc:
            log.warning("dead-letter prune failed (%s); retrying in %gs", type(exc).__name__,
                        PRUNE_INTERVAL_SECONDS)
            return
        if pruned:
            log.info("pruned %d dead letters older than %gs", pruned, self.retention_seconds)


_DURATION = re.compile(r"(\d+)([smhd])", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """Epoch seconds for a `--since` value: a duration back from `now` (`90s`, `30m`, `2h`,
    `7d`) or an ISO-8601 time with a timezone (`2024-05-01T12:00:00Z`). ValueError if neither."""
    value = text.strip()
    match = _DURATION.fullmatch(value)
    if match:
        base = time.time() if now is None else now
        return base - int(match[1]) * _UNIT_SECONDS[match[2].lower()]
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (90s, 30m, 2h, 7d) nor an ISO-8601 "
                         "time (2024-05-01T12:00:00Z)") from None
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no timezone; add one, e.g. 2024-05-01T12:00:00Z or "
                         "2024-05-01T12:00:00+02:00")
    return when.timestamp()


def _storable(args: list[Any], kwargs: dict[str, Any], task_id: str
              ) -> tuple[list[Any], dict[str, Any], str | None]:
    """(args, kwargs) as they can be stored, and why they were replaced (None: they were not)."""
    try:
        json.dumps([[args, kwargs]])  # one level deeper than the entry stores them, as margin
        return args, kwargs, None
    except (RecursionError, ValueError, TypeError) as exc:
        return [{"unstorable": type(exc).__name__, "task_id": task_id}], {}, type(exc).__name__


def quarantine(client: Any, task: str, task_id: str, queue: str, reason: str,
               now: float | None = None) -> None:
    """Keep a minimal record (no payload) of a message that is being dropped because it could
    be neither processed nor dead-lettered; `switchboard dlq quarantined` lists them."""
    record = json.dumps({"task": task, "task_id": task_id, "queue": queue, "reason": reason,
                         "at": time.time() if now is None else now})
    pipe = client.pipeline()
    pipe.lpush(QUARANTINE_KEY, record)
    pipe.ltrim(QUARANTINE_KEY, 0, QUARANTINE_KEEP - 1)
    pipe.execute()


def quarantined(client: Any, limit: int = 100) -> list[dict[str, Any]]:
    """The newest quarantine records."""
    return [json.loads(raw) for raw in client.lrange(QUARANTINE_KEY, 0, max(limit, 1) - 1)]


# The fields of an entry that are sealed (they can hold PHI); the rest stays readable.
_SEALED_FIELDS = ("args", "kwargs", "detail")


@dataclass(frozen=True)
class _Clear:
    task: str
    reason: str
    attempts: int
    first_failed_at: float
    failures: int


def _load_clear(raw: bytes | str) -> _Clear:
    """The readable fields of an entry, without opening anything."""
    data = json.loads(raw)
    return _Clear(data["task"], data["reason"], int(data["attempts"]),
                  float(data["first_failed_at"]), int(data.get("failures", 1)))
