"""Opt-outs: addresses that told a provider to stop; later sends are refused locally."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import redis

from worker.stores import digest as _legacy_digest


class OptOuts:
    """Addresses that told a provider to stop (Twilio 21610, an inbound STOP): later sends are
    refused locally, until the patient texts START (or an operator runs `switchboard optout
    remove`).

    Kept in one Redis set as keyed HMAC-SHA256 digests of `<channel>:<address>`: a bare hash of
    a phone number is recomputable by anyone who reads the set (there are few numbers), a keyed
    one is not without the key. Entries written before the key existed (bare SHA-256) are still
    honoured and moved to the keyed form when next seen.
    """

    KEY = "switchboard:optout"

    def __init__(self, client: redis.Redis, key: bytes) -> None:
        if not key:
            raise ValueError("an opt-out key is required")
        self._r: Any = client
        self._key = key

    def digests(self, channel: str, address: str) -> tuple[str, str]:
        """The set members that mean "this address opted out": keyed, and legacy (bare)."""
        return self._digest(channel, address), _legacy_digest(f"{channel}:{address}")

    def _digest(self, channel: str, address: str) -> str:
        if channel == "email":
            # SendGrid's events may spell an address differently from Patient.telecom; mail
            # systems treat addresses case-insensitively in practice.
            address = address.strip().lower()
        return hmac.new(self._key, f"{channel}:{address}".encode(), hashlib.sha256).hexdigest()

    def add(self, channel: str, address: str) -> None:
        """Record an opt-out."""
        self._r.sadd(self.KEY, self._digest(channel, address))

    def remove(self, channel: str, address: str) -> bool:
        """Forget an opt-out (the patient opted back in); True if there was one."""
        removed = self._r.srem(self.KEY, self._digest(channel, address),
                               _legacy_digest(f"{channel}:{address}"))
        return bool(removed)

    def has(self, channel: str, address: str) -> bool:
        """True if this address opted out of this channel."""
        # Sends check the same, in Lua, inside the send gate (worker/stores/send_gate.py).
        keyed, legacy = self.digests(channel, address)
        if self._r.sismember(self.KEY, keyed):
            return True
        if self._r.sismember(self.KEY, legacy):
            self._r.sadd(self.KEY, keyed)
            self._r.srem(self.KEY, legacy)
            return True
        return False
