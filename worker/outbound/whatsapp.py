"""WhatsApp's 24-hour window for replies: hold, ask with the template, release, expire.

A free-form WhatsApp message reaches a patient only within 24 hours of their last message to
that sender. A reply outside it (by our record, or by Twilio's 63016, since our record can be
wrong) is held: the Communication goes `on-hold` (statusReason `outside-whatsapp-window`), the
API request says `held`, and the approved template (WHATSAPP_TEMPLATE_CONTENT_SID, variables
that are the same for every patient) asks the patient to write. Their next WhatsApp message
opens the window and releases the held replies, oldest first, each through the ordinary send
(claims and the ledger: never twice). Without a template the reply fails with
`outside-whatsapp-window`. A reply held longer than WHATSAPP_HOLD_HOURS fails with
`whatsapp-hold-expired` on its Communication (`stopped`) and its API request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from worker.channels import SendError
from worker.channels.phones import WHATSAPP
from worker.channels.whatsapp import CHANNEL, MEDIUM_CODE, WINDOW_SECONDS, TwilioWhatsApp
from worker.errors import TransientError
from worker.fhir.resources import SWITCHBOARD_MEDIUM
from worker.fhir.update import guarded_update
from worker.messages import InboundMessage, SendResult
from worker.outbound.sending import OutboundDeps, WhatsAppPolicy, count_send

log = logging.getLogger("switchboard.whatsapp")
OUTSIDE_WINDOW = "outside-whatsapp-window"
HOLD_EXPIRED = "whatsapp-hold-expired"
SEND_ERROR_SYSTEM = "urn:switchboard:send-error"
HELD = "held"  # the API request's status while its reply waits
# Where a send refused with 63016 keeps its MessageSid on the Communication: no longer a send
# of it (a release sends again), still findable by a late or repeated callback about it.
REFUSED_SID_SYSTEM = "urn:switchboard:whatsapp-refused-message"
FINAL = frozenset({"completed", "stopped", "entered-in-error", "not-done"})
# A held reply whose Communication is now one of these is not sent when the window opens.
WITHDRAWN = frozenset({"stopped", "entered-in-error", "not-done", "completed"})


def policy(deps: OutboundDeps) -> WhatsAppPolicy:
    """The deployment's WhatsApp policy (always built by the runtime)."""
    if deps.whatsapp is None:
        raise SendError("misconfigured", "no WhatsApp store configured")
    return deps.whatsapp


def window_open(deps: OutboundDeps, queue: str, patient_id: str, now: float | None = None
                ) -> bool:
    """Whether a free-form reply can reach the patient now: our record of their last
    WhatsApp message to this sender, else (Redis lost it, or it expired) the newest WhatsApp
    message FHIR holds from them, which then seeds the record again."""
    store = policy(deps).store
    now = time.time() if now is None else now
    last = store.last_inbound(queue)
    if last is not None:
        return now - last < WINDOW_SECONDS
    found = deps.fhir.search("Communication", [
        ("sender", f"Patient/{patient_id}"), ("medium", f"{SWITCHBOARD_MEDIUM}|{MEDIUM_CODE}"),
        ("_sort", "-sent"), ("_count", "1")])
    for entry in found.get("entry") or []:
        at = _epoch((entry.get("resource") or {}).get("sent"))
        if at is not None and now - at < WINDOW_SECONDS:
            store.opened(queue, at)
            return True
    return False


