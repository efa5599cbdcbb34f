"""Phone numbers of every country (worker/channels/phones.py), as tables: UK, Australian and
US numbers in the ranges set aside for drama and tests (Ofcom 07700 900xxx, ACMA 0491 570 xxx,
NANP 555), read in each PHONE_DEFAULT_REGION."""

from __future__ import annotations

import phonenumbers
import pytest

from worker.channels.phones import InvalidPhoneNumber, counts, search_variants, to_e164
from worker.channels.twilio import field_problems, parse_inbound
from worker.errors import PermanentError
from worker.outbound.routing import choose_channel, has_only_invalid_phones, pick_contact
from worker.settings import ConfigError, load_settings

UK = "+447700900123"
AU = "+61491570156"
US = "+15551234567"


@pytest.mark.parametrize(("raw", "region", "e164"), [
    # UK: national with the trunk 0, international, the `+44 (0)` form, 00 as GB dials out.
    ("07700 900123", "GB", UK),
    ("07700900123", "GB", UK),
    ("7700 900123", "GB", UK),
    ("+44 7700 900123", "US", UK),
    ("+44 (0)7700 900123", "AU", UK),
    ("+44 (0)20 7946 0958", "US", "+442079460958"),  # the example (was +4402079460958)
    ("00 44 7700 900123", "GB", UK),
    ("whatsapp:+447700900123", "US", UK),
    ("07700 900999", "GB", "+447700900999"),
    # Australia: mobiles, a Sydney landline written `(02)`, 0011 as AU dials out.
    ("0491 570 156", "AU", AU),
    ("0491570156", "AU", AU),
    ("+61 491 570 156", "GB", AU),
    ("0412 345 678", "AU", "+61412345678"),  # the example (was +10412345678)
    ("(02) 9876 5432", "AU", "+61298765432"),
    ("0011 44 7700 900123", "AU", UK),
    ("WhatsApp:+61491570156", "GB", AU),
    # US: what the NANP-only code took, and 011 as the US dials out.
    ("+15551234567", "US", US),
    ("+1 (555) 123-4567", "GB", US),
    ("(555) 123-4567", "US", US),
    ("555.123.4567", "US", US),
    ("1-555-123-4567", "US", US),
    ("15551234567", "US", US),
    (" 15551234567", "US", US),  # '+' decoded to ' ' by a careless hop
    ("011 44 7700 900123", "US", UK),
    ("+1 212 555 0100", "AU", "+12125550100"),
])
def test_to_e164(raw: str, region: str, e164: str) -> None:
    assert to_e164(raw, region) == e164


@pytest.mark.parametrize(("raw", "region"), [
    ("12345", "GB"),  # local only: must not become +4412345
    ("+4412345", "GB"),
    ("0412 345 678", "US"),  # possible by length, but no US number starts with 0
    ("07700 900123", "US"),
    ("555-0100", "US"),  # a local number without its area code
    ("00447911123456", "US"),  # the US dials out with 011, not 00
    ("+1234567890123456", "US"),  # too long
    ("+12", "US"),
    ("+0123456789", "US"),
    ("", "GB"),
    ("hello", "AU"),
    ("call the front desk", "US"),
    ("+1 555 123 4567 ext. 89", "US"),  # a desk phone: a text would reach the switchboard
    ("messenger:+15551234567", "US"),  # another channel's address
])
def test_to_e164_refuses_what_is_not_a_number_there(raw: str, region: str) -> None:
    with pytest.raises(InvalidPhoneNumber):
        to_e164(raw, region)


def test_fictional_ranges_count_and_the_rest_of_the_plan_holds() -> None:
    for n in (0, 123, 999):  # Ofcom's drama range
        assert counts(phonenumbers.parse(f"+447700900{n:03d}"))
    for n in (6, 156, 999):  # ACMA's
        assert counts(phonenumbers.parse(f"+61491570{n:03d}"))
    assert counts(phonenumbers.parse("+15550100000"))
    assert not counts(phonenumbers.parse("+10412345678"))
    assert not counts(phonenumbers.parse("+4412345"))


