"""Inbound email posts, sealed, from the receiver to the worker that parses them.

The receiver does not parse an email (one hostile email cost it seconds of CPU); it stores the
exact bytes SendGrid posted here and enqueues a small task naming them. Not inside the task
message: a post can be 40 MB, and the message travels twice (the task and its inbox entry),
base64 twice over (the JSON args, then kombu's body): 10 MB of email was 36 MB for Redis to
take within the enqueue's one-second bound, and missed it under load.

Lifetime: a post lives as long as its message could still need it: while queued, retried or
dead-lettered (its TTL, one day beyond DEAD_LETTER_RETENTION_DAYS, is renewed on every read, so
a replay keeps it; but the post of an email refused for its sender only while it is small,
KEEP_REFUSED_BYTES), and it is replaced by a small `done` marker once the email is written, so
a redelivery of a finished task is told from a lost post. A post whose 503 made SendGrid try
again later is overwritten by the retry (same bytes, same key), or expires.
"""

from __future__ import annotations

import hashlib
from typing import Any

import redis

from worker.crypto import Sealer
from worker.settings import Settings
from worker.stores import Resealed, reseal_strings

PREFIX = "switchboard:email-post:"
DONE = b"done"  # never a sealed value: those start with the version byte 0x01
# An email refused for its sender (unknown, ambiguous, unauthenticated) keeps its post for a
# replay (the clinic adds the patient, then replays it) only up to this size: anyone can email
# the clinic, and posts of up to 40 MB kept for the dead letters' month would fill Redis, which
# runs without eviction (every webhook would then get 503). A larger one is dropped; a replay of
# its dead letter then ends as `email-post-missing`.
KEEP_REFUSED_BYTES = 256 * 1024


def post_ref(body: bytes) -> str:
    """The name of a post: a digest of its bytes (a SendGrid retry of it has the same)."""
    return "email-" + hashlib.sha256(body).hexdigest()[:16]


class EmailPosts:
    """Post ref → the sealed post bytes, in Redis with a TTL."""

    def __init__(self, client: redis.Redis, sealer: Sealer, ttl_seconds: int,
                 done_ttl_seconds: int) -> None:
        self._r: Any = client
        self._sealer = sealer
        self._ttl = ttl_seconds
        self._done_ttl = done_ttl_seconds

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> EmailPosts:
        """The store with the lifetimes the settings imply (see the module doc)."""
        return cls(client, settings.sealer(), (settings.dead_letter_retention_days + 1) * 86400,
                   settings.inbound_seen_ttl_seconds)

    def put(self, ref: str, body: bytes) -> None:
        """Keep `body` (sealed) under `ref`."""
        self._r.set(PREFIX + ref, self._sealer.seal_bytes(body), ex=self._ttl)

    def get(self, ref: str) -> bytes | None:
        """The post's bytes; DONE when its email was written; None when it is gone (expired,
        or never stored). Renews its TTL. Raises worker.crypto.Unsealable."""
        value = self._r.getex(PREFIX + ref, ex=self._ttl)
        if value is None or value == DONE:
            return value  # type: ignore[no-any-return]
        return self._sealer.open_bytes(value)

    def refused(self, ref: str) -> bool:
        """The email's sender is not one we take mail from: keep its post only when it is
        small (KEEP_REFUSED_BYTES); returns whether it was kept."""
        size = self._r.strlen(PREFIX + ref)
        if size and size > KEEP_REFUSED_BYTES:
            self._r.delete(PREFIX + ref)
            return False
        return bool(size)

    def done(self, ref: str) -> None:
        """The email was written: drop its bytes, keep a marker for redeliveries."""
        self._r.set(PREFIX + ref, DONE, ex=self._done_ttl)

    def reseal(self) -> Resealed:
        """Seal every stored post with the first key (`switchboard keys rotate`)."""
        def convert(raw: bytes) -> bytes | None:
            if raw == DONE or self._sealer.sealed_with(raw) == self._sealer.current_id:
                return None
            return self._sealer.seal_bytes(self._sealer.open_bytes(raw))
        return reseal_strings(self._r, PREFIX + "*", convert)
