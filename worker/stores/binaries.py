"""Which FHIR Binary holds each stored email attachment, so a retry makes no second Binary.

FHIR Binary has no identifier and Medplum cannot search Binaries, so a conditional create is
not possible: the worker creates them under a per-email lock and records each id here, keyed
on (email key, position, content digest), for as long as SendGrid may post the email again.
"""

from __future__ import annotations

import hashlib
from typing import Any

import redis

PREFIX = "switchboard:binary:"


class StoredBinaries:
    """Attachment key → Binary id, in Redis with a TTL."""

    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self._r: Any = client
        self._ttl = ttl_seconds

    @staticmethod
    def _key(key: str) -> str:
        # Keys hold no Message-ID (it can carry the sender's address), only a digest.
        return PREFIX + hashlib.sha256(key.encode()).hexdigest()[:40]

    def get(self, key: str) -> str | None:
        """The Binary id stored for `key`, if any."""
        value = self._r.get(self._key(key))
        return value.decode() if isinstance(value, bytes) else value

    def put(self, key: str, binary_id: str) -> None:
        """Remember that `key` is stored as Binary `binary_id`."""
        self._r.set(self._key(key), binary_id, ex=self._ttl)
