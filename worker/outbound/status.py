"""Delivery status callbacks: move the Communication along, never back from a final state.

Twilio's status callbacks and SendGrid's Event Webhook share one mechanism: a pure mapping
(status_map.py) and one guarded move of the Communication that the API request's state follows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from worker.channels.sendgrid import ARG_COMMUNICATION, ARG_REQUEST, provider_message_id
from worker.errors import PermanentError, SwitchboardError, TransientError
from worker.fhir.client import FhirClient
from worker.fhir.outcome import FhirPermanentError
from worker.fhir.query import token
from worker.fhir.reference import parse_reference, ref
from worker.fhir.resources import fhir_string
from worker.fhir.update import guarded_update
from worker.ids import REQUEST_ID
from worker.outbound.routing import medium_channel
from worker.outbound.status_map import (
    READ_AT_EXTENSION,
    SENDGRID_TO_FHIR,
    TERMINAL,
    TWILIO_TO_FHIR,
    next_status,
    records_read,
    sendgrid_event_kind,
    sendgrid_status_event,
)
from worker.outbound.whatsapp import REFUSED_SID_SYSTEM
from worker.stores.optouts import OptOuts
from worker.stores.outbound_state import OutboundState

log = logging.getLogger("switchboard.status")
TWILIO_ERROR_SYSTEM = "https://www.twilio.com/docs/api/errors"
SENDGRID_EVENT_SYSTEM = "https://docs.sendgrid.com/event-webhook/event"


def _move(fhir: FhirClient, comm_id: str, status: str, table: Mapping[str, str],
          reason: Callable[[], dict[str, Any]], state: OutboundState, request_system: str,
          request_id: str | None, failure: Mapping[str, Any]) -> str:
    """Move Communication/<comm_id> as `status` says (never back from a final state) and let
    the API request follow; returns the new status or "ignored"."""
    outcome: dict[str, str] = {"result": "ignored"}

    def change(c: dict[str, Any]) -> dict[str, Any] | None:
        current = str(c.get("status", ""))
        target = next_status(current, status, table)
        extensions = list(c.get("extension") or [])
        if records_read(current, status, any(e.get("url") == READ_AT_EXTENSION
                                             for e in extensions)):
            # The callback carries no time of its own: the time we heard of it.
            c["extension"] = [*extensions, {"url": READ_AT_EXTENSION, "valueDateTime": datetime.now(
                UTC).isoformat(timespec="milliseconds")}]
            outcome["result"] = "read"
        if target is None:
            return c if outcome["result"] == "read" else None
        c["status"] = target
        if target == "stopped":
            c["statusReason"] = reason()
        outcome["result"] = target
        return c

    written = guarded_update(fhir, "Communication", comm_id, change)
    if written is not None:
        request_id = request_id or next(
            (str(i.get("value")) for i in written.get("identifier") or []
             if i.get("system") == request_system), None)
        if request_id and REQUEST_ID.fullmatch(request_id):
            if outcome["result"] == "completed":
                state.update(request_id, "delivered", communication=comm_id)
            elif outcome["result"] == "stopped":
                state.update(request_id, "failed", communication=comm_id, error="undelivered",
                             **failure)
    return outcome["result"]


# What a WhatsApp send refused outside the 24-hour window (63016) turns into:
# worker.outbound.whatsapp.refused_outside_window(comm_id, request_id, params).
OutsideWindow = Callable[[str, str | None, Mapping[str, str]], str]


def apply_status(fhir: FhirClient, sid_system: str, params: Mapping[str, str],
                 state: OutboundState, request_system: str = "urn:switchboard:outbound-request",
                 outside_window: OutsideWindow | None = None) -> str:
    """Apply one Twilio status callback; returns what happened ("completed", "read",
    "held", "ignored", …)."""
    sid = (params.get("MessageSid") or params.get("SmsSid") or "").strip()
    status = (params.get("MessageStatus") or params.get("SmsStatus") or "").strip().lower()
    if not sid or not status:
        raise PermanentError("invalid-payload", "MessageSid and MessageStatus are required")
    error_code = (params.get("ErrorCode") or "").strip()
    if not re.fullmatch(r"[0-9]{1,6}", error_code):
        error_code = ""  # the receiver refuses other shapes; never trust one that got here
    found = fhir.search("Communication", [
        ("identifier", ",".join((token(sid_system, sid), token(REFUSED_SID_SYSTEM, sid)))),
        ("_count", "2")])
    entries = [e["resource"] for e in found.get("entry") or []]
    if not entries:
        # Twilio can call back before our own record of the send reached FHIR: try again.
        raise TransientError("communication-not-found", "no Communication has this MessageSid")

    comm = entries[0]
    idents = [i for i in comm.get("identifier") or [] if isinstance(i, Mapping)]
    current = {i.get("value") for i in idents if i.get("system") == sid_system}
    refused = sid in {i.get("value") for i in idents if i.get("system") == REFUSED_SID_SYSTEM}
    if (outside_window is not None and error_code == "63016"
            and status in ("failed", "undelivered") and medium_channel(comm) == "whatsapp"
            and comm.get("status") not in TERMINAL
            and (sid in current or (refused and not current))):
        # WhatsApp refused a free-form reply outside the 24-hour window: held, not failed
        # (again, for a redelivered callback, until the reply is sent anew).
        request_id = next((str(i.get("value")) for i in idents
                           if i.get("system") == request_system), None)
        return outside_window(str(comm["id"]), request_id, params)
    if sid not in current:
        return "ignored"  # about a send refused with 63016, which is no longer a send of it

    def reason() -> dict[str, Any]:
        codings = [{"system": TWILIO_ERROR_SYSTEM, "code": error_code}] if error_code else []
        return {"coding": codings,
                "text": f"Twilio: {status}" + (f" (error {error_code})" if error_code else "")}

    return _move(fhir, str(entries[0]["id"]), status, TWILIO_TO_FHIR, reason, state,
                 request_system, None,
                 {"provider_code": int(error_code) if error_code else None})


class SeenEvents(Protocol):
    """Provider event ids already applied (stores/seen.py)."""

    def seen(self, message_id: str) -> bool: ...
    def remember(self, message_id: str) -> None: ...


@dataclass
class EventCounts:
    """What one batch of SendGrid events did."""

    results: dict[str, int] = field(default_factory=dict)

    def add(self, result: str) -> None:
        """Count one event's result."""
        self.results[result] = self.results.get(result, 0) + 1


