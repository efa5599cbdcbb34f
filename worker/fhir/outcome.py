"""Classify FHIR answers into transient and permanent failures (pure; no I/O)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from worker.broker.backoff import retry_after_seconds
from worker.errors import PermanentError, TransientError

# SQLSTATEs PostgreSQL gives a transaction it aborted because of another one: serialization
# failure and deadlock. Medplum passes them through as `issue[0].details.coding[0].code` of a 409
# `conflict` and retries such transactions itself (server setting transactionAttempts).
CONTENTION_SQLSTATES = frozenset({"40001", "40P01"})
_NOT_FOUND = re.compile(r"Conditional reference '([^']+)' did not match any resources")
_AMBIGUOUS = re.compile(r"Conditional reference '([^']+)' matched multiple resources")


class FhirTransientError(TransientError):
    """A FHIR request that may succeed later (5xx, 429, timeout, connection error, contention)."""

    def __init__(
        self, detail: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        reasons = {429: "fhir-throttled", 401: "fhir-unauthorized", 409: "fhir-conflict"}
        reason = reasons.get(status or 0, "fhir-unavailable")
        super().__init__(reason, detail, retry_after)
        self.status = status


class FhirConflictError(FhirTransientError):
    """Medplum's 409 for a transaction PostgreSQL aborted under contention (SQLSTATE 40001):
    nothing was written, and the same request succeeds once the overlapping writes are done."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, 409)


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
        if not isinstance(issue, Mapping):
            continue  # a malformed outcome still classifies by its status
        details = issue.get("details")
        text = issue.get("diagnostics") or (
            details.get("text") if isinstance(details, Mapping) else "") or ""
        where = ", ".join(str(e) for e in issue.get("expression") or [])
        if text or where:
            parts.append(f"{text} ({where})" if where else text)
    return "; ".join(parts)


def is_contention(status: int, body: Any) -> bool:
    """True for Medplum's answer to a serializable transaction that PostgreSQL aborted: 409, an
    OperationOutcome issue with code `conflict` whose details carry SQLSTATE 40001 (or 40P01).

    Other 409s stay permanent: Medplum also answers 409 `conflict` without a SQLSTATE for
    requests that can never succeed as sent (a duplicate id on create, a resource that is not
    the one the URL names), and retrying those would only delay the dead letter.
    """
    if status != 409 or not isinstance(body, Mapping):
        return False
    if body.get("resourceType") != "OperationOutcome":
        return False
    for issue in body.get("issue") or []:
        if not isinstance(issue, Mapping) or issue.get("code") != "conflict":
            continue
        details = issue.get("details")
        codings = details.get("coding") if isinstance(details, Mapping) else None
        for coding in codings if isinstance(codings, list) else []:
            if isinstance(coding, Mapping) and coding.get("code") in CONTENTION_SQLSTATES:
                return True
    return False


def classify(status: int, headers: Mapping[str, str], body: Any) -> Exception | None:
    """The error an HTTP answer stands for, or None when it is a success (2xx/3xx)."""
    if status < 400:
        return None
    text = outcome_text(body) or f"HTTP {status}"
    if is_contention(status, body):
        return FhirConflictError(text)
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
