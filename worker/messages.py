"""The channel-neutral message types: what the inbound and outbound flows, the channels and the
FHIR resource builders pass between them (a patient's message in, a clinician's message out).
They sit beside the flows so that no layer imports another's internals to name a message."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


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


# The most a text we write may take inside a resource, as JSON (UTF-8, escapes counted).
# Medplum refuses a JSON body over 1 MiB ("File too large") and a string over 1 MB, with a 400
# that would dead-letter the whole message; a quarter of that leaves room for the rest of the
# resource (and of a transaction Bundle with its thread header). A longer text is cut, and the
# channel keeps the full text as an attachment (an email's original-message.txt).
MAX_TEXT_BYTES = 256 * 1024


def fit_text(text: str, max_bytes: int = MAX_TEXT_BYTES) -> tuple[str, bool]:
    """`text` cut to its longest prefix that takes at most `max_bytes` as a JSON string, and
    whether it was cut (pure)."""
    if _json_size(text) <= max_bytes:
        return text, False
    low, high = 0, min(len(text), max_bytes)  # every character takes at least one byte
    while low < high:  # the longest prefix that fits (size grows with the prefix)
        middle = (low + high + 1) // 2
        if _json_size(text[:middle]) <= max_bytes:
            low = middle
        else:
            high = middle - 1
    return text[:low], True


def _json_size(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")) - 2
