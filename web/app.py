"""Flask application factory: `create_app(settings)`; with no argument, settings from the env."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from flask import Flask, Response, jsonify, request
from flask.logging import default_handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from web.api import MAX_WAIT_SECONDS, api_blueprint
from web.enqueue import Enqueuer
from web.spooling import SpoolingEnqueuer, flusher
from web.webhooks.fhir import fhir_blueprint
from web.webhooks.sendgrid import INBOUND_PATH, post_store, sendgrid_blueprint
from web.webhooks.sendgrid_events import body_limit, sendgrid_events_blueprint
from web.webhooks.twilio import twilio_blueprint
from web.webhooks.twilio_conversations import conversations_blueprint
from worker.broker.spool import spool_from_settings
from worker.channels.sendgrid_inbound import MAX_REQUEST_BYTES
from worker.ops import logs
from worker.ops.health import Check, readiness
from worker.ops.metrics import process_metrics, web_registry
from worker.settings import Settings, load_settings
from worker.stores.connection import redis_client

log = logging.getLogger("switchboard.web")


class BodyTimeout(Exception):
    """The request body did not arrive within the receiver's deadline."""


def _end_connection(environ: dict[str, object]) -> None:
    """Answer 408 on the raw socket and shut it, so nothing more is read from it.

    The rest of a body cut off mid-way (a chunked one above all: the deadline interrupts
    gunicorn's chunk reader) would otherwise be parsed as the next request on a keep-alive
    connection: request smuggling (found by the hostile review). gunicorn drops an app's
    `Connection: close` (a hop-by-hop header), so the app closes the socket itself.
    """
    sock: Any = environ.get("gunicorn.socket")  # gevent's socket under gevent workers
    if sock is None or not hasattr(sock, "shutdown"):
        return
    try:
        sock.sendall(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 29\r\n\r\n"
                     b'{"error":"request-timeout"}\r\n')
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the client went away: the connection is over either way


Deadline = Callable[[float], AbstractContextManager[object]]


def _deadlines() -> Deadline:
    """How to put a deadline on everything inside a block, where the server can enforce one:
    under gunicorn's gevent workers (as deployed, patched before the app is built). Elsewhere
    (the Flask test client, a sync worker) no deadline. Decided once, not per request."""
    try:
        from gevent import Timeout, monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return lambda _seconds: nullcontext()
    if not monkey.is_module_patched("socket"):
        return lambda _seconds: nullcontext()
    return lambda seconds: Timeout(seconds, BodyTimeout)
READY_CACHE_SECONDS = 5.0


def create_app(settings: Settings | None = None, enqueuer: Enqueuer | None = None) -> Flask:
    """Build the receiver: verify, validate, enqueue. It never calls FHIR or a provider."""
    settings = settings or load_settings()
    # Under gunicorn the root logger has no handlers; gunicorn's and Flask's own do the writing.
    logs.install(logging.getLogger("gunicorn.error"), logging.getLogger("gunicorn.access"),
                 fmt=settings.log_format)
    logs.protect(default_handler)
    default_handler.setFormatter(logs.formatter(settings.log_format))
    app = Flask("switchboard")
    # Twilio posts small forms; anything bigger than this is not a Twilio webhook.
    app.config["MAX_CONTENT_LENGTH"] = 256 * 1024
    app.extensions["switchboard.settings"] = settings
    app.extensions["switchboard.enqueuer"] = enqueuer = enqueuer or Enqueuer.from_settings(settings)
    app.extensions["switchboard.metrics"] = process_metrics()
    posts = post_store(settings)
    spool = spool_from_settings(settings)
    # The webhooks' enqueue falls back to the disk spool; the API's does not (docs/spool.md).
    spooling = SpoolingEnqueuer(enqueuer, spool, posts, app.extensions["switchboard.metrics"])
    app.extensions["switchboard.spooling"] = spooling
    # Started per process after gunicorn's fork (web/gunicorn_conf.py), not here: a thread
    # started before a fork does not exist in the child.
    app.extensions["switchboard.spool_flusher"] = flusher(settings, spooling)
    metrics_redis = redis_client(settings, socket_timeout=5, socket_connect_timeout=3)
    app.register_blueprint(twilio_blueprint(settings))
    app.register_blueprint(conversations_blueprint(settings))
    app.register_blueprint(sendgrid_events_blueprint(settings))
    app.register_blueprint(sendgrid_blueprint(settings, posts))
    app.register_blueprint(fhir_blueprint(settings))
    app.register_blueprint(api_blueprint(settings, redis_client(
        settings, socket_timeout=MAX_WAIT_SECONDS + 5, socket_connect_timeout=3)))

    deadline = _deadlines()

    @app.before_request
    def read_body_in_time() -> tuple[Response, int] | None:
        # A client that dribbles its body holds a connection slot for as long as it likes
        # (2,050 such sockets filled both gevent workers' slots in the hostile review). Every
        # body must arrive whole within the deadline; Twilio's arrive at once.
        if request.method not in ("POST", "PUT", "PATCH"):
            return None
        limit = body_limit(request.path)
        if limit is not None:
            request.max_content_length = limit  # SendGrid batches events
        email = request.path == INBOUND_PATH
        if email:
            # Emails with attachments are far bigger than Twilio's forms (SendGrid takes up to
            # 30 MB); what EMAIL_MAX_BYTES leaves out is decided after the signature check.
            request.max_content_length = MAX_REQUEST_BYTES
            request.max_form_memory_size = MAX_REQUEST_BYTES
        try:
            with deadline(settings.receiver_body_timeout_seconds):
                # The email's exact bytes are kept: they are what SendGrid signed.
                request.get_data(cache=True, parse_form_data=not email)
        except BodyTimeout:
            _end_connection(request.environ)
            resp = jsonify(error="request-timeout",
                           detail="the request body did not arrive in time")
            return resp, 408
        return None

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        return jsonify(status="ok"), 200

    ready_cache: dict[str, tuple[float, list[Check]]] = {}

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        # Probes come every few seconds: remember the answer briefly rather than asking the
        # token endpoint each time.
        at, checks = ready_cache.get("last", (0.0, []))
        if time.monotonic() - at > READY_CACHE_SECONDS:
            checks = readiness(settings)
            ready_cache["last"] = (time.monotonic(), checks)
        failed = {c.name: c.detail for c in checks if not c.ok}
        if failed:
            return jsonify(status="unavailable", failed=failed), 503
        return jsonify(status="ready"), 200

    # This host's web processes' counters plus the gauges read from Redis and the spool at
    # scrape time.
    registry = web_registry(metrics_redis, spool)

    @app.get("/metrics")
    def metrics_text() -> Response:
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    @app.errorhandler(413)
    def too_large(_: Exception) -> tuple[Response, int]:
        return jsonify(error="payload-too-large"), 413

    return app
