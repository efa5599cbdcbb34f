"""Twilio Conversations end to end: the provider sandbox's Conversations (signed webhooks, the
REST API the real SDK calls) → receiver → Redis → a real worker → the FHIR sandbox, and back."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import redis

from tests import at_rest
from tests.conftest import API_TOKEN, CLINIC_SMS, Service, Services, outbound_env
from tests.support import (
    AUTH_TOKEN,
    PUBLIC_BASE_URL,
    ProviderSandbox,
    Sandbox,
    eventually,
    our_logs,
    sign,
)
from worker.channels.twilio_conversations import (
    CONVERSATION_SYSTEM,
    MESSAGE_SYSTEM,
    WEBHOOK_PATH,
)
from worker.fhir.query import token
from worker.fhir.resources import PARTICIPATION_MODE, SWITCHBOARD_MEDIUM

PATIENT = "+15553334444"
IDENTITY = "clinic-desk"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


class Conversations:
    """The provider sandbox's Conversations control routes (sandbox/providers/README.md)."""

    def __init__(self, providers: ProviderSandbox) -> None:
        self._http = httpx.Client(base_url=providers.origin, timeout=10)
        providers.reset()
        # Twilio signs over the URL configured for the webhook: ours, as the receiver knows it.
        self._http.post("/__conversations/webhook", json={
            "url": PUBLIC_BASE_URL + WEBHOOK_PATH, "post": False}).raise_for_status()

    def setup(self, address: str) -> dict[str, str]:
        proxy = ("whatsapp:" if address.startswith("whatsapp:") else "") + CLINIC_SMS
        resp = self._http.post("/__conversations/setup", json={
            "address": address, "proxy_address": proxy, "identity": IDENTITY})
        resp.raise_for_status()
        return dict(resp.json())

    def write(self, conv: dict[str, str], body: str, **extra: Any) -> dict[str, Any]:
        """The patient writes; returns the signed onMessageAdded Twilio would post."""
        resp = self._http.post("/__conversations/write", json={
            "conversation": conv["conversation_sid"], "participant": conv["participant_sid"],
            "body": body, **extra})
        resp.raise_for_status()
        return dict(resp.json()["webhook"])

    def delivery(self, message_sid: str, status: str) -> dict[str, Any]:
        resp = self._http.post("/__conversations/delivery", json={
            "message": message_sid, "status": status})
        resp.raise_for_status()
        return dict(resp.json())

    def webhooks(self) -> list[dict[str, Any]]:
        return list(self._http.get("/__conversations/webhooks").json())

    def messages(self, conversation_sid: str) -> list[dict[str, Any]]:
        return [m for m in self._http.get("/__conversations/messages").json()
                if m["conversation_sid"] == conversation_sid]

    def close(self) -> None:
        self._http.close()


@pytest.fixture()
def conversations(providers: ProviderSandbox) -> Any:
    conv = Conversations(providers)
    yield conv
    conv.close()


def service(services: Services, providers: ProviderSandbox) -> Service:
    return services.get(**outbound_env(providers, TWILIO_CONVERSATIONS_IDENTITY=IDENTITY))


