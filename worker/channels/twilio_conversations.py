"""Twilio Conversations: post-event webhooks (onMessageAdded, onDeliveryUpdated), inbound
parsing, and replies posted into a Conversation with the official SDK.

A Conversation is the thread (the seed's strategy 1): its header carries the identifier
`https://twilio.com|<ConversationSid>`, and every message of the patient joins it through a
conditional `partOf`. Which patient wrote comes from the author's address (`+E164` for an SMS
participant, `whatsapp:+E164` for a WhatsApp one), read from the participant's
MessagingBinding when the webhook's `Author` is not an address.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from worker.broker.backoff import retry_after_seconds
from worker.channels import SendError
from worker.channels.phones import DEFAULT_REGION, InvalidPhoneNumber, to_e164
from worker.channels.twilio import MEDIUM_CODE as SMS_MEDIUM_CODE
from worker.channels.twilio import classify_error, thread_client
from worker.errors import PermanentError
from worker.httpclient import never_sent
from worker.messages import Attachment, InboundMessage, OutboundMessage, SendResult

CHANNEL = "conversations"
# The header identifier of a Conversation, exactly as the seed writes it.
CONVERSATION_SYSTEM = "https://twilio.com"
# Conversation Message SIDs (IM…) on the Communications: ours after a send, the patient's
# inbound ones (their idempotency key). Fixed, like the header's system: changing it would
# orphan the keys already written.
MESSAGE_SYSTEM = "https://www.twilio.com/docs/conversations/api/conversation-message-resource"
WHATSAPP_MEDIUM_CODE = "whatsapp"  # worker.fhir.resources.WHATSAPP_MEDIUM_CODE (no import:
# channels do not know the FHIR builders; tests/unit keep the two equal)
MCS_API = "https://mcs.us1.twilio.com/v1"  # Media Content Service: Conversations media
WEBHOOK_PATH = "/webhooks/twilio/conversations"
EVENT_MESSAGE_ADDED = "onMessageAdded"
EVENT_DELIVERY_UPDATED = "onDeliveryUpdated"
EVENTS = (EVENT_MESSAGE_ADDED, EVENT_DELIVERY_UPDATED)
REQUIRED = {EVENT_MESSAGE_ADDED: ("EventType", "AccountSid", "ConversationSid", "MessageSid"),
            EVENT_DELIVERY_UPDATED: ("EventType", "AccountSid", "ConversationSid", "MessageSid",
                                     "Status")}
# Conversations delivery receipt statuses (Delivery Receipt resource); each is also a Twilio
# message status, so worker/outbound/status_map.py's TWILIO_TO_FHIR maps them.
DELIVERY_STATUSES = frozenset({"sent", "delivered", "read", "failed", "undelivered"})
MAX_MEDIA = 10
# Whether our own replies fire the Conversation's webhooks (X-Twilio-Webhook-Enabled): yes, so
# other consumers of the Conversation's events (a Studio flow, Flex, an audit log) see the
# clinic's replies like every other message; their onMessageAdded comes back to us authored by
# TWILIO_CONVERSATIONS_IDENTITY and is dropped (`is_own`), so it never lands in FHIR twice.
WEBHOOK_ENABLED = "true"

_SID = {prefix: re.compile(rf"{prefix}[0-9a-f]{{32}}") for prefix in
        ("CH", "IM", "MB", "IS", "MG", "ME", "WH", "DY")}
_ADDRESS = re.compile(r"(whatsapp:)?\+[1-9][0-9]{5,14}")
# Conversations identities: up to 256 characters, no control characters.
_IDENTITY = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
_ISO_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{8,15}(Z|[+\-][0-9]{2}:?[0-9]{2})?")
_CONTENT_TYPE = re.compile(r"[\w.+\-]{1,64}/[\w.+\-]{1,128}")
_PARAM_NAME = re.compile(r"[A-Z][A-Za-z0-9]{0,63}")


def _sid(prefix: str) -> Callable[[str], bool]:
    return lambda v: _SID[prefix].fullmatch(v) is not None


def _digits(most: int) -> Callable[[str], bool]:
    return lambda v: re.fullmatch(rf"[0-9]{{1,{most}}}", v) is not None


def _word(most: int) -> Callable[[str], bool]:
    return lambda v: re.fullmatch(rf"[A-Za-z_]{{1,{most}}}", v) is not None


def _free(value: str) -> bool:
    return True  # what a person wrote: any content, cleaned where it is written


def _json_text(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return len(value) <= 16 * 1024


def _author(value: str) -> bool:
    return _ADDRESS.fullmatch(value) is not None or _IDENTITY.fullmatch(value) is not None


def media_items(value: str) -> list[dict[str, Any]] | None:
    """The webhook's `Media` (a JSON array of {Sid, Filename, ContentType, Size}; Event Streams
    names the SID `MediaSid`) with every item's shape checked, or None when it is malformed."""
    try:
        items = json.loads(value)
    except ValueError:
        return None
    if not isinstance(items, list) or len(items) > MAX_MEDIA:
        return None
    for item in items:
        if not isinstance(item, dict):
            return None
        sid = item.get("Sid", item.get("MediaSid"))
        size = item.get("Size")
        name = item.get("Filename")
        if not (isinstance(sid, str) and _SID["ME"].fullmatch(sid)
                and isinstance(item.get("ContentType"), str)
                and _CONTENT_TYPE.fullmatch(item["ContentType"])
                and (size is None or (isinstance(size, int) and not isinstance(size, bool)
                                      and 0 <= size < 2**40))
                and (name is None or (isinstance(name, str) and len(name) <= 255))):
            return None
    return items


