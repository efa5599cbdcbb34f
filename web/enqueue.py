"""Publishing to the broker from the request path: one app and producer pool per process."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery

from worker.broker.celery_app import REDACTED_ARGS, create_celery
from worker.settings import Settings
from worker.stores.inbox import HEADER as INBOX_HEADER
from worker.stores.inbox import Inbox

log = logging.getLogger("switchboard.web")
# Each Redis step of an enqueue (the inbox write, the publish) gives up after this long, so a
# stalled Redis (SIGSTOP, a full network buffer) is a prompt 503, not a request hanging until
# the provider times out. Twilio waits 15 s for an answer.
STEP_TIMEOUT_SECONDS = 1.0


class EnqueueFailed(Exception):
    """The broker did not take the message; the caller must not answer 2xx."""


class Enqueuer:
    """Sends tasks by name (the web never imports task code)."""

    def __init__(self, celery: Celery, inbox: Inbox) -> None:
        self._celery = celery
        self._inbox = inbox

    @classmethod
    def from_settings(cls, settings: Settings) -> Enqueuer:
        """An Enqueuer publishing to the configured broker."""
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=STEP_TIMEOUT_SECONDS,
                                      socket_connect_timeout=STEP_TIMEOUT_SECONDS)
        celery = create_celery(settings)
        # The receiver's own producer only: workers keep kombu's defaults for their long polls.
        celery.conf.broker_connection_timeout = STEP_TIMEOUT_SECONDS
        celery.conf.broker_transport_options = {
            **celery.conf.broker_transport_options,
            "socket_timeout": STEP_TIMEOUT_SECONDS,
            "socket_connect_timeout": STEP_TIMEOUT_SECONDS}
        return cls(celery, Inbox(client))

    def send(self, task: str, queue: str, args: list[Any], inbox_key: str) -> str:
        """Record the message in the inbox, then publish it; raises EnqueueFailed unless both
        happened (the caller must then not answer 2xx).

        retry=False: during a Redis outage the provider gets a 5xx now and retries later, which
        is safer than holding the request open while kombu reconnects.
        """
        try:
            self._inbox.accept(inbox_key, task, queue, args, wait_seconds=STEP_TIMEOUT_SECONDS)
        except Exception as exc:  # redis raises many types; all mean "not kept"
            log.error("enqueue of %s failed: %s", task, type(exc).__name__)
            raise EnqueueFailed(type(exc).__name__) from exc
        try:
            result = self._celery.send_task(task, args=args, queue=queue, retry=False,
                                            headers={INBOX_HEADER: inbox_key},
                                            **REDACTED_ARGS)
        except Exception as exc:  # kombu/redis raise many types; all mean "not enqueued"
            log.error("enqueue of %s failed: %s", task, type(exc).__name__)
            # A 5xx must mean "not kept": take the inbox entry back, or the sweep would process
            # a message the provider was told we refused. (A publish that ran despite the error
            # is processed as usual: every write is idempotent and the provider's retry finds
            # it done.) If Redis is too far gone even for that, the entry stays for the sweep.
            try:
                self._inbox.done(inbox_key)
            except Exception as cleanup:
                log.error("inbox entry of a refused %s kept (%s)", task,
                          type(cleanup).__name__)
            raise EnqueueFailed(type(exc).__name__) from exc
        return str(result.id)
