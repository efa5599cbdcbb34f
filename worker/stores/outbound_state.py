"""What callers of the outbound API can see about a request: queued, sent, failed, delivered.

A Redis hash per request id (30 days), plus a short list the web blocks on for `Prefer: wait`.
`status` and `updated_at` stay readable; every other field (provider ids, errors and provider
details, which can quote an address) is sealed (worker/crypto.py).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import redis

from worker.crypto import Sealer, Unsealable, is_sealed
from worker.stores import Resealed, reseal_hash, sealed_text

KEY = "switchboard:outbound:"
EVENTS = "switchboard:outbound:events:"
# A request id's shape (a key part here, an identifier value in FHIR). Checked before any id is
# used: `events:<id>` would otherwise name the event list of another request (a WRONGTYPE 500).
REQUEST_ID = re.compile(r"[A-Za-z0-9\-]{1,64}")
TTL = 30 * 24 * 3600
# States after which a waiting caller gets its answer.
SETTLED = frozenset({"sent", "failed", "delivered"})
CLEAR_FIELDS = ("status", "updated_at")


class OutboundState:
    """Read and write the state of outbound requests."""

    def __init__(self, client: redis.Redis, sealer: Sealer) -> None:
        self._r: Any = client
        self._sealer = sealer

    def create(self, request_id: str) -> bool:
        """Record a new request as queued; False if this id exists already (a client's retry
        with the same Idempotency-Key, or a race between two of them: only one goes on)."""
        _check(request_id)
        pipe = self._r.pipeline()
        pipe.hsetnx(KEY + request_id, "status", "queued")
        pipe.hsetnx(KEY + request_id, "updated_at", f"{time.time():.3f}")
        pipe.expire(KEY + request_id, TTL)
        created, _, _ = pipe.execute()
        return bool(created)

    def forget(self, request_id: str) -> None:
        """Drop a request that was never queued (best effort: Redis may be what failed)."""
        try:
            self._r.delete(KEY + request_id)
        except redis.exceptions.RedisError:
            pass

    def update(self, request_id: str, status: str, **fields: Any) -> None:
        """Set the state (and any details); wakes waiters when the state is settled."""
        pipe = self._r.pipeline()
        self.add_update(pipe, request_id, status, **fields)
        pipe.execute()

    def add_update(self, pipe: Any, request_id: str, status: str, **fields: Any) -> None:
        """`update`, as commands added to `pipe` (another store's round trip), not executed."""
        _check(request_id)
        values = {"status": status, "updated_at": f"{time.time():.3f}",
                  **{k: self._sealer.seal_json(v) for k, v in fields.items() if v is not None}}
        if status in SETTLED:
            pipe.hdel(KEY + request_id, "last_error")  # it was retried past that error
        pipe.hset(KEY + request_id, mapping=values)
        pipe.expire(KEY + request_id, TTL)
        # Every change wakes a waiting caller (it decides whether the news is final).
        pipe.lpush(EVENTS + request_id, status)
        pipe.expire(EVENTS + request_id, 120)

    def get(self, request_id: str) -> dict[str, Any] | None:
        """The state of a request, or None if unknown (or not a request id at all)."""
        if not REQUEST_ID.fullmatch(request_id):
            return None
        raw = self._r.hgetall(KEY + request_id)
        if not raw:
            return None
        out: dict[str, Any] = {}
        for k, v in raw.items():
            key, value = k.decode(), v.decode()
            if key in CLEAR_FIELDS:
                out[key] = value
            elif not is_sealed(value):
                out[key] = json.loads(value)  # written before sealing
            else:
                try:
                    out[key] = self._sealer.open_json(value)
                except Unsealable:
                    pass  # sealed with a key no longer configured: shown without it
        return out

    def reseal(self) -> Resealed:
        """Seal every request's fields with the first key (`switchboard keys rotate`)."""
        convert = sealed_text(self._sealer)

        out = Resealed()
        for key in self._r.scan_iter(match=KEY + "*", count=500, _type="hash"):
            out.add(reseal_hash(self._r, key, convert,
                                fields=lambda f: f.decode() not in CLEAR_FIELDS))
        return out

    def wait(self, request_id: str, timeout: float) -> dict[str, Any] | None:
        """Block until the request settles or `timeout` passes; returns the latest state."""
        state = self.get(request_id)
        if state and state["status"] in SETTLED:
            return state
        if timeout > 0:
            self._r.blpop([EVENTS + request_id], timeout=timeout)
        return self.get(request_id)


def _check(request_id: str) -> None:
    if not REQUEST_ID.fullmatch(request_id):
        raise ValueError("not a request id")