def _epoch(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def hold_reply(deps: OutboundDeps, impl: TwilioWhatsApp, comm_id: str, request_id: str,
               to: str, detail: str) -> SendResult:
    """Hold a reply the window keeps out (see the module's doc); raises SendError
    `outside-whatsapp-window` when no template is configured, TransientError when the
    template could not go out yet (the retry holds again, idempotently)."""
    wa = policy(deps)
    if not wa.template_sid:
        raise SendError(OUTSIDE_WINDOW, detail + "; no WHATSAPP_TEMPLATE_CONTENT_SID is "
                        "configured to ask the patient to write")
    queue = wa.store.queue(to, impl.sender_key())
    now = time.time()
    wa.store.hold(queue, comm_id, request_id, now)
    _mark(deps, comm_id, "on-hold", OUTSIDE_WINDOW,
          f"{detail}; held until the patient writes on WhatsApp")
    if wa.store.template_due(queue, wa.hold_seconds):
        try:
            sent = impl.send_template(to, wa.template_sid, wa.template_variables)
        except SendError as exc:
            wa.store.template_failed(queue)
            count_send(deps, CHANNEL, exc.kind)
            if exc.retryable:
                raise TransientError(exc.kind, "the WhatsApp template did not go out yet",
                                     exc.retry_after) from None
            # The reply stays held: the patient may still write, else it expires.
            log.warning("WhatsApp template for held Communication/%s refused: %s", comm_id,
                        exc.kind)
        else:
            count_send(deps, CHANNEL, "template")
            log.info("WhatsApp template sent as %s for held Communication/%s", sent.provider_id,
                     comm_id)
    # Last: a caller told `held` finds the template asked already.
    deps.state.update(request_id, HELD, communication=comm_id, channel=CHANNEL,
                      held_until=round(now + wa.hold_seconds, 3))
    log.info("outbound Communication/%s held for the WhatsApp window", comm_id)
    return SendResult("", HELD)


def _mark(deps: OutboundDeps, comm_id: str, status: str, code: str, text: str,
          refused: tuple[str, str] | None = None) -> None:
    def change(c: dict[str, Any]) -> dict[str, Any] | None:
        if c.get("status") in FINAL:
            return None
        if refused is not None:
            system, value = refused
            idents = list(c.get("identifier") or [])
            if {"system": system, "value": value} in idents:
                c["identifier"] = [{"system": REFUSED_SID_SYSTEM, "value": value}
                                   if i == {"system": system, "value": value} else i
                                   for i in idents]
                c["note"] = [*(c.get("note") or []), {"text": f"WhatsApp message {value} was "
                                                      "refused outside the 24-hour window "
                                                      "(Twilio 63016)"}]
        c["status"] = status
        c["statusReason"] = {"coding": [{"system": SEND_ERROR_SYSTEM, "code": code}],
                             "text": text}
        return c

    guarded_update(deps.fhir, "Communication", comm_id, change)


def refused_outside_window(deps: OutboundDeps, comm_id: str, request_id: str | None,
                           params: Mapping[str, str], sid_system: str) -> str:
    """Twilio's status callback failed a WhatsApp send with 63016 (the window we tracked was
    wrong): forget that send, and hold the reply as if we had known ("held"), or fail it
    without a template. Returns what happened."""
    from worker.channels.phones import InvalidPhoneNumber, to_e164

    impl = deps.channels.get(CHANNEL)
    if not isinstance(impl, TwilioWhatsApp) or not request_id:
        return "ignored"
    try:
        to = to_e164(str(params.get("To") or ""), deps.phone_region)
    except InvalidPhoneNumber:
        return "ignored"
    wa = policy(deps)
    wa.store.close(wa.store.queue(to, impl.sender_key()))
    why = "Twilio 63016: outside the WhatsApp 24-hour window"
    if not wa.template_sid:  # the reply fails, said so
        detail = why + "; no WHATSAPP_TEMPLATE_CONTENT_SID is configured"
        _mark(deps, comm_id, "stopped", OUTSIDE_WINDOW, detail)
        deps.state.update(request_id, "failed", communication=comm_id, error=OUTSIDE_WINDOW,
                          provider_code=63016, channel=CHANNEL, detail=detail)
        return "failed"
    # In this order, each step repeatable: the refused send stops being a send of it (on the
    # Communication, then in the ledger) before the reply is held, so a release, which may
    # start as soon as it is held, sends it again. A redelivered callback finds the SID under
    # REFUSED_SID_SYSTEM and comes back here (apply_status).
    _mark(deps, comm_id, "on-hold", OUTSIDE_WINDOW, why + "; held until the patient writes on "
          "WhatsApp", (sid_system, str(params.get("MessageSid") or "")))
    deps.ledger.undo(comm_id)
    hold_reply(deps, impl, comm_id, request_id, to, why)
    return HELD


def expire_held(deps: OutboundDeps, now: float | None = None) -> int:
    """Fail every reply held longer than WHATSAPP_HOLD_HOURS (`whatsapp-hold-expired`); one a
    release is sending right now (a claim) or has sent is left to it. Returns how many."""
    wa = policy(deps)
    now = time.time() if now is None else now
    expired = 0
    for comm_id in wa.store.held_before(now - wa.hold_seconds):
        reply = wa.store.get(comm_id)
        if deps.ledger.done(comm_id) is not None:
            wa.store.release(comm_id)
            continue
        if deps.ledger.claimed(comm_id):
            continue
        text = (f"held {wa.hold_seconds / 3600:g} hours for the patient's WhatsApp answer, "
                "which did not come")
        _mark(deps, comm_id, "stopped", HOLD_EXPIRED, text)
        if reply is not None:
            deps.state.update(reply.request_id, "failed", communication=comm_id,
                              error=HOLD_EXPIRED, channel=CHANNEL, detail=text)
        wa.store.release(comm_id)
        expired += 1
        log.warning("held WhatsApp reply Communication/%s expired", comm_id)
    return expired


def release_held(deps: OutboundDeps, queue: str, task_id: str,
                 send: Any, rate_slot: float | None = None) -> dict[str, int]:
    """Send the replies held for one (patient, sender), oldest first, now that the patient
    wrote: each through the ordinary send (`send` is worker.outbound.pipeline.send_outbound),
    so its claim and the ledger keep it from going out twice. A reply that cannot go yet
    (another worker is on it, a rate wait, a transient failure) stops the release there: the
    task is retried and the order kept. One that fails for good is released as failed; one
    the clinic withdrew meanwhile (its Communication `stopped`, `entered-in-error`…) is
    released unsent (`withdrawn`)."""
    from worker.errors import PermanentError
    from worker.outbound.sending import OutboundRequest

    wa = policy(deps)
    counts = {"sent": 0, "failed": 0, "held": 0, "withdrawn": 0}
    for comm_id in wa.store.held(queue):
        reply = wa.store.get(comm_id)
        if reply is None:
            wa.store.release(comm_id)
            continue
        status = str(deps.fhir.read("Communication", comm_id).resource.get("status") or "")
        if status in WITHDRAWN:
            # The clinic withdrew it while it waited (or it ended otherwise): not sent.
            wa.store.release(comm_id)
            deps.state.update(reply.request_id, "failed", communication=comm_id,
                              error="withdrawn", channel=CHANNEL,
                              detail=f"the Communication became {status} while held")
            counts["withdrawn"] += 1
            continue
        req = OutboundRequest(reply.request_id, comm_id, channel=CHANNEL, rate_slot=rate_slot)
        rate_slot = None  # a reserved slot is the first reply's
        try:
            result = send(req, deps, task_id)
        except PermanentError:
            wa.store.release(comm_id)  # failed and marked so by the send itself
            counts["failed"] += 1
            continue
        if result.status == HELD:  # the window closed again meanwhile: wait for the next
            counts["held"] += 1
            break
        wa.store.release(comm_id)
        counts["sent"] += 1
    return counts


def window_opened(deps: OutboundDeps, msg: InboundMessage, service_sid: str = "") -> str | None:
    """The patient wrote on WhatsApp (a message now in FHIR): their window with our sender
    runs 24 hours from when it arrived. Returns the held-reply queue to release, if any.

    A message to another of the account's WhatsApp numbers opens nothing of ours; with a
    Messaging Service as the sender, one to a number of that service counts (Twilio names the
    service in the webhook; without the name it is taken as ours).
    """
    impl = deps.channels.get(CHANNEL)
    if not isinstance(impl, TwilioWhatsApp) or deps.whatsapp is None:
        return None
    sender = impl.sender_key()
    if sender.lower().startswith(WHATSAPP):
        ours = sender[len(WHATSAPP):] == msg.clinic_address
    else:
        ours = service_sid in ("", sender)
    at = _epoch(msg.received_at)
    if not ours or at is None:
        return None
    store = deps.whatsapp.store
    queue = store.queue(msg.sender, sender)
    store.opened(queue, at)
    return queue if store.held(queue) else None
