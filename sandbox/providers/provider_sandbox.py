"""Provider sandbox: a local stand-in for Twilio's Messages API, SendGrid's v3 mail/send and
Firebase Cloud Messaging's HTTP v1 send (with Google's OAuth2 token endpoint for a service
account).

The real `twilio`, `sendgrid` and `google-auth` libraries can be pointed at it (see README.md
next to this file). It records every provider request, injects faults per recipient, drives
signed Twilio status callbacks and signed SendGrid Event Webhook batches, and posts emails the
way SendGrid's Inbound Parse does (both modes, signed with the sandbox's documented ECDSA key).
Standard library only, except `cryptography` (already a dependency of the sendgrid SDK) for
those signatures.

    python sandbox/providers/provider_sandbox.py --port 0 [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from conversations import Conversations  # this directory: the script's own (sys.path[0])

API_VERSION = "2010-04-01"
DEFAULT_SIGNING_TOKEN = "sandbox-auth-token"  # noqa: S105 - documented sandbox default
TWILIO_PREFIX = f"/{API_VERSION}/Accounts/"
SEND_PATH = re.compile(rf"^/{API_VERSION}/Accounts/([^/]+)/Messages\.json$")
FETCH_PATH = re.compile(rf"^/{API_VERSION}/Accounts/([^/]+)/Messages/([^/]+)\.json$")
SENDGRID_SEND = "/v3/mail/send"
FCM_SEND_PATH = re.compile(r"^/v1/projects/([^/]+)/messages:send$")
GOOGLE_TOKEN_PATH = "/oauth2/token"  # noqa: S105 (a path)
GOOGLE_AUDIENCE = "https://oauth2.googleapis.com/token"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
CALLBACK_TIMEOUT_S = 10.0
# The sandbox's Inbound Parse signing key (a throwaway, documented in README.md): the receiver
# verifies with SANDBOX_INBOUND_VERIFICATION_KEY, as it would with the key SendGrid shows.
SANDBOX_INBOUND_PRIVATE_KEY = b"""-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgBGMQBdOm/lNnrQfw
wA+iWDgxSpk26zEWQS8A+NbPMSqhRANCAAR/gRtu/IugeetwqDc2cc2a4nUr0E3d
6PyIrve87sbZRxaE3drmsXyCZxliKOtpUWRMbBfSi+JhNyg7StHHGaeI
-----END PRIVATE KEY-----
"""
SANDBOX_INBOUND_VERIFICATION_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEf4EbbvyLoHnrcKg3NnHNmuJ1K9BN3ej8iK73vO7G2UcWhN3a5rF8"
    "gmcZYijraVFkTGwX0oviYTcoO0rRxxmniA==")

MESSAGE_STATUSES = frozenset({
    "queued", "sending", "sent", "failed", "delivered", "undelivered", "receiving", "received",
    "accepted", "scheduled", "read", "partially_delivered", "canceled",
})
SENT_STATUSES = frozenset({"sent", "delivered", "undelivered", "read", "partially_delivered"})

# Message text for the Twilio error codes we fake; `{to}` / `{from_}` are filled in.
TWILIO_MESSAGES: dict[int, str] = {
    20003: "Authenticate",
    20001: "Bad request",
    20403: "Forbidden",
    20404: "The requested resource {path} was not found",
    20429: "Too Many Requests",
    20500: "Internal Server Error",
    20503: "Service Unavailable",
    21211: "The 'To' number {to} is not a valid phone number.",
    21408: "Permission to send an SMS has not been enabled for the region indicated by the "
           "'To' number: {to}.",
    21602: "Message body is required.",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21610: "Attempt to send to unsubscribed recipient",
    21612: "The 'To' phone number: {to}, is not currently reachable using the 'From' phone "
           "number: {from_} via SMS.",
    21614: "'To' number {to} is not a valid mobile number",
    21635: "'To' number {to} cannot be a landline.",
    30001: "Queue overflow",
    30003: "Unreachable destination handset",
    30004: "Message blocked",
    30005: "Unknown destination handset",
    30006: "Landline or unreachable carrier",
    30007: "Message filtered",
    21619: "A text message body, media URL or content SID must be provided.",
    63016: "Failed to send freeform message because you are outside the allowed window. If "
           "you are using WhatsApp, please use a Message Template.",
}
WHATSAPP = "whatsapp:"
WHATSAPP_WINDOW_S = 24 * 3600
CONTENT_SID = re.compile(r"HX[0-9a-f]{32}")
# How long after the API accepted a free-form WhatsApp message outside the window the sandbox
# fails it with 63016, as Twilio does: the create answers 201 and the status callback says.
WHATSAPP_REFUSAL_DELAY_S = 0.2
# FCM v1 answers per HTTP status: (google.rpc status, FcmError errorCode, message).
FCM_ERRORS: dict[int, tuple[str, str, str]] = {
    400: ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR",
          "Request is missing required authentication credential."),
    403: ("PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch"),
    404: ("NOT_FOUND", "UNREGISTERED", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "Quota exceeded for quota metric."),
    500: ("INTERNAL", "INTERNAL", "Internal error encountered."),
    503: ("UNAVAILABLE", "UNAVAILABLE", "The service is currently unavailable."),
}
FCM_STATUS_OF_CODE = {code: status for status, (_, code, _) in FCM_ERRORS.items()}
# Code used when a fault gives an HTTP status but no twilio_code.
TWILIO_DEFAULT_CODES: dict[int, int] = {
    401: 20003, 403: 20403, 404: 20404, 429: 20429, 500: 20500, 503: 20503,
}
SENDGRID_MESSAGES: dict[int, str] = {
    400: "Bad Request",
    401: "The provided authorization grant is invalid, expired, or revoked",
    403: "access forbidden",
    404: "not found",
    413: "Payload Too Large",
    429: "too many requests",
    500: "internal error",
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
}

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENDED = frozenset("^{}\\[~]|€\f")


def num_segments(body: str) -> int:
    """SMS segment count: GSM-7 160/153 septets, otherwise UCS-2 70/67 code units."""
    if all(c in GSM7_BASIC or c in GSM7_EXTENDED for c in body):
        units = sum(2 if c in GSM7_EXTENDED else 1 for c in body)
        single, multi = 160, 153
    else:
        units = len(body.encode("utf-16-le")) // 2
        single, multi = 70, 67
    if units <= single:
        return 1
    return math.ceil(units / multi)


def twilio_signature(token: str, url: str, params: dict[str, str]) -> str:
    """X-Twilio-Signature: base64(HMAC-SHA1(token, url + sorted key+value pairs)).

    Same algorithm as twilio.request_validator.RequestValidator.compute_signature for
    single-valued form params (the test suite checks them against each other).
    """
    payload = url + "".join(k + params[k] for k in sorted(params))
    mac = hmac.new(token.encode("utf-8"), payload.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


def rfc2822(ts: float) -> str:
    """Twilio's date format: 'Thu, 24 Aug 2023 05:01:45 +0000'."""
    return formatdate(ts, usegmt=False).replace("-0000", "+0000")


class BadFault(ValueError):
    """A /__faults body that does not describe a fault."""


