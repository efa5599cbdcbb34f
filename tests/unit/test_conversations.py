"""Twilio Conversations rules (pure): webhook shapes, the patient's message, routing a reply."""

from __future__ import annotations

import json

import pytest

from worker.channels.twilio_conversations import (
    CONVERSATION_SYSTEM,
    WHATSAPP_MEDIUM_CODE,
    Binding,
    delivery_status,
    field_problems,
    inbox_key,
    is_own,
    media_url,
    needs_binding,
    parse_message_added,
)
from worker.errors import PermanentError
from worker.fhir import resources
from worker.inbound.conversations import read_message_added
from worker.outbound.routing import conversation_sid
from worker.settings import load_settings

CH = "CH" + "0a" * 16
IM = "IM" + "1b" * 16
MB = "MB" + "2c" * 16
IS = "IS" + "3d" * 16
ME = "ME" + "4e" * 16


def added(**extra: str) -> dict[str, str]:
    """An onMessageAdded as Twilio documents it (Conversations Webhooks)."""
    return {"EventType": "onMessageAdded", "AccountSid": "ACtest", "ChatServiceSid": IS,
            "ConversationSid": CH, "MessageSid": IM, "ParticipantSid": MB, "Index": "3",
            "Author": "+15551234567", "Body": "Running late", "Source": "SMS",
            "DateCreated": "2026-12-07T10:00:00.000Z", "Attributes": "{}",
            "RetryCount": "0", "WebhookType": "webhook", "WebhookSid": "WH" + "5f" * 16,
            **extra}


def delivered(**extra: str) -> dict[str, str]:
    """An onDeliveryUpdated as Twilio documents it."""
    return {"EventType": "onDeliveryUpdated", "AccountSid": "ACtest", "ChatServiceSid": IS,
            "ConversationSid": CH, "MessageSid": IM, "DeliveryReceiptSid": "DY" + "6a" * 16,
            "ChannelMessageSid": "SM" + "7b" * 16, "ParticipantSid": MB, "Status": "delivered",
            "ErrorCode": "0", "DateCreated": "2026-12-07T10:00:00.000Z",
            "DateUpdated": "2026-12-07T10:00:01.000Z", **extra}


MEDIA = json.dumps([{"Sid": ME, "Filename": "photo.png", "ContentType": "image/png",
                     "Size": 12232}])


@pytest.mark.parametrize(("params", "problems"), [
    (added(), []),
    (added(Media=MEDIA), []),
    (added(Media=json.dumps([{"MediaSid": ME, "ContentType": "image/png"}])), []),
    (added(Author="whatsapp:+15551234567", Source="WHATSAPP"), []),
    (added(Author="clinic-app-user", ClientIdentity="clinic-app-user"), []),
    (delivered(), []),
    (delivered(Status="read"), []),
    (added(ConversationSid="CH123"), ["ConversationSid"]),
    (added(MessageSid="SM" + "1b" * 16), ["MessageSid"]),
    (added(ParticipantSid="MB/../../x"), ["ParticipantSid"]),
    (added(ChatServiceSid="ISxyz"), ["ChatServiceSid"]),
    (added(AccountSid="ACother"), ["AccountSid"]),
    (added(EventType="onMessageRemoved"), ["EventType"]),
    (added(Index="-1"), ["Index"]),
    (added(Media="not json"), ["Media"]),
    (added(Media=json.dumps([{"Sid": "ME1", "ContentType": "image/png"}])), ["Media"]),
    (added(Media=json.dumps([{"Sid": ME, "ContentType": "x"}])), ["Media"]),
    (added(Media=json.dumps([{"Sid": ME, "ContentType": "image/png"}] * 11)), ["Media"]),
    (added(Attributes="{"), ["Attributes"]),
    (added(Author="a\nb"), ["Author"]),
    (added(Source="SMS; DROP"), ["Source"]),
    (delivered(Status="exploded"), ["Status"]),
    (delivered(ErrorCode="12x"), ["ErrorCode"]),
    ({k: v for k, v in added().items() if k != "MessageSid"}, ["MessageSid"]),
    ({k: v for k, v in delivered().items() if k != "Status"}, ["Status"]),
    # Text moved out of a value into a new name: the tail of Body, or a name extending ours.
    (added(Bodyx="late"), ["Bodyx (unknown parameter)"]),
    (added(Body="Cancel ", Bonus=" my appointment"),
     ["Bonus (unknown parameter after Body)"]),
])
def test_webhook_shapes(params: dict[str, str], problems: list[str]) -> None:
    assert field_problems(params.items(), "ACtest") == problems


