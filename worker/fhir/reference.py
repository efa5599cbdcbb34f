"""FHIR references parsed into (type, id) before use, so none can walk out of what it names.

A reference we read from a payload or a resource is hostile until parsed:
`Patient/../Practitioner/1` or `Patient/../../../x` would otherwise become URLs outside the
resource (and outside the FHIR base, carrying our bearer token). Only `Type/id` with FHIR's
grammar passes; the FHIR client builds URLs from these parts only.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from worker.errors import PermanentError
from worker.ids import valid_id

# FHIR R4: resource type names are capitalised letters (ids: worker/ids.py).
_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")


class InvalidReference(PermanentError):
    """A reference or id that is not `Type/id` in FHIR's grammar, or not of the expected type."""

    def __init__(self, detail: str) -> None:
        super().__init__("invalid-reference", detail)


def valid_type(resource_type: object) -> bool:
    """True for a FHIR resource type name."""
    return isinstance(resource_type, str) and _TYPE.fullmatch(resource_type) is not None


@dataclass(frozen=True)
class Ref:
    """A parsed literal reference."""

    type: str
    id: str

    def __str__(self) -> str:
        return f"{self.type}/{self.id}"


def ref(resource_type: object, resource_id: object) -> Ref:
    """A Ref from its parts, checked; raises InvalidReference."""
    if not isinstance(resource_type, str) or not valid_type(resource_type):
        raise InvalidReference("not a FHIR resource type")
    if not isinstance(resource_id, str) or not valid_id(resource_id):
        raise InvalidReference(f"not a FHIR id for {resource_type}")
    return Ref(resource_type, resource_id)


def parse_reference(text: object, expected: Collection[str] | None = None) -> Ref:
    """Parse a relative literal reference `Type/id`; with `expected`, the type must be one of
    them. Raises InvalidReference (permanent) for anything else, with no part of it echoed."""
    if not isinstance(text, str) or text.count("/") != 1:
        raise InvalidReference("a reference must be Type/id")
    resource_type, resource_id = text.split("/")
    parsed = ref(resource_type, resource_id)
    if expected is not None and parsed.type not in expected:
        raise InvalidReference(f"expected a reference to {' or '.join(sorted(expected))}")
    return parsed
