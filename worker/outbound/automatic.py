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
from collections.abc import Collection, Mapping
from typing import Any

from worker.fhir.outcome import FhirPermanentError
from worker.fhir.reference import InvalidReference, parse_reference, ref
from worker.ops.metrics import Metrics
from worker.outbound.pipeline import OutboundDeps, OutboundRequest, send_outbound

log = logging.getLogger("switchboard.outbound")

# The one status a reply to send has. `preparation` is a draft: a clinician's app that writes
# drafts moves them to in-progress with an update, which the create-only Subscription never
# sees, so such apps should call /v1/messages instead (docs/automatic-outbound.md).
SENDABLE_STATUS = "in-progress"
# At most this many Communications are taken from one notification Bundle.
MAX_COMMUNICATIONS = 50


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
                  request_system: str) -> str | None:
    """Why this Communication is not a clinician's reply for Switchboard to send now, as a
    metric label; None when it is one.

    A reply is a child message (`partOf` set), `in-progress`, not sent by a Patient, with text
    or an attachment, and no provider message id yet. A provider id without our outbound-request
    identifier is a message Switchboard wrote from an inbound SMS or email; with it, our own
    earlier send. Our request identifier alone means a `/v1/messages` request created it and
    is sending it itself (on the channel that request asked for).
    """
    if comm.get("resourceType") != "Communication":
        return "not-a-communication"
    if not _list(comm.get("partOf")):
        return "thread-header"
    if comm.get("status") != SENDABLE_STATUS:
        return "not-in-progress"
    sender = comm.get("sender")
    sender_ref = sender.get("reference") if isinstance(sender, Mapping) else None
    if isinstance(sender_ref, str) and _ref_type(sender_ref) == "Patient":
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
    return None


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


def on_notification(comm_id: str, deps: OutboundDeps, task_id: str,
                    metrics: Metrics | None = None) -> str:
    """Read the notified Communication from FHIR and send it if it is a reply; returns what
    happened (`sent`, or the reason it was ignored). Send failures raise as for any send."""
    try:
        comm = deps.fhir.read("Communication", comm_id).resource
        reason = ignore_reason(comm, deps.id_systems.values(), deps.request_system)
    except FhirPermanentError as exc:
        if exc.status not in (404, 410):
            raise
        reason = "deleted"  # gone since the notification was sent: nothing to send
    if reason is not None:
        ignored(reason, comm_id, metrics)
        return reason
    send_outbound(OutboundRequest(subscription_request_id(comm_id), comm_id), deps, task_id)
    return "sent"


def ignored(reason: str, subject: str, metrics: Metrics | None) -> None:
    """The debug line and the counter of a notification that leads to no send."""
    log.debug("subscription notification for %s ignored: %s", subject, reason)
    if metrics is not None:
        metrics.inc("switchboard_subscription_ignored", reason=reason)
