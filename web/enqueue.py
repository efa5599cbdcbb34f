"""Publishing to the broker from the request path: one app and producer pool per process."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from worker.celery_app import REDACTED_ARGS, create_celery
from worker.settings import Settings

log = logging.getLogger("switchboard.web")


class EnqueueFailed(Exception):
    """The broker did not take the message; the caller must not answer 2xx."""


class Enqueuer:
    """Sends tasks by name (the web never imports task code)."""

    def __init__(self, celery: Celery) -> None:
        self._celery = celery

    @classmethod
    def from_settings(cls, settings: Settings) -> Enqueuer:
        """An Enqueuer publishing to the configured broker."""
        return cls(create_celery(settings))

    def send(self, task: str, queue: str, args: list[Any]) -> str:
        """Publish one task message; raises EnqueueFailed if Redis did not accept it.

        retry=False: during a Redis outage the provider gets a 5xx now and retries later, which
        is safer than holding the request open while kombu reconnects.
        """
        try:
            result = self._celery.send_task(task, args=args, queue=queue, retry=False,
                                            **REDACTED_ARGS)
        except Exception as exc:  # kombu/redis raise many types; all mean "not enqueued"
            log.error("enqueue of %s failed: %s", task, type(exc).__name__)
            raise EnqueueFailed(type(exc).__name__) from exc
        return str(result.id)
