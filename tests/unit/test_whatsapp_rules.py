"""WhatsApp's pure rules: parsing and field shapes of the webhook, error mapping, routing,
the `read` rule and the settings (no I/O)."""

from __future__ import annotations

import pytest

from tests.support import DATA_KEY, whatsapp_params
from worker.channels import twilio, whatsapp
from worker.channels.twilio import classify_error, field_problems, parse_inbound
from worker.errors import PermanentError
from worker.fhir.resources import WHATSAPP_MEDIUM_CODE, medium
from worker.outbound.routing import choose_channel, medium_channel, pick_contact
from worker.outbound.status_map import next_status, records_read
from worker.settings import ConfigError, load_settings

PATIENT = "+447700900123"
CLINIC = "+15557654321"
BASE_ENV = {"REDIS_URL": "redis://127.0.0.1:1/0", "FHIR_BASE_URL": "http://127.0.0.1:1/fhir/R4/",
            "FHIR_CLIENT_ID": "x", "FHIR_CLIENT_SECRET": "y", "TWILIO_ACCOUNT_SID": "ACtest",
            "TWILIO_AUTH_TOKEN": "t", "PUBLIC_BASE_URL": "https://sb.test",
            "DATA_ENCRYPTION_KEYS": DATA_KEY}


def test_the_channel_names_the_medium_code_of_the_fhir_builders() -> None:
    assert whatsapp.MEDIUM_CODE == twilio.WHATSAPP_MEDIUM_CODE == WHATSAPP_MEDIUM_CODE
    assert medium_channel({"medium": [medium(WHATSAPP_MEDIUM_CODE)]}) == "whatsapp"


def test_a_whatsapp_message_is_its_own_channel_and_conversation() -> None:
    params = whatsapp_params(PATIENT, "hello", to=CLINIC, NumMedia="1",
                             MediaUrl0="https://api.twilio.com/m/1",
                             MediaContentType0="image/jpeg")
    msg = parse_inbound(params, "2026-12-07T10:00:00.000+00:00", region="GB")
    assert (msg.channel, msg.medium_code) == ("whatsapp", "whatsapp")
    assert msg.sender == PATIENT and msg.clinic_address == CLINIC
    assert msg.attachments[0].url == "https://api.twilio.com/m/1"
    sms = parse_inbound({**params, "From": PATIENT, "To": CLINIC}, "2026-12-07T10:00:00Z")
    assert sms.channel == "sms"
    assert msg.conversation_key() != sms.conversation_key()
    assert msg.conversation_key() == f"whatsapp:{PATIENT}:{CLINIC}"


def test_a_whatsapp_sender_that_is_no_number_is_refused_with_its_reason() -> None:
    with pytest.raises(PermanentError) as caught:
        parse_inbound(whatsapp_params("+1", "x"), "2026-12-07T10:00:00Z")
    assert caught.value.reason == "invalid-sender"


@pytest.mark.parametrize(("extra", "problems"), [
    ({}, []),
    ({"ProfileName": "Zoë O'Brien-Ngata 🙂"}, []),
    ({"ProfileName": "a\x00b"}, ["ProfileName"]),
    ({"ProfileName": "x" * 257}, ["ProfileName"]),
    ({"WaId": "44770090012a"}, ["WaId", "WaId (not From's number)"]),
    ({"WaId": "4477009001234567"}, ["WaId", "WaId (not From's number)"]),  # 16 digits
    ({"WaId": "15550001111"}, ["WaId (not From's number)"]),
    ({"To": "+15557654321"}, []),  # the channel follows From
    ({"From": "whatsapp:+44 7700 900123; DROP"}, ["From"]),
    ({"From": "whatsapp:+15550001111"}, ["WaId (not From's number)"]),
    ({"Latitude": "51.5", "Longitude": "-0.12", "MessageType": "location"}, []),
    ({"Latitude": "north"}, ["Latitude"]),
    ({"Forwarded": "yes"}, ["Forwarded"]),
    ({"OriginalRepliedMessageSid": "SM" + "a" * 32}, []),
    ({"OriginalRepliedMessageSid": "../x"}, ["OriginalRepliedMessageSid"]),
    ({"MessageType": "Text!"}, ["MessageType"]),
    # Text moved from the (free) profile name into a new parameter after it.
    ({"ProfileNameX": "x"}, ["ProfileNameX (unknown parameter)"]),
    ({"Prz": "x"}, ["Prz (unknown parameter after ProfileName)"]),
])
def test_whatsapp_webhook_field_shapes(extra: dict[str, str], problems: list[str]) -> None:
    params = {**whatsapp_params(PATIENT, "hi", sid="SM" + "0" * 32, to=CLINIC), **extra}
    assert field_problems("sms", params, "ACtest") == problems


