"""Celery's consumer, sending the task events Flower shows in batches a few milliseconds apart.

Celery buffers task events (received, started, succeeded: three a task) and publishes each
buffer as one message, but it flushes on the event loop's very next turn, and the loop turns
for every message it takes and every ack: on a busy worker each flush carried one event or two,
and those publishes took about a seventh of the send worker's time holding the GIL (py-spy;
bench/results.md "Outbound sends"). Here the first event buffered asks for a flush
EVENT_FLUSH_SECONDS later, and the events buffered meanwhile go with it (Celery still flushes
at once when 24 are waiting). Flower shows a task's state that much later; nothing else reads
the events. What is buffered is also flushed when the connection fails (a reconnect hands the
new dispatcher only the events that failed to publish, not the buffer), when the consumer
stops, and when it shuts down: a task that finishes during a warm shutdown buffers its events
after the loop has stopped, where no timer fires. The gevent
pool runs Celery's loop without an event hub, where Celery sends each event at once, and nothing
changes.

Set as `worker_consumer` (worker/broker/celery_app.py): a stock `celery worker` still consumes
our queues; only this worker's event timing differs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger("switchboard.worker")
# Long enough for a busy worker's events to share a message, short against what a person
# watching Flower notices.
EVENT_FLUSH_SECONDS = 0.05


def flush_to_ask(due: float | None, now: float) -> bool:
    """Whether an event buffered at `now` must ask for a flush: none is asked for (`due` is
    None), or the one asked for is overdue by a whole period, so it was lost."""
    return due is None or now > due + EVENT_FLUSH_SECONDS


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer with task events flushed at most every EVENT_FLUSH_SECONDS."""

    # When the flush asked for is due (monotonic clock); None while none is asked for.
    _flush_at: float | None = None

    def on_send_event_buffered(self) -> None:
        # Called from whichever thread sent the event (a pool thread, under the threads pool);
        # the hub's call_soon is the one thread-safe way in, and the timer is then set from the
        # loop's own thread. A flush overdue by a whole period was lost on its way (kombu's
        # loop drops what is left of a turn's callbacks when one of them raises): ask again,
        # or events would wait for 24 to pile up.
        if not self.hub:
            return
        now = time.monotonic()
        if flush_to_ask(self._flush_at, now):
            self._flush_at = now + EVENT_FLUSH_SECONDS
            self.hub.call_soon(self._flush_later)

    def _flush_later(self) -> None:
        self.hub.call_later(EVENT_FLUSH_SECONDS, self._flush_now)

    def _flush_now(self) -> None:
        # Cleared first: an event buffered during the flush asks for the next one.
        self._flush_at = None
        self._flush_events()

    def on_close(self) -> Any:
        # The connection failed (or the worker stops): send what is buffered while this
        # dispatcher is still attached. On a reconnect Celery hands the new dispatcher only the
        # events that failed to publish, not the buffer, which would otherwise be dropped.
        self._flush_quietly()
        return super().on_close()

    def shutdown(self) -> Any:
        # After the pool has finished its tasks: their events were buffered after the loop
        # stopped, where no timer fires.
        self._flush_quietly()
        return super().shutdown()

    def _flush_quietly(self) -> None:
        try:
            self._flush_events()
        except Exception as exc:  # monitoring events must not stop a shutdown or reconnect
            log.warning("task events not sent (%s): Flower may miss the last tasks' outcomes",
                        type(exc).__name__)
