"""Email both ways, part B: SendGrid Event Webhook batches (signed by the provider sandbox's key)
move the Communication and the API request; outbound emails thread in the patient's mail client.

Real parts: the receiver (Flask app, or gunicorn for the sandbox's own posts), Redis, a real
worker, the FHIR sandbox, and the provider sandbox driven through the sendgrid SDK.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import httpx
import pytest

from tests.conftest import API_TOKEN, Service, Services, outbound_env
from tests.support import ProviderSandbox, Sandbox, eventually, sign_email_events
from worker.channels.sendgrid import EMAIL_INBOUND_MESSAGE_ID_SYSTEM, EMAIL_MESSAGE_ID_SYSTEM
from worker.ops import devstack
from worker.stores.inbox import ENTRIES as INBOX_ENTRIES
from worker.stores.optouts import OptOuts

EVENTS = "/webhooks/sendgrid/events"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
PATIENT_MAIL = "pat.mail@example.org"


@pytest.fixture()
def providers_clean(providers: ProviderSandbox) -> ProviderSandbox:
    """The provider sandbox, emptied for this test."""
    providers.reset()
    return providers


def email_patient(sandbox: Sandbox, address: str = PATIENT_MAIL) -> dict[str, Any]:
    return sandbox.fhir.create({"resourceType": "Patient", "telecom": [
        {"system": "email", "value": address}]}).resource


def email_thread(sandbox: Sandbox, pat: dict[str, Any], topic: str = "Your lab results"
                 ) -> dict[str, Any]:
    return sandbox.fhir.create({
        "resourceType": "Communication", "status": "in-progress",
        "subject": {"reference": f"Patient/{pat['id']}"}, "topic": {"text": topic},
        "medium": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                          "v3-ParticipationMode", "code": "EMAILWRIT"}]}]}
    ).resource


def reply(sandbox: Sandbox, header: dict[str, Any], pat: dict[str, Any],
          text: str = "Your results are normal") -> dict[str, Any]:
    return sandbox.fhir.create({
        "resourceType": "Communication", "status": "in-progress",
        "partOf": [{"reference": f"Communication/{header['id']}"}],
        "recipient": [{"reference": f"Patient/{pat['id']}"}],
        "payload": [{"contentString": text}]}).resource


def send_email(svc: Service, comm: dict[str, Any]) -> dict[str, Any]:
    """Send through the API and wait for the provider's answer."""
    resp = svc.app().test_client().post(
        "/v1/messages", json={"communication": f"Communication/{comm['id']}"},
        headers={**AUTH, "Prefer": "wait=20"})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["channel"] == "email"
    return dict(body)


def post_batch(svc: Service, batch: dict[str, Any]) -> Any:
    """Post a batch the sandbox signed, exactly as it would reach us."""
    return svc.app().test_client().post(EVENTS, data=batch["body"].encode(),
                                        headers=batch["headers"])


def post_without_nulls(svc: Service, providers: ProviderSandbox, batch: dict[str, Any]
                       ) -> bytes:
    """Post the batch with the keys the sandbox echoed as null left out, as SendGrid would not
    send them, signed again; the body posted (answered 200)."""
    events = [{k: v for k, v in e.items() if v is not None} for e in json.loads(batch["body"])]
    body = json.dumps(events).encode()
    resp = svc.app().test_client().post(
        EVENTS, data=body, headers=sign_email_events(providers.event_private_key, body))
    assert resp.status_code == 200
    return body


def processed(svc: Service, body: bytes | str) -> None:
    """Wait until the worker has finished the batch posted with this body (its inbox entry,
    keyed on the body, is removed when the task ends)."""
    raw = body.encode() if isinstance(body, str) else body
    key = "sendgrid-events:" + hashlib.sha256(raw).hexdigest()[:32]
    eventually(lambda: not svc.redis.hexists(INBOX_ENTRIES, key), timeout=30,
               what="event batch processed")


def status_of(sandbox: Sandbox, comm_id: str) -> str:
    return str(sandbox.fhir.read("Communication", comm_id).resource["status"])


def request_state(svc: Service, request_id: str) -> dict[str, Any]:
    return dict(svc.app().test_client().get(f"/v1/messages/{request_id}",
                                            headers=AUTH).get_json())


