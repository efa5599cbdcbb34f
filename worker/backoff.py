"""Retry timing (pure)."""

from __future__ import annotations

import random


def retry_delay(attempt: int, base: float, cap: float, server_hint: float | None = None,
                rng: random.Random | None = None) -> float:
    """Seconds before retry number `attempt` (1-based): exponential with full jitter, capped.

    A server's own hint (Retry-After, Medplum's RateLimit t=) is a floor: retrying earlier only
    earns another 429.
    """
    r = rng or random
    ceiling = min(cap, base * (2 ** max(attempt - 1, 0)))
    delay = r.uniform(ceiling / 2, ceiling)  # "equal jitter": never a zero wait
    if server_hint is not None:
        delay = max(delay, min(server_hint, cap))
    return delay
