"""Outbound pipeline: a clinician's message (a child Communication) reaches the patient once.

Order of events for one send, and why:
1. load the Communication (creating it first when the caller sent the resource itself);
2. a Communication already carrying a provider id, or with a sent record in Redis, is done;
3. recipient Patient → channel (forced, else the thread's medium, else phone then email) →
   contact (Patient.telecom);
4. a locally recorded opt-out refuses the send without calling the provider;
5. the shared rate limit may defer the send (not a failure, no retry spent);
6. claim the send (Redis SET NX): a second worker, or a redelivery of this task, cannot send too;
7. call the provider; record its answer in Redis at once, then on the Communication (If-Match),
   then the task is acknowledged. A redelivery after step 7 finds the record and does not send.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.channels import Attachment, Channel, OutboundMessage, SendError, SendResult
from worker.coordination import OptOuts, RateLimiter, SendLedger
from worker.errors import Deferred, PermanentError, TransientError
from worker.fhir.client import FhirClient
from worker.fhir.resources import identifier, medium
from worker.fhir.update import guarded_update
from worker.outbound_state import OutboundState
from worker.routing import CHANNEL_TO_MEDIUM, choose_channel, medium_channel, pick_contact

log = logging.getLogger("switchboard.outbound")
SEND_ERROR_SYSTEM = "urn:switchboard:send-error"
# SMS failures that mean "this number cannot take texts": worth trying email instead.
FALLBACK_KINDS = frozenset({"invalid-recipient", "unreachable"})


@dataclass(frozen=True)
class OutboundRequest:
    """The payload of the `switchboard.outbound.send` task (see README)."""

    request_id: str
    communication_id: str | None = None
    resource: dict[str, Any] | None = None
    channel: str | None = None

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> OutboundRequest:
        """Validate the task payload; a bad one is a PermanentError (no retry can fix it)."""
        comm = payload.get("communication")
        resource = payload.get("resource")
        channel = payload.get("channel")
        if channel not in (None, "sms", "email"):
            raise PermanentError("invalid-payload", "channel must be sms or email")
        if isinstance(comm, str) and comm.startswith("Communication/"):
            comm = comm.split("/", 1)[1]
        if not comm and not isinstance(resource, dict):
            raise PermanentError("invalid-payload", "need communication or resource")
        return cls(str(payload.get("request_id") or uuid.uuid4()), comm or None,
                   resource if isinstance(resource, dict) else None, channel)


@dataclass
class OutboundDeps:
    """What a send needs (built once per worker process)."""

    fhir: FhirClient
    channels: dict[str, Channel]
    ledger: SendLedger
    optouts: OptOuts
    limiter: RateLimiter
    state: OutboundState
    rates: dict[str, float]
    id_systems: dict[str, str]  # channel → identifier system of its provider ids
    request_system: str
    reply_source: str  # "header" | "last-inbound"
    fallback: bool


def send_outbound(req: OutboundRequest, deps: OutboundDeps, task_id: str) -> SendResult:
    """Send one outbound message exactly once; raises TransientError / PermanentError /
    Deferred for the task base class to act on."""
    comm = _load(req, deps)
    comm_id = str(comm["id"])
    earlier = _already_sent(comm, comm_id, deps)
    if earlier is not None:
        deps.state.update(req.request_id, "sent", communication=comm_id, **earlier)
        return SendResult(earlier["provider_id"], "sent", earlier.get("message_id", ""))
    header = _header(comm, deps)
    patient = _recipient(comm, header, deps)
    telecoms = patient.get("telecom") or []
    channel = choose_channel(req.channel, _reply_channel(header, patient, deps), telecoms)
    try:
        if channel is None:
            raise SendError("invalid-recipient", "the patient has no phone or email")
        return _send(req, deps, comm, comm_id, channel, telecoms, task_id, attempts=[])
    except SendError as exc:
        if exc.retryable:
            deps.state.update(req.request_id, "queued", communication=comm_id,
                              last_error=exc.kind)
            raise TransientError(exc.kind, exc.detail, exc.retry_after) from None
        _record_failure(req, deps, comm_id, exc, channel)
        raise PermanentError(exc.kind, _describe(exc)) from None


def _send(req: OutboundRequest, deps: OutboundDeps, comm: Mapping[str, Any], comm_id: str,
          channel: str, telecoms: list[Any], task_id: str, attempts: list[str]) -> SendResult:
    impl = deps.channels.get(channel)
    if impl is None:
        raise SendError("misconfigured", f"channel {channel} is not configured")
    to = pick_contact(telecoms, channel)
    if to is None:
        raise SendError("invalid-recipient", f"the patient has no usable {channel} contact")
    if deps.optouts.has(channel, to):
        raise SendError("opted-out", "the patient opted out (recorded locally)")
    wait = deps.limiter.acquire(f"{channel}:{impl.sender_key()}", deps.rates[channel])
    if wait > 0:
        raise Deferred(wait, "rate-limited")
    holder = deps.ledger.claim(comm_id, task_id)
    if holder is not None:
        done = deps.ledger.done(comm_id)
        if done:
            return SendResult(done["provider_id"], "sent", done.get("message_id", ""))
        if holder == task_id:
            # An earlier delivery of this very task claimed the send and died before the
            # provider's answer was recorded: it may or may not have gone out. Sending again
            # could text the patient twice, so a person decides (dlq show / replay).
            raise PermanentError("send-outcome-unknown",
                                 "a worker died while the provider was answering")
        raise TransientError("send-in-progress", "another worker is sending this message")
    message = _message(comm, comm_id, to)
    try:
        result = impl.send(message)
    except SendError as exc:
        deps.ledger.release(comm_id)  # the provider refused: nothing went out
        if (not exc.retryable and deps.fallback and channel == "sms"
                and exc.kind in FALLBACK_KINDS and pick_contact(telecoms, "email")):
            log.warning("sms to Communication/%s failed (%s); falling back to email",
                        comm_id, exc.kind)
            return _send(req, deps, comm, comm_id, "email", telecoms, task_id,
                         [*attempts, f"sms failed: {_describe(exc)}"])
        if exc.kind == "opted-out":
            deps.optouts.add(channel, to)
        raise
    sent = {"provider_id": result.provider_id, "channel": channel,
            "message_id": result.message_id}
    deps.ledger.record(comm_id, sent)  # first: from here on a redelivery will not send again
    _record_sent(deps, comm_id, channel, result, attempts, req.request_id)
    deps.state.update(req.request_id, "sent", communication=comm_id, **sent)
    log.info("outbound Communication/%s sent by %s as %s", comm_id, channel, result.provider_id)
    return result


def _load(req: OutboundRequest, deps: OutboundDeps) -> dict[str, Any]:
    if req.communication_id:
        return deps.fhir.read("Communication", req.communication_id).resource
    assert req.resource is not None
    resource = dict(req.resource)
    resource["resourceType"] = "Communication"
    resource.setdefault("status", "in-progress")
    key = identifier(deps.request_system, req.request_id)
    resource["identifier"] = [*(resource.get("identifier") or []), key]
    # Keyed on the request id: a redelivered task finds the Communication it created.
    return deps.fhir.create(resource, if_none_exist=[
        ("identifier", f"{deps.request_system}|{req.request_id}")]).resource


def _already_sent(comm: Mapping[str, Any], comm_id: str, deps: OutboundDeps
                  ) -> dict[str, str] | None:
    done = deps.ledger.done(comm_id)
    systems = {v: k for k, v in deps.id_systems.items()}
    for ident in comm.get("identifier") or []:
        if ident.get("system") in systems:
            if done is None:
                done = {"provider_id": str(ident.get("value")),
                        "channel": systems[ident["system"]]}
            return done
    if done is not None:
        # The provider took it but the FHIR write did not happen (worker died): finish that.
        _record_sent(deps, comm_id, done["channel"],
                     SendResult(done["provider_id"], "sent", done.get("message_id", "")), [])
    return done


def _header(comm: Mapping[str, Any], deps: OutboundDeps) -> dict[str, Any] | None:
    for part in comm.get("partOf") or []:
        ref = str(part.get("reference", ""))
        if ref.startswith("Communication/"):
            return deps.fhir.read("Communication", ref.split("/", 1)[1]).resource
    return None


def _recipient(comm: Mapping[str, Any], header: Mapping[str, Any] | None, deps: OutboundDeps
               ) -> dict[str, Any]:
    refs = [r.get("reference", "") for r in comm.get("recipient") or []]
    refs += [(header or {}).get("subject", {}).get("reference", ""),
             (comm.get("subject") or {}).get("reference", "")]
    for ref in refs:
        if str(ref).startswith("Patient/"):
            return deps.fhir.read("Patient", str(ref).split("/", 1)[1]).resource
    raise PermanentError("no-recipient", "no Patient among recipient, thread subject, subject")


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


def _message(comm: Mapping[str, Any], comm_id: str, to: str) -> OutboundMessage:
    texts = [p["contentString"] for p in comm.get("payload") or [] if p.get("contentString")]
    media = tuple(Attachment(str(p["contentAttachment"].get("url")),
                             str(p["contentAttachment"].get("contentType") or ""))
                  for p in comm.get("payload") or []
                  if (p.get("contentAttachment") or {}).get("url"))
    topic = (comm.get("topic") or {}).get("text") or "Message from your care team"
    return OutboundMessage(communication_id=comm_id, to=to, body="\n\n".join(texts),
                           attachments=media, subject=str(topic))


def _record_sent(deps: OutboundDeps, comm_id: str, channel: str, result: SendResult,
                 attempts: list[str], request_id: str | None = None) -> None:
    system = deps.id_systems[channel]

    def change(c: dict[str, Any]) -> dict[str, Any] | None:
        idents = list(c.get("identifier") or [])
        if any(i.get("system") == system and i.get("value") == result.provider_id
               for i in idents):
            return None
        idents.append(identifier(system, result.provider_id))
        if result.message_id:
            idents.append(identifier("urn:ietf:rfc:5322", result.message_id))
        if request_id and not any(i.get("system") == deps.request_system for i in idents):
            # Links delivery callbacks back to the API request that asked for this send.
            idents.append(identifier(deps.request_system, request_id))
        c["identifier"] = idents
        c["medium"] = [medium(CHANNEL_TO_MEDIUM[channel])]
        c["sent"] = c.get("sent") or datetime.now(UTC).isoformat(timespec="milliseconds")
        if c.get("status") in (None, "preparation"):
            c["status"] = "in-progress"
        if attempts:
            c["note"] = [*(c.get("note") or []), *({"text": a} for a in attempts)]
        return c

    guarded_update(deps.fhir, "Communication", comm_id, change)


def _record_failure(req: OutboundRequest, deps: OutboundDeps, comm_id: str, exc: SendError,
                    channel: str | None) -> None:
    def change(c: dict[str, Any]) -> dict[str, Any] | None:
        if c.get("status") in ("completed", "stopped", "entered-in-error"):
            return None
        c["status"] = "stopped"
        c["statusReason"] = {"coding": [{"system": SEND_ERROR_SYSTEM, "code": exc.kind}],
                             "text": _describe(exc)}
        return c

    guarded_update(deps.fhir, "Communication", comm_id, change)
    deps.state.update(req.request_id, "failed", communication=comm_id, error=exc.kind,
                      provider_code=exc.provider_code, channel=channel, detail=_describe(exc))


def _describe(exc: SendError) -> str:
    code = f" {exc.provider_code}" if exc.provider_code else ""
    return f"{exc.kind}{code}: {exc.detail}" if exc.detail else f"{exc.kind}{code}"
