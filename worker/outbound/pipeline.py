"""Outbound pipeline: a clinician's message (a child Communication) reaches the patient once.

Order of events for one send, and why:
1. load the Communication (creating it first when the caller sent the resource itself);
2. a Communication already carrying our provider id is done;
3. recipient Patient → channel (forced, else the thread's medium, else phone then email) →
   contact (Patient.telecom);
4. the send gate, one Redis step (worker/stores/send_gate.py): a sent record in the ledger
   means done (an earlier run died before FHIR heard of it: finish that); a locally recorded
   opt-out refuses without calling the provider; the shared rate limit may defer the send
   (not a failure, no retry spent); else the send is claimed, so a second worker, or a
   redelivery of this task, cannot send too;
5. call the provider; record its answer in Redis at once, then on the Communication (If-Match),
   then the task is acknowledged. A redelivery after step 5 finds the record and does not send.
A failure before the gate asks the ledger first: a message that went out is never marked failed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from worker.channels import SendError
from worker.channels.sendgrid import (
    DEFAULT_SUBJECT,
    EMAIL_INBOUND_MESSAGE_ID_SYSTEM,
    EMAIL_MESSAGE_ID_SYSTEM,
    clean_subject,
)
from worker.channels.whatsapp import TwilioWhatsApp
from worker.errors import Deferred, PermanentError, TransientError
from worker.fhir.reference import parse_reference
from worker.fhir.resources import identifier
from worker.fhir.update import guarded_update
from worker.messages import OutboundMessage, SendResult
from worker.outbound.push import has_device, send_push
from worker.outbound.routing import (
    choose_channel,
    conversation_sid,
    has_only_invalid_phones,
    medium_channel,
    pick_contact,
)
from worker.outbound.sending import (
    OutboundDeps,
    OutboundRequest,
    build_message,
    count_send,
    deferral,
    record_sent,
)
from worker.outbound.whatsapp import OUTSIDE_WINDOW, hold_reply, window_open
from worker.outbound.whatsapp import policy as wa_policy

log = logging.getLogger("switchboard.outbound")
SEND_ERROR_SYSTEM = "urn:switchboard:send-error"
# SMS failures that mean "this number cannot take texts": worth trying email instead.
FALLBACK_KINDS = frozenset({"invalid-recipient", "unreachable"})
# The patient's numbers do not read as a valid number (in PHONE_DEFAULT_REGION when written
# without a country code): nothing is sent to a guess. No number in it: it reaches the API.
INVALID_PHONE = "the patient's phone number is not a valid phone number"


def send_outbound(req: OutboundRequest, deps: OutboundDeps, task_id: str) -> SendResult:
    """Send one outbound message exactly once; raises TransientError / PermanentError /
    Deferred for the task base class to act on."""
    comm, context = _load(req, deps)
    comm_id = str(comm["id"])
    refusal = unsendable(comm)
    if refusal is not None:
        # Not ours to send, so not ours to mark either: the Communication is left as it is.
        raise PermanentError("not-sendable", refusal)
    earlier = _already_sent(req, comm, comm_id, deps)
    if earlier is not None:
        return earlier
    try:
        header = _header(comm, deps, context)
        patient = _recipient(comm, header, deps, context)
        telecoms = patient.get("telecom") or []
        # A thread keyed by a Twilio Conversation is answered in that Conversation.
        channel = req.channel or ("conversations" if conversation_sid(header) else None) \
            or choose_channel(
            None, _reply_channel(header, patient, deps), telecoms, deps.channel_order,
            lambda: has_device(deps, str(patient["id"])), region=deps.phone_region)
    except PermanentError as exc:
        earlier = _sent_before(req, deps, comm, comm_id)
        if earlier is not None:
            return earlier
        # Failed before any provider was called (no recipient, a bad reference, a 404): the
        # Communication says so too, as for every other permanent failure.
        _mark_failed(deps, comm_id, exc.reason, exc.detail)
        deps.state.update(req.request_id, "failed", communication=comm_id, error=exc.reason)
        raise
    try:
        if channel is None:
            raise SendError("invalid-recipient", INVALID_PHONE if has_only_invalid_phones(
                telecoms, deps.phone_region) else "the patient has no phone or email")
        if channel == "push":  # one push per device: worker/outbound/push.py
            return send_push(req, deps, comm, comm_id, str(patient["id"]), task_id)
        return _send(req, deps, comm, comm_id, channel, telecoms, task_id,
                     _Thread(header, str(patient.get("id") or "")))
    except SendError as exc:
        if exc.retryable:
            deps.state.update(req.request_id, "queued", communication=comm_id,
                              last_error=exc.kind)
            raise TransientError(exc.kind, exc.detail, exc.retry_after) from None
        earlier = _sent_before(req, deps, comm, comm_id)
        if earlier is not None:
            return earlier
        _record_failure(req, deps, comm_id, exc, exc.channel or channel)
        raise PermanentError(exc.kind, _describe(exc)) from None


@dataclass(frozen=True)
class _Thread:
    """The conversation a message belongs to (for email threading)."""

    header: Mapping[str, Any] | None
    patient_id: str


def _send(req: OutboundRequest, deps: OutboundDeps, comm: Mapping[str, Any], comm_id: str,
          channel: str, telecoms: list[Any], task_id: str, thread: _Thread) -> SendResult:
    impl = deps.channels.get(channel)
    if impl is None:
        raise SendError("misconfigured", f"channel {channel} is not configured")
    to = (conversation_sid(thread.header) if channel == "conversations"
          else pick_contact(telecoms, channel, region=deps.phone_region))
    if to is None:
        raise SendError("invalid-recipient", INVALID_PHONE if channel == "sms" and (
            has_only_invalid_phones(telecoms, deps.phone_region))
            else f"the patient has no usable {channel} contact")
    message = build_message(comm, comm_id, to, req.request_id)
    if channel == "email":
        # Before the claim: a FHIR failure here is an ordinary retry, not a held claim.
        message = _email_thread(message, thread, deps)
    whatsapp_queue, wa_impl = None, impl if isinstance(impl, TwilioWhatsApp) else None
    if wa_impl is not None:
        # Before the claim too (it may ask FHIR); acted on after the gate, so an opted-out
        # patient gets no template and the template keeps the channel's pace.
        whatsapp_queue = wa_policy(deps).store.queue(to, wa_impl.sender_key())
        window = window_open(deps, whatsapp_queue, thread.patient_id)
    gate = deps.gate.open(comm_id, task_id, f"{channel}:{impl.sender_key()}",
                          deps.rates[channel], req.rate_slot, opt_out=(channel, to))
    if gate.done is not None:  # sent by an earlier run that died before FHIR heard of it
        return _finish_earlier(req, deps, comm, comm_id, gate.done)
    if gate.outcome == "opted-out":
        raise SendError("opted-out", "the patient opted out (recorded locally)")
    if gate.outcome == "wait":
        raise deferral(gate, deps, channel)
    held = gate.claim
    if held is not None:
        if held.age < deps.claim_seconds:
            # Someone (maybe an earlier delivery of this very task) is sending right now.
            raise TransientError("send-in-progress", "another attempt is sending this message")
        # A claim this old without a result: its holder died while the provider answered.
        # The text may or may not have gone out; sending again could text the patient twice.
        raise SendError("outcome-unknown", "a worker died while the provider was answering")
    if wa_impl is not None and not window:
        deps.ledger.release(comm_id)  # nothing goes out: the reply is held
        return hold_reply(deps, wa_impl, comm_id, req.request_id, to,
                          "outside the WhatsApp 24-hour window")
    try:
        result = impl.send(message)
    except SendError as exc:
        count_send(deps, channel, exc.kind)
        if exc.kind != "outcome-unknown":
            deps.ledger.release(comm_id)  # the provider refused: nothing went out
        if exc.kind == OUTSIDE_WINDOW and wa_impl is not None and whatsapp_queue:
            # Twilio knows better than our record (63016): hold as if we had known.
            wa_policy(deps).store.close(whatsapp_queue)
            return hold_reply(deps, wa_impl, comm_id, req.request_id, to,
                              "Twilio 63016: outside the WhatsApp 24-hour window")
        if exc.kind == "opted-out":
            deps.optouts.add(channel, to)
        exc.attempts, exc.channel = req.attempts, channel
        if (not exc.retryable and deps.fallback and channel == "sms"
                and exc.kind in FALLBACK_KINDS and pick_contact(telecoms, "email")):
            log.warning("sms to Communication/%s failed (%s); falling back to email",
                        comm_id, exc.kind)
            again = replace(req, channel="email", rate_slot=None,
                            attempts=(*req.attempts, f"sms failed: {_describe(exc)}"))
            try:
                return _send(again, deps, comm, comm_id, "email", telecoms, task_id, thread)
            except Deferred as deferred:
                # Waiting for an email slot must not send the SMS again on the next run.
                raise Deferred(deferred.countdown, deferred.reason, {
                    **deferred.changes, "channel": "email",
                    "attempts": list(again.attempts)}) from None
        raise
    count_send(deps, channel, "sent")
    sent = {"provider_id": result.provider_id, "channel": channel,
            "message_id": result.message_id}
    # First: from here on a redelivery will not send again. The API request's state goes in
    # the same round trip.
    deps.ledger.record(comm_id, sent, deps.state.change(
        req.request_id, "sent", communication=comm_id, **sent))
    log.info("outbound Communication/%s sent by %s as %s", comm_id, channel, result.provider_id)
    record_sent(deps, comm_id, channel, result, list(req.attempts), req.request_id, comm)
    return result


def _load(req: OutboundRequest, deps: OutboundDeps
          ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The Communication, and what came with it: its thread header and recipient, by
    "Type/id". One search with _include instead of three reads: a send's FHIR round trips are
    most of its cost (bench/results.md, "Outbound sends")."""
    if req.communication_id:
        found = deps.fhir.search("Communication", [
            ("_id", req.communication_id), ("_include", "Communication:part-of"),
            ("_include", "Communication:recipient")])
        context: dict[str, dict[str, Any]] = {}
        comm = None
        for entry in _list(found.get("entry")):
            resource = entry.get("resource") if isinstance(entry, Mapping) else None
            if not isinstance(resource, dict) or not isinstance(resource.get("id"), str):
                continue
            if (resource.get("resourceType") == "Communication"
                    and resource["id"] == req.communication_id
                    and (entry.get("search") or {}).get("mode", "match") == "match"):
                comm = resource
            else:
                context[f"{resource.get('resourceType')}/{resource['id']}"] = resource
        if comm is None:  # gone, or never there: the read says which, as before
            comm = deps.fhir.read("Communication", req.communication_id).resource
        return comm, context
    assert req.resource is not None
    resource = dict(req.resource)
    resource["resourceType"] = "Communication"
    resource.setdefault("status", "in-progress")
    key = identifier(deps.request_system, req.request_id)
    resource["identifier"] = [*(resource.get("identifier") or []), key]
    # Keyed on the request id: a redelivered task finds the Communication it created.
    return deps.fhir.create(resource, if_none_exist=[
        ("identifier", f"{deps.request_system}|{req.request_id}")]).resource, {}


