"""Pure rules of SendGrid's Event Webhook and email threading, as tables."""

from __future__ import annotations

import base64
import json
import time

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support import DATA_KEY
from worker.channels.sendgrid import (
    EventBatchError,
    EventSignature,
    parse_event_batch,
    provider_message_id,
)
from worker.outbound.pipeline import reply_subject
from worker.outbound.status_map import (
    SENDGRID_TO_FHIR,
    next_status,
    sendgrid_event_kind,
    sendgrid_status_event,
)
from worker.settings import ConfigError, load_settings
from worker.stores.optouts import OptOuts


@pytest.mark.parametrize(("current", "event", "expected"), [
    ("in-progress", "processed", None),  # no change
    ("preparation", "processed", "in-progress"),
    ("in-progress", "deferred", None),
    ("in-progress", "delivered", "completed"),
    ("in-progress", "bounce", "stopped"),
    ("in-progress", "dropped", "stopped"),
    ("in-progress", "blocked", "stopped"),
    ("completed", "processed", None),  # out of order: final never moves back
    ("completed", "bounce", None),
    ("stopped", "delivered", None),
    ("in-progress", "open", None),  # engagement never moves a Communication
    ("in-progress", "spamreport", None),
    ("in-progress", "group_resubscribe", None),
])
def test_sendgrid_status_mapping(current: str, event: str, expected: str | None) -> None:
    assert next_status(current, event, SENDGRID_TO_FHIR) == expected


@pytest.mark.parametrize(("event", "kind"), [
    ("processed", "status"), ("delivered", "status"), ("bounce", "status"),
    ("spamreport", "opt-out"), ("unsubscribe", "opt-out"), ("group_unsubscribe", "opt-out"),
    ("open", "engagement"), ("click", "engagement"), ("group_resubscribe", "other"),
    ("machine_opened", "other"),
])
def test_sendgrid_event_kinds(event: str, kind: str) -> None:
    assert sendgrid_event_kind(event) == kind


def test_a_bounce_of_type_blocked_is_a_block() -> None:
    assert sendgrid_status_event("bounce", "blocked") == "blocked"
    assert sendgrid_status_event("bounce", "bounce") == "bounce"
    assert sendgrid_status_event("dropped", "blocked") == "dropped"


def test_provider_message_id_strips_the_per_recipient_suffix() -> None:
    assert provider_message_id("14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0") \
        == "14c5d75ce93"
    assert provider_message_id("euo2iKxdSayPF4YE4--I7A.recvd-5f54b5d587-pczjm-1-67BADEEA-6.0") \
        == "euo2iKxdSayPF4YE4--I7A"


def _event(**extra: object) -> dict[str, object]:
    return {"event": "delivered", "sg_event_id": "ZGVsaXZlcmVkLTAtMQ==", "timestamp": 1700000000,
            "sg_message_id": "abc.filter-1", "email": "a@example.org", **extra}


@pytest.mark.parametrize(("events", "error", "fields"), [
    ({"event": "delivered"}, "not-an-event-array", []),
    ([], "not-an-event-array", []),
    (["x"], "invalid-fields", ["0"]),
    ([_event(event="Delivered!")], "invalid-fields", ["0.event"]),
    ([_event(sg_event_id="")], "invalid-fields", ["0.sg_event_id"]),
    ([_event(sg_event_id="a b")], "invalid-fields", ["0.sg_event_id"]),
    ([_event(communication_id="../Patient/1")], "invalid-fields", ["0.communication_id"]),
    ([_event(communication_id="x" * 65)], "invalid-fields", ["0.communication_id"]),
    ([_event(request_id="a/b")], "invalid-fields", ["0.request_id"]),
    ([_event(email={"a": 1})], "invalid-fields", ["0.email"]),
    ([_event(timestamp="now")], "invalid-fields", ["0.timestamp"]),
    ([_event(timestamp=True)], "invalid-fields", ["0.timestamp"]),
    ([_event(), _event(sg_message_id="a\nb")], "invalid-fields", ["1.sg_message_id"]),
    ([_event()] * 5001, "too-many-events", []),
])
def test_event_batch_shapes(events: object, error: str, fields: list[str]) -> None:
    with pytest.raises(EventBatchError) as caught:
        parse_event_batch(json.dumps(events).encode())
    assert caught.value.reason == error
    assert caught.value.fields == fields


def test_event_batch_keeps_only_the_fields_we_use() -> None:
    (event,) = parse_event_batch(json.dumps([_event(
        communication_id="abc-1", request_id="r1", reason="x" * 5000, useragent="Mozilla",
        ip="192.0.2.1", category=["a"])]).encode())
    assert set(event) == {"event", "sg_event_id", "timestamp", "sg_message_id", "email",
                          "communication_id", "request_id", "reason"}
    assert len(event["reason"]) == 2000  # an SMTP answer is cut, not refused


@pytest.mark.parametrize("body", [b"[" * 100_000, b"{]", b"\xff"])
def test_event_batch_that_is_not_json(body: bytes) -> None:
    with pytest.raises(EventBatchError) as caught:
        parse_event_batch(body)
    assert caught.value.reason == "invalid-json"


def _keys() -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, base64.b64encode(public).decode()