FAULT_KEYS = frozenset({
    "provider", "to", "method", "status", "twilio_code", "retry_after", "delay_ms", "message",
    "disconnect", "count", "sticky", "event", "fcm_code",
})
# SendGrid events the sandbox can produce (Event Webhook). A fault with `event` lets the send
# succeed and makes its automatic events end in that one instead of `delivered`.
SENDGRID_EVENTS = frozenset({
    "processed", "deferred", "delivered", "bounce", "blocked", "dropped", "open", "click",
    "spamreport", "unsubscribe", "group_unsubscribe", "group_resubscribe",
})
# What follows `processed` when a send's automatic events end in a given event.
AUTO_SEQUENCES: dict[str, list[str]] = {
    "delivered": ["delivered"],
    "deferred": ["deferred", "delivered"],
    "bounce": ["bounce"], "blocked": ["blocked"], "dropped": ["dropped"],
}
EVENT_REASONS = {
    "bounce": ("550 5.1.1 The email account that you tried to reach does not exist.", "5.1.1"),
    "blocked": ("550 5.7.1 Message rejected due to local policy", "5.7.1"),
    "dropped": ("Bounced Address", None),
    "deferred": ("421 4.7.0 Try again later", None),
}


@dataclass
class Fault:
    """One queued fault; `remaining` None means sticky (applies forever)."""

    id: int
    provider: str | None = None
    to: str | None = None
    method: str | None = None
    status: int | None = None
    twilio_code: int | None = None
    retry_after: float | None = None
    delay_ms: int = 0
    message: str | None = None
    disconnect: bool = False
    remaining: int | None = 1
    applied: int = 0
    event: str | None = None
    fcm_code: str | None = None

    @classmethod
    def parse(cls, fid: int, spec: Any) -> Fault:
        if not isinstance(spec, dict):
            raise BadFault("a fault must be a JSON object")
        unknown = set(spec) - FAULT_KEYS
        if unknown:
            raise BadFault(f"unknown fault keys: {sorted(unknown)}")
        provider = spec.get("provider")
        if provider not in (None, "twilio", "sendgrid", "fcm", "google"):
            raise BadFault("provider must be 'twilio', 'sendgrid', 'fcm' or 'google'")
        fcm_code = spec.get("fcm_code")
        if fcm_code is not None and not isinstance(fcm_code, str):
            raise BadFault("fcm_code must be a string (an FCM ErrorCode)")
        if fcm_code is not None and spec.get("status") is None:
            # An FCM code alone gives its documented status (UNREGISTERED -> 404).
            spec = {**spec, "status": FCM_STATUS_OF_CODE.get(fcm_code, 400)}
        status = spec.get("status")
        if status is not None and (not isinstance(status, int) or not 400 <= status <= 599):
            raise BadFault("status must be an integer HTTP error status (400-599)")
        delay_ms = spec.get("delay_ms", 0)
        if not isinstance(delay_ms, int) or delay_ms < 0:
            raise BadFault("delay_ms must be a non-negative integer")
        disconnect = bool(spec.get("disconnect", False))
        event = spec.get("event")
        if event is not None and (event not in SENDGRID_EVENTS or provider != "sendgrid"):
            raise BadFault(f"event needs provider 'sendgrid' and one of {sorted(SENDGRID_EVENTS)}")
        if status is None and not delay_ms and not disconnect and event is None:
            raise BadFault("a fault needs at least one of status, delay_ms, disconnect, event")
        code = spec.get("twilio_code")
        if code is not None and not isinstance(code, int):
            raise BadFault("twilio_code must be an integer")
        retry_after = spec.get("retry_after")
        if retry_after is not None and not isinstance(retry_after, int | float):
            raise BadFault("retry_after must be a number of seconds")
        method = spec.get("method")
        if method is not None and not isinstance(method, str):
            raise BadFault("method must be a string")
        count = spec.get("count")
        if count is not None and (not isinstance(count, int) or count < 0):
            raise BadFault("count must be a non-negative integer")
        sticky = bool(spec.get("sticky", False))
        if count == 0 and not sticky:
            raise BadFault("count 0 needs \"sticky\": true (forever)")
        remaining = count if count else (None if sticky else 1)
        to = spec.get("to")
        message = spec.get("message")
        return cls(
            id=fid, provider=provider, to=None if to is None else str(to),
            method=None if method is None else method.upper(), status=status, twilio_code=code,
            retry_after=retry_after, delay_ms=delay_ms,
            message=None if message is None else str(message), disconnect=disconnect,
            remaining=remaining, event=event, fcm_code=fcm_code,
        )

    def matches(self, provider: str, method: str, recipients: list[str]) -> bool:
        if self.provider is not None and self.provider != provider:
            return False
        if self.method is not None and self.method not in ("*", method):
            return False
        if self.to is not None:
            wanted = self.to.lower() if provider == "sendgrid" else self.to
            return wanted in recipients
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id, "provider": self.provider, "to": self.to, "method": self.method,
            "status": self.status, "twilio_code": self.twilio_code,
            "retry_after": self.retry_after, "delay_ms": self.delay_ms, "message": self.message,
            "disconnect": self.disconnect, "remaining": self.remaining,
            "sticky": self.remaining is None, "applied": self.applied, "event": self.event,
            "fcm_code": self.fcm_code,
        }


