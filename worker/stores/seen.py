"""Seen-message markers: provider message ids already written to FHIR (skips FHIR on retries)."""

from __future__ import annotations

import hashlib
from typing import Any

import redis

SEEN_PREFIX = "switchboard:seen:"


class RedisSeenMessages:
    """`SeenMessages` in Redis with a TTL: provider message ids already written to FHIR."""

    def __init__(self, client: redis.Redis, ttl_seconds: int, namespace: str = "inbound") -> None:
        self._r: Any = client
        self._ttl = ttl_seconds
        self._ns = namespace

    def _key(self, message_id: str) -> str:
        return f"{SEEN_PREFIX}{self._ns}:{hashlib.sha256(message_id.encode()).hexdigest()[:32]}"

    def seen(self, message_id: str) -> bool:
        """True if `message_id` was written before."""
        return bool(self._r.exists(self._key(message_id)))

    def remember(self, message_id: str) -> None:
        """Mark `message_id` as written."""
        self._r.set(self._key(message_id), "1", ex=self._ttl)