# The documented post-event parameters (Conversations Webhooks: onMessageAdded,
# onDeliveryUpdated). Twilio signs names and values run together with no separator, so every
# field's shape is checked (see worker/channels/twilio.py, field_problems).
FIELDS: dict[str, Callable[[str], bool]] = {
    "EventType": lambda v: v in EVENTS,
    "AccountSid": lambda v: re.fullmatch(r"AC[0-9A-Za-z]{1,32}", v) is not None,
    "ConversationSid": _sid("CH"),
    "MessageSid": _sid("IM"),
    "ParticipantSid": _sid("MB"),
    "ChatServiceSid": _sid("IS"),
    "MessagingServiceSid": _sid("MG"),
    "WebhookSid": _sid("WH"),
    "DeliveryReceiptSid": _sid("DY"),
    "ChannelMessageSid": lambda v: re.fullmatch(r"[A-Z]{2}[0-9a-f]{32}", v) is not None,
    "Index": _digits(9),
    "RetryCount": _digits(3),
    "Author": _author,
    "ClientIdentity": lambda v: _IDENTITY.fullmatch(v) is not None,
    "Body": _free,
    "Subject": _free,
    "Attributes": _json_text,
    "Media": lambda v: media_items(v) is not None,
    "Source": _word(16),
    "WebhookType": _word(16),
    "DateCreated": lambda v: _ISO_TIME.fullmatch(v) is not None,
    "DateUpdated": lambda v: _ISO_TIME.fullmatch(v) is not None,
    "Status": lambda v: v.lower() in DELIVERY_STATUSES,
    "ErrorCode": _digits(6),
}


def field_problems(params: Iterable[tuple[str, str]], account_sid: str) -> list[str]:
    """What is wrong with a signed Conversations webhook (empty: nothing); names, never values.

    The rules of the SMS webhook (worker/channels/twilio.py): no repeated name, no unknown name
    that extends a known one or follows free text (where a value's tail could have been cut
    off into a new name), every known field in its shape, the event's required fields present
    and the account ours. Other unknown names pass: Twilio adds parameters without notice."""
    seen: dict[str, str] = {}
    problems: list[str] = []
    for name, value in params:
        if name in seen:
            problems.append(f"{name} (repeated)")
        seen.setdefault(name, value)
    previous = ""
    for name in sorted(seen):  # the order Twilio signs in
        shape = FIELDS.get(name)
        if shape is not None:
            if not shape(seen[name]):
                problems.append(name)
        elif not _PARAM_NAME.fullmatch(name) or any(name.startswith(k) for k in FIELDS):
            problems.append(f"{name} (unknown parameter)")
        elif FIELDS.get(previous) in (_free, FIELDS["Attributes"], FIELDS["Author"]):
            problems.append(f"{name} (unknown parameter after {previous})")
        previous = name
    event = seen.get("EventType", "")
    for required in REQUIRED.get(event, ("EventType", "AccountSid")):
        if not seen.get(required) and required not in problems:
            problems.append(required)
    if seen.get("AccountSid", account_sid) != account_sid and "AccountSid" not in problems:
        problems.append("AccountSid")
    return sorted(set(problems), key=problems.index)


