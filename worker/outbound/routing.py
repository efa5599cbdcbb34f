"""Outbound routing rules (pure): which channel, and which of the patient's contacts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from worker.channels import fcm, sendgrid, twilio, twilio_conversations, whatsapp
from worker.channels.phones import DEFAULT_REGION, InvalidPhoneNumber, to_e164

# Each channel module names its v3-ParticipationMode code; the mapping follows from them.
MEDIUM_TO_CHANNEL = {twilio.MEDIUM_CODE: twilio.CHANNEL, sendgrid.MEDIUM_CODE: sendgrid.CHANNEL,
                     fcm.MEDIUM_CODE: fcm.CHANNEL, whatsapp.MEDIUM_CODE: whatsapp.CHANNEL}
CHANNEL_TO_MEDIUM = {v: k for k, v in MEDIUM_TO_CHANNEL.items()}
# Channels that address a patient by phone number (Patient.telecom sms/phone, read as E.164).
PHONE_CHANNELS = frozenset({twilio.CHANNEL, whatsapp.CHANNEL})
_SYSTEMS = {"sms": ("sms", "phone"), "whatsapp": ("sms", "phone"), "email": ("email",)}


def medium_channel(resource: Mapping[str, Any] | None) -> str | None:
    """The channel named by a Communication's `medium` (SMSWRIT → sms), if any."""
    for concept in (resource or {}).get("medium") or []:
        for coding in concept.get("coding") or []:
            channel = MEDIUM_TO_CHANNEL.get(str(coding.get("code", "")))
            if channel:
                return channel
    return None


def _active(telecom: Mapping[str, Any], now: datetime) -> bool:
    end = (telecom.get("period") or {}).get("end")
    if not end:
        return True
    try:
        ended = datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    except ValueError:
        return True  # an unreadable period does not hide a contact
    if ended.tzinfo is None:
        ended = ended.replace(tzinfo=UTC)
    return ended > now


def _current(telecom: Mapping[str, Any], channel: str, now: datetime) -> bool:
    return (telecom.get("system") in _SYSTEMS[channel] and bool(telecom.get("value"))
            and telecom.get("use") != "old" and _active(telecom, now))


def pick_contact(telecoms: Iterable[Mapping[str, Any]], channel: str,
                 now: datetime | None = None, region: str = DEFAULT_REGION) -> str | None:
    """The best address of a patient for `channel`, or None.

    Skips entries whose `period` has ended and `use=old`; for SMS prefers `use=mobile`, then
    the lowest `rank`, then the listed order; phone numbers are read in `region`
    (PHONE_DEFAULT_REGION) when they have no country code and given in E.164, and one that is
    not a valid number is skipped, never guessed at.
    """
    now = now or datetime.now(UTC)
    candidates = []
    for order, t in enumerate(telecoms):
        if not _current(t, channel, now):
            continue
        value = str(t["value"]).strip()
        if channel in PHONE_CHANNELS:
            try:
                value = to_e164(value, region)
            except InvalidPhoneNumber:
                continue
        mobile_first = 0 if (channel not in PHONE_CHANNELS or t.get("use") == "mobile") else 1
        candidates.append((mobile_first, int(t.get("rank") or 1_000_000), order, value))
    return min(candidates)[3] if candidates else None


def choose_channel(forced: str | None, reply_channel: str | None,
                   telecoms: list[Mapping[str, Any]],
                   order: Iterable[str] = ("sms", "email"),
                   push_ready: Callable[[], bool] | None = None,
                   region: str = DEFAULT_REGION) -> str | None:
    """The channel to send on: the forced one; else the thread's (a reply goes back the way the
    patient wrote) when the patient can be reached on it; else the first of `order`
    (CHANNEL_ORDER; the seed's phone then email) that reaches the patient. None when the patient
    cannot be reached at all. Push reaches a patient when `push_ready()` (an active Device) says
    so; it is asked only when push is the channel being considered. Phone numbers are read in
    `region` (see pick_contact)."""
    def reachable(channel: str) -> bool:
        if channel == fcm.CHANNEL:
            return bool(push_ready and push_ready())
        return pick_contact(telecoms, channel, region=region) is not None

    if forced:
        return forced
    if reply_channel and reachable(reply_channel):
        return reply_channel
    for channel in order:
        if reachable(channel):
            return channel
    return None


def has_only_invalid_phones(telecoms: Iterable[Mapping[str, Any]], region: str = DEFAULT_REGION,
                            now: datetime | None = None) -> bool:
    """True when the patient has current phone numbers and none of them is a valid number in
    `region`: the reason a text cannot go out, said as such instead of "no phone"."""
    now = now or datetime.now(UTC)
    current = [t for t in telecoms if _current(t, "sms", now)]
    return bool(current) and pick_contact(current, "sms", now, region) is None


def conversation_sid(header: Mapping[str, Any] | None) -> str | None:
    """The Twilio Conversation a thread header is keyed by (`https://twilio.com|CH…`), if any:
    a reply in that thread is posted into the Conversation."""
    for ident in (header or {}).get("identifier") or []:
        value = str(ident.get("value") or "") if isinstance(ident, Mapping) else ""
        if (ident.get("system") == twilio_conversations.CONVERSATION_SYSTEM
                and twilio_conversations.is_conversation_sid(value)):
            return value
    return None
