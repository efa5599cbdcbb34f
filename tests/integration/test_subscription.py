"""Automatic outbound through FHIR Subscriptions: signed notifications → Redis → real worker →
FHIR sandbox + provider sandbox; and the sandbox's own rest-hook delivery, end to end."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest

from tests.conftest import API_TOKEN, Service, Services, outbound_env
from tests.integration.test_outbound import message_in_thread, patient, recorded
from tests.support import (
    ProviderSandbox,
    Sandbox,
    eventually,
    metric,
    our_logs,
    post_signed,
    sms_params,
    worker_metrics,
)
from worker.fhir import subscription as sub
from worker.ops import devstack
from worker.ops.metrics import DEFINITIONS

SECRET = "test-subscription-secret"
PATH = "/webhooks/fhir/subscription"
TASK = "switchboard.outbound.subscription"


@pytest.fixture()
def providers_clean(providers: ProviderSandbox) -> ProviderSandbox:
    """The provider sandbox, emptied for this test."""
    providers.reset()
    return providers


def service(services: Services, providers: ProviderSandbox, worker: bool = True,
            **overrides: str) -> Service:
    return services.get(worker=worker, **outbound_env(
        providers, FHIR_SUBSCRIPTION_SECRET=SECRET, **overrides))


def notify(svc: Service, body: Any, secret: str = SECRET, raw: bytes | None = None,
           **headers: str) -> Any:
    """POST a notification signed as Medplum signs it (the hex HMAC of the exact body)."""
    data = raw if raw is not None else json.dumps(body).encode()
    signature = hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()
    return svc.app().test_client().post(PATH, data=data, headers={
        "Content-Type": "application/fhir+json", "X-Signature": signature,
        "X-Medplum-Interaction": "create", **headers})


def queued(svc: Service) -> list[dict[str, Any]]:
    """The payloads waiting on the outbound queue (no worker consumes this configuration's)."""
    out = []
    for raw in svc.redis.lrange("outbound", 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == TASK
        # Bodies are sealed at rest (worker/crypto.py): open with this configuration's keys.
        body = svc.settings.sealer().open_bytes(base64.b64decode(message["body"]))
        args, _, _ = json.loads(body)
        out.append(args[0])
    return out


def counter(svc: Service, name: str, *labels: str) -> float:
    """A counter (its label values in declared order) summed over the processes counting it:
    this one (the receiver runs in the test's process) and the service's workers."""
    pages = generate_latest(REGISTRY).decode() + worker_metrics(
        *(w.metrics_port for w in svc.all_workers))
    names = DEFINITIONS[name][2]
    return metric(pages, f"{name}_total", **dict(zip(names, labels, strict=True)))


def ignored(svc: Service, reason: str) -> float:
    return counter(svc, "switchboard_subscription_ignored", reason)


def finished(svc: Service) -> float:
    return counter(svc, "switchboard_tasks", TASK, "succeeded")


def wait_finished(svc: Service, target: float) -> None:
    eventually(lambda: finished(svc) >= target, timeout=30,
               what=f"{target} subscription tasks finished")


def clinician(sandbox: Sandbox) -> str:
    """A Practitioner to log in as (its reference)."""
    doc = sandbox.fhir.create({"resourceType": "Practitioner", "name": [{"family": "Doe"}]})
    return f"Practitioner/{doc.resource['id']}"


def thread(sandbox: Sandbox, pat: dict[str, Any], medium: str = "SMSWRIT") -> dict[str, Any]:
    """A thread header about `pat` in `medium`."""
    return sandbox.fhir.create({
        "resourceType": "Communication", "status": "in-progress",
        "subject": {"reference": f"Patient/{pat['id']}"}, "topic": {"text": "Visit"},
        "medium": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                "v3-ParticipationMode", "code": medium}]}]}).resource


def reply(sandbox: Sandbox, header: dict[str, Any], pat: dict[str, Any], text: str,
          author: str | None = None, **fields: Any) -> dict[str, Any]:
    """A clinician's reply written into FHIR in the thread `header`, as the EHR does: logged
    in as the Practitioner (the server records meta.author), who is also the sender."""
    author = author or clinician(sandbox)
    body = {"resourceType": "Communication", "status": "in-progress",
            "partOf": [{"reference": f"Communication/{header['id']}"}],
            "sender": {"reference": author},
            "recipient": [{"reference": f"Patient/{pat['id']}"}],
            "payload": [{"contentString": text}], **fields}
    return sandbox.write_as(author, {k: v for k, v in body.items() if v is not None})


