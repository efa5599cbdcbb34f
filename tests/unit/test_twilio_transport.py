"""The Twilio channel's HTTP: the real SDK through its HttpClient on httpx (worker.httpclient),
against real servers on loopback. What goes on the wire, and which failures may have sent a
text."""

from __future__ import annotations

import base64
import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import pytest

from tests.unit.test_httpclient import RawServer, closed_port
from worker.channels import SendError
from worker.channels.twilio import TwilioSms
from worker.messages import Attachment, OutboundMessage

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


CREATED = json.dumps({"sid": "SM" + "f" * 32, "status": "queued"}).encode()
CREATED_REPLY = (b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(CREATED)).encode() + b"\r\n\r\n" + CREATED)


def test_a_connection_twilio_closed_while_idle_never_fails_a_send() -> None:
    # Twilio closed the kept-alive connection after the first send: the second goes on a new
    # connection, and is neither reported failed nor an unknown outcome.
    raw = RawServer([(CREATED_REPLY, False), (CREATED_REPLY, False)])
    sms = channel(raw.origin)
    try:
        sms.send(message())
        time.sleep(0.2)  # Twilio's close reaches us
        assert sms.send(message()).provider_id == "SM" + "f" * 32
    finally:
        raw.close()
    assert raw.connections == 2


@pytest.mark.parametrize("reply", [
    # Answered, then refused: Twilio may have created the message.
    b"HTTP/1.1 201 Created\r\nContent-Encoding: gzip\r\nContent-Length: "
    + str(len(BOMB := gzip.compress(b"\0" * 50_000_000))).encode() + b"\r\n\r\n" + BOMB,
    b"HTTP/1.1 201 Created\r\nContent-Length: 1_0\r\n\r\n" + CREATED[:10],
    b"HTTP/1.1 201 Created\r\nContent-Length: " + str(len(CREATED)).encode() + b"\r\n\r\n",
])
def test_an_answer_refused_after_sending_is_an_unknown_outcome(reply: bytes) -> None:
    raw = RawServer([(reply, False)])
    try:
        with pytest.raises(SendError) as caught:
            channel(raw.origin, timeout=1.0).send(message())
    finally:
        raw.close()
    assert caught.value.kind == "outcome-unknown"


def test_a_dripping_twilio_is_held_to_the_timeout() -> None:
    raw = RawServer([(CREATED_REPLY, False)], drip=0.05)  # about 6 s in all
    try:
        with pytest.raises(SendError) as caught:
            channel(raw.origin, timeout=0.5).send(message())
        assert raw.sent_whole == 0  # given up while Twilio was still dripping
    finally:
        raw.close()
    assert caught.value.kind == "outcome-unknown"


def test_the_send_before_a_stale_answer_is_not_answered_by_it() -> None:
    other = b'{"sid": "SM' + b"0" * 32 + b'", "status": "queued"}'
    stale = (b"HTTP/1.1 201 Created\r\nContent-Length: " + str(len(other)).encode()
             + b"\r\n\r\n" + other)
    raw = RawServer([(CREATED_REPLY + stale, True), (CREATED_REPLY, True)])
    sms = channel(raw.origin)
    try:
        first, second = sms.send(message()), sms.send(message())
    finally:
        raw.close()
    assert first.provider_id == second.provider_id == "SM" + "f" * 32
    assert len(raw.requests) == 2