def unsendable(comm: Mapping[str, Any]) -> str | None:
    """Why this Communication is not a message for Switchboard to send (None: it is one).

    A patient's own message (sender a Patient) must never be echoed back to them, and a thread
    header (no partOf, no payload) has nothing to send: sending one used to text an empty SMS.
    """
    sender = _reference(comm.get("sender"))
    if sender.startswith("Patient/"):
        return "an inbound message from the patient, not a reply to send"
    has_content = any(isinstance(p, Mapping) and (p.get("contentString") or isinstance(
        p.get("contentAttachment"), Mapping)) for p in _list(comm.get("payload")))
    if not has_content:
        return ("a thread header, not a message" if not comm.get("partOf")
                else "the message has no payload to send")
    return None


def _already_sent(req: OutboundRequest, comm: Mapping[str, Any], comm_id: str,
                  deps: OutboundDeps) -> SendResult | None:
    """The earlier send of this Communication as recorded on it, if there was one.

    Only Switchboard's own sends count: a provider id recorded on the Communication together
    with the outbound-request identifier our send writes beside it. A provider id alone (an
    inbound message's, or one made up in a posted body) proves nothing. A send the provider
    took whose FHIR write did not happen (the worker died) is in the send ledger instead: the
    send gate answers it (one Redis step with the claim), and so do the failure paths below,
    before they would mark a sent message failed (_sent_before).
    """
    systems: dict[str, str] = {}
    for name, system in deps.id_systems.items():  # SMS and WhatsApp share Twilio's SIDs
        systems.setdefault(system, name)
    idents = [i for i in _list(comm.get("identifier")) if isinstance(i, Mapping)]
    if not any(i.get("system") == deps.request_system for i in idents):
        return None
    recorded = next((i for i in idents if i.get("system") in systems), None)
    if recorded is None:
        return None
    by_medium = medium_channel(comm)
    channel = by_medium if by_medium and deps.id_systems.get(by_medium) == recorded[
        "system"] else systems[recorded["system"]]
    done = {"provider_id": str(recorded.get("value")), "channel": channel,
            "message_id": ""}
    deps.state.update(req.request_id, "sent", communication=comm_id, **done)
    return SendResult(done["provider_id"], "sent", "")


