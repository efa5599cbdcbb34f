"""Thread matching: the three strategies that decide which thread an inbound message joins.

Each strategy writes the message (and, when needed, its thread header) and returns the ids.
Idempotency comes from the server: every write is a conditional create keyed on a deterministic
identifier, so a provider retry or a Celery redelivery finds what the first attempt wrote.
FHIR round trips per message (counted in tests): conversation 1 once the header exists (an email
that answers others: one search more, for a thread we sent into), new-thread 1, active-thread 2.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from worker.channels.phones import DEFAULT_REGION, search_variants
from worker.channels.sendgrid import EMAIL_MESSAGE_ID_SYSTEM
from worker.fhir.client import FhirResponse
from worker.fhir.outcome import FhirPermanentError
from worker.fhir.query import Params, conditional_reference, query_string, token
from worker.fhir.resources import IdentifierSystems, Resource, identifier, inbound_message
from worker.fhir.resources import thread_header as build_header
from worker.messages import InboundMessage

# Statuses of a header that no longer takes new messages.
CLOSED_STATUSES = "completed,entered-in-error,stopped,unknown"


class Fhir(Protocol):
    """The FHIR operations a strategy needs (worker.fhir.FhirClient provides them)."""

    def search(self, resource_type: str, params: Params) -> dict[str, Any]: ...
    def create(self, resource: Any, if_none_exist: Params | None = None) -> FhirResponse: ...
    def transaction(self, bundle: Any) -> dict[str, Any]: ...
    def create_binary(self, data: bytes, content_type: str) -> str: ...


class Held(Protocol):
    """A held lock (worker.stores.locks.HeldLock)."""

    def confirm(self) -> None: ...


LockFactory = Callable[[str], AbstractContextManager[Held]]


@dataclass(frozen=True)
class ThreadContext:
    """What a strategy needs besides the message: FHIR, identifier systems, the clinic."""

    fhir: Fhir
    systems: IdentifierSystems
    clinic: Resource
    lock: LockFactory  # serialises work per key across all workers (Redis lock)
    phone_region: str = DEFAULT_REGION  # PHONE_DEFAULT_REGION: how stored numbers read


@dataclass(frozen=True)
class Written:
    """Where a message landed."""

    communication_id: str
    thread_ref: str
    created: bool  # False when the message was already there (a redelivery)


def sender_search(msg: InboundMessage, phone_region: str = DEFAULT_REGION) -> tuple[str, str]:
    """The Patient search parameter and value that find the sender: `phone` with every
    spelling of the number that reads as it in `phone_region` (PHONE_DEFAULT_REGION), or
    `email` with the address as given and lower-cased."""
    if msg.channel == "email":
        given = msg.sender.strip()
        variants = dict.fromkeys([given, given.lower()])
        # A bare comma means OR in a search value (FHIR's escape is `\,`).
        return "email", ",".join(v.replace(",", chr(92) + ",") for v in variants)
    return "phone", ",".join(search_variants(msg.sender, phone_region))


def sender_reference(msg: InboundMessage, phone_region: str = DEFAULT_REGION) -> str:
    """Conditional reference to the patient who owns the sender's number or email address."""
    return conditional_reference("Patient", [sender_search(msg, phone_region)])


def _message_key(ctx: ThreadContext, msg: InboundMessage) -> list[tuple[str, str]]:
    return [("identifier", token(ctx.systems.message, msg.provider_message_id))]


def _create_message(ctx: ThreadContext, msg: InboundMessage, header_ref: str, patient_ref: str
                    ) -> Written:
    resource = inbound_message(msg, header_ref, patient_ref, ctx.systems, ctx.clinic)
    resp = ctx.fhir.create(resource, if_none_exist=_message_key(ctx, msg))
    parent = (resp.resource.get("partOf") or [{}])[0].get("reference", header_ref)
    return Written(str(resp.resource.get("id")), parent, resp.created)


def _header_and_message(ctx: ThreadContext, msg: InboundMessage, header_key: str,
                        extra_ids: list[Resource]) -> Written:
    """Header + message in one transaction; the header is keyed on `header_key` so a retry of
    this message finds the header it made (self-healing even without atomic transactions)."""
    patient_ref = sender_reference(msg, ctx.phone_region)
    header_url = "urn:uuid:" + _uuid_for(header_key)
    header = build_header(msg, patient_ref, [identifier(ctx.systems.thread, header_key),
                                             *extra_ids], ctx.clinic)
    message = inbound_message(msg, header_url, patient_ref, ctx.systems, ctx.clinic)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": header_url, "resource": header,
             "request": {"method": "POST", "url": "Communication",
                         "ifNoneExist": query_string(
                             [("identifier", token(ctx.systems.thread, header_key))])}},
            {"resource": message,
             "request": {"method": "POST", "url": "Communication",
                         "ifNoneExist": query_string(_message_key(ctx, msg))}},
        ],
    }
    result = ctx.fhir.transaction(bundle)
    entries = result.get("entry") or []
    header_id = _entry_id(entries[0]) if entries else ""
    msg_entry = entries[1] if len(entries) > 1 else {}
    created = str((msg_entry.get("response") or {}).get("status", "")).startswith("201")
    return Written(_entry_id(msg_entry), f"Communication/{header_id}", created)


