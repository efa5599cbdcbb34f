"""Twilio SMS/MMS: webhook signature check and inbound payload parsing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twilio.request_validator import RequestValidator

from worker.channels import Attachment, InboundMessage
from worker.errors import PermanentError
from worker.phones import InvalidPhoneNumber, to_e164

CHANNEL = "sms"
MEDIUM_CODE = "SMSWRIT"
REQUIRED_FIELDS = ("MessageSid", "From", "To")
# Twilio sends at most 10 media items per MMS (MediaUrl0..MediaUrl9).
MAX_MEDIA = 10


class TwilioSignature:
    """Verifies `X-Twilio-Signature` over the public URL and every posted parameter."""

    def __init__(self, auth_token: str) -> None:
        self._validator = RequestValidator(auth_token)

    def is_valid(self, url: str, params: Any, signature: str | None) -> bool:
        """True when `signature` is Twilio's HMAC of `url` + sorted params under our token.

        `params` may be a MultiDict: the SDK signs every value of a repeated key.
        """
        if not signature:
            return False
        return bool(self._validator.validate(url, params, signature))


def missing_fields(params: Mapping[str, str]) -> list[str]:
    """The required webhook fields that are absent or blank."""
    return [name for name in REQUIRED_FIELDS if not (params.get(name) or "").strip()]


def parse_inbound(params: Mapping[str, str], received_at: str) -> InboundMessage:
    """Turn a Twilio incoming-message webhook into an InboundMessage.

    Raises PermanentError("invalid-payload") for a payload no retry can fix.
    """
    gone = missing_fields(params)
    if gone:
        raise PermanentError("invalid-payload", "missing " + ", ".join(gone))
    try:
        sender = to_e164(params["From"])
    except InvalidPhoneNumber as exc:
        raise PermanentError("invalid-sender", "From is not a phone number") from exc
    try:
        clinic = to_e164(params["To"])
    except InvalidPhoneNumber:
        clinic = params["To"].strip()  # short codes and alphanumeric ids are kept as they are
    try:
        num_media = min(int(params.get("NumMedia") or 0), MAX_MEDIA)
    except ValueError:
        num_media = 0
    attachments = tuple(
        Attachment(
            url=params[f"MediaUrl{i}"],
            content_type=params.get(f"MediaContentType{i}") or "application/octet-stream",
        )
        for i in range(num_media)
        if params.get(f"MediaUrl{i}")
    )
    return InboundMessage(
        channel=CHANNEL,
        medium_code=MEDIUM_CODE,
        provider_message_id=params["MessageSid"].strip(),
        sender=sender,
        clinic_address=clinic,
        body=params.get("Body") or "",
        received_at=received_at,
        attachments=attachments,
        provider_conversation_id=(params.get("ConversationSid") or "").strip() or None,
    )
