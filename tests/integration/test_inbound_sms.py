"""Inbound SMS end to end: signed webhook → Redis → real Celery worker → Medplum engine."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from tests.conftest import Services
from tests.support import CLINIC, Sandbox, eventually, new_sid, post_signed, sms_params
from worker.fhir.resources import PARTICIPATION_MODE

PATIENT = "+15551234567"


def deliver(service, params):  # type: ignore[no-untyped-def]
    """Post a signed webhook to the receiver and check it was accepted."""
    client = service.app().test_client()
    resp = post_signed(client, params)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert b"<Response>" in resp.data
    return resp


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
    eventually(lambda: svc.redis.llen("inbound") == 0, what="queue drained")
    assert len(sandbox.messages(params["MessageSid"])) == 1
    assert len(sandbox.headers()) == 1
    assert svc.dead_letters.count() == 0
