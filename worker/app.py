"""The worker's Celery app, configured from the environment: `celery -A worker.app worker`."""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery.signals import after_setup_logger, after_setup_task_logger

from worker.broker.celery_app import create_celery
from worker.ops import logs
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
