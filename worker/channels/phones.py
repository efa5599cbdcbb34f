"""Phone numbers: E.164 normalisation and the stored formats a sender search also matches."""

from __future__ import annotations

import re

_STRIP = re.compile(r"[\s().\-]")
_DIGITS = re.compile(r"[0-9]+")


class InvalidPhoneNumber(ValueError):
    """Not a number we can turn into E.164."""


def to_e164(raw: str, default_country_code: str = "1") -> str:
    """Normalise a phone number to E.164 (`+15551234567`).

    Accepts what providers and people send: `+1 (555) 123-4567`, `whatsapp:+1555…`, `001555…`,
    a 10-digit NANP number (given the default country code), or a form-encoded leading space
    where '+' was decoded as ' ' by an upstream hop (docs/design.md, "Medplum facts").
    """
    value = raw.strip()
    if ":" in value:  # channel prefixes such as whatsapp:+1555…
        value = value.rsplit(":", 1)[1]
    value = _STRIP.sub("", value)
    if value.startswith("00"):
        value = "+" + value[2:]
    if not value.startswith("+"):
        if len(value) == 10 and default_country_code == "1":
            value = "+1" + value
        elif len(value) == 11 and value.startswith("1") and default_country_code == "1":
            value = "+" + value
        else:
            value = "+" + value
    digits = value[1:]
    # ASCII digits only (str.isdigit() also takes full-width and Arabic-Indic digits).
    if not _DIGITS.fullmatch(digits) or not 8 <= len(digits) <= 15 or digits.startswith("0"):
        raise InvalidPhoneNumber("not an E.164 phone number")
    return value


def search_variants(e164: str) -> list[str]:
    """Stored spellings of one number that a token search should also match.

    FHIR token search matches ContactPoint.value exactly, so a patient registered as
    `(555) 123-4567` is not found by `+15551234567`. A comma in a search value means OR, so the
    sender search lists the common spellings: E.164, digits only, and for NANP (+1) numbers the
    national forms people type. Other countries get E.164 and digits only.
    """
    digits = e164[1:]
    variants = [e164, digits]
    if digits.startswith("1") and len(digits) == 11:
        n = digits[1:]
        a, b, c = n[:3], n[3:6], n[6:]
        variants += [
            n,
            f"({a}) {b}-{c}",
            f"{a}-{b}-{c}",
            f"{a}.{b}.{c}",
            f"+1 {a}-{b}-{c}",
            f"+1 ({a}) {b}-{c}",
            f"1-{a}-{b}-{c}",
        ]
    return variants
