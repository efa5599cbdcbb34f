"""The worker's Celery app, configured from the environment: `celery -A worker.app worker`."""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    task_postrun,
    task_received,
    worker_ready,
    worker_shutting_down,
)

from worker.broker.celery_app import QUEUES, create_celery
from worker.broker.liveness import Liveness
from worker.ops import logs
from worker.ops.metrics import start_worker_server
from worker.runtime import get_runtime
from worker.settings import ConfigError

try:
    app = create_celery(get_runtime().settings)
except ConfigError as exc:  # fail fast, with every problem listed
    print(exc, file=sys.stderr)
    raise SystemExit(2) from None
app.set_current()
app.set_default()

import worker.tasks  # noqa: E402,F401  (registers the tasks on this app)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _redact_worker_logs(logger: logging.Logger, **_: Any) -> None:
    # Celery configures its handlers after import; attach the PHI filter once they exist.
    logs.install(logger, fmt=get_runtime().settings.log_format)


_liveness: Liveness | None = None
_liveness_connection: Any = None  # the kombu connection whose channel the janitor restores with
_metrics_server: Any = None


@worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    # In the worker's main process: with the threads pool every task runs in this process, so
    # its registry holds every count of this worker (worker/ops/metrics.py).
    global _metrics_server
    settings = get_runtime().settings
    if settings.worker_metrics_port:
        _metrics_server = start_worker_server(settings.worker_metrics_port,
                                              settings.worker_metrics_host)


@worker_ready.connect
def _start_liveness(**_: Any) -> None:
    # In the worker's main process, where kombu's consumer takes messages: heartbeat, record of
    # held messages, and the janitor giving back the messages of workers that died.
    global _liveness, _liveness_connection
    rt = get_runtime()
    # A connection of its own (same broker URL and transport options as the consumer's): kombu
    # channels are not shared between threads, and the janitor runs on a thread of its own.
    _liveness_connection = app.connection_for_write()
    _liveness = Liveness(rt.redis, _liveness_connection.default_channel, QUEUES,
                         interval=rt.settings.worker_heartbeat_seconds,
                         dead_after=rt.settings.worker_dead_after_seconds,
                         on_recovered=lambda n: rt.metrics.inc(
                             "switchboard_messages_recovered", n))
    _liveness.start()


@task_received.connect
def _held(request: Any, **_: Any) -> None:
    if _liveness is not None:
        _liveness.received(str(request.message.delivery_tag), str(request.id))


@task_postrun.connect
def _done(task_id: str, task: Any = None, **_: Any) -> None:
    if _liveness is not None:
        # kombu's Redis transport puts the delivery tag in the message properties, which
        # Celery keeps on the request that is still current here.
        properties = getattr(getattr(task, "request", None), "properties", None) or {}
        tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
        _liveness.finished(str(task_id), str(tag) if tag else None)


@worker_shutting_down.connect
def _stop_liveness(**_: Any) -> None:
    # A warm shutdown gives this worker's unacked messages back by itself (kombu).
    if _liveness is not None:
        _liveness.stop()
    if _metrics_server is not None:
        _metrics_server.shutdown()
    if _liveness_connection is not None:
        _liveness_connection.close()
