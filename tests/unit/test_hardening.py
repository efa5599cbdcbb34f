"""The hostile review's findings as rules: references, webhook field shapes, opt-out keywords,
what may be sent, payloads the dead-letter store must survive, keyed opt-out digests."""

from __future__ import annotations

import hashlib
from typing import Any

import fakeredis
import pytest

from tests.support import DATA_KEY
from tests.unit.test_fhir_client import FakeFhir, ok
from worker.channels.twilio import field_problems, opt_keyword
from worker.crypto import sealer_for
from worker.fhir.query import query_string, token
from worker.fhir.reference import InvalidReference, Ref, parse_reference
from worker.outbound.pipeline import unsendable
from worker.outbound.sending import OutboundRequest
from worker.stores.dead_letters import DeadLetterStore, quarantine, quarantined
from worker.stores.optouts import OptOuts

SID = "SM" + "0123456789abcdef" * 2


@pytest.mark.parametrize(("text", "expected", "parsed"), [
    ("Patient/p-1.2", None, Ref("Patient", "p-1.2")),
    ("Communication/" + "a" * 64, {"Communication"}, Ref("Communication", "a" * 64)),
])
def test_references_that_parse(text: str, expected: set[str] | None, parsed: Ref) -> None:
    assert parse_reference(text, expected) == parsed
    assert str(parsed) == text


@pytest.mark.parametrize(("text", "expected"), [
    ("Patient/../Practitioner/1", {"Patient"}),  # walked to another resource type
    ("Patient/../../../metadata", {"Patient"}),  # walked out of the FHIR base
    ("Communication/..", {"Communication"}),
    ("Communication/.", {"Communication"}),
    ("Practitioner/1", {"Patient"}),  # a valid reference of the wrong type
    ("Patient/" + "a" * 65, None),
    ("Patient/a b", None),
    ("Patient/a%2F..", None),
    ("Patient?phone=1", None),  # conditional references are ours to write, not to follow
    ("patient/1", None),
    ("https://evil.example/fhir/Patient/1", None),
    ("Patient/", None),
    ("", None),
    (None, None),
    (["Patient/1"], None),
])
def test_references_that_do_not(text: Any, expected: set[str] | None) -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference(text, expected)
    assert info.value.reason == "invalid-reference" and not info.value.retryable


@pytest.mark.parametrize(("call", "args"), [
    ("read", ("Patient", "..")),
    ("read", ("Patient", "../Practitioner/1")),
    ("read", ("../..", "x")),
    ("search", ("Communication/..", [("_count", "1")])),
    ("update", ({"resourceType": "Communication", "id": "."},)),
    ("create", ({"resourceType": "../Patient"},)),
])
def test_the_fhir_client_builds_urls_only_from_valid_parts(call: str, args: tuple[Any, ...]
                                                           ) -> None:
    fake = FakeFhir(ok)
    client = fake.client()
    with pytest.raises(InvalidReference):
        getattr(client, call)(*args)
    assert fake.fhir_requests() == []  # nothing left the process, no token sent anywhere


def test_task_payload_references_are_parsed() -> None:
    assert OutboundRequest.from_payload({"communication": "Communication/c1"}
                                        ).communication_id == "c1"
    assert OutboundRequest.from_payload({"communication": "c1"}).communication_id == "c1"
    for bad in ("..", ".", "Communication/..", "Patient/c1", "Communication/../Patient/1", 7):
        with pytest.raises(Exception) as info:
            OutboundRequest.from_payload({"communication": bad})
        assert getattr(info.value, "retryable", True) is False, bad
    with pytest.raises(Exception, match="request_id"):
        OutboundRequest.from_payload({"communication": "c1", "request_id": "x:y"})


def sms(**changes: str) -> dict[str, str]:
    base = {"MessageSid": SID, "AccountSid": "ACtest", "From": "+15551234567",
            "To": "+15557654321", "Body": "hi", "NumMedia": "0"}
    return {k: v for k, v in {**base, **changes}.items() if v != "<drop>"}


