"""Automatic outbound: a clinician's reply written straight into FHIR goes out with no glue code.

A FHIR Subscription (installed by `switchboard subscription install`) makes the server POST
every newly created child Communication to `/webhooks/fhir/subscription`. The receiver checks
the signature, takes only the Communication ids out of the notification and queues them. The
worker then reads each Communication from FHIR by id (the notification may be stale, replayed
or forged by whoever holds the secret: its body is never taken as the message), decides with
`ignore_reason` whether it is a reply to send, and hands it to the one outbound pipeline. That
pipeline's send ledger is keyed on the Communication id, so a delivery repeated by the server,
and the same Communication also posted to `/v1/messages`, still make one send.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from worker.errors import Deferred, PermanentError
from worker.fhir.outcome import FhirPermanentError
from worker.fhir.reference import InvalidReference, parse_reference, ref
from worker.ops.metrics import Metrics
from worker.outbound.pipeline import send_outbound
from worker.outbound.sending import OutboundDeps, OutboundRequest

log = logging.getLogger("switchboard.outbound")

# The one status a reply to send has. `preparation` is a draft: a clinician's app that writes
# drafts moves them to in-progress with an update, which the create-only Subscription never
# sees, so such apps should call /v1/messages instead (docs/automatic-outbound.md).
SENDABLE_STATUS = "in-progress"
# Authors (Medplum's meta.author) whose messages are the clinic's; ClientApplications only
# when configured (AUTOMATIC_OUTBOUND_CLIENTS): client credentials are also what apps hold.
CLINIC_AUTHORS = frozenset({"Practitioner", "PractitionerRole", "Organization"})
# Senders on the patient's side: their messages are never sent back out.
PATIENT_SIDE = frozenset({"Patient", "RelatedPerson"})
# Medplum leaves meta.author out of what it returns unless the request asks for this.
EXTENDED = {"X-Medplum": "extended"}
# At most this many Communications are taken from one notification Bundle.
MAX_COMMUNICATIONS = 50
# Replies in one thread go out in the order written: a reply waits for the earlier ones still
# to be sent, unless they were written more than this long ago (sent, failed or dead-lettered
# by then, or written before Switchboard was installed: never waited for).
ORDER_WINDOW_SECONDS = 600.0
ORDER_WAIT_MIN = 0.5
ORDER_WAIT_MAX = 60.0
# The newest messages of a thread looked at for earlier replies (a burst is a handful).
ORDER_SEARCH_COUNT = 50


class BadNotification(ValueError):
    """A notification body we cannot take: `reason` is a short slug for the 4xx answer."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def signature_valid(secret: bytes, body: bytes, given: str | None) -> bool:
    """True when `given` is the hex HMAC-SHA256 of the exact `body` under `secret` (Medplum's
    X-Signature), compared in constant time. An empty secret verifies nothing."""
    if not secret or not given:
        return False
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
    return hmac.compare_digest(expected, given.strip().lower().encode("utf-8", "replace"))


def notified_ids(body: Any) -> list[str]:
    """The ids of the Communications a notification names, in order, without repeats.

    Medplum posts the bare resource; other servers and topic-based subscriptions post a Bundle,
    whose entries are scanned (the Communication is not at a fixed index: a SubscriptionStatus
    or Parameters entry may come first, and id-only payloads carry just a `fullUrl`). A Bundle
    that names no Communication (a handshake or heartbeat) gives []. Raises BadNotification.
    """
    if not isinstance(body, Mapping) or not isinstance(body.get("resourceType"), str):
        raise BadNotification("invalid-body", "expected a FHIR resource (JSON object)")
    kind = body["resourceType"]
    if kind == "Communication":
        return [_comm_id(body.get("id"))]
    if kind != "Bundle":
        raise BadNotification("not-a-communication",
                              "the notification is neither a Communication nor a Bundle")
    entries = body.get("entry", [])
    if not isinstance(entries, list):
        raise BadNotification("invalid-body", "Bundle.entry must be a list")
    found: list[str] = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise BadNotification("invalid-body", "every Bundle.entry must be an object")
        for comm_id in _entry_ids(entry):
            if comm_id not in found:
                found.append(comm_id)
        if len(found) > MAX_COMMUNICATIONS:
            raise BadNotification("too-many", f"more than {MAX_COMMUNICATIONS} Communications")
    return found