@dataclass
class State:
    """Everything the sandbox remembers; guarded by `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[dict[str, Any]] = field(default_factory=list)
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    # SendGrid sends by X-Message-Id: recipient, custom args, Message-ID (for events).
    emails: dict[str, dict[str, Any]] = field(default_factory=dict)
    event_posts: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    next_fault_id: int = 1
    # Google access tokens handed out by the token endpoint: token -> expiry (epoch seconds).
    access_tokens: dict[str, float] = field(default_factory=dict)
    # WhatsApp's 24-hour windows: (user `whatsapp:+…`, our sender `whatsapp:+…` or MG…) -> when
    # the user last wrote, from the inbound messages the sandbox delivered or was told of.
    wa_windows: dict[tuple[str, str], float] = field(default_factory=dict)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.messages.clear()
            self.emails.clear()
            self.event_posts.clear()
            self.faults.clear()
            self.wa_windows.clear()
            # Access tokens stay valid until they expire, as Google's do: a client holding one
            # is not told about a reset.

    def take_fault(self, provider: str, method: str, recipients: list[str]) -> Fault | None:
        """The first queued fault matching this request, consumed once."""
        with self.lock:
            for fault in self.faults:
                if fault.matches(provider, method, recipients):
                    fault.applied += 1
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self.faults.remove(fault)
                    return fault
        return None


@dataclass
class Config:
    twilio_account_sid: str | None
    twilio_auth_token: str | None
    sendgrid_api_key: str | None
    verbose: bool
    # Event Webhook: where to post, the ECDSA P-256 private key (base64 PKCS#8 DER) that signs,
    # and whether every accepted send posts its events by itself.
    sendgrid_event_url: str | None = None
    sendgrid_event_key: str | None = None
    sendgrid_events_auto: bool = False
    google_token_lifetime: int = 3600

    @property
    def signing_token(self) -> str:
        return self.twilio_auth_token or DEFAULT_SIGNING_TOKEN


class SandboxServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], config: Config) -> None:
        super().__init__(address, Handler)
        self.config = config
        self.state = State()
        self.conversations = Conversations(twilio_signature, post_webhook,
                                           lambda: config.signing_token,
                                           config.twilio_account_sid)


class Disconnect(Exception):
    """Close the connection without answering."""


class Handler(BaseHTTPRequestHandler):
    server: SandboxServer
    protocol_version = "HTTP/1.0"

    def version_string(self) -> str:
        return "ProviderSandbox/1.0"

    # --- plumbing ---------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.config.verbose:
            sys.stderr.write(f"provider-sandbox: {format % args}\n")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        path, query = parsed.path, urllib.parse.parse_qs(parsed.query)
        body = self._read_body()
        try:
            if path.startswith("/__conversations/"):
                if not self.server.conversations.control(self, method, path, body):
                    self._json(404, {"error": f"no control route {method} {path}"})
            elif path.startswith("/__"):
                self._control(method, path, query, body)
            elif self.server.conversations.handles(path):
                self.server.conversations.handle(self, method, path, body)
            elif path.startswith(f"/{API_VERSION}/"):
                self._twilio(method, path, body)
            elif path.startswith("/v3/"):
                self._sendgrid(method, path, body)
            elif path == GOOGLE_TOKEN_PATH:
                self._google_token(method, body)
            elif path.startswith("/v1/projects/"):
                self._fcm(method, path, body)
            else:
                self._json(404, {"error": f"no route {method} {path}"})
        except Disconnect:
            self.close_connection = True

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes, content_type: str | None,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json", headers)

    def _record(self, provider: str, method: str, path: str, to: str | None,
                body_key: str, body: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "provider": provider, "method": method, "path": path, "to": to,
            body_key: body, "answered": None, "at": time.time(),
        }
        with self.server.state.lock:
            self.server.state.requests.append(entry)
        return entry

    def _answered(self, entry: dict[str, Any], status: int, **extra: Any) -> None:
        with self.server.state.lock:
            entry["answered"] = status
            entry.update(extra)

    def _apply_delay_or_disconnect(self, fault: Fault | None, entry: dict[str, Any]) -> None:
        if fault is None:
            return
        if fault.delay_ms:
            time.sleep(fault.delay_ms / 1000.0)
        if fault.disconnect:
            self._answered(entry, 0, fault=fault.id)
            raise Disconnect

    @staticmethod
    def _retry_headers(fault: Fault) -> dict[str, str]:
        if fault.retry_after is None:
            return {}
        value = fault.retry_after
        return {"Retry-After": str(int(value)) if float(value).is_integer() else str(value)}

    # --- Twilio -----------------------------------------------------------------------------

    def _twilio_error(self, status: int, code: int, message: str,
                      headers: dict[str, str] | None = None) -> None:
        self._json(status, {
            "code": code, "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status,
        }, headers)

    def _twilio_authorized(self) -> bool:
        config = self.server.config
        if not config.twilio_auth_token:
            return True
        header = self.headers.get("Authorization") or ""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        ok_user = config.twilio_account_sid is None or hmac.compare_digest(
            user, config.twilio_account_sid)
        return ok_user and hmac.compare_digest(password, config.twilio_auth_token)

    def _twilio(self, method: str, path: str, body: bytes) -> None:
        send, fetch = SEND_PATH.match(path), FETCH_PATH.match(path)
        form: dict[str, str | list[str]] = {}
        to: str | None = None
        if send and method == "POST":
            pairs = urllib.parse.parse_qsl(body.decode("utf-8", "replace"),
                                           keep_blank_values=True)
            for key, value in pairs:
                prior = form.get(key)
                if prior is None:
                    form[key] = value
                elif isinstance(prior, list):
                    prior.append(value)
                else:
                    form[key] = [prior, value]
            raw_to = form.get("To")
            to = raw_to if isinstance(raw_to, str) else None
        elif fetch:
            with self.server.state.lock:
                stored = self.server.state.messages.get(fetch.group(2))
                to = None if stored is None else stored["to"]
        entry = self._record("twilio", method, path, to, "form", form)

        if not self._twilio_authorized():
            self._answered(entry, 401)
            self._twilio_error(401, 20003, TWILIO_MESSAGES[20003],
                               {"WWW-Authenticate": 'Basic realm="Twilio API"'})
            return

        fault = self.server.state.take_fault("twilio", method, [to] if to else [])
        self._apply_delay_or_disconnect(fault, entry)
        if fault is not None and fault.status is not None:
            code = fault.twilio_code or TWILIO_DEFAULT_CODES.get(
                fault.status, 20500 if fault.status >= 500 else 20001)
            from_ = form.get("From") or form.get("MessagingServiceSid") or ""
            template = fault.message or TWILIO_MESSAGES.get(
                code, "Bad request" if fault.status < 500 else "Service error")
            message = template.replace("{to}", to or "").replace("{path}", path).replace(
                "{from_}", from_ if isinstance(from_, str) else "")
            self._answered(entry, fault.status, fault=fault.id)
            self._twilio_error(fault.status, code, message, self._retry_headers(fault))
            return

        if send and method == "POST":
            status, payload = self._create_message(send.group(1), form)
            self._answered(entry, status, message_sid=payload.get("sid"))
            self._json(status, payload)
        elif fetch and method == "GET":
            with self.server.state.lock:
                stored = self.server.state.messages.get(fetch.group(2))
                found = (None if stored is None or stored["account_sid"] != fetch.group(1)
                         else self._public(stored))
            if found is None:
                self._answered(entry, 404)
                self._twilio_error(404, 20404, TWILIO_MESSAGES[20404].format(path=path))
            else:
                self._answered(entry, 200)
                self._json(200, found)
        elif send or fetch:
            self._answered(entry, 405)
            self._twilio_error(405, 20004, "Method not allowed")
        else:
            self._answered(entry, 404)
            self._twilio_error(404, 20404, TWILIO_MESSAGES[20404].format(path=path))

    @staticmethod
    def _public(message: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in message.items() if not k.startswith("_")}

    def _create_message(self, account_sid: str, form: dict[str, str | list[str]]
                        ) -> tuple[int, dict[str, Any]]:
        def one(key: str) -> str:
            value = form.get(key)
            if isinstance(value, list):
                return value[0] if value else ""
            return value or ""

        media = form.get("MediaUrl") or []
        media_urls = [media] if isinstance(media, str) else [m for m in media if m]
        to, from_, service, body = one("To"), one("From"), one("MessagingServiceSid"), one("Body")
        content_sid, variables = one("ContentSid"), one("ContentVariables")
        whatsapp = to.lower().startswith(WHATSAPP)
        error: tuple[int, str] | None = None
        if not to:
            error = (21604, TWILIO_MESSAGES[21604])
        elif not from_ and not service:
            error = (21603, TWILIO_MESSAGES[21603])
        elif content_sid and (not CONTENT_SID.fullmatch(content_sid) or body or media_urls
                              or not _json_object(variables or "{}")):
            # A template goes as ContentSid (+ ContentVariables, a JSON object), nothing else.
            error = (21619, TWILIO_MESSAGES[21619])
        elif not body and not media_urls and not content_sid:
            error = (21602, TWILIO_MESSAGES[21602])
        if error is not None:
            code, text = error
            return 400, {"code": code, "message": text,
                         "more_info": f"https://www.twilio.com/docs/errors/{code}",
                         "status": 400}

        sid = "SM" + uuid.uuid4().hex
        now = time.time()
        uri = f"/{API_VERSION}/Accounts/{account_sid}/Messages/{sid}.json"
        via_service = bool(service) and not from_
        message: dict[str, Any] = {
            "account_sid": account_sid,
            "api_version": API_VERSION,
            "body": body,
            "date_created": rfc2822(now),
            "date_sent": None,
            "date_updated": rfc2822(now),
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": from_ or None,
            "messaging_service_sid": service or None,
            "num_media": str(len(media_urls)),
            "num_segments": "0" if via_service else str(num_segments(body)),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if via_service else "queued",
            "subresource_uris": {
                "media": f"/{API_VERSION}/Accounts/{account_sid}/Messages/{sid}/Media.json",
            },
            "to": to,
            "uri": uri,
            "_status_callback": one("StatusCallback") or None,
            "_media_urls": media_urls,
            "_content_sid": content_sid or None,
            "_content_variables": variables or None,
        }
        with self.server.state.lock:
            self.server.state.messages[sid] = message
            public = self._public(message)
            opened = self.server.state.wa_windows.get((to.lower(), (from_ or service).lower()))
        if whatsapp and not content_sid and (opened is None
                                             or now - opened >= WHATSAPP_WINDOW_S):
            # Twilio takes the message, then fails it: the status callback carries 63016.
            threading.Timer(WHATSAPP_REFUSAL_DELAY_S, self._refuse_outside_window,
                            args=(sid,)).start()
        return 201, public

    def _refuse_outside_window(self, sid: str) -> None:
        state, config = self.server.state, self.server.config
        with state.lock:
            message = state.messages[sid]
            callback_url, params, _ = self._advance(message, "failed", 63016, {}, time.time())
        if callback_url:
            self._post_callback(callback_url, params, config.signing_token)

    # --- SendGrid ---------------------------------------------------------------------------

    def _sendgrid_error(self, status: int, errors: list[tuple[str, str | None]],
                        headers: dict[str, str] | None = None) -> None:
        self._json(status, {"errors": [
            {"message": message, "field": fld, "help": None} for message, fld in errors
        ]}, headers)

    def _sendgrid(self, method: str, path: str, body: bytes) -> None:
        payload: Any = None
        parse_error = False
        if body:
            try:
                payload = json.loads(body)
            except ValueError:
                parse_error = True
        recipients = self._sendgrid_recipients(payload)
        entry = self._record("sendgrid", method, path, recipients[0] if recipients else None,
                             "json", payload)

        key = self.server.config.sendgrid_api_key
        if key is not None and not hmac.compare_digest(
                self.headers.get("Authorization") or "", f"Bearer {key}"):
            self._answered(entry, 401)
            self._sendgrid_error(401, [(SENDGRID_MESSAGES[401], None)])
            return

        fault = self.server.state.take_fault("sendgrid", method, recipients)
        self._apply_delay_or_disconnect(fault, entry)
        if fault is not None and fault.status is not None:
            headers = self._retry_headers(fault)
            if fault.status == 429:
                reset = int(time.time() + (fault.retry_after or 1))
                headers.update({"X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0",
                                "X-RateLimit-Reset": str(reset)})
            text = fault.message or SENDGRID_MESSAGES.get(fault.status, "error")
            self._answered(entry, fault.status, fault=fault.id)
            self._sendgrid_error(fault.status, [(text, None)], headers)
            return

        if path != SENDGRID_SEND:
            self._answered(entry, 404)
            self._sendgrid_error(404, [(SENDGRID_MESSAGES[404], None)])
            return
        if method != "POST":
            self._answered(entry, 405)
            self._sendgrid_error(405, [("method not allowed", None)])
            return
        if parse_error or not isinstance(payload, dict):
            self._answered(entry, 400)
            self._sendgrid_error(400, [("Bad Request", None)])
            return
        errors = self._sendgrid_validate(payload)
        if errors:
            self._answered(entry, 400)
            self._sendgrid_error(400, errors)
            return
        message_id = secrets.token_urlsafe(16)[:22]
        self._answered(entry, 202, message_id=message_id)
        mail_headers: Any = payload.get("headers")
        mail_headers = mail_headers if isinstance(mail_headers, dict) else {}
        custom = payload.get("custom_args") if isinstance(payload.get("custom_args"), dict) \
            else {}
        with self.server.state.lock:
            self.server.state.emails[message_id] = {
                "to": recipients[0] if recipients else "", "custom_args": custom,
                "smtp_id": str(mail_headers.get("Message-ID") or f"<{message_id}@sandbox>")}
        self._send(202, b"", None, {"X-Message-Id": message_id})
        config = self.server.config
        if config.sendgrid_events_auto and config.sendgrid_event_url:
            last = fault.event if fault is not None and fault.event else "delivered"
            names = ["processed", *AUTO_SEQUENCES.get(last, ["delivered", last])]
            threading.Thread(target=self._auto_events, args=(message_id, names),
                             daemon=True).start()

    @staticmethod
    def _sendgrid_recipients(payload: Any) -> list[str]:
        """Every personalizations[].to[].email, lower-cased, in order."""
        found: list[str] = []
        if not isinstance(payload, dict):
            return found
        personalizations = payload.get("personalizations")
        if not isinstance(personalizations, list):
            return found
        for p in personalizations:
            tos = p.get("to") if isinstance(p, dict) else None
            for t in tos if isinstance(tos, list) else []:
                if isinstance(t, dict) and isinstance(t.get("email"), str):
                    found.append(t["email"].lower())
        return found

    @staticmethod
    def _sendgrid_validate(payload: dict[str, Any]) -> list[tuple[str, str | None]]:
        errors: list[tuple[str, str | None]] = []
        personalizations = payload.get("personalizations")
        if not isinstance(personalizations, list) or not personalizations:
            errors.append(("The personalizations field is required and must have at least one "
                           "personalization.", "personalizations"))
            personalizations = []
        for i, p in enumerate(personalizations):
            tos = p.get("to") if isinstance(p, dict) else None
            if not isinstance(tos, list) or not tos or not all(
                    isinstance(t, dict) and t.get("email") for t in tos):
                errors.append(("The to array is required for all personalization objects, and "
                               "must have at least one email object with a valid email address.",
                               f"personalizations.{i}.to"))
        sender = payload.get("from")
        if not isinstance(sender, dict) or not sender.get("email"):
            errors.append(("The from email does not contain a valid address.", "from.email"))
        templated = bool(payload.get("template_id"))
        every_subject = bool(personalizations) and all(
            isinstance(p, dict) and p.get("subject") for p in personalizations)
        if not payload.get("subject") and not templated and not every_subject:
            errors.append(("The subject is required. You can get around this requirement if you "
                           "use a template with a subject defined or if every personalization "
                           "has a subject defined.", "subject"))
        content = payload.get("content")
        if not templated and (not isinstance(content, list) or not content or not all(
                isinstance(c, dict) and c.get("type") and c.get("value") for c in content)):
            errors.append(("Unless a valid template_id is provided, the content parameter is "
                           "required. There must be at least one defined content block.",
                           "content"))
        return errors

    # --- SendGrid Event Webhook -------------------------------------------------------------
    def _auto_events(self, message_id: str, names: list[str]) -> None:
        """After a send: one signed batch per event, in order, a moment apart (as SendGrid
        posts them), so the Communication is seen moving."""
        for name in names:
            time.sleep(0.3)
            try:
                self._post_events(self._build_events(message_id, [name]))
            except BadFault:
                return

    def _build_events(self, message_id: str, specs: list[Any]) -> list[dict[str, Any]]:
        """Events for a stored send; each spec is an event name or an object of overrides."""
        with self.server.state.lock:
            email = self.server.state.emails.get(message_id)
        if email is None:
            raise BadFault(f"unknown X-Message-Id {message_id}")
        events = []
        for spec in specs:
            over = spec if isinstance(spec, dict) else {"event": spec}
            name = over.get("event")
            if name not in SENDGRID_EVENTS:
                raise BadFault(f"event must be one of {sorted(SENDGRID_EVENTS)}")
            # A block is a bounce of type "blocked" on the wire.
            wire = "bounce" if name == "blocked" else name
            event: dict[str, Any] = {
                "email": email["to"], "timestamp": int(time.time()), "event": wire,
                "smtp-id": email["smtp_id"], "category": [],
                "sg_event_id": base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("="),
                "sg_message_id": f"{message_id}.filterdrecv-sandbox-{secrets.token_hex(4)}-0",
                **email["custom_args"],
            }
            if name in ("bounce", "blocked"):
                reason, status = EVENT_REASONS[name]
                event.update({"reason": reason, "status": status, "type": name,
                              "bounce_classification": "Invalid Address"
                              if name == "bounce" else "Reputation"})
            elif name in EVENT_REASONS:
                event["reason" if name == "dropped" else "response"] = EVENT_REASONS[name][0]
            if name == "delivered":
                event.update({"response": "250 OK", "tls": 1, "ip": "127.0.0.1"})
            event.update({k: v for k, v in over.items() if k != "event"})
            events.append(event)
        return events

    def _signed(self, body: bytes) -> dict[str, str]:
        """The Event Webhook's signature headers for `body` (ECDSA P-256, SHA-256, base64 DER
        over the timestamp followed by the raw body)."""
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key_b64 = self.server.config.sendgrid_event_key
        if not key_b64:
            raise BadFault("no --sendgrid-event-key: events cannot be signed")
        key = serialization.load_der_private_key(base64.b64decode(key_b64), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        stamp = str(int(time.time()))
        signature = key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {"X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
                "X-Twilio-Email-Event-Webhook-Timestamp": stamp}

    def _post_events(self, events: list[dict[str, Any]], url: str | None = None,
                     post: bool = True) -> dict[str, Any]:
        body = json.dumps(events).encode("utf-8")
        headers = {"Content-Type": "application/json", "User-Agent": "SendGrid Event API",
                   **self._signed(body)}
        result: dict[str, Any] = {"events": events, "body": body.decode("utf-8"),
                                  "headers": headers, "status": None}
        target = url or self.server.config.sendgrid_event_url
        if post and target:
            result["url"] = target
            result.update(post_webhook(target, body, headers))
        with self.server.state.lock:
            self.server.state.event_posts.append(
                {k: result.get(k) for k in ("url", "status", "error")}
                | {"events": [e["event"] for e in events]})
        return result

    def _events_control(self, body: bytes) -> None:
        try:
            spec = self._load_json(body)
            if not isinstance(spec, dict) or not isinstance(spec.get("message_id"), str) \
                    or not isinstance(spec.get("events"), list) or not spec["events"]:
                raise BadFault('body must be {"message_id": <X-Message-Id>, "events": [...]}')
            url = spec.get("url")
            if url is not None and (not isinstance(url, str) or urllib.parse.urlsplit(
                    url).scheme not in ("http", "https")):
                raise BadFault("url must be an http(s) URL")
            events = self._build_events(spec["message_id"], spec["events"])
            result = self._post_events(events, url, bool(spec.get("post", True)))
        except BadFault as exc:
            self._json(400, {"error": str(exc)})
            return
        self._json(200, result)

    # --- Google OAuth2 (service account) and FCM HTTP v1 --------------------------------------

    def _google_token(self, method: str, body: bytes) -> None:
        """Google's token endpoint for a service account: a JWT-bearer grant whose assertion is
        an RS256 JWT with iss, scope, aud (this URL), iat and exp. The shape is checked; the
        signature is not (the sandbox has no copy of the public key)."""
        form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
        claims, problem = self._jwt_claims(form.get("assertion", ""))
        if method != "POST":
            problem = "method not allowed"
        elif form.get("grant_type") != JWT_BEARER_GRANT:
            problem = f"grant_type must be {JWT_BEARER_GRANT}"
        entry = self._record("google", method, GOOGLE_TOKEN_PATH, None, "json",
                             {"grant_type": form.get("grant_type"), "claims": claims})
        if problem:
            self._answered(entry, 400)
            self._json(400, {"error": "invalid_grant", "error_description": problem})
            return
        fault = self.server.state.take_fault("google", method, [])
        self._apply_delay_or_disconnect(fault, entry)
        if fault is not None and fault.status is not None:
            self._answered(entry, fault.status, fault=fault.id)
            self._json(fault.status, {"error": "invalid_grant" if fault.status < 500
                                      else "internal_failure",
                                      "error_description": fault.message or "refused"})
            return
        access = "ya29.sandbox-" + secrets.token_urlsafe(24)
        lifetime = self.server.config.google_token_lifetime
        with self.server.state.lock:
            self.server.state.access_tokens[access] = time.time() + lifetime
        self._answered(entry, 200)
        self._json(200, {"access_token": access, "expires_in": lifetime,
                         "token_type": "Bearer"})

    def _jwt_claims(self, assertion: str) -> tuple[dict[str, Any] | None, str | None]:
        parts = assertion.split(".")
        if len(parts) != 3 or not all(parts):
            return None, "assertion must be a JWT (header.claims.signature)"
        try:
            header, claims = (json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
                              for p in parts[:2])
        except (ValueError, binascii.Error):
            return None, "assertion parts must be base64url JSON"
        if not isinstance(header, dict) or header.get("alg") != "RS256":
            return None, "a service-account assertion is signed RS256"
        if not isinstance(claims, dict):
            return None, "claims must be a JSON object"
        now = time.time()
        host = self.headers.get("Host") or ""
        expected_aud = f"http://{host}{GOOGLE_TOKEN_PATH}"
        if not claims.get("iss") or "@" not in str(claims.get("iss")):
            return claims, "iss must be the service account's client_email"
        if FCM_SCOPE not in str(claims.get("scope", "")).split():
            return claims, f"scope must include {FCM_SCOPE}"
        # google-auth always puts Google's own token endpoint in `aud`, whatever the file's
        # token_uri says (service_account._GOOGLE_OAUTH2_TOKEN_ENDPOINT); Google accepts both.
        if claims.get("aud") not in (expected_aud, GOOGLE_AUDIENCE):
            return claims, f"aud must be {GOOGLE_AUDIENCE} or the token URI {expected_aud}"
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int) or not iat <= exp <= iat + 3600:
            return claims, "iat and exp must be integers, exp at most an hour after iat"
        if exp < now - 60 or iat > now + 300:
            return claims, "the assertion is expired or from the future"
        return claims, None

    def _fcm_error(self, status: int, fcm_code: str | None, message: str | None = None,
                   headers: dict[str, str] | None = None) -> None:
        rpc, default_code, text = FCM_ERRORS.get(
            status, ("INVALID_ARGUMENT" if status < 500 else "INTERNAL", None, "error"))
        code = fcm_code or default_code
        details: list[dict[str, Any]] = []
        if code:
            details.append({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                            "errorCode": code})
        if status == 400 and code == "INVALID_ARGUMENT":
            details.append({"@type": "type.googleapis.com/google.rpc.BadRequest",
                            "fieldViolations": [{"field": "message.token",
                                                 "description": "Invalid registration token"}]})
        self._json(status, {"error": {"code": status, "message": message or text,
                                      "status": rpc, "details": details}}, headers)

    def _fcm(self, method: str, path: str, body: bytes) -> None:
        send = FCM_SEND_PATH.match(path)
        payload: Any = None
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        message = payload.get("message") if isinstance(payload, dict) else None
        token = message.get("token") if isinstance(message, dict) else None
        to = token if isinstance(token, str) else None
        entry = self._record("fcm", method, path, to, "json", payload)
        bearer = (self.headers.get("Authorization") or "").partition(" ")
        with self.server.state.lock:
            expiry = self.server.state.access_tokens.get(bearer[2])
        if bearer[0].lower() != "bearer" or expiry is None or expiry < time.time():
            self._answered(entry, 401)
            self._json(401, {"error": {
                "code": 401, "status": "UNAUTHENTICATED",
                "message": "Request had invalid authentication credentials. Expected OAuth 2 "
                           "access token, login cookie or other valid authentication "
                           "credential."}}, {"WWW-Authenticate": 'Bearer realm="https://'
                                                                 'accounts.google.com/"'})
            return
        fault = self.server.state.take_fault("fcm", method, [to] if to else [])
        self._apply_delay_or_disconnect(fault, entry)
        if fault is not None and fault.status is not None:
            self._answered(entry, fault.status, fault=fault.id)
            self._fcm_error(fault.status, fault.fcm_code, fault.message,
                            self._retry_headers(fault))
            return
        if not send or method != "POST":
            self._answered(entry, 404)
            self._fcm_error(404, None, f"no route {method} {path}")
            return
        if not isinstance(message, dict) or not to:
            self._answered(entry, 400)
            self._json(400, {"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                       "message": "Recipient of the message is not set."}})
            return
        data = message.get("data")
        if data is not None and (not isinstance(data, dict) or not all(
                isinstance(v, str) for v in data.values())):
            self._answered(entry, 400)
            self._fcm_error(400, None, "Invalid value at 'message.data': values must be strings")
            return
        name = f"projects/{send.group(1)}/messages/0:{time.time_ns()}%{secrets.token_hex(8)}"
        self._answered(entry, 200, message_name=name)
        self._json(200, {"name": name})

    # --- control routes ---------------------------------------------------------------------

    def _control(self, method: str, path: str, query: dict[str, list[str]],
                 body: bytes) -> None:
        state = self.server.state
        route = (method, path)
        if route == ("GET", "/__health"):
            self._json(200, {"ok": True})
        elif route == ("GET", "/__requests"):
            provider = next(iter(query.get("provider", [])), None)
            to = next(iter(query.get("to", [])), None)
            with state.lock:
                rows = [dict(r) for r in state.requests
                        if (provider is None or r["provider"] == provider)
                        and (to is None or (r["to"] or "").lower() == to.lower())]
            self._json(200, rows)
        elif route == ("POST", "/__reset"):
            state.reset()
            self.server.conversations.reset()
            self._json(200, {"reset": True})
        elif route == ("GET", "/__messages"):
            with state.lock:
                rows = [dict(self._public(m), status_callback=m["_status_callback"],
                             media_url=m["_media_urls"]) for m in state.messages.values()]
            self._json(200, rows)
        elif route == ("GET", "/__faults"):
            with state.lock:
                rows = [f.describe() for f in state.faults]
            self._json(200, rows)
        elif route == ("POST", "/__faults"):
            self._add_faults(body)
        elif route == ("DELETE", "/__faults"):
            with state.lock:
                state.faults.clear()
            self._json(200, {"cleared": True})
        elif route == ("POST", "/__status"):
            self._set_status(body)
        elif route == ("POST", "/__sendgrid/events"):
            self._events_control(body)
        elif route == ("GET", "/__sendgrid/events"):
            with state.lock:
                rows = [dict(p) for p in state.event_posts]
            self._json(200, rows)
        elif route == ("POST", "/__whatsapp/inbound"):
            self._whatsapp_inbound(body)
        elif route == ("POST", "/__whatsapp/window"):
            self._whatsapp_window(body)
        elif route == ("GET", "/__inbound_email/key"):
            self._json(200, {"verification_key": SANDBOX_INBOUND_VERIFICATION_KEY})
        elif route == ("POST", "/__inbound_email"):
            try:
                spec = self._load_json(body)
                if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
                    raise BadFault('body must be {"url": ..., "from": ..., ...}')
                self._json(200, post_inbound_email(spec))
            except (BadFault, ValueError, TypeError, KeyError) as exc:
                self._json(400, {"error": str(exc)})
        else:
            self._json(404, {"error": f"no control route {method} {path}"})

    def _whatsapp_inbound(self, body: bytes) -> None:
        """A user writes on WhatsApp: the incoming-message webhook as Twilio posts it (signed),
        and the user's 24-hour window with that sender opens."""
        try:
            spec = self._load_json(body)
            if not isinstance(spec, dict) or not all(isinstance(spec.get(k), str)
                                                     for k in ("url", "from", "to")):
                raise BadFault('body must be {"url": ..., "from": "+…", "to": "+…", ...}')
            params = whatsapp_inbound_params(spec, self.server.config.twilio_account_sid)
        except BadFault as exc:
            self._json(400, {"error": str(exc)})
            return
        url = spec["url"]
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            self._json(400, {"error": "url must be an http(s) URL"})
            return
        with self.server.state.lock:  # Twilio has the message whatever our webhook answers
            self.server.state.wa_windows[(params["From"].lower(), params["To"].lower())] = \
                time.time()
        posted = post_webhook(url, urllib.parse.urlencode(params).encode(), {
            "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
            "User-Agent": "TwilioProxy/1.1",
            "X-Twilio-Signature": twilio_signature(self.server.config.signing_token, url,
                                                   params),
            "I-Twilio-Idempotency-Token": str(uuid.uuid4())})
        self._json(200, {"params": params, **posted})

    def _whatsapp_window(self, body: bytes) -> None:
        """Tell the sandbox when a user last wrote to a sender (`at`: epoch seconds; null
        closes the window): a window opened or closed outside the sandbox's view."""
        try:
            spec = self._load_json(body)
            if not isinstance(spec, dict) or not isinstance(spec.get("user"), str) \
                    or not isinstance(spec.get("sender"), str):
                raise BadFault('body must be {"user": "+…", "sender": "+…|MG…", "at": ...}')
        except BadFault as exc:
            self._json(400, {"error": str(exc)})
            return
        key = (_wa(spec["user"]).lower(), (spec["sender"] if spec["sender"].startswith("MG")
                                           else _wa(spec["sender"])).lower())
        with self.server.state.lock:
            if isinstance(spec.get("at"), int | float):
                self.server.state.wa_windows[key] = float(spec["at"])
            else:
                self.server.state.wa_windows.pop(key, None)
        self._json(200, {"user": key[0], "sender": key[1], "at": spec.get("at")})

    def _load_json(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"null")
        except ValueError as exc:
            raise BadFault(f"body is not JSON: {exc}") from exc

    def _add_faults(self, body: bytes) -> None:
        state = self.server.state
        try:
            spec = self._load_json(body)
            specs = spec if isinstance(spec, list) else [spec]
            with state.lock:
                faults = [Fault.parse(state.next_fault_id + i, s) for i, s in enumerate(specs)]
                state.next_fault_id += len(faults)
                state.faults.extend(faults)
                described = [f.describe() for f in faults]
        except BadFault as exc:
            self._json(400, {"error": str(exc)})
            return
        self._json(201, described if isinstance(spec, list) else described[0])

    def _set_status(self, body: bytes) -> None:
        state, config = self.server.state, self.server.config
        try:
            spec = self._load_json(body)
        except BadFault as exc:
            self._json(400, {"error": str(exc)})
            return
        if not isinstance(spec, dict) or not isinstance(spec.get("sid"), str):
            self._json(400, {"error": "body must be {\"sid\": ..., \"status\": ...}"})
            return
        status, error_code = spec.get("status"), spec.get("error_code")
        if status not in MESSAGE_STATUSES:
            self._json(400, {"error": f"status must be one of {sorted(MESSAGE_STATUSES)}"})
            return
        if error_code is not None and not isinstance(error_code, int):
            self._json(400, {"error": "error_code must be an integer"})
            return
        now = time.time()
        with state.lock:
            message = state.messages.get(spec["sid"])
            if message is not None:
                callback_url, params, public = self._advance(message, status, error_code, spec,
                                                             now)
        if message is None:
            self._json(404, {"error": f"unknown message {spec['sid']}"})
            return
        answer: dict[str, Any] = {"sid": spec["sid"], "status": status, "message": public,
                                  "callback": None}
        if callback_url:
            answer["callback"] = self._post_callback(callback_url, params, config.signing_token)
        self._json(200, answer)

    def _advance(self, message: dict[str, Any], status: str, error_code: int | None,
                 spec: dict[str, Any], now: float
                 ) -> tuple[str | None, dict[str, str], dict[str, Any]]:
        """Move a stored message to `status` (caller holds the lock); the callback to send."""
        message["status"] = status
        message["date_updated"] = rfc2822(now)
        if status in SENT_STATUSES and message["date_sent"] is None:
            message["date_sent"] = rfc2822(now)
        if error_code is not None:
            message["error_code"] = error_code
            message["error_message"] = spec.get("error_message") or TWILIO_MESSAGES.get(
                error_code, "Error")
        callback_url: str | None = message["_status_callback"]
        params = {
            "MessageSid": message["sid"], "MessageStatus": status,
            "SmsSid": message["sid"], "SmsStatus": status,
            "AccountSid": message["account_sid"], "To": message["to"],
            "ApiVersion": API_VERSION,
        }
        if message["from"]:
            params["From"] = message["from"]
        if message["messaging_service_sid"]:
            params["MessagingServiceSid"] = message["messaging_service_sid"]
        if str(message["to"]).lower().startswith(WHATSAPP):
            # WhatsApp's status callbacks name the channel and the user's number.
            params["ChannelPrefix"] = "whatsapp"
            params["ChannelToAddress"] = str(message["to"])[len(WHATSAPP):]
        if error_code is not None:
            params["ErrorCode"] = str(error_code)
        return callback_url, params, self._public(message)

    @staticmethod
    def _post_callback(url: str, params: dict[str, str], token: str) -> dict[str, Any]:
        data = urllib.parse.urlencode(params).encode("utf-8")
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            return {"url": url, "params": params, "status": None,
                    "error": "StatusCallback must be an http(s) URL"}
        return {"url": url, "params": params, **post_webhook(url, data, {
            "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
            "User-Agent": "TwilioProxy/1.1",
            "X-Twilio-Signature": twilio_signature(token, url, params),
            "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
        })}