@pytest.mark.parametrize(("e164", "region", "expected"), [
    (UK, "GB", ["+447700900123", "+44 7700 900123", "447700900123", "07700 900123",
                "07700900123", "7700900123", "7700 900123", "+44 (0)7700 900123"]),
    ("+442079460958", "GB", ["+44 20 7946 0958", "020 7946 0958", "02079460958", "2079460958",
                             "+44 (0)20 7946 0958"]),
    (AU, "AU", ["+61491570156", "+61 491 570 156", "61491570156", "0491 570 156",
                "0491570156", "491570156", "491 570 156", "+61 (0)491 570 156"]),
    (US, "US", ["+15551234567", "+1 555-123-4567", "15551234567", "(555) 123-4567",
                "5551234567", "555-123-4567", "555.123.4567", "+1 (555) 123-4567",
                "1-555-123-4567"]),
])
def test_search_variants_list_the_spellings(e164: str, region: str, expected: list[str]
                                            ) -> None:
    variants = search_variants(e164, region)
    assert variants[0] == e164
    assert not set(expected) - set(variants)
    assert len(variants) == len(set(variants))
    assert all("," not in v and "|" not in v for v in variants)  # OR and system in a token


@pytest.mark.parametrize(("e164", "region", "national"), [
    (UK, "US", ["07700 900123", "7700900123", "7700 900123"]),  # 7700900123 is a US number
    (UK, "AU", ["07700 900123", "7700900123"]),
    (AU, "GB", ["0491 570 156", "491570156"]),
    (US, "GB", ["(555) 123-4567", "5551234567", "555-123-4567"]),  # +44 55 5123 4567 in GB
    (US, "AU", ["(555) 123-4567", "5551234567"]),
])
def test_national_spellings_are_searched_only_in_their_own_region(
        e164: str, region: str, national: list[str]) -> None:
    variants = search_variants(e164, region)
    assert variants[0] == e164
    assert not set(national) & set(variants)


@pytest.mark.parametrize("region", ["GB", "AU", "US"])
def test_every_spelling_searched_reads_back_as_the_number(region: str) -> None:
    """What inbound looks up is what outbound would send to: each spelling, read as a stored
    value is read in this region, is the same number. Checked on the library's example number
    of every region it knows."""
    for other in sorted(phonenumbers.SUPPORTED_REGIONS):
        example = phonenumbers.example_number(other)
        if example is None:
            continue
        e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
        for spelling in search_variants(e164, region):
            assert to_e164(spelling, region) == e164, (other, spelling)


def test_phone_default_region_setting() -> None:
    env = {"REDIS_URL": "redis://x", "FHIR_BASE_URL": "http://f/", "FHIR_CLIENT_ID": "c",
           "FHIR_CLIENT_SECRET": "s", "TWILIO_ACCOUNT_SID": "ACx", "TWILIO_AUTH_TOKEN": "t",
           "PUBLIC_BASE_URL": "https://p", "DATA_ENCRYPTION_KEYS": _key()}
    assert load_settings(env).phone_default_region == "US"
    assert load_settings({**env, "PHONE_DEFAULT_REGION": " gb "}).phone_default_region == "GB"
    for bad in ("UK", "XX", "GBR", "44", "001", ""):  # UK is not ISO 3166-1 (GB is)
        with pytest.raises(ConfigError) as info:
            load_settings({**env, "PHONE_DEFAULT_REGION": bad})
        assert any(p.startswith("PHONE_DEFAULT_REGION:") for p in info.value.problems), bad


def _key() -> str:
    from worker.crypto import generate_key

    return generate_key()


@pytest.mark.parametrize(("sender", "region", "e164"), [
    ("+447700900123", "GB", UK),
    ("whatsapp:+447700900123", "GB", UK),
    ("+61491570156", "AU", AU),
    ("whatsapp:+61491570156", "US", AU),
    ("+15551234567", "US", US),
    ("07700 900123", "GB", UK),  # never from Twilio, but read like a stored number
])
def test_parse_inbound_reads_the_sender_in_the_region(sender: str, region: str, e164: str
                                                      ) -> None:
    msg = parse_inbound({"MessageSid": "SM1", "From": sender, "To": "+15557654321"},
                        received_at="2026-11-24T10:00:00Z", region=region)
    assert msg.sender == e164


