"""FHIR access: the HTTP client, error classification and resource builders."""

from worker.fhir.client import FhirClient, FhirResponse
from worker.fhir.outcome import FhirPermanentError, FhirTransientError
from worker.fhir.query import conditional_reference, query_string

__all__ = [
    "FhirClient",
    "FhirPermanentError",
    "FhirResponse",
    "FhirTransientError",
    "conditional_reference",
    "query_string",
]