def clinician_reply(sandbox: Sandbox, pat: dict[str, Any], text: str = "Your results are ready"
                    ) -> dict[str, Any]:
    """A clinician's reply in a new SMS thread of `pat`."""
    return reply(sandbox, thread(sandbox, pat), pat, text)


# -- the receiver ----------------------------------------------------------------------------

def test_only_correctly_signed_notifications_are_taken(
        services: Services, providers: ProviderSandbox) -> None:
    svc = service(services, providers, worker=False)
    svc.redis.delete("outbound")
    body = {"resourceType": "Communication", "id": "c1", "status": "in-progress"}
    data = json.dumps(body).encode()
    client = svc.app().test_client()
    forged = [
        {},  # no signature
        {"X-Signature": hmac.new(b"guessed", data, hashlib.sha256).hexdigest()},
        {"X-Signature": hashlib.sha256(data).hexdigest()},  # a bare hash, no key
        {"X-Signature": "0" * 64},
    ]
    for headers in forged:
        resp = client.post(PATH, data=data, headers={"Content-Type": "application/fhir+json",
                                                     **headers})
        assert resp.status_code == 403, headers
        assert resp.get_json()["error"] == "bad-signature"
    # Signed, then one byte changed (the id): the signature is over the exact bytes.
    good = hmac.new(SECRET.encode(), data, hashlib.sha256).hexdigest()
    tampered = data.replace(b'"c1"', b'"c2"')
    assert client.post(PATH, data=tampered, headers={"X-Signature": good}).status_code == 403
    # The same body re-serialised with other spacing is other bytes, so also refused.
    spaced = json.dumps(body, indent=1).encode()
    assert client.post(PATH, data=spaced, headers={"X-Signature": good}).status_code == 403
    form = client.post(PATH, data=data, headers={"X-Signature": good, "Content-Type":
                                                 "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    assert queued(svc) == []
    resp = notify(svc, body, raw=data)
    assert resp.status_code == 200 and resp.get_json() == {"status": "queued",
                                                           "communications": 1}
    assert queued(svc) == [{"communication": "c1"}]  # the id only: the worker reads FHIR
    svc.redis.delete("outbound")


@pytest.mark.parametrize("index", [0, 1, 3])
def test_bundles_are_scanned_for_the_communication(
        services: Services, providers: ProviderSandbox, index: int) -> None:
    svc = service(services, providers, worker=False)
    svc.redis.delete("outbound")
    others: list[dict[str, Any]] = [
        {"resource": {"resourceType": "SubscriptionStatus", "type": "event-notification",
                      "status": "active"}},
        {"resource": {"resourceType": "Patient", "id": "p1"}},
        {"fullUrl": "https://fhir.example/Patient/p2"}]
    mine = {"resource": {"resourceType": "Communication", "id": f"m{index}"}}
    entries = [*others[:index], mine, *others[index:]]
    resp = notify(svc, {"resourceType": "Bundle", "type": "history", "entry": entries})
    assert resp.status_code == 200, resp.get_json()
    assert queued(svc) == [{"communication": f"m{index}"}]
    svc.redis.delete("outbound")


def test_deletes_and_hostile_bodies(services: Services, providers: ProviderSandbox) -> None:
    svc = service(services, providers, worker=False)
    svc.redis.delete("outbound")
    before = ignored(svc, "delete")
    # Medplum's delete notification: body {} and the deleted resource in a header.
    resp = notify(svc, {}, **{"X-Medplum-Interaction": "delete",
                              "X-Medplum-Deleted-Resource": "Communication/c1"})
    assert resp.status_code == 200 and resp.get_json()["reason"] == "delete"
    # A heartbeat Bundle (nothing in it): acknowledged, nothing queued.
    resp = notify(svc, {"resourceType": "Bundle", "type": "history", "entry": []})
    assert resp.status_code == 200 and resp.get_json()["reason"] == "no-communication"
    cases = [(b"not json", 400, "invalid-json"), (b"[1,2]", 400, "invalid-body"),
             (b'{"resourceType":"Communication","id":"../Patient/1"}', 400, "invalid-id"),
             (b'{"resourceType":"Patient","id":"p1"}', 422, "not-a-communication"),
             (b"[" * 100000 + b"]" * 100000, 400, "invalid-json")]
    for raw, status, reason in cases:
        resp = notify(svc, None, raw=raw)
        assert resp.status_code == status, raw[:40]
        assert resp.get_json()["error"] == reason
    assert queued(svc) == []
    eventually(lambda: ignored(svc, "delete") > before, what="the delete counted")


def test_a_queue_that_takes_nothing_is_a_5xx_so_medplum_retries(
        services: Services, providers: ProviderSandbox) -> None:
    from web.app import create_app
    from worker.settings import load_settings

    svc = service(services, providers, worker=False)
    # The same service pointed at a Redis that is not there: nothing can be queued.
    env = {**svc.env, "REDIS_URL": f"redis://127.0.0.1:{devstack.free_port()}/0"}
    app = create_app(load_settings(env))
    data = json.dumps({"resourceType": "Communication", "id": "c1"}).encode()
    resp = app.test_client().post(PATH, data=data, headers={
        "X-Signature": hmac.new(SECRET.encode(), data, hashlib.sha256).hexdigest()})
    assert resp.status_code == 503


# -- the worker ------------------------------------------------------------------------------

def test_a_reply_notified_three_times_goes_out_once(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = service(services, providers_clean)
    comm = clinician_reply(sandbox, patient(sandbox))
    start = finished(svc)
    for _ in range(3):  # Medplum retries a delivery it thinks failed; all three arrive
        assert notify(svc, comm).status_code == 200
    stored = recorded(sandbox, comm["id"], svc.settings.message_id_system)
    wait_finished(svc, start + 3)
    (req,) = providers_clean.requests("twilio")
    assert req["form"]["Body"] == "Your results are ready"
    sids = [i["value"] for i in stored["identifier"]
            if i["system"] == svc.settings.message_id_system]
    assert sids == [req["message_sid"]]


def test_a_reply_also_posted_to_the_api_goes_out_once(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = service(services, providers_clean)
    comm = clinician_reply(sandbox, patient(sandbox))
    start = finished(svc)
    assert notify(svc, comm).status_code == 200
    resp = svc.app().test_client().post(
        "/v1/messages", json={"communication": f"Communication/{comm['id']}"},
        headers={"Authorization": f"Bearer {API_TOKEN}", "Prefer": "wait=25"})
    assert resp.status_code == 200, resp.get_json()
    wait_finished(svc, start + 1)
    recorded(sandbox, comm["id"], svc.settings.message_id_system)
    (req,) = providers_clean.requests("twilio")
    assert resp.get_json()["provider_id"] == req["message_sid"]


def test_a_stale_notification_of_a_sent_message_sends_nothing(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = service(services, providers_clean)
    comm = clinician_reply(sandbox, patient(sandbox))
    resp = svc.app().test_client().post(
        "/v1/messages", json={"communication": f"Communication/{comm['id']}"},
        headers={"Authorization": f"Bearer {API_TOKEN}", "Prefer": "wait=25"})
    assert resp.status_code == 200
    recorded(sandbox, comm["id"], svc.settings.message_id_system)
    before = ignored(svc, "already-sent")
    # The notification still carries the version before the send: the worker reads FHIR.
    assert notify(svc, comm).status_code == 200
    eventually(lambda: ignored(svc, "already-sent") > before, what="ignored as already sent")
    assert len(providers_clean.requests("twilio")) == 1


def test_a_patients_own_message_is_never_echoed(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = service(services, providers_clean)
    number = "+15553330001"
    sandbox.patient(number)
    params = sms_params(number, "Can I move my appointment?")
    assert post_signed(svc.app().test_client(), params).status_code == 200
    (written,) = eventually(lambda: sandbox.messages(params["MessageSid"]),
                            what="the inbound message written")
    before = ignored(svc, "from-patient")
    assert notify(svc, written).status_code == 200
    eventually(lambda: ignored(svc, "from-patient") > before, what="ignored as the patient's")
    # Even a notification that lies about the sender: the worker reads the stored message.
    lying = {**written, "sender": {"reference": "Practitioner/x"}}
    assert notify(svc, lying).status_code == 200
    eventually(lambda: ignored(svc, "from-patient") > before + 1, what="ignored again")
    assert providers_clean.requests() == []


def test_the_sandbox_records_the_author_of_each_write_as_medplum_does(
        sandbox: Sandbox) -> None:
    """meta.author comes from the login, whatever the body says, and is shown only to a
    request that asks for `X-Medplum: extended` (Medplum's Repository.getAuthor and
    removeHiddenFields)."""
    pat = patient(sandbox)
    forged = {"resourceType": "Communication", "status": "in-progress",
              "meta": {"author": {"reference": "Practitioner/forged"}}}
    as_patient = sandbox.write_as(f"Patient/{pat['id']}", forged)
    assert as_patient["meta"]["author"] == {"reference": f"Patient/{pat['id']}"}
    as_client = sandbox.fhir.create(forged).resource  # client credentials: the application
    assert "author" not in as_client["meta"]
    stored = sandbox.read_extended("Communication", as_client["id"])
    assert stored["meta"]["author"] == {"reference": "ClientApplication/switchboard-test"}


def test_only_what_the_clinic_wrote_to_the_threads_patient_is_sent(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    """Issue 26, finding 8: `sender` and `recipient` are the client's word; meta.author is the
    server's. Sent: a Practitioner's reply, and a configured ClientApplication's. Not sent: a
    reply naming another patient as recipient, one with no sender, an internal note, and
    anything a patient (or an unconfigured app) wrote, whatever sender it claims."""
    svc = service(services, providers_clean, AUTOMATIC_OUTBOUND_CLIENTS="ehr-bot")
    a = patient(sandbox, phone="+15556660001", email=None)
    b = patient(sandbox, phone="+15556660002", email=None)
    doctor = clinician(sandbox)
    b_thread = thread(sandbox, b)
    start = finished(svc)
    cases = {
        "sent": reply(sandbox, b_thread, b, "from the doctor", doctor),
        "sent-by-bot": reply(sandbox, b_thread, b, "from the EHR bot", "ClientApplication/ehr-bot"),
        "recipient-not-in-thread": reply(sandbox, b_thread, b, "B's thread to A", doctor,
                                         recipient=[{"reference": f"Patient/{a['id']}"}]),
        "no-sender": reply(sandbox, b_thread, b, "no sender", doctor, sender=None),
        "internal-note": reply(sandbox, b_thread, b, "note to a colleague", doctor,
                               recipient=[{"reference": doctor}]),
        "not-clinic-author": reply(sandbox, b_thread, b, "a patient posing as the doctor",
                                   f"Patient/{a['id']}", sender={"reference": doctor},
                                   meta={"author": {"reference": doctor}}),
        "app-not-configured": reply(sandbox, b_thread, b, "another app", "ClientApplication/x",
                                    sender={"reference": doctor}),
    }
    before = {r: ignored(svc, r) for r in ("no-sender", "internal-note", "not-clinic-author")}
    for comm in cases.values():
        assert notify(svc, comm).status_code == 200
    (dead,) = eventually(lambda: svc.dead_letters.query(reason="recipient-not-in-thread"),
                         timeout=30, what="the reply to another patient refused")
    wait_finished(svc, start + len(cases) - 1)  # and the one above dead-lettered
    sent = sorted(r["form"]["Body"] for r in providers_clean.requests("twilio"))
    assert sent == ["from the EHR bot", "from the doctor"]
    assert {r["form"]["To"] for r in providers_clean.requests("twilio")} == {"+15556660002"}
    assert ignored(svc, "no-sender") == before["no-sender"] + 1
    assert ignored(svc, "internal-note") == before["internal-note"] + 1
    assert ignored(svc, "not-clinic-author") == before["not-clinic-author"] + 2
    assert dead.args[0]["communication"] == cases["recipient-not-in-thread"]["id"]
    refused = sandbox.fhir.read("Communication", cases["recipient-not-in-thread"]["id"]).resource
    assert refused["status"] == "stopped"
    assert refused["statusReason"]["coding"][0]["code"] == "recipient-not-in-thread"


def test_a_notification_of_a_deleted_or_unknown_message_sends_nothing(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = service(services, providers_clean)
    before = ignored(svc, "deleted")
    assert notify(svc, {"resourceType": "Communication", "id": "no-such-message"}
                  ).status_code == 200
    eventually(lambda: ignored(svc, "deleted") > before, what="ignored as gone")
    assert providers_clean.requests() == []


# -- install and status ----------------------------------------------------------------------

def cli(svc: Service, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.ops.cli", "subscription", *args],
                          env={**svc.env, **env, "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=60, check=False)


def test_install_twice_makes_one_subscription_and_status_shows_it(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox) -> None:
    svc = service(services, providers, worker=False)
    first = cli(svc, "install")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("created Subscription/")
    second = cli(svc, "install")
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("updated Subscription/")
    (only,) = sandbox.all("Subscription")
    assert only["id"] in first.stdout and only["id"] in second.stdout
    assert only["criteria"] == sub.CRITERIA
    assert only["channel"]["endpoint"] == "https://switchboard.test/webhooks/fhir/subscription"
    assert sub.extension_value(only, sub.SECRET_EXTENSION) == SECRET
    status = cli(svc, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "matches FHIR_SUBSCRIPTION_SECRET" in status.stdout
    assert "failed deliveries recorded (AuditEvent): 0" in status.stdout
    assert SECRET not in status.stdout + first.stdout + second.stdout
    other = cli(svc, "status", FHIR_SUBSCRIPTION_SECRET="rotated")
    assert other.returncode == 1 and "DIFFERS" in other.stdout


def test_install_against_a_server_that_refuses(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox) -> None:
    svc = service(services, providers, worker=False)
    sandbox.fault(status=403, method="PUT", path_contains="Subscription")
    done = cli(svc, "install")
    assert done.returncode == 1
    assert "FAIL install: the FHIR server refused (HTTP 403)" in done.stderr
    assert "write access to Subscription" in done.stderr
    assert sandbox.all("Subscription") == []
    unset = cli(svc, "install", FHIR_SUBSCRIPTION_SECRET="")
    assert unset.returncode == 2 and "FHIR_SUBSCRIPTION_SECRET is not set" in unset.stderr
    none = cli(svc, "status")
    assert none.returncode == 1 and "switchboard subscription install" in none.stdout


# -- end to end: the sandbox delivers as Medplum does ----------------------------------------

def test_end_to_end_through_the_sandboxs_own_delivery(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox,
        log_dir: Path) -> None:
    svc = service(services, providers_clean)
    port = devstack.free_port()
    web = devstack.start_web(svc.env, log_dir, port, workers=1, name=f"web-sub-{port}")
    try:
        sub.install(sandbox.fhir, f"http://127.0.0.1:{port}", SECRET)
        pat = patient(sandbox)
        # A clinician writes a reply straight into FHIR, and calls nothing else.
        comm = clinician_reply(sandbox, pat, "Written in Medplum")
        stored = recorded(sandbox, comm["id"], svc.settings.message_id_system)
        (req,) = providers_clean.requests("twilio")
        assert req["form"]["Body"] == "Written in Medplum"
        # Our own update of the message (the provider id) did not notify us again, and the
        # thread header (no partOf) was never a notification.
        stats = eventually(lambda: (s := sandbox.stats()["subscriptions"])["deliveries"] >= 1
                           and s, what="the delivery counted")
        assert stats == {"deliveries": 1, "failures": 0}
        assert stored["status"] == "in-progress"
    finally:
        web.stop()


def test_bursts_of_replies_at_the_default_sms_pace_go_out_once_each_in_order(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox,
        log_dir: Path) -> None:
    """Issue 26, finding 1: clinicians write 2, 3 and 5 replies within a second into three
    threads, then one reply to a fourth patient, at the default pace (1 SMS/s). Each run
    that waits for its slot re-queues the task with that slot; the next run sends at it.
    (Before: the re-queued run took a fresh slot, further in debt each time, and nothing
    after the first reply ever went out.)"""
    svc = services.get(**outbound_env(providers_clean, FHIR_SUBSCRIPTION_SECRET=SECRET,
                                      SMS_RATE_PER_SECOND="1"))
    port = devstack.free_port()
    web = devstack.start_web(svc.env, log_dir, port, workers=1, name=f"web-burst-{port}")
    try:
        sub.install(sandbox.fhir, f"http://127.0.0.1:{port}", SECRET)
        start = finished(svc)
        deferred = counter(svc, "switchboard_tasks", TASK, "deferred")
        doctor = clinician(sandbox)
        written: dict[str, list[str]] = {}  # the patient's number -> replies, in write order
        comm_ids = []
        for n, burst in enumerate([2, 3, 5, 1]):
            number = f"+1555444{n:04d}"
            pat = patient(sandbox, phone=number, email=None)
            header = thread(sandbox, pat)
            for k in range(burst):
                text = f"thread {n} reply {k + 1} of {burst}"
                comm_ids.append(reply(sandbox, header, pat, text, doctor)["id"])
                written.setdefault(number, []).append(text)
        total = len(comm_ids)
        for comm_id in comm_ids:
            recorded(sandbox, comm_id, svc.settings.message_id_system)
        eventually(lambda: finished(svc) >= start + total, timeout=60,
                   what="every subscription task finished")
        sends = sorted(providers_clean.requests("twilio"), key=lambda r: r["at"])
        # Exactly once each, and in the order written within each thread.
        assert sorted(r["form"]["Body"] for r in sends) == sorted(
            t for texts in written.values() for t in texts)
        for number, texts in written.items():
            assert [r["form"]["Body"] for r in sends if r["form"]["To"] == number] == texts
        assert svc.dead_letters.count() == 0
        waits = counter(svc, "switchboard_tasks", TASK, "deferred") - deferred
        # Reported, not asserted (no timed assertions): how far past its slot each went out.
        late = sorted(r["at"] - (sends[0]["at"] + i) for i, r in enumerate(sends))
        print(f"\nburst sends beyond their slots: p50 {late[len(late) // 2]:.2f} s, "
              f"max {late[-1]:.2f} s over {total} replies, {waits:.0f} deferrals")
    finally:
        web.stop()


def test_a_wait_that_never_ends_is_dead_lettered_not_cycled(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    """A reply waits for the earlier reply of its thread, whose notification never came (so
    it never goes out): after MAX_DEFERRALS deferrals the waiting one is dead-lettered as
    `deferral-loop`, replayable without its count, and nothing is sent out of order."""
    svc = services.get(**outbound_env(providers_clean, FHIR_SUBSCRIPTION_SECRET=SECRET,
                                      MAX_DEFERRALS="2"))
    pat = patient(sandbox)
    header = thread(sandbox, pat)
    reply(sandbox, header, pat, "written first, never notified")
    second = reply(sandbox, header, pat, "written second")
    assert notify(svc, second).status_code == 200
    (entry,) = eventually(lambda: svc.dead_letters.query(reason="deferral-loop"), timeout=30,
                          what="the endless wait dead-lettered")
    assert entry.task == TASK and "deferred 2 times (thread-order)" in entry.detail
    assert entry.args == [{"communication": second["id"]}]  # a replay starts afresh
    assert providers_clean.requests() == []


def test_failed_deliveries_are_retried_and_shown_by_status(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = service(services, providers_clean, worker=False)
    # Nothing listens at this endpoint: every attempt fails and Medplum records each one.
    closed = f"http://127.0.0.1:{devstack.free_port()}"
    sub.install(sandbox.fhir, closed, SECRET)
    message_in_thread(sandbox, patient(sandbox), "SMSWRIT")
    eventually(lambda: sandbox.stats()["subscriptions"]["failures"] >= 2, timeout=30,
               what="a failed attempt retried")
    status = cli(svc, "status", PUBLIC_BASE_URL=closed)
    assert "failed deliveries recorded (AuditEvent): " in status.stdout
    count = int(status.stdout.split("failed deliveries recorded (AuditEvent): ")[1].split()[0])
    assert count >= 2
    assert "Attempt 1 received error" in status.stdout


def test_subscription_logs_hold_no_contacts_bodies_or_secrets(log_dir: Path) -> None:
    """Runs after the flows above: every worker and web log of the session."""
    from tests.integration.test_outbound import MOBILE

    text = our_logs(log_dir)
    assert f"{TASK}[" in text  # the subscription flows were logged at all
    for needle in (SECRET, MOBILE, MOBILE[2:], "+15553330001", "5553330001",
                   "Written in Medplum", "Your results are ready", "move my appointment"):
        assert needle not in text, needle