def inbox_key(params: Mapping[str, str]) -> str:
    """What makes one webhook a retry of another (the receiver's inbox key)."""
    parts = [params.get("EventType", ""), params.get("MessageSid", "")]
    if params.get("EventType") == EVENT_DELIVERY_UPDATED:
        parts += [params.get("DeliveryReceiptSid") or params.get("ParticipantSid", ""),
                  params.get("Status", "")]
    return ":".join(["conversations", *parts])


# -- inbound ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Binding:
    """How a participant takes part: the patient's address and our number it writes to."""

    address: str  # `+E164` (SMS) or `whatsapp:+E164`
    proxy_address: str = ""


def is_conversation_sid(value: str) -> bool:
    """Whether `value` is a Conversation SID (CH + 32 hex digits)."""
    return _SID["CH"].fullmatch(value) is not None


def is_address(author: str) -> bool:
    """Whether `Author` is an SMS or WhatsApp address rather than a chat identity."""
    return _ADDRESS.fullmatch(author.strip()) is not None


def is_own(params: Mapping[str, str], identity: str) -> bool:
    """Whether the message was written by us (TWILIO_CONVERSATIONS_IDENTITY): our reply's
    onMessageAdded coming back, never a patient's message."""
    return bool(identity) and params.get("Author", "") == identity


def needs_binding(params: Mapping[str, str]) -> bool:
    """The author is a chat identity (or absent): only the participant's MessagingBinding,
    read from the Conversations API, says which number wrote."""
    return not is_address(params.get("Author", ""))


def medium_code(address: str) -> str:
    """The medium of a binding address: WhatsApp for `whatsapp:+…`, SMS writing for `+…`."""
    return WHATSAPP_MEDIUM_CODE if address.lower().startswith("whatsapp:") else SMS_MEDIUM_CODE


def media_url(service_sid: str, media_sid: str) -> str:
    """Where Twilio keeps one Conversations media item (the MCS Media resource; its content
    needs the account's credentials, as an MMS MediaUrl does)."""
    return f"{MCS_API}/Services/{service_sid}/Media/{media_sid}"


def parse_message_added(params: Mapping[str, str], received_at: str, binding: Binding | None,
                        region: str = DEFAULT_REGION) -> InboundMessage:
    """Turn an onMessageAdded webhook into an InboundMessage (pure).

    The sender is `Author` when it is an address, else `binding.address`. Raises
    PermanentError("invalid-payload") for a payload no retry can fix and
    PermanentError("invalid-sender") when no patient address can be found.
    """
    gone = [f for f in REQUIRED[EVENT_MESSAGE_ADDED] if not params.get(f)]
    if gone or params.get("EventType") != EVENT_MESSAGE_ADDED:
        raise PermanentError("invalid-payload", "not an onMessageAdded: missing "
                             + ", ".join(gone or ["EventType"]))
    author = params.get("Author", "").strip()
    address = author if is_address(author) else (binding.address if binding else "")
    if not is_address(address):
        raise PermanentError("invalid-sender",
                             "the author has no SMS or WhatsApp address (a chat participant)")
    try:
        sender = to_e164(address.split(":", 1)[-1], region)
    except InvalidPhoneNumber as exc:
        raise PermanentError("invalid-sender", f"Author: {exc}") from None
    proxy = (binding.proxy_address if binding else "").split(":", 1)[-1]
    service = params.get("ChatServiceSid", "")
    items = media_items(params.get("Media") or "[]") or []
    attachments = tuple(
        Attachment(url=media_url(service, str(item.get("Sid", item.get("MediaSid")))),
                   content_type=str(item["ContentType"]), title=str(item.get("Filename") or ""),
                   size=item.get("Size"))
        for item in items if service)
    notes = ((f"{len(items)} attachment(s) could not be linked: the webhook named no "
              "ChatServiceSid",) if items and not service else ())
    return InboundMessage(
        channel=CHANNEL,
        medium_code=medium_code(address),
        provider_message_id=params["MessageSid"],
        sender=sender,
        # The clinic side: our number in this Conversation when the binding says it.
        clinic_address=proxy or "twilio-conversations",
        body=params.get("Body") or "",
        received_at=received_at,
        attachments=attachments,
        provider_conversation_id=params["ConversationSid"],
        topic="Twilio conversation",
        notes=notes,
    )


