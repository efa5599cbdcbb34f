"""Retry timing (pure)."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping

_RATELIMIT_T = re.compile(r"\bt=(\d+(?:\.\d+)?)")


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


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """A server's wait hint: Retry-After (seconds), else the largest `t=` of a RateLimit header.

    Medplum answers 429 with `RateLimit: "requests";r=…;t=…, "fhirInteractions";r=0;t=56` and no
    Retry-After; the quota with r=0 is the one that blocks, and waiting the largest t is safe.
    Twilio and SendGrid send Retry-After.
    """
    # By name, not .items(): urllib3's HTTPHeaderDict yields a repeated header once per line
    # there, while headers[name] joins the lines as HTTP says (and as httpx and requests do).
    lowered = {k.lower(): headers[k] for k in headers}
    ra = lowered.get("retry-after")
    if ra is not None:
        try:
            return max(0.0, float(ra))
        except ValueError:
            pass  # an HTTP-date; fall through to RateLimit / default backoff
    rl = lowered.get("ratelimit")
    if rl:
        values = [float(t) for t in _RATELIMIT_T.findall(rl)]
        if values:
            return max(values)
    return None
