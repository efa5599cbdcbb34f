"""Delivery status rules (pure): provider statuses and events to FHIR Communication.status."""

from __future__ import annotations

from collections.abc import Mapping

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
# SendGrid Event Webhook delivery events. A block arrives as `bounce` with `type: blocked`;
# `blocked` is accepted as an event name too. Other events (engagement, opt-outs) never move
# the Communication: see `sendgrid_event_kind`.
SENDGRID_TO_FHIR = {
    "processed": "in-progress",
    "deferred": "in-progress",
    "delivered": "completed",
    "bounce": "stopped",
    "dropped": "stopped",
    "blocked": "stopped",
}
# The recipient asked not to get more email: later sends are refused locally (as Twilio 21610).
SENDGRID_OPT_OUT = frozenset({"spamreport", "unsubscribe", "group_unsubscribe"})
# Counted as a metric, nothing else.
SENDGRID_ENGAGEMENT = frozenset({"open", "click"})
# Once here, a Communication never moves again: callbacks arrive late and out of order.
TERMINAL = frozenset({"completed", "stopped", "not-done", "entered-in-error"})


def next_status(current: str, provider_status: str,
                table: Mapping[str, str] = TWILIO_TO_FHIR) -> str | None:
    """The Communication.status a provider status leads to, or None to leave it alone
    (unknown provider status, already terminal, or no change)."""
    target = table.get(provider_status.lower())
    if target is None or current in TERMINAL or target == current:
        return None
    return target


def sendgrid_event_kind(event: str) -> str:
    """What a SendGrid event means to us: "status" (moves the Communication), "opt-out",
    "engagement" (counted only) or "other" (ignored: group_resubscribe, account events…)."""
    name = event.lower()
    if name in SENDGRID_TO_FHIR:
        return "status"
    if name in SENDGRID_OPT_OUT:
        return "opt-out"
    if name in SENDGRID_ENGAGEMENT:
        return "engagement"
    return "other"


def sendgrid_status_event(event: str, bounce_type: str = "") -> str:
    """The event name to map: a `bounce` whose `type` is `blocked` is a block."""
    name = event.lower()
    return "blocked" if name == "bounce" and bounce_type.lower() == "blocked" else name


# When the patient read a message (WhatsApp's `read` status): FHIR's Communication has no
# element for it (`received` is delivery), so an extension of ours carries the time, a
# valueDateTime (docs/channels.md, "WhatsApp").
READ_AT_EXTENSION = "urn:switchboard:fhir:communication-read-at"


def records_read(current: str, provider_status: str, already_read: bool) -> bool:
    """Whether this status says the patient read the message and that is not recorded yet
    (pure). Recorded whatever the status is, even a final one (a late `read` after
    `delivered`, or one after a failure Twilio reported first), except on a withdrawn
    message (`entered-in-error`); the status itself moves only as next_status says."""
    return (provider_status.lower() == "read" and not already_read
            and current != "entered-in-error")
