"""The send ledger: a claim before a provider call, a sent record after it (never send twice)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from worker.crypto import Sealer, Unsealable, is_sealed
from worker.errors import PermanentError
from worker.stores import Resealed, reseal_strings, sealed_text
from worker.stores.outbound_state import UPDATE_STATE_LUA, StateChange


@dataclass(frozen=True)
class Claim:
    """Who claimed a send, and how long ago (by Redis's clock, shared by every worker)."""

    task_id: str
    age: float


# Take a claim, as a Lua function the send gate's script includes (worker/stores/send_gate.py):
# false when the key was free and is now ours (stamped with Redis's clock), else the existing
# claim.
TAKE_CLAIM_LUA = """
local function take_claim(key, task_id, keep, now)
  local mine = cjson.encode({task_id = task_id, at = now})
  if redis.call('SET', key, mine, 'NX', 'EX', keep) then
    return false
  end
  return redis.call('GET', key)
end
"""

# The sent record, then the API request's state change (worker/stores/outbound_state.py).
# KEYS: sent record, state hash, state events. ARGV: sealed record, lifetime, then the change.
_RECORD = UPDATE_STATE_LUA + """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
update_state(KEYS[2], KEYS[3], 3)
"""


class SendLedger:
    """Never send one Communication twice: a claim before the provider call, a sent record
    right after it (before FHIR is updated and before the task is acknowledged).

    Keys: `switchboard:send:claim:<comm>` (who and when; kept 30 days, removed only when the
    provider refused, so a claim never silently expires under a task that died mid-send) and
    `switchboard:send:done:<comm>` (the provider's answer, 30 days, sealed: worker/crypto.py).
    """

    CLAIM = "switchboard:send:claim:"
    DONE = "switchboard:send:done:"
    KEEP = 30 * 24 * 3600

    def __init__(self, client: redis.Redis, sealer: Sealer) -> None:
        self._r: Any = client
        self._sealer = sealer
        self._record = client.register_script(_RECORD)

    def done(self, communication_id: str) -> dict[str, str] | None:
        """The recorded result of an earlier send of this Communication, if any."""
        return self.opened(self._r.get(self.DONE + communication_id))

    def opened(self, raw: bytes | None) -> dict[str, str] | None:
        """A sent record as stored (sealed, or plain JSON from before sealing), opened."""
        if not raw:
            return None
        value = raw.decode()
        # Unopenable (a key no longer configured) raises: the send happened, and guessing
        # otherwise could send it twice; the task dead-letters it for a person.
        if not is_sealed(value):
            return dict(json.loads(value))
        try:
            return dict(self._sealer.open_json(value))
        except Unsealable as exc:
            raise PermanentError("undecryptable", str(exc)) from None

    @property
    def client(self) -> Any:
        """The Redis client the ledger writes with (the send gate shares it)."""
        return self._r

    def release(self, communication_id: str) -> None:
        """Give the claim back (the provider refused before sending, so a retry is safe)."""
        self._r.delete(self.CLAIM + communication_id)

    def claimed(self, communication_id: str) -> bool:
        """Whether a send of this Communication is claimed (in flight, or died mid-send)."""
        return bool(self._r.exists(self.CLAIM + communication_id))

    def undo(self, communication_id: str) -> None:
        """Forget a send the provider reported as never delivered because it could not be
        (WhatsApp's 63016 outside the 24-hour window), so the held reply can go out again."""
        self._r.delete(self.DONE + communication_id, self.CLAIM + communication_id)

    def record(self, communication_id: str, result: dict[str, str],
               state: StateChange | None = None) -> None:
        """Remember that the provider took the message (first thing after its answer). The API
        request's `state` change, when given, lands in the same step (one Lua script: the
        record is written first, and nothing runs between the two)."""
        sealed = self._sealer.seal_json(result)
        if state is None:
            self._r.set(self.DONE + communication_id, sealed, ex=self.KEEP)
            return
        self._record(keys=[self.DONE + communication_id, *state.keys],
                     args=[sealed, self.KEEP, *state.args])

    def reseal(self) -> Resealed:
        """Seal every sent record with the first key (`switchboard keys rotate`)."""
        return reseal_strings(self._r, self.DONE + "*", sealed_text(self._sealer))


def held_claim(raw: bytes, now: float) -> Claim:
    """The claim stored as `raw`, aged at Redis time `now`."""
    held = json.loads(raw)
    return Claim(str(held.get("task_id", "")), now - float(held.get("at", 0.0)))


def device_send(communication_id: str, device_id: str) -> str:
    """The ledger key of one push of a Communication to one Device: a push goes to each of a
    patient's devices once, so claims and sent records are kept per (communication, device)."""
    return f"{communication_id}/Device/{device_id}"
