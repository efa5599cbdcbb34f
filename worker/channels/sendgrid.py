"""SendGrid email: sending through the v3 mail/send API with the official SDK, error mapping."""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Mapping
from typing import Any

from worker.channels import OutboundMessage, SendError, SendResult

CHANNEL = "email"
MEDIUM_CODE = "EMAILWRIT"


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
        mail = Mail(from_email=self._from, to_emails=message.to, subject=message.subject,
                    plain_text_content=email_text(message))
        mail.add_header(Header("Message-ID", message_id))
        if message.in_reply_to:
            mail.add_header(Header("In-Reply-To", message.in_reply_to))
            mail.add_header(Header("References", message.in_reply_to))
        mail.custom_arg = [_custom_arg("communication_id", message.communication_id)]
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
