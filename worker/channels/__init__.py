"""Channels: one module per provider behind a small contract (STYLE.md habit 1).

A channel module turns a provider's inbound payload into an `InboundMessage` and (outbound issue)
sends and maps delivery statuses. Nothing outside the module knows a provider's field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Attachment:
    """A media item of a message (MMS picture, email attachment) by URL."""

    url: str
    content_type: str


@dataclass(frozen=True)
class InboundMessage:
    """One message a patient sent us, in channel-neutral terms."""

    channel: str  # "sms", "email"
    medium_code: str  # v3-ParticipationMode: SMSWRIT, EMAILWRIT
    provider_message_id: str  # idempotency key (Twilio MessageSid)
    sender: str  # the patient's address: E.164 phone or email
    clinic_address: str  # our number / mailbox the patient wrote to
    body: str
    received_at: str  # FHIR dateTime, when the receiver accepted the webhook
    attachments: tuple[Attachment, ...] = field(default_factory=tuple)
    # The provider's own conversation id (Twilio ConversationSid), when it has one.
    provider_conversation_id: str | None = None

    def conversation_key(self) -> str:
        """External conversation id: the provider's, else the pair (patient, clinic address)."""
        if self.provider_conversation_id:
            return self.provider_conversation_id
        return f"{self.channel}:{self.sender}:{self.clinic_address}"
