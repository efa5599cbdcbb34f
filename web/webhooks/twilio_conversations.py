"""Twilio Conversations post-event webhooks: verify the signature, check fields, enqueue."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, Response, current_app, request

from web.enqueue import EnqueueFailed
from web.spooling import SpoolingEnqueuer
from web.webhooks import rejected
from web.webhooks.twilio import refused_as_unsigned
from worker.broker.celery_app import (
    QUEUE_INBOUND,
    QUEUE_STATUS,
    TASK_CONVERSATIONS_DELIVERY,
    TASK_INBOUND_CONVERSATIONS,
)
from worker.channels.twilio import TwilioSignature
from worker.channels.twilio_conversations import (
    EVENT_MESSAGE_ADDED,
    WEBHOOK_PATH,
    field_problems,
    inbox_key,
)
from worker.ops.metrics import Metrics
from worker.settings import Settings

ENDPOINT = "twilio-conversations"


def conversations_blueprint(settings: Settings) -> Blueprint:
    """`POST /webhooks/twilio/conversations`: onMessageAdded to the inbound queue,
    onDeliveryUpdated to the status queue. Nothing else happens in the request: no FHIR, no
    Twilio call (a participant's binding is read by the worker)."""
    bp = Blueprint("twilio_conversations", __name__)
    signature = TwilioSignature(settings.twilio_auth_token.get_secret_value())

    def reject(status: int, reason: str, detail: str, fields: list[str] | None = None,
               error: str | None = None) -> tuple[Response, int]:
        return rejected(ENDPOINT, "twilio conversations webhook", status, reason, detail,
                        fields, error)

    @bp.post(WEBHOOK_PATH)
    def conversations_event() -> tuple[Response, int]:
        metrics: Metrics = current_app.extensions["switchboard.metrics"]
        metrics.inc("switchboard_webhooks_received", endpoint=ENDPOINT)
        refusal = refused_as_unsigned(settings, signature, reject)
        if refusal:
            return refusal
        form = request.form
        invalid = field_problems(form.items(multi=True), settings.twilio_account_sid)
        if invalid:
            return reject(400, "invalid-fields", "malformed or missing: " + ", ".join(invalid),
                          invalid)
        params = form.to_dict(flat=True)
        if params["EventType"] == EVENT_MESSAGE_ADDED:
            task, queue = TASK_INBOUND_CONVERSATIONS, QUEUE_INBOUND
            args: list[object] = [params, {"received_at": datetime.now(UTC).isoformat(
                timespec="milliseconds")}]
        else:
            task, queue, args = TASK_CONVERSATIONS_DELIVERY, QUEUE_STATUS, [params]
        enqueuer: SpoolingEnqueuer = current_app.extensions["switchboard.spooling"]
        try:
            enqueuer.send(task, queue, args, inbox_key=inbox_key(params))
        except EnqueueFailed:
            # Neither queued nor spooled (docs/spool.md): not accepted, and said so. Twilio
            # retries a post-event webhook per the Conversation's webhook settings.
            return reject(503, "queue-unavailable", "queue unavailable, retry later",
                          error="unavailable")
        metrics.inc("switchboard_webhooks_enqueued", endpoint=ENDPOINT)
        return Response("", mimetype="text/plain"), 200

    return bp
