"""SendGrid email: sending through the v3 mail/send API with the official SDK, error mapping,
and the Event Webhook (signature check and the shape of an event batch)."""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

from worker.channels import SendError
from worker.channels.sendgrid_signing import (
    MAX_AGE_SECONDS,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    load_verification_key,
    verify_signed_request,
)
from worker.ids import REQUEST_ID, valid_id
from worker.messages import OutboundMessage, SendResult

CHANNEL = "email"
MEDIUM_CODE = "EMAILWRIT"
# Identifier system of the RFC 5322 Message-ID we generate for every outbound email, recorded
# on its Communication. A patient's reply names it in In-Reply-To / References, which is how an
# inbound email finds the thread it answers. (Unchanged from the first email sends, so the
# Message-IDs already written stay findable.)
EMAIL_MESSAGE_ID_SYSTEM = "urn:ietf:rfc:5322"
# Identifier system of the Message-ID of an email a patient sent us (inbound), on its
# Communication. A system of its own: a sender cannot pass off an inbound email as one of ours
# (or an inbound idempotency key collide with an outbound id) by reusing a Message-ID. A reply
# by email answers the patient's last email by this id.
EMAIL_INBOUND_MESSAGE_ID_SYSTEM = "urn:switchboard:email-message-id:inbound"
# Identifier system of an inbound email's idempotency key (sendgrid_inbound.message_key: the
# sender and the Message-ID), the one its conditional create is keyed on. Not the Message-ID
# alone: mailers reuse Message-IDs and anyone can copy one, and a second sender's email with
# the same Message-ID must be written, not skipped as a repeat.
EMAIL_INBOUND_KEY_SYSTEM = "urn:switchboard:email-inbound-key"

# What a subject says when nothing is left of the topic.
DEFAULT_SUBJECT = "Message from your care team"
# Longer subjects are cut (RFC 5322 lines stop at 998 characters; mail clients show far less).
MAX_SUBJECT_CHARS = 250
# Control characters (C0, DEL, C1) and Unicode line/paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def clean_subject(text: str) -> str:
    """`text` as a one-line subject (pure): every control character (CR, LF, tab, NUL, …) and
    line separator becomes a space, runs of white space one space, the ends trimmed, at most
    MAX_SUBJECT_CHARS. A topic holding a line break (a decoded `=?utf-8?q?Hi=0D=0ABcc:…?=`
    subject, a topic typed in the EHR) would otherwise go out as more header lines."""
    return " ".join(_CONTROL.sub(" ", text).split())[:MAX_SUBJECT_CHARS].strip()

# Event Webhook (docs/design.md, "Broker and provider facts"): ECDSA P-256 / SHA-256 over the
# timestamp followed by the raw body, base64 DER signature.
EVENT_SIGNATURE_HEADER = SIGNATURE_HEADER
EVENT_TIMESTAMP_HEADER = TIMESTAMP_HEADER
EVENT_MAX_AGE_SECONDS = MAX_AGE_SECONDS
# SendGrid batches events (a batch rarely passes a few hundred KB); more than this many in one
# request is not SendGrid.
EVENT_MAX_BATCH = 5000
EVENT_MAX_BYTES = 4 * 1024 * 1024
# Our custom args (set on every send, returned as top-level keys of every event). Never PHI:
# SendGrid stores them as non-personal data.
ARG_COMMUNICATION = "communication_id"
ARG_REQUEST = "request_id"


def classify_error(status: int | None, body: Any = None, headers: Mapping[str, str] | None = None
                   ) -> SendError:
    """The SendError for a SendGrid failure (pure).

    429 and 5xx retry (SendGrid says when in X-RateLimit-Reset, an epoch; Retry-After if sent);
    400 on the recipient's address is an invalid recipient; other 400/403/413 are refusals.
    """
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    if status is None or status >= 500:
        return SendError("provider-unavailable", f"SendGrid HTTP {status}" if status else
                         "SendGrid unreachable")
    if status == 429:
        retry = headers.get("retry-after")
        return SendError("throttled", "SendGrid HTTP 429", None,
                         float(retry) if retry and re.fullmatch(r"[0-9]{1,6}", retry) else None)
    if status == 401:
        return SendError("misconfigured", "SendGrid rejected the API key")
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    if status == 400 and "personalizations.0.to" in text:
        return SendError("invalid-recipient", "SendGrid HTTP 400 on the recipient address")
    return SendError("rejected", f"SendGrid HTTP {status}")


