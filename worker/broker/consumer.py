"""Celery's consumer, sending the task events Flower shows in batches a few milliseconds apart.

Celery buffers task events (received, started, succeeded: three a task) and publishes each
buffer as one message, but it flushes on the event loop's very next turn, and the loop turns
for every message it takes and every ack: on a busy worker each flush carried one event or two,
and kombu's publish path cost about 0.13 ms of CPU each, a tenth of a send's worker CPU
(py-spy, bench/results.md "Outbound sends"). Here the first event buffered asks for a flush
EVENT_FLUSH_SECONDS later, and the events buffered meanwhile go with it (Celery still flushes
at once when 24 are waiting). Flower shows a task's state that much later; nothing else reads
the events. A task that finishes during a warm shutdown buffers its events after the loop has
stopped, where no timer fires: what is buffered is flushed when the consumer stops and again
when it shuts down (after the pool has finished its tasks). The gevent pool runs Celery's loop
without an event hub, where Celery sends each event at once, and nothing changes.

Set as `worker_consumer` (worker/broker/celery_app.py): a stock `celery worker` still consumes
our queues; only this worker's event timing differs.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger("switchboard.worker")
# Long enough for a busy worker's events to share a message, short against what a person
# watching Flower notices.
EVENT_FLUSH_SECONDS = 0.05


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer with task events flushed at most every EVENT_FLUSH_SECONDS."""

    _flush_due = False

    def on_send_event_buffered(self) -> None:
        # Called from whichever thread sent the event (a pool thread, under the threads
        # pool); the hub's call_soon is the one thread-safe way in, and the timer is then set
        # from the loop's own thread.
        if self.hub and not self._flush_due:
            self._flush_due = True
            self.hub.call_soon(self._flush_later)

    def _flush_later(self) -> None:
        self.hub.call_later(EVENT_FLUSH_SECONDS, self._flush_now)

    def _flush_now(self) -> None:
        # Cleared first: an event buffered during the flush asks for the next one.
        self._flush_due = False
        self._flush_events()

    def stop(self) -> Any:
        self._flush_quietly()
        return super().stop()

    def shutdown(self) -> Any:
        self._flush_quietly()
        return super().shutdown()

    def _flush_quietly(self) -> None:
        try:
            self._flush_events()
        except Exception as exc:  # monitoring events must not stop a shutdown
            log.warning("task events not sent at shutdown (%s): Flower may miss the last "
                        "tasks' outcomes", type(exc).__name__)