def test_a_repeated_field_is_refused() -> None:
    pairs = [*added().items(), ("ConversationSid", "CH" + "9f" * 16)]
    assert field_problems(pairs, "ACtest") == ["ConversationSid (repeated)"]


def test_inbox_keys_tell_retries_from_new_events() -> None:
    assert inbox_key(added()) == inbox_key(added(RetryCount="1"))
    assert inbox_key(delivered()) != inbox_key(delivered(Status="read"))
    assert inbox_key(added()) != inbox_key(delivered())


def test_author_address_makes_the_message_without_the_api() -> None:
    msg = parse_message_added(added(Media=MEDIA), "2026-12-07T10:00:00.100Z", None)
    assert (msg.sender, msg.medium_code, msg.provider_message_id,
            msg.provider_conversation_id) == ("+15551234567", "SMSWRIT", IM, CH)
    assert msg.conversation_key() == CH
    (att,) = msg.attachments
    assert (att.url, att.content_type, att.title, att.size) == (
        media_url(IS, ME), "image/png", "photo.png", 12232)
    assert att.url == f"https://mcs.us1.twilio.com/v1/Services/{IS}/Media/{ME}"


def test_whatsapp_binding_makes_a_whatsapp_message() -> None:
    binding = Binding("whatsapp:+447700900123", "whatsapp:+15557654321")
    msg = parse_message_added(added(Author="patient-7"), "t", binding)
    assert (msg.sender, msg.medium_code, msg.clinic_address) == (
        "+447700900123", WHATSAPP_MEDIUM_CODE, "+15557654321")
    assert WHATSAPP_MEDIUM_CODE == resources.WHATSAPP_MEDIUM_CODE


def test_no_address_is_an_invalid_sender() -> None:
    with pytest.raises(PermanentError) as err:
        parse_message_added(added(Author="patient-7"), "t", None)
    assert err.value.reason == "invalid-sender"
    assert "+1555" not in str(err.value)


class Participants:
    """A recording fake of the Conversations API's participant read."""

    def __init__(self, binding: Binding | None) -> None:
        self.binding_found = binding
        self.asked: list[tuple[str, str]] = []

    def binding(self, conversation_sid: str, participant_sid: str) -> Binding | None:
        self.asked.append((conversation_sid, participant_sid))
        return self.binding_found


def test_reading_an_event() -> None:
    api = Participants(Binding("+15551234567", "+15557654321"))
    assert read_message_added(added(Author="clinic"), "t", "clinic", api) == "own-message"
    assert read_message_added(added(Author="system", ParticipantSid=""), "t", "clinic",
                              api) == "system-message"
    assert api.asked == []
    msg = read_message_added(added(Author="patient-7"), "t", "clinic", api)
    assert api.asked == [(CH, MB)]
    assert not isinstance(msg, str) and msg.sender == "+15551234567"
    assert read_message_added(added(Author="nurse"), "t", "clinic",
                              Participants(None)) == "not-a-patient"
    # An address as Author needs no API call; our identity never matches an address.
    assert not needs_binding(added())
    assert not is_own(added(), "")


def test_delivery_receipt_as_status_fields() -> None:
    assert delivery_status(delivered(Status="Read")) == {
        "MessageSid": IM, "MessageStatus": "read", "ErrorCode": ""}
    assert delivery_status(delivered(Status="failed", ErrorCode="30008"))["ErrorCode"] == "30008"


def test_a_header_keyed_by_a_conversation_routes_the_reply() -> None:
    header = {"identifier": [{"system": "urn:other", "value": CH},
                             {"system": CONVERSATION_SYSTEM, "value": CH}]}
    assert conversation_sid(header) == CH
    assert conversation_sid({"identifier": [{"system": CONVERSATION_SYSTEM,
                                             "value": "CH/../x"}]}) is None
    assert conversation_sid(None) is None


@pytest.mark.parametrize("identity", ["+15551234567", "whatsapp:+15551234567", "a\nb",
                                      "x" * 257])
def test_identity_setting_is_an_identity(identity: str) -> None:
    from worker.settings import ConfigError

    env = {"REDIS_URL": "redis://127.0.0.1:1/0", "FHIR_BASE_URL": "http://127.0.0.1:1/fhir/R4/",
           "FHIR_CLIENT_ID": "x", "FHIR_CLIENT_SECRET": "y", "TWILIO_ACCOUNT_SID": "ACtest",
           "TWILIO_AUTH_TOKEN": "t", "PUBLIC_BASE_URL": "https://sb.test",
           "DATA_ENCRYPTION_KEYS": "", "TWILIO_CONVERSATIONS_IDENTITY": identity}
    with pytest.raises(ConfigError) as err:
        load_settings(env)
    assert "TWILIO_CONVERSATIONS_IDENTITY" in str(err.value)
