"""Outbound rules as tables: channel choice, contacts, error classes, status mapping."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.channels import sendgrid, twilio
from worker.errors import PermanentError
from worker.outbound.routing import choose_channel, medium_channel, pick_contact
from worker.outbound.sending import OutboundRequest
from worker.outbound.status_map import next_status

NOW = datetime(2026, 11, 24, tzinfo=UTC)
PHONE = {"system": "phone", "value": "(555) 123-4567", "use": "home"}
MOBILE = {"system": "phone", "value": "+15559876543", "use": "mobile"}
EMAIL = {"system": "email", "value": "pat@example.org"}
ENDED = {"system": "phone", "value": "+15550000000", "use": "mobile",
         "period": {"end": "2020-01-01"}}


@pytest.mark.parametrize(("telecoms", "channel", "expected"), [
    ([PHONE, MOBILE], "sms", "+15559876543"),  # mobile preferred
    ([PHONE], "sms", "+15551234567"),  # normalised to E.164
    ([ENDED, PHONE], "sms", "+15551234567"),  # ended period skipped
    ([ENDED], "sms", None),
    ([{**MOBILE, "use": "old"}], "sms", None),
    ([{"system": "phone", "value": "call the front desk"}], "sms", None),
    ([PHONE, EMAIL], "email", "pat@example.org"),
    ([{**EMAIL, "rank": 2}, {"system": "email", "value": "first@example.org", "rank": 1}],
     "email", "first@example.org"),
    ([], "email", None),
])
def test_pick_contact(telecoms: list[dict[str, object]], channel: str, expected: str | None
                      ) -> None:
    assert pick_contact(telecoms, channel, NOW) == expected


@pytest.mark.parametrize(("forced", "reply", "telecoms", "expected"), [
    ("email", "sms", [PHONE, EMAIL], "email"),  # forced wins
    (None, "email", [PHONE, EMAIL], "email"),  # round trip: reply the way they wrote
    (None, "sms", [EMAIL], "email"),  # thread is SMS but no phone: seed rule
    (None, None, [PHONE, EMAIL], "sms"),  # seed rule: phone first
    (None, None, [EMAIL], "email"),
    (None, None, [], None),
])
def test_choose_channel(forced: str | None, reply: str | None,
                        telecoms: list[dict[str, object]], expected: str | None) -> None:
    assert choose_channel(forced, reply, telecoms) == expected


def test_medium_channel() -> None:
    sms = {"medium": [{"coding": [{"code": "SMSWRIT"}]}]}
    assert medium_channel(sms) == "sms"
    assert medium_channel({"medium": [{"coding": [{"code": "EMAILWRIT"}]}]}) == "email"
    assert medium_channel({}) is None and medium_channel(None) is None


@pytest.mark.parametrize(("status", "code", "kind", "retryable"), [
    (429, 20429, "throttled", True),
    (429, None, "throttled", True),
    (503, None, "provider-unavailable", True),
    (None, None, "provider-unavailable", True),
    (400, 30001, "provider-unavailable", True),
    (400, 21211, "invalid-recipient", False),
    (400, 21408, "rejected", False),
    (400, 21610, "opted-out", False),
    (400, 21612, "unreachable", False),
    (400, 21614, "unreachable", False),
    (400, 21635, "unreachable", False),
    (400, 30003, "unreachable", False),
    (400, 30006, "unreachable", False),
    (400, 30007, "rejected", False),
    (401, 20003, "misconfigured", False),
    (400, 99999, "rejected", False),
])
def test_twilio_error_table(status: int | None, code: int | None, kind: str, retryable: bool
                            ) -> None:
    err = twilio.classify_error(status, code, retry_after=2.0)
    assert (err.kind, err.retryable, err.provider_code) == (kind, retryable, code)


@pytest.mark.parametrize(("status", "body", "kind"), [
    (429, b"", "throttled"),
    (500, b"", "provider-unavailable"),
    (None, b"", "provider-unavailable"),
    (400, b'{"errors":[{"field":"personalizations.0.to.0.email"}]}', "invalid-recipient"),
    (400, b'{"errors":[{"field":"subject"}]}', "rejected"),
    (403, b"", "rejected"),
    (413, b"", "rejected"),
    (401, b"", "misconfigured"),
])
def test_sendgrid_error_table(status: int | None, body: bytes, kind: str) -> None:
    assert sendgrid.classify_error(status, body, {"Retry-After": "3"}).kind == kind


@pytest.mark.parametrize(("current", "provider", "expected"), [
    ("in-progress", "queued", None),  # no change
    ("in-progress", "sent", None),
    ("in-progress", "delivered", "completed"),
    ("in-progress", "read", "completed"),
    ("in-progress", "undelivered", "stopped"),
    ("in-progress", "failed", "stopped"),
    ("in-progress", "canceled", "stopped"),
    ("preparation", "sending", "in-progress"),
    ("completed", "sent", None),  # late callback never moves a final state
    ("completed", "failed", None),
    ("stopped", "delivered", None),
    ("in-progress", "something-new", None),
])
def test_status_mapping(current: str, provider: str, expected: str | None) -> None:
    assert next_status(current, provider) == expected


def test_outbound_payload_validation() -> None:
    req = OutboundRequest.from_payload({"request_id": "r1", "communication": "Communication/c1",
                                        "channel": "sms"})
    assert (req.communication_id, req.channel) == ("c1", "sms")
    for bad in ({"request_id": "r"}, {"communication": "Communication/x", "channel": "fax"}):
        with pytest.raises(PermanentError):
            OutboundRequest.from_payload(bad)
