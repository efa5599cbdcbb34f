"""The webhooks' enqueue: to Redis, or, when Redis did not take it, to the disk spool.

A provider's webhook answered 2xx is never sent again, so it must be kept somewhere: Redis
normally, the spool (worker/broker/spool.py) while Redis is down, stalled past the enqueue's
bound, or not replicated in time (all of which `Enqueuer.send` reports as EnqueueFailed). Only
when neither took it does the route answer 503, as it did before the spool.
"""

from __future__ import annotations

import logging
from typing import Any

from web.enqueue import EnqueueFailed, Enqueuer
from worker.broker.spool import Flushed, Flusher, Spool, Spooled, SpoolRefused
from worker.ops.metrics import Metrics
from worker.settings import Settings
from worker.stores.email_posts import EmailPosts

log = logging.getLogger("switchboard.web")


class SpoolingEnqueuer:
    """`send` as Enqueuer's, falling back to the spool; `republish` is the flusher's publish."""

    def __init__(self, enqueuer: Enqueuer, spool: Spool | None, posts: EmailPosts,
                 metrics: Metrics) -> None:
        self._enqueuer = enqueuer
        self.spool = spool
        self._posts = posts
        self._metrics = metrics

    def send(self, task: str, queue: str, args: list[Any], inbox_key: str,
             post: tuple[str, bytes] | None = None, queue_first: bool = True) -> str:
        """Queue the message, or spool it; "queued" or "spooled". Raises EnqueueFailed when
        neither kept it (the caller answers 5xx). `post`: an inbound email's bytes, kept with
        the spooled entry (the post store lives in Redis too); `queue_first=False` goes
        straight to the spool (the post could not even be stored)."""
        if queue_first:
            try:
                self._enqueuer.send(task, queue, args, inbox_key)
                return "queued"
            except EnqueueFailed:
                if self.spool is None:
                    raise
        elif self.spool is None:
            raise EnqueueFailed("no spool")
        try:
            self.spool.append(Spooled(task, queue, args, inbox_key, post))
        except SpoolRefused as exc:
            log.error("spooling %s failed: %s", task, exc.reason)
            self._metrics.inc("switchboard_spool_refused", reason=exc.reason)
            raise EnqueueFailed("spool: " + exc.reason) from exc
        self._metrics.inc("switchboard_spool_appended")
        return "spooled"

    def republish(self, entry: Spooled) -> None:
        """Publish a spooled entry: its email post back in the post store first, then the task,
        at most once per entry (the publish's marker). Raises when Redis did not take it."""
        if entry.post is not None:
            self._posts.put(*entry.post)
        self._enqueuer.send(entry.task, entry.queue, entry.args, entry.inbox_key, once=entry.id)

    def counted(self, done: Flushed) -> None:
        """Count what a flush did."""
        if done.published:
            self._metrics.inc("switchboard_spool_published", done.published)
        if done.kept:
            self._metrics.inc("switchboard_spool_kept", done.kept)


def flusher(settings: Settings, spooling: SpoolingEnqueuer) -> Flusher | None:
    """The spool's flusher for this process (started after the fork: web/gunicorn_conf.py)."""
    if spooling.spool is None:
        return None
    return Flusher(spooling.spool, spooling.republish, settings.spool_flush_interval_seconds,
                   spooling.counted)