def apply_email_events(fhir: FhirClient, events: Sequence[Mapping[str, Any]],
                       seen: SeenEvents, optouts: OptOuts, state: OutboundState,
                       xid_system: str, request_system: str,
                       count: Callable[[str], None] = lambda _event: None) -> EventCounts:
    """Apply a batch of SendGrid Event Webhook events (shapes checked by the receiver).

    Each event is applied at most once (deduplicated on `sg_event_id` once applied) and in any
    order: final statuses never move back. A transient failure of one event does not hold up the
    others: the batch is retried after all were tried, and the events already applied are then
    skipped, so the retry (or a replay of its dead letter) repeats nothing.
    """
    counts = EventCounts()
    failure: SwitchboardError | None = None
    for event in events:
        event_id = str(event.get("sg_event_id") or "")
        if not event_id:
            counts.add("invalid")
            continue
        if seen.seen(event_id):
            counts.add("duplicate")
            continue
        try:
            result = _apply_email_event(fhir, event, optouts, state, xid_system, request_system)
        except SwitchboardError as exc:
            # Transient first: a retry can still apply it; a permanent one is dead-lettered
            # with the batch (a replay skips what was applied).
            if failure is None or (exc.retryable and not failure.retryable):
                failure = exc
            counts.add("failed")
            continue
        seen.remember(event_id)
        name = str(event.get("event") or "").lower()
        count(name if sendgrid_event_kind(name) != "other" else "other")  # once applied
        counts.add(result)
    if failure is not None:
        raise failure
    return counts


def _apply_email_event(fhir: FhirClient, event: Mapping[str, Any], optouts: OptOuts,
                       state: OutboundState, xid_system: str, request_system: str) -> str:
    name = str(event.get("event") or "").lower()
    kind = sendgrid_event_kind(name)
    if kind == "engagement" or kind == "other":
        return name if kind == "engagement" else "ignored"
    if kind == "opt-out":
        address = str(event.get("email") or "").strip()
        # Only about an email we sent to that address: an unsubscribe from another sender's
        # list on the same SendGrid account (a marketing group) says nothing about the
        # clinic's messages, and one naming a Communication we never emailed there (or none
        # at all) must not silence a patient's address.
        comm_id = _communication_for(fhir, event, xid_system) if address else None
        if comm_id is None or not _emailed_to(fhir, comm_id, address):
            return "not-ours"
        optouts.add("email", address)
        return "opted-out"
    comm_id = _communication_for(fhir, event, xid_system)
    if comm_id is None:
        return "not-ours"
    status = sendgrid_status_event(name, str(event.get("type") or ""))
    request = event.get(ARG_REQUEST)
    request_id = request if isinstance(request, str) and REQUEST_ID.fullmatch(request) else None

    def reason() -> dict[str, Any]:
        why = fhir_string(str(event.get("reason") or "")[:1000])
        return {"coding": [{"system": SENDGRID_EVENT_SYSTEM, "code": status}],
                "text": f"SendGrid: {status}" + (f": {why}" if why else "")}

    return _move(fhir, comm_id, status, SENDGRID_TO_FHIR, reason, state, request_system,
                 request_id, {"detail": f"SendGrid: {status}"})