# --- WhatsApp inbound -----------------------------------------------------------------------------


def _wa(number: str) -> str:
    return number if number.lower().startswith(WHATSAPP) else WHATSAPP + number


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def whatsapp_inbound_params(spec: dict[str, Any], account_sid: str | None) -> dict[str, str]:
    """The form of Twilio's incoming-message webhook for a WhatsApp message: From/To as
    `whatsapp:+E164`, WaId (the user's number, digits), ProfileName, MessageType, media as for
    MMS (MediaUrlN / MediaContentTypeN). `extra` adds or overrides fields (hostile tests)."""
    sender = _wa(str(spec["from"]))
    media = spec.get("media") or []
    if not isinstance(media, list):
        raise BadFault("media must be a list of {url, content_type}")
    sid = str(spec.get("sid") or ("SM" if not media else "MM") + uuid.uuid4().hex)
    params = {
        "MessageSid": sid, "SmsMessageSid": sid, "SmsSid": sid,
        "AccountSid": account_sid or "AC" + "0" * 32, "MessagingServiceSid": "",
        "From": sender, "To": _wa(str(spec["to"])), "Body": str(spec.get("body") or ""),
        "NumMedia": str(len(media)), "NumSegments": "1", "SmsStatus": "received",
        "ApiVersion": API_VERSION, "WaId": re.sub(r"[^0-9]", "", sender),
        "ProfileName": str(spec.get("profile_name") or "WhatsApp User"),
        "MessageType": "image" if media else "text",
    }
    for i, item in enumerate(media):
        params[f"MediaUrl{i}"] = str(item.get("url"))
        params[f"MediaContentType{i}"] = str(item.get("content_type") or "image/jpeg")
    if spec.get("messaging_service_sid"):
        params["MessagingServiceSid"] = str(spec["messaging_service_sid"])
    else:
        del params["MessagingServiceSid"]
    extra = spec.get("extra") or {}
    if not isinstance(extra, dict):
        raise BadFault("extra must be an object of strings")
    params.update({str(k): str(v) for k, v in extra.items()})
    return params


