"""Outbound end to end: API → Redis → real worker → FHIR sandbox + provider sandbox (real SDKs)."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import redis

from tests.conftest import API_TOKEN, CLINIC_SMS, Service, Services, outbound_env
from tests.support import ProviderSandbox, Sandbox, eventually, our_logs, post_signed
from worker.broker.celery_app import TASK_OUTBOUND_SEND
from worker.ops import devstack
from worker.stores.send_ledger import SendLedger

MOBILE = "+15551112222"
EMAIL = "pat@example.org"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture()
def providers_clean(providers: ProviderSandbox) -> ProviderSandbox:
    """The provider sandbox, emptied for this test."""
    providers.reset()
    return providers


def patient(sandbox: Sandbox, phone: str | None = MOBILE, email: str | None = EMAIL
            ) -> dict[str, Any]:
    telecom = []
    if phone:
        telecom.append({"system": "phone", "value": phone, "use": "mobile"})
    if email:
        telecom.append({"system": "email", "value": email})
    return sandbox.fhir.create({"resourceType": "Patient", "telecom": telecom}).resource


def message_in_thread(sandbox: Sandbox, pat: dict[str, Any], medium: str | None = None,
                      text: str = "Your results are ready") -> dict[str, Any]:
    """A clinician's reply: a child Communication in a thread header of `medium`."""
    header: dict[str, Any] = {"resourceType": "Communication", "status": "in-progress",
                              "subject": {"reference": f"Patient/{pat['id']}"},
                              "topic": {"text": "Results"}}
    if medium:
        header["medium"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                         "v3-ParticipationMode", "code": medium}]}]
    h = sandbox.fhir.create(header).resource
    return sandbox.fhir.create({
        "resourceType": "Communication", "status": "in-progress",
        "partOf": [{"reference": f"Communication/{h['id']}"}],
        "recipient": [{"reference": f"Patient/{pat['id']}"}],
        "payload": [{"contentString": text}]}).resource


def recorded(sandbox: Sandbox, comm_id: str, system: str) -> dict[str, Any]:
    """The Communication once the provider id is written on it. The API reports `sent` as
    soon as the provider accepts, a moment before the FHIR write, so tests wait for it."""
    def check() -> dict[str, Any] | None:
        comm = sandbox.fhir.read("Communication", comm_id).resource
        return comm if any(i.get("system") == system for i in comm.get("identifier") or [])\
            else None

    return eventually(check, what=f"provider id recorded on Communication/{comm_id}")


def send(svc: Service, body: dict[str, Any], wait: int | None = None) -> Any:
    headers = dict(AUTH)
    if wait is not None:
        headers["Prefer"] = f"wait={wait}"
    return svc.app().test_client().post("/v1/messages", json=body, headers=headers)


def state(svc: Service, request_id: str, *statuses: str) -> dict[str, Any]:
    client = svc.app().test_client()

    def check() -> dict[str, Any] | None:
        body = client.get(f"/v1/messages/{request_id}", headers=AUTH).get_json()
        return body if body.get("status") in statuses else None

    return eventually(check, timeout=30, what=f"request {request_id} in {statuses}")


def outbound(services: Services, providers: ProviderSandbox, **overrides: str) -> Service:
    return services.get(**outbound_env(providers, **overrides))


