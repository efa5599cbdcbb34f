"""WhatsApp through Twilio's Messages API: the SMS channel's client with `whatsapp:` addresses,
WhatsApp's error codes, and the approved-template send for a closed 24-hour window.

Inbound WhatsApp arrives on the SMS webhook and is parsed there (worker/channels/twilio.py reads
`From=whatsapp:+E164` as this channel); what a closed window means for a reply is
worker/outbound/whatsapp.py's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from worker.channels.phones import WHATSAPP
from worker.channels.twilio import ERROR_KINDS, WHATSAPP_CHANNEL, WHATSAPP_MEDIUM_CODE, TwilioSms
from worker.messages import SendResult

CHANNEL = WHATSAPP_CHANNEL
MEDIUM_CODE = WHATSAPP_MEDIUM_CODE
# Free-form messages reach a WhatsApp user only within 24 hours of their last message to us.
WINDOW_SECONDS = 24 * 3600
# Twilio's WhatsApp error codes (https://www.twilio.com/docs/api/errors), besides SMS's.
WHATSAPP_ERROR_KINDS: dict[int, str] = {
    **ERROR_KINDS,
    # Outside the 24-hour window (a free-form message, or a template sent in Body).
    63016: "outside-whatsapp-window",
    63003: "invalid-recipient",  # the channel could not find the To address
    63024: "invalid-recipient",  # invalid message recipient
    63018: "throttled",  # rate limit exceeded for the WhatsApp sender
    63005: "misconfigured",  # the channel did not accept our credentials / sender
    63007: "misconfigured",  # Twilio could not find a channel with the From address
    63049: "rejected",  # Meta chose not to deliver this message
}
OUTSIDE_WINDOW_CODE = 63016


class TwilioWhatsApp(TwilioSms):
    """Sends WhatsApp messages through the SMS channel's Twilio client (same SDK, pacing and
    error mapping, per-thread clients), to `whatsapp:+E164`, from TWILIO_WHATSAPP_FROM or the
    Messaging Service."""

    name = CHANNEL
    medium_code = MEDIUM_CODE
    error_kinds: Mapping[int, str] = WHATSAPP_ERROR_KINDS

    def _address(self, to: str) -> str:
        return to if to.lower().startswith(WHATSAPP) else WHATSAPP + to

    def send_template(self, to: str, content_sid: str, variables: str) -> SendResult:
        """Send the approved template `content_sid` with `variables` (a JSON object that is the
        same for every patient): ContentSid and no Body, as Twilio requires since April 2025
        for a business-initiated WhatsApp message. Raises SendError."""
        content: dict[str, Any] = {"content_sid": content_sid}
        if json.loads(variables or "{}"):
            content["content_variables"] = variables
        return self._create(to, content)
