"""Twilio webhooks (incoming SMS, delivery status): verify the signature, check fields, enqueue."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from flask import Blueprint, Response, current_app, request

from web.enqueue import EnqueueFailed
from web.spooling import SpoolingEnqueuer
from web.webhooks import rejected
from worker.broker.celery_app import (
    QUEUE_INBOUND,
    QUEUE_STATUS,
    TASK_INBOUND_SMS,
    TASK_TWILIO_STATUS,
)
from worker.channels.registry import STATUS_CALLBACK_PATH
from worker.channels.twilio import (
    REQUIRED_FIELDS,
    STATUS_FIELDS,
    TwilioSignature,
    field_problems,
    missing_fields,
)
from worker.ops.metrics import Metrics
from worker.settings import Settings

log = logging.getLogger("switchboard.web")
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def public_url(settings: Settings) -> str:
    """The URL Twilio called, rebuilt from PUBLIC_BASE_URL: behind a proxy, Flask's own idea of
    scheme and host is not what Twilio signed."""
    query = request.query_string.decode("latin-1")
    return settings.public_base_url + request.path + (f"?{query}" if query else "")


Reject = Callable[..., tuple[Response, int]]


def refused_as_unsigned(settings: Settings, signature: TwilioSignature, reject: Reject
                        ) -> tuple[Response, int] | None:
    """The refusal of a post that is not a form Twilio signed for our public URL (415, 403),
    or None: the first check of every Twilio webhook (SMS, status, Conversations)."""
    if request.mimetype != "application/x-www-form-urlencoded":
        # Twilio only ever posts urlencoded forms; multipart bodies can carry nameless
        # parts the signature check cannot even sort (found by the fuzz scenario).
        return reject(415, "unsupported-media-type",
                      "expected application/x-www-form-urlencoded")
    if not signature.is_valid(public_url(settings), request.form,
                              request.headers.get("X-Twilio-Signature")):
        return reject(403, "bad-signature", "X-Twilio-Signature is missing or does not match")
    return None


def twilio_blueprint(settings: Settings) -> Blueprint:
    """Routes for Twilio webhooks."""
    bp = Blueprint("twilio", __name__)
    signature = TwilioSignature(settings.twilio_auth_token.get_secret_value())

    def accept(kind: str, required: tuple[str, ...], task: str, queue: str,
               with_meta: bool, key_fields: tuple[str, ...]) -> tuple[Response, int]:
        """Verify, validate, enqueue: the whole of a Twilio webhook."""
        metrics: Metrics = current_app.extensions["switchboard.metrics"]
        endpoint = f"twilio-{kind}"
        metrics.inc("switchboard_webhooks_received", endpoint=endpoint)

        def reject(status: int, reason: str, detail: str, fields: list[str] | None = None,
                   error: str | None = None) -> tuple[Response, int]:
            return rejected(endpoint, f"twilio {kind} webhook", status, reason, detail, fields,
                            error)

        refusal = refused_as_unsigned(settings, signature, reject)
        if refusal:
            return refusal
        form = request.form
        params = form.to_dict(flat=True)
        missing = missing_fields(params, required)
        if missing:
            return reject(400, "missing-fields", "required: " + ", ".join(missing), missing)
        invalid = field_problems(kind, form.items(multi=True), settings.twilio_account_sid)
        if invalid:
            return reject(400, "invalid-fields", "malformed: " + ", ".join(invalid), invalid)
        enqueuer: SpoolingEnqueuer = current_app.extensions["switchboard.spooling"]
        args: list[object] = [params]
        if with_meta:
            args.append({"received_at": datetime.now(UTC).isoformat(timespec="milliseconds")})
        try:
            key = ":".join([kind, *(params.get(f, "") for f in key_fields)])
            enqueuer.send(task, queue, args, inbox_key=key)
        except EnqueueFailed:
            # Neither queued nor spooled (docs/spool.md): not accepted, and said so. Twilio
            # retries only as the webhook URL's connection overrides allow
            # (docs/operations.md: configure retries and a fallback URL).
            return reject(503, "queue-unavailable", "queue unavailable, retry later",
                          error="unavailable")
        metrics.inc("switchboard_webhooks_enqueued", endpoint=endpoint)
        return Response(EMPTY_TWIML, mimetype="text/xml"), 200

    @bp.post("/webhooks/twilio/sms")
    def inbound_sms() -> tuple[Response, int]:
        return accept("sms", REQUIRED_FIELDS, TASK_INBOUND_SMS, QUEUE_INBOUND, with_meta=True,
                      key_fields=("MessageSid",))

    @bp.post(STATUS_CALLBACK_PATH)
    def status_callback() -> tuple[Response, int]:
        return accept("status", STATUS_FIELDS, TASK_TWILIO_STATUS, QUEUE_STATUS,
                      with_meta=False, key_fields=("MessageSid", "MessageStatus"))

    return bp
