"""WhatsApp end to end: signed webhooks → real worker → FHIR sandbox; replies through the
provider sandbox (the real Twilio SDK), which enforces the 24-hour window as Twilio does."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import API_TOKEN, CLINIC_SMS, Service, Services, outbound_env
from tests.integration.test_operations import cli
from tests.integration.test_outbound import state
from tests.support import (
    ProviderSandbox,
    Sandbox,
    eventually,
    our_logs,
    post_signed,
    sms_params,
    whatsapp_params,
)
from worker.fhir.resources import SWITCHBOARD_MEDIUM
from worker.outbound.reconcile import reconcile_stuck
from worker.outbound.status_map import READ_AT_EXTENSION
from worker.outbound.whatsapp import REFUSED_SID_SYSTEM, expire_held, refused_outside_window
from worker.runtime import build_runtime

# Each test its own patient: the services keep their Redis (and so its windows) across tests.
PATIENT_0 = "+15553334444"
PATIENT_1 = "+15553334445"
PATIENT_2 = "+15553334446"
PATIENT_3 = "+15553334447"
PATIENT_4 = "+15553334448"
PATIENT_5 = "+15553334449"
PATIENT_6 = "+15553334450"
PATIENT_7 = "+15553334451"
PATIENT_8 = "+15553334452"
CLINIC_WA = "whatsapp:" + CLINIC_SMS
TEMPLATE = "HX" + "b" * 32
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
WHATSAPP_ENV = {"TWILIO_WHATSAPP_FROM": CLINIC_WA, "WHATSAPP_TEMPLATE_CONTENT_SID": TEMPLATE,
                "WHATSAPP_TEMPLATE_VARIABLES": '{"1": "Riverside Clinic"}',
                "WHATSAPP_RATE_PER_SECOND": "50", "SMS_THREAD_STRATEGY": "conversation"}


@pytest.fixture()
def providers_clean(providers: ProviderSandbox) -> ProviderSandbox:
    """The provider sandbox, emptied for this test."""
    providers.reset()
    return providers


def service(services: Services, providers: ProviderSandbox, **overrides: str) -> Service:
    return services.get(**outbound_env(providers, **{**WHATSAPP_ENV, **overrides}))


def inbound(svc: Service, sandbox: Sandbox, providers: ProviderSandbox,
            params: dict[str, str]) -> dict[str, Any]:
    """Deliver a signed WhatsApp webhook (the sandbox learns of it: the window opens there too)
    and wait for its Communication."""
    providers.whatsapp_window(params["From"], params["To"], time.time())
    resp = post_signed(svc.app().test_client(), params)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    found = eventually(lambda: sandbox.messages(params["MessageSid"]),
                       what=f"message {params['MessageSid']}")
    assert len(found) == 1
    return found[0]


def api_send(svc: Service, body: dict[str, Any], wait: int = 20) -> dict[str, Any]:
    resp = svc.app().test_client().post("/v1/messages", json=body,
                                        headers={**AUTH, "Prefer": f"wait={wait}"})
    return dict(resp.get_json())


def to_patient(svc: Service, patient: dict[str, Any], text: str) -> dict[str, Any]:
    """A new message to the patient, forced on WhatsApp through the API (its first verdict)."""
    return api_send(svc, {"resourceType": "Communication", "status": "in-progress",
                          "recipient": [{"reference": f"Patient/{patient['id']}"}],
                          "payload": [{"contentString": text}], "channel": "whatsapp"})


def reply(thread: str, text: str) -> dict[str, Any]:
    return {"resourceType": "Communication", "status": "in-progress",
            "partOf": [{"reference": thread}], "payload": [{"contentString": text}]}


def refused_by_twilio(svc: Service, sandbox: Sandbox, providers: ProviderSandbox,
                      patient: str, text: str) -> dict[str, Any]:
    """A reply in the patient's WhatsApp thread, sent free-form (our window is open) and
    failed by Twilio with 63016 (the window closed there); the API request's state."""
    sandbox.patient(patient)
    msg = inbound(svc, sandbox, providers, whatsapp_params(patient, "hello"))
    providers.whatsapp_window("whatsapp:" + patient, CLINIC_WA, None)
    done = api_send(svc, reply(msg["partOf"][0]["reference"], text))
    assert done["status"] == "sent", done
    refused = eventually(lambda: [m for m in providers.messages()
                                  if m["sid"] == done["provider_id"]
                                  and m["error_code"] == 63016], what="the sandbox's 63016")
    assert refused[0]["status"] == "failed"
    return done


