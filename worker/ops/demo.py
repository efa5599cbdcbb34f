"""`switchboard demo …`: drive the stack `make run` started, one flow at a time, and say what
happened ("landed as Communication/… in thread …", "sent by sms as SM…").

`make run` leaves what a demo needs to find its stack in `<log dir>/demo.json`: URLs, the demo
patient's, thread's and clinician's ids. No secret is written there: the demo takes the same
credentials `make run` used, from the environment or `make run`'s development defaults.
Everything goes over HTTP, as a provider, a clinician's app or another service would send it;
nothing here reaches into Redis or the worker.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
from twilio.request_validator import RequestValidator

STATE_FILE = "demo.json"
DEMOS = ("sms", "reply", "email", "inbound-email", "push", "conversations", "whatsapp")
WAIT_SECONDS = 30.0  # how long a demo waits for the flow to finish before saying it did not
T = TypeVar("T")


class DemoFailed(Exception):
    """The flow did not finish as expected: str() says where it stopped."""


@dataclass(frozen=True)
class DemoStack:
    """What `make run` started, as written to demo.json, plus the credentials it used."""

    state: Mapping[str, str]
    twilio_auth_token: str
    fhir_client_id: str
    fhir_client_secret: str
    api_token: str

    def __getattr__(self, name: str) -> str:
        try:
            return str(self.state[name])
        except KeyError:
            raise AttributeError(name) from None


def write_state(log_dir: Path, state: Mapping[str, str]) -> Path:
    """Record the running stack for `switchboard demo` (owner-only: it names the demo ids)."""
    path = log_dir / STATE_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(state), f, indent=1)
    return path


def load_stack(log_dir: Path, credentials: Mapping[str, str]) -> DemoStack:
    """The stack `make run` left in `log_dir`; DemoFailed when none is running there."""
    try:
        state = json.loads((log_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        raise DemoFailed(f"no running `make run` found ({log_dir / STATE_FILE} is missing): "
                         f"start it first, in another shell") from None
    return DemoStack(state, credentials["TWILIO_AUTH_TOKEN"], credentials["FHIR_CLIENT_ID"],
                     credentials["FHIR_CLIENT_SECRET"], credentials["API_TOKEN"])


def run_demo(name: str, stack: DemoStack, text: str | None = None) -> str:
    """Run one demo; the sentence saying what happened. Raises DemoFailed."""
    with httpx.Client(timeout=15.0) as http:
        demo = _Demo(stack, http)
        flows: dict[str, Callable[[str | None], str]] = {
            "sms": demo.sms, "reply": demo.reply, "email": demo.email,
            "inbound-email": demo.inbound_email, "push": demo.push,
            "conversations": demo.conversations, "whatsapp": demo.whatsapp}
        return flows[name](text)


def _until(what: str, probe: Callable[[], T | None], seconds: float = WAIT_SECONDS) -> T:
    deadline = time.monotonic() + seconds
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise DemoFailed(f"{what} did not happen within {seconds:g} s "
                             f"(see the logs in the log directory, and `switchboard dlq list`)")
        time.sleep(0.3)


class _Demo:
    def __init__(self, stack: DemoStack, http: httpx.Client) -> None:
        self.s = stack
        self.http = http
        self._token: str | None = None

    # -- FHIR, as a clinician's app reads and writes it --------------------------------------

    def _login(self, profile: str = "") -> str:
        # The FHIR sandbox's token endpoint takes `profile` (sandbox only): a login as that
        # user, whom it records as the author of each write, as Medplum records the login's.
        form = {"grant_type": "client_credentials", "client_id": self.s.fhir_client_id,
                "client_secret": self.s.fhir_client_secret, **({"profile": profile} if profile
                                                                else {})}
        answer = self.http.post(self.s.fhir_token_url, data=form)
        answer.raise_for_status()
        return str(answer.json()["access_token"])

    def _fhir(self, method: str, path: str, json: Any = None,
              params: list[tuple[str, str]] | None = None, as_user: str = "") -> Any:
        if self._token is None:
            self._token = self._login()
        token = self._login(as_user) if as_user else self._token
        answer = self.http.request(method, self.s.fhir_base_url + path, json=json,
                                   params=tuple(params or ()),
                                   headers={"Authorization": f"Bearer {token}",
                                            "Accept": "application/fhir+json"})
        answer.raise_for_status()
        return answer.json()

    def _search(self, path: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        bundle = self._fhir("GET", path, params=params)
        return [e["resource"] for e in bundle.get("entry") or [] if "resource" in e]

    def _thread_of(self, comm: Mapping[str, Any]) -> str:
        parts = comm.get("partOf") or []
        return str(parts[0].get("reference")) if parts else "no thread"

    # -- the flows ---------------------------------------------------------------------------

    def sms(self, text: str | None) -> str:
        """The demo patient texts the clinic: a signed Twilio webhook, as Twilio posts it."""
        sid = "SM" + secrets.token_hex(16)
        url = self.s.public_base_url + "/webhooks/twilio/sms"
        params = {"MessageSid": sid, "AccountSid": self.s.twilio_account_sid,
                  "From": self.s.patient_phone, "To": self.s.clinic_phone,
                  "Body": text or "Hello from the demo patient", "NumMedia": "0"}
        signature = RequestValidator(self.s.twilio_auth_token).compute_signature(url, params)
        answer = self.http.post(url, content=urlencode(params), headers={
            "X-Twilio-Signature": signature,
            "Content-Type": "application/x-www-form-urlencoded"})
        if answer.status_code != 200:
            raise DemoFailed(f"the receiver answered {answer.status_code}: {answer.text[:200]}")
        comm = _until("writing the SMS to FHIR", lambda: next(iter(self._search(
            "Communication", [("identifier", f"{self.s.message_id_system}|{sid}")])), None))
        return (f"SMS {sid} accepted (HTTP 200); landed as Communication/{comm['id']} in "
                f"thread {self._thread_of(comm)}")

    def inbound_email(self, text: str | None) -> str:
        """The demo patient emails the clinic: the provider sandbox posts it, signed, as
        SendGrid's Inbound Parse does."""
        nonce = secrets.token_hex(4)
        body = f"{text or 'Hello from the demo patient, by email'} (demo {nonce})"
        spec = {"url": self.s.public_base_url + "/webhooks/sendgrid/inbound",
                "from": f"Demo Patient <{self.s.patient_email}>", "to": self.s.clinic_email,
                "subject": f"A question {nonce}", "text": body, "mode": "parsed"}
        answer = self.http.post(self.s.providers_origin + "/__inbound_email", json=spec).json()
        if answer.get("status") != 200:
            raise DemoFailed(f"the receiver answered {answer.get('status')}: "
                             f"{str(answer.get('body') or answer.get('error'))[:200]}")

        def landed() -> dict[str, Any] | None:
            for comm in self._search("Communication", [
                    ("sender", f"Patient/{self.s.patient_id}"), ("_sort", "-_lastUpdated"),
                    ("_count", "10")]):
                if any(nonce in str(p.get("contentString") or "")
                       for p in comm.get("payload") or []):
                    return comm
            return None

        comm = _until("writing the email to FHIR", landed)
        return (f"email accepted (HTTP 200); landed as Communication/{comm['id']} in thread "
                f"{self._thread_of(comm)}")

    def reply(self, text: str | None) -> str:
        """The demo clinician, logged in to FHIR, writes a reply into the demo thread; the
        Subscription tells Switchboard, which texts it to the patient with nothing else called
        (only what the clinic wrote is sent: docs/automatic-outbound.md)."""
        doctor = f"Practitioner/{self.s.practitioner_id}"
        comm = self._fhir("POST", "Communication", as_user=doctor, json={
            "resourceType": "Communication", "status": "in-progress",
            "partOf": [{"reference": f"Communication/{self.s.thread_id}"}],
            "sender": {"reference": doctor},
            "recipient": [{"reference": f"Patient/{self.s.patient_id}"}],
            "payload": [{"contentString": text or "Your lab results are in; all normal."}]})

        def sent() -> str | None:
            current = self._fhir("GET", f"Communication/{comm['id']}")
            for ident in current.get("identifier") or []:
                if ident.get("system") == self.s.message_id_system:
                    return str(ident.get("value"))
            reason = (current.get("statusReason") or {}).get("text")
            if current.get("status") == "stopped":
                raise DemoFailed(f"the reply was not sent: {reason}")
            return None

        sid = _until("sending the reply", sent)
        return (f"reply written as Communication/{comm['id']} in thread "
                f"Communication/{self.s.thread_id}; sent by sms as {sid} "
                f"(see {self.s.providers_origin}/__requests)")

    def _api_send(self, channel: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = self.http.post(self.s.public_base_url + "/v1/messages", json={
            "resourceType": "Communication",
            "recipient": [{"reference": f"Patient/{self.s.patient_id}"}],
            "channel": channel, **body}, headers={
            "Authorization": f"Bearer {self.s.api_token}", "Prefer": "wait=10"})
        result = dict(answer.json())
        if answer.status_code not in (200, 202):
            raise DemoFailed(f"/v1/messages answered {answer.status_code}: {result}")
        return result

    def _request_state(self, request_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"{self.s.public_base_url}/v1/messages/{request_id}",
                                  headers={"Authorization": f"Bearer {self.s.api_token}"}).json())

    def email(self, text: str | None) -> str:
        """The clinic emails the patient through /v1/messages; the provider sandbox posts
        SendGrid's signed delivery events back, and the request turns `delivered`."""
        sent = self._api_send("email", {"topic": {"text": "Your appointment"}, "payload": [
            {"contentString": text or "See you on Tuesday"}]})
        request_id = str(sent["id"])
        done = _until("the delivery event", lambda: (
            state if (state := self._request_state(request_id)).get("status") in (
                "delivered", "failed") else None))
        return (f"request {request_id}: sent by email as {done.get('provider_id')} "
                f"(Communication/{done.get('communication')}), now {done.get('status')}")

    def push(self, text: str | None) -> str:
        """Register a device for the demo patient, then push to it through /v1/messages (the
        push says only "you have a new message"; the data carries the Communication id)."""
        token = "demo-device-token:APA91b" + "x" * 40
        answer = self.http.post(self.s.public_base_url + "/v1/devices", json={
            "patient": f"Patient/{self.s.patient_id}", "token": token},
            headers={"Authorization": f"Bearer {self.s.api_token}"})
        if answer.status_code != 202:
            raise DemoFailed(f"/v1/devices answered {answer.status_code}: {answer.text[:200]}")
        # The device is registered by a task: the push waits until FHIR has it.
        _until("registering the device", lambda: next(iter(self._search("Device", [
            ("patient", f"Patient/{self.s.patient_id}"), ("status", "active")])), None))
        sent = self._api_send("push", {"payload": [
            {"contentString": text or "Your results are ready"}]})
        request_id = str(sent["id"])
        done = _until("the push", lambda: (
            state if (state := self._request_state(request_id)).get("status") in (
                "sent", "delivered", "failed") else None))
        return (f"request {request_id}: {done.get('status')} by push "
                f"(Communication/{done.get('communication')}; see "
                f"{self.s.providers_origin}/__requests?provider=fcm)")

    def conversations(self, text: str | None) -> str:
        """The demo patient writes into a Twilio Conversation (the provider sandbox posts the
        signed onMessageAdded to the receiver); the demo clinician answers in FHIR, and the
        answer is posted into that Conversation (its echo comes back and is dropped)."""
        from worker.channels.twilio_conversations import (
            CONVERSATION_SYSTEM,
            MESSAGE_SYSTEM,
            WEBHOOK_PATH,
        )

        control = self.s.providers_origin
        if not control:
            raise DemoFailed("the conversations demo needs make run's provider sandbox")
        self.http.post(control + "/__conversations/webhook", json={
            "url": self.s.public_base_url + WEBHOOK_PATH, "post": True}).raise_for_status()
        conv = self.http.post(control + "/__conversations/setup", json={
            "address": self.s.patient_phone, "proxy_address": self.s.clinic_phone}).json()
        written = self.http.post(control + "/__conversations/write", json={
            "conversation": conv["conversation_sid"], "participant": conv["participant_sid"],
            "body": text or "Hello from a Twilio Conversation"}).json()["webhook"]
        if written.get("status") != 200:
            raise DemoFailed(f"the receiver answered {written.get('status')}: "
                             f"{written.get('error') or ''}")
        sid = written["params"]["MessageSid"]
        comm = _until("writing the Conversation's message to FHIR", lambda: next(iter(
            self._search("Communication", [("identifier", f"{MESSAGE_SYSTEM}|{sid}")])), None))
        thread = self._thread_of(comm)
        doctor = f"Practitioner/{self.s.practitioner_id}"
        answer = self._fhir("POST", "Communication", as_user=doctor, json={
            "resourceType": "Communication", "status": "in-progress",
            "partOf": [{"reference": thread}], "sender": {"reference": doctor},
            # Without a recipient a message is an internal note (docs/automatic-outbound.md).
            "recipient": [{"reference": f"Patient/{self.s.patient_id}"}],
            "payload": [{"contentString": "Thanks, we got your message."}]})

        def posted() -> str | None:
            current = self._fhir("GET", f"Communication/{answer['id']}")
            if current.get("status") == "stopped":
                raise DemoFailed("the reply was not sent: "
                                 f"{(current.get('statusReason') or {}).get('text')}")
            return next((str(i["value"]) for i in current.get("identifier") or []
                         if i.get("system") == MESSAGE_SYSTEM), None)

        reply = _until("posting the reply into the Conversation", posted)
        return (f"message {sid} accepted (HTTP 200); landed as Communication/{comm['id']} in "
                f"thread {thread} ({CONVERSATION_SYSTEM}|{conv['conversation_sid']}); reply "
                f"Communication/{answer['id']} posted into the Conversation as {reply} (see "
                f"{control}/__conversations/messages)")
    def whatsapp(self, text: str | None) -> str:
        """The clinic writes to the demo patient on WhatsApp through /v1/messages. Outside the
        24-hour window (the patient has not written on WhatsApp lately) the reply is held and
        the approved template asks them to write; the patient answers (the provider sandbox
        posts Twilio's signed WhatsApp webhook), the answer lands in the WhatsApp thread and
        the held reply goes out on WhatsApp."""
        sent = self._api_send("whatsapp", {"payload": [
            {"contentString": text or "Your prescription is ready to collect"}]})
        request_id = str(sent["id"])
        first = _until("the reply's first verdict", lambda: (
            state if (state := self._request_state(request_id)).get("status") in (
                "held", "sent", "delivered", "failed") else None))
        if first.get("status") == "failed":
            raise DemoFailed(f"the reply failed: {first.get('error')}")
        story = "sent at once (the patient's window was open)"
        if first.get("status") == "held":
            answer = self.http.post(self.s.providers_origin + "/__whatsapp/inbound", json={
                "url": self.s.public_base_url + "/webhooks/twilio/sms",
                "from": self.s.patient_phone, "to": self.s.clinic_phone,
                "body": "Hi, I got your message", "profile_name": "Demo Patient"}).json()
            if answer.get("status") != 200:
                raise DemoFailed(f"the receiver answered {answer.get('status')} to the "
                                 f"patient's WhatsApp message")
            sid = str(answer["params"]["MessageSid"])
            comm = _until("writing the patient's WhatsApp answer", lambda: next(iter(
                self._search("Communication", [
                    ("identifier", f"{self.s.message_id_system}|{sid}")])), None))
            story = (f"held (template sent), released by the patient's WhatsApp answer "
                     f"(Communication/{comm['id']} in thread {self._thread_of(comm)})")
        done = _until("sending the reply on WhatsApp", lambda: (
            state if (state := self._request_state(request_id)).get("status") in (
                "sent", "delivered", "failed") else None))
        if done.get("status") == "failed":
            raise DemoFailed(f"the reply failed: {done.get('error')}")
        return (f"request {request_id}: {story}; sent by whatsapp as "
                f"{done.get('provider_id')} (Communication/{done.get('communication')}; see "
                f"{self.s.providers_origin}/__requests?provider=twilio)")