def test_sms_reply_goes_out_once_and_is_recorded(services: Services, sandbox: Sandbox,
                                                 providers_clean: ProviderSandbox) -> None:
    svc = outbound(services, providers_clean)
    pat = patient(sandbox)
    comm = message_in_thread(sandbox, pat, "SMSWRIT")
    resp = send(svc, {"communication": f"Communication/{comm['id']}"})
    assert resp.status_code == 202
    body = resp.get_json()
    assert body["status_url"] == f"/v1/messages/{body['id']}"
    done = state(svc, body["id"], "sent")
    (req,) = providers_clean.requests("twilio")
    assert req["form"]["To"] == MOBILE and req["form"]["From"] == CLINIC_SMS
    assert req["form"]["Body"] == "Your results are ready"
    assert req["form"]["StatusCallback"] == "https://switchboard.test/webhooks/twilio/status"
    stored = recorded(sandbox, comm["id"], svc.settings.message_id_system)
    sids = [i["value"] for i in stored["identifier"]
            if i["system"] == svc.settings.message_id_system]
    assert sids == [done["provider_id"]]
    assert stored["medium"][0]["coding"][0]["code"] == "SMSWRIT"
    # Asking again does not send again.
    again = send(svc, {"communication": f"Communication/{comm['id']}"}, wait=10)
    assert again.status_code == 200 and again.get_json()["provider_id"] == done["provider_id"]
    assert len(providers_clean.requests("twilio")) == 1


