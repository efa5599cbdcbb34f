"""Inbound SMS end to end: signed webhook → Redis → real Celery worker → Medplum engine."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from tests.conftest import Services
from tests.support import CLINIC, Sandbox, eventually, post_signed, sms_params
from worker.fhir.resources import PARTICIPATION_MODE

PATIENT = "+15551234567"


def deliver(service, params):  # type: ignore[no-untyped-def]
    """Post a signed webhook to the receiver and check it was accepted."""
    client = service.app().test_client()
    resp = post_signed(client, params)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert b"<Response>" in resp.data
    return resp


def processed(service, sid: str, times: int = 1) -> None:  # type: ignore[no-untyped-def]
    """Wait until the worker has finished `times` deliveries of `sid` (its log says so)."""
    marker = f"inbound {sid}: "
    eventually(lambda: service.worker.output().count(marker) >= times,
               what=f"{times} processed deliveries of {sid}")


def landed(sandbox: Sandbox, sid: str) -> dict:  # type: ignore[type-arg]
    """Wait for the message with this SID and return it (exactly one must exist)."""
    found = eventually(lambda: sandbox.messages(sid), what=f"message {sid}")
    assert len(found) == 1, found
    return found[0]


def test_conversation_strategy_threads_by_number_pair(services: Services, sandbox: Sandbox
                                                      ) -> None:
    svc = services.get(SMS_THREAD_STRATEGY="conversation")
    patient = sandbox.patient(PATIENT)
    first = sms_params(PATIENT, "first", MediaUrl0="https://api.twilio.com/m/1",
                       MediaContentType0="image/jpeg", NumMedia="1")
    deliver(svc, first)
    msg1 = landed(sandbox, first["MessageSid"])
    second = sms_params(PATIENT, "second")
    deliver(svc, second)
    msg2 = landed(sandbox, second["MessageSid"])

    assert msg1["partOf"] == msg2["partOf"]
    assert msg1["sender"]["reference"] == f"Patient/{patient['id']}"
    assert msg1["status"] == "in-progress"
    assert msg1["medium"][0]["coding"][0] == {"system": PARTICIPATION_MODE, "code": "SMSWRIT",
                                              "display": "SMS writing"}
    assert msg1["payload"] == [
        {"contentString": "first"},
        {"contentAttachment": {"url": "https://api.twilio.com/m/1", "contentType": "image/jpeg"}},
    ]
    assert msg1["sent"]
    headers = sandbox.headers()
    assert len(headers) == 1
    header = headers[0]
    assert msg1["partOf"][0]["reference"] == f"Communication/{header['id']}"
    assert header["subject"]["reference"] == f"Patient/{patient['id']}"
    assert header["identifier"][0]["value"] == f"sms:{PATIENT}:{CLINIC}"
    assert header["topic"]["text"] == "SMS conversation"
    assert header["medium"][0]["coding"][0]["code"] == "SMSWRIT"

    # Another clinic number is another conversation.
    other = sms_params(PATIENT, "to the other line", to="+15550001111")
    deliver(svc, other)
    assert landed(sandbox, other["MessageSid"])["partOf"] != msg1["partOf"]
    assert len(sandbox.headers()) == 2


@pytest.mark.parametrize("strategy", ["conversation", "active-thread", "new-thread"])
def test_same_message_five_times_at_once_is_written_once(
        services: Services, sandbox: Sandbox, strategy: str) -> None:
    svc = services.get(SMS_THREAD_STRATEGY=strategy)
    sandbox.patient(PATIENT)
    params = sms_params(PATIENT, "only once")
    app = svc.app()
    with cf.ThreadPoolExecutor(5) as pool:
        codes = list(pool.map(lambda _: post_signed(app.test_client(), params).status_code,
                              range(5)))
    assert codes == [200] * 5
    landed(sandbox, params["MessageSid"])
    # Redelivered a little later, after the first copies were processed.
    deliver(svc, params)
    processed(svc, params["MessageSid"], times=6)
    assert len(sandbox.messages(params["MessageSid"])) == 1
    assert len(sandbox.headers()) == 1
    assert svc.dead_letters.count() == 0


def test_conversation_sid_is_the_thread_key(services: Services, sandbox: Sandbox) -> None:
    svc = services.get(SMS_THREAD_STRATEGY="conversation")
    sandbox.patient(PATIENT)
    conversation = "CH0123456789abcdef0123456789abcdef"
    a = sms_params(PATIENT, "in a conversation", ConversationSid=conversation)
    b = sms_params(PATIENT, "same conversation, other line", to="+15550001111",
                   ConversationSid=conversation)
    deliver(svc, a)
    deliver(svc, b)
    assert landed(sandbox, a["MessageSid"])["partOf"] == landed(sandbox, b["MessageSid"])["partOf"]
    (header,) = sandbox.headers()
    assert header["identifier"][0]["value"] == conversation


def test_active_thread_joins_the_open_thread_until_it_is_closed(
        services: Services, sandbox: Sandbox) -> None:
    svc = services.get(SMS_THREAD_STRATEGY="active-thread")
    patient = sandbox.patient(PATIENT)
    first, second = sms_params(PATIENT, "one"), sms_params(PATIENT, "two")
    deliver(svc, first)
    m1 = landed(sandbox, first["MessageSid"])
    deliver(svc, second)
    m2 = landed(sandbox, second["MessageSid"])
    assert m1["partOf"] == m2["partOf"]
    (header,) = sandbox.headers()
    assert header["subject"]["reference"] == f"Patient/{patient['id']}"

    # A clinician closes the thread: the next message opens a new one.
    sandbox.fhir.update({**header, "status": "completed"})
    third = sms_params(PATIENT, "three")
    deliver(svc, third)
    m3 = landed(sandbox, third["MessageSid"])
    assert m3["partOf"] != m1["partOf"]
    assert len(sandbox.headers()) == 2


def test_new_thread_strategy_opens_a_thread_per_message(services: Services, sandbox: Sandbox
                                                        ) -> None:
    svc = services.get(SMS_THREAD_STRATEGY="new-thread")
    sandbox.patient(PATIENT)
    a, b = sms_params(PATIENT, "a"), sms_params(PATIENT, "b")
    deliver(svc, a)
    deliver(svc, b)
    assert landed(sandbox, a["MessageSid"])["partOf"] != landed(sandbox, b["MessageSid"])["partOf"]
    assert len(sandbox.headers()) == 2


@pytest.mark.parametrize("stored", ["(555) 123-4567", "555-123-4567", "15551234567",
                                    "+1 555-123-4567"])
def test_sender_found_when_phone_is_stored_in_another_format(
        services: Services, sandbox: Sandbox, stored: str) -> None:
    svc = services.get(SMS_THREAD_STRATEGY="conversation")
    patient = sandbox.patient(PATIENT, fmt=stored)
    params = sms_params(PATIENT, "hi")
    deliver(svc, params)
    assert landed(sandbox, params["MessageSid"])["sender"]["reference"] == \
        f"Patient/{patient['id']}"


@pytest.mark.parametrize("strategy", ["conversation", "active-thread", "new-thread"])
def test_unknown_sender_rejected_goes_to_dead_letter(services: Services, sandbox: Sandbox,
                                                     strategy: str) -> None:
    svc = services.get(SMS_THREAD_STRATEGY=strategy, UNKNOWN_SENDER_POLICY="reject")
    params = sms_params("+15559990000", "who am I")
    deliver(svc, params)
    entry = eventually(lambda: svc.dead_letters.list(), what="dead letter")[0]
    assert entry.reason == "unknown-sender"
    assert entry.task == "switchboard.inbound.sms"
    assert entry.args[0]["MessageSid"] == params["MessageSid"]
    assert entry.attempts == 1
    assert sandbox.all("Communication") == []
    assert sandbox.all("Patient") == []


def test_a_finished_message_leaves_no_inbox_entry_and_no_delivery_count(
        services: Services, sandbox: Sandbox) -> None:
    svc = services.get(UNKNOWN_SENDER_POLICY="reject")
    sandbox.patient(PATIENT)
    written, refused = sms_params(PATIENT, "hello"), sms_params("+15559990000", "who am I")
    deliver(svc, written)
    deliver(svc, refused)
    landed(sandbox, written["MessageSid"])
    eventually(lambda: svc.dead_letters.list(), what="dead letter")
    # Written or dead-lettered: the inbox entry and the crash-loop count went with it.
    eventually(lambda: not svc.redis.hlen("switchboard:inbox:entries")
               and not svc.redis.keys("switchboard:deliveries:*"),
               what="inbox and delivery counts empty")


@pytest.mark.parametrize("strategy", ["conversation", "active-thread", "new-thread"])
def test_unknown_sender_gets_a_patient_under_create_patient(
        services: Services, sandbox: Sandbox, strategy: str) -> None:
    svc = services.get(SMS_THREAD_STRATEGY=strategy, UNKNOWN_SENDER_POLICY="create-patient")
    params = sms_params("+15559990000", "new here")
    deliver(svc, params)
    msg = landed(sandbox, params["MessageSid"])
    (patient,) = sandbox.all("Patient")
    assert patient["telecom"] == [{"system": "phone", "value": "+15559990000", "use": "mobile"}]
    assert msg["sender"]["reference"] == f"Patient/{patient['id']}"
    assert svc.dead_letters.count() == 0


@pytest.mark.parametrize("strategy", ["conversation", "active-thread"])
def test_two_first_messages_from_a_new_patient_make_one_patient_and_one_thread(
        services: Services, sandbox: Sandbox, strategy: str) -> None:
    svc = services.get(SMS_THREAD_STRATEGY=strategy, UNKNOWN_SENDER_POLICY="create-patient")
    a, b = sms_params("+15558887777", "first!"), sms_params("+15558887777", "second!")
    app = svc.app()
    with cf.ThreadPoolExecutor(2) as pool:
        assert [r.status_code for r in pool.map(
            lambda p: post_signed(app.test_client(), p), [a, b])] == [200, 200]
    ma, mb = landed(sandbox, a["MessageSid"]), landed(sandbox, b["MessageSid"])
    assert ma["partOf"] == mb["partOf"]
    assert len(sandbox.all("Patient")) == 1
    assert len(sandbox.headers()) == 1


def test_forged_or_unsigned_webhooks_get_403_and_enqueue_nothing(services: Services) -> None:
    svc = services.get(worker=False)
    client = svc.app().test_client()
    params = sms_params(PATIENT, "forged")
    unsigned = client.post("/webhooks/twilio/sms", data=params)
    wrong = client.post("/webhooks/twilio/sms", data=params,
                        headers={"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"})
    from tests.support import sign

    tampered_sig = sign(params)
    tampered = client.post("/webhooks/twilio/sms", data={**params, "Body": "changed"},
                           headers={"X-Twilio-Signature": tampered_sig})
    other_path = client.post("/webhooks/twilio/sms?x=1", data=params,
                             headers={"X-Twilio-Signature": tampered_sig})
    for resp in (unsigned, wrong, tampered, other_path):
        assert resp.status_code == 403
        assert resp.get_json()["error"] == "bad-signature"
    assert svc.redis.llen("inbound") == 0


def test_missing_fields_get_400_with_the_reason(services: Services) -> None:
    svc = services.get(worker=False)
    client = svc.app().test_client()
    params = sms_params(PATIENT, "no sid")
    del params["MessageSid"]
    params["From"] = ""
    resp = post_signed(client, params)
    assert resp.status_code == 400
    assert resp.get_json()["fields"] == ["MessageSid", "From"]
    assert svc.redis.llen("inbound") == 0
    ok = post_signed(client, sms_params(PATIENT, "fine"))
    assert ok.status_code == 200
    assert svc.redis.llen("inbound") == 1
    svc.redis.delete("inbound")


# Faults hit the worker's writes (POST) only, so the test's own lookups are not affected.
@pytest.mark.parametrize("fault", [
    {"status": 503, "count": 3, "method": "POST"},
    {"status": 429, "count": 2, "retry_after_seconds": 1, "method": "POST"},
    {"delay_ms": 6000, "count": 1, "method": "POST"},  # longer than the client's timeout
])
def test_transient_fhir_failures_are_retried_until_the_message_lands(
        services: Services, sandbox: Sandbox, fault: dict) -> None:  # type: ignore[type-arg]
    svc = services.get(SMS_THREAD_STRATEGY="conversation", FHIR_TIMEOUT_SECONDS="3")
    sandbox.patient(PATIENT)
    sandbox.fault(**fault)
    params = sms_params(PATIENT, "through the outage")
    deliver(svc, params)
    landed(sandbox, params["MessageSid"])
    assert svc.dead_letters.count() == 0


def test_fhir_400_goes_to_dead_letter_with_the_operation_outcome(
        services: Services, sandbox: Sandbox) -> None:
    svc = services.get(SMS_THREAD_STRATEGY="conversation")
    sandbox.patient(PATIENT)
    # A media URL with a space is not a valid FHIR url: the server's validator answers 400.
    params = sms_params(PATIENT, "bad media", NumMedia="1",
                        MediaUrl0="https://api.twilio.com/media 1", MediaContentType0="image/png")
    deliver(svc, params)
    entry = eventually(lambda: svc.dead_letters.list(), what="dead letter")[0]
    assert entry.reason == "fhir-400"
    assert "contentAttachment.url" in entry.detail or "url" in entry.detail.lower()
    assert sandbox.messages(params["MessageSid"]) == []


def test_exhausted_retries_go_to_dead_letter(services: Services, sandbox: Sandbox) -> None:
    svc = services.get(SMS_THREAD_STRATEGY="conversation")
    sandbox.patient(PATIENT)
    sandbox.fault(status=503, count=100, method="POST")
    params = sms_params(PATIENT, "never lands")
    deliver(svc, params)
    entry = eventually(lambda: svc.dead_letters.list(), what="dead letter")[0]
    assert entry.reason == "retries-exhausted"
    assert entry.detail.startswith("fhir-unavailable")
    assert entry.attempts == 5


@pytest.mark.parametrize(("strategy", "first", "next_", "duplicate"), [
    ("conversation", 3, 1, 0),  # first: create fails (no header), header, create again
    ("active-thread", 2, 2, 0),  # search + transaction, then search + create
    ("new-thread", 1, 1, 0),  # one transaction each
])
def test_fhir_round_trips_per_message(services: Services, sandbox: Sandbox, strategy: str,
                                      first: int, next_: int, duplicate: int) -> None:
    svc = services.get(SMS_THREAD_STRATEGY=strategy)
    sandbox.patient(PATIENT)
    counts = []
    a, b = sms_params(PATIENT, "a"), sms_params(PATIENT, "b")
    for n, params in enumerate((a, b, b)):
        sandbox.reset_counter()
        deliver(svc, params)
        processed(svc, params["MessageSid"], times=2 if n == 2 else 1)
        counts.append(sandbox.requests())
    assert counts == [first, next_, duplicate]
    landed(sandbox, a["MessageSid"])
    landed(sandbox, b["MessageSid"])
