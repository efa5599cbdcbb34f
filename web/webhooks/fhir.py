"""FHIR Subscription rest-hooks: verify the signature, take the Communication ids, enqueue."""

from __future__ import annotations

import json
import logging

from flask import Blueprint, Response, current_app, jsonify, request

from web.enqueue import EnqueueFailed
from web.spooling import SpoolingEnqueuer
from web.webhooks import rejected
from worker.broker.celery_app import QUEUE_OUTBOUND, TASK_SUBSCRIPTION_NOTIFIED
from worker.ops.metrics import Metrics
from worker.outbound.automatic import BadNotification, ignored, notified_ids, signature_valid
from worker.settings import Settings

log = logging.getLogger("switchboard.web")
SUBSCRIPTION_PATH = "/webhooks/fhir/subscription"
ENDPOINT = "fhir-subscription"
JSON_TYPES = frozenset({"application/fhir+json", "application/json", ""})


def fhir_blueprint(settings: Settings) -> Blueprint:
    """The route Medplum's rest-hook Subscription posts to."""
    bp = Blueprint("fhir_subscription", __name__)
    secret = settings.fhir_subscription_secret.get_secret_value().encode()

    @bp.post(SUBSCRIPTION_PATH)
    def subscription() -> tuple[Response, int]:
        metrics: Metrics = current_app.extensions["switchboard.metrics"]
        metrics.inc("switchboard_webhooks_received", endpoint=ENDPOINT)

        def reject(status: int, reason: str, detail: str) -> tuple[Response, int]:
            return rejected(ENDPOINT, "fhir subscription notification", status, reason, detail)

        if request.mimetype not in JSON_TYPES:
            # A form body would be parsed by the framework before we could sign its exact
            # bytes; Medplum always sends application/fhir+json.
            return reject(415, "unsupported-media-type", "expected application/fhir+json")
        # The signature covers the exact bytes received, so it is checked on them, before
        # anything is parsed.
        raw = request.get_data(cache=True)
        if not signature_valid(secret, raw, request.headers.get("X-Signature")):
            detail = ("FHIR_SUBSCRIPTION_SECRET is not set" if not secret
                      else "X-Signature is missing or does not match")
            return reject(403, "bad-signature", detail)
        interaction = request.headers.get("X-Medplum-Interaction", "")
        if interaction == "delete" or "X-Medplum-Deleted-Resource" in request.headers:
            # A deleted message has nothing left to send (body `{}`); Medplum sends these only
            # when the Subscription asks for deletes, and ours does not. Acknowledged.
            ignored("delete", "a deleted resource", metrics)
            return jsonify(status="ignored", reason="delete"), 200
        try:
            ids = notified_ids(json.loads(raw))
        except (ValueError, RecursionError) as exc:  # BadNotification is a ValueError
            if isinstance(exc, BadNotification):
                status = 400 if exc.reason in ("invalid-body", "invalid-id") else 422
                return reject(status, exc.reason, exc.detail)
            return reject(400, "invalid-json", "the body must be a JSON FHIR resource")
        if not ids:
            ignored("no-communication", "a notification Bundle", metrics)
            return jsonify(status="ignored", reason="no-communication"), 200
        enqueuer: SpoolingEnqueuer = current_app.extensions["switchboard.spooling"]
        try:
            for comm_id in ids:
                # Only the id is queued: the worker reads the Communication itself.
                enqueuer.send(TASK_SUBSCRIPTION_NOTIFIED, QUEUE_OUTBOUND,
                              [{"communication": comm_id}],
                              inbox_key=f"subscription:{comm_id}")
        except EnqueueFailed:
            # Neither queued nor spooled (docs/spool.md): 5xx, so Medplum retries the
            # delivery (those already queued or spooled are harmless twice: the worker sends
            # each Communication at most once).
            return reject(503, "queue-unavailable", "queue unavailable, retry later")
        metrics.inc("switchboard_webhooks_enqueued", endpoint=ENDPOINT)
        return jsonify(status="queued", communications=len(ids)), 200

    return bp