@pytest.mark.parametrize(("params", "problems"), [
    (sms(), []),
    (sms(To="12345"), []),  # a short code
    (sms(NumMedia="2", MediaUrl0="https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/"
         "Media/ME1", MediaUrl1="https://media.twiliocdn.com/x"), []),
    (sms(ConversationSid="CH" + "a" * 32), []),
    # The captured-webhook replay: NumMedia0 moved into MessageSid, NumMedia dropped.
    (sms(MessageSid=SID + "NumMedia0", NumMedia="<drop>"), ["MessageSid"]),
    (sms(MessageSid=SID + ",SM" + "1" * 32), ["MessageSid"]),
    (sms(MessageSid="SM123"), ["MessageSid"]),
    (sms(AccountSid="AC" + "f" * 32), ["AccountSid"]),
    (sms(AccountSid="<drop>"), ["AccountSid"]),
    (sms(From="javascript:alert(1)"), ["From"]),
    (sms(To="../../x"), ["To"]),
    (sms(NumMedia="11"), ["NumMedia"]),
    (sms(NumMedia="-1"), ["NumMedia"]),
    (sms(NumMedia="1", MediaUrl0="file:///etc/passwd"), ["MediaUrl0"]),
    (sms(NumMedia="1", MediaUrl0="javascript:alert(1)"), ["MediaUrl0"]),
    (sms(NumMedia="1", MediaUrl0="http://api.twilio.com/x"), ["MediaUrl0"]),
    (sms(NumMedia="1", MediaUrl0="https://api.twilio.com.evil.example/x"), ["MediaUrl0"]),
    (sms(NumMedia="1", MediaUrl0="https://user:pw@api.twilio.com/x"), ["MediaUrl0"]),
    (sms(NumMedia="0", MediaUrl0="https://api.twilio.com/x"), ["MediaUrl0 (beyond NumMedia)"]),
    (sms(ConversationSid="CH1,CH2"), ["ConversationSid"]),
    # Non-ASCII digits pass str.isdigit() and then crash int() (hostile review, 5a).
    (sms(NumMedia="²"), ["NumMedia"]),
    (sms(NumMedia="٣"), ["NumMedia"]),
    # A value re-split into a new name extending a known one (hostile review, 2): the replay
    # of `Body="Hi clinicFrom+15551234567Fromz"` as Body, From=<victim>, Fromz=...
    (sms(Body="Hi clinic", From="+15551234567", Fromz="From+15550001111"),
     ["Fromz (unknown parameter)"]),
    (sms(MessageSid2="x"), ["MessageSid2 (unknown parameter)"]),
    (sms(**{"From+1555": "x"}), ["From+1555 (unknown parameter)"]),
    (sms(FromCity="From+15550001111"), ["FromCity"]),
    (sms(SmsSid="SM" + "1" * 32), ["SmsSid"]),
    # The tail of the body cut into a new name sorting right after it (hostile review 3):
    # `Body="Cancel Friday appointment"` replayed as Body="Cancel ", Friday=" appointment".
    (sms(Body="Cancel ", Friday=" appointment please"), ["Friday (unknown parameter after Body)"]),
    (sms(Body="Yes please cancel. ", Dont=" do that"), ["Dont (unknown parameter after Body)"]),
    # Twilio adds parameters without notice: unknown names of its own form pass.
    (sms(ProfileName="Pat", ReferralCtwaClid="abc", FromCity="NASHUA", FromCountry="US",
         SmsSid=SID, SmsMessageSid=SID, ApiVersion="2010-04-01", NumSegments="1"), []),
])
def test_inbound_webhook_field_shapes(params: dict[str, str], problems: list[str]) -> None:
    assert field_problems("sms", params, "ACtest") == problems


def test_a_repeated_parameter_is_refused() -> None:
    """`From=victim&From=attacker` signs like `From` text moved out of the preceding value."""
    pairs = [*sms().items(), ("From", "+15550001111")]
    assert field_problems("sms", pairs, "ACtest") == ["From (repeated)"]


@pytest.mark.parametrize(("params", "problems"), [
    ({"MessageSid": SID, "AccountSid": "ACtest", "MessageStatus": "delivered"}, []),
    ({"MessageSid": SID, "AccountSid": "ACtest", "MessageStatus": "undelivered",
      "ErrorCode": "30003"}, []),
    ({"MessageSid": SID + ",x", "AccountSid": "ACtest", "MessageStatus": "sent"},
     ["MessageSid"]),
    ({"MessageSid": SID, "AccountSid": "ACtest", "MessageStatus": "owned"}, ["MessageStatus"]),
    ({"MessageSid": SID, "AccountSid": "ACtest", "MessageStatus": "failed",
      "ErrorCode": "1;2"}, ["ErrorCode"]),
    ({"MessageSid": SID, "AccountSid": "ACtest", "MessageStatus": "failed",
      "ErrorCode": "²"}, ["ErrorCode"]),
    ({"MessageSid": SID, "AccountSid": "ACtest", "MessageStatus": "sent",
      "From": "CLINIC"}, []),  # an alphanumeric sender id
])
def test_status_callback_field_shapes(params: dict[str, str], problems: list[str]) -> None:
    assert field_problems("status", params, "ACtest") == problems


def test_a_comma_in_a_token_value_is_escaped_not_an_or() -> None:
    assert token("sys", "SM1,SM2") == "sys|SM1\\,SM2"
    assert query_string([("identifier", token("sys", "a,b"))]) == "identifier=sys|a%5C,b"


