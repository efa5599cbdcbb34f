"""Send pacing shared by every worker: a Redis token bucket on Redis's clock."""

from __future__ import annotations

from typing import Any

import redis

from worker.stores import digest as _h

# Token bucket, as a Lua function other scripts include (worker/stores/send_gate.py): refill by
# elapsed time, take a token, return how long to wait (0: send now).
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
# One slot in one atomic step, on Redis's clock.
_BUCKET = TAKE_SLOT_LUA + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local wait = take_slot(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now)
return {tostring(wait), tostring(now)}
"""


class RateLimiter:
    """A send rate shared by every worker on every machine (Redis token bucket, Redis clock)."""

    KEY = "switchboard:rate:"

    def __init__(self, client: redis.Redis) -> None:
        self._r: Any = client
        self._script = self._r.register_script(_BUCKET)

    def acquire(self, key: str, rate: float, burst: float = 1.0) -> tuple[float, float]:
        """Reserve one send slot: (seconds to wait before sending, Redis time now).

        0 wait means send now. Otherwise the slot at now + wait is this caller's: it sends
        then without asking again (see worker.outbound.pipeline)."""
        wait, now = self._script(keys=[self.key(key)], args=[rate, burst])
        return float(wait), float(now)

    def key(self, name: str) -> str:
        """The Redis key of the bucket called `name` (`<channel>:<sender>`)."""
        return self.KEY + _h(name)
