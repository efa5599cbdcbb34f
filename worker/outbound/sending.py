"""What every send shares, whichever channel it takes: the request (the task's payload), what a
send needs (built once per worker process), the message built from a Communication, and the
record of a send on it. The one-send pipeline (pipeline.py) and the push fan-out (push.py) both
stand on this module, so neither imports the other's internals."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker.channels import Channel
from worker.channels.phones import DEFAULT_REGION
from worker.channels.sendgrid import DEFAULT_SUBJECT, EMAIL_MESSAGE_ID_SYSTEM, clean_subject
from worker.errors import Deferred, PermanentError
from worker.fhir.client import FhirClient
from worker.fhir.outcome import FhirPermanentError
from worker.fhir.reference import parse_reference, ref
from worker.fhir.resources import identifier, medium
from worker.fhir.update import guarded_update
from worker.ids import REQUEST_ID
from worker.messages import Attachment, OutboundMessage, SendResult
from worker.ops.metrics import Metrics
from worker.outbound.routing import CHANNEL_TO_MEDIUM
from worker.stores.optouts import OptOuts
from worker.stores.outbound_state import OutboundState
from worker.stores.send_gate import Opened, SendGate
from worker.stores.send_ledger import SendLedger
from worker.stores.whatsapp import WhatsAppStore


@dataclass(frozen=True)
class OutboundRequest:
    """The payload of the `switchboard.outbound.send` task (see docs/http-api.md)."""

    request_id: str
    communication_id: str | None = None
    resource: dict[str, Any] | None = None
    channel: str | None = None
    # Set by the pipeline itself when it re-queues a send (not by callers):
    attempts: tuple[str, ...] = ()  # failed attempts on other channels (fallback)
    rate_slot: float | None = None  # the send slot this request reserved (Redis time)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> OutboundRequest:
        """Validate the task payload; a bad one is a PermanentError (no retry can fix it)."""
        comm = payload.get("communication")
        resource = payload.get("resource")
        channel = payload.get("channel")
        # `conversations` is set by the pipeline itself (a deferred reply keeps its channel).
        if channel not in (None, "sms", "email", "push", "whatsapp", "conversations"):
            raise PermanentError("invalid-payload",
                                 "channel must be sms, email, push or whatsapp")
        if comm is not None:
            if not isinstance(comm, str):
                raise PermanentError("invalid-payload", "communication must be a string")
            # "Communication/<id>" or a bare id; never a path to walk (see fhir/reference.py).
            comm = parse_reference(comm, {"Communication"}).id if "/" in comm \
                else ref("Communication", comm).id
        if not comm and not isinstance(resource, dict):
            raise PermanentError("invalid-payload", "need communication or resource")
        request_id = payload.get("request_id") or uuid.uuid4().hex
        if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
            raise PermanentError("invalid-payload", "request_id must be 1-64 letters, digits, -")
        slot = payload.get("rate_slot")
        return cls(request_id, comm or None,
                   resource if isinstance(resource, dict) else None, channel,
                   tuple(str(a) for a in payload.get("attempts") or ()),
                   float(slot) if isinstance(slot, int | float) else None)


@dataclass(frozen=True)
class WhatsAppPolicy:
    """What a closed WhatsApp window needs: the store of windows and held replies, the
    approved template (empty: a closed window fails the reply), its patient-free variables,
    and how long a reply waits."""

    store: WhatsAppStore
    template_sid: str
    template_variables: str
    hold_seconds: float


@dataclass
class OutboundDeps:
    """What a send needs (built once per worker process)."""

    fhir: FhirClient
    channels: dict[str, Channel]
    ledger: SendLedger
    optouts: OptOuts
    state: OutboundState
    rates: dict[str, float]
    id_systems: dict[str, str]  # channel → identifier system of its provider ids
    request_system: str
    reply_source: str  # "header" | "last-inbound"
    fallback: bool
    claim_seconds: float = 600.0  # a claim younger than this may still be sending
    max_countdown: float = 1800.0  # keep ETAs well inside the broker's visibility timeout
    metrics: Metrics | None = None
    device_system: str = "urn:switchboard:fcm-token"  # push tokens on FHIR Devices
    channel_order: tuple[str, ...] = ("sms", "email")  # CHANNEL_ORDER
    phone_region: str = DEFAULT_REGION  # PHONE_DEFAULT_REGION: stored numbers without +CC
    whatsapp: WhatsAppPolicy | None = None  # the 24-hour window and held replies
    # Sent before? opted out? a send slot? the claim? One Redis step over the stores' keys.
    gate: SendGate = field(init=False)

    def __post_init__(self) -> None:
        self.gate = SendGate(self.optouts, self.ledger)


def count_send(deps: OutboundDeps, channel: str, outcome: str) -> None:
    """Count one send attempt's outcome (switchboard_sends_total)."""
    if deps.metrics is not None:
        deps.metrics.inc("switchboard_sends", channel=channel, outcome=outcome)


