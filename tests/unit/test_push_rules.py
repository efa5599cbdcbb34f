"""Push rules without I/O: FCM error mapping (real v1 payloads), token shape, channel choice,
the Device shape, settings and log redaction."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import DATA_KEY
from worker.channels.fcm import classify_error, error_code_of, valid_token
from worker.fhir.devices import device_resource
from worker.ops.logs import redact
from worker.outbound.routing import choose_channel, medium_channel
from worker.settings import ConfigError, load_settings
from worker.stores.send_ledger import device_send

FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"


def fcm_body(code: int, status: str, error_code: str | None, message: str = "error",
             token_violation: bool = False) -> dict[str, Any]:
    """An FCM v1 error body as Google sends it."""
    details: list[dict[str, Any]] = []
    if error_code:
        details.append({"@type": FCM_ERROR, "errorCode": error_code})
    if token_violation:
        details.append({"@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": "message.token",
                                             "description": "Invalid registration token"}]})
    return {"error": {"code": code, "message": message, "status": status, "details": details}}


@pytest.mark.parametrize(("status", "body", "headers", "kind", "code", "retry_after"), [
    (404, fcm_body(404, "NOT_FOUND", "UNREGISTERED", "Requested entity was not found."), {},
     "invalid-recipient", "UNREGISTERED", None),
    (400, fcm_body(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                   "Request contains an invalid argument.", token_violation=True), {},
     "invalid-recipient", "INVALID_ARGUMENT", None),
    (400, fcm_body(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                   "The registration token is not a valid FCM registration token"), {},
     "invalid-recipient", "INVALID_ARGUMENT", None),
    # A payload too large is about the message, not the device.
    (400, fcm_body(400, "INVALID_ARGUMENT", None, "Request contains an invalid argument."), {},
     "rejected", "INVALID_ARGUMENT", None),
    (403, fcm_body(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch"), {},
     "invalid-recipient", "SENDER_ID_MISMATCH", None),
    (403, fcm_body(403, "PERMISSION_DENIED", None, "Permission denied"), {},
     "misconfigured", "PERMISSION_DENIED", None),
    (429, fcm_body(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"), {"Retry-After": "30"},
     "throttled", "QUOTA_EXCEEDED", 30.0),
    (503, fcm_body(503, "UNAVAILABLE", "UNAVAILABLE"), {}, "provider-unavailable",
     "UNAVAILABLE", None),
    (500, fcm_body(500, "INTERNAL", "INTERNAL", "Internal error encountered."), {},
     "provider-unavailable", "INTERNAL", None),
    (502, None, {}, "provider-unavailable", "UNAVAILABLE", None),  # Google's HTML 502 page
    (401, fcm_body(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR"), {}, "misconfigured",
     "THIRD_PARTY_AUTH_ERROR", None),
    (401, {"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "invalid"}}, {},
     "misconfigured", "UNAUTHENTICATED", None),
])
def test_fcm_errors_map_onto_the_closed_vocabulary(status: int, body: Any,
                                                   headers: dict[str, str], kind: str,
                                                   code: str, retry_after: float | None
                                                   ) -> None:
    err = classify_error(status, body, headers)
    assert (err.kind, error_code_of(err), err.retry_after) == (kind, code, retry_after)


@pytest.mark.parametrize(("token", "ok"), [
    ("dQw4w9WgXcQ:APA91bH" + "x" * 140, True),
    ("fcmtok-abc_def.123:456" * 3, True),
    ("short", False),
    ("+15551234567", False),
    ("has space" * 5, False),
    ('{"token": "x"}' * 3, False),
    ("a" * 4097, False),
])
def test_token_shape_is_checked(token: str, ok: bool) -> None:
    assert valid_token(token) is ok


def test_channel_choice_follows_the_order_and_the_thread() -> None:
    phone = [{"system": "phone", "value": "+15551112222", "use": "mobile"}]
    asked: list[bool] = []

    def ready() -> bool:
        asked.append(True)
        return True

    assert choose_channel(None, None, phone) == "sms"  # the seed's rule: push not listed
    assert choose_channel(None, None, phone, ("push", "sms"), ready) == "push"
    assert choose_channel(None, None, phone, ("push", "sms"), lambda: False) == "sms"
    assert choose_channel(None, None, [], ("sms", "email", "push"), ready) == "push"
    # A thread's medium wins over the order, without asking FHIR about devices.
    asked.clear()
    assert choose_channel(None, "sms", phone, ("push", "sms"), ready) == "sms" and not asked
    assert choose_channel("push", None, phone) == "push"
    assert medium_channel({"medium": [{"coding": [{"code": "ONLINEWRIT"}]}]}) == "push"


def test_device_shape_is_the_documented_one() -> None:
    assert device_resource("urn:switchboard:fcm-token", "tok", "Patient/1") == {
        "resourceType": "Device", "status": "active",
        "identifier": [{"system": "urn:switchboard:fcm-token", "value": "tok"}],
        "patient": {"reference": "Patient/1"},
        "type": {"text": "Push notification token (FCM)"}}
    assert device_send("c1", "d1") != device_send("c1", "d2") != "c1"


BASE = {"REDIS_URL": "redis://x", "FHIR_BASE_URL": "http://f/", "FHIR_CLIENT_ID": "a",
        "FHIR_CLIENT_SECRET": "b", "TWILIO_ACCOUNT_SID": "AC", "TWILIO_AUTH_TOKEN": "t",
        "PUBLIC_BASE_URL": "https://p", "DATA_ENCRYPTION_KEYS": DATA_KEY}


def test_push_settings() -> None:
    s = load_settings(BASE)
    assert s.channel_list() == ("sms", "email") and not s.push_include_body
    assert s.push_notification_title == "You have a new message"
    assert load_settings({**BASE, "CHANNEL_ORDER": " push, sms "}).channel_list() == (
        "push", "sms")
    assert load_settings({**BASE, "GOOGLE_APPLICATION_CREDENTIALS": "/g.json"}
                         ).fcm_credentials() == "/g.json"
    assert load_settings({**BASE, "GOOGLE_APPLICATION_CREDENTIALS": "/g.json",
                          "FCM_CREDENTIALS_FILE": "/f.json"}).fcm_credentials() == "/f.json"
    for bad in ("sms,sms", "fax", ""):
        with pytest.raises(ConfigError, match="CHANNEL_ORDER"):
            load_settings({**BASE, "CHANNEL_ORDER": bad})


def test_tokens_in_paths_are_redacted() -> None:
    line = '127.0.0.1 "DELETE /v1/devices/fcmtokabc:APA91bdef123456789 HTTP/1.1" 202'
    assert "fcmtok" not in redact(line) and "/v1/devices/[token]" in redact(line)
