"""Push end to end: API → worker → FHIR Devices → the real google-auth and FCM HTTP v1 calls,
answered by the provider sandbox (OAuth token endpoint + messages:send)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_TOKEN, Service, Services, outbound_env
from tests.support import ProviderSandbox, Sandbox, eventually, our_logs
from worker.fhir.query import token as token_param
from worker.ops import devstack

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
DEVICE_SYSTEM = "urn:switchboard:fcm-token"
PUSH_ID_SYSTEM = "https://fcm.googleapis.com/v1/message-name"
SECRET_TEXT = "Your biopsy came back qx9z"
# Every token used here, for the log scan at the end of this module.
TOKENS: list[str] = []


def new_token() -> str:
    """A fresh token shaped like FCM's (and easy to find in a log)."""
    tok = f"fcmtok{uuid.uuid4().hex}:APA91b{uuid.uuid4().hex}"
    TOKENS.append(tok)
    return tok


@pytest.fixture(scope="module")
def service_account(providers: ProviderSandbox, tmp_path_factory: pytest.TempPathFactory
                    ) -> Path:
    """A service-account file whose token_uri is the provider sandbox."""
    return devstack.write_sandbox_service_account(
        tmp_path_factory.mktemp("fcm") / "service-account.json", providers.origin)


@pytest.fixture()
def fcm(providers: ProviderSandbox) -> ProviderSandbox:
    """The provider sandbox, emptied for this test."""
    providers.reset()
    return providers


def push_service(services: Services, providers: ProviderSandbox, account: Path,
                 **overrides: str) -> Service:
    return services.get(**outbound_env(providers, FCM_CREDENTIALS_FILE=str(account),
                                       FCM_API_BASE_URL=providers.origin,
                                       PUSH_RATE_PER_SECOND="50", **overrides))


def app_patient(sandbox: Sandbox) -> dict[str, Any]:
    """A patient reachable only through the app (no phone, no email)."""
    return sandbox.fhir.create({"resourceType": "Patient", "name": [{"family": "App"}]}).resource


def device(sandbox: Sandbox, pat: dict[str, Any], tok: str) -> dict[str, Any]:
    """A Device written as docs/channels.md tells a patient app to write it."""
    return sandbox.fhir.create({
        "resourceType": "Device", "status": "active",
        "identifier": [{"system": DEVICE_SYSTEM, "value": tok}],
        "patient": {"reference": f"Patient/{pat['id']}"}}).resource


def devices_with(sandbox: Sandbox, tok: str) -> list[dict[str, Any]]:
    return sandbox.all("Device", identifier=token_param(DEVICE_SYSTEM, tok))


def message(sandbox: Sandbox, pat: dict[str, Any], text: str = SECRET_TEXT) -> dict[str, Any]:
    header = sandbox.fhir.create({
        "resourceType": "Communication", "status": "in-progress",
        "subject": {"reference": f"Patient/{pat['id']}"}, "topic": {"text": "Results"}}).resource
    return sandbox.fhir.create({
        "resourceType": "Communication", "status": "in-progress",
        "partOf": [{"reference": f"Communication/{header['id']}"}],
        "recipient": [{"reference": f"Patient/{pat['id']}"}],
        "payload": [{"contentString": text}]}).resource


def send(svc: Service, comm: dict[str, Any], channel: str | None = "push",
         wait: int | None = 20) -> Any:
    body: dict[str, Any] = {"communication": f"Communication/{comm['id']}"}
    if channel:
        body["channel"] = channel
    headers = {**AUTH, **({"Prefer": f"wait={wait}"} if wait else {})}
    return svc.app().test_client().post("/v1/messages", json=body, headers=headers)


def state(svc: Service, request_id: str, *statuses: str, timeout: float = 60) -> dict[str, Any]:
    client = svc.app().test_client()

    def check() -> dict[str, Any] | None:
        body = client.get(f"/v1/messages/{request_id}", headers=AUTH).get_json()
        return body if body.get("status") in statuses else None

    return eventually(check, timeout=timeout, what=f"request {request_id} in {statuses}")