def post(client: Any, webhook: dict[str, Any], signature: str | None = None) -> Any:
    """POST a webhook as the sandbox signed it (the signature Twilio sends with it)."""
    return client.post(WEBHOOK_PATH, data=urlencode(webhook["params"]), headers={
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": signature or webhook["signature"]})


def written(sandbox: Sandbox, sid: str) -> list[dict[str, Any]]:
    return sandbox.all("Communication", identifier=token(MESSAGE_SYSTEM, sid))


def processed(svc: Service, sid: str, times: int = 1) -> None:
    eventually(lambda: svc.worker.output().count(f"conversations {sid}: ") >= times,  # type: ignore[union-attr]
               what=f"{times} processed deliveries of {sid}")


def patient_wrote(client: Any, sandbox: Sandbox, conversations: Conversations, text: str
                  ) -> tuple[dict[str, str], dict[str, Any]]:
    """The patient (registered) writes `text` into a new Conversation; the Conversation and
    the Communication it made, once written."""
    sandbox.patient(PATIENT)
    conv = conversations.setup(PATIENT)
    inbound = conversations.write(conv, text)
    assert post(client, inbound).status_code == 200
    (msg,) = eventually(lambda: written(sandbox, inbound["params"]["MessageSid"]),
                        what="inbound message")
    return conv, msg


def test_five_deliveries_make_one_message_in_the_conversation_header(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox,
        conversations: Conversations) -> None:
    svc = service(services, providers)
    patient = sandbox.patient(PATIENT)
    conv = conversations.setup(PATIENT)
    webhook = conversations.write(conv, "Can I move my appointment?", media=[
        {"content_type": "image/png", "filename": "card.png", "data_b64": "iVBORw0KGgo="}])
    sid = webhook["params"]["MessageSid"]
    app = svc.app()
    with cf.ThreadPoolExecutor(5) as pool:
        codes = list(pool.map(lambda _: post(app.test_client(), webhook).status_code, range(5)))
    assert codes == [200] * 5
    processed(svc, sid, times=5)
    (msg,) = written(sandbox, sid)
    (header,) = sandbox.headers()
    assert header["identifier"] == [{"system": CONVERSATION_SYSTEM,
                                     "value": conv["conversation_sid"]}]
    assert CONVERSATION_SYSTEM == "https://twilio.com"
    assert msg["partOf"] == [{"reference": f"Communication/{header['id']}"}]
    assert msg["sender"]["reference"] == f"Patient/{patient['id']}"
    assert header["subject"]["reference"] == f"Patient/{patient['id']}"
    for resource in (msg, header):
        assert resource["medium"][0]["coding"][0]["system"] == PARTICIPATION_MODE
        assert resource["medium"][0]["coding"][0]["code"] == "SMSWRIT"
    media = webhook["params"]["Media"]
    assert msg["payload"][0] == {"contentString": "Can I move my appointment?"}
    attachment = msg["payload"][1]["contentAttachment"]
    assert attachment["contentType"] == "image/png" and attachment["title"] == "card.png"
    assert attachment["url"].startswith("https://mcs.us1.twilio.com/v1/Services/IS")
    assert attachment["url"].rsplit("/", 1)[1] in media
    # The media link is the MCS resource the sandbox serves (as Twilio does, with credentials).
    path = attachment["url"].removeprefix("https://mcs.us1.twilio.com")
    content = httpx.get(providers.origin + path + "/Content", auth=("ACtest", AUTH_TOKEN))
    assert content.status_code == 200 and content.content.startswith(b"\x89PNG")

    # A second message of the same Conversation joins the same header in one write.
    again = conversations.write(conv, "Thursday works")
    assert post(app.test_client(), again).status_code == 200
    (second,) = eventually(lambda: written(sandbox, again["params"]["MessageSid"]),
                           what="second message")
    assert second["partOf"] == msg["partOf"]
    assert len(sandbox.headers()) == 1
    assert svc.dead_letters.count() == 0


def test_a_chat_author_is_found_by_the_participants_whatsapp_binding(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox,
        conversations: Conversations) -> None:
    svc = service(services, providers)
    patient = sandbox.patient(PATIENT)
    conv = conversations.setup("whatsapp:" + PATIENT)
    # Author is not an address: the worker reads the participant through the SDK.
    webhook = conversations.write(conv, "Hola", author="patient-app-7")
    assert post(svc.app().test_client(), webhook).status_code == 200
    (msg,) = eventually(lambda: written(sandbox, webhook["params"]["MessageSid"]),
                        what="message")
    assert msg["sender"]["reference"] == f"Patient/{patient['id']}"
    assert msg["medium"][0]["coding"][0] == {"system": SWITCHBOARD_MEDIUM, "code": "whatsapp",
                                             "display": "WhatsApp"}
    reads = [r for r in providers.requests("twilio") if r["method"] == "GET"
             and r["path"].endswith(f"/Participants/{conv['participant_sid']}")]
    assert len(reads) == 1 and reads[0]["answered"] == 200


def test_a_reply_goes_into_the_conversation_once_and_never_echoes(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox,
        conversations: Conversations, log_dir: Path) -> None:
    svc = service(services, providers)
    client = svc.app().test_client()
    conv, msg = patient_wrote(client, sandbox, conversations, "Is my prescription ready?")
    header_ref = msg["partOf"][0]["reference"]

    body = {"resourceType": "Communication", "status": "in-progress",
            "partOf": [{"reference": header_ref}],
            "payload": [{"contentString": "Yes, ready for pickup"}]}
    resp = client.post("/v1/messages", json=body, headers={**AUTH, "Prefer": "wait=20"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    state = resp.get_json()
    assert state["channel"] == "conversations" and state["provider_id"].startswith("IM")
    reply_sid = state["provider_id"]
    (reply,) = eventually(lambda: written(sandbox, reply_sid), what="IM SID on the reply")
    assert reply["partOf"] == [{"reference": header_ref}]
    # The same Communication sent again (another caller, a retry) goes nowhere new.
    again = client.post("/v1/messages", json={"communication": f"Communication/{reply['id']}"},
                        headers={**AUTH, "Prefer": "wait=20"})
    assert again.status_code == 200 and again.get_json()["provider_id"] == reply_sid
    ours = [m for m in conversations.messages(conv["conversation_sid"])
            if m["author"] == IDENTITY]
    assert [(m["sid"], m["body"]) for m in ours] == [(reply_sid, "Yes, ready for pickup")]
    posts = [r for r in providers.requests("twilio") if r["method"] == "POST"
             and r["path"] == f"/v1/Conversations/{conv['conversation_sid']}/Messages"]
    assert len(posts) == 1 and posts[0]["form"] == {"Author": IDENTITY,
                                                     "Body": "Yes, ready for pickup"}

    # Twilio posts onMessageAdded for our own send (webhooks enabled): it must not land.
    echo = next(w for w in conversations.webhooks()
                if w["params"].get("MessageSid") == reply_sid)
    assert echo["params"]["Author"] == IDENTITY
    for _ in range(2):
        assert post(client, echo).status_code == 200
    processed(svc, reply_sid, times=2)
    assert "skipped (own-message)" in svc.worker.output()  # type: ignore[union-attr]
    assert [c["id"] for c in written(sandbox, reply_sid)] == [reply["id"]]
    assert len(sandbox.all("Communication", **{"part-of": header_ref})) == 2

    # Delivery receipts move the reply forward, never back.
    assert post(client, conversations.delivery(reply_sid, "delivered")).status_code == 200
    eventually(lambda: sandbox.fhir.read("Communication", reply["id"]).resource["status"]
               == "completed", what="reply completed")
    assert post(client, conversations.delivery(reply_sid, "sent")).status_code == 200
    eventually(lambda: svc.worker.output().count(  # type: ignore[union-attr]
        f"conversations delivery {reply_sid}: ") >= 2, what="second receipt applied")
    assert sandbox.fhir.read("Communication", reply["id"]).resource["status"] == "completed"
    status = client.get(f"/v1/messages/{state['id']}", headers=AUTH).get_json()
    assert status["status"] == "delivered"
    assert svc.dead_letters.count() == 0
    logs = our_logs(log_dir)
    assert "Yes, ready for pickup" not in logs and "prescription" not in logs
    assert PATIENT not in logs


def test_without_an_identity_a_conversation_reply_fails_as_misconfigured(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox,
        conversations: Conversations) -> None:
    svc = services.get(**outbound_env(providers))
    client = svc.app().test_client()
    conv, msg = patient_wrote(client, sandbox, conversations, "hello")
    resp = client.post("/v1/messages", json={
        "resourceType": "Communication", "status": "in-progress", "partOf": msg["partOf"],
        "payload": [{"contentString": "reply"}]}, headers={**AUTH, "Prefer": "wait=20"})
    assert resp.status_code == 503, resp.get_data(as_text=True)
    assert resp.get_json()["error"] == "misconfigured"
    assert not [m for m in conversations.messages(conv["conversation_sid"])
                if m["author"] != PATIENT]


@pytest.mark.parametrize(("change", "fields"), [
    ({"ConversationSid": "CH123"}, ["ConversationSid"]),
    ({"MessageSid": "SM" + "0" * 32}, ["MessageSid"]),
    ({"ParticipantSid": "MB../x"}, ["ParticipantSid"]),
    ({"AccountSid": "ACsomeoneelse"}, ["AccountSid"]),
    ({"EventType": "onConversationRemoved"}, ["EventType"]),
    ({"Media": "[{]"}, ["Media"]),
])
def test_bad_shapes_are_refused_with_a_reason(
        services: Services, providers: ProviderSandbox, change: dict[str, str],
        fields: list[str]) -> None:
    svc = services.get(worker=False)
    params = {"EventType": "onMessageAdded", "AccountSid": "ACtest",
              "ConversationSid": "CH" + "1" * 32, "MessageSid": "IM" + "2" * 32,
              "ParticipantSid": "MB" + "3" * 32, "Author": PATIENT, "Body": "hi", **change}
    resp = svc.app().test_client().post(WEBHOOK_PATH, data=urlencode(params), headers={
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": sign(params, WEBHOOK_PATH)})
    assert resp.status_code == 400
    assert resp.get_json()["error"] == "invalid-fields"
    assert resp.get_json()["fields"] == fields


def test_bad_signature_is_refused(services: Services, providers: ProviderSandbox) -> None:
    svc = services.get(worker=False)
    params = {"EventType": "onMessageAdded", "AccountSid": "ACtest",
              "ConversationSid": "CH" + "1" * 32, "MessageSid": "IM" + "2" * 32,
              "Author": PATIENT, "Body": "hi"}
    client = svc.app().test_client()
    good = sign(params, WEBHOOK_PATH)
    # Signed for the SMS route, or for other values: refused before anything is looked at.
    for signature in (sign(params), good[:-2] + "AA", ""):
        resp = client.post(WEBHOOK_PATH, data=urlencode(params), headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": signature})
        assert resp.status_code == 403
        assert resp.get_json()["error"] == "bad-signature"
    resp = client.post(WEBHOOK_PATH, data=urlencode({**params, "Body": "changed"}),
                       headers={"Content-Type": "application/x-www-form-urlencoded",
                                "X-Twilio-Signature": good})
    assert resp.status_code == 403


def stored_values(client: redis.Redis) -> bytes:
    """Every key of this database and its values, read as they are stored (not DUMPed, which
    may compress them)."""
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            values = [client.get(key) or b""]
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"hash":
            values = [b for kv in client.hgetall(key).items() for b in kv]
        elif kind == b"zset":
            values = client.zrange(key, 0, -1)
        else:
            values = list(client.smembers(key)) if kind == b"set" else []
        out.append(key + b"".join(values))
    blob = b"".join(out)
    # kombu keeps a task's body base64-encoded: decoded too, else an unsealed body would hide.
    decoded = [base64.b64decode(run[:len(run) - len(run) % 4])  # whole quanta only
               for run in re.findall(rb"[A-Za-z0-9+/]{40,}", blob)]
    return blob + b"".join(decoded)


def test_an_accepted_conversations_message_is_sealed_in_redis(
        services: Services, providers: ProviderSandbox, conversations: Conversations) -> None:
    svc = services.get(worker=False)  # nothing consumes: the message waits in Redis
    conv = conversations.setup(PATIENT)
    webhook = conversations.write(conv, "my rash is worse", media=[
        {"content_type": "image/jpeg", "filename": "rash-photo.jpg", "data_b64": "/9j/"}])
    try:
        assert post(svc.app().test_client(), webhook).status_code == 200
        blob = stored_values(svc.redis)
        assert at_rest.hits(blob, [PATIENT, PATIENT[1:], "my rash is worse",
                                   "rash-photo"]) == []
        assert svc.redis.llen("inbound") >= 1  # it is there, sealed
    finally:
        svc.redis.delete("inbound", "status", *svc.redis.scan_iter("switchboard:inbox:*"))


def test_round_trips_per_message(services: Services, sandbox: Sandbox,
                                 providers: ProviderSandbox,
                                 conversations: Conversations) -> None:
    """FHIR requests per message: 3 for a Conversation's first (the partOf matches nothing,
    the header, the message again), 1 after, 0 for a redelivery; Twilio is asked only when the
    author is no address (one participant read)."""
    svc = service(services, providers)
    sandbox.patient(PATIENT)
    conv = conversations.setup(PATIENT)
    first, second = conversations.write(conv, "a"), conversations.write(conv, "b")
    chat = conversations.write(conv, "c", author="patient-app-7")
    fhir, twilio = [], []
    for n, webhook in enumerate((first, second, second, chat)):
        sandbox.reset_counter()
        calls = len(providers.requests("twilio"))
        assert post(svc.app().test_client(), webhook).status_code == 200
        processed(svc, webhook["params"]["MessageSid"], times=2 if n == 2 else 1)
        fhir.append(sandbox.requests())
        twilio.append(len(providers.requests("twilio")) - calls)
    assert fhir == [3, 1, 0, 1]
    assert twilio == [0, 0, 0, 1]
