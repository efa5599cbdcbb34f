"""The Celery application: broker settings that make an accepted message hard to lose."""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from kombu.entity import Queue
from kombu.serialization import register
from kombu.utils import json as kombu_json

from worker.crypto import Sealer, UnknownKey, Unsealable, bytes_to_text
from worker.settings import Settings
from worker.stores.connection import broker_transport_options, broker_url

# Queue names and task names are the public contract with the web receiver and other services.
QUEUE_INBOUND = "inbound"
QUEUE_OUTBOUND = "outbound"
QUEUE_STATUS = "status"
QUEUES = (QUEUE_INBOUND, QUEUE_OUTBOUND, QUEUE_STATUS)
TASK_INBOUND_SMS = "switchboard.inbound.sms"
TASK_INBOUND_EMAIL = "switchboard.inbound.email"
TASK_OUTBOUND_SEND = "switchboard.outbound.send"
TASK_TWILIO_STATUS = "switchboard.status.twilio"
TASK_SENDGRID_EVENTS = "switchboard.status.sendgrid"
TASK_RECONCILE = "switchboard.status.reconcile"
# A Communication a FHIR Subscription told us about (outbound queue: it may end in a send).
TASK_SUBSCRIPTION_NOTIFIED = "switchboard.outbound.subscription"
TASK_INBOX_SWEEP = "switchboard.inbox.sweep"
TASK_DEVICE_UPDATE = "switchboard.devices.update"
TASK_INBOUND_CONVERSATIONS = "switchboard.inbound.conversations"
TASK_CONVERSATIONS_DELIVERY = "switchboard.status.conversations"
# WhatsApp replies held for a closed 24-hour window: released when the patient writes, failed
# when they wait too long (worker/outbound/whatsapp.py).
TASK_WHATSAPP_RELEASE = "switchboard.whatsapp.release"
TASK_WHATSAPP_EXPIRE = "switchboard.whatsapp.expire"
# Publish options that keep payloads out of task events (and so out of Flower): the args of
# our tasks carry phone numbers and message bodies.
REDACTED_ARGS = {"argsrepr": "(redacted)", "kwargsrepr": "{}"}

# Task bodies ([args, kwargs, embed], Celery protocol 2) are sealed as one value: the headers
# (task name, id, retries) and the routing stay readable for workers, Flower and kombu.
SEALED_CONTENT_TYPE = "application/x-switchboard-sealed"
SEALED_SERIALIZER = "switchboard-sealed"
# A body that could not be opened is handed to the task as this one argument (the sealed body
# kept as text), so the task dead-letters it as `undecryptable` instead of kombu dropping it
# (kombu acks a message it cannot decode, and rejects one it may not accept, without requeue).
UNDECRYPTABLE = "switchboard_undecryptable"
# Celery's protocol-2 "embed" part of a body (no callbacks, chain or chord).
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_openers_lock = threading.Lock()
_opener: Sealer | None = None  # opens with every key of every app of this process


def undecryptable(args: Any) -> dict[str, str] | None:
    """The placeholder argument of a task body that could not be opened, if that is what
    `args` is: {UNDECRYPTABLE: the sealed body as text, "why": what stopped it}."""
    if args and len(args) == 1 and isinstance(args[0], dict) and UNDECRYPTABLE in args[0]:
        return {k: str(v) for k, v in args[0].items()}
    return None


def open_body(sealer: Sealer, token: bytes) -> Any:
    """A sealed task body as Celery reads it, or the undecryptable placeholder body."""
    try:
        return kombu_json.loads(sealer.open_bytes(token))  # type: ignore[no-untyped-call]
    except Unsealable as exc:
        why = "unknown-key" if isinstance(exc, UnknownKey) else "tampered"
        return [[{UNDECRYPTABLE: bytes_to_text(token), "why": why, "detail": str(exc)}], {}, EMBED]


def _loads(token: bytes) -> Any:
    opener = _opener
    if opener is None:  # pragma: no cover - a serializer is registered before any decode
        raise RuntimeError("no sealing keys registered in this process")
    return open_body(opener, token)


def register_sealed(sealer: Sealer) -> str:
    """Register the sealed serializer for `sealer` with kombu (a process-wide registry) and
    return its name. Each key set gets its own name, so every app seals with its own first key;
    decoding, which kombu looks up by content type alone, opens with every key registered in
    the process (one key set in a deployment; several only in tests)."""
    global _opener
    name = f"{SEALED_SERIALIZER}-{sealer.current_id}"
    with _openers_lock:
        _opener = sealer if _opener is None else _opener.merged(sealer)

        def dumps(body: Any) -> bytes:
            return sealer.seal_bytes(kombu_json.dumps(body).encode())  # type: ignore[no-untyped-call]

        register(name, dumps, _loads, content_type=SEALED_CONTENT_TYPE,  # type: ignore[no-untyped-call]
                 content_encoding="binary")
    return name


