"""Opt-outs: addresses that told a provider to stop; later sends are refused locally."""

from __future__ import annotations

from typing import Any

import redis

from worker.stores import digest as _h


class OptOuts:
    """Addresses that told a provider to stop (Twilio 21610): later sends are refused locally.

    Kept in Redis as hashes of `<channel>:<address>` (no phone numbers at rest in key names),
    without expiry: an opt-out lasts until the patient texts START (then remove it).
    """

    KEY = "switchboard:optout"

    def __init__(self, client: redis.Redis) -> None:
        self._r: Any = client

    def add(self, channel: str, address: str) -> None:
        """Record an opt-out."""
        self._r.sadd(self.KEY, _h(f"{channel}:{address}"))

    def remove(self, channel: str, address: str) -> None:
        """Forget an opt-out (the patient opted back in)."""
        self._r.srem(self.KEY, _h(f"{channel}:{address}"))

    def has(self, channel: str, address: str) -> bool:
        """True if this address opted out of this channel."""
        return bool(self._r.sismember(self.KEY, _h(f"{channel}:{address}")))