def test_a_signed_sms_cannot_carry_a_whatsapp_id() -> None:
    params = {**whatsapp_params(PATIENT, sid="SM" + "0" * 32), "From": PATIENT,
              "To": CLINIC}
    assert field_problems("sms", params, "ACtest") == ["WaId (not From's number)"]


@pytest.mark.parametrize(("code", "kind"), [
    (63016, "outside-whatsapp-window"), (63003, "invalid-recipient"), (63018, "throttled"),
    (21610, "opted-out"), (63049, "rejected"), (None, "rejected")])
def test_whatsapp_error_codes(code: int | None, kind: str) -> None:
    error = classify_error(400, code, kinds=whatsapp.WHATSAPP_ERROR_KINDS)
    assert error.kind == kind and error.retryable is (kind == "throttled")
    # The SMS channel does not read WhatsApp's codes.
    assert classify_error(400, 63016).kind == "rejected"


def test_whatsapp_addresses_the_patient_by_phone() -> None:
    telecoms = [{"system": "phone", "value": "07700 900123", "use": "mobile"},
                {"system": "email", "value": "p@example.org"}]
    assert pick_contact(telecoms, "whatsapp", region="GB") == PATIENT
    assert choose_channel(None, "whatsapp", telecoms, region="GB") == "whatsapp"
    # No phone: the thread's WhatsApp cannot reach them; the order decides.
    assert choose_channel(None, "whatsapp", telecoms[1:], ("sms", "email")) == "email"


@pytest.mark.parametrize(("current", "status", "already", "expected"), [
    ("in-progress", "read", False, True),
    ("completed", "read", False, True),  # delivered first, then read: recorded
    ("completed", "read", True, False),  # once
    ("stopped", "read", False, True),
    ("entered-in-error", "read", False, False),
    ("in-progress", "delivered", False, False),
    ("in-progress", "READ", False, True),
])
def test_read_is_recorded_once_without_moving_a_final_status(
        current: str, status: str, already: bool, expected: bool) -> None:
    assert records_read(current, status, already) is expected
    if current in ("completed", "stopped"):
        assert next_status(current, status) is None


@pytest.mark.parametrize(("env", "problem"), [
    ({"TWILIO_WHATSAPP_FROM": "+15557654321"}, "twilio_whatsapp_from"),
    ({"TWILIO_WHATSAPP_FROM": "whatsapp:+1555x"}, "twilio_whatsapp_from"),
    ({"WHATSAPP_TEMPLATE_CONTENT_SID": "HXshort"}, "whatsapp_template_content_sid"),
    ({"WHATSAPP_TEMPLATE_VARIABLES": "[1]"}, "whatsapp_template_variables"),
    ({"WHATSAPP_TEMPLATE_VARIABLES": '{"1": 2}'}, "whatsapp_template_variables"),
    ({"WHATSAPP_HOLD_HOURS": "0"}, "whatsapp_hold_hours"),
])
def test_whatsapp_settings_are_checked_at_start(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE_ENV, **env})
    assert problem.upper() in str(caught.value) or problem in str(caught.value)


def test_whatsapp_settings_accept_a_sender_and_a_template() -> None:
    s = load_settings({**BASE_ENV, "TWILIO_WHATSAPP_FROM": "whatsapp:+15557654321",
                       "WHATSAPP_TEMPLATE_CONTENT_SID": "HX" + "0" * 32,
                       "WHATSAPP_TEMPLATE_VARIABLES": '{"1": "Riverside Clinic"}'})
    assert s.whatsapp_template_variables == '{"1":"Riverside Clinic"}'