def delivery_status(params: Mapping[str, str]) -> dict[str, str]:
    """An onDeliveryUpdated receipt as the status callback fields worker/outbound/status.py
    applies (MessageSid is the Conversation Message's IM SID)."""
    return {"MessageSid": params.get("MessageSid", ""),
            "MessageStatus": params.get("Status", "").lower(),
            "ErrorCode": params.get("ErrorCode", "") if params.get("ErrorCode") != "0" else ""}


# -- outbound -----------------------------------------------------------------------------------

# Conversations error codes → our vocabulary (https://www.twilio.com/docs/api/errors); the
# rest as for Programmable Messaging (worker/channels/twilio.py classify_error).
ERROR_KINDS: dict[int, str] = {
    20404: "invalid-recipient",  # the Conversation is gone (deleted, or never ours)
}


class TwilioConversations:
    """Posts replies into a Conversation (`OutboundMessage.to` is its CH SID) with the SDK, as
    TWILIO_CONVERSATIONS_IDENTITY (without one, sends are refused as misconfigured), and reads
    participants' bindings for the inbound side. Twilio delivers a reply to every participant
    on their own channel. One SDK client per thread, as for SMS (worker/channels/twilio.py)."""

    name = CHANNEL
    medium_code = SMS_MEDIUM_CODE  # the header says the real one (SMS or WhatsApp)

    def __init__(self, account_sid: str, auth_token: str, identity: str, api_base_url: str,
                 timeout: float = 10.0) -> None:
        self._sid = account_sid
        self._token = auth_token
        self.identity = identity
        self._base = api_base_url
        self._timeout = timeout
        self._local = threading.local()

    def sender_key(self) -> str:
        """Sends are paced per identity (Twilio delivers through each Conversation's number)."""
        return self.identity

    def _client(self) -> Any:
        return thread_client(self._local, self._sid, self._token, self._base, self._timeout)

    def _error(self, exc: Exception, client: Any) -> SendError:
        code = getattr(exc, "code", None)
        status = getattr(exc, "status", None)
        kind = ERROR_KINDS.get(code or 0)
        if kind is not None:
            return SendError(kind, f"Twilio Conversations HTTP {status}", code)
        return classify_error(status, code, retry_after_seconds(client.http_client.last_headers))

    def send(self, message: OutboundMessage) -> SendResult:
        """Post one message into the Conversation `message.to`; raises SendError."""
        from twilio.base.exceptions import TwilioException

        if not self.identity:
            raise SendError("misconfigured", "TWILIO_CONVERSATIONS_IDENTITY is not set")
        if not is_conversation_sid(message.to):
            raise SendError("invalid-recipient", "not a Conversation SID")
        client = self._client()
        body = message.body
        if message.attachments:
            # The REST API attaches only media uploaded to Twilio's MCS (MediaSid); links to
            # the clinic's files go in the text.
            body = "\n".join([body, *(a.url for a in message.attachments)]).strip()
        try:
            created = client.conversations.v1.conversations(message.to).messages.create(
                author=self.identity, body=body, x_twilio_webhook_enabled=WEBHOOK_ENABLED)
        except TwilioException as exc:
            raise self._error(exc, client) from None
        except httpx.HTTPError as exc:
            if never_sent(exc):
                raise SendError("provider-unavailable", type(exc).__name__) from None
            # Conversations has no idempotency key either: a lost answer may hide a posted
            # message, and posting again could write to the patient twice.
            raise SendError("outcome-unknown", type(exc).__name__) from None
        return SendResult(provider_id=str(created.sid), status="sent")

    def binding(self, conversation_sid: str, participant_sid: str) -> Binding | None:
        """The participant's MessagingBinding (None for a chat participant); raises SendError
        (retryable for 429/5xx) when Twilio does not answer."""
        from twilio.base.exceptions import TwilioException

        client = self._client()
        try:
            participant = client.conversations.v1.conversations(conversation_sid) \
                .participants(participant_sid).fetch()
        except TwilioException as exc:
            raise self._error(exc, client) from None
        except httpx.HTTPError as exc:
            raise SendError("provider-unavailable", type(exc).__name__) from None
        found = participant.messaging_binding or {}
        address = str(found.get("address") or "")
        if not is_address(address):
            return None
        return Binding(address, str(found.get("proxy_address") or ""))
