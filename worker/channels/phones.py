"""Phone numbers: parsing to E.164 and the stored spellings a sender search also matches.

Parsing, validation and formatting are Google's libphonenumber (the `phonenumbers` port): it
knows every country's lengths, trunk prefixes and international dialling prefixes. What is ours
is the rule for which numbers count (see `counts`) and the list of spellings searched for.

A number written without a country code is read in one region, PHONE_DEFAULT_REGION: the same
reading everywhere (outbound contacts, inbound senders, operators' commands), so a patient is
found by an inbound number exactly when their stored value reads as that number.
"""

from __future__ import annotations

import re

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumber, PhoneNumberFormat, ValidationResult

DEFAULT_REGION = "US"
# The channel prefix of a phone address (Twilio's WhatsApp senders and recipients).
WHATSAPP = "whatsapp:"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
# What a phone field of a provider's webhook may look like before it is parsed: ASCII digits
# and the separators people type, an optional `+` and channel prefix. The receiver checks only
# this (it enqueues, it does not judge numbers); the worker parses, and a number that does not
# count ends in the dead-letter store with its reason instead of being refused and lost.
SHAPE = re.compile(r"(?:whatsapp:)?[ +]?[0-9(][0-9 ().\-]{0,31}", re.IGNORECASE)


class InvalidPhoneNumber(ValueError):
    """Not a number we send to or look up."""


def valid_region(region: str) -> bool:
    """True for a region the library knows (ISO 3166-1 alpha-2, upper case: GB, AU, US)."""
    return region in phonenumbers.SUPPORTED_REGIONS


def parse(raw: str, region: str = DEFAULT_REGION) -> PhoneNumber:
    """The number `raw` names, read in `region` when it has no country code.

    Accepts what providers and people send: `+44 (0)20 7946 0958`, `07700 900123` (GB),
    `0491 570 156` (AU), `(555) 123-4567` (US), `whatsapp:+61…`, the region's international
    prefix (`00…` in GB, `011…` in the US). Raises InvalidPhoneNumber unless it `counts`.
    """
    value = raw.strip()
    if value[:len(WHATSAPP)].lower() == WHATSAPP:
        value = value[len(WHATSAPP):]
    elif _SCHEME.match(value) and not value.lower().startswith("tel:"):
        # The library skips any leading text: `messenger:1234…` is not a phone number.
        raise InvalidPhoneNumber("an address of another channel")
    try:
        number = phonenumbers.parse(value, region)
    except NumberParseException as exc:
        raise InvalidPhoneNumber("not a phone number") from exc
    if number.extension:
        # An extension is a desk phone behind a switchboard: a text would go to the main line.
        raise InvalidPhoneNumber("a number with an extension cannot take texts")
    if not counts(number):
        raise InvalidPhoneNumber("not a valid phone number")
    return number


def counts(number: PhoneNumber) -> bool:
    """Whether we send to / look up this number.

    Valid (in an allocated range), or possible (IS_POSSIBLE: a full national number's length,
    not a local-only one) and inside the country's numbering plan, so the fictional ranges
    reserved for drama and tests work: Ofcom's 07700 900xxx, the US 555 numbers. The library's
    possibility check is length only, and `0412 345 678` read in the US is ten digits: the plan
    (the library's general pattern for the country, checked by hand because it has no public
    function for it) is what tells that no US number starts with 0.
    """
    if phonenumbers.is_valid_number(number):
        return True
    if phonenumbers.is_possible_number_with_reason(number) != ValidationResult.IS_POSSIBLE:
        return False
    national = phonenumbers.national_significant_number(number)
    code = number.country_code or 0
    for region in phonenumbers.region_codes_for_country_code(code):
        meta = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(code, region)
        desc = meta.general_desc if meta else None
        pattern = desc.national_number_pattern if desc else None
        if pattern and re.fullmatch(pattern, national):
            return True
    return False


def to_e164(raw: str, region: str = DEFAULT_REGION) -> str:
    """`raw` in E.164 (`+447700900123`), read in `region` when it has no country code."""
    return phonenumbers.format_number(parse(raw, region), PhoneNumberFormat.E164)


def search_variants(e164: str, region: str = DEFAULT_REGION) -> list[str]:
    """The spellings of one number that a Patient may be stored with, E.164 first.

    FHIR token search matches ContactPoint.value exactly, so a patient registered as
    `07700 900123` is not found by `+447700900123`; a comma in a search value means OR, so one
    search lists them all. The spellings are the library's formats (E.164, international,
    national) and what people make of them: digits only, national with and without the trunk
    prefix, the UK's `+44 (0)…`, other separators. Only spellings that read back as this same
    number in `region` are kept: a national spelling is another number in another country
    (`7700900123` is a US number too), and the outbound side reads stored values that way.
    """
    number = parse(e164)
    fmt = phonenumbers.format_number
    international = fmt(number, PhoneNumberFormat.INTERNATIONAL)
    national = fmt(number, PhoneNumberFormat.NATIONAL)
    plus_cc = f"+{number.country_code}"
    # The digit groups of the international format: the national number as the country
    # groups it, without a trunk prefix (`7700 900123`, `555-123-4567`, `491 570 156`).
    groups = re.findall(r"[0-9]+", international[len(plus_cc):])
    nsn = phonenumbers.national_significant_number(number)
    national_digits = re.sub(r"[^0-9]", "", national)
    # The trunk prefix (`0` in GB and AU, `1` in NANP countries), and whether the national
    # format writes it (`07700 900123`) or leaves it out (`(555) 123-4567`).
    trunk = phonenumbers.ndd_prefix_for_region(
        phonenumbers.region_code_for_country_code(number.country_code or 0), True) or ""
    trunk_written = bool(trunk) and national_digits == trunk + nsn
    spellings = [
        fmt(number, PhoneNumberFormat.E164), international, plus_cc[1:] + nsn,
        national, national_digits, nsn,
        f"{plus_cc} {national}",  # `+44 07700 900123`, `+1 (555) 123-4567`
    ]
    for sep in (" ", "-", "."):
        spellings += [sep.join(groups), plus_cc + sep + sep.join(groups)]
        if trunk_written:  # `07700-900123`
            spellings.append(trunk + sep.join(groups))
        elif trunk:  # `1-555-123-4567`
            spellings.append(trunk + sep + sep.join(groups))
    if trunk_written:
        spellings.append(f"{plus_cc} ({trunk}){' '.join(groups)}")  # `+44 (0)7700 900123`
    return [s for s in dict.fromkeys(spellings) if _reads_as(s, region, number)]


def _reads_as(spelling: str, region: str, number: PhoneNumber) -> bool:
    try:
        return to_e164(spelling, region) == phonenumbers.format_number(
            number, PhoneNumberFormat.E164)
    except InvalidPhoneNumber:
        return False
