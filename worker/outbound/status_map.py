"""Delivery status rules (pure): provider statuses to FHIR Communication.status."""

from __future__ import annotations

# Twilio message statuses (https://www.twilio.com/docs/messaging/api/message-resource).
TWILIO_TO_FHIR = {
    "accepted": "in-progress",
    "scheduled": "in-progress",
    "queued": "in-progress",
    "sending": "in-progress",
    "sent": "in-progress",
    "receiving": "in-progress",
    "received": "in-progress",
    "delivered": "completed",
    "read": "completed",
    "failed": "stopped",
    "undelivered": "stopped",
    "canceled": "stopped",
}
# Once here, a Communication never moves again: callbacks arrive late and out of order.
TERMINAL = frozenset({"completed", "stopped", "not-done", "entered-in-error"})


def next_status(current: str, provider_status: str) -> str | None:
    """The Communication.status a provider status leads to, or None to leave it alone
    (unknown provider status, already terminal, or no change)."""
    target = TWILIO_TO_FHIR.get(provider_status.lower())
    if target is None or current in TERMINAL or target == current:
        return None
    return target