def test_delivered_completes_the_email_duplicates_and_late_events_change_nothing(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = services.get(**outbound_env(providers_clean))
    pat = email_patient(sandbox)
    comm = reply(sandbox, email_thread(sandbox, pat), pat)
    sent = send_email(svc, comm)
    (mail,) = providers_clean.requests("sendgrid")
    # The custom args every event carries back: the Communication and the API request.
    assert mail["json"]["custom_args"] == {"communication_id": comm["id"],
                                           "request_id": sent["id"]}
    first = providers_clean.email_events(sent["provider_id"], "processed", "delivered")
    assert post_batch(svc, first).status_code == 200
    processed(svc, first["body"])
    assert status_of(sandbox, comm["id"]) == "completed"
    assert request_state(svc, sent["id"])["status"] == "delivered"
    # SendGrid posts the same batch again (at least once): nothing moves, nothing is re-applied.
    assert post_batch(svc, first).status_code == 200
    processed(svc, first["body"])
    # Out of order: a `processed` and a `deferred` arriving after `delivered` (and a bounce
    # duplicated from an already-applied event id) leave it completed.
    late_id = json.loads(first["body"])[1]["sg_event_id"]
    late = providers_clean.email_events(sent["provider_id"], "processed", "deferred",
                                        {"event": "bounce", "sg_event_id": late_id})
    assert post_batch(svc, late).status_code == 200
    processed(svc, late["body"])
    stored = sandbox.fhir.read("Communication", comm["id"]).resource
    assert stored["status"] == "completed" and "statusReason" not in stored
    assert request_state(svc, sent["id"])["status"] == "delivered"
    assert svc.dead_letters.count() == 0


@pytest.mark.parametrize(("event", "code", "text"), [
    ("bounce", "bounce", "does not exist"),
    ("blocked", "blocked", "local policy"),
    ("dropped", "dropped", "Bounced Address"),
])
def test_bounce_dropped_and_blocked_stop_the_email_with_the_reason(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox, event: str,
        code: str, text: str) -> None:
    svc = services.get(**outbound_env(providers_clean))
    pat = email_patient(sandbox)
    comm = reply(sandbox, email_thread(sandbox, pat), pat)
    sent = send_email(svc, comm)
    batch = providers_clean.email_events(sent["provider_id"], "processed", event)
    assert post_batch(svc, batch).status_code == 200
    processed(svc, batch["body"])
    stored = sandbox.fhir.read("Communication", comm["id"]).resource
    assert stored["status"] == "stopped"
    assert stored["statusReason"]["coding"][0]["code"] == code
    assert text in stored["statusReason"]["text"]
    state = request_state(svc, sent["id"])
    assert state["status"] == "failed" and state["error"] == "undelivered"
    # A `delivered` arriving after the bounce does not revive it.
    late = providers_clean.email_events(sent["provider_id"], "delivered")
    assert post_batch(svc, late).status_code == 200
    processed(svc, late["body"])
    assert status_of(sandbox, comm["id"]) == "stopped"


def test_spamreport_records_an_opt_out_and_the_next_email_is_refused_locally(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = services.get(**outbound_env(providers_clean))
    address = "Spam.Reporter@example.org"
    pat = email_patient(sandbox, address)
    header = email_thread(sandbox, pat)
    first = reply(sandbox, header, pat)
    sent = send_email(svc, first)
    # SendGrid reports the address in its own spelling.
    batch = providers_clean.email_events(sent["provider_id"], "delivered",
                                         {"event": "spamreport", "email": address.lower()},
                                         "open", "click")
    assert post_batch(svc, batch).status_code == 200
    processed(svc, batch["body"])
    assert status_of(sandbox, first["id"]) == "completed"  # delivered; opens change nothing
    second = reply(sandbox, header, pat, "Another note")
    resp = svc.app().test_client().post(
        "/v1/messages", json={"communication": f"Communication/{second['id']}"},
        headers={**AUTH, "Prefer": "wait=20"})
    assert resp.status_code == 422 and resp.get_json()["error"] == "opted-out"
    assert len(providers_clean.requests("sendgrid")) == 1  # SendGrid was not called again
    stored = sandbox.fhir.read("Communication", second["id"]).resource
    assert stored["status"] == "stopped"
    # The patient opts back in (the clinic lifts it); SendGrid then delivers the old batch
    # again (at least once): the spam report was applied already and does not come back.
    optouts = OptOuts(svc.redis, svc.settings.optout_key())
    assert optouts.remove("email", address)
    assert post_batch(svc, batch).status_code == 200
    processed(svc, batch["body"])
    assert not optouts.has("email", address)
    send_email(svc, reply(sandbox, header, pat, "Welcome back"))
    assert len(providers_clean.requests("sendgrid")) == 2


def test_an_unsubscribe_opts_out_only_the_address_we_emailed(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    """Issue 26, finding 11: a signed `unsubscribe` naming a Communication we never emailed to
    that address (or none that exists) used to opt the address out all the same."""
    svc = services.get(**outbound_env(providers_clean))
    pat = email_patient(sandbox, "Reader@example.org")
    victim = "someone.else@example.org"
    email_patient(sandbox, victim)
    comm = reply(sandbox, email_thread(sandbox, pat), pat)
    sent = send_email(svc, comm)
    eventually(lambda: any(
        i.get("system") == svc.settings.email_message_id_system
        for i in sandbox.fhir.read("Communication", comm["id"]).resource.get("identifier")
        or []), what="send recorded")
    optouts = OptOuts(svc.redis, svc.settings.optout_key())
    batch = providers_clean.email_events(
        sent["provider_id"],
        {"event": "unsubscribe", "email": victim},  # our email, another address
        {"event": "unsubscribe", "email": victim, "communication_id": "no-such-message"},
        {"event": "group_unsubscribe", "email": victim, "communication_id": "no-such-message"})
    assert post_batch(svc, batch).status_code == 200
    processed(svc, batch["body"])
    assert not optouts.has("email", victim)
    assert svc.dead_letters.count() == 0
    # The address we emailed, in SendGrid's spelling: opted out.
    genuine = providers_clean.email_events(sent["provider_id"],
                                           {"event": "unsubscribe", "email": "reader@example.org"})
    assert post_batch(svc, genuine).status_code == 200
    processed(svc, genuine["body"])
    assert optouts.has("email", "Reader@example.org")
    assert not optouts.has("email", victim)


def test_events_not_about_our_emails_are_ignored(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    """SendGrid posts every email of the account: one sent by another system (no custom args,
    an unknown X-Message-Id) and one naming a Communication that is not that email."""
    svc = services.get(**outbound_env(providers_clean))
    pat = email_patient(sandbox)
    header = email_thread(sandbox, pat)
    comm, other = reply(sandbox, header, pat), reply(sandbox, header, pat, "second")
    sent = send_email(svc, comm)
    send_email(svc, other)
    for c in (comm, other):
        eventually(lambda c=c: any(
            i.get("system") == svc.settings.email_message_id_system
            for i in sandbox.fhir.read("Communication", c["id"]).resource.get("identifier")
            or []), what="send recorded")
    batch = providers_clean.email_events(
        sent["provider_id"],
        {"event": "delivered", "communication_id": None, "request_id": None,
         "sg_message_id": "someoneElsesMessage0.filterdrecv-x"},
        {"event": "bounce", "communication_id": other["id"], "request_id": None})
    processed(svc, post_without_nulls(svc, providers_clean, batch))
    assert status_of(sandbox, comm["id"]) == "in-progress"
    assert status_of(sandbox, other["id"]) == "in-progress"
    assert svc.dead_letters.count() == 0


def test_an_event_for_an_unsent_communication_is_retried_then_dead_lettered_alone(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    """Our custom arg names a Communication whose send is not recorded (the event came first,
    or it was never sent): retried, then dead-lettered; the rest of its batch is applied once."""
    svc = services.get(**outbound_env(providers_clean))
    pat = email_patient(sandbox)
    header = email_thread(sandbox, pat)
    comm, unsent = reply(sandbox, header, pat), reply(sandbox, header, pat, "never sent")
    sent = send_email(svc, comm)
    eventually(lambda: any(
        i.get("system") == svc.settings.email_message_id_system
        for i in sandbox.fhir.read("Communication", comm["id"]).resource.get("identifier")
        or []), what="send recorded")
    batch = providers_clean.email_events(
        sent["provider_id"], "delivered",
        {"event": "bounce", "communication_id": unsent["id"], "request_id": None})
    processed(svc, post_without_nulls(svc, providers_clean, batch))
    (entry,) = svc.dead_letters.list()
    assert entry.task == "switchboard.status.sendgrid" and entry.reason == "retries-exhausted"
    assert entry.detail.startswith("send-not-recorded")
    assert status_of(sandbox, comm["id"]) == "completed"
    assert status_of(sandbox, unsent["id"]) == "in-progress"
    svc.dead_letters.purge()


def test_an_event_naming_a_communication_sent_by_sms_is_ignored_not_retried(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    """Hostile review: a signed event whose custom arg names a Communication that went out by
    SMS (no email of ours carried it) was retried as `send-not-recorded` for hours before it
    was dead-lettered; it is not ours, and is ignored at once."""
    svc = services.get(**outbound_env(providers_clean))
    pat = email_patient(sandbox)
    header = email_thread(sandbox, pat)
    comm = reply(sandbox, header, pat)
    sent = send_email(svc, comm)
    eventually(lambda: any(
        i.get("system") == svc.settings.email_message_id_system
        for i in sandbox.fhir.read("Communication", comm["id"]).resource.get("identifier")
        or []), what="send recorded")
    by_sms = sandbox.fhir.create({
        "resourceType": "Communication", "status": "in-progress",
        "partOf": [{"reference": f"Communication/{header['id']}"}],
        "recipient": [{"reference": f"Patient/{pat['id']}"}],
        "medium": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                          "v3-ParticipationMode", "code": "SMSWRIT"}]}],
        "identifier": [{"system": svc.settings.message_id_system, "value": "SM" + "1" * 32}],
        "payload": [{"contentString": "by text"}]}).resource
    batch = providers_clean.email_events(
        sent["provider_id"],
        {"event": "unsubscribe", "communication_id": by_sms["id"], "request_id": None})
    # A retried batch keeps its inbox entry: this would time out.
    processed(svc, post_without_nulls(svc, providers_clean, batch))
    assert svc.dead_letters.count() == 0


def test_forged_unsigned_stale_and_malformed_batches_are_refused_and_nothing_is_queued(
        services: Services, providers: ProviderSandbox) -> None:
    svc = services.get(worker=False, **outbound_env(providers))
    client = svc.app().test_client()
    body = json.dumps([{"event": "delivered", "sg_event_id": "abc", "email": "a@example.org",
                        "timestamp": int(time.time()), "sg_message_id": "x.filter"}]).encode()
    other_private, _ = devstack.sendgrid_event_keys()
    genuine = sign_email_events(providers.event_private_key, body)
    cases = {
        "unsigned": ({"Content-Type": "application/json"}, body),
        "forged": (sign_email_events(other_private, body), body),
        "tampered": (genuine, body.replace(b"delivered", b"bounce")),
        "stale": (sign_email_events(providers.event_private_key, body,
                                    str(int(time.time()) - 601)), body),
        "garbage-signature": ({**genuine, "X-Twilio-Email-Event-Webhook-Signature": "%%%"},
                              body),
        "timestamp-not-digits": ({**genuine, "X-Twilio-Email-Event-Webhook-Timestamp": "1e9"},
                                 body),
    }
    before = svc.redis.llen("status")
    for name, (headers, data) in cases.items():
        resp = client.post(EVENTS, data=data, headers=headers)
        assert resp.status_code == 403, name
        assert resp.get_json()["error"] in ("bad-signature", "stale-timestamp"), name
    assert client.post(EVENTS, data=body, headers=cases["stale"][0]).get_json()["error"] \
        == "stale-timestamp"
    # Signed, but not a batch we can use: 400 naming the problem.
    malformed = {
        b'{"event": "delivered"}': "not-an-event-array",
        b"[]": "not-an-event-array",
        b"[1, 2]": "invalid-fields",
        b'[{"event": "delivered"}]': "invalid-fields",  # no sg_event_id
        json.dumps([{"event": "delivered", "sg_event_id": "a",
                     "communication_id": "../Patient/1"}]).encode(): "invalid-fields",
        json.dumps([{"event": "delivered", "sg_event_id": "a", "request_id": "x" * 65}]
                   ).encode(): "invalid-fields",
        json.dumps([{"event": "delivered", "sg_event_id": "a", "email": ["x"]}]
                   ).encode(): "invalid-fields",
        json.dumps([{"event": "processed", "sg_event_id": str(n)} for n in range(5001)]
                   ).encode(): "too-many-events",
        b"[" * 5000: "invalid-json",
        b"\xff\xfe": "bad-signature",  # not UTF-8: cannot be a signed SendGrid body
    }
    for data, error in malformed.items():
        resp = client.post(EVENTS, data=data,
                           headers=sign_email_events(providers.event_private_key, data))
        assert resp.get_json()["error"] == error, (data[:40], resp.get_json())
        assert resp.status_code == (403 if error == "bad-signature" else 400)
    assert svc.redis.llen("status") == before  # nothing queued
    # A genuine batch is queued.
    assert client.post(EVENTS, data=body, headers=genuine).status_code == 200
    assert svc.redis.llen("status") == before + 1


def test_without_a_verification_key_every_batch_is_refused(
        services: Services, providers: ProviderSandbox) -> None:
    svc = services.get(worker=False, **outbound_env(providers,
                                                    SENDGRID_EVENT_VERIFICATION_KEY=""))
    body = b'[{"event": "delivered", "sg_event_id": "abc"}]'
    resp = svc.app().test_client().post(
        EVENTS, data=body, headers=sign_email_events(providers.event_private_key, body))
    assert resp.status_code == 403 and resp.get_json()["error"] == "not-configured"


def test_outbound_emails_carry_a_message_id_and_replies_thread_to_the_patients_email(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = services.get(**outbound_env(providers_clean))
    pat = email_patient(sandbox)
    header = email_thread(sandbox, pat, topic="Re: Your lab results")
    # Our first email in the thread: a Message-ID of ours, nothing to reply to yet.
    first = reply(sandbox, header, pat, "Your results are in")
    sent = send_email(svc, first)
    (mail,) = providers_clean.requests("sendgrid")
    ours = mail["json"]["headers"]["Message-ID"]
    assert ours.startswith(f"<{first['id']}.") and ours.endswith("@clinic.example>")
    assert "In-Reply-To" not in mail["json"]["headers"]
    stored = eventually(lambda: next((
        i["value"] for i in sandbox.fhir.read("Communication", first["id"]).resource.get(
            "identifier") or [] if i["system"] == EMAIL_MESSAGE_ID_SYSTEM), None),
        what="Message-ID recorded")
    assert stored == ours == sent["message_id"]
    # The patient answers by email (as the inbound pipeline records it), then the clinician
    # replies: the reply names the patient's email and carries the thread's subject.
    patients_id = "<CAF=patient.reply-1@mail.example.org>"
    sandbox.fhir.create({
        "resourceType": "Communication", "status": "completed",
        "partOf": [{"reference": f"Communication/{header['id']}"}],
        "sender": {"reference": f"Patient/{pat['id']}"},
        "subject": {"reference": f"Patient/{pat['id']}"},
        "identifier": [{"system": EMAIL_INBOUND_MESSAGE_ID_SYSTEM, "value": patients_id}],
        "payload": [{"contentString": "Thanks, what do they mean?"}]})
    second = reply(sandbox, header, pat, "They mean all is well")
    send_email(svc, second)
    mails = providers_clean.requests("sendgrid")
    threaded = mails[-1]["json"]
    assert threaded["headers"]["In-Reply-To"] == patients_id
    assert threaded["headers"]["References"] == patients_id
    assert threaded["headers"]["Message-ID"].startswith(f"<{second['id']}.")
    assert threaded["subject"] == "Re: Your lab results"


def test_the_sandbox_posts_signed_events_to_the_receiver_by_itself(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox,
        log_dir: Any) -> None:
    """As in `make run`: a provider sandbox with automatic events posts processed, then
    delivered (or a fault's bounce) to the receiver under gunicorn."""
    port = devstack.free_port()
    private, public = devstack.sendgrid_event_keys()
    child, origin = devstack.start_provider_sandbox(log_dir, [
        "--sendgrid-api-key", "SG.auto", "--sendgrid-events-auto",
        "--sendgrid-event-url", f"http://127.0.0.1:{port}{EVENTS}"],
        env={"PROVIDER_SANDBOX_SENDGRID_EVENT_KEY": private})
    auto = ProviderSandbox(origin)
    svc = services.get(**outbound_env(auto, SENDGRID_API_KEY="SG.auto",
                                      SENDGRID_EVENT_VERIFICATION_KEY=public))
    web = devstack.start_web(svc.env, log_dir, port, workers=1, name="web-events")
    try:
        eventually(lambda: _up(port), what="receiver up")
        pat = email_patient(sandbox)
        header = email_thread(sandbox, pat)
        good, bad = reply(sandbox, header, pat), reply(sandbox, header, pat, "second")
        send_email(svc, good)
        eventually(lambda: status_of(sandbox, good["id"]) == "completed", timeout=30,
                   what="delivered through the sandbox's own post")
        auto.fault(provider="sendgrid", to=PATIENT_MAIL, event="bounce")
        send_email(svc, bad)
        eventually(lambda: status_of(sandbox, bad["id"]) == "stopped", timeout=30,
                   what="bounced through the sandbox's own post")
        posts = eventually(lambda: (lambda rows: rows if len(rows) == 4 else None)(
            httpx.get(f"{origin}/__sendgrid/events").json()), what="four event posts")
        assert [p["status"] for p in posts] == [200] * 4
    finally:
        web.stop()
        auto.close()
        child.stop()


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