class SendGridEmail:
    """Sends email with SendGrid; sets a Message-ID we choose (so replies thread back) and
    custom args carrying the Communication id (so events map back)."""

    name = CHANNEL
    medium_code = MEDIUM_CODE

    def __init__(self, api_key: str, from_email: str, api_base_url: str, timeout: float = 10.0
                 ) -> None:
        if not (api_key and from_email):
            raise ValueError("SENDGRID_API_KEY and SENDGRID_FROM_EMAIL are required")
        import sendgrid

        self._from = from_email
        self._domain = from_email.rsplit("@", 1)[-1]
        self._client = sendgrid.SendGridAPIClient(api_key=api_key, host=api_base_url)
        self._client.client.timeout = timeout

    def sender_key(self) -> str:
        """Rate limits are per sending address."""
        return self._from

    def send(self, message: OutboundMessage) -> SendResult:
        """Send one email; raises SendError."""
        from urllib.error import URLError

        from python_http_client.exceptions import HTTPError
        from sendgrid.helpers.mail import Header, Mail

        message_id = message.message_id or (
            f"<{message.communication_id}.{uuid.uuid4().hex[:12]}@{self._domain}>")
        # Every subject is cleaned here, whoever built it: this is where it becomes a header.
        mail = Mail(from_email=self._from, to_emails=message.to,
                    subject=clean_subject(message.subject) or DEFAULT_SUBJECT,
                    plain_text_content=email_text(message))
        mail.add_header(Header("Message-ID", message_id))
        if message.in_reply_to:
            # The patient's mail client joins our reply to their email by these two headers.
            mail.add_header(Header("In-Reply-To", message.in_reply_to))
            mail.add_header(Header("References", message.in_reply_to))
        # Returned on every Event Webhook event, so delivery events find their Communication
        # (and the API request) without a search.
        args = [_custom_arg(ARG_COMMUNICATION, message.communication_id)]
        if message.request_id:
            args.append(_custom_arg(ARG_REQUEST, message.request_id))
        mail.custom_arg = args
        try:
            resp = self._client.send(mail)
        except HTTPError as exc:
            raise classify_error(exc.status_code, exc.body, dict(exc.headers or {})) from None
        except URLError as exc:
            # urllib wraps connect and send failures; only a refused or unresolvable connection
            # proves that nothing reached SendGrid.
            if isinstance(exc.reason, ConnectionRefusedError | socket.gaierror):
                raise SendError("provider-unavailable", type(exc.reason).__name__) from None
            raise SendError("outcome-unknown", type(exc.reason).__name__) from None
        except OSError as exc:
            # No answer in time, or the connection dropped after the request was sent:
            # SendGrid may have accepted it, so retrying could email twice (see twilio.py).
            raise SendError("outcome-unknown", type(exc).__name__) from None
        # Any 2xx means accepted. Without X-Message-Id (it happens), our own Message-ID
        # identifies the email; retrying would send it twice.
        provider_id = str(resp.headers.get("X-Message-Id") or message_id)
        return SendResult(provider_id=provider_id, status="accepted", message_id=message_id)


def email_text(message: OutboundMessage) -> str:
    """The plain-text body: the message, then a link to each attachment (SendGrid takes files,
    not links; the clinic's attachment stays where the EHR keeps it, behind its own access).
    An email with an attachment and no text used to go out blank."""
    links = [f"Attachment ({a.content_type or 'file'}): {a.url}" for a in message.attachments]
    text = "\n\n".join(part for part in (message.body, "\n".join(links)) if part)
    return text or " "  # SendGrid refuses an empty content value


def _custom_arg(key: str, value: str) -> Any:
    from sendgrid.helpers.mail import CustomArg

    return CustomArg(key, value)


def provider_message_id(sg_message_id: str) -> str:
    """The X-Message-Id of the send an event is about: `sg_message_id` is that id followed by
    a `.filter…` / `.recvd-…` suffix SendGrid adds per recipient."""
    return sg_message_id.split(".", 1)[0]


