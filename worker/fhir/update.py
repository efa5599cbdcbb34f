"""Read-modify-write of one resource with If-Match, so a concurrent update is retried, not lost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from worker.fhir.client import FhirResponse
from worker.fhir.outcome import FhirPermanentError, FhirTransientError

Resource = dict[str, Any]


class Fhir(Protocol):
    """The FHIR operations a guarded update needs."""

    def read(self, resource_type: str, resource_id: str) -> FhirResponse: ...
    def update(self, resource: Any, if_match_version: str | None = None) -> FhirResponse: ...


def guarded_update(fhir: Fhir, resource_type: str, resource_id: str,
                   change: Callable[[Resource], Resource | None], attempts: int = 5,
                   known: Resource | None = None) -> Resource | None:
    """Apply `change` to the current version and write it back only if nobody wrote in between.

    `change` gets a copy of the resource and returns the new one, or None for "nothing to do".
    A 412 (someone else updated it first) re-reads and re-applies; returns what was written.
    `known`, a version the caller has just read, saves the first read: If-Match still guards it.
    """
    for _ in range(attempts):
        if known is not None and (known.get("meta") or {}).get("versionId"):
            current, known = known, None
        else:
            current = fhir.read(resource_type, resource_id).resource
        new = change(dict(current))
        if new is None:
            return None
        version = str((current.get("meta") or {}).get("versionId") or "") or None
        try:
            return fhir.update(new, if_match_version=version).resource
        except FhirPermanentError as exc:
            if exc.status != 412:
                raise
    raise FhirTransientError(f"{resource_type} kept changing under us ({attempts} tries)")
