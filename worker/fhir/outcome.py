"""Classify FHIR answers into transient and permanent failures (pure; no I/O)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from worker.broker.backoff import retry_after_seconds
from worker.errors import PermanentError, TransientError

_NOT_FOUND = re.compile(r"Conditional reference '([^']+)' did not match any resources")
_AMBIGUOUS = re.compile(r"Conditional reference '([^']+)' matched multiple resources")


class FhirTransientError(TransientError):
    """A FHIR request that may succeed later (5xx, 429, timeout, connection error)."""

    def __init__(
        self, detail: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        reasons = {429: "fhir-throttled", 401: "fhir-unauthorized"}
        reason = reasons.get(status or 0, "fhir-unavailable")
        super().__init__(reason, detail, retry_after)
        self.status = status


class FhirPermanentError(PermanentError):
    """A FHIR request the server refused for good; carries the OperationOutcome text."""

    def __init__(self, status: int, outcome_text: str, outcome: Mapping[str, Any] | None = None):
        super().__init__(f"fhir-{status}", outcome_text)
        self.status = status
        self.outcome_text = outcome_text
        self.outcome = outcome or {}

    def unresolved_reference(self) -> str | None:
        """The conditional reference that matched nothing, if that is why the write failed."""
        m = _NOT_FOUND.search(self.outcome_text)
        return m.group(1) if m else None

    def ambiguous_reference(self) -> str | None:
        """The conditional reference that matched several resources, if that is the cause."""
        m = _AMBIGUOUS.search(self.outcome_text)
        return m.group(1) if m else None


def outcome_text(body: Any) -> str:
    """Human text of an OperationOutcome (diagnostics or details), issues joined by '; '."""
    if not isinstance(body, Mapping) or body.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in body.get("issue") or []:
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
        where = ", ".join(issue.get("expression") or [])
        if text or where:
            parts.append(f"{text} ({where})" if where else text)
    return "; ".join(parts)


def classify(status: int, headers: Mapping[str, str], body: Any) -> Exception | None:
    """The error an HTTP answer stands for, or None when it is a success (2xx/3xx)."""
    if status < 400:
        return None
    text = outcome_text(body) or f"HTTP {status}"
    if status == 429:
        return FhirTransientError(text, status, retry_after_seconds(headers))
    if status >= 500 or status == 408:
        return FhirTransientError(text, status, retry_after_seconds(headers))
    if status == 401:
        # Reaching here means a freshly issued token was refused too: an operator problem
        # (revoked client, clock skew), not the message's. Retrying keeps the message safe
        # until it is fixed; exhausted retries still end in the dead-letter store.
        return FhirTransientError(text, status)
    return FhirPermanentError(status, text, body if isinstance(body, Mapping) else None)
