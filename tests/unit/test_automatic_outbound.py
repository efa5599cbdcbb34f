"""Automatic outbound rules: the signature, the notification shapes, the send-or-ignore rule."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest

from worker.errors import PermanentError
from worker.fhir.subscription import (
    CRITERIA,
    INTERACTION_EXTENSION,
    SECRET_EXTENSION,
    extension_value,
    subscription_resource,
)
from worker.outbound.automatic import (
    ORDER_WAIT_MAX,
    ORDER_WAIT_MIN,
    ORDER_WINDOW_SECONDS,
    BadNotification,
    earlier_replies,
    ignore_reason,
    notified_ids,
    order_wait,
    signature_valid,
    subscription_request,
    subscription_request_id,
)

SECRET = b"s3cret-for-tests"
BODY = b'{"resourceType":"Communication","id":"c1"}'
SMS_SYSTEM = "https://www.twilio.com/docs/api/messaging/message#sid"
EMAIL_SYSTEM = "https://docs.sendgrid.com/x-message-id"
REQUEST_SYSTEM = "urn:switchboard:outbound-request"


def sig(body: bytes = BODY, secret: bytes = SECRET) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


@pytest.mark.parametrize(("secret", "body", "given", "ok"), [
    (SECRET, BODY, sig(), True),
    (SECRET, BODY, sig().upper(), True),  # hex is hex
    (SECRET, BODY, f" {sig()} ", True),
    (SECRET, BODY + b" ", sig(), False),  # one byte more than what was signed
    (SECRET, BODY, sig(secret=b"another"), False),
    (SECRET, BODY, sig()[:-1], False),
    (SECRET, BODY, None, False),
    (SECRET, BODY, "", False),
    (SECRET, BODY, "é" * 64, False),
    (b"", BODY, sig(secret=b""), False),  # no secret configured: nothing verifies
])
def test_signature(secret: bytes, body: bytes, given: str | None, ok: bool) -> None:
    assert signature_valid(secret, body, given) is ok


def comm(cid: str = "c1", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Communication", "id": cid, **extra}


STATUS = {"resourceType": "SubscriptionStatus", "type": "event-notification",
          "notificationEvent": [{"eventNumber": "1", "focus": {"reference": "Communication/c9"}}]}
BACKPORT = {"resourceType": "Parameters", "parameter": [
    {"name": "type", "valueCode": "event-notification"},
    {"name": "notification-event", "part": [
        {"name": "event-number", "valueString": "1"},
        {"name": "focus", "valueReference": {"reference": "Communication/c8"}}]}]}


@pytest.mark.parametrize(("body", "ids"), [
    (comm(), ["c1"]),  # Medplum: the bare resource
    ({"resourceType": "Bundle", "entry": [{"resource": comm()}]}, ["c1"]),
    ({"resourceType": "Bundle", "entry": [{"resource": STATUS}, {"resource": comm("c9")}]},
     ["c9"]),
    ({"resourceType": "Bundle", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1"}}, {"resource": STATUS},
        {"resource": comm("c2")}]}, ["c9", "c2"]),
    ({"resourceType": "Bundle", "type": "history", "entry": [
        {"resource": BACKPORT}, {"fullUrl": "https://fhir.example/Communication/c8/_history/2"}]},
     ["c8"]),
    ({"resourceType": "Bundle", "entry": [{"fullUrl": "https://x/fhir/Communication/c3"}]},
     ["c3"]),
    ({"resourceType": "Bundle", "entry": [{"resource": STATUS}]}, ["c9"]),
    ({"resourceType": "Bundle", "type": "history", "entry": [
        {"resource": {"resourceType": "SubscriptionStatus", "type": "heartbeat"}}]}, []),
    ({"resourceType": "Bundle"}, []),
])
def test_communications_are_found_wherever_they_are(body: dict[str, Any], ids: list[str]
                                                    ) -> None:
    assert notified_ids(body) == ids


@pytest.mark.parametrize(("body", "reason"), [
    ([], "invalid-body"),
    ({"id": "c1"}, "invalid-body"),
    ({"resourceType": "Patient", "id": "p1"}, "not-a-communication"),
    (comm("../Patient/1"), "invalid-id"),
    (comm(None), "invalid-id"),
    (comm(".."), "invalid-id"),
    ({"resourceType": "Bundle", "entry": {"resource": comm()}}, "invalid-body"),
    ({"resourceType": "Bundle", "entry": ["x"]}, "invalid-body"),
    ({"resourceType": "Bundle", "entry": [{"fullUrl": "https://x/Communication/a%2F..%2Fb"}]},
     "invalid-id"),
    ({"resourceType": "Bundle", "entry": [{"resource": comm(f"c{i}")} for i in range(51)]},
     "too-many"),
])
def test_hostile_notifications_are_refused_with_a_reason(body: Any, reason: str) -> None:
    with pytest.raises(BadNotification) as exc:
        notified_ids(body)
    assert exc.value.reason == reason


REPLY = {"resourceType": "Communication", "id": "m1", "status": "in-progress",
         "meta": {"author": {"reference": "Practitioner/d1"}},
         "partOf": [{"reference": "Communication/h1"}],
         "sender": {"reference": "Practitioner/d1"},
         "recipient": [{"reference": "Patient/p1"}],
         "payload": [{"contentString": "Your results are ready"}]}


def sent_id(system: str, value: str) -> dict[str, str]:
    return {"system": system, "value": value}


@pytest.mark.parametrize(("changes", "reason"), [
    ({}, None),
    ({"sender": {"reference": "PractitionerRole/r1"}}, None),
    ({"sender": {"reference": "Organization/o1"}}, None),
    ({"payload": [{"contentAttachment": {"url": "https://x/y.png"}}]}, None),
    ({"partOf": None}, "thread-header"),
    ({"partOf": []}, "thread-header"),
    ({"status": "preparation"}, "not-in-progress"),
    ({"status": "completed"}, "not-in-progress"),
    ({"status": "stopped"}, "not-in-progress"),
    ({"sender": {"reference": "Patient/p1"}}, "from-patient"),
    ({"sender": {"reference": "https://fhir.example/R4/Patient/p1"}}, "from-patient"),
    ({"sender": {"reference": "Patient?phone=%2B15551234567"}}, "from-patient"),
    # Written by Switchboard from an inbound SMS (its MessageSid, no request of ours):
    ({"identifier": [sent_id(SMS_SYSTEM, "SM1")]}, "inbound-message"),
    ({"identifier": [sent_id(EMAIL_SYSTEM, "x1")]}, "inbound-message"),
    ({"identifier": [sent_id(SMS_SYSTEM, "SM1"), sent_id(REQUEST_SYSTEM, "r1")]},
     "already-sent"),
    ({"identifier": [sent_id(REQUEST_SYSTEM, "r1")]}, "api-request"),
    ({"identifier": [sent_id("urn:other", "1")]}, None),
    ({"payload": []}, "no-content"),
    ({"payload": [{"contentString": ""}]}, "no-content"),
    ({"resourceType": "Patient"}, "not-a-communication"),
    # Issue 26, finding 8: only what our side wrote (meta.author, set by the server), with a
    # sender, to a patient.
    ({"sender": {"reference": "RelatedPerson/r1"}}, "from-patient"),
    ({"meta": None}, "not-clinic-author"),
    ({"meta": {"author": {"reference": "Patient/p1"}}}, "not-clinic-author"),
    ({"meta": {"author": {"reference": "RelatedPerson/r1"}}}, "not-clinic-author"),
    ({"meta": {"author": {"reference": "ClientApplication/patient-app"}}},
     "not-clinic-author"),
    ({"meta": {"author": {"reference": "ClientApplication/ehr-bot"}}}, None),  # configured
    ({"meta": {"author": {"reference": "PractitionerRole/r1"}}}, None),
    ({"meta": {"author": {"reference": "Organization/o1"}}}, None),
    ({"meta": {"author": {"reference": "Practitioner/../Patient/1"}}}, "not-clinic-author"),
    ({"meta": {"author": "Practitioner/d1"}}, "not-clinic-author"),
    ({"sender": None}, "no-sender"),
    ({"sender": {}}, "no-sender"),
    ({"recipient": None}, "internal-note"),
    ({"recipient": [{"reference": "Practitioner/d2"}]}, "internal-note"),
    ({"recipient": [{"reference": "Practitioner/d2"}, {"reference": "Patient/p1"}]}, None),
])
def test_what_is_sent_and_why_the_rest_is_not(changes: dict[str, Any], reason: str | None
                                             ) -> None:
    resource = {k: v for k, v in {**REPLY, **changes}.items() if v is not None}
    assert ignore_reason(resource, [SMS_SYSTEM, EMAIL_SYSTEM], REQUEST_SYSTEM,
                         ["ehr-bot"]) == reason


def test_request_id_is_one_per_communication_and_a_valid_request_id() -> None:
    from worker.ids import REQUEST_ID

    a, b = subscription_request_id("m1"), subscription_request_id("m2")
    assert a == subscription_request_id("m1") and a != b
    assert REQUEST_ID.fullmatch(subscription_request_id("x" * 64))


def test_the_installed_subscription_is_medplums_shape() -> None:
    sub = subscription_resource("https://sb.example.org/", "k3y")
    assert sub["criteria"] == CRITERIA == "Communication?part-of:missing=false&status=in-progress"
    assert sub["channel"] == {"type": "rest-hook", "payload": "application/fhir+json",
                              "endpoint": "https://sb.example.org/webhooks/fhir/subscription"}
    assert extension_value(sub, SECRET_EXTENSION) == "k3y"
    assert SECRET_EXTENSION == \
        "https://www.medplum.com/fhir/StructureDefinition/subscription-secret"
    assert extension_value(sub, INTERACTION_EXTENSION) == "create"
    assert INTERACTION_EXTENSION == \
        "https://medplum.com/fhir/StructureDefinition/subscription-supported-interaction"
    assert sub["status"] == "active"


# -- a re-queued run keeps what the deferral stored (issue 26, finding 1) --------------------

def test_a_deferred_subscription_run_keeps_its_reserved_slot_channel_and_attempts() -> None:
    first = subscription_request({"communication": "m1"})
    assert (first.communication_id, first.rate_slot, first.channel) == ("m1", None, None)
    assert first.request_id == subscription_request_id("m1")
    # What worker/broker/retry.py merges into the payload when the pipeline defers the send:
    again = subscription_request({"communication": "m1", "rate_slot": 1765000000.25,
                                  "channel": "email", "attempts": ["sms failed: x"],
                                  "deferrals": 1})
    assert again.rate_slot == 1765000000.25 and again.channel == "email"
    assert again.attempts == ("sms failed: x",)
    assert again.request_id == first.request_id  # one request state per Communication
    # This path sends only what FHIR holds, under its own request id.
    taken = subscription_request({"communication": "Communication/m1", "request_id": "mine",
                                  "resource": {"payload": [{"contentString": "x"}]}})
    assert taken.resource is None and taken.request_id == first.request_id


@pytest.mark.parametrize("payload", [
    None, [], {}, {"communication": 5}, {"communication": "../Patient/1"},
    {"communication": "Patient/p1"}, {"communication": "m1", "channel": "fax"},
])
def test_a_bad_subscription_payload_is_a_permanent_error(payload: Any) -> None:
    with pytest.raises(PermanentError) as err:
        subscription_request(payload)
    assert err.value.reason in ("invalid-payload", "invalid-reference")


def at(comm_id: str, second: float, **extra: Any) -> dict[str, Any]:
    """REPLY as written at `second` past 10:00:00 UTC (meta.lastUpdated)."""
    stamp = f"2026-12-07T10:00:{second:06.3f}Z"
    return {**REPLY, "id": comm_id, "meta": {**REPLY["meta"], "lastUpdated": stamp}, **extra}


T0 = 1796637600.0  # 2026-12-07T10:00:00Z


def test_a_reply_waits_for_the_earlier_unsent_replies_of_its_thread() -> None:
    systems = [SMS_SYSTEM, EMAIL_SYSTEM]
    thread = [at("c3", 3), at("c2", 2), at("c1", 1), at("h1", 0, partOf=None)]
    assert earlier_replies(at("c3", 3), thread, T0 + 4, systems, REQUEST_SYSTEM) == ["c2", "c1"]
    assert earlier_replies(at("c1", 1), thread, T0 + 4, systems, REQUEST_SYSTEM) == []
    # The same millisecond: the id decides, so exactly one of the two goes first.
    twins = [at("a", 1), at("b", 1)]
    assert earlier_replies(at("b", 1), twins, T0 + 2, systems, REQUEST_SYSTEM) == ["a"]
    assert earlier_replies(at("a", 1), twins, T0 + 2, systems, REQUEST_SYSTEM) == []
    # Not waited for: sent, not a reply to send, too old, or of unknown age.
    done = [at("s", 1, identifier=[sent_id(SMS_SYSTEM, "SM1"), sent_id(REQUEST_SYSTEM, "r")]),
            at("p", 1, sender={"reference": "Patient/p1"}),
            at("old", 1), {**REPLY, "id": "nometa"}]
    now = T0 + 1 + ORDER_WINDOW_SECONDS + 1
    late = {**at("c9", 2), "meta": {"lastUpdated": "2026-12-07T10:11:00Z"}}
    assert earlier_replies(late, done, now, systems, REQUEST_SYSTEM) == []
    assert earlier_replies({**REPLY, "id": "x"}, thread, T0, systems, REQUEST_SYSTEM) == []


def test_the_wait_for_earlier_replies_grows_with_age_within_bounds() -> None:
    assert order_wait(at("c1", 0), T0) == ORDER_WAIT_MIN
    assert order_wait(at("c1", 0), T0 + 8) == 2.0
    assert order_wait(at("c1", 0), T0 + 3600) == ORDER_WAIT_MAX
    assert order_wait({**REPLY, "meta": {"lastUpdated": "yesterday"}}, T0) == ORDER_WAIT_MIN