def twilio_sends(providers: ProviderSandbox) -> list[dict[str, Any]]:
    return [r for r in providers.requests("twilio") if r["method"] == "POST"]


def status_callback(svc: Service, patient: str, sid: str, status: str, **extra: str) -> None:
    params = {"MessageSid": sid, "MessageStatus": status, "AccountSid": "ACtest",
              "From": CLINIC_WA, "To": "whatsapp:" + patient, "ChannelPrefix": "whatsapp",
              "ChannelToAddress": patient, **extra}
    resp = post_signed(svc.app().test_client(), params, "/webhooks/twilio/status")
    assert resp.status_code == 200, resp.get_data(as_text=True)


def test_whatsapp_lands_in_its_own_thread_and_the_reply_goes_back_by_whatsapp(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox,
        log_dir: Any) -> None:
    svc = service(services, providers_clean)
    patient = sandbox.patient(PATIENT_0)
    sms = sms_params(PATIENT_0, "by text")
    assert post_signed(svc.app().test_client(), sms).status_code == 200
    eventually(lambda: sandbox.messages(sms["MessageSid"]), what="the SMS")
    params = whatsapp_params(PATIENT_0, "my rash is worse", profile_name="Zelda Quartermain",
                             NumMedia="1", MediaUrl0="https://api.twilio.com/m/wa1",
                             MediaContentType0="image/jpeg")
    msg = inbound(svc, sandbox, providers_clean, params)
    assert msg["sender"]["reference"] == f"Patient/{patient['id']}"
    assert msg["medium"][0]["coding"][0] == {"system": SWITCHBOARD_MEDIUM, "code": "whatsapp",
                                             "display": "WhatsApp"}
    assert msg["payload"][1]["contentAttachment"]["url"] == "https://api.twilio.com/m/wa1"
    headers = {h["identifier"][0]["value"]: h for h in sandbox.headers()}
    # A WhatsApp thread apart from the SMS thread of the same patient.
    assert set(headers) == {f"sms:{PATIENT_0}:{CLINIC_SMS}", f"whatsapp:{PATIENT_0}:{CLINIC_SMS}"}
    wa_header = headers[f"whatsapp:{PATIENT_0}:{CLINIC_SMS}"]
    assert msg["partOf"][0]["reference"] == f"Communication/{wa_header['id']}"
    assert wa_header["medium"][0]["coding"][0]["code"] == "whatsapp"
    assert wa_header["topic"]["text"] == "WhatsApp conversation"

    done = api_send(svc, reply(f"Communication/{wa_header['id']}", "Please send a photo"))
    assert done["status"] == "sent" and done["channel"] == "whatsapp", done
    (sent,) = twilio_sends(providers_clean)
    assert sent["form"]["To"] == "whatsapp:" + PATIENT_0 and sent["form"]["From"] == CLINIC_WA
    assert sent["form"]["Body"] == "Please send a photo" and "ContentSid" not in sent["form"]
    comm_id = done["communication"]
    stored = eventually(lambda: (c := sandbox.fhir.read("Communication", comm_id).resource)
                        .get("sent") and c, what="the send recorded")
    assert stored["medium"][0]["coding"][0]["code"] == "whatsapp"

    # `read` is recorded (when), and a late `delivered` moves nothing back.
    status_callback(svc, PATIENT_0, done["provider_id"], "read")
    read = eventually(lambda: (c := sandbox.fhir.read("Communication", comm_id).resource)
                      .get("extension") and c, what="read recorded")
    assert read["status"] == "completed"
    assert [e["url"] for e in read["extension"]] == [READ_AT_EXTENSION]
    status_callback(svc, PATIENT_0, done["provider_id"], "delivered")
    status_callback(svc, PATIENT_0, done["provider_id"], "read")
    time.sleep(1.5)
    again = sandbox.fhir.read("Communication", comm_id).resource
    assert again["status"] == "completed" and again["extension"] == read["extension"]

    # PHI: neither the profile name nor the number reaches our logs or Redis in clear.
    logs = our_logs(log_dir)
    assert "Zelda Quartermain" not in logs and PATIENT_0 not in logs
    for key in svc.redis.scan_iter("switchboard:whatsapp:*"):
        assert PATIENT_0[1:].encode() not in key
        if svc.redis.type(key) == b"string":
            assert PATIENT_0[1:].encode() not in (svc.redis.get(key) or b"")