def create_celery(settings: Settings) -> Celery:
    """A Celery app for `settings` (the web uses it only to publish; the worker runs tasks)."""
    serializer = register_sealed(settings.sealer())
    app = Celery("switchboard", set_as_current=False)
    app.conf.update(
        # REDIS_URL, or kombu's sentinel:// form with REDIS_SENTINELS (docs/redis-ha.md).
        broker_url=broker_url(settings),
        # No result backend: outcomes are written to FHIR and to the dead-letter store.
        result_backend=None,
        task_ignore_result=True,
        # Ack after the task ran, and give the message back if the worker process dies, so a
        # SIGKILL mid-task means a redelivery (made harmless by conditional creates), not a loss.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Sealed bodies (see SEALED_CONTENT_TYPE); plain JSON is still accepted from services
        # that publish our tasks directly (docs/http-api.md, "The outbound task").
        task_serializer=serializer,
        accept_content=[serializer, "json"],
        task_queues=[Queue(name) for name in QUEUES],  # type: ignore[no-untyped-call]
        task_default_queue=QUEUE_INBOUND,
        task_routes={TASK_INBOUND_SMS: {"queue": QUEUE_INBOUND},
                     TASK_INBOUND_EMAIL: {"queue": QUEUE_INBOUND},
                     TASK_INBOUND_CONVERSATIONS: {"queue": QUEUE_INBOUND},
                     TASK_CONVERSATIONS_DELIVERY: {"queue": QUEUE_STATUS},
                     TASK_OUTBOUND_SEND: {"queue": QUEUE_OUTBOUND},
                     TASK_SUBSCRIPTION_NOTIFIED: {"queue": QUEUE_OUTBOUND},
                     TASK_DEVICE_UPDATE: {"queue": QUEUE_OUTBOUND},
                     TASK_TWILIO_STATUS: {"queue": QUEUE_STATUS},
                     TASK_SENDGRID_EVENTS: {"queue": QUEUE_STATUS},
                     TASK_RECONCILE: {"queue": QUEUE_STATUS},
                     TASK_INBOX_SWEEP: {"queue": QUEUE_STATUS},
                     TASK_WHATSAPP_RELEASE: {"queue": QUEUE_OUTBOUND},
                     TASK_WHATSAPP_EXPIRE: {"queue": QUEUE_STATUS}},
        # `celery beat` (one per deployment) asks for stuck sends to be reconciled.
        beat_schedule={"reconcile-stuck-sends": {
            "task": TASK_RECONCILE, "schedule": settings.reconcile_interval_seconds,
            "options": {"queue": QUEUE_STATUS,
                        "expires": settings.reconcile_interval_seconds}},
            "expire-held-whatsapp": {
                "task": TASK_WHATSAPP_EXPIRE,
                "schedule": settings.whatsapp_expire_interval_seconds,
                "options": {"queue": QUEUE_STATUS,
                            "expires": settings.whatsapp_expire_interval_seconds}},
            "sweep-inbox": {
                "task": TASK_INBOX_SWEEP, "schedule": settings.inbox_sweep_interval_seconds,
                "options": {"queue": QUEUE_STATUS,
                            "expires": settings.inbox_sweep_interval_seconds}}},
        task_create_missing_queues=False,
        broker_transport_options={
            # kombu's Redis transport re-delivers an unacked message after this long; it must
            # exceed every retry countdown, or a message waiting for its ETA runs twice.
            "visibility_timeout": settings.broker_visibility_timeout_seconds,
            # kombu's own sweep gives back what has been unacknowledged for the visibility
            # timeout (whatever liveness did not: worker/broker/liveness.py restores a dead
            # worker's messages long before). Scan on every sweep, not every 10th, and sweep
            # every few seconds, so that is not ~100 s later still. kombu >= 5.7.0: older
            # releases ignore both options silently (pyproject.toml).
            "unacked_restore_throttle": 1,
            "unacked_restore_interval": max(1, min(10, settings.broker_visibility_timeout_seconds
                                                   // 3)),
            # Behind Sentinel: the master name, the Sentinels' password, and the timeouts that
            # make a worker drop a connection to a dead primary (worker/stores/connection.py).
            **broker_transport_options(settings),
        },
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # The worker reconnects to Redis forever (a restart must not stop processing); the web
        # publishes with retry=False instead, so a webhook during an outage answers 503 at once.
        broker_connection_max_retries=None,
        worker_send_task_events=True,
        task_send_sent_event=False,
        worker_hijack_root_logger=True,
        worker_redirect_stdouts=False,
    )
    return app
