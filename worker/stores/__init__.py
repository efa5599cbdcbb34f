"""The Redis-backed stores, one module each: what Switchboard keeps in Redis and why."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.crypto import Sealer, Unsealable, is_sealed


def digest(value: str) -> str:
    """A short SHA-256 of `value`, so key names never carry an address or an id in clear."""
    return hashlib.sha256(value.encode()).hexdigest()[:32]


@dataclass
class Resealed:
    """What a re-seal pass over one store did (`switchboard keys rotate`)."""

    resealed: int = 0  # sealed again with the first key (or sealed for the first time)
    current: int = 0  # already sealed with the first key
    unopenable: int = 0  # sealed with a key that is not configured, or damaged: left as is

    def add(self, other: Resealed) -> None:
        """Add another pass's counts to these."""
        self.resealed += other.resealed
        self.current += other.current
        self.unopenable += other.unopenable


# Replace a value only if it is still the one that was read (a worker may have changed or
# removed it meanwhile: its write wins, and it was sealed with the first key anyway).
_HSET_IF_SAME = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""
_SET_IF_SAME = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
"""

# Returns the value sealed with the first key (text, or binary for stores that keep the binary
# form), None if it is already, or raises Unsealable.
Convert = Callable[[bytes], str | bytes | None]


def reseal_hash(client: Any, key: str, convert: Convert,
                fields: Callable[[bytes], bool] | None = None) -> Resealed:
    """Re-seal every field of a hash (or those `fields` picks) with `convert`."""
    script = client.register_script(_HSET_IF_SAME)
    out = Resealed()
    for field, raw in client.hscan_iter(key):
        if fields is not None and not fields(field):
            continue
        new = _convert(out, raw, convert)
        if new is not None:
            _count_write(out, script(keys=[key], args=[field, raw, new]))
    return out


def reseal_strings(client: Any, match: str, convert: Convert) -> Resealed:
    """Re-seal every string key matching `match` with `convert`, keeping its expiry."""
    script = client.register_script(_SET_IF_SAME)
    out = Resealed()
    for key in client.scan_iter(match=match, count=500, _type="string"):
        raw = client.get(key)
        new = None if raw is None else _convert(out, raw, convert)
        if new is not None:
            _count_write(out, script(keys=[key], args=[raw, new]))
    return out


def sealed_text(sealer: Sealer) -> Convert:
    """The re-seal of a value that is one sealed string (or JSON text written before sealing
    was turned on): None when it is already sealed with the first key."""
    def convert(raw: bytes) -> str | None:
        value = raw.decode()
        if not is_sealed(value):
            return sealer.seal(value)
        return None if sealer.is_current(value) else sealer.reseal(value)
    return convert


def _convert(out: Resealed, raw: bytes, convert: Convert) -> str | bytes | None:
    try:
        new = convert(raw)
    except Unsealable:
        out.unopenable += 1
        return None
    if new is None:
        out.current += 1
    return new


def _count_write(out: Resealed, written: Any) -> None:
    if written:
        out.resealed += 1
    else:
        out.current += 1  # changed meanwhile by a worker, which seals with the first key
