"""SendGrid Event Webhook: verify the ECDSA signature over the raw body, check, enqueue."""

from __future__ import annotations

import hashlib
import logging

from flask import Blueprint, Response, current_app, jsonify, request

from web.enqueue import EnqueueFailed
from web.spooling import SpoolingEnqueuer
from web.webhooks import rejected
from worker.broker.celery_app import QUEUE_STATUS, TASK_SENDGRID_EVENTS
from worker.channels.sendgrid import (
    EVENT_MAX_BYTES,
    EVENT_SIGNATURE_HEADER,
    EVENT_TIMESTAMP_HEADER,
    EventBatchError,
    EventSignature,
    parse_event_batch,
)
from worker.ops.metrics import Metrics
from worker.settings import Settings

log = logging.getLogger("switchboard.web")
EVENTS_PATH = "/webhooks/sendgrid/events"
ENDPOINT = "sendgrid-events"


def body_limit(path: str) -> int | None:
    """The largest body this blueprint's route takes (None: the app's default)."""
    return EVENT_MAX_BYTES if path == EVENTS_PATH else None


def sendgrid_events_blueprint(settings: Settings) -> Blueprint:
    """The SendGrid Event Webhook route."""
    bp = Blueprint("sendgrid_events", __name__)
    signature = EventSignature(settings.sendgrid_event_verification_key)
    if not signature.configured:
        log.warning("SENDGRID_EVENT_VERIFICATION_KEY is unset: %s refuses every request",
                    EVENTS_PATH)

    @bp.post(EVENTS_PATH)
    def events() -> tuple[Response, int]:
        metrics: Metrics = current_app.extensions["switchboard.metrics"]
        metrics.inc("switchboard_webhooks_received", endpoint=ENDPOINT)

        def reject(status: int, reason: str, detail: str, fields: list[str] | None = None,
                   error: str | None = None) -> tuple[Response, int]:
            return rejected(ENDPOINT, "sendgrid events", status, reason, detail, fields, error)

        body = request.get_data(cache=True)
        refused = signature.check(body, request.headers.get(EVENT_SIGNATURE_HEADER),
                                  request.headers.get(EVENT_TIMESTAMP_HEADER))
        if refused == "not-configured":
            # Fail closed: without the key nobody can be told from SendGrid.
            return reject(403, refused, "SENDGRID_EVENT_VERIFICATION_KEY is not configured")
        if refused == "stale-timestamp":
            return reject(403, refused, "the signed timestamp is older than 10 minutes")
        if refused:
            return reject(403, refused, f"{EVENT_SIGNATURE_HEADER} is missing or does not "
                                        "match")
        try:
            batch = parse_event_batch(body)
        except EventBatchError as exc:
            return reject(400, exc.reason, "not a SendGrid event batch we can use",
                          exc.fields or None)
        enqueuer: SpoolingEnqueuer = current_app.extensions["switchboard.spooling"]
        try:
            # SendGrid retries the same body when it got no 2xx: one inbox entry per body.
            key = "sendgrid-events:" + hashlib.sha256(body).hexdigest()[:32]
            enqueuer.send(TASK_SENDGRID_EVENTS, QUEUE_STATUS, [batch], inbox_key=key)
        except EnqueueFailed:
            # Neither queued nor spooled (docs/spool.md): SendGrid retries a 5xx (for up to
            # 24 hours), nothing is lost.
            return reject(503, "queue-unavailable", "queue unavailable, retry later",
                          error="unavailable")
        metrics.inc("switchboard_webhooks_enqueued", endpoint=ENDPOINT)
        return jsonify(status="queued", events=len(batch)), 200

    return bp
