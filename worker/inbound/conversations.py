"""Inbound Twilio Conversations: which onMessageAdded is a patient's message, and who wrote it.

The message itself goes through the shared pipeline (pipeline.deliver_inbound) with the
`conversation` strategy, always: the Conversation is the thread, so its header must carry the
Conversation SID whatever SMS_THREAD_STRATEGY says (a reply in that thread is posted back into
the Conversation by that identifier; docs/channels.md, "Twilio Conversations").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Protocol

from worker.channels import SendError
from worker.channels.phones import DEFAULT_REGION
from worker.channels.twilio_conversations import (
    CONVERSATION_SYSTEM,
    MESSAGE_SYSTEM,
    Binding,
    is_own,
    needs_binding,
    parse_message_added,
)
from worker.errors import PermanentError, TransientError
from worker.fhir.resources import IdentifierSystems
from worker.messages import InboundMessage

STRATEGY = "conversation"


class Participants(Protocol):
    """Reads a participant's MessagingBinding (TwilioConversations.binding)."""

    def binding(self, conversation_sid: str, participant_sid: str) -> Binding | None: ...


def conversation_systems(systems: IdentifierSystems) -> IdentifierSystems:
    """The identifier systems of Conversations messages and headers: the header's is the
    seed's `https://twilio.com`, the messages' the IM SID system."""
    return replace(systems, conversation=CONVERSATION_SYSTEM, message=MESSAGE_SYSTEM)


def read_message_added(params: Mapping[str, str], received_at: str, identity: str,
                       participants: Participants, region: str = DEFAULT_REGION
                       ) -> InboundMessage | str:
    """The patient's message of an onMessageAdded, or why there is none to write (a string:
    our own reply's echo, a system message, a chat participant's message).

    The author's address is `Author` when it is one; else the participant's binding is read
    from the Conversations API (one call; a 429 or 5xx is retried like any transient failure).
    """
    if is_own(params, identity):
        return "own-message"
    binding: Binding | None = None
    if needs_binding(params):
        participant = params.get("ParticipantSid", "")
        if not participant:
            return "system-message"
        try:
            binding = participants.binding(params["ConversationSid"], participant)
        except SendError as exc:
            if exc.retryable:
                raise TransientError("conversations-unavailable", exc.detail,
                                     exc.retry_after) from None
            raise PermanentError("participant-unreadable", str(exc)) from None
        if binding is None:
            # A chat (SDK) participant: a clinician's app or a bot, not a patient's phone.
            return "not-a-patient"
    return parse_message_added(params, received_at, binding, region)