@pytest.mark.parametrize(("sender", "region"), [
    ("+4412345", "GB"), ("12345", "GB"), ("0412 345 678", "US"), ("+10412345678", "AU"),
])
def test_an_invalid_sender_is_a_permanent_failure_that_names_no_number(sender: str, region: str
                                                                       ) -> None:
    params = {"MessageSid": "SM" + "0" * 32, "AccountSid": "ACtest", "From": sender,
              "To": "+15557654321", "Body": "hi", "NumMedia": "0"}
    # The receiver checks the shape only and accepts it: refused, it would be lost; the worker
    # dead-letters it with the reason, for an operator to see and replay.
    assert field_problems("sms", params, "ACtest") == []
    with pytest.raises(PermanentError) as info:
        parse_inbound(params, received_at="2026-11-24T10:00:00Z", region=region)
    assert info.value.reason == "invalid-sender"
    assert "valid" in info.value.detail
    digits = "".join(c for c in sender if c.isdigit())
    assert digits not in "".join(c for c in info.value.detail if c.isdigit())


@pytest.mark.parametrize("value", ["javascript:alert(1)", "+1555 From+1555", "٠٧٧٠٠٩٠٠١٢٣",
                                   "+1" + "5" * 40])
def test_the_receiver_refuses_what_is_not_shaped_like_a_number(value: str) -> None:
    params = {"MessageSid": "SM" + "0" * 32, "AccountSid": "ACtest", "From": value,
              "To": "+15557654321", "NumMedia": "0"}
    assert field_problems("sms", params, "ACtest") == ["From"]


def _phone(value: str, use: str = "mobile") -> dict[str, str]:
    return {"system": "phone", "value": value, "use": use}


EMAIL = {"system": "email", "value": "pat@example.org"}


@pytest.mark.parametrize(("telecoms", "region", "expected"), [
    ([_phone("07700 900123")], "GB", UK),
    ([_phone("+44 (0)7700 900123")], "US", UK),
    ([_phone("07700 900123")], "US", None),  # not guessed into +1…
    ([_phone("0491 570 156")], "AU", AU),
    ([_phone("0412 345 678")], "AU", "+61412345678"),
    ([_phone("0412 345 678")], "US", None),  # the issue's +10412345678, never sent to
    ([_phone("(555) 123-4567")], "US", US),
    ([_phone("(555) 123-4567")], "GB", "+445551234567"),  # a valid GB number, as stored
    ([_phone("12345")], "GB", None),
    # An invalid mobile does not hide a valid home number.
    ([_phone("12345"), _phone("020 7946 0958", "home")], "GB", "+442079460958"),
])
def test_pick_contact_reads_stored_numbers_in_the_region(
        telecoms: list[dict[str, str]], region: str, expected: str | None) -> None:
    assert pick_contact(telecoms, "sms", region=region) == expected


def test_only_invalid_phones_is_told_apart_from_no_phone() -> None:
    assert has_only_invalid_phones([_phone("0412 345 678"), EMAIL], "US")
    assert not has_only_invalid_phones([_phone("0412 345 678"), EMAIL], "AU")
    assert not has_only_invalid_phones([EMAIL], "US")
    assert not has_only_invalid_phones([], "US")
    ended = {**_phone("12345"), "period": {"end": "2020-01-01"}}
    assert not has_only_invalid_phones([ended], "GB")  # an ended number is no number


def test_choose_channel_does_not_text_a_number_that_does_not_read_in_the_region() -> None:
    stored = [_phone("0412 345 678"), EMAIL]
    assert choose_channel(None, None, stored, region="AU") == "sms"
    assert choose_channel(None, None, stored, region="US") == "email"
    assert choose_channel(None, "sms", [_phone("0412 345 678")], region="US") is None
