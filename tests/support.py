"""Helpers shared by the tests: signing like Twilio, waiting, talking to the FHIR sandbox."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
from twilio.request_validator import RequestValidator

from worker.crypto import generate_key
from worker.fhir.client import FhirClient, WriteSlots
from worker.fhir.query import token
from worker.settings import Settings

T = TypeVar("T")
AUTH_TOKEN = "test-twilio-auth-token"
PUBLIC_BASE_URL = "https://switchboard.test"
# The test bed's data key, new for every run (what it seals lives only as long as the run).
DATA_KEY = generate_key()
CLINIC = "+15557654321"


def new_sid(prefix: str = "SM") -> str:
    """A fresh Twilio-looking message SID."""
    return prefix + uuid.uuid4().hex


def sms_params(sender: str, body: str = "hello", sid: str | None = None, to: str = CLINIC,
               **extra: str) -> dict[str, str]:
    """The form Twilio posts for an incoming SMS."""
    return {"MessageSid": sid or new_sid(), "AccountSid": "ACtest", "From": sender, "To": to,
            "Body": body, "NumMedia": "0", **extra}


def whatsapp_params(sender: str, body: str = "hello", sid: str | None = None,
                    to: str = CLINIC, profile_name: str = "Pat Example", **extra: str
                    ) -> dict[str, str]:
    """The form Twilio posts for an incoming WhatsApp message (the SMS webhook's, with
    `whatsapp:` addresses, WaId and ProfileName)."""
    return sms_params("whatsapp:" + sender, body, sid, "whatsapp:" + to,
                      WaId=sender.lstrip("+"), ProfileName=profile_name, MessageType="text",
                      **extra)


def sign(params: dict[str, str], path: str = "/webhooks/twilio/sms",
         auth_token: str = AUTH_TOKEN, base: str = PUBLIC_BASE_URL) -> str:
    """X-Twilio-Signature, computed by the Twilio SDK, for a POST of `params` to `path`."""
    return str(RequestValidator(auth_token).compute_signature(base + path, params))


def post_signed(client: Any, params: dict[str, str], path: str = "/webhooks/twilio/sms") -> Any:
    """POST a correctly signed webhook with a Flask test client or an httpx client."""
    headers = {"X-Twilio-Signature": sign(params, path),
               "Content-Type": "application/x-www-form-urlencoded"}
    if isinstance(client, httpx.Client):
        return client.post(path, content=urlencode(params), headers=headers)
    return client.post(path, data=urlencode(params), headers=headers)


def our_log_files(log_dir: Path) -> list[Path]:
    """The logs our own processes wrote under `log_dir` (web, workers, tools): what the PHI
    scans read. The sandboxes, Redis and its Sentinels, which play the outside world,
    excluded."""
    return [p for p in log_dir.glob("*.log")
            if not p.name.startswith(("fhir-sandbox", "provider-sandbox", "redis", "sentinel"))]


def our_logs(log_dir: Path) -> str:
    """Those logs as one text."""
    return "\n".join(p.read_text(errors="replace") for p in our_log_files(log_dir))


def most_in_flight(slots: WriteSlots, in_flight: Callable[[], int], writers: int = 8,
                   hold: float = 0.02) -> int:
    """`writers` threads each hold a slot of `slots` for `hold` seconds at once; returns the most
    writes `in_flight()` counted while one was held."""
    most = 0
    lock = threading.Lock()

    def write() -> None:
        nonlocal most
        with slots.slot():
            with lock:
                most = max(most, in_flight())
            time.sleep(hold)

    threads = [threading.Thread(target=write) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return most


def eventually(fn: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.1,
               what: str = "condition") -> T:
    """Poll `fn` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def sign_email_events(private_key_b64: str, body: bytes, timestamp: str | None = None
                      ) -> dict[str, str]:
    """Event Webhook signature headers for `body` under a base64 PKCS#8 P-256 key, as SendGrid
    signs: ECDSA SHA-256 over the timestamp followed by the raw body, base64 DER."""
    import base64

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_der_private_key(base64.b64decode(private_key_b64), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    stamp = timestamp or str(int(time.time()))
    signature = key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {"Content-Type": "application/json",
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp}


class Sandbox:
    """Test-side access to the FHIR sandbox: admin FHIR calls plus its control routes."""

    def __init__(self, origin: str, settings: Settings) -> None:
        self.origin = origin
        self.fhir = FhirClient(settings.fhir_base_url, settings.fhir_token_url,
                               settings.fhir_client_id,
                               settings.fhir_client_secret.get_secret_value())
        self.settings = settings
        self._http = httpx.Client(base_url=origin, timeout=10)

    def reset(self) -> None:
        """Empty the server, clear faults and counters."""
        self._http.post("/__reset").raise_for_status()

    def requests(self) -> int:
        """FHIR requests received since the last counter reset."""
        return int(self._http.get("/__stats").json()["requests"])

    def reset_counter(self) -> None:
        """Zero the request counter."""
        self._http.post("/__stats/reset").raise_for_status()

    def stats(self) -> dict[str, Any]:
        """Request, serializable-write, abort and conflict counters since the last reset."""
        return dict(self._http.get("/__stats").json())

    def contention(self, **spec: Any) -> None:
        """Set contention mode: rate, attempts, retry_ms, transaction_ms (sandbox README)."""
        self._http.post("/__contention", json=spec).raise_for_status()

    def token(self, profile: str | None = None) -> str:
        """A bearer token for raw FHIR requests (the FhirClient would retry conflicts); with
        `profile` ("Practitioner/<id>", "Patient/<id>", "ClientApplication/<id>"), one whose
        writes the sandbox records as that author (meta.author), as Medplum does for a login."""
        resp = self._http.post("/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": self.settings.fhir_client_id,
            "client_secret": self.settings.fhir_client_secret.get_secret_value(),
            **({"profile": profile} if profile else {})})
        resp.raise_for_status()
        return str(resp.json()["access_token"])

    def write_as(self, profile: str, resource: dict[str, Any]) -> dict[str, Any]:
        """Create `resource` logged in as `profile` (see token); returns what was stored."""
        resp = self._http.post(f"/fhir/R4/{resource['resourceType']}", json=resource, headers={
            "Authorization": f"Bearer {self.token(profile)}", "X-Medplum": "extended",
            "Content-Type": "application/fhir+json"})
        assert resp.status_code == 201, resp.text
        return dict(resp.json())

    def read_extended(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """Read with `X-Medplum: extended` (meta.author included)."""
        resp = self._http.get(f"/fhir/R4/{resource_type}/{resource_id}", headers={
            "Authorization": f"Bearer {self.token()}", "X-Medplum": "extended"})
        resp.raise_for_status()
        return dict(resp.json())

    def fault(self, **spec: Any) -> None:
        """Queue an injected fault (see sandbox/fhir/README.md)."""
        self._http.post("/__faults", json=spec).raise_for_status()

    def clear_faults(self) -> None:
        """Remove every queued fault (the outage ends)."""
        self._http.delete("/__faults").raise_for_status()

    def faults(self) -> list[dict[str, Any]]:
        """The faults still queued, each with the count it has left."""
        return list(self._http.get("/__faults").json()["faults"])

    def all(self, resource_type: str, **params: str) -> list[dict[str, Any]]:
        """Every resource of a type matching params."""
        bundle = self.fhir.search(resource_type, [*params.items(), ("_count", "1000")])
        return [e["resource"] for e in bundle.get("entry") or []]

    def messages(self, sid: str) -> list[dict[str, Any]]:
        """Child Communications carrying this provider message id."""
        return self.all("Communication",
                        identifier=token(self.settings.message_id_system, sid))

    def headers(self) -> list[dict[str, Any]]:
        """Thread headers (Communications without partOf)."""
        return self.all("Communication", **{"part-of:missing": "true"})

    def patient(self, phone: str, fmt: str | None = None) -> dict[str, Any]:
        """Create a Patient whose phone is stored as `fmt` (default: the E.164 value)."""
        resource = {"resourceType": "Patient", "name": [{"family": "Test", "given": ["Pat"]}],
                    "telecom": [{"system": "phone", "value": fmt or phone, "use": "mobile"}]}
        return self.fhir.create(resource).resource

    def close(self) -> None:
        """Close HTTP clients."""
        self.fhir.close()
        self._http.close()


class ProviderSandbox:
    """Test-side control of the Twilio/SendGrid sandbox (sandbox/providers/README.md)."""

    def __init__(self, origin: str, event_keys: tuple[str, str] = ("", "")) -> None:
        self.origin = origin
        self.event_private_key, self.event_public_key = event_keys
        self._http = httpx.Client(base_url=origin, timeout=10)

    def email_events(self, message_id: str, *events: Any, url: str | None = None
                     ) -> dict[str, Any]:
        """A signed Event Webhook batch about the email sent as `message_id` (X-Message-Id):
        the body and headers as SendGrid would post them, posted to `url` if given."""
        body: dict[str, Any] = {"message_id": message_id, "events": list(events),
                                "post": url is not None}
        if url:
            body["url"] = url
        resp = self._http.post("/__sendgrid/events", json=body)
        resp.raise_for_status()
        return dict(resp.json())

    def reset(self) -> None:
        """Forget requests, messages and faults."""
        self._http.post("/__reset").raise_for_status()

    def fault(self, **spec: Any) -> None:
        """Queue a fault for matching requests."""
        self._http.post("/__faults", json=spec).raise_for_status()

    def requests(self, provider: str | None = None, to: str | None = None
                 ) -> list[dict[str, Any]]:
        """Recorded provider requests, oldest first."""
        params = {k: v for k, v in (("provider", provider), ("to", to)) if v}
        return list(self._http.get("/__requests", params=params).json())

    def set_status(self, sid: str, status: str, error_code: int | None = None) -> None:
        """Change a message's status at the provider (its callback may not reach us)."""
        body: dict[str, Any] = {"sid": sid, "status": status}
        if error_code:
            body["error_code"] = error_code
        self._http.post("/__status", json=body).raise_for_status()

    def whatsapp_window(self, user: str, sender: str, at: float | None) -> None:
        """Tell the sandbox when a WhatsApp user last wrote to a sender (None: never)."""
        self._http.post("/__whatsapp/window", json={"user": user, "sender": sender, "at": at}
                        ).raise_for_status()

    def messages(self) -> list[dict[str, Any]]:
        """Every message the sandbox's Messages API holds, with its current status."""
        return list(self._http.get("/__messages").json())

    def close(self) -> None:
        """Close the HTTP client."""
        self._http.close()


def worker_metrics(*ports: int) -> str:
    """The Prometheus pages of Celery workers (their WORKER_METRICS_PORT), one after another."""
    return "\n".join(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
                     for port in ports)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`, over every page in
    `text` (as Prometheus's `sum` adds up processes); 0 when there is none."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total