def deferral(gate: Opened, deps: OutboundDeps, channel: str) -> Deferred:
    """Wait for the send slot the gate reserved; the slot travels with the re-queued task, so
    the next run sends then without asking again. Long waits are taken in steps, each well
    inside the broker's visibility timeout."""
    return Deferred(min(gate.wait, deps.max_countdown), "rate-limited",
                    {"rate_slot": gate.slot, "channel": channel})


def build_message(comm: Mapping[str, Any], comm_id: str, to: str, request_id: str = ""
             ) -> OutboundMessage:
    """The message to send of a Communication: its texts, attachments and topic."""
    texts = [p["contentString"] for p in comm.get("payload") or [] if p.get("contentString")]
    media = tuple(Attachment(str(p["contentAttachment"].get("url")),
                             str(p["contentAttachment"].get("contentType") or ""))
                  for p in comm.get("payload") or []
                  if (p.get("contentAttachment") or {}).get("url"))
    topic = clean_subject(str((comm.get("topic") or {}).get("text") or "")) or DEFAULT_SUBJECT
    return OutboundMessage(communication_id=comm_id, to=to, body="\n\n".join(texts),
                           attachments=media, subject=topic, request_id=request_id)


def record_sent(deps: OutboundDeps, comm_id: str, channel: str, result: SendResult,
                attempts: list[str], request_id: str | None = None,
                known: Mapping[str, Any] | None = None) -> None:
    """Write the provider id onto the Communication (If-Match). A refusal here happens after
    the message went out: it is dead-lettered as `record-failed`, never reported as unsent."""
    system = deps.id_systems[channel]

    def change(c: dict[str, Any]) -> dict[str, Any] | None:
        idents = list(c.get("identifier") or [])
        if any(i.get("system") == system and i.get("value") == result.provider_id
               for i in idents):
            return None
        idents.append(identifier(system, result.provider_id))
        if result.message_id:
            idents.append(identifier(EMAIL_MESSAGE_ID_SYSTEM, result.message_id))
        if request_id and not any(i.get("system") == deps.request_system for i in idents):
            # Links delivery callbacks back to the API request that asked for this send.
            idents.append(identifier(deps.request_system, request_id))
        c["identifier"] = idents
        if channel in CHANNEL_TO_MEDIUM:  # a Conversation's medium is its header's already
            c["medium"] = [medium(CHANNEL_TO_MEDIUM[channel])]
        c["sent"] = c.get("sent") or datetime.now(UTC).isoformat(timespec="milliseconds")
        if c.get("status") in (None, "preparation", "on-hold"):  # on-hold: WhatsApp window
            c["status"] = "in-progress"
        if attempts:
            c["note"] = [*(c.get("note") or []), *({"text": a} for a in attempts)]
        return c

    try:
        guarded_update(deps.fhir, "Communication", comm_id, change,
                       known=dict(known) if known is not None else None)
    except FhirPermanentError as exc:
        raise PermanentError("record-failed", f"sent as {result.provider_id}, but FHIR "
                             f"refused the update: {exc.outcome_text}") from None