def _entry_ids(entry: Mapping[str, Any]) -> list[str]:
    resource = entry.get("resource")
    if isinstance(resource, Mapping):
        kind = resource.get("resourceType")
        if kind == "Communication":
            return [_comm_id(resource.get("id"))]
        if kind in ("SubscriptionStatus", "Parameters"):
            return _focus_ids(resource)
        return []
    # An id-only entry: `fullUrl` is `<base>/Communication/<id>` (maybe with `/_history/<v>`).
    url = entry.get("fullUrl")
    if isinstance(url, str) and "/Communication/" in url:
        tail = url.split("/Communication/", 1)[1].split("/_history/", 1)[0]
        return [_comm_id(tail)]
    return []


def _focus_ids(resource: Mapping[str, Any]) -> list[str]:
    """Communication focus references of a topic-based notification's status resource (R4B/R5
    SubscriptionStatus.notificationEvent.focus, or the R4 backport's Parameters form)."""
    refs: list[Any] = []
    for event in _list(resource.get("notificationEvent")):
        if isinstance(event, Mapping) and isinstance(event.get("focus"), Mapping):
            refs.append(event["focus"].get("reference"))
    for param in _list(resource.get("parameter")):
        if not isinstance(param, Mapping) or param.get("name") != "notification-event":
            continue
        for part in _list(param.get("part")):
            if isinstance(part, Mapping) and part.get("name") == "focus" and \
                    isinstance(part.get("valueReference"), Mapping):
                refs.append(part["valueReference"].get("reference"))
    ids = []
    for text in refs:
        if isinstance(text, str) and text.startswith("Communication/"):
            ids.append(_comm_id(text.split("/", 1)[1]))
    return ids


def _comm_id(value: Any) -> str:
    try:
        return ref("Communication", value).id
    except InvalidReference:
        raise BadNotification("invalid-id", "a Communication id is not a FHIR id") from None


def ignore_reason(comm: Mapping[str, Any], provider_systems: Collection[str],
                  request_system: str, clinic_clients: Collection[str] = ()) -> str | None:
    """Why this Communication is not a clinician's reply for Switchboard to send now, as a
    metric label; None when it is one (pure; the rule: docs/automatic-outbound.md).

    A reply is a child message (`partOf` set), `in-progress`, with text or an attachment and
    no provider message id yet, that our side wrote and that is addressed to a patient:
    - a provider id without our outbound-request identifier is a message Switchboard wrote from
      an inbound SMS or email; with it, our own earlier send. Our request identifier alone
      means a `/v1/messages` request created it and is sending it itself;
    - `meta.author` (set by the FHIR server from the login, not by the client) must be a clinic
      identity: a Practitioner, PractitionerRole or Organization, or one of `clinic_clients`
      (ClientApplication ids). `sender` and `recipient` are written by the client, so they
      alone prove nothing: a patient app could name anyone;
    - it names a sender, not a Patient (nor a RelatedPerson);
    - a Patient is among its recipients: one addressed only to clinicians is an internal note.
      (That this patient is the thread's is checked where the thread is read: the pipeline.)
    """
    if comm.get("resourceType") != "Communication":
        return "not-a-communication"
    if not _list(comm.get("partOf")):
        return "thread-header"
    if comm.get("status") != SENDABLE_STATUS:
        return "not-in-progress"
    sender = comm.get("sender")
    sender_ref = sender.get("reference") if isinstance(sender, Mapping) else None
    if isinstance(sender_ref, str) and _ref_type(sender_ref) in PATIENT_SIDE:
        return "from-patient"
    systems = {i.get("system") for i in _list(comm.get("identifier")) if isinstance(i, Mapping)}
    ours = request_system in systems
    if systems & set(provider_systems):
        return "already-sent" if ours else "inbound-message"
    if ours:
        return "api-request"
    has_content = any(isinstance(p, Mapping) and (
        p.get("contentString") or isinstance(p.get("contentAttachment"), Mapping))
        for p in _list(comm.get("payload")))
    if not has_content:
        return "no-content"
    if not clinic_authored(comm, clinic_clients):
        return "not-clinic-author"
    if not isinstance(sender, Mapping) or not sender:
        return "no-sender"
    recipients = [r.get("reference") for r in _list(comm.get("recipient"))
                  if isinstance(r, Mapping)]
    if not any(isinstance(r, str) and _ref_type(r) == "Patient" for r in recipients):
        return "internal-note"
    return None