def test_the_api_sends_a_thread_message_only_to_the_threads_patient(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    """Issue 26, finding 8, the API path: a message in B's thread naming A as recipient is
    refused (and marked so), never sent to A; the thread's own patient still gets theirs."""
    svc = outbound(services, providers_clean)
    a, b = patient(sandbox, phone="+15556660011"), patient(sandbox, phone="+15556660012")
    in_b = message_in_thread(sandbox, b, "SMSWRIT")
    header = in_b["partOf"][0]
    resp = send(svc, {"resourceType": "Communication", "status": "in-progress",
                      "partOf": [header], "recipient": [{"reference": f"Patient/{a['id']}"}],
                      "payload": [{"contentString": "meant for B"}]}, wait=20)
    body = resp.get_json()
    assert body["status"] == "failed" and body["error"] == "recipient-not-in-thread", body
    stored = sandbox.fhir.read("Communication", body["communication"]).resource
    assert stored["status"] == "stopped"
    ok = send(svc, {"communication": f"Communication/{in_b['id']}"}, wait=20)
    assert ok.get_json()["status"] == "sent", ok.get_json()
    assert [r["form"]["To"] for r in providers_clean.requests("twilio")] == ["+15556660012"]


def test_email_from_a_posted_resource(services: Services, sandbox: Sandbox,
                                      providers_clean: ProviderSandbox) -> None:
    svc = outbound(services, providers_clean)
    pat = patient(sandbox, phone=None)
    resp = send(svc, {"resourceType": "Communication", "status": "in-progress",
                      "recipient": [{"reference": f"Patient/{pat['id']}"}],
                      "topic": {"text": "Appointment"},
                      "payload": [{"contentString": "See you Tuesday"}]}, wait=20)
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["channel"] == "email"
    (req,) = providers_clean.requests("sendgrid")
    mail = req["json"]
    assert mail["personalizations"][0]["to"][0]["email"] == EMAIL
    assert mail["subject"] == "Appointment"
    assert mail["headers"]["Message-ID"] == body["message_id"]
    comm_id = body["communication"]
    assert mail["custom_args"] == {"communication_id": comm_id, "request_id": body["id"]}
    stored = recorded(sandbox, comm_id, svc.settings.email_message_id_system)
    systems = {i["system"]: i["value"] for i in stored["identifier"]}
    assert systems[svc.settings.email_message_id_system] == body["provider_id"]
    assert systems[svc.settings.outbound_request_system] == body["id"]


@pytest.mark.parametrize(("medium", "provider"), [("SMSWRIT", "twilio"),
                                                  ("EMAILWRIT", "sendgrid")])
def test_round_trip_replies_on_the_thread_medium(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox, medium: str,
        provider: str) -> None:
    svc = outbound(services, providers_clean)
    comm = message_in_thread(sandbox, patient(sandbox), medium)
    resp = send(svc, {"communication": f"Communication/{comm['id']}"}, wait=20)
    assert resp.status_code == 200
    assert len(providers_clean.requests(provider)) == 1
    assert len(providers_clean.requests()) == 1


def test_invalid_number_is_permanent_and_reported_while_waiting(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = outbound(services, providers_clean)
    comm = message_in_thread(sandbox, patient(sandbox), "SMSWRIT")
    providers_clean.fault(provider="twilio", to=MOBILE, status=400, twilio_code=21211)
    resp = send(svc, {"communication": f"Communication/{comm['id']}"}, wait=20)
    assert resp.status_code == 422
    body = resp.get_json()
    assert body["error"] == "invalid-recipient" and body["provider_code"] == 21211
    stored = sandbox.fhir.read("Communication", comm["id"]).resource
    assert stored["status"] == "stopped"
    assert stored["statusReason"]["coding"][0]["code"] == "invalid-recipient"
    entry = eventually(lambda: svc.dead_letters.list(), what="dead letter")[0]
    assert entry.reason == "invalid-recipient" and entry.task == "switchboard.outbound.send"
    assert len(providers_clean.requests("twilio")) == 1  # not retried


def test_opt_out_is_recorded_and_later_sends_are_refused_locally(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = outbound(services, providers_clean)
    pat = patient(sandbox, phone="+15553334444")
    providers_clean.fault(provider="twilio", to="+15553334444", status=400, twilio_code=21610)
    first = send(svc, {"communication": f"Communication/{message_in_thread(sandbox, pat)['id']}",
                       "channel": "sms"}, wait=20)
    assert first.status_code == 422 and first.get_json()["error"] == "opted-out"
    second = send(svc, {"communication":
                        f"Communication/{message_in_thread(sandbox, pat)['id']}",
                        "channel": "sms"}, wait=20)
    assert second.status_code == 422 and second.get_json()["error"] == "opted-out"
    assert len(providers_clean.requests("twilio", to="+15553334444")) == 1


@pytest.mark.parametrize(("fault", "calls"), [
    ({"status": 429, "twilio_code": 20429, "retry_after": 1, "count": 1}, 2),
    ({"status": 503, "count": 3}, 4),
])
def test_transient_provider_errors_retry_until_sent_once(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox,
        fault: dict[str, Any], calls: int) -> None:
    svc = outbound(services, providers_clean)
    comm = message_in_thread(sandbox, patient(sandbox), "SMSWRIT")
    providers_clean.fault(provider="twilio", to=MOBILE, **fault)
    resp = send(svc, {"communication": f"Communication/{comm['id']}"})
    state(svc, resp.get_json()["id"], "sent")
    reqs = providers_clean.requests("twilio")
    answered = [r["answered"] for r in reqs]
    assert len(answered) == calls and answered[-1] == 201
    assert svc.dead_letters.count() == 0
    if "retry_after" in fault:
        # Our own backoff here starts at 0.1-0.2 s; the provider asked for 1 s.
        assert reqs[1]["at"] - reqs[0]["at"] >= 0.95


def test_throttling_is_reported_to_a_waiting_caller(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = outbound(services, providers_clean)
    comm = message_in_thread(sandbox, patient(sandbox), "SMSWRIT")
    providers_clean.fault(provider="twilio", to=MOBILE, status=429, twilio_code=20429,
                          retry_after=1, count=1)
    resp = send(svc, {"communication": f"Communication/{comm['id']}"}, wait=20)
    assert resp.status_code == 429 and resp.get_json()["error"] == "throttled"
    state(svc, resp.get_json()["id"], "sent")  # and it still goes out


def test_status_callbacks_in_order_out_of_order_and_duplicated(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = outbound(services, providers_clean)
    client = svc.app().test_client()
    comms = [message_in_thread(sandbox, patient(sandbox), "SMSWRIT") for _ in range(2)]
    sids = []
    for comm in comms:
        resp = send(svc, {"communication": f"Communication/{comm['id']}"}, wait=20)
        sids.append(resp.get_json()["provider_id"])

    def callback(sid: str, status: str, **extra: str) -> None:
        params = {"MessageSid": sid, "MessageStatus": status, "AccountSid": "ACtest", **extra}
        assert post_signed(client, params, "/webhooks/twilio/status").status_code == 200

    def status_of(comm: dict[str, Any]) -> str:
        return str(sandbox.fhir.read("Communication", comm["id"]).resource["status"])

    # In order, with a duplicate: sent, delivered, delivered.
    for s in ("sent", "delivered", "delivered"):
        callback(sids[0], s)
    eventually(lambda: status_of(comms[0]) == "completed", what="delivered → completed")
    # Out of order: undelivered arrives, then a late "sent" and "delivered": stays stopped.
    callback(sids[1], "undelivered", ErrorCode="30003")
    eventually(lambda: status_of(comms[1]) == "stopped", what="undelivered → stopped")
    callback(sids[1], "sent")
    callback(sids[1], "delivered")
    callback(sids[0], "failed", ErrorCode="30005")
    marker = f"status {sids[1]}: "
    eventually(lambda: sum(w.output().count(marker) for w in svc.all_workers) >= 3,
               what="late callbacks processed")
    eventually(lambda: sum(w.output().count(f"status {sids[0]}: ") for w in svc.all_workers)
               >= 4, what="all callbacks processed")
    assert status_of(comms[0]) == "completed"
    stored = sandbox.fhir.read("Communication", comms[1]["id"]).resource
    assert stored["status"] == "stopped"
    assert stored["statusReason"]["coding"] == [
        {"system": "https://www.twilio.com/docs/api/errors", "code": "30003"}]
    # Unsigned callbacks are refused.
    assert client.post("/webhooks/twilio/status",
                       data={"MessageSid": sids[0], "MessageStatus": "failed"}
                       ).status_code == 403


def test_api_refuses_bad_bodies_and_missing_tokens(services: Services,
                                                   providers: ProviderSandbox) -> None:
    svc = services.get(worker=False, **outbound_env(providers))
    client = svc.app().test_client()
    body = {"communication": "Communication/abc"}
    assert client.post("/v1/messages", json=body).status_code == 401
    assert client.post("/v1/messages", json=body,
                       headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/messages/x").status_code == 401
    not_json = client.post("/v1/messages", data="{", headers={**AUTH,
                                                            "Content-Type": "application/json"})
    assert not_json.status_code == 400 and not_json.get_json()["error"] == "invalid-json"
    for bad, field in [
        ({"communication": "Patient/1"}, "communication"),
        ({"communication": "Communication/1", "channel": "fax"}, "channel"),
        ({"resourceType": "Communication"}, "payload"),
        ({"resourceType": "Observation", "payload": [{"contentString": "x"}]}, "resourceType"),
        ({"resourceType": "Communication", "payload": [{"contentString": ""}]},
         "payload.0.contentString"),
    ]:
        resp = client.post("/v1/messages", json=bad, headers=AUTH)
        assert resp.status_code == 422, bad
        assert field in [f["field"] for f in resp.get_json()["fields"]], resp.get_json()
    assert client.get("/v1/messages/nope", headers=AUTH).status_code == 404
    assert svc.redis.llen("outbound") == 0


def test_fallback_to_email_when_the_number_cannot_take_texts(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = outbound(services, providers_clean, CHANNEL_FALLBACK="true")
    comm = message_in_thread(sandbox, patient(sandbox, phone="+15556667777"), "SMSWRIT")
    providers_clean.fault(provider="twilio", to="+15556667777", status=400, twilio_code=21614)
    resp = send(svc, {"communication": f"Communication/{comm['id']}"}, wait=20)
    seen = [(r["provider"], r["to"], r["answered"]) for r in providers_clean.requests()]
    assert resp.status_code == 200 and resp.get_json()["channel"] == "email", (
        resp.get_json(), seen)
    assert [p for p, _, _ in seen] == ["twilio", "sendgrid"], seen
    stored = recorded(sandbox, comm["id"], svc.settings.email_message_id_system)
    assert "sms failed: unreachable 21614" in stored["note"][0]["text"]
    assert stored["medium"][0]["coding"][0]["code"] == "EMAILWRIT"


def test_worker_killed_after_the_provider_answered_does_not_send_twice(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox,
        log_dir: Any) -> None:
    env_over = outbound_env(providers_clean, BROKER_VISIBILITY_TIMEOUT_SECONDS="5",
                            FHIR_TIMEOUT_SECONDS="1")
    svc = services.get(worker=False, **env_over)
    comm = message_in_thread(sandbox, patient(sandbox), "SMSWRIT")
    # Recording the provider id on the Communication (a PUT) hangs: the worker is killed after
    # Twilio accepted the message and before the task is acknowledged.
    sandbox.fault(delay_ms=4000, status=503, count=1, method="PUT")
    doomed = devstack.start_worker(svc.env, log_dir, name="worker-outbound-doomed",
                                   concurrency=2)
    resp = send(svc, {"communication": f"Communication/{comm['id']}"})
    eventually(lambda: len(providers_clean.requests("twilio")) == 1, what="provider called")
    doomed.kill()
    replacement = devstack.start_worker(svc.env, log_dir, name="worker-outbound-replacement",
                                        concurrency=2)
    try:
        def recorded() -> bool:
            stored = sandbox.fhir.read("Communication", comm["id"]).resource
            return any(i.get("system") == svc.settings.message_id_system
                       for i in stored.get("identifier") or [])

        eventually(recorded, timeout=60, what="provider id recorded after redelivery")
        assert state(svc, resp.get_json()["id"], "sent")
        assert len(providers_clean.requests("twilio")) == 1
    finally:
        replacement.stop()


def test_a_message_sent_before_a_crash_is_never_marked_failed_later(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    """A worker died after the provider took the message and before FHIR heard of it; by the
    redelivery the patient's number is gone. The send ledger says it went out: the redelivery
    records that on the Communication, and neither marks it failed nor sends anything."""
    svc = outbound(services, providers_clean)
    pat = patient(sandbox, email=None)
    comm = message_in_thread(sandbox, pat, "SMSWRIT")
    SendLedger(redis.Redis.from_url(svc.settings.redis_url), svc.settings.sealer()).record(
        comm["id"], {"provider_id": "SMsentbeforethecrash", "channel": "sms", "message_id": ""})
    sandbox.fhir.update({**pat, "telecom": []})
    resp = send(svc, {"communication": f"Communication/{comm['id']}"})
    assert state(svc, resp.get_json()["id"], "sent", "failed")["status"] == "sent"
    stored = recorded(sandbox, comm["id"], svc.settings.message_id_system)
    assert stored["status"] == "in-progress" and "statusReason" not in stored
    assert not providers_clean.requests("twilio")


def test_two_workers_share_one_send_rate(services: Services, sandbox: Sandbox,
                                         providers_clean: ProviderSandbox) -> None:
    svc = services.get(workers=2, **outbound_env(providers_clean, SMS_RATE_PER_SECOND="2"))
    pat = patient(sandbox)
    ids = []
    for n in range(20):
        comm = message_in_thread(sandbox, pat, "SMSWRIT", text=f"message {n}")
        ids.append(send(svc, {"communication": f"Communication/{comm['id']}"}).get_json()["id"])
    for request_id in ids:
        state(svc, request_id, "sent")
    reqs = providers_clean.requests("twilio")
    assert len(reqs) == 20 and all(r["answered"] == 201 for r in reqs)
    assert len({r["form"]["Body"] for r in reqs}) == 20
    spread = reqs[-1]["at"] - reqs[0]["at"]
    # 20 messages at 2/s with a bucket of 1: the first goes at once, then one every 0.5 s.
    assert spread >= 9.0, spread
    # Both workers reserved slots from the one shared bucket (who sends a deferred message
    # once it is due is up to the broker: one worker may hold every ETA message).
    took = re.compile(re.escape(TASK_OUTBOUND_SEND) + r"\[[0-9a-f-]+\] received")
    both = [w for w in svc.all_workers if took.search(w.output())]
    assert len(both) == 2  # the work really was shared


def test_openapi_document_is_served(services: Services, providers: ProviderSandbox) -> None:
    svc = services.get(worker=False, **outbound_env(providers))
    doc = svc.app().test_client().get("/v1/openapi.json").get_json()
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) == {"/v1/messages", "/v1/messages/{id}", "/v1/devices",
                                 "/v1/devices/{token}"}
    assert "communication" in doc["components"]["schemas"]["ByReference"]["properties"]


def test_provider_outage_is_reported_as_502_and_retries_go_on(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = outbound(services, providers_clean)
    comm = message_in_thread(sandbox, patient(sandbox), "SMSWRIT")
    providers_clean.fault(provider="twilio", to=MOBILE, status=503, count=2)
    resp = send(svc, {"communication": f"Communication/{comm['id']}"}, wait=20)
    assert resp.status_code == 502 and resp.get_json()["error"] == "provider-unavailable"
    state(svc, resp.get_json()["id"], "sent")
    assert len(providers_clean.requests("twilio")) == 3


def test_worker_killed_while_the_provider_answers_never_sends_twice(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox,
        log_dir: Any) -> None:
    """The one window no ledger closes: the request left, the answer was never recorded.
    Switchboard must not guess: exactly one provider request, and a dead letter for a person."""
    svc = services.get(worker=False, **outbound_env(
        providers_clean, BROKER_VISIBILITY_TIMEOUT_SECONDS="5", FHIR_TIMEOUT_SECONDS="1",
        SEND_CLAIM_SECONDS="10", RETRY_MAX_ATTEMPTS="50"))
    comm = message_in_thread(sandbox, patient(sandbox), "SMSWRIT")
    providers_clean.fault(provider="twilio", to=MOBILE, delay_ms=3000)  # slow, then 201
    doomed = devstack.start_worker(svc.env, log_dir, name="worker-ambiguous-doomed",
                                   concurrency=2)
    resp = send(svc, {"communication": f"Communication/{comm['id']}"})
    eventually(lambda: svc.redis.hlen("unacked") == 1, what="send in flight")
    time.sleep(1.0)  # inside the provider call (it answers after 3 s)
    doomed.kill()
    replacement = devstack.start_worker(svc.env, log_dir, name="worker-ambiguous-replacement",
                                        concurrency=2)
    try:
        entry = eventually(lambda: svc.dead_letters.list(), timeout=60,
                           what="dead letter for the unknown outcome")[0]
        assert entry.reason == "outcome-unknown"
        assert len(providers_clean.requests("twilio")) == 1
        stored = sandbox.fhir.read("Communication", comm["id"]).resource
        assert stored["status"] == "unknown"
        assert state(svc, resp.get_json()["id"], "failed")["error"] == "outcome-unknown"
    finally:
        replacement.stop()


def test_outbound_logs_hold_no_contacts_bodies_or_secrets(log_dir: Any) -> None:
    """Runs after the flows above: every worker, web and sandbox-free log of the session."""
    import re
    from pathlib import Path

    from tests.conftest import SENDGRID_KEY
    from tests.support import AUTH_TOKEN

    text = our_logs(Path(log_dir))
    assert "outbound Communication/" in text  # the outbound flows were logged at all
    # test_email_events.py ran before this file: its recipients, bodies and event reasons too.
    for needle in (MOBILE, MOBILE[2:], "5553334444", "5556667777", EMAIL, "Your results",
                   "See you Tuesday", API_TOKEN, SENDGRID_KEY, AUTH_TOKEN, "pat.mail",
                   "spam.reporter", "They mean all is well", "Welcome back",
                   "does not exist", "local policy"):
        assert needle not in text, needle
    # Any address of the test domains (worker names like worker-db3-0@host are not addresses).
    assert not re.search(r"@(example\.org|clinic\.example)", text)