def _communication_for(fhir: FhirClient, event: Mapping[str, Any], xid_system: str
                       ) -> str | None:
    """The id of the Communication an event is about, or None when it is not one of ours.

    Our sends carry the Communication id as a custom arg: checked as a FHIR id, then against
    the X-Message-Id our send recorded on that Communication (an event naming another message
    is ignored; one that comes before the record is retried). An event without the custom arg
    is looked up by its X-Message-Id. SendGrid posts the events of every email of the account,
    so an event that matches nothing is someone else's and is ignored.
    """
    xid = provider_message_id(str(event.get("sg_message_id") or ""))
    cid = event.get(ARG_COMMUNICATION)
    if isinstance(cid, str) and cid:
        comm_ref = ref("Communication", cid)  # InvalidReference (permanent) if not an id
        try:
            comm = fhir.read(comm_ref.type, comm_ref.id).resource
        except FhirPermanentError as exc:
            if exc.status in (404, 410):
                log.warning("sendgrid event for a deleted Communication/%s ignored", cid)
                return None
            raise
        recorded = [str(i.get("value")) for i in comm.get("identifier") or []
                    if i.get("system") == xid_system]
        if not recorded:
            sent_by = medium_channel(comm)
            if sent_by is not None and sent_by != "email":
                # Sent (or received) on another channel: no email of ours carried it, so the
                # event is not ours (a retry could never find the record it waits for).
                log.warning("sendgrid event names Communication/%s, which is no email of "
                            "ours; ignored", cid)
                return None
            # Ours, but the record of the send (written a moment after SendGrid accepted it)
            # is not there yet, or this Communication was never sent by us: try again later
            # (the other events of the batch go on; the retries end in a dead letter).
            raise TransientError("send-not-recorded",
                                 "the Communication carries no X-Message-Id yet")
        # Without an X-Message-Id SendGrid's answer, our Message-ID (`<…>`) was recorded
        # instead; it cannot be compared with the event's.
        if xid and not any(r == xid or r.startswith("<") for r in recorded):
            log.warning("sendgrid event names Communication/%s but another message; ignored",
                        cid)
            return None
        return comm_ref.id
    return _by_message_id(fhir, xid, xid_system)


def _emailed_to(fhir: FhirClient, comm_id: str, address: str) -> bool:
    """Whether the email of this Communication (one we sent: _communication_for checked its
    recorded X-Message-Id) went to `address`: an email address of the patient the pipeline
    emails (the first Patient among its recipients, its subject, its thread's subject)."""
    comm = fhir.read("Communication", comm_id).resource
    refs = [r.get("reference") for r in comm.get("recipient") or [] if isinstance(r, Mapping)]
    refs.append((comm.get("subject") or {}).get("reference"))
    threads = [p.get("reference") for p in comm.get("partOf") or [] if isinstance(p, Mapping)]
    if threads and not any(isinstance(r, str) and r.startswith("Patient/") for r in refs):
        thread = parse_reference(str(threads[0]), {"Communication"})
        refs.append((fhir.read(thread.type, thread.id).resource.get("subject") or {}
                     ).get("reference"))
    first = next((r for r in refs if isinstance(r, str) and r.startswith("Patient/")), None)
    if first is None:
        return False
    patient = parse_reference(first, {"Patient"})
    try:
        telecoms = fhir.read(patient.type, patient.id).resource.get("telecom") or []
    except FhirPermanentError as exc:
        if exc.status in (404, 410):
            return False
        raise
    wanted = address.strip().lower()
    return any(isinstance(t, Mapping) and t.get("system") == "email"
               and str(t.get("value") or "").strip().lower() == wanted for t in telecoms)


def _by_message_id(fhir: FhirClient, xid: str, xid_system: str) -> str | None:
    if not xid:
        return None
    found = fhir.search("Communication", [("identifier", token(xid_system, xid)),
                                          ("_count", "2")])
    entries = [e["resource"] for e in found.get("entry") or []]
    return str(entries[0]["id"]) if entries else None
