"""Channels: one module per provider behind a small contract (docs/design.md, habit 1).

A channel module turns a provider's inbound payload into an `InboundMessage`, sends an
`OutboundMessage` and maps delivery statuses (the message types, which the flows and the FHIR
builders share, are in worker/messages.py). Nothing outside the module knows a provider's field
names.
"""

from __future__ import annotations

from typing import Protocol

from worker.messages import OutboundMessage, SendResult

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
    # WhatsApp: free-form text only within 24 hours of the patient's last message (Twilio
    # 63016), and no approved template is configured to ask them to write (docs/channels.md).
    "outside-whatsapp-window": False,
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