def clinic_authored(comm: Mapping[str, Any], clinic_clients: Collection[str]) -> bool:
    """True when the server recorded a clinic identity as this version's author (pure)."""
    meta = comm.get("meta")
    author = meta.get("author") if isinstance(meta, Mapping) else None
    text = author.get("reference") if isinstance(author, Mapping) else None
    if not isinstance(text, str):
        return False
    try:
        found = parse_reference(text)
    except InvalidReference:
        return False
    if found.type in CLINIC_AUTHORS:
        return True
    return found.type == "ClientApplication" and found.id in clinic_clients


def _ref_type(text: str) -> str:
    # `Patient/1`, and also a conditional or absolute one (`Patient?…`, `https://…/Patient/1`):
    # anything naming a Patient is the patient's own message.
    try:
        return parse_reference(text).type
    except InvalidReference:
        head = text.split("?", 1)[0].rstrip("/").split("/")
        return head[-2] if len(head) >= 2 else head[0]


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def subscription_request_id(comm_id: str) -> str:
    """The outbound request id of a Subscription-triggered send: one per Communication, so
    every delivery of the same message shares one request state (and one identifier on it)."""
    return "sub-" + hashlib.sha256(comm_id.encode()).hexdigest()[:40]


def subscription_request(payload: Any) -> OutboundRequest:
    """The send request of one `switchboard.outbound.subscription` task, validated as the
    outbound task's payload is (a bad one is a PermanentError).

    The receiver queues the Communication id only; a run that had to wait for its send slot
    re-queues the task with that slot (`rate_slot`), the channel it chose and any failed
    attempts (worker/broker/retry.py merges a Deferred's changes into the payload). The next
    run must send at that reserved slot: taking a fresh one each time put the clinic's number
    deeper into debt on every run, and the message, and every reply behind it, never went out.
    A `resource` or `request_id` in the payload is not taken: this path sends only what FHIR
    holds, under the one request id of that Communication.
    """
    if not isinstance(payload, Mapping):
        raise PermanentError("invalid-payload", "the payload must be an object")
    if not isinstance(payload.get("communication"), str):
        raise PermanentError("invalid-payload", "communication must be a string")
    taken = {k: payload[k] for k in ("communication", "channel", "attempts", "rate_slot")
             if k in payload}
    req = OutboundRequest.from_payload(taken)
    assert req.communication_id is not None  # a string `communication` was parsed
    return replace(req, request_id=subscription_request_id(req.communication_id))