def pushes(providers: ProviderSandbox, tok: str | None = None) -> list[dict[str, Any]]:
    return providers.requests("fcm", to=tok)


def recorded(sandbox: Sandbox, comm_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        comm = sandbox.fhir.read("Communication", comm_id).resource
        ids = [i for i in comm.get("identifier") or [] if i.get("system") == PUSH_ID_SYSTEM]
        return comm if ids else None

    return eventually(check, what=f"push recorded on Communication/{comm_id}")


def test_push_to_one_device_says_nothing_of_the_message(
        services: Services, sandbox: Sandbox, fcm: ProviderSandbox,
        service_account: Path) -> None:
    svc = push_service(services, fcm, service_account)
    pat = app_patient(sandbox)
    tok = new_token()
    client = svc.app().test_client()
    resp = client.post("/v1/devices", json={"patient": f"Patient/{pat['id']}", "token": tok},
                       headers=AUTH)
    assert resp.status_code == 202, resp.get_json()
    eventually(lambda: devices_with(sandbox, tok), what="the Device")
    comm = message(sandbox, pat)
    resp = send(svc, comm)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["channel"] == "push"
    (push,) = pushes(fcm)
    assert push["to"] == tok and push["path"] == "/v1/projects/switchboard-sandbox/messages:send"
    sent = push["json"]["message"]
    assert sent["notification"] == {"title": "You have a new message"}  # no body by default
    assert sent["data"] == {"communication_id": comm["id"],
                            "communication": f"Communication/{comm['id']}"}
    assert SECRET_TEXT not in str(push["json"])
    # The OAuth token came from the service account's token_uri, through google-auth.
    (grant,) = fcm.requests("google")
    assert grant["answered"] == 200
    assert grant["json"]["claims"]["iss"].endswith(".iam.gserviceaccount.com")
    stored = recorded(sandbox, comm["id"])
    assert stored["medium"][0]["coding"][0]["code"] == "ONLINEWRIT"
    # Asking again pushes nothing more.
    again = send(svc, comm)
    assert again.status_code == 200 and len(pushes(fcm)) == 1


def test_registration_is_idempotent_moves_tokens_and_unregisters(
        services: Services, sandbox: Sandbox, fcm: ProviderSandbox,
        service_account: Path) -> None:
    svc = push_service(services, fcm, service_account)
    first, second = app_patient(sandbox), app_patient(sandbox)
    tok = new_token()
    client = svc.app().test_client()
    for _ in range(3):
        assert client.post("/v1/devices", json={"patient": f"Patient/{first['id']}",
                                                "token": tok}, headers=AUTH).status_code == 202
    eventually(lambda: svc.redis.llen("outbound") == 0 and svc.redis.hlen("unacked") == 0,
               what="registrations processed")
    (dev,) = eventually(lambda: devices_with(sandbox, tok), what="the Device")
    assert dev["status"] == "active" and dev["patient"]["reference"] == f"Patient/{first['id']}"
    # The phone changes hands: the same Device now belongs to the second patient.
    client.post("/v1/devices", json={"patient": f"Patient/{second['id']}", "token": tok},
                headers=AUTH)
    moved = eventually(lambda: [d for d in devices_with(sandbox, tok)
                                if d["patient"]["reference"] == f"Patient/{second['id']}"],
                       what="the Device moved")
    assert len(devices_with(sandbox, tok)) == 1 and moved[0]["id"] == dev["id"]
    assert client.delete(f"/v1/devices/{tok}", headers=AUTH).status_code == 202
    eventually(lambda: devices_with(sandbox, tok)[0]["status"] == "inactive",
               what="the Device inactive")
    # Hostile input is refused at the boundary, with a reason.
    bad = client.post("/v1/devices", json={"patient": "Patient/../x", "token": "short"},
                      headers=AUTH)
    assert bad.status_code == 422
    assert {f["field"] for f in bad.get_json()["fields"]} == {"patient", "token"}
    assert client.post("/v1/devices", json={"patient": f"Patient/{first['id']}",
                                            "token": tok}).status_code == 401
    assert client.delete("/v1/devices/not a token", headers=AUTH).status_code == 422


def test_three_devices_get_one_push_each(services: Services, sandbox: Sandbox,
                                         fcm: ProviderSandbox, service_account: Path) -> None:
    svc = push_service(services, fcm, service_account)
    pat = app_patient(sandbox)
    toks = [new_token() for _ in range(3)]
    devs = [device(sandbox, pat, t) for t in toks]
    comm = message(sandbox, pat)
    resp = send(svc, comm)
    assert resp.status_code == 200, resp.get_json()
    assert sorted(p["to"] for p in pushes(fcm)) == sorted(toks), (pushes(fcm), toks, TOKENS)
    stored = recorded(sandbox, comm["id"])
    notes = " ".join(n["text"] for n in stored.get("note") or [])
    for d in devs:  # each device's outcome, by Device id (never the token)
        assert f"push to Device/{d['id']}: sent as projects/" in notes
    assert not any(t in str(stored) for t in toks)


def test_unregistered_token_deactivates_its_device_and_the_next_send_skips_it(
        services: Services, sandbox: Sandbox, fcm: ProviderSandbox,
        service_account: Path) -> None:
    svc = push_service(services, fcm, service_account)
    pat = app_patient(sandbox)
    live, dead = new_token(), new_token()
    device(sandbox, pat, live)
    gone = device(sandbox, pat, dead)
    fcm.fault(provider="fcm", to=dead, fcm_code="UNREGISTERED")
    resp = send(svc, message(sandbox, pat))
    assert resp.status_code == 200, resp.get_json()  # one device accepted: sent
    stored = sandbox.fhir.read("Device", gone["id"]).resource
    assert stored["status"] == "inactive"
    assert stored["statusReason"][0]["coding"][0]["code"] == "UNREGISTERED"
    assert stored["note"][-1]["time"] and "UNREGISTERED" in stored["note"][-1]["text"]
    assert [p["answered"] for p in pushes(fcm, dead)] == [404]
    # The next message goes to the live device only.
    assert send(svc, message(sandbox, pat, "second")).status_code == 200
    assert len(pushes(fcm, live)) == 2 and len(pushes(fcm, dead)) == 1


def test_only_dead_devices_fail_the_message(services: Services, sandbox: Sandbox,
                                            fcm: ProviderSandbox,
                                            service_account: Path) -> None:
    svc = push_service(services, fcm, service_account)
    pat = app_patient(sandbox)
    tok = new_token()
    device(sandbox, pat, tok)
    fcm.fault(provider="fcm", to=tok, fcm_code="SENDER_ID_MISMATCH")
    comm = message(sandbox, pat)
    resp = send(svc, comm)
    assert resp.status_code == 422 and resp.get_json()["error"] == "invalid-recipient"
    assert devices_with(sandbox, tok)[0]["status"] == "inactive"
    stored = sandbox.fhir.read("Communication", comm["id"]).resource
    assert stored["status"] == "stopped"
    # No active device left: a later message fails at once, without calling FCM.
    assert send(svc, message(sandbox, pat)).status_code == 422
    assert len(pushes(fcm)) == 1


def test_quota_exceeded_waits_for_retry_after(services: Services, sandbox: Sandbox,
                                              fcm: ProviderSandbox,
                                              service_account: Path) -> None:
    svc = push_service(services, fcm, service_account)
    pat = app_patient(sandbox)
    tok = new_token()
    device(sandbox, pat, tok)
    fcm.fault(provider="fcm", to=tok, status=429, retry_after=2)
    resp = send(svc, message(sandbox, pat), wait=None)
    state(svc, resp.get_json()["id"], "sent")
    first, second = pushes(fcm, tok)
    assert (first["answered"], second["answered"]) == (429, 200)
    # The first retry's own backoff is 0.1-0.2 s (FAST_RETRIES): the gap is FCM's Retry-After.
    assert second["at"] - first["at"] >= 2.0


def test_unavailable_is_retried_and_pushed_once(services: Services, sandbox: Sandbox,
                                                fcm: ProviderSandbox,
                                                service_account: Path) -> None:
    svc = push_service(services, fcm, service_account)
    pat = app_patient(sandbox)
    toks = [new_token(), new_token()]
    for t in toks:
        device(sandbox, pat, t)
    fcm.fault(provider="fcm", to=toks[1], status=503, count=2)
    resp = send(svc, message(sandbox, pat), wait=None)
    state(svc, resp.get_json()["id"], "sent")
    assert [p["answered"] for p in pushes(fcm, toks[0])] == [200]  # not pushed again
    assert [p["answered"] for p in pushes(fcm, toks[1])] == [503, 503, 200]


def test_channel_order_may_put_push_first(services: Services, sandbox: Sandbox,
                                          fcm: ProviderSandbox, service_account: Path) -> None:
    svc = push_service(services, fcm, service_account, CHANNEL_ORDER="push,sms,email")
    with_app = sandbox.fhir.create({"resourceType": "Patient", "telecom": [
        {"system": "phone", "value": "+15554443333", "use": "mobile"}]}).resource
    device(sandbox, with_app, new_token())
    assert send(svc, message(sandbox, with_app), channel=None).get_json()["channel"] == "push"
    without = sandbox.fhir.create({"resourceType": "Patient", "telecom": [
        {"system": "phone", "value": "+15554443334", "use": "mobile"}]}).resource
    assert send(svc, message(sandbox, without), channel=None).get_json()["channel"] == "sms"


def test_worker_killed_between_the_second_and_third_device_pushes_nobody_twice(
        services: Services, sandbox: Sandbox, fcm: ProviderSandbox, service_account: Path,
        log_dir: Path) -> None:
    # One push every 10 s: after the second device the task waits (a Deferred, held by the
    # worker) for the third device's slot, and the worker is killed in that gap.
    svc = services.get(worker=False, **outbound_env(
        fcm, FCM_CREDENTIALS_FILE=str(service_account), FCM_API_BASE_URL=fcm.origin,
        PUSH_RATE_PER_SECOND="0.1"))
    pat = app_patient(sandbox)
    toks = [new_token() for _ in range(3)]
    for t in toks:
        device(sandbox, pat, t)
    doomed = devstack.start_worker(svc.env, log_dir, name="worker-push-doomed", concurrency=2)
    resp = send(svc, message(sandbox, pat), wait=None)
    try:
        # Pushed devices only ever grow: wait for two (a loaded machine may take a while).
        eventually(lambda: len(pushes(fcm)) >= 2, timeout=120, what="two devices pushed")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; pushes {pushes(fcm)}; worker log tail: "
                             f"{doomed.output()[-3000:]}") from None
    finally:
        doomed.kill()
    assert len(pushes(fcm)) == 2  # really between the second and the third
    replacement = devstack.start_worker(svc.env, log_dir, name="worker-push-replacement",
                                        concurrency=2)
    try:
        state(svc, resp.get_json()["id"], "sent", timeout=120)
        assert sorted(p["to"] for p in pushes(fcm)) == sorted(toks)  # each exactly once
        assert all(p["answered"] == 200 for p in pushes(fcm))
        assert svc.dead_letters.count() == 0
    finally:
        replacement.stop()


def test_push_logs_hold_no_tokens_or_bodies(log_dir: Path) -> None:
    """Runs after the flows above: every worker and web log of the session."""
    text = our_logs(Path(log_dir))
    assert "sent by push" in text  # the push flows were logged at all
    assert TOKENS
    for needle in (*TOKENS, "fcmtok", "APA91b", SECRET_TEXT, "qx9z", "ya29.sandbox"):
        assert needle not in text, needle


def test_sandbox_checks_the_grant_and_the_bearer(fcm: ProviderSandbox) -> None:
    """The sandbox refuses what Google would: a malformed assertion, a push without a token."""
    import httpx

    with httpx.Client(base_url=fcm.origin, timeout=10) as http:
        bad = http.post("/oauth2/token", data={
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": "a.b"})
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"
        anon = http.post("/v1/projects/p/messages:send", json={"message": {"token": "t" * 30}})
        assert anon.status_code == 401 and anon.json()["error"]["status"] == "UNAUTHENTICATED"