def _sign(key: ec.EllipticCurvePrivateKey, stamp: str, body: bytes) -> str:
    return base64.b64encode(key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()


def test_event_signature_over_the_timestamp_and_the_raw_bytes() -> None:
    key, public = _keys()
    check = EventSignature(public).check
    body = json.dumps([_event(reason="Zoë\u2019s mailbox: 満杯")], ensure_ascii=False).encode()
    now = time.time()
    stamp = str(int(now))
    assert check(body, _sign(key, stamp, body), stamp, now) is None
    assert check(body + b" ", _sign(key, stamp, body), stamp, now) == "bad-signature"
    assert check(body, _sign(key, stamp, body), str(int(now) + 1), now) == "bad-signature"
    assert check(body, _sign(_keys()[0], stamp, body), stamp, now) == "bad-signature"
    assert check(body, None, stamp, now) == "bad-signature"
    assert check(body, "not base64!", stamp, now) == "bad-signature"
    assert check(body, base64.b64encode(b"not DER").decode(), stamp, now) == "bad-signature"
    assert check(body, _sign(key, stamp, body), " " + stamp, now) == "bad-signature"
    old = str(int(now) - 601)
    assert check(body, _sign(key, old, body), old, now) == "stale-timestamp"
    ahead = str(int(now) + 601)
    assert check(body, _sign(key, ahead, body), ahead, now) == "stale-timestamp"
    latin = b"[\xe9]"
    assert check(latin, _sign(key, stamp, latin), stamp, now) == "bad-signature"
    assert EventSignature("").check(body, _sign(key, stamp, body), stamp, now) \
        == "not-configured"


def test_event_signature_agrees_with_the_sdk_helper() -> None:
    """The issue names the sendgrid SDK's EventWebhook helper; the route uses the shared bytes
    check (worker/channels/sendgrid_signing.py). Both must accept and refuse the same batches."""
    from sendgrid.helpers.eventwebhook import EventWebhook

    key, public = _keys()
    ours, sdk = EventSignature(public), EventWebhook(public)
    now = time.time()
    stamp = str(int(now))
    body = json.dumps([_event(reason="Zoë \u2019 満杯")], ensure_ascii=False).encode()
    cases = [
        (body, _sign(key, stamp, body)),  # genuine
        (body + b" ", _sign(key, stamp, body)),  # tampered
        (body, _sign(_keys()[0], stamp, body)),  # forged
        (body.replace(b"delivered", b"bounce"), _sign(key, stamp, body)),
    ]
    for data, signature in cases:
        assert (ours.check(data, signature, stamp, now) is None) == \
            sdk.verify_signature(data.decode("utf-8"), signature, stamp)
    assert ours.check(*cases[0], stamp, now) is None


def test_verification_key_is_checked_at_start_up() -> None:
    base = {"REDIS_URL": "redis://127.0.0.1:6379/0", "FHIR_BASE_URL": "http://127.0.0.1/fhir/",
            "FHIR_CLIENT_ID": "c", "FHIR_CLIENT_SECRET": "s", "TWILIO_ACCOUNT_SID": "AC1",
            "TWILIO_AUTH_TOKEN": "t", "PUBLIC_BASE_URL": "https://sb.example.org",
            "DATA_ENCRYPTION_KEYS": DATA_KEY}
    _, public = _keys()
    wrapped = "\n".join(public[i:i + 64] for i in range(0, len(public), 64))
    assert load_settings({**base, "SENDGRID_EVENT_VERIFICATION_KEY": wrapped}
                         ).sendgrid_event_verification_key == public
    with pytest.raises(ConfigError) as caught:
        load_settings({**base, "SENDGRID_EVENT_VERIFICATION_KEY": "not-a-key"})
    assert "SENDGRID_EVENT_VERIFICATION_KEY" in str(caught.value)


@pytest.mark.parametrize(("topic", "subject"), [
    ("Your lab results", "Re: Your lab results"),
    ("Re: Your lab results", "Re: Your lab results"),
    ("RE: Fwd: re:Your lab results", "Re: Your lab results"),
    ("Fw: AW: SV: x", "Re: x"),
    ("Re: ", "Re: Message from your care team"),
    ("Results: ready", "Re: Results: ready"),
    # A topic with a line break (a decoded subject, a topic typed in the EHR) stays on one line.
    ("Hi\r\nBcc: all@example.org", "Re: Hi Bcc: all@example.org"),
    ("Re: Hi\nX-Evil: 1\x00\x85\u2028end", "Re: Hi X-Evil: 1 end"),
    ("\r\n", "Re: Message from your care team"),
])
def test_reply_subject(topic: str, subject: str) -> None:
    assert reply_subject(topic) == subject


def test_email_opt_outs_ignore_the_spelling_of_the_address() -> None:
    class FakeRedis:
        def __init__(self) -> None:
            self.members: set[str] = set()

        def sadd(self, _key: str, member: str) -> None:
            self.members.add(member)

        def sismember(self, _key: str, member: str) -> bool:
            return member in self.members

    optouts = OptOuts(FakeRedis(), b"k")  # type: ignore[arg-type]
    optouts.add("email", "Pat.Doe@Example.org ")
    assert optouts.has("email", "pat.doe@example.org")
    assert not optouts.has("sms", "pat.doe@example.org")