def test_outside_the_window_the_template_goes_out_and_held_replies_follow_the_answer(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = service(services, providers_clean)
    patient = sandbox.patient(PATIENT_1)
    sent = [to_patient(svc, patient, text) for text in ("Your results are in", "Please call us")]
    assert [s["status"] for s in sent] == ["held", "held"], sent
    (template,) = twilio_sends(providers_clean)  # one template for the hold, no free text
    assert template["form"]["ContentSid"] == TEMPLATE and "Body" not in template["form"]
    assert template["form"]["ContentVariables"] == '{"1":"Riverside Clinic"}'
    held = sandbox.fhir.read("Communication", sent[0]["communication"]).resource
    assert held["status"] == "on-hold"
    assert held["statusReason"]["coding"][0]["code"] == "outside-whatsapp-window"
    # The patient answers: both replies go out, once each, in the order they were written.
    inbound(svc, sandbox, providers_clean, whatsapp_params(PATIENT_1, "hi, what is it?"))
    for s in sent:
        state(svc, s["id"], "sent")
    time.sleep(1)
    bodies = [r["form"].get("Body") for r in twilio_sends(providers_clean)]
    assert bodies == [None, "Your results are in", "Please call us"]
    assert sandbox.fhir.read("Communication", sent[0]["communication"]
                             ).resource["status"] == "in-progress"
    # Another answer releases nothing more.
    inbound(svc, sandbox, providers_clean, whatsapp_params(PATIENT_1, "thanks"))
    time.sleep(1.5)
    assert len(twilio_sends(providers_clean)) == 3


def test_twilio_63016_holds_the_reply_although_our_window_was_open(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = service(services, providers_clean)
    done = refused_by_twilio(svc, sandbox, providers_clean, PATIENT_2, "Free-form reply")
    # The callback Twilio posts (the sandbox's goes to the public URL, not this test app).
    status_callback(svc, PATIENT_2, done["provider_id"], "failed", ErrorCode="63016")
    state(svc, done["id"], "held")
    # The refused send is forgotten (its SID off the Communication, a note says why).
    comm = eventually(lambda: (c := sandbox.fhir.read("Communication", done["communication"])
                               .resource).get("note") and c, what="the refused send undone")
    assert comm["status"] == "on-hold"
    assert [i["system"] for i in comm["identifier"] if i["value"] == done["provider_id"]] == [
        REFUSED_SID_SYSTEM]
    # Twilio may post the callback again: still held, one template.
    status_callback(svc, PATIENT_2, done["provider_id"], "failed", ErrorCode="63016")
    forms = [r["form"] for r in twilio_sends(providers_clean)]
    assert forms[-1].get("ContentSid") == TEMPLATE
    inbound(svc, sandbox, providers_clean, whatsapp_params(PATIENT_2, "here I am"))
    again = state(svc, done["id"], "sent")
    assert again["provider_id"] != done["provider_id"]
    # A late copy of the refusal, after the reply went out anew, changes nothing.
    status_callback(svc, PATIENT_2, done["provider_id"], "failed", ErrorCode="63016")
    time.sleep(1.5)
    bodies = [r["form"].get("Body") for r in twilio_sends(providers_clean)]
    assert bodies == ["Free-form reply", None, "Free-form reply"]
    final = sandbox.fhir.read("Communication", done["communication"]).resource
    assert final["status"] == "in-progress"
    assert [i["value"] for i in final["identifier"]
            if i["system"] == svc.settings.message_id_system] == [again["provider_id"]]
    assert state(svc, done["id"], "sent")["provider_id"] == again["provider_id"]


def test_without_a_template_a_reply_outside_the_window_fails_with_its_reason(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = service(services, providers_clean, WHATSAPP_TEMPLATE_CONTENT_SID="")
    patient = sandbox.patient(PATIENT_3)
    done = to_patient(svc, patient, "x")
    assert done["status"] == "failed" and done["error"] == "outside-whatsapp-window", done
    comm = sandbox.fhir.read("Communication", done["communication"]).resource
    assert comm["status"] == "stopped"
    assert comm["statusReason"]["coding"][0]["code"] == "outside-whatsapp-window"
    assert twilio_sends(providers_clean) == []


def test_a_held_reply_expires_with_its_reason(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = service(services, providers_clean, WHATSAPP_HOLD_HOURS="0.0003")  # ~1 s
    patient = sandbox.patient(PATIENT_4)
    done = to_patient(svc, patient, "x")
    assert done["status"] == "held", done
    deps = build_runtime(svc.settings).outbound
    assert deps.whatsapp is not None
    assert [h.communication_id for h in deps.whatsapp.store.all()] == [done["communication"]]
    listed = cli(svc.env, "whatsapp", "held")
    assert listed.returncode == 0, listed.stderr
    assert f"Communication/{done['communication']}  request={done['id']}" in listed.stdout
    assert "1 held" in listed.stdout and PATIENT_4 not in listed.stdout
    time.sleep(1.5)
    assert expire_held(deps) == 1
    assert state(svc, done["id"], "failed")["error"] == "whatsapp-hold-expired"
    comm = sandbox.fhir.read("Communication", done["communication"]).resource
    assert comm["status"] == "stopped"
    assert comm["statusReason"]["coding"][0]["code"] == "whatsapp-hold-expired"
    assert deps.whatsapp.store.all() == []
    # The patient's answer now releases nothing.
    inbound(svc, sandbox, providers_clean, whatsapp_params(PATIENT_4, "too late"))
    time.sleep(1)
    assert [r["form"].get("ContentSid") for r in twilio_sends(providers_clean)] == [TEMPLATE]
    assert "0 held" in cli(svc.env, "whatsapp", "held").stdout



def test_stop_on_whatsapp_opts_out_of_whatsapp_and_start_opts_back_in(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = service(services, providers_clean)
    sandbox.patient(PATIENT_5)
    stop = inbound(svc, sandbox, providers_clean, whatsapp_params(PATIENT_5, "STOP"))
    eventually(lambda: "opt-out recorded" in svc.worker.output() if svc.worker else None,
               what="the opt-out")
    done = api_send(svc, reply(stop["partOf"][0]["reference"], "After STOP"))
    assert done["status"] == "failed" and done["error"] == "opted-out", done
    assert twilio_sends(providers_clean) == []
    inbound(svc, sandbox, providers_clean, whatsapp_params(PATIENT_5, "START"))
    eventually(lambda: "opt-in recorded" in svc.worker.output() if svc.worker else None,
               what="the opt-in")
    again = api_send(svc, reply(stop["partOf"][0]["reference"], "After START"))
    assert again["status"] == "sent" and again["channel"] == "whatsapp", again


@pytest.mark.parametrize("strategy", ["active-thread", "new-thread"])
def test_other_strategies_are_unchanged_by_whatsapp(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox,
        strategy: str) -> None:
    svc = service(services, providers_clean, SMS_THREAD_STRATEGY=strategy)
    sandbox.patient(PATIENT_5)
    sms = sms_params(PATIENT_5, "by text")
    assert post_signed(svc.app().test_client(), sms).status_code == 200
    first = eventually(lambda: sandbox.messages(sms["MessageSid"]), what="the SMS")[0]
    wa = inbound(svc, sandbox, providers_clean, whatsapp_params(PATIENT_5, "on WhatsApp"))
    assert wa["medium"][0]["coding"][0]["code"] == "whatsapp"
    # active-thread: the patient's open thread, whatever the channel; new-thread: its own.
    same = wa["partOf"] == first["partOf"]
    assert same is (strategy == "active-thread")



def test_a_63016_answered_by_the_api_takes_the_same_path(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = service(services, providers_clean)
    sandbox.patient(PATIENT_6)
    msg = inbound(svc, sandbox, providers_clean, whatsapp_params(PATIENT_6, "hello"))
    providers_clean.fault(provider="twilio", to="whatsapp:" + PATIENT_6, status=400,
                          twilio_code=63016, count=1)
    done = api_send(svc, reply(msg["partOf"][0]["reference"], "Refused at once"))
    assert done["status"] == "held", done
    forms = [r["form"] for r in twilio_sends(providers_clean)]
    assert [f.get("Body") for f in forms] == ["Refused at once", None]
    assert forms[1]["ContentSid"] == TEMPLATE
    inbound(svc, sandbox, providers_clean, whatsapp_params(PATIENT_6, "back again"))
    assert state(svc, done["id"], "sent")["channel"] == "whatsapp"
    assert [r["form"].get("Body") for r in twilio_sends(providers_clean)] == [
        "Refused at once", None, "Refused at once"]


def test_a_held_reply_the_clinic_withdrew_is_not_sent_when_the_window_opens(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = service(services, providers_clean)
    patient = sandbox.patient(PATIENT_8)
    held = [to_patient(svc, patient, text) for text in ("Wrong patient, sorry", "Still wanted")]
    assert [h["status"] for h in held] == ["held", "held"], held
    withdrawn = sandbox.fhir.read("Communication", held[0]["communication"]).resource
    sandbox.fhir.update({**withdrawn, "status": "entered-in-error"})
    inbound(svc, sandbox, providers_clean, whatsapp_params(PATIENT_8, "yes?"))
    assert state(svc, held[1]["id"], "sent")
    assert state(svc, held[0]["id"], "failed")["error"] == "withdrawn"
    assert [r["form"].get("Body") for r in twilio_sends(providers_clean)] == [
        None, "Still wanted"]



def test_a_lost_63016_callback_is_found_by_the_reconciler_and_held(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox) -> None:
    svc = service(services, providers_clean)
    done = refused_by_twilio(svc, sandbox, providers_clean, PATIENT_7, "Callback lost")
    # Its callback went to the public URL, which is not this test's app: it was lost.
    rt = build_runtime(svc.settings)
    sms = rt.outbound.channels["sms"]
    counts = reconcile_stuck(
        rt.fhir, sms, svc.settings.message_id_system,  # type: ignore[arg-type]
        svc.settings.outbound_request_system, rt.outbound.state, rt.metrics, stuck_after=0,
        now=datetime.now(UTC) + timedelta(seconds=5),
        outside_window=lambda c, r, p: refused_outside_window(
            rt.outbound, c, r, p, svc.settings.message_id_system))
    assert counts["checked"] == 1, counts
    assert state(svc, done["id"], "held")
    assert sandbox.fhir.read("Communication", done["communication"]).resource[
        "status"] == "on-hold"
    assert [r["form"].get("ContentSid") for r in twilio_sends(providers_clean)][-1] == TEMPLATE
