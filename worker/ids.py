"""The shapes of the identifiers checked at every boundary, shared by the layers that meet them:
a FHIR logical id (in a reference, a task payload, a provider's custom argument) and an API
request id. Kept apart from the FHIR client and the stores so a channel can check a field's
shape without importing either."""

from __future__ import annotations

import re

# FHIR R4: ids are [A-Za-z0-9\-\.]{1,64}.
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# A request id's shape (a key part in Redis, an identifier value in FHIR). Checked before any id
# is used: `events:<id>` would otherwise name the event list of another request (a WRONGTYPE 500).
REQUEST_ID = re.compile(r"[A-Za-z0-9\-]{1,64}")


def valid_id(resource_id: object) -> bool:
    """True for a FHIR logical id (and not `.` or `..`, which the grammar would allow)."""
    return (isinstance(resource_id, str) and FHIR_ID.fullmatch(resource_id) is not None
            and resource_id not in (".", ".."))
