"""Publishing to the broker from the request path: one round trip, bounded in time."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery

from worker.broker.celery_app import create_celery
from worker.broker.publish import (
    ACCEPT_AND_PUBLISH,
    REPUBLISH_ONCE,
    TaskMessages,
    accept_and_publish,
    replicated,
)
from worker.crypto import Sealer
from worker.settings import Settings
from worker.stores.connection import redis_client
from worker.stores.inbox import HEADER as INBOX_HEADER

log = logging.getLogger("switchboard.web")
# The enqueue gives up after this long, so a stalled Redis (SIGSTOP, a full network buffer) is
# a prompt 503, not a request hanging until the provider times out (Twilio waits 15 s).
STEP_TIMEOUT_SECONDS = 1.0
# With REDIS_MIN_REPLICAS_ACK, how long the primary waits for replicas to acknowledge the step
# (WAIT). Half the step's bound: the step itself and the WAIT's answer must both arrive within
# STEP_TIMEOUT_SECONDS of the request reaching Redis. Replicas on the same LAN acknowledge
# within a millisecond or two (docs/redis-ha.md has the p50/p99 it costs).
REPLICA_WAIT_MS = int(STEP_TIMEOUT_SECONDS * 1000 / 2)


class EnqueueFailed(Exception):
    """The broker did not take the message; the caller must not answer 2xx."""


class Enqueuer:
    """Sends tasks by name (the web never imports task code): the inbox entry and the task
    message in one atomic Lua step (worker/broker/publish.py), so a 2xx means both are in Redis
    and a 5xx means neither is. With `min_replicas` (REDIS_MIN_REPLICAS_ACK), a 2xx also
    means that many replicas hold both; fewer in time fails the send like Redis being down
    (the message may then still be run: a provider's retry of it is deduplicated)."""

    def __init__(self, celery: Celery, client: redis.Redis, sealer: Sealer,
                 min_replicas: int = 0) -> None:
        self._messages = TaskMessages(celery, sealer)
        script = client.register_script(ACCEPT_AND_PUBLISH)
        once = client.register_script(REPUBLISH_ONCE)
        # Without replicas to wait for, the plain step: its speed is the receiver's. A spooled
        # entry the flusher publishes again waits for them too: the spool lets it go after.
        self._script: Any = replicated(script, min_replicas, REPLICA_WAIT_MS) \
            if min_replicas else script
        self._once: Any = replicated(once, min_replicas, REPLICA_WAIT_MS) \
            if min_replicas else once

    @classmethod
    def from_settings(cls, settings: Settings) -> Enqueuer:
        """An Enqueuer publishing to the configured broker."""
        client = redis_client(settings, socket_timeout=STEP_TIMEOUT_SECONDS,
                              socket_connect_timeout=STEP_TIMEOUT_SECONDS)
        return cls(create_celery(settings), client, settings.sealer(),
                   settings.redis_min_replicas_ack)

    def send(self, task: str, queue: str, args: list[Any], inbox_key: str,
             once: str | None = None) -> str:
        """Record the message in the inbox and publish it; raises EnqueueFailed unless both
        happened (the caller must then not answer 2xx). Returns the task id. `once`: a
        spooled entry's id, published at most once however often this is called with it."""
        try:
            return accept_and_publish(self._once if once else self._script, self._messages,
                                      task, queue, args, inbox_key, STEP_TIMEOUT_SECONDS,
                                      {INBOX_HEADER: inbox_key}, once)
        except Exception as exc:  # redis raises many types; all mean "not kept" (or not
            # replicated: NotReplicated)
            log.error("enqueue of %s failed: %s", task, type(exc).__name__)
            raise EnqueueFailed(type(exc).__name__) from exc
