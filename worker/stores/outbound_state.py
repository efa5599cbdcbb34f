"""What callers of the outbound API can see about a request: queued, sent, failed, delivered.

A Redis hash per request id (30 days), plus a short list the web blocks on for `Prefer: wait`.
`status` and `updated_at` stay readable; every other field (provider ids, errors and provider
details, which can quote an address) is sealed (worker/crypto.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from worker.crypto import Sealer, Unsealable, is_sealed
from worker.ids import REQUEST_ID
from worker.stores import Resealed, reseal_hash, sealed_text

KEY = "switchboard:outbound:"
EVENTS = "switchboard:outbound:events:"
TTL = 30 * 24 * 3600
# States after which a waiting caller gets its answer.
SETTLED = frozenset({"sent", "failed", "delivered"})
CLEAR_FIELDS = ("status", "updated_at")
# Kept in clear and never shown: a keyed hash of the request's body, which a retry with the same
# Idempotency-Key must match (web/api.py). Keyed by the caller's API token, so it says nothing
# about the body to anyone reading Redis.
BODY_HASH = "body_hash"

# One request's state change, as a Lua function: alone (OutboundState.update) or in the step
# that records a send (worker/stores/send_ledger.py), so both write it the same way. ARGV from
# `first`: status, settled ('1': clear the error it was retried past), TTL, then the hash's
# field/value pairs. Every change wakes a waiting caller (it decides whether the news is final).
UPDATE_STATE_LUA = """
local function update_state(key, events, first)
  if ARGV[first + 1] == '1' then
    redis.call('HDEL', key, 'last_error')
  end
  redis.call('HSET', key, unpack(ARGV, first + 3))
  redis.call('EXPIRE', key, ARGV[first + 2])
  redis.call('LPUSH', events, ARGV[first])
  redis.call('EXPIRE', events, 120)
end
"""


@dataclass(frozen=True)
class StateChange:
    """A request's state change, sealed and ready: the keys (state hash, event list) and the
    arguments UPDATE_STATE_LUA reads."""

    keys: tuple[str, str]
    args: tuple[str | int, ...]


class OutboundState:
    """Read and write the state of outbound requests."""

    def __init__(self, client: redis.Redis, sealer: Sealer) -> None:
        self._r: Any = client
        self._sealer = sealer
        self._update = client.register_script(UPDATE_STATE_LUA
                                              + "update_state(KEYS[1], KEYS[2], 1)")

    def create(self, request_id: str, body_hash: str = "") -> bool:
        """Record a new request as queued, with the hash of its body; False if this id exists
        already (a client's retry with the same Idempotency-Key, or a race between two of them:
        only one goes on, and only its hash is kept: one MULTI)."""
        _check(request_id)
        pipe = self._r.pipeline()
        pipe.hsetnx(KEY + request_id, "status", "queued")
        pipe.hsetnx(KEY + request_id, "updated_at", f"{time.time():.3f}")
        if body_hash:
            pipe.hsetnx(KEY + request_id, BODY_HASH, body_hash)
        pipe.expire(KEY + request_id, TTL)
        created = pipe.execute()[0]
        return bool(created)

    def body_hash(self, request_id: str) -> str | None:
        """The body hash the request was created with (None: none recorded)."""
        _check(request_id)
        value = self._r.hget(KEY + request_id, BODY_HASH)
        return value.decode() if value is not None else None

    def forget(self, request_id: str) -> None:
        """Drop a request that was never queued (best effort: Redis may be what failed)."""
        try:
            self._r.delete(KEY + request_id)
        except redis.exceptions.RedisError:
            pass

    def update(self, request_id: str, status: str, **fields: Any) -> None:
        """Set the state (and any details); wakes any waiting caller (it decides whether the
        news is final)."""
        change = self.change(request_id, status, **fields)
        self._update(keys=change.keys, args=change.args)

    def change(self, request_id: str, status: str, **fields: Any) -> StateChange:
        """`update` as values for UPDATE_STATE_LUA, for another store's step to apply with its
        own writes (the send ledger's sent record: worker/stores/send_ledger.py)."""
        _check(request_id)
        values = {"status": status, "updated_at": f"{time.time():.3f}",
                  **{k: self._sealer.seal_json(v) for k, v in fields.items() if v is not None}}
        return StateChange((KEY + request_id, EVENTS + request_id),
                           (status, "1" if status in SETTLED else "0", TTL,
                            *(part for pair in values.items() for part in pair)))

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
            if key == BODY_HASH:
                continue
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
                                fields=lambda f: f.decode() not in (*CLEAR_FIELDS,
                                                                    BODY_HASH)))
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
