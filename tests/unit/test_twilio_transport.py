"""The Twilio channel's HTTP: the real SDK through our HTTP boundary (worker.http), against a
real HTTP server on loopback. What goes on the wire, and which failures may have sent a text."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import pytest

from tests.unit.test_http import closed_port
from worker.channels import Attachment, OutboundMessage, SendError
from worker.channels.twilio import TwilioSms

SID, TOKEN, CLINIC = "AC" + "1" * 32, "secret-token", "+15557654321"


class Twilio:
    """Answers message creates as Twilio does (201 and the message), or 429 with Retry-After;
    records each request."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.throttle = False
        twilio = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                twilio.seen.append({"path": self.path, "headers": dict(self.headers),
                                    "form": parse_qs(body.decode(), keep_blank_values=True)})
                if twilio.throttle:
                    answer, status = {"code": 20429, "message": "Too Many Requests",
                                      "status": 429}, 429
                else:
                    answer, status = {"sid": "SM" + "f" * 32, "status": "queued"}, 201
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "7")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def twilio() -> Iterator[Twilio]:
    server = Twilio()
    yield server
    server.close()


def channel(base: str, timeout: float = 5.0) -> TwilioSms:
    return TwilioSms(SID, TOKEN, CLINIC, "", "https://clinic.example/webhooks/twilio/status",
                     base, timeout=timeout)


def message(**fields: Any) -> OutboundMessage:
    return OutboundMessage(**{"communication_id": "c1", "to": "+15551234567",
                              "body": "Your results are ready", **fields})


def test_a_send_is_the_sdks_request_on_the_wire(twilio: Twilio) -> None:
    sms = channel(twilio.origin)
    sent = sms.send(message(attachments=(Attachment("https://x.example/a.png", "image/png"),
                                         Attachment("https://x.example/b.png", "image/png"))))
    assert (sent.provider_id, sent.status) == ("SM" + "f" * 32, "queued")
    [seen] = twilio.seen
    assert seen["path"] == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert seen["form"] == {"To": ["+15551234567"], "From": [CLINIC],
                            "Body": ["Your results are ready"],
                            "StatusCallback": ["https://clinic.example/webhooks/twilio/status"],
                            "MediaUrl": ["https://x.example/a.png", "https://x.example/b.png"]}
    headers = seen["headers"]
    assert headers["Authorization"] == "Basic " + base64.b64encode(
        f"{SID}:{TOKEN}".encode()).decode()
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert headers["Accept"] == "application/json"
    assert headers["User-Agent"].startswith("twilio-python/")


def test_throttling_keeps_the_retry_after_hint(twilio: Twilio) -> None:
    twilio.throttle = True
    with pytest.raises(SendError) as caught:
        channel(twilio.origin).send(message())
    assert caught.value.kind == "throttled" and caught.value.retry_after == 7


def test_a_refused_connection_sent_nothing_and_may_be_retried() -> None:
    with pytest.raises(SendError) as caught:
        channel(f"http://127.0.0.1:{closed_port()}").send(message())
    assert caught.value.kind == "provider-unavailable"


def test_no_answer_after_sending_is_an_unknown_outcome() -> None:
    # Twilio may have created the message before the answer was lost: never retried blindly.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(SendError) as caught:
            channel(f"http://127.0.0.1:{port}", timeout=0.3).send(message())
    assert caught.value.kind == "outcome-unknown"