class EventSignature:
    """Verifies a SendGrid Event Webhook request with the verification key (fail closed).

    The ECDSA check itself is the one every SendGrid webhook uses
    (worker.channels.sendgrid_signing.verify_signed_request, over the raw bytes; it agrees with
    the SDK's EventWebhook helper on every UTF-8 body, and unlike it also takes binary ones)."""

    def __init__(self, public_key: str) -> None:
        # The base64 key SendGrid shows, without PEM armour.
        self._key = load_verification_key(public_key) if public_key else None

    @property
    def configured(self) -> bool:
        """False when no key is set: every request is refused."""
        return self._key is not None

    def check(self, body: bytes, signature: str | None, timestamp: str | None,
              now: float | None = None) -> str | None:
        """None when the request is genuine and fresh, else the reason to refuse it."""
        if self._key is None:
            return "not-configured"
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return "bad-signature"  # an event batch is UTF-8 JSON: anything else is not one
        reason = verify_signed_request(self._key, body, signature, timestamp,
                                       time.time() if now is None else now,
                                       EVENT_MAX_AGE_SECONDS)
        return "bad-signature" if reason == "unsigned" else reason


# Fields of an event we keep (everything else SendGrid sends is dropped at the boundary), with
# their largest accepted length. `email` is the recipient: needed to record an opt-out.
_EVENT_TEXT_FIELDS = {"event": 64, "sg_event_id": 200, "sg_message_id": 300, "email": 320,
                      "reason": 2000, "type": 64, "status": 64,
                      ARG_COMMUNICATION: 64, ARG_REQUEST: 64}
_EVENT_NAME = re.compile(r"[a-z_]{1,64}")
_EVENT_ID = re.compile(r"[A-Za-z0-9_\-=+/.:]{1,200}")


class EventBatchError(ValueError):
    """An event batch we refuse; `fields` names each problem (`3.sg_event_id`)."""

    def __init__(self, reason: str, fields: list[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fields = fields or []


def parse_event_batch(body: bytes) -> list[dict[str, Any]]:
    """The events of a verified Event Webhook body, each reduced to the fields we use, or
    EventBatchError. Every field we act on is shape-checked here, before anything is queued."""
    if len(body) > EVENT_MAX_BYTES:
        raise EventBatchError("too-large")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise EventBatchError("invalid-json") from None
    if not isinstance(data, list) or not data:
        raise EventBatchError("not-an-event-array")
    if len(data) > EVENT_MAX_BATCH:
        raise EventBatchError("too-many-events")
    out: list[dict[str, Any]] = []
    problems: list[str] = []
    for n, raw in enumerate(data):
        if not isinstance(raw, dict):
            problems.append(f"{n}")
            continue
        event: dict[str, Any] = {}
        for name, limit in _EVENT_TEXT_FIELDS.items():
            value = raw.get(name)
            if value is None:
                continue
            if name == "reason" and isinstance(value, str):
                value = value[:limit]  # an SMTP answer: long ones are cut, not refused
            if not isinstance(value, str) or len(value) > limit:
                problems.append(f"{n}.{name}")
                continue
            event[name] = value
        stamp = raw.get("timestamp")
        if isinstance(stamp, int) and not isinstance(stamp, bool) and 0 <= stamp < 10**11:
            event["timestamp"] = stamp
        elif stamp is not None:
            problems.append(f"{n}.timestamp")
        if not _EVENT_NAME.fullmatch(event.get("event", "")):
            problems.append(f"{n}.event")
        if not _EVENT_ID.fullmatch(event.get("sg_event_id", "")):
            problems.append(f"{n}.sg_event_id")
        if "sg_message_id" in event and not _EVENT_ID.fullmatch(event["sg_message_id"]):
            problems.append(f"{n}.sg_message_id")
        if ARG_COMMUNICATION in event and not valid_id(event[ARG_COMMUNICATION]):
            problems.append(f"{n}.{ARG_COMMUNICATION}")
        if ARG_REQUEST in event and not REQUEST_ID.fullmatch(event[ARG_REQUEST]):
            problems.append(f"{n}.{ARG_REQUEST}")
        out.append(event)
    if problems:
        raise EventBatchError("invalid-fields", sorted(set(problems), key=problems.index)[:20])
    return out
