"""Builders for the FHIR resources Switchboard writes (pure; no I/O).

Data model (Medplum messaging): a thread is a header `Communication` without `partOf`, with the
patient as `subject`, a `topic`, the `medium` and the participants as `recipient`; each message is
a child `Communication` whose `partOf` points at the header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from worker.messages import Attachment, InboundMessage, fit_text

PARTICIPATION_MODE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode"
# v3-ParticipationMode has no code for WhatsApp (nor for any messaging app), and routing must
# tell a WhatsApp thread from an SMS thread, so WhatsApp gets a code in a system of our own
# (docs/channels.md). Communication.medium's binding is "example", so Medplum accepts it.
SWITCHBOARD_MEDIUM = "urn:switchboard:medium"
WHATSAPP_MEDIUM_CODE = "whatsapp"
_MEDIUM_SYSTEM = {WHATSAPP_MEDIUM_CODE: SWITCHBOARD_MEDIUM}
_MEDIUM_DISPLAY = {"SMSWRIT": "SMS writing", "EMAILWRIT": "email writing",
                   WHATSAPP_MEDIUM_CODE: "WhatsApp"}
_TOPIC = {"sms": "SMS conversation", "email": "Email conversation",
          "whatsapp": "WhatsApp conversation"}

Resource = dict[str, Any]


@dataclass(frozen=True)
class IdentifierSystems:
    """The identifier systems that make our writes idempotent (docs/configuration.md)."""

    message: str  # provider message ids (Twilio MessageSid)
    conversation: str  # external conversation ids on thread headers
    thread: str  # deterministic ids of headers we create (active-thread, new-thread)
    clinic_number: str  # the clinic's own number, when the clinic is a logical reference


def medium(code: str) -> Resource:
    """A `medium` CodeableConcept: v3-ParticipationMode, or ours for what it lacks (WhatsApp)."""
    return {"coding": [{"system": _MEDIUM_SYSTEM.get(code, PARTICIPATION_MODE), "code": code,
                        "display": _MEDIUM_DISPLAY.get(code, code)}]}


def identifier(system: str, value: str) -> Resource:
    """An Identifier."""
    return {"system": system, "value": value}


def clinic_participant(msg: InboundMessage, systems: IdentifierSystems, clinic_reference: str
                       ) -> Resource:
    """The clinic side of a thread: a configured reference, else the clinic's number."""
    if clinic_reference:
        return {"reference": clinic_reference}
    return {"identifier": identifier(systems.clinic_number, msg.clinic_address),
            "display": f"Clinic {msg.channel.upper()} line"}


# What a FHIR string may not hold: control characters other than tab, CR and LF, a byte-order
# mark, and lone surrogates. Medplum refuses the whole resource (400) for any of them, and a
# string that is only whitespace, so a patient's "\n" or "Running late \x1b" would otherwise
# end in the dead-letter store, photo and all.
_NOT_FHIR_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufeff\ud800-\udfff]")


def fhir_string(text: str) -> str | None:
    """`text` as a valid FHIR string (invalid characters removed), or None if nothing is left."""
    cleaned = _NOT_FHIR_TEXT.sub("", text)
    return cleaned if cleaned.strip() else None



def payload(msg: InboundMessage) -> list[Resource]:
    """Text then attachments; a body with nothing FHIR can hold adds no text. A text over
    MAX_TEXT_BYTES is cut here as a last guard (the channel should have cut it already, keeping
    the whole as an attachment): a message is never refused for its length."""
    items: list[Resource] = []
    text = fhir_string(msg.body)
    if text:
        items.append({"contentString": fit_text(text)[0]})
    items += [{"contentAttachment": _attachment(a)} for a in msg.attachments]
    return items


def _attachment(a: Attachment) -> Resource:
    out: Resource = {"url": a.url, "contentType": a.content_type}
    title = fhir_string(a.title) if a.title else None
    if title:
        out["title"] = title
    if a.size is not None:
        out["size"] = a.size
    return out


def thread_header(msg: InboundMessage, patient_ref: str, identifiers: list[Resource],
                  clinic: Resource) -> Resource:
    """A new thread header for `msg`'s patient."""
    return {
        "resourceType": "Communication",
        "status": "in-progress",
        "identifier": identifiers,
        "subject": {"reference": patient_ref},
        "topic": {"text": fhir_string(msg.topic) or _TOPIC.get(msg.channel, "Conversation")},
        "medium": [medium(msg.medium_code)],
        "recipient": [{"reference": patient_ref}, clinic],
        "sent": msg.received_at,
    }


def inbound_message(msg: InboundMessage, header_ref: str, patient_ref: str,
                    systems: IdentifierSystems, clinic: Resource) -> Resource:
    """The child Communication for one inbound message."""
    resource: Resource = {
        "resourceType": "Communication",
        "status": "in-progress",
        "identifier": [identifier(systems.message, msg.provider_message_id),
                       *(identifier(system, value) for system, value in msg.identifiers)],
        "partOf": [{"reference": header_ref}],
        "subject": {"reference": patient_ref},
        "sender": {"reference": patient_ref},
        "recipient": [clinic],
        "sent": msg.received_at,
        "medium": [medium(msg.medium_code)],
    }
    content = payload(msg)
    if content:
        resource["payload"] = content
    notes = [{"text": n} for n in (fhir_string(n) for n in msg.notes) if n]
    if notes:
        resource["note"] = notes
    return resource


def patient_with_email(address: str) -> Resource:
    """A minimal Patient for an unknown email sender (UNKNOWN_SENDER_POLICY=create-patient)."""
    return {"resourceType": "Patient", "telecom": [{"system": "email", "value": address}]}


def patient_with_phone(e164: str) -> Resource:
    """A minimal Patient for an unknown sender (UNKNOWN_SENDER_POLICY=create-patient)."""
    return {
        "resourceType": "Patient",
        "telecom": [{"system": "phone", "value": e164, "use": "mobile"}],
    }
