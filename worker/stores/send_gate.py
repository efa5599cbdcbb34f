"""The gate before a provider call: sent before? opted out? a send slot? the claim? One step.

The checks live in their own stores (send_ledger.py, optouts.py, rate_limit.py) and keep their
own keys; this runs them together in one Lua script, so a send pays one Redis round trip for
them instead of six. On a 2-core worker the send is CPU-bound and every round trip costs
a few hundred microseconds of Python (bench/results.md, "Outbound sends"). Same order and
meaning as before: a message already sent (the ledger's record) is not sent again, an opt-out
refuses before a slot is taken, a send waiting for its slot holds no claim, and a claim is
only taken when the send goes out now.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.stores.optouts import OptOuts
from worker.stores.rate_limit import TAKE_SLOT_LUA, bucket_key
from worker.stores.send_ledger import TAKE_CLAIM_LUA, Claim, SendLedger, held_claim

# KEYS: opt-out set, rate bucket, claim, sent record.
# ARGV: opt-out digest (keyed), legacy digest ('' for none: skip the opt-out check), rate,
# burst, reserved slot (Redis time; '' for none), task id, claim lifetime (seconds).
_GATE = TAKE_SLOT_LUA + TAKE_CLAIM_LUA + """
local done = redis.call('GET', KEYS[4])
if done then
  return {'done', done}
end
if ARGV[2] ~= '' then
  if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
    return {'opted-out'}
  end
  if redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 1 then
    -- Written before opt-outs were keyed: move it to the keyed form (worker/stores/optouts.py).
    redis.call('SADD', KEYS[1], ARGV[1])
    redis.call('SREM', KEYS[1], ARGV[2])
    return {'opted-out'}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[5] ~= '' then
  local wait = tonumber(ARGV[5]) - now
  if wait > 0 then
    return {'wait', tostring(wait), ARGV[5]}
  end
else
  local wait = take_slot(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), now)
  if wait > 0 then
    return {'wait', tostring(wait), tostring(now + wait)}
  end
end
local held = take_claim(KEYS[3], ARGV[6], ARGV[7], now)
if not held then
  return {'claimed'}
end
return {'held', held, tostring(now)}
"""


@dataclass(frozen=True)
class Opened:
    """What the gate said: `done` (sent before: its record), `claimed` (send now),
    `opted-out`, `wait` (for `slot`, Redis time, `wait` seconds away) or `held` (by someone
    else's `claim`, its outcome not recorded yet)."""

    outcome: str
    wait: float = 0.0
    slot: float = 0.0
    claim: Claim | None = None
    done: dict[str, str] | None = None


class SendGate:
    """The ledger's sent record, the opt-out check, send pacing and the send claim for one
    message, in one Redis step (on the ledger's Redis)."""

    def __init__(self, optouts: OptOuts, ledger: SendLedger) -> None:
        self._optouts, self._ledger = optouts, ledger
        self._script = ledger.client.register_script(_GATE)

    def open(self, send_key: str, task_id: str, bucket: str, rate: float,
             slot: float | None = None, opt_out: tuple[str, str] | None = None,
             burst: float = 1.0) -> Opened:
        """Look for the sent record of `send_key`, check `opt_out` (channel, address), then
        wait for `slot` (reserved earlier) or take one from `bucket`, then claim `send_key` for
        `task_id`."""
        keyed, legacy = self._optouts.digests(*opt_out) if opt_out else ("", "")
        found = self._script(
            keys=[OptOuts.KEY, bucket_key(bucket), SendLedger.CLAIM + send_key,
                  SendLedger.DONE + send_key],
            args=[keyed, legacy, rate, burst, "" if slot is None else repr(slot), task_id,
                  SendLedger.KEEP])
        outcome = found[0].decode()
        if outcome == "wait":
            return Opened(outcome, wait=float(found[1]), slot=float(found[2]))
        if outcome == "held":
            return Opened(outcome, claim=held_claim(found[1], float(found[2])))
        if outcome == "done":
            return Opened(outcome, done=self._ledger.opened(found[1]))
        return Opened(outcome)
