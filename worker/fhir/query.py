"""Query strings for searches, If-None-Exist headers and conditional references.

Medplum quirk (docs/design.md, "Medplum facts"): a literal '+' in any of these is decoded as a
space, so `Patient?phone=+1555…` matches nothing and an If-None-Exist with a raw '+' creates a
duplicate every time. Everything that becomes a query goes through `query_string`, which
percent-encodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import quote

Params = Mapping[str, str] | Iterable[tuple[str, str]]

# Characters FHIR gives meaning to inside a value and that servers read unencoded:
# '|' (system|code), ',' (OR) and ':' / '/' (URIs, references). '+' is deliberately absent.
_SAFE = "|,:/"


def _pairs(params: Params) -> list[tuple[str, str]]:
    return list(params.items()) if isinstance(params, Mapping) else list(params)


def query_string(params: Params) -> str:
    """Encode search params as `a=b&c=d`, percent-encoding '+' and every unsafe character."""
    return "&".join(
        f"{quote(name, safe=':-_.')}={quote(value, safe=_SAFE)}" for name, value in _pairs(params)
    )


def conditional_reference(resource_type: str, params: Params) -> str:
    """A conditional reference such as `Patient?phone=%2B15551234567`, resolved by the server."""
    return f"{resource_type}?{query_string(params)}"


def token(system: str, value: str) -> str:
    """A token search value `system|value`, with FHIR's escape for a comma in the value: a bare
    comma means OR, so `SM1,SM2` would match two messages. (Medplum reads `\\,` as a comma.)"""
    return f"{system}|{value.replace(',', chr(92) + ',')}"
