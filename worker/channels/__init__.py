"""Channels: one module per provider behind a small contract (docs/design.md, habit 1).

A channel module turns a provider's inbound payload into an `InboundMessage` and (outbound issue)
sends and maps delivery statuses. Nothing outside the module knows a provider's field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Attachment:
    """A media item of a message (MMS picture, email attachment) by URL."""

    url: str
    content_type: str
    title: str = ""  # file name, when the provider gives one
    size: int | None = None  # bytes


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
    # Email: the Message-IDs this message answers, newest first (In-Reply-To, References).
    replies_to: tuple[str, ...] = ()
    # Email: the subject without Re:/Fwd:, the topic of a thread this message opens.
    topic: str = ""
    # Things the clinic must know that are not the message itself (attachments left out).
    notes: tuple[str, ...] = ()
    # More identifiers (system, value) the message is written with, besides its idempotency
    # key: an email's own Message-ID, which a reply by email answers.
    identifiers: tuple[tuple[str, str], ...] = ()

    def conversation_key(self) -> str:
        """External conversation id: the provider's, else the pair (patient, clinic address)."""
        if self.provider_conversation_id:
            return self.provider_conversation_id
        return f"{self.channel}:{self.sender}:{self.clinic_address}"


# -- outbound contract ---------------------------------------------------------------------------

# The closed vocabulary of send failures. The channel module maps provider answers onto it; one
# place (worker.outbound.pipeline) acts on it. `retryable` kinds are retried with backoff.
SEND_ERROR_KINDS: dict[str, bool] = {
    "throttled": True,  # 429 / Twilio 20429: slow down, try again
    "provider-unavailable": True,  # 5xx, timeouts, connection errors, Twilio 30001
    "invalid-recipient": False,  # Twilio 21211, 21408(region), SendGrid 400 on the address
    "unreachable": False,  # the number cannot receive texts: 21612, 21614, 21635, 30003-30006
    "opted-out": False,  # Twilio 21610: the patient replied STOP
    "rejected": False,  # any other permanent refusal (SendGrid 400/403/413, 30007 filtered)
    "misconfigured": False,  # no credentials / sender configured for this channel
    # The request may or may not have reached the provider (a read timeout, a worker killed
    # mid-call): sending again could text the patient twice, so a person decides.
    "outcome-unknown": False,
}


class SendError(Exception):
    """A send that did not go out; `kind` is from SEND_ERROR_KINDS."""

    def __init__(self, kind: str, detail: str = "", provider_code: int | None = None,
                 retry_after: float | None = None) -> None:
        assert kind in SEND_ERROR_KINDS, kind
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail
        self.provider_code = provider_code
        self.retry_after = retry_after
        self.attempts: tuple[str, ...] = ()  # earlier failed attempts (channel fallback)
        self.channel: str | None = None  # the channel that failed (set by the pipeline)

    @property
    def retryable(self) -> bool:
        """Whether trying again later can succeed."""
        return SEND_ERROR_KINDS[self.kind]


@dataclass(frozen=True)
class OutboundMessage:
    """One message to send, in channel-neutral terms."""

    communication_id: str
    to: str  # E.164 phone or email address
    body: str
    attachments: tuple[Attachment, ...] = ()
    subject: str = ""
    # Threading for email replies: our Message-ID and the one we reply to.
    message_id: str = ""
    in_reply_to: str = ""
    # The API request that asked for this send (carried back by delivery events).
    request_id: str = ""


@dataclass(frozen=True)
class SendResult:
    """What the provider said when it accepted a message."""

    provider_id: str  # Twilio MessageSid, SendGrid X-Message-Id
    status: str  # provider's initial status (queued, accepted, …)
    message_id: str = ""  # our email Message-ID, when the channel sets one


class Channel(Protocol):
    """A provider channel: sends one message (inbound parsing lives beside it)."""

    name: str  # "sms", "email"
    medium_code: str  # v3-ParticipationMode

    def sender_key(self) -> str:
        """The sending address that rate limits are shared on (from number, from email)."""
        ...

    def send(self, message: OutboundMessage) -> SendResult:
        """Send, or raise SendError."""
        ...
