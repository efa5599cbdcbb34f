"""Celery tasks: decode, call a plain function, translate the outcome. Nothing else."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from celery import shared_task

from worker.broker.celery_app import (
    QUEUE_OUTBOUND,
    REDACTED_ARGS,
    TASK_CONVERSATIONS_DELIVERY,
    TASK_DEVICE_UPDATE,
    TASK_INBOUND_CONVERSATIONS,
    TASK_INBOUND_EMAIL,
    TASK_INBOUND_SMS,
    TASK_INBOX_SWEEP,
    TASK_OUTBOUND_SEND,
    TASK_RECONCILE,
    TASK_SENDGRID_EVENTS,
    TASK_SUBSCRIPTION_NOTIFIED,
    TASK_TWILIO_STATUS,
    TASK_WHATSAPP_EXPIRE,
    TASK_WHATSAPP_RELEASE,
)
from worker.broker.retry import SwitchboardTask
from worker.channels import twilio, whatsapp
from worker.channels.registry import conversations_client
from worker.channels.sendgrid import EMAIL_INBOUND_KEY_SYSTEM
from worker.channels.sendgrid_inbound import clinic_mailbox
from worker.channels.twilio import TwilioSms
from worker.channels.twilio_conversations import (
    MESSAGE_SYSTEM,
    TwilioConversations,
    delivery_status,
)
from worker.errors import PermanentError
from worker.fhir.resources import clinic_participant
from worker.inbound.conversations import STRATEGY as CONVERSATION_STRATEGY
from worker.inbound.conversations import conversation_systems, read_message_added
from worker.inbound.email import admit_sender, deliver_email, stored_email
from worker.inbound.pipeline import apply_opt_keyword, deliver_inbound
from worker.inbound.threads import ThreadContext
from worker.outbound.automatic import on_notification, subscription_request
from worker.outbound.pipeline import send_outbound
from worker.outbound.push import apply_device_change
from worker.outbound.reconcile import reconcile_stuck
from worker.outbound.sending import OutboundRequest
from worker.outbound.status import OutsideWindow, apply_email_events, apply_status
from worker.outbound.whatsapp import (
    expire_held,
    refused_outside_window,
    release_held,
    window_opened,
)
from worker.runtime import Runtime, get_runtime
from worker.stores.email_posts import EmailPosts
from worker.stores.inbox import HEADER as INBOX_HEADER

log = logging.getLogger("switchboard.inbound")
# Dead-letter reasons of an email refused for who sent it (worker/stores/email_posts.py).
REFUSED_SENDER = frozenset({"unknown-sender", "ambiguous-sender", "unauthenticated-sender",
                            "invalid-sender"})


@shared_task(bind=True, base=SwitchboardTask, name=TASK_INBOUND_SMS)
def inbound_sms(self: SwitchboardTask, params: dict[str, str], meta: dict[str, Any]
                ) -> dict[str, Any]:
    """Write one Twilio incoming SMS/MMS (the webhook's full param dict) to FHIR."""
    rt = get_runtime()
    msg = twilio.parse_inbound(params, received_at=str(meta["received_at"]),
                               region=rt.settings.phone_default_region)
    ctx = ThreadContext(rt.fhir, rt.systems,
                        clinic_participant(msg, rt.systems, rt.settings.clinic_reference),
                        rt.locks.hold, phone_region=rt.settings.phone_default_region)
    outcome = deliver_inbound(msg, ctx, rt.settings.sms_thread_strategy,
                              rt.settings.unknown_sender_policy, rt.seen)
    opted = apply_opt_keyword(msg, rt.outbound.optouts)
    if opted:
        log.info("%s recorded for the sender of %s", opted, msg.provider_message_id)
    if msg.channel == whatsapp.CHANNEL:
        queue = window_opened(rt.outbound, msg, params.get("MessagingServiceSid", ""))
        if queue is not None:
            # Held replies go out now, oldest first, in one task (worker/outbound/whatsapp.py).
            self.app.send_task(TASK_WHATSAPP_RELEASE, args=[{"queue": queue}],
                               queue=QUEUE_OUTBOUND, **REDACTED_ARGS)
    log.info("inbound %s: %s Communication/%s in %s", msg.provider_message_id, outcome.result,
             outcome.communication_id, outcome.thread_ref)
    return {"communication": outcome.communication_id, "thread": outcome.thread_ref,
            "result": outcome.result}


@shared_task(bind=True, base=SwitchboardTask, name=TASK_INBOUND_CONVERSATIONS)
def inbound_conversations(self: SwitchboardTask, params: dict[str, str], meta: dict[str, Any]
                          ) -> dict[str, Any]:
    """Write one Twilio Conversations onMessageAdded (the webhook's param dict) to FHIR."""
    rt = get_runtime()
    s = rt.settings
    channel = rt.outbound.channels.get("conversations")
    if not isinstance(channel, TwilioConversations):  # no identity: reads only, built here
        channel = conversations_client(s)
    read = read_message_added(params, str(meta["received_at"]), s.twilio_conversations_identity,
                              channel, s.phone_default_region)
    if isinstance(read, str):
        log.info("conversations %s: skipped (%s)", params.get("MessageSid", "?"), read)
        return {"communication": None, "thread": None, "result": read}
    systems = conversation_systems(rt.systems)
    ctx = ThreadContext(rt.fhir, systems, clinic_participant(read, systems, s.clinic_reference),
                        rt.locks.hold, phone_region=s.phone_default_region)
    outcome = deliver_inbound(read, ctx, CONVERSATION_STRATEGY, s.unknown_sender_policy, rt.seen)
    log.info("conversations %s: %s Communication/%s in %s", read.provider_message_id,
             outcome.result, outcome.communication_id, outcome.thread_ref)
    return {"communication": outcome.communication_id, "thread": outcome.thread_ref,
            "result": outcome.result}


@shared_task(bind=True, base=SwitchboardTask, name=TASK_CONVERSATIONS_DELIVERY)
def conversations_delivery(self: SwitchboardTask, params: dict[str, str]) -> dict[str, Any]:
    """Apply one Conversations onDeliveryUpdated receipt to the reply it is about."""
    rt = get_runtime()
    applied = apply_status(rt.fhir, MESSAGE_SYSTEM, delivery_status(params), rt.outbound.state,
                           rt.settings.outbound_request_system)
    log.info("conversations delivery %s: %s", params.get("MessageSid", "?"), applied)
    return {"result": applied}


@shared_task(bind=True, base=SwitchboardTask, name=TASK_INBOUND_EMAIL)
def inbound_email(self: SwitchboardTask, record: dict[str, Any], meta: dict[str, Any]
                  ) -> dict[str, Any]:
    """Write one inbound email to FHIR: the post the receiver stored ({"email_ref",
    "content_type"}), or an email record enqueued before the parse moved here."""
    rt = get_runtime()
    s = rt.settings
    systems = replace(rt.systems, message=EMAIL_INBOUND_KEY_SYSTEM,
                      conversation=s.email_conversation_id_system)

    def context(record: Mapping[str, Any]) -> ThreadContext:
        clinic = ({"reference": s.clinic_reference} if s.clinic_reference else
                  {"identifier": {"system": s.clinic_number_system,
                                  "value": clinic_mailbox(record)},
                   "display": "Clinic mailbox"})
        return ThreadContext(rt.fhir, systems, clinic, rt.locks.hold)

    admitted = False

    def admit(sender: Mapping[str, Any]) -> None:
        nonlocal admitted
        admit_sender(sender, context(sender), s.unknown_sender_policy,
                     s.email_require_sender_auth)
        admitted = True

    posts, ref = None, str(record.get("email_ref") or "")
    try:
        if "from" not in record:  # the receiver stored the post: read it within bounds, the
            # whole email only once its sender is admitted (a stranger's costs milliseconds)
            posts = EmailPosts.from_settings(rt.redis, s)
            loaded = stored_email(posts, ref, str(record.get("content_type") or ""),
                                  s.email_max_bytes, admit)
            if loaded is None:  # a redelivery of a task that finished
                log.info("inbound email: skipped (already written)")
                return {"communication": None, "thread": None, "result": "skipped"}
            record = loaded
            if record["omitted"]:
                rt.metrics.inc("switchboard_emails_oversized")
                rt.metrics.inc("switchboard_email_attachments_omitted", len(record["omitted"]))
        outcome = deliver_email(record, str(meta["received_at"]), context(record),
                                s.email_thread_strategy, s.unknown_sender_policy,
                                s.email_require_sender_auth, rt.seen, rt.binaries,
                                sender_admitted=posts is not None)
    except PermanentError as exc:
        if posts is not None and (exc.reason in REFUSED_SENDER or not admitted):
            # Refused for its sender, or before any sender was admitted: anyone can email
            # the clinic, so a large post is not kept for the dead letter.
            posts.refused(ref)
        raise
    if posts is not None:
        posts.done(ref)
    # The Message-ID can hold the sender's address: the log names the task, not the email.
    log.info("inbound email: %s Communication/%s in %s", outcome.result,
             outcome.communication_id, outcome.thread_ref)
    return {"communication": outcome.communication_id, "thread": outcome.thread_ref,
            "result": outcome.result}


class OutboundTask(SwitchboardTask):
    """Outbound sends also tell the API caller when a message ends in the dead-letter store."""

    abstract = True

    def dead_lettered(self, args: Any, kwargs: Any, reason: str, detail: str) -> None:
        """Mark the request failed, unless the pipeline already said why or it was sent (a
        failure after the send, such as `record-failed`, must not invite a second send)."""
        request_id = str((args[0] if args else {}).get("request_id") or "")
        state = get_runtime().outbound.state
        current = state.get(request_id) if request_id else None
        if not request_id or (current and current["status"] in ("failed", "sent",
                                                                 "delivered")):
            return
        # After exhausted retries, say what kept failing (e.g. provider-unavailable → 502).
        error = (current or {}).get("last_error") if reason == "retries-exhausted" else None
        state.update(request_id, "failed", error=error or reason)


@shared_task(bind=True, base=OutboundTask, name=TASK_OUTBOUND_SEND)
def outbound_send(self: OutboundTask, payload: dict[str, Any]) -> dict[str, Any]:
    """Send one outbound message (payload schema: docs/http-api.md, "The outbound task")."""
    rt = get_runtime()
    result = send_outbound(OutboundRequest.from_payload(payload), rt.outbound,
                           str(self.request.id))
    return {"provider_id": result.provider_id, "status": result.status}


@shared_task(bind=True, base=SwitchboardTask, name=TASK_SUBSCRIPTION_NOTIFIED)
def subscription_notified(self: SwitchboardTask, payload: dict[str, Any]) -> dict[str, Any]:
    """A FHIR Subscription named this Communication: read it, send it if it is a reply."""
    rt = get_runtime()
    # The payload as the last run left it: a deferred send keeps its reserved slot.
    req = subscription_request(payload)
    return {"result": on_notification(req, rt.outbound, str(self.request.id), rt.metrics,
                                      rt.settings.automatic_outbound_client_list())}


@shared_task(bind=True, base=SwitchboardTask, name=TASK_DEVICE_UPDATE)
def device_update(self: SwitchboardTask, payload: dict[str, Any]) -> dict[str, Any]:
    """Register or deactivate one push device token (payload: docs/channels.md, "Push (FCM)")."""
    rt = get_runtime()
    result = apply_device_change(rt.fhir, rt.settings.device_token_system, payload)
    # Never the token in a log line: it addresses the patient's phone.
    logging.getLogger("switchboard.devices").info(
        "device %s for %s: %s", payload.get("action"), payload.get("patient", "a token"), result)
    return {"result": result}


@shared_task(bind=True, base=SwitchboardTask, name=TASK_TWILIO_STATUS)
def twilio_status(self: SwitchboardTask, params: dict[str, str]) -> dict[str, Any]:
    """Apply one Twilio status callback to the Communication it is about."""
    rt = get_runtime()
    applied = apply_status(rt.fhir, rt.settings.message_id_system, params, rt.outbound.state,
                           rt.settings.outbound_request_system, _outside_window(rt))
    log.info("status %s: %s", params.get("MessageSid", "?"), applied)
    return {"result": applied}


def _outside_window(rt: Runtime) -> OutsideWindow:
    """A WhatsApp send Twilio failed with 63016: hold the reply (worker/outbound/whatsapp.py)."""
    return lambda comm_id, request_id, params: refused_outside_window(
        rt.outbound, comm_id, request_id, params, rt.settings.message_id_system)


@shared_task(bind=True, base=SwitchboardTask, name=TASK_SENDGRID_EVENTS)
def sendgrid_events(self: SwitchboardTask, events: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply one SendGrid Event Webhook batch (checked by the receiver) to the Communications."""
    rt = get_runtime()
    counts = apply_email_events(
        rt.fhir, events, rt.email_events_seen, rt.outbound.optouts, rt.outbound.state,
        rt.settings.email_message_id_system, rt.settings.outbound_request_system,
        lambda event: rt.metrics.inc("switchboard_email_events", event=event))
    # Event names and counts only: the events carry the recipient's address.
    log.info("sendgrid events: %s", ", ".join(f"{k}={v}" for k, v in
                                              sorted(counts.results.items())))
    return {"results": counts.results}


@shared_task(bind=True, base=SwitchboardTask, name=TASK_RECONCILE)
def reconcile(self: SwitchboardTask, stuck_after: float | None = None) -> dict[str, int]:
    """Ask the provider about sends whose final status never arrived (Celery beat)."""
    rt = get_runtime()
    sms = rt.outbound.channels.get("sms")
    if not isinstance(sms, TwilioSms):
        return {}
    s = rt.settings
    return reconcile_stuck(rt.fhir, sms, s.message_id_system, s.outbound_request_system,
                           rt.outbound.state, rt.metrics,
                           s.stuck_after_seconds if stuck_after is None else stuck_after,
                           outside_window=_outside_window(rt))


@shared_task(bind=True, base=SwitchboardTask, name=TASK_INBOX_SWEEP)
def sweep_inbox(self: SwitchboardTask) -> dict[str, int]:
    """Publish again the accepted messages that no worker has touched for too long."""
    rt = get_runtime()
    stale = rt.inbox.stale(rt.settings.inbox_stale_seconds)
    for entry in stale:
        self.app.send_task(entry.task, args=entry.args, queue=entry.queue,
                           headers={INBOX_HEADER: entry.key}, **REDACTED_ARGS)
        rt.inbox.touch(entry.key)
    if stale:
        log.warning("inbox sweep re-published %d stale accepted messages", len(stale))
        rt.metrics.inc("switchboard_inbox_republished", len(stale))
    return {"republished": len(stale)}


@shared_task(bind=True, base=SwitchboardTask, name=TASK_WHATSAPP_RELEASE)
def whatsapp_release(self: SwitchboardTask, payload: dict[str, Any]) -> dict[str, Any]:
    """Send the WhatsApp replies held for one (patient, sender): the patient just wrote."""
    queue = payload.get("queue")
    if not isinstance(queue, str) or not re.fullmatch(r"[0-9a-f]{40}", queue):
        raise PermanentError("invalid-payload", "queue must be a held-reply queue name")
    slot = payload.get("rate_slot")
    counts = release_held(get_runtime().outbound, queue, str(self.request.id), send_outbound,
                          float(slot) if isinstance(slot, int | float) else None)
    log.info("whatsapp release: %s", ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return counts


@shared_task(bind=True, base=SwitchboardTask, name=TASK_WHATSAPP_EXPIRE)
def whatsapp_expire(self: SwitchboardTask) -> dict[str, int]:
    """Fail the WhatsApp replies held longer than WHATSAPP_HOLD_HOURS (Celery beat)."""
    return {"expired": expire_held(get_runtime().outbound)}
