"""Send pacing shared by every worker: a Redis token bucket per sender, on Redis's clock.

The bucket is taken inside the send gate's one Redis step (worker/stores/send_gate.py), together
with the opt-out check and the send claim; this module owns its Lua and its keys.
"""

from __future__ import annotations

from worker.stores import digest as _h

KEY = "switchboard:rate:"

# Token bucket, as a Lua function the send gate's script includes: refill by elapsed time, take
# a token, return how long to wait (0: send now).
TAKE_SLOT_LUA = """
local function take_slot(key, rate, burst, now)
  local state = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  tokens = math.min(burst, tokens + (now - at) * rate)
  -- Always take the token, going into debt if need be: a waiting sender has reserved its slot
  -- (now + wait) and must not ask again, or every waiter would wake and race at each refill.
  tokens = tokens - 1
  local wait = 0
  if tokens < 0 then
    wait = -tokens / rate
  end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('EXPIRE', key, math.ceil(wait + burst / rate) + 60)
  return wait
end
"""


def bucket_key(name: str) -> str:
    """The Redis key of the bucket called `name` (`<channel>:<sender>`)."""
    return KEY + _h(name)
