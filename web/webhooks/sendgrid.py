"""SendGrid Inbound Parse webhook: authenticate the request, check its framing, enqueue its
bytes (the worker reads the email)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from flask import Blueprint, Response, current_app, jsonify, request

from web.enqueue import STEP_TIMEOUT_SECONDS, EnqueueFailed
from web.spooling import SpoolingEnqueuer
from web.webhooks import rejected
from worker.broker.celery_app import QUEUE_INBOUND, TASK_INBOUND_EMAIL
from worker.channels.sendgrid_inbound import InvalidEmail, form_parts, require_email_fields
from worker.channels.sendgrid_signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    basic_auth_ok,
    load_verification_key,
    verify_signed_request,
)
from worker.ops.metrics import Metrics
from worker.settings import Settings
from worker.stores.connection import redis_client
from worker.stores.email_posts import EmailPosts, post_ref

log = logging.getLogger("switchboard.web")
INBOUND_PATH = "/webhooks/sendgrid/inbound"
# Storing a post may take longer than the enqueue's step (a 40 MB post is 40 MB to send): a
# stalled Redis still gets a 503 well within what SendGrid waits, and SendGrid retries it.
POST_WRITE_TIMEOUT_SECONDS = 10.0


def request_problem(settings: Settings, body: bytes, headers: dict[str, str | None],
                    now: float) -> tuple[int, str] | None:
    """(status, reason) when the request is not authentically SendGrid's, else None.

    A valid ECDSA signature (SENDGRID_INBOUND_VERIFICATION_KEY) or the configured Basic
    credentials (SENDGRID_INBOUND_BASIC_AUTH) admit it; with neither configured, nothing does.
    """
    key_b64 = settings.sendgrid_inbound_verification_key
    basic = settings.sendgrid_inbound_basic_auth.get_secret_value()
    if not key_b64 and not basic:
        return 403, "not-configured"
    if basic and basic_auth_ok(basic, headers.get("Authorization")):
        return None
    if key_b64:
        reason = verify_signed_request(load_verification_key(key_b64), body,
                                       headers.get(SIGNATURE_HEADER),
                                       headers.get(TIMESTAMP_HEADER), now)
        if reason is None:
            return None
        return (401 if reason == "unsigned" else 403), reason
    return 401, "bad-credentials" if headers.get("Authorization") else "unauthenticated"


def post_store(settings: Settings) -> EmailPosts:
    """The post store as the receiver writes it (bounded in time, see above)."""
    return EmailPosts.from_settings(redis_client(
        settings, socket_timeout=POST_WRITE_TIMEOUT_SECONDS,
        socket_connect_timeout=STEP_TIMEOUT_SECONDS), settings)


def sendgrid_blueprint(settings: Settings, posts: EmailPosts) -> Blueprint:
    """Routes for SendGrid's Inbound Parse webhook."""
    bp = Blueprint("sendgrid_inbound", __name__)
    endpoint = "sendgrid-inbound"

    @bp.post(INBOUND_PATH)
    def inbound_email() -> tuple[Response, int]:
        metrics: Metrics = current_app.extensions["switchboard.metrics"]
        metrics.inc("switchboard_webhooks_received", endpoint=endpoint)

        def reject(status: int, reason: str, detail: str) -> tuple[Response, int]:
            resp, status = rejected(endpoint, "sendgrid inbound webhook", status, reason, detail)
            if status == 401 and settings.sendgrid_inbound_basic_auth.get_secret_value():
                resp.headers["WWW-Authenticate"] = 'Basic realm="switchboard"'
            return resp, status

        body = request.get_data(cache=True)  # the exact bytes SendGrid signed
        problem = request_problem(settings, body, {
            "Authorization": request.headers.get("Authorization"),
            SIGNATURE_HEADER: request.headers.get(SIGNATURE_HEADER),
            TIMESTAMP_HEADER: request.headers.get(TIMESTAMP_HEADER)}, time.time())
        if problem:
            status, reason = problem
            return reject(status, reason, {
                "not-configured": "inbound email is not configured (see `switchboard check`)",
                "unsigned": "the request carries no SendGrid signature",
                "stale-timestamp": "the signature's timestamp is not within 10 minutes",
                "bad-signature": "the SendGrid signature does not match",
            }.get(reason, "missing or wrong credentials"))
        if request.mimetype != "multipart/form-data":
            return reject(415, "unsupported-media-type", "expected multipart/form-data")
        content_type = request.content_type or ""
        try:
            # Only the framing and the field names: the email itself is parsed in the worker
            # (a hostile one costs the receiver seconds of CPU per MB of parts).
            require_email_fields(form_parts(content_type, body))
        except InvalidEmail as exc:
            return reject(400, "invalid-email", str(exc))
        # The bytes go to the worker sealed in the post store, the task names them: their
        # digest, so a SendGrid retry of the same post finds the same entry (and FHIR's
        # If-None-Exist on the Message-ID still makes one message of two different posts).
        ref = post_ref(body)
        try:
            posts.put(ref, body)
            stored = True
        except Exception as exc:  # redis raises many types; all mean "not kept"
            log.error("storing an inbound email post failed: %s", type(exc).__name__)
            stored = False
        record = {"email_ref": ref, "content_type": content_type}
        enqueuer: SpoolingEnqueuer = current_app.extensions["switchboard.spooling"]
        meta = {"received_at": datetime.now(UTC).isoformat(timespec="milliseconds")}
        try:
            # Spooled, the entry carries the post when the post store (Redis too) did not take
            # it; the flush puts it there before the task. SPOOL_MAX_RECORD_BYTES bounds it.
            enqueuer.send(TASK_INBOUND_EMAIL, QUEUE_INBOUND, [record, meta],
                          inbox_key="email:" + ref, post=None if stored else (ref, body),
                          queue_first=stored)
        except EnqueueFailed:
            # Neither queued nor spooled (docs/spool.md; a post over SPOOL_MAX_RECORD_BYTES
            # is not spooled): SendGrid retries a 5xx for up to 72 hours.
            return reject(503, "queue-unavailable", "queue unavailable, retry later")
        metrics.inc("switchboard_webhooks_enqueued", endpoint=endpoint)
        return jsonify(status="accepted"), 200

    return bp
