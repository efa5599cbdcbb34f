"""Flask application factory: `create_app(settings)`; with no argument, settings from the env."""

from __future__ import annotations

import logging

import redis
from flask import Flask, Response, jsonify
from flask.logging import default_handler

from web.api import MAX_WAIT_SECONDS, api_blueprint
from web.enqueue import Enqueuer
from web.webhooks.twilio import twilio_blueprint
from worker import logs
from worker.settings import Settings, load_settings

log = logging.getLogger("switchboard.web")


def create_app(settings: Settings | None = None, enqueuer: Enqueuer | None = None) -> Flask:
    """Build the receiver: verify, validate, enqueue. It never calls FHIR or a provider."""
    settings = settings or load_settings()
    # Under gunicorn the root logger has no handlers; gunicorn's and Flask's own do the writing.
    logs.install(logging.getLogger("gunicorn.error"), logging.getLogger("gunicorn.access"))
    logs.protect(default_handler)
    app = Flask("switchboard")
    # Twilio posts small forms; anything bigger than this is not a Twilio webhook.
    app.config["MAX_CONTENT_LENGTH"] = 256 * 1024
    app.extensions["switchboard.settings"] = settings
    app.extensions["switchboard.enqueuer"] = enqueuer or Enqueuer.from_settings(settings)
    app.register_blueprint(twilio_blueprint(settings))
    app.register_blueprint(api_blueprint(settings, redis.Redis.from_url(
        settings.redis_url, socket_timeout=MAX_WAIT_SECONDS + 5, socket_connect_timeout=3)))

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        return jsonify(status="ok"), 200

    @app.errorhandler(413)
    def too_large(_: Exception) -> tuple[Response, int]:
        return jsonify(error="payload-too-large"), 413

    return app
