"""Provider webhooks: one module per provider, and the one way they refuse a request."""

from __future__ import annotations

import logging

from flask import Response, current_app, jsonify

from worker.ops.metrics import Metrics

log = logging.getLogger("switchboard.web")


def rejected(endpoint: str, what: str, status: int, reason: str, detail: str,
             fields: list[str] | None = None, error: str | None = None
             ) -> tuple[Response, int]:
    """Refuse a webhook request: one log line, one metric, a JSON answer with the reason.

    Only the reason and field names reach the log: webhook bodies carry phone numbers,
    addresses and what patients wrote. `error` overrides the answer's error code when the
    metric's reason is finer than what the caller should see."""
    log.warning("%s rejected: %s%s", what, reason, f" {','.join(fields)}" if fields else "")
    metrics: Metrics = current_app.extensions["switchboard.metrics"]
    metrics.inc("switchboard_webhooks_rejected", endpoint=endpoint, reason=reason)
    body = {"error": error or reason, "detail": detail}
    return jsonify({**body, "fields": fields} if fields else body), status