# --- SendGrid Inbound Parse ---------------------------------------------------------------------

def inbound_email_post(spec: dict[str, Any]) -> tuple[str, bytes]:
    """(Content-Type, body) of an Inbound Parse post of the email `spec` describes.

    spec: from, to, subject, text, html, message_id, in_reply_to, references (list),
    attachments ([{filename, content_type, content_b64}]), mode ("parsed" default, or "raw"),
    spf ("pass"), dkim (default: a pass for the From domain), envelope_from.
    """
    from email.message import EmailMessage

    sender = str(spec["from"])
    to = str(spec.get("to") or "care@clinic.example")
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = str(spec.get("subject") or "Hello from the sandbox")
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = str(spec.get("message_id") or f"<{uuid.uuid4().hex}@sandbox.invalid>")
    if spec.get("in_reply_to"):
        msg["In-Reply-To"] = str(spec["in_reply_to"])
    if spec.get("references"):
        msg["References"] = " ".join(str(r) for r in spec["references"])
    text, html = spec.get("text"), spec.get("html")
    if text is not None:
        msg.set_content(str(text))
    if html is not None:
        if text is None:
            msg.set_content(str(html), subtype="html")
        else:
            msg.add_alternative(str(html), subtype="html")
    files = [(str(a["filename"]), str(a.get("content_type") or "application/octet-stream"),
              base64.b64decode(str(a["content_b64"]))) for a in spec.get("attachments") or []]
    for name, ctype, data in files:
        maintype, _, subtype = ctype.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype or "octet-stream",
                           filename=name)
    address = sender.rsplit("<", 1)[-1].rstrip(">").strip()
    domain = address.rsplit("@", 1)[-1]
    fields: list[tuple[str, bytes, str | None, str | None]] = [
        ("dkim", str(spec.get("dkim") or f"{{@{domain} : pass}}").encode(), None, None),
        ("SPF", str(spec.get("spf") or "pass").encode(), None, None),
        ("envelope", json.dumps({"to": [to], "from": spec.get("envelope_from") or address}
                                ).encode(), None, None),
        ("from", sender.encode(), None, None), ("to", to.encode(), None, None),
        ("subject", str(msg["Subject"]).encode(), None, None),
        ("charsets", b'{"to":"UTF-8","from":"UTF-8","subject":"UTF-8","text":"utf-8",'
                     b'"html":"utf-8"}', None, None),
    ]
    if spec.get("mode") == "raw":
        fields.append(("email", msg.as_bytes(), None, None))
    else:
        headers = b"".join(f"{k}: {v}\n".encode() for k, v in msg.items())
        fields += [("headers", headers, None, None),
                   ("attachments", str(len(files)).encode(), None, None)]
        if text is not None:
            fields.append(("text", str(text).encode(), None, None))
        if html is not None:
            fields.append(("html", str(html).encode(), None, None))
        info = {}
        for n, (name, ctype, data) in enumerate(files, start=1):
            fields.append((f"attachment{n}", data, name, ctype))
            info[f"attachment{n}"] = {"filename": name, "name": name, "type": ctype}
        if info:
            fields.append(("attachment-info", json.dumps(info).encode(), None, None))
    boundary = "xYzZY" + uuid.uuid4().hex
    out = bytearray()
    for name, value, filename, ctype in fields:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + value + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", bytes(out)