@pytest.mark.parametrize(("body", "keyword"), [
    ("STOP", "opt-out"), (" stop\n", "opt-out"), ("Unsubscribe", "opt-out"),
    ("START", "opt-in"), ("unstop", "opt-in"), ("Yes", "opt-in"),
    ("stop texting me about the rash", None), ("yes please", None), ("", None),
])
def test_opt_keywords(body: str, keyword: str | None) -> None:
    assert opt_keyword(body) == keyword


REPLY = {"resourceType": "Communication", "partOf": [{"reference": "Communication/h"}],
         "recipient": [{"reference": "Patient/p"}], "payload": [{"contentString": "hi"}]}


@pytest.mark.parametrize(("comm", "refused"), [
    (REPLY, None),
    ({**REPLY, "partOf": None}, None),  # a standalone message with content is sendable
    ({**REPLY, "sender": {"reference": "Practitioner/d"}}, None),
    ({**REPLY, "payload": [{"contentAttachment": {"url": "https://x/y"}}]}, None),
    ({**REPLY, "sender": {"reference": "Patient/p"}}, "inbound message"),
    ({"resourceType": "Communication", "subject": {"reference": "Patient/p"}}, "thread header"),
    ({**REPLY, "payload": []}, "no payload"),
    ({**REPLY, "payload": "hi"}, "no payload"),
    ({**REPLY, "payload": [{"contentString": ""}]}, "no payload"),
])
def test_what_may_be_sent(comm: dict[str, Any], refused: str | None) -> None:
    why = unsendable(comm)
    assert (why is None) if refused is None else (refused in (why or ""))


def test_a_payload_500_lists_deep_is_stored_as_it_is() -> None:
    """The review's poison message: storable as JSON, but `dataclasses.asdict` (the old way of
    writing an entry) recursed past the limit, so the dead letter failed and the message
    looped forever."""
    deep: Any = "x"
    for _ in range(500):
        deep = [deep]
    store = DeadLetterStore(fakeredis.FakeRedis(), sealer_for(DATA_KEY))
    entry = store.record("switchboard.outbound.send", "outbound", [{"x": deep}], {},
                         "fhir-400", "unknown element", 1, task_id="t-1")
    assert entry.args == [{"x": deep}] and store.get(entry.id) == entry
    assert store.list() == [entry]


def test_a_payload_too_deep_to_store_still_makes_a_dead_letter() -> None:
    deep: Any = "x"
    for _ in range(5000):
        deep = [deep]
    store = DeadLetterStore(fakeredis.FakeRedis(), sealer_for(DATA_KEY))
    entry = store.record("switchboard.outbound.send", "outbound", [{"resource": deep}], {},
                         "unexpected-error", "RecursionError", 1, task_id="t-1")
    assert entry.args == [{"unstorable": "RecursionError", "task_id": "t-1"}]
    assert "payload not storable" in entry.detail
    assert store.get(entry.id) == entry  # stored, listed, replay-safe (nothing to replay)
    other = store.record("switchboard.outbound.send", "outbound", [{"resource": deep}], {},
                         "unexpected-error", "RecursionError", 1, task_id="t-2")
    assert other.id != entry.id and store.count() == 2  # one entry per message, not merged


def test_quarantine_keeps_a_minimal_record() -> None:
    client = fakeredis.FakeRedis()
    quarantine(client, "switchboard.inbound.sms", "t-9", "inbound", "delivery-loop", now=5.0)
    assert quarantined(client) == [{"task": "switchboard.inbound.sms", "task_id": "t-9",
                                    "queue": "inbound", "reason": "delivery-loop", "at": 5.0}]


def test_opt_outs_are_keyed_digests_and_old_bare_hashes_still_count() -> None:
    client = fakeredis.FakeRedis()
    optouts = OptOuts(client, b"secret-key")
    optouts.add("sms", "+15551234567")
    stored = {m.decode() for m in client.smembers(OptOuts.KEY)}
    bare = hashlib.sha256(b"sms:+15551234567").hexdigest()
    assert stored and bare[:32] not in stored  # not recomputable from the number alone
    assert optouts.has("sms", "+15551234567") and not optouts.has("sms", "+15550000000")
    assert not OptOuts(client, b"another-key").has("sms", "+15551234567")
    # An entry written before keys (bare SHA-256, 32 hex) is honoured, then moved.
    legacy = hashlib.sha256(b"sms:+15557777777").hexdigest()[:32]
    client.sadd(OptOuts.KEY, legacy)
    assert optouts.has("sms", "+15557777777")
    assert legacy.encode() not in set(client.smembers(OptOuts.KEY))
    assert optouts.remove("sms", "+15557777777") and not optouts.has("sms", "+15557777777")
