"""The closed vocabulary of failures: every error says whether a retry can help.

Exactly one place acts on these (worker.broker.retry): a TransientError is retried with backoff,
a PermanentError goes to the dead-letter store with its reason.
"""

from __future__ import annotations


class SwitchboardError(Exception):
    """Base of the failures our code classifies; `reason` is a short stable slug."""

    retryable = False

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TransientError(SwitchboardError):
    """Worth retrying later (5xx, timeouts, connection errors, 429, broker blips)."""

    retryable = True

    def __init__(self, reason: str, detail: str = "", retry_after: float | None = None) -> None:
        super().__init__(reason, detail)
        self.retry_after = retry_after


class PermanentError(SwitchboardError):
    """Retrying cannot help; the message goes to the dead-letter store with this reason."""


class Deferred(SwitchboardError):
    """Not a failure: try again after `countdown` seconds without spending a retry attempt
    (a send waiting for its turn under the shared rate limit)."""

    retryable = True

    def __init__(self, countdown: float, reason: str = "deferred",
                 changes: dict[str, object] | None = None) -> None:
        super().__init__(reason)
        self.countdown = countdown
        # Fields to update in the task's payload (its first argument) for the later run.
        self.changes = changes or {}
