"""`POST /webhooks/twilio/sms`: verify the signature, check required fields, enqueue."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from flask import Blueprint, Response, current_app, jsonify, request

from web.enqueue import EnqueueFailed, Enqueuer
from worker.celery_app import QUEUE_INBOUND, TASK_INBOUND_SMS
from worker.channels.twilio import TwilioSignature, missing_fields
from worker.settings import Settings

log = logging.getLogger("switchboard.web")
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def public_url(settings: Settings) -> str:
    """The URL Twilio called, rebuilt from PUBLIC_BASE_URL: behind a proxy, Flask's own idea of
    scheme and host is not what Twilio signed."""
    query = request.query_string.decode("latin-1")
    return settings.public_base_url + request.path + (f"?{query}" if query else "")


def twilio_blueprint(settings: Settings) -> Blueprint:
    """Routes for Twilio webhooks."""
    bp = Blueprint("twilio", __name__)
    signature = TwilioSignature(settings.twilio_auth_token.get_secret_value())

    @bp.post("/webhooks/twilio/sms")
    def inbound_sms() -> tuple[Response, int]:
        form = request.form
        if not signature.is_valid(public_url(settings), form,
                                  request.headers.get("X-Twilio-Signature")):
            log.warning("twilio sms webhook rejected: bad-signature")
            return jsonify(error="bad-signature",
                           detail="X-Twilio-Signature is missing or does not match"), 403
        params = form.to_dict(flat=True)
        missing = missing_fields(params)
        if missing:
            log.warning("twilio sms webhook rejected: missing %s", ",".join(missing))
            return jsonify(error="missing-fields", fields=missing,
                           detail="required: " + ", ".join(missing)), 400
        enqueuer: Enqueuer = current_app.extensions["switchboard.enqueuer"]
        meta = {"received_at": datetime.now(UTC).isoformat(timespec="milliseconds")}
        try:
            enqueuer.send(TASK_INBOUND_SMS, QUEUE_INBOUND, [params, meta])
        except EnqueueFailed:
            # Not accepted, and said so: Twilio retries only as the webhook URL's connection
            # overrides allow (README: use `#rc=3&rp=5xx,ct` and a fallback URL).
            return jsonify(error="unavailable", detail="queue unavailable, retry later"), 503
        return Response(EMPTY_TWIML, mimetype="text/xml"), 200

    return bp
