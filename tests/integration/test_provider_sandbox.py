"""The provider sandbox, driven only through the real Twilio and SendGrid SDKs (plus httpx for
its control routes). These tests also pin down how the SDKs behave on errors, which the
channel code relies on: exception types, attributes, Retry-After, and that they never retry.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from python_http_client import exceptions as sg_errors
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import CustomArg, Header, Mail
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator
from twilio.rest import Client

SCRIPT = Path(__file__).resolve().parents[2] / "sandbox" / "providers" / "provider_sandbox.py"
READY = "Provider sandbox listening on "
ACCOUNT = "ACsandbox00000000000000000000000000"
TOKEN = "sandbox-test-token"
SG_KEY = "SG.sandbox-test-key"
DEFAULT_SIGNING_TOKEN = "sandbox-auth-token"
PATIENT = "+15550001111"
OTHER = "+15550002222"
CLINIC = "+15557654321"


# --- the base-URL mechanism the production code uses -------------------------------------------

class SandboxHttpClient(TwilioHttpClient):
    """TwilioHttpClient that sends every https://*.twilio.com call to `base_url` instead, and
    remembers the last response per thread (the SDK's exceptions carry no headers)."""

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base_url = base_url.rstrip("/")
        self._local = threading.local()

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Response:
        parts = urllib.parse.urlsplit(url)
        if (parts.hostname or "").endswith(".twilio.com"):  # api.twilio.com, api.us1.…
            url = self.base_url + parts.path + (f"?{parts.query}" if parts.query else "")
        response = super().request(method, url, *args, **kwargs)
        self._local.last = response
        return response

    def last_header(self, name: str) -> str | None:
        last: Response | None = getattr(self._local, "last", None)
        return None if last is None or last.headers is None else last.headers.get(name)


# --- fixtures ----------------------------------------------------------------------------------

@dataclass
class Running:
    url: str
    process: subprocess.Popen[str]

    def control(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = httpx.request(method, self.url + path, timeout=10, **kwargs)
        assert resp.status_code < 300, resp.text
        return resp.json()

    def fault(self, **spec: Any) -> Any:
        return self.control("POST", "/__faults", json=spec)

    def requests(self, **query: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.control("GET", "/__requests", params=query)
        return result

    def messages(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.control("GET", "/__messages")
        return result


def start_sandbox(*args: str) -> Running:
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith(READY), f"sandbox did not start: {line!r}"
    return Running(line[len(READY):].strip(), process)


def stop_sandbox(running: Running, sig: int = signal.SIGTERM) -> None:
    running.process.send_signal(sig)
    assert running.process.wait(timeout=5) == 0
    assert running.process.stdout is not None
    running.process.stdout.close()


@pytest.fixture(scope="module")
def sandbox_server() -> Iterator[Running]:
    """A sandbox without credentials configured (as in `make run`)."""
    running = start_sandbox()
    yield running
    stop_sandbox(running)


@pytest.fixture()
def sb(sandbox_server: Running) -> Running:
    sandbox_server.control("POST", "/__reset")
    return sandbox_server


@pytest.fixture(scope="module")
def authed() -> Iterator[Running]:
    """A sandbox that insists on credentials."""
    running = start_sandbox("--twilio-account-sid", ACCOUNT, "--twilio-auth-token", TOKEN,
                            "--sendgrid-api-key", SG_KEY)
    yield running
    stop_sandbox(running, signal.SIGINT)


def twilio(sb: Running, token: str = TOKEN, **http: Any) -> Client:
    return Client(ACCOUNT, token, http_client=SandboxHttpClient(sb.url, **http))


def sendgrid(sb: Running, key: str = SG_KEY) -> SendGridAPIClient:
    return SendGridAPIClient(api_key=key, host=sb.url)


def mail(to: str = "pat@example.org") -> Mail:
    message = Mail(from_email="clinic@example.org", to_emails=to, subject="Your results",
                   plain_text_content="See the portal.", html_content="<p>See the portal.</p>")
    message.header = Header("Message-ID", "<comm-123@switchboard.test>")
    message.custom_arg = CustomArg("communication_id", "comm-123")
    return message


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    form: dict[str, str]


@pytest.fixture()
def receiver() -> Iterator[tuple[str, list[Received]]]:
    """A tiny HTTP server standing in for our status-callback webhook."""
    got: list[Received] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            got.append(Received(self.path, dict(self.headers.items()),
                                dict(urllib.parse.parse_qsl(body, keep_blank_values=True))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", got
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- Twilio ------------------------------------------------------------------------------------

def test_twilio_send_through_rewriting_http_client(sb: Running) -> None:
    client = twilio(sb)
    msg = client.messages.create(to=PATIENT, from_=CLINIC, body="Hello ☃",
                                 media_url=["https://x.test/a.jpg", "https://x.test/b.jpg"],
                                 status_callback="https://switchboard.test/webhooks/status")
    assert msg.sid.startswith("SM") and len(msg.sid) == 34
    assert (msg.status, msg.to, msg.from_, msg.body) == ("queued", PATIENT, CLINIC, "Hello ☃")
    assert (msg.num_segments, msg.num_media, msg.direction) == ("1", "2", "outbound-api")
    assert msg.error_code is None and msg.price is None and msg.api_version == "2010-04-01"
    assert msg.date_created is not None and msg.account_sid == ACCOUNT
    assert msg.uri == f"/2010-04-01/Accounts/{ACCOUNT}/Messages/{msg.sid}.json"

    [req] = sb.requests()
    assert req["provider"] == "twilio" and req["method"] == "POST" and req["answered"] == 201
    assert req["path"] == f"/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
    assert req["to"] == PATIENT and req["message_sid"] == msg.sid
    assert req["form"] == {"To": PATIENT, "From": CLINIC, "Body": "Hello ☃",
                           "MediaUrl": ["https://x.test/a.jpg", "https://x.test/b.jpg"],
                           "StatusCallback": "https://switchboard.test/webhooks/status"}
    assert req["at"] <= time.time()


def test_twilio_base_url_attribute_also_works(sb: Running) -> None:
    client = Client(ACCOUNT, TOKEN)
    # Only the `api` domain (Messages); see sandbox/providers/README.md.
    client.api.base_url = sb.url
    msg = client.messages.create(to=PATIENT, from_=CLINIC, body="hi")
    assert sb.requests()[0]["message_sid"] == msg.sid


def test_rewriting_client_survives_edge_and_region(sb: Running) -> None:
    # TWILIO_EDGE / TWILIO_REGION make the SDK call api.dublin.ie1.twilio.com; still rewritten.
    client = Client(ACCOUNT, TOKEN, edge="dublin", region="ie1",
                    http_client=SandboxHttpClient(sb.url))
    assert client.messages.create(to=PATIENT, from_=CLINIC, body="hi").status == "queued"


def test_messaging_service_sid(sb: Running) -> None:
    msg = twilio(sb).messages.create(to=PATIENT, messaging_service_sid="MG" + "0" * 32,
                                     body="hi")
    assert msg.status == "accepted" and msg.from_ is None
    assert msg.messaging_service_sid == "MG" + "0" * 32
    assert sb.requests()[0]["form"]["MessagingServiceSid"] == "MG" + "0" * 32


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"to": "", "from_": CLINIC, "body": "x"}, 21604),
    ({"to": PATIENT, "body": "x"}, 21603),
    ({"to": PATIENT, "from_": CLINIC}, 21602),
])
def test_twilio_validation(sb: Running, kwargs: dict[str, str], code: int) -> None:
    with pytest.raises(TwilioRestException) as info:
        twilio(sb).messages.create(**kwargs)
    assert (info.value.status, info.value.code) == (400, code)
    assert sb.messages() == []


def test_twilio_21211_fault_creates_nothing(sb: Running) -> None:
    sb.fault(provider="twilio", to=PATIENT, status=400, twilio_code=21211)
    client = twilio(sb)
    with pytest.raises(TwilioRestException) as info:
        client.messages.create(to=PATIENT, from_=CLINIC, body="x")
    err = info.value
    assert (err.status, err.code, err.method) == (400, 21211, "POST")
    assert err.msg == ("Unable to create record: "
                       f"The 'To' number {PATIENT} is not a valid phone number.")
    assert sb.messages() == []
    [req] = sb.requests()
    assert req["answered"] == 400 and req["fault"] and "message_sid" not in req
    # count defaults to 1: the next send goes through
    assert client.messages.create(to=PATIENT, from_=CLINIC, body="x").status == "queued"


def test_twilio_429_with_retry_after_and_no_sdk_retry(sb: Running) -> None:
    sb.fault(provider="twilio", to=PATIENT, status=429, twilio_code=20429, retry_after=1)
    client = twilio(sb)
    with pytest.raises(TwilioRestException) as info:
        client.messages.create(to=PATIENT, from_=CLINIC, body="x")
    assert (info.value.status, info.value.code) == (429, 20429)
    assert not hasattr(info.value, "headers")  # Retry-After only via the http client
    http = client.http_client
    assert isinstance(http, SandboxHttpClient) and http.last_header("Retry-After") == "1"
    assert len(sb.requests()) == 1  # the SDK did not retry


@pytest.mark.parametrize(("status", "code"), [(503, 20503), (500, 20500)])
def test_twilio_5xx(sb: Running, status: int, code: int) -> None:
    sb.fault(status=status)  # any provider, any recipient
    with pytest.raises(TwilioRestException) as info:
        twilio(sb).messages.create(to=PATIENT, from_=CLINIC, body="x")
    assert (info.value.status, info.value.code) == (status, code)
    assert [r["answered"] for r in sb.requests()] == [status]


def test_sticky_fault_until_cleared(sb: Running) -> None:
    sb.fault(provider="twilio", to=PATIENT, status=400, twilio_code=21610, sticky=True)
    client = twilio(sb)
    for _ in range(3):
        with pytest.raises(TwilioRestException) as info:
            client.messages.create(to=PATIENT, from_=CLINIC, body="x")
        assert info.value.code == 21610
    assert client.messages.create(to=OTHER, from_=CLINIC, body="x").status == "queued"
    [fault] = sb.control("GET", "/__faults")
    assert fault["sticky"] and fault["applied"] == 3
    sb.control("DELETE", "/__faults")
    assert client.messages.create(to=PATIENT, from_=CLINIC, body="x").status == "queued"
    assert [r["answered"] for r in sb.requests(provider="twilio", to=PATIENT)] == [
        400, 400, 400, 201]


def test_fetch_message_status(sb: Running) -> None:
    client = twilio(sb)
    sid = client.messages.create(to=PATIENT, from_=CLINIC, body="x").sid
    answer = sb.control("POST", "/__status", json={"sid": sid, "status": "undelivered",
                                                   "error_code": 30003})
    assert answer["callback"] is None  # no StatusCallback on this message
    fetched = client.messages(sid).fetch()
    assert (fetched.status, fetched.error_code) == ("undelivered", 30003)
    assert fetched.error_message == "Unreachable destination handset"
    with pytest.raises(TwilioRestException) as info:
        client.messages("SM" + "f" * 32).fetch()
    assert (info.value.status, info.value.code) == (404, 20404)


def test_status_callback_is_signed(sb: Running, receiver: tuple[str, list[Received]]) -> None:
    base, got = receiver
    callback = base + "/webhooks/twilio/status?attempt=1"
    sid = twilio(sb).messages.create(to=PATIENT, from_=CLINIC, body="x",
                                     status_callback=callback).sid
    answer = sb.control("POST", "/__status", json={"sid": sid, "status": "failed",
                                                   "error_code": 30007})
    assert answer["callback"]["status"] == 204
    [hit] = got
    assert hit.path == "/webhooks/twilio/status?attempt=1"
    assert hit.form == {"MessageSid": sid, "MessageStatus": "failed", "SmsSid": sid,
                        "SmsStatus": "failed", "AccountSid": ACCOUNT, "From": CLINIC,
                        "To": PATIENT, "ErrorCode": "30007", "ApiVersion": "2010-04-01"}
    signature = hit.headers["X-Twilio-Signature"]
    assert RequestValidator(DEFAULT_SIGNING_TOKEN).validate(callback, hit.form, signature)
    assert not RequestValidator("wrong").validate(callback, hit.form, signature)


def test_callback_to_dead_receiver_reports_error(sb: Running) -> None:
    sid = twilio(sb).messages.create(to=PATIENT, from_=CLINIC, body="x",
                                     status_callback=f"http://127.0.0.1:{free_port()}/cb").sid
    answer = sb.control("POST", "/__status", json={"sid": sid, "status": "delivered"})
    assert answer["callback"]["status"] is None and "refused" in answer["callback"]["error"]


def test_twilio_transport_errors(sb: Running) -> None:
    sb.fault(provider="twilio", delay_ms=600)
    with pytest.raises(requests.exceptions.ReadTimeout):
        twilio(sb, timeout=0.2).messages.create(to=PATIENT, from_=CLINIC, body="x")
    sb.fault(provider="twilio", disconnect=True)
    with pytest.raises(requests.exceptions.ConnectionError):
        twilio(sb).messages.create(to=PATIENT, from_=CLINIC, body="x")
    dead = Running(f"http://127.0.0.1:{free_port()}", sb.process)
    with pytest.raises(requests.exceptions.ConnectionError):
        twilio(dead).messages.create(to=PATIENT, from_=CLINIC, body="x")
    # a delay with a status: slow, then the error
    sb.fault(provider="twilio", delay_ms=300, status=503)
    started = time.monotonic()
    with pytest.raises(TwilioRestException):
        twilio(sb).messages.create(to=PATIENT, from_=CLINIC, body="x")
    assert time.monotonic() - started >= 0.3


# --- SendGrid ----------------------------------------------------------------------------------

def test_sendgrid_send(sb: Running) -> None:
    response = sendgrid(sb).send(mail("Pat@Example.org"))
    assert response.status_code == 202 and response.body == b""
    message_id = response.headers["X-Message-Id"]
    assert len(message_id) == 22
    [req] = sb.requests(provider="sendgrid", to="pat@example.org")
    assert (req["method"], req["path"], req["answered"]) == ("POST", "/v3/mail/send", 202)
    assert req["message_id"] == message_id and req["to"] == "pat@example.org"
    body = req["json"]
    assert body["personalizations"][0]["to"] == [{"email": "Pat@Example.org"}]
    assert body["from"] == {"email": "clinic@example.org"}
    assert body["subject"] == "Your results"
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    assert body["headers"] == {"Message-ID": "<comm-123@switchboard.test>"}
    assert body["custom_args"] == {"communication_id": "comm-123"}


def test_sendgrid_validation(sb: Running) -> None:
    with pytest.raises(sg_errors.BadRequestsError) as info:
        sendgrid(sb).send({"personalizations": [{"to": [{"email": "a@b.example"}]}],
                           "from": {"email": "c@d.example"}})
    fields = {e["field"] for e in info.value.to_dict["errors"]}
    assert fields == {"subject", "content"}


@pytest.mark.parametrize(("status", "error"), [
    (400, sg_errors.BadRequestsError), (403, sg_errors.ForbiddenError),
    (413, sg_errors.PayloadTooLargeError), (500, sg_errors.InternalServerError),
    (503, sg_errors.ServiceUnavailableError), (502, sg_errors.HTTPError),
])
def test_sendgrid_faults(sb: Running, status: int, error: type[Exception]) -> None:
    sb.fault(provider="sendgrid", to="a@b.example", status=status)
    client = sendgrid(sb)
    assert client.send(mail("other@b.example")).status_code == 202  # other recipient: fine
    with pytest.raises(error) as info:
        client.send(mail("a@b.example"))
    assert type(info.value) is error
    exc = info.value
    assert isinstance(exc, sg_errors.HTTPError) and exc.status_code == status
    assert isinstance(exc.body, bytes) and exc.to_dict["errors"][0]["field"] is None
    assert [r["answered"] for r in sb.requests(to="a@b.example")] == [status]  # no retry


def test_sendgrid_429_retry_after(sb: Running) -> None:
    sb.fault(provider="sendgrid", to="a@b.example", status=429, retry_after=2)
    with pytest.raises(sg_errors.TooManyRequestsError) as info:
        sendgrid(sb).send(mail("a@b.example"))
    assert info.value.status_code == 429
    assert info.value.headers["Retry-After"] == "2"
    assert info.value.headers["X-RateLimit-Remaining"] == "0"


def test_sendgrid_transport_errors(sb: Running) -> None:
    sb.fault(provider="sendgrid", delay_ms=600)
    client = sendgrid(sb)
    client.client.timeout = 0.2  # SendGridAPIClient has no timeout argument; default is none
    with pytest.raises(TimeoutError):
        client.send(mail())
    with pytest.raises(urllib.error.URLError):
        sendgrid(Running(f"http://127.0.0.1:{free_port()}", sb.process)).send(mail())


# --- auth, control routes ----------------------------------------------------------------------

def test_auth_required_when_configured(authed: Running,
                                       receiver: tuple[str, list[Received]]) -> None:
    authed.control("POST", "/__reset")
    with pytest.raises(TwilioRestException) as info:
        twilio(authed, token="wrong").messages.create(to=PATIENT, from_=CLINIC, body="x")
    assert (info.value.status, info.value.code) == (401, 20003)
    with pytest.raises(sg_errors.UnauthorizedError):
        sendgrid(authed, key="SG.wrong").send(mail())
    assert [r["answered"] for r in authed.requests()] == [401, 401]

    base, got = receiver
    sid = twilio(authed).messages.create(to=PATIENT, from_=CLINIC, body="x",
                                         status_callback=base + "/cb").sid
    assert sendgrid(authed).send(mail()).status_code == 202
    authed.control("POST", "/__status", json={"sid": sid, "status": "delivered"})
    [hit] = got
    assert RequestValidator(TOKEN).validate(base + "/cb", hit.form,
                                            hit.headers["X-Twilio-Signature"])


def test_control_routes(sb: Running) -> None:
    bad = httpx.post(sb.url + "/__faults", json={"status": 503, "tto": PATIENT})
    assert bad.status_code == 400 and "tto" in bad.json()["error"]
    faults = sb.control("POST", "/__faults", json=[{"status": 500, "count": 2},
                                                   {"delay_ms": 10, "sticky": True}])
    assert [f["remaining"] for f in faults] == [2, None]
    sb.control("POST", "/__reset")
    assert sb.control("GET", "/__faults") == [] and sb.requests() == []
    assert httpx.post(sb.url + "/__status", json={"sid": "SMnope", "status": "sent"}
                      ).status_code == 404