def by_conversation(ctx: ThreadContext, msg: InboundMessage) -> Written:
    """Strategy `conversation`: the header carries the external conversation id.

    An email that answers one we sent joins that message's thread instead.

    The message's `partOf` is a conditional reference to that id; when the server says it matches
    nothing, the header is created (conditional create, never overwriting a header a clinician
    may have changed) and the message written again.
    """
    patient_ref = sender_reference(msg, ctx.phone_region)
    replied = _thread_we_sent_into(ctx, msg)
    if replied:
        return _create_message(ctx, msg, replied, patient_ref)
    conv = token(ctx.systems.conversation, msg.conversation_key())
    header_ref = conditional_reference("Communication", [("identifier", conv)])
    try:
        return _create_message(ctx, msg, header_ref, patient_ref)
    except FhirPermanentError as exc:
        missing = exc.unresolved_reference()
        if not (missing and missing.startswith("Communication?")):
            raise
    header = build_header(msg, patient_ref,
                          [identifier(ctx.systems.conversation, msg.conversation_key())],
                          ctx.clinic)
    ctx.fhir.create(header, if_none_exist=[("identifier", conv)])
    return _create_message(ctx, msg, header_ref, patient_ref)


def _thread_we_sent_into(ctx: ThreadContext, msg: InboundMessage) -> str | None:
    """The thread of the newest message we sent by email that `msg` answers (its In-Reply-To /
    References name the Message-ID recorded on that Communication), else None.

    Only a message we sent to this sender counts (its subject or a recipient is a Patient with
    the sender's address): someone else's reply (a forward, a shared mailbox) must not land in
    another patient's thread. One search, the Patients included.
    """
    if not msg.replies_to:
        return None
    found = ctx.fhir.search("Communication", [
        ("identifier", ",".join(token(EMAIL_MESSAGE_ID_SYSTEM, m) for m in msg.replies_to)),
        ("_include", "Communication:subject"),
        ("_include", "Communication:recipient"),
        ("_count", str(len(msg.replies_to))),
    ])
    entries = found.get("entry") or []
    sender = msg.sender.strip().lower()
    senders_patients = {
        f"Patient/{r.get('id')}" for r in (e.get("resource") or {} for e in entries)
        if r.get("resourceType") == "Patient" and any(
            t.get("system") == "email" and str(t.get("value") or "").strip().lower() == sender
            for t in r.get("telecom") or [])}
    best: tuple[int, str] | None = None
    for entry in entries:
        res = entry.get("resource") or {}
        if res.get("resourceType") != "Communication" or not res.get("id"):
            continue
        ids = [i.get("value") for i in res.get("identifier") or []
               if i.get("system") == EMAIL_MESSAGE_ID_SYSTEM]
        ranks = [msg.replies_to.index(v) for v in ids if v in msg.replies_to]
        people = {str(p.get("reference") or "") for p in [res.get("subject") or {},
                                                           *(res.get("recipient") or [])]}
        if not ranks or not people & senders_patients:
            continue
        parent = ((res.get("partOf") or [{}])[0].get("reference")
                  or f"Communication/{res['id']}")  # a header we sent into is its own thread
        if best is None or min(ranks) < best[0]:
            best = (min(ranks), str(parent))
    return best[1] if best else None


def by_active_thread(ctx: ThreadContext, msg: InboundMessage) -> Written:
    """Strategy `active-thread`: the patient's most recently updated open thread, or a new one.

    Search-then-create is racy across workers (two first messages would make two headers), so
    the whole decision runs under a per-number Redis lock.
    """
    param, variants = sender_search(msg, ctx.phone_region)
    with ctx.lock("active-thread:" + _digest(msg.sender)) as held:
        found = ctx.fhir.search("Communication", [
            ("part-of:missing", "true"),
            (f"subject:Patient.{param}", variants),
            ("status:not", CLOSED_STATUSES),
            ("_sort", "-_lastUpdated"),
            ("_count", "1"),
        ])
        headers = [e["resource"] for e in found.get("entry") or []
                   if (e.get("search") or {}).get("mode", "match") == "match"]
        held.confirm()  # the search result is only ours to act on while we hold the lock
        if headers:
            header = headers[0]
            patient_ref = header["subject"]["reference"]
            return _create_message(ctx, msg, f"Communication/{header['id']}", patient_ref)
        return _header_and_message(ctx, msg, "first:" + msg.provider_message_id, [])


def by_new_thread(ctx: ThreadContext, msg: InboundMessage) -> Written:
    """Strategy `new-thread`: every message opens its own thread (one transaction)."""
    return _header_and_message(ctx, msg, "msg:" + msg.provider_message_id, [])


STRATEGIES: dict[str, Callable[[ThreadContext, InboundMessage], Written]] = {
    "conversation": by_conversation,
    "active-thread": by_active_thread,
    "new-thread": by_new_thread,
}


def _entry_id(entry: dict[str, Any]) -> str:
    res = entry.get("resource") or {}
    if res.get("id"):
        return str(res["id"])
    location = str((entry.get("response") or {}).get("location", ""))
    parts = location.split("/_history")[0].split("/")
    return parts[-1] if parts else ""


def _digest(value: str) -> str:
    # Lock keys are visible to anyone with Redis access: never put a phone number in them.
    return hashlib.sha256(value.encode()).hexdigest()[:24]


def _uuid_for(key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, key))