def _sent_before(req: OutboundRequest, deps: OutboundDeps, comm: Mapping[str, Any],
                 comm_id: str) -> SendResult | None:
    """The send ledger's record of an earlier send (finished here), else None: asked before
    a failure is recorded, so a message that went out is never marked failed."""
    done = deps.ledger.done(comm_id)
    return None if done is None else _finish_earlier(req, deps, comm, comm_id, done)


def _finish_earlier(req: OutboundRequest, deps: OutboundDeps, comm: Mapping[str, Any],
                    comm_id: str, done: Mapping[str, str]) -> SendResult:
    """The provider took this message in an earlier run but the FHIR write did not happen
    (the worker died): finish that, and report the earlier send."""
    deps.state.update(req.request_id, "sent", communication=comm_id, **done)
    result = SendResult(done["provider_id"], "sent", done.get("message_id", ""))
    record_sent(deps, comm_id, done["channel"], result, [], req.request_id, comm)
    return result


def _header(comm: Mapping[str, Any], deps: OutboundDeps,
            context: Mapping[str, dict[str, Any]]) -> dict[str, Any] | None:
    for part in _list(comm.get("partOf")):
        thread = parse_reference(_reference(part), {"Communication"})
        return context.get(str(thread)) or deps.fhir.read(thread.type, thread.id).resource
    return None