def inbound_signature(body: bytes, timestamp: str) -> str:
    """SendGrid's signature header value: ECDSA P-256/SHA-256 of timestamp + body, base64 DER."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key: Any = serialization.load_pem_private_key(SANDBOX_INBOUND_PRIVATE_KEY, None)
    return base64.b64encode(key.sign(timestamp.encode() + body,
                                     ec.ECDSA(hashes.SHA256()))).decode()


def post_inbound_email(spec: dict[str, Any]) -> dict[str, Any]:
    """Post the email `spec` describes to spec["url"] as Inbound Parse does; the answer.

    Signed unless spec["sign"] is false; spec["timestamp_offset"] (seconds) dates the signature
    in the past (a stale one); spec["basic_auth"] ("user:password") adds Basic credentials.
    """
    content_type, body = inbound_email_post(spec)
    headers = {"Content-Type": content_type, "User-Agent": "Sendlib/1.0 sandbox"}
    if spec.get("sign", True):
        ts = str(int(time.time()) - int(spec.get("timestamp_offset") or 0))
        headers["X-Twilio-Email-Event-Webhook-Timestamp"] = ts
        headers["X-Twilio-Email-Event-Webhook-Signature"] = inbound_signature(body, ts)
    if spec.get("basic_auth"):
        headers["Authorization"] = "Basic " + base64.b64encode(
            str(spec["basic_auth"]).encode()).decode()
    url = str(spec["url"])
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise BadFault("url must be an http(s) URL")
    return post_webhook(url, body, headers, answer=True)


def post_webhook(url: str, body: bytes, headers: dict[str, str], answer: bool = False
                 ) -> dict[str, Any]:
    """POST a webhook as a provider does: {"status": the HTTP status, or None and "error" when
    nothing answered}; with `answer`, the answer's body too. Never raises."""
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=CALLBACK_TIMEOUT_S) as response:  # noqa: S310
            status, text = response.status, response.read() if answer else b""
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read() if answer else b""
    except (urllib.error.URLError, OSError) as exc:
        return {"status": None, "error": f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"}
    return {"status": status, "body": text.decode(errors="replace")} if answer \
        else {"status": status}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default=env("PROVIDER_SANDBOX_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("PROVIDER_SANDBOX_PORT", "0")))
    parser.add_argument("--twilio-account-sid",
                        default=env("PROVIDER_SANDBOX_TWILIO_ACCOUNT_SID"),
                        help="with --twilio-auth-token: the only accepted Basic auth user")
    parser.add_argument("--twilio-auth-token", default=env("PROVIDER_SANDBOX_TWILIO_AUTH_TOKEN"),
                        help="require Basic auth on Twilio routes and sign status callbacks "
                             f"with it (callbacks are signed with {DEFAULT_SIGNING_TOKEN!r} "
                             "when not given)")
    parser.add_argument("--sendgrid-api-key", default=env("PROVIDER_SANDBOX_SENDGRID_API_KEY"),
                        help="require 'Authorization: Bearer <key>' on SendGrid routes")
    parser.add_argument("--sendgrid-event-url", default=env("PROVIDER_SANDBOX_SENDGRID_EVENT_URL"),
                        help="where signed Event Webhook batches are posted")
    parser.add_argument("--sendgrid-event-key", default=env("PROVIDER_SANDBOX_SENDGRID_EVENT_KEY"),
                        help="ECDSA P-256 private key (base64 PKCS#8 DER) that signs event "
                             "batches (prefer the environment variable: argv is visible)")
    parser.add_argument("--sendgrid-events-auto", action="store_true",
                        help="after every accepted send, post processed then delivered (or "
                             "the event of a matching fault)")
    parser.add_argument("--google-token-lifetime", type=int, default=3600,
                        help="expires_in of the Google access tokens handed out (seconds)")
    parser.add_argument("--verbose", action="store_true",
                        help="log one line per request to stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = Config(args.twilio_account_sid, args.twilio_auth_token, args.sendgrid_api_key,
                    args.verbose, args.sendgrid_event_url, args.sendgrid_event_key,
                    args.sendgrid_events_auto, google_token_lifetime=args.google_token_lifetime)
    # Block SIGINT/SIGTERM in every thread (threads inherit the mask) and wait for them with
    # sigwait in the main thread: no Python signal handler runs, so nothing can deadlock.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    server = SandboxServer((args.host, args.port), config)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="provider-sandbox", daemon=True)
    thread.start()
    host, port = str(server.server_address[0]), int(server.server_address[1])
    print(f"Provider sandbox listening on http://{host}:{port}", flush=True)
    try:
        signal.sigwait(stop_signals)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