def on_notification(req: OutboundRequest, deps: OutboundDeps, task_id: str,
                    metrics: Metrics | None = None, clinic_clients: Collection[str] = ()
                    ) -> str:
    """Read the notified Communication from FHIR and send it if it is a reply; returns what
    happened (`sent`, or the reason it was ignored). Send failures raise as for any send."""
    comm_id = str(req.communication_id)
    try:
        comm = deps.fhir.read("Communication", comm_id, headers=EXTENDED).resource
        reason = ignore_reason(comm, deps.id_systems.values(), deps.request_system,
                               clinic_clients)
    except FhirPermanentError as exc:
        if exc.status not in (404, 410):
            raise
        reason = "deleted"  # gone since the notification was sent: nothing to send
    if reason is not None:
        ignored(reason, comm_id, metrics)
        return reason
    if req.rate_slot is None:
        # Not yet in line for a send slot: the replies written before it in its thread go
        # first (concurrent runs would otherwise take slots in whatever order they got here).
        now = time.time()
        ahead = [i for i in earlier_replies(comm, _thread_messages(comm, deps), now,
                                            deps.id_systems.values(), deps.request_system,
                                            clinic_clients)
                 if deps.ledger.done(i) is None]
        if ahead:
            raise Deferred(order_wait(comm, now), "thread-order")
    result = send_outbound(req, deps, task_id)
    # A WhatsApp reply outside the 24-hour window waits for the patient (outbound/whatsapp.py).
    return "held" if result.status == "held" else "sent"


def _thread_messages(comm: Mapping[str, Any], deps: OutboundDeps) -> list[dict[str, Any]]:
    """The newest messages of this reply's thread that may still be waiting to go out."""
    thread = _thread_ref(comm)
    if thread is None:
        return []
    found = deps.fhir.search("Communication", [
        ("part-of", thread), ("status", SENDABLE_STATUS), ("_sort", "-_lastUpdated"),
        ("_count", str(ORDER_SEARCH_COUNT))], headers=EXTENDED)
    return [e["resource"] for e in _list(found.get("entry"))
            if isinstance(e, Mapping) and isinstance(e.get("resource"), dict)]


def _thread_ref(comm: Mapping[str, Any]) -> str | None:
    for part in _list(comm.get("partOf")):
        text = part.get("reference") if isinstance(part, Mapping) else None
        try:
            return str(parse_reference(str(text), {"Communication"}))
        except InvalidReference:
            return None
    return None


def earlier_replies(comm: Mapping[str, Any], thread: Sequence[Mapping[str, Any]], now: float,
                    provider_systems: Collection[str], request_system: str,
                    clinic_clients: Collection[str] = ()) -> list[str]:
    """The ids of the replies in `thread` written before `comm` (by meta.lastUpdated, then
    id) that are still to be sent, so `comm` waits for them: replies go out in the order
    they were written. One written more than ORDER_WINDOW_SECONDS ago is not waited for (it
    failed somewhere else, or predates Switchboard), nor is one that is not a reply to send
    (pure)."""
    mine = _written(comm)
    if mine is None:
        return []
    ahead = []
    for other in thread:
        if other.get("id") == comm.get("id") or not isinstance(other.get("id"), str):
            continue
        written = _written(other)
        if written is None or written >= mine or now - written[0] > ORDER_WINDOW_SECONDS:
            continue
        if ignore_reason(other, provider_systems, request_system, clinic_clients) is None:
            ahead.append(other["id"])
    return ahead


def order_wait(comm: Mapping[str, Any], now: float) -> float:
    """How long a reply waiting for earlier ones waits before looking again: a quarter of
    its age, within [ORDER_WAIT_MIN, ORDER_WAIT_MAX], so a short burst moves at the send pace
    while a reply held up for minutes looks only a few dozen times in all."""
    written = _written(comm)
    age = now - written[0] if written else 0.0
    return min(max(age / 4, ORDER_WAIT_MIN), ORDER_WAIT_MAX)


def _written(comm: Mapping[str, Any]) -> tuple[float, str] | None:
    """When a message was last written (epoch seconds) and its id, or None if unknown."""
    meta = comm.get("meta")
    stamp = meta.get("lastUpdated") if isinstance(meta, Mapping) else None
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp(), str(comm.get("id"))


def ignored(reason: str, subject: str, metrics: Metrics | None) -> None:
    """The debug line and the counter of a notification that leads to no send."""
    log.debug("subscription notification for %s ignored: %s", subject, reason)
    if metrics is not None:
        metrics.inc("switchboard_subscription_ignored", reason=reason)