def _recipient(comm: Mapping[str, Any], header: Mapping[str, Any] | None, deps: OutboundDeps,
               context: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    named = [_reference(r) for r in _list(comm.get("recipient"))]
    thread_patient = _reference((header or {}).get("subject"))
    if thread_patient.startswith("Patient/"):
        # A message in a patient's thread goes to that patient only: a recipient written by
        # the client naming another patient would text someone else this thread's words.
        own = str(parse_reference(thread_patient, {"Patient"}))
        others = [t for t in named if t.startswith("Patient/")
                  and str(parse_reference(t, {"Patient"})) != own]
        if others:
            raise PermanentError("recipient-not-in-thread",
                                 "a recipient Patient is not the thread's patient")
    refs = [*named, thread_patient, _reference(comm.get("subject"))]
    for text in refs:
        if text.startswith("Patient/"):
            patient = parse_reference(text, {"Patient"})
            return context.get(str(patient)) or deps.fhir.read(patient.type, patient.id).resource
    raise PermanentError("no-recipient", "no Patient among recipient, thread subject, subject")


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _reference(value: Any) -> str:
    """The `reference` of a Reference element, or "" when it has none (or is not one)."""
    text = value.get("reference") if isinstance(value, Mapping) else None
    return text if isinstance(text, str) else ""


def _reply_channel(header: Mapping[str, Any] | None, patient: Mapping[str, Any],
                   deps: OutboundDeps) -> str | None:
    if header is None:
        return None
    if deps.reply_source == "last-inbound":
        found = deps.fhir.search("Communication", [
            ("part-of", f"Communication/{header['id']}"),
            ("sender", f"Patient/{patient['id']}"),
            ("_sort", "-_lastUpdated"), ("_count", "1")])
        for entry in found.get("entry") or []:
            channel = medium_channel(entry.get("resource"))
            if channel:
                return channel
    return medium_channel(header)


def _email_thread(message: OutboundMessage, thread: _Thread, deps: OutboundDeps
                  ) -> OutboundMessage:
    """A reply in a thread the patient wrote by email answers their last email: In-Reply-To
    and References name its Message-ID and the subject is `Re: <topic>`, so their mail client
    shows one conversation (and their answer comes back into this thread)."""
    if thread.header is None or not thread.patient_id:
        return message
    last = _last_patient_email_id(thread.header, thread.patient_id, deps)
    if last is None:
        return message
    topic = str(((thread.header.get("topic") or {}).get("text")) or message.subject)
    return replace(message, in_reply_to=last, subject=reply_subject(topic))


def _last_patient_email_id(header: Mapping[str, Any], patient_id: str, deps: OutboundDeps
                           ) -> str | None:
    thread = parse_reference(f"Communication/{header.get('id')}", {"Communication"})
    patient = parse_reference(f"Patient/{patient_id}", {"Patient"})
    found = deps.fhir.search("Communication", [
        ("part-of", str(thread)), ("sender", str(patient)),
        ("_sort", "-_lastUpdated"), ("_count", "10")])
    for entry in found.get("entry") or []:
        for ident in _list((entry.get("resource") or {}).get("identifier")):
            if (isinstance(ident, Mapping) and ident.get("system") in (
                    EMAIL_INBOUND_MESSAGE_ID_SYSTEM, EMAIL_MESSAGE_ID_SYSTEM)
                    and _MESSAGE_ID.fullmatch(str(ident.get("value") or ""))):
                return str(ident["value"])
    return None


# An RFC 5322 msg-id as it may go into a header: angle brackets, no whitespace or controls
# (a value with a line break would let a stored identifier inject headers).
_MESSAGE_ID = re.compile(r"<[!-=?-~]{1,250}>")


def reply_subject(topic: str) -> str:
    """`Re: <topic>`, without stacking prefixes the topic already has (pure)."""
    bare = re.sub(r"^\s*((re|fwd?|aw|sv)\s*:\s*)+", "", clean_subject(topic),
                  flags=re.IGNORECASE).strip()
    return f"Re: {bare or DEFAULT_SUBJECT}"


def _record_failure(req: OutboundRequest, deps: OutboundDeps, comm_id: str, exc: SendError,
                    channel: str | None) -> None:
    _mark_failed(deps, comm_id, exc.kind, _describe(exc), exc.attempts)
    deps.state.update(req.request_id, "failed", communication=comm_id, error=exc.kind,
                      provider_code=exc.provider_code, channel=channel, detail=_describe(exc))


def _mark_failed(deps: OutboundDeps, comm_id: str, kind: str, text: str,
                 attempts: tuple[str, ...] = ()) -> None:
    """The Communication ends `stopped` with the reason (`unknown` when the send's outcome is
    unknown); a final status is never overwritten."""
    def change(c: dict[str, Any]) -> dict[str, Any] | None:
        if c.get("status") in ("completed", "stopped", "entered-in-error"):
            return None
        # "unknown" is FHIR's word for "we cannot say whether it happened".
        c["status"] = "unknown" if kind == "outcome-unknown" else "stopped"
        c["statusReason"] = {"coding": [{"system": SEND_ERROR_SYSTEM, "code": kind}],
                             "text": text}
        if attempts:  # the earlier channel's failure too (fallback)
            c["note"] = [*(c.get("note") or []), *({"text": a} for a in attempts)]
        return c

    guarded_update(deps.fhir, "Communication", comm_id, change)


def _describe(exc: SendError) -> str:
    code = f" {exc.provider_code}" if exc.provider_code else ""
    return f"{exc.kind}{code}: {exc.detail}" if exc.detail else f"{exc.kind}{code}"
