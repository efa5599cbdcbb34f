"""The hostile review's findings, end to end against the real worker, FHIR and provider
sandboxes: each of these failed before the fix."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.conftest import Services
from tests.integration.test_inbound_sms import deliver, landed
from tests.integration.test_outbound import (
    AUTH,
    MOBILE,
    message_in_thread,
    outbound,
    patient,
    send,
    state,
)
from tests.support import ProviderSandbox, Sandbox, eventually, sms_params
from worker.broker.celery_app import QUEUE_OUTBOUND, TASK_OUTBOUND_SEND
from worker.broker.celery_app import create_celery as celery_for


def publish(svc: Any, payload: dict[str, Any]) -> None:
    """Send the documented outbound task directly, as another service may (no API checks)."""
    app = celery_for(svc.settings)
    app.send_task(TASK_OUTBOUND_SEND, args=[payload], queue=QUEUE_OUTBOUND)
    app.close()


def dead_letter(svc: Any, request_id: str) -> Any:
    def find() -> Any:
        return next((e for e in svc.dead_letters.list(1000)
                     if e.args and isinstance(e.args[0], dict)
                     and e.args[0].get("request_id") == request_id), None)
    return eventually(find, what=f"dead letter of {request_id}")


def test_a_poison_payload_is_refused_by_the_api_and_dead_lettered_once_by_the_worker(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox) -> None:
    providers.reset()
    svc = outbound(services, providers)
    deep: Any = "x"
    for _ in range(500):
        deep = [deep]
    pat = patient(sandbox)
    body = {"resourceType": "Communication", "payload": [{"contentString": "hi"}],
            "recipient": [{"reference": f"Patient/{pat['id']}"}], "extension": deep}
    resp = send(svc, body)
    assert resp.status_code == 422
    assert {f["field"] for f in resp.get_json()["fields"]} == {"extension"}
    # The same payload through the documented task: FHIR refuses the unknown element, the
    # message lands in the dead-letter store once, and the worker moves on.
    body.pop("extension")
    publish(svc, {"request_id": "poison-1", "resource": {**body, "extension": deep}})
    entry = dead_letter(svc, "poison-1")
    assert entry.reason == "fhir-400" and entry.failures == 1
    time.sleep(2.0)  # a loop would have redelivered it dozens of times by now
    assert svc.dead_letters.get(entry.id).failures == 1
    assert svc.redis.zcard("switchboard:inbox:index") == 0
    assert providers.requests() == []
    # The worker is alive and well: a normal send goes out.
    ok = send(svc, body, wait=20)
    assert ok.status_code == 200, ok.get_json()


def test_references_cannot_walk_out_of_what_they_name(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox) -> None:
    providers.reset()
    svc = outbound(services, providers)
    pat = patient(sandbox)
    doctor = sandbox.fhir.create({"resourceType": "Practitioner", "telecom": [
        {"system": "phone", "value": "+15559990000"}]}).resource
    # Stored by some other writer, a recipient that walks to the Practitioner.
    comm = message_in_thread(sandbox, pat, "SMSWRIT")
    walked = {**comm, "recipient": [{"reference": f"Patient/../Practitioner/{doctor['id']}"}]}
    sandbox.fhir.update(walked)
    publish(svc, {"request_id": "walk-1", "communication": f"Communication/{comm['id']}"})
    entry = dead_letter(svc, "walk-1")
    assert entry.reason == "invalid-reference"
    assert providers.requests() == []  # the Practitioner was never texted
    stored = sandbox.fhir.read("Communication", comm["id"]).resource
    assert stored["status"] == "stopped"
    assert stored["statusReason"]["coding"][0]["code"] == "invalid-reference"
    # Ids that are path segments never become requests at all.
    sandbox.reset_counter()
    for bad in ("..", ".", "Communication/../Patient/" + pat["id"]):
        request_id = f"walk-{len(bad)}-{bad.count('/')}"
        publish(svc, {"request_id": request_id, "communication": bad})
        assert dead_letter(svc, request_id).reason == "invalid-reference"
    assert sandbox.requests() == 0, sandbox.stats()


def test_only_our_own_sends_count_as_sent(services: Services, sandbox: Sandbox,
                                          providers: ProviderSandbox) -> None:
    providers.reset()
    svc = outbound(services, providers)
    pat = patient(sandbox)
    # A patient's own inbound message (it carries a Twilio SID): never echoed, never "sent".
    inbound = services.get(SMS_THREAD_STRATEGY="conversation")
    params = sms_params(MOBILE, "my own words")
    deliver(inbound, params)
    theirs = landed(sandbox, params["MessageSid"])
    resp = send(svc, {"communication": f"Communication/{theirs['id']}"}, wait=20)
    assert resp.status_code == 422 and resp.get_json()["error"] == "not-sendable"
    # A thread header: refused, and the thread is left as it was (it used to be `stopped`).
    header_id = theirs["partOf"][0]["reference"].split("/")[1]
    resp = send(svc, {"communication": f"Communication/{header_id}"}, wait=20)
    assert resp.status_code == 422 and resp.get_json()["error"] == "not-sendable"
    assert sandbox.fhir.read("Communication", header_id).resource["status"] == "in-progress"
    # A made-up SID on a reply proves nothing: the reply is really sent, once.
    reply = message_in_thread(sandbox, pat, "SMSWRIT")
    sandbox.fhir.update({**reply, "identifier": [
        {"system": svc.settings.message_id_system, "value": "SM" + "0" * 32}]})
    sent = send(svc, {"communication": f"Communication/{reply['id']}"}, wait=20)
    assert sent.status_code == 200 and sent.get_json()["provider_id"] != "SM" + "0" * 32
    assert [r["form"]["Body"] for r in providers.requests("twilio")] == \
        ["Your results are ready"]


def test_a_send_that_fails_before_the_provider_leaves_the_message_stopped(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox) -> None:
    providers.reset()
    svc = outbound(services, providers)
    missing = send(svc, {"resourceType": "Communication", "payload": [{"contentString": "x"}],
                         "recipient": [{"reference": "Patient/does-not-exist"}]}, wait=20)
    assert missing.status_code == 422, missing.get_json()
    nobody = send(svc, {"resourceType": "Communication", "payload": [{"contentString": "y"}]},
                  wait=20)
    assert nobody.status_code == 422 and nobody.get_json()["error"] == "no-recipient"
    for resp, code in ((missing, "fhir-404"), (nobody, "no-recipient")):
        request_id = resp.get_json()["id"]
        comm_id = state(svc, request_id, "failed")["communication"]
        comm = sandbox.fhir.read("Communication", comm_id).resource
        assert comm["status"] == "stopped", comm
        assert comm["statusReason"]["coding"][0]["code"] == code


def test_start_lifts_an_opt_out(services: Services, sandbox: Sandbox,
                                providers: ProviderSandbox) -> None:
    providers.reset()
    svc = outbound(services, providers, SMS_THREAD_STRATEGY="conversation")
    pat = patient(sandbox, email=None)
    # The patient had texted STOP: Twilio refuses with 21610 once.
    providers.fault(provider="twilio", to=MOBILE, status=400, twilio_code=21610, count=1)
    first = send(svc, {"communication": f"Communication/"
                                        f"{message_in_thread(sandbox, pat, 'SMSWRIT')['id']}"},
                 wait=20)
    assert first.get_json()["error"] == "opted-out"
    refused = send(svc, {"communication": f"Communication/"
                                          f"{message_in_thread(sandbox, pat, 'SMSWRIT')['id']}"},
                   wait=20)
    assert refused.get_json()["error"] == "opted-out"  # refused locally, no provider call
    assert len(providers.requests("twilio")) == 1
    start = sms_params(MOBILE, " Start ")
    deliver(svc, start)
    landed(sandbox, start["MessageSid"])  # the clinic sees it too
    eventually(lambda: "opt-in recorded" in "".join(w.output() for w in svc.all_workers),
               what="the opt-in applied")
    again = send(svc, {"communication": f"Communication/"
                                        f"{message_in_thread(sandbox, pat, 'SMSWRIT')['id']}"},
                 wait=20)
    assert again.status_code == 200, again.get_json()
    assert len(providers.requests("twilio")) == 2


def test_text_medplum_would_refuse_is_cleaned_not_dead_lettered(services: Services,
                                                                sandbox: Sandbox) -> None:
    svc = services.get(SMS_THREAD_STRATEGY="conversation")
    sandbox.patient(MOBILE)
    blank = sms_params(MOBILE, "\n", NumMedia="1",
                       MediaUrl0="https://api.twilio.com/2010-04-01/m/ME1",
                       MediaContentType0="image/jpeg")
    escape = sms_params(MOBILE, "Running late \x1b see you soon\ufeff")
    for params in (blank, escape):
        deliver(svc, params)
    photo = landed(sandbox, blank["MessageSid"])
    assert photo["payload"] == [{"contentAttachment": {
        "url": "https://api.twilio.com/2010-04-01/m/ME1", "contentType": "image/jpeg"}}]
    text = landed(sandbox, escape["MessageSid"])
    assert text["payload"] == [{"contentString": "Running late  see you soon"}]
    assert svc.dead_letters.count() == 0


def test_an_idempotency_key_makes_a_retry_the_same_request(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox) -> None:
    providers.reset()
    svc = outbound(services, providers)
    pat = patient(sandbox, email=None)
    body = {"resourceType": "Communication", "payload": [{"contentString": "once only"}],
            "recipient": [{"reference": f"Patient/{pat['id']}"}]}
    client = svc.app().test_client()
    headers = {**AUTH, "Idempotency-Key": "order-42:reminder", "Prefer": "wait=20"}
    first = client.post("/v1/messages", json=body, headers=headers)
    again = client.post("/v1/messages", json=body, headers=headers)
    assert first.status_code == again.status_code == 200, (first.json, again.json)
    assert first.get_json()["id"] == again.get_json()["id"]
    assert [r["form"]["Body"] for r in providers.requests("twilio")] == ["once only"]
    bad = client.post("/v1/messages", json=body, headers={**AUTH, "Idempotency-Key": "a b"})
    assert bad.status_code == 400
    # A path id that is not a request id is unknown, not a Redis type error (was a 500).
    assert client.get(f"/v1/messages/events:{first.get_json()['id']}",
                      headers=AUTH).status_code == 404


def test_an_idempotency_key_is_the_callers_and_bound_to_its_body(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox) -> None:
    """Issue 26, finding 10: the same key with another body is a 422 (it used to answer with
    the first request: another patient, other text, and nothing sent); the same body again,
    in any key order, is the same request; another API token's same key is its own request."""
    from tests.conftest import API_TOKEN, outbound_env

    providers.reset()
    svc = services.get(**outbound_env(providers, API_TOKENS=f"{API_TOKEN},other-caller"))
    a = patient(sandbox, phone="+15557770001", email=None)
    b = patient(sandbox, phone="+15557770002", email=None)

    def body(pat: dict[str, Any], text: str) -> dict[str, Any]:
        return {"resourceType": "Communication", "payload": [{"contentString": text}],
                "recipient": [{"reference": f"Patient/{pat['id']}"}]}

    client = svc.app().test_client()
    mine = {**AUTH, "Idempotency-Key": "visit-7", "Prefer": "wait=20"}
    first = client.post("/v1/messages", json=body(a, "for A"), headers=mine)
    assert first.status_code == 200, first.get_json()
    other = client.post("/v1/messages", json=body(b, "for B"), headers=mine)
    assert other.status_code == 422, other.get_json()
    assert other.get_json()["error"] == "idempotency-key-reused"
    reordered = json.dumps(dict(reversed(list(body(a, "for A").items()))), indent=2)
    again = client.post("/v1/messages", data=reordered, content_type="application/json",
                        headers=mine)
    assert again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]
    theirs = client.post("/v1/messages", json=body(b, "for B"), headers={
        **mine, "Authorization": "Bearer other-caller"})
    assert theirs.status_code == 200, theirs.get_json()
    assert theirs.get_json()["id"] != first.get_json()["id"]
    sent = [(r["form"]["To"], r["form"]["Body"]) for r in providers.requests("twilio")]
    assert sorted(sent) == [("+15557770001", "for A"), ("+15557770002", "for B")]
    shown = client.get(f"/v1/messages/{first.get_json()['id']}", headers=AUTH).get_json()
    assert "body_hash" not in shown and shown["status"] == "sent"


def test_an_email_attachment_goes_out_as_a_link(services: Services, sandbox: Sandbox,
                                                providers: ProviderSandbox) -> None:
    providers.reset()
    svc = outbound(services, providers)
    pat = patient(sandbox, phone=None)
    resp = send(svc, {"resourceType": "Communication", "channel": "email",
                      "recipient": [{"reference": f"Patient/{pat['id']}"}],
                      "payload": [{"contentAttachment": {
                          "url": "https://files.example.org/lab-results.pdf",
                          "contentType": "application/pdf", "title": "Your lab results"}}]},
                wait=20)
    assert resp.status_code == 200, resp.get_json()
    (mail,) = providers.requests("sendgrid")
    text = mail["json"]["content"][0]["value"]
    assert "https://files.example.org/lab-results.pdf" in text and "application/pdf" in text
