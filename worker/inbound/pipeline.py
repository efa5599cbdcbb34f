"""Inbound pipeline: one patient message, written exactly once into the right thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from worker.channels.twilio import CHANNEL, WHATSAPP_CHANNEL, opt_keyword
from worker.errors import PermanentError
from worker.fhir.outcome import FhirPermanentError
from worker.fhir.resources import patient_with_email, patient_with_phone
from worker.inbound.threads import STRATEGIES, ThreadContext, Written, sender_search
from worker.messages import InboundMessage


class OptOutList(Protocol):
    """The local opt-out list (worker.stores.optouts.OptOuts)."""

    def add(self, channel: str, address: str) -> None: ...
    def remove(self, channel: str, address: str) -> bool: ...


def apply_opt_keyword(msg: InboundMessage, optouts: OptOutList) -> str | None:
    """A STOP keeps later sends to this sender from leaving; a START (UNSTOP, YES) lifts it.
    The message itself is written like any other: the clinic sees it too."""
    # WhatsApp too: Twilio honours the same keywords there (its Advanced Opt-Out).
    change = opt_keyword(msg.body) if msg.channel in (CHANNEL, WHATSAPP_CHANNEL) else None
    if change == "opt-out":
        optouts.add(msg.channel, msg.sender)
    elif change == "opt-in":
        optouts.remove(msg.channel, msg.sender)
    return change


class SeenMessages(Protocol):
    """Remembers provider message ids already written, so provider retries skip FHIR."""

    def seen(self, message_id: str) -> bool: ...
    def remember(self, message_id: str) -> None: ...


@dataclass(frozen=True)
class InboundOutcome:
    """What happened to one inbound message."""

    communication_id: str | None
    thread_ref: str | None
    result: str  # "created", "existing" (the server already had it), "skipped" (seen marker)


def deliver_inbound(msg: InboundMessage, ctx: ThreadContext, strategy: str, policy: str,
                    seen: SeenMessages) -> InboundOutcome:
    """Resolve the sender, match the thread and write the message, once.

    The seen marker is only a shortcut: it is set after a successful write, and correctness
    rests on the server's conditional creates (a message processed twice at the same moment
    still makes one row).
    """
    if seen.seen(msg.provider_message_id):
        return InboundOutcome(None, None, "skipped")
    write = STRATEGIES[strategy]
    try:
        written = write(ctx, msg)
    except FhirPermanentError as exc:
        if not _is_sender_problem(exc):
            raise
        if policy != "create-patient":
            raise PermanentError("unknown-sender",
                                 f"no Patient has the sender's {_what(msg)}") from None
        _ensure_patient(ctx, msg)
        written = write(ctx, msg)
    seen.remember(msg.provider_message_id)
    return _outcome(written)


def _is_sender_problem(exc: FhirPermanentError) -> bool:
    ambiguous = exc.ambiguous_reference()
    if ambiguous and ambiguous.startswith("Patient?"):
        raise PermanentError("ambiguous-sender", "several Patients have the sender's "
                             + ("email address" if "email=" in ambiguous else "phone number")
                             ) from None
    missing = exc.unresolved_reference()
    return bool(missing and missing.startswith("Patient?"))


def _ensure_patient(ctx: ThreadContext, msg: InboundMessage) -> None:
    """Create the sender's Patient unless one appeared meanwhile (conditional create, so two
    first messages from one new number make one Patient)."""
    patient = (patient_with_email(msg.sender.strip()) if msg.channel == "email"
               else patient_with_phone(msg.sender))
    try:
        ctx.fhir.create(patient, if_none_exist=[sender_search(msg, ctx.phone_region)])
    except FhirPermanentError as exc:
        if exc.status == 412:  # If-None-Exist matched several Patients
            raise PermanentError(
                "ambiguous-sender", f"several Patients have the sender's {_what(msg)}") from None
        raise


def _what(msg: InboundMessage) -> str:
    return "email address" if msg.channel == "email" else "phone number"


def _outcome(written: Written) -> InboundOutcome:
    return InboundOutcome(written.communication_id, written.thread_ref,
                          "created" if written.created else "existing")
