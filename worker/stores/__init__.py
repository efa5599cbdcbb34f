"""The Redis-backed stores, one module each: what Switchboard keeps in Redis and why."""

from __future__ import annotations

import hashlib


def digest(value: str) -> str:
    """A short SHA-256 of `value`, so key names never carry an address or an id in clear."""
    return hashlib.sha256(value.encode()).hexdigest()[:32]
