"""The one place that turns a task's failure into a retry or a dead letter (docs/design.md,
habit 2).

- TransientError (and Redis blips): retry with exponential backoff and jitter, up to
  RETRY_MAX_ATTEMPTS; then dead letter with reason `retries-exhausted`.
- PermanentError: dead letter at once with its reason; the task then succeeds (the message is
  safe in the store, so Celery must not redeliver it).
- Anything else is a bug: dead letter as `unexpected-error` and re-raise so it is loud.
- Deferred (a send waiting for its slot): published again for later without spending an
  attempt, its payload updated with what the wait needs; after MAX_DEFERRALS deferrals of one
  message, dead letter with reason `deferral-loop` (a wait that never ends must not cycle).
- A message whose processing keeps killing the worker (redelivered by the broker without ever
  finishing) is dead-lettered as `delivery-loop` after MAX_DELIVERIES.
- If the dead-letter write or the retry publish itself fails because Redis is unavailable, the
  message is handed back to the broker (Reject requeue=True), never acknowledged: a message is
  only ever acked once it is written, dead-lettered, or re-published.
- A message that can be neither processed nor dead-lettered for any other reason, or that keeps
  coming back after MAX_DELIVERIES (its dead letter kept failing), is quarantined: a minimal
  record without payload (`switchboard dlq quarantined`), a metric and an error line, then it is
  acknowledged. It ends somewhere a person sees it; it never cycles.
Logs carry reasons and ids only, never payloads or error details (which can hold PHI).
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
from celery import Task
from celery.exceptions import Reject, Retry

from worker.broker.backoff import retry_delay
from worker.broker.celery_app import REDACTED_ARGS, undecryptable
from worker.errors import Deferred, PermanentError, TransientError
from worker.ops import logs
from worker.runtime import get_runtime
from worker.stores.dead_letters import REPLAY_HEADER, quarantine
from worker.stores.inbox import HEADER as INBOX_HEADER

log = logging.getLogger("switchboard.tasks")

# Redis answers that mean "not now" rather than "never": a dropped connection, a timeout, a
# full instance under noeviction, a replica after failover.
REDIS_TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                   redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)
DELIVERY_KEY = "switchboard:deliveries:"
# The payload field counting a task's deferrals (bounded by MAX_DEFERRALS).
DEFERRALS = "deferrals"


def message_key(args: Any) -> str | None:
    """The id a person looks for in the logs: the provider message id, else the Communication
    or the API request (never anything that names the patient)."""
    payload = args[0] if args and isinstance(args[0], dict) else {}
    for key in ("MessageSid", "email_ref", "communication", "request_id"):
        if payload.get(key):
            return str(payload[key])
    return None


def _deferrals(payload: dict[str, Any]) -> int:
    """How often this payload was deferred before (0 for anything but a sane count)."""
    count = payload.get(DEFERRALS)
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0


class SwitchboardTask(Task):  # type: ignore[misc]
    """Base class of every Switchboard task: retry vs dead letter, decided here only."""

    abstract = True
    # Retries are scheduled by __call__ below; Celery's own max_retries must not cut them short.
    max_retries = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        queue = (self.request.delivery_info or {}).get("routing_key") or self.queue
        logs.bind_task(task_id=str(self.request.id), task=self.name, queue=queue,
                       message_id=message_key(args))
        try:
            return self._call(args, kwargs)
        finally:
            logs.unbind_task()

    def _call(self, args: Any, kwargs: Any) -> Any:
        rt = get_runtime()
        settings = rt.settings
        attempt = self._attempt()
        try:
            deliveries = self._deliveries()
            if deliveries > 2 * settings.max_deliveries:
                # Even the dead-letter write kept failing on this message: stop the loop here.
                self._quarantine("delivery-loop")
                return None
            if deliveries > settings.max_deliveries:
                raise PermanentError("delivery-loop", "the worker died on every delivery")
            held = undecryptable(args)
            if held is not None:
                # Sealed with a key this worker lacks (or damaged): kept sealed in the
                # dead-letter store, replayable once the key is configured again.
                raise PermanentError("undecryptable", held.get("detail", ""))
            result = self.run(*args, **kwargs)
        except Deferred as exc:
            if args and isinstance(args[0], dict):
                payload = args[0]
                deferrals = _deferrals(payload) + 1
                if deferrals > settings.max_deferrals:
                    # A wait that keeps moving (a slot taken afresh on every run) would cycle
                    # for ever; it ends here, replayable. The count is not kept in the dead
                    # letter, so a replay starts afresh.
                    fresh = {k: v for k, v in payload.items() if k != DEFERRALS}
                    self._dead_letter((fresh, *args[1:]), kwargs, "deferral-loop",
                                      f"deferred {deferrals - 1} times ({exc.reason}) and "
                                      "still waiting", attempt)
                    return None
                args = ({**payload, **exc.changes, DEFERRALS: deferrals}, *args[1:])
            self._defer(args, kwargs, exc.countdown)
            self._count("deferred")
            self._touch_inbox()
            return None
        except (TransientError, *REDIS_TRANSIENT) as exc:
            reason = exc.reason if isinstance(exc, TransientError) else "redis-unavailable"
            if attempt >= settings.retry_max_attempts:
                detail = exc.detail if isinstance(exc, TransientError) else type(exc).__name__
                self._dead_letter(args, kwargs, "retries-exhausted", f"{reason}: {detail}",
                                  attempt)
                return None
            hint = exc.retry_after if isinstance(exc, TransientError) else None
            countdown = retry_delay(attempt, settings.retry_backoff_base_seconds,
                                    settings.retry_backoff_max_seconds, hint)
            log.warning("task %s[%s] attempt %d failed (%s); retry in %.1fs", self.name,
                        self.request.id, attempt, reason, countdown)
            self._count("retried")
            rt.metrics.inc("switchboard_task_retries", task=self.name, reason=reason)
            self._touch_inbox()
            self._retry(reason, countdown)
        except PermanentError as exc:
            self._dead_letter(args, kwargs, exc.reason, exc.detail, attempt)
            return None
        except Exception as exc:
            self._dead_letter(args, kwargs, "unexpected-error", type(exc).__name__, attempt)
            self._count("failed")
            raise
        self._count("succeeded")
        self._finished(at_once=False)
        replay_of = self.request.get(REPLAY_HEADER)
        if replay_of:
            rt.dead_letters.remove(str(replay_of))
            log.info("task %s[%s] replay of dead letter %s succeeded; entry removed",
                     self.name, self.request.id, replay_of)
        return result

    def _attempt(self) -> int:
        """This run's attempt: 1 + the retries spent before it."""
        return int(self.request.retries or 0) + 1

    def _delivery_counts(self) -> tuple[str, ...]:
        """The key counting this attempt's deliveries, when it has one: only a redelivery is
        counted (see _deliveries)."""
        if not self._redelivered():
            return ()
        return (f"{DELIVERY_KEY}{self.request.id}:{self._attempt()}",)

    def _deliveries(self) -> int:
        """How often the broker has handed us this attempt (>1 means a worker died on it).

        Only a redelivery is counted in Redis: every way a message comes back (kombu at the
        visibility timeout, a requeueing reject, a warm shutdown, the liveness janitor) marks
        it redelivered, and a first delivery, the common case, then costs no round trip. The
        first delivery is the 1 added to the count."""
        counts = self._delivery_counts()
        if not counts:
            return 1
        key, = counts
        pipe = get_runtime().redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, 7 * 24 * 3600)
        count, _ = pipe.execute()
        return int(count) + 1

    def _defer(self, args: Any, kwargs: Any, countdown: float) -> None:
        """Publish this task again for later without spending a retry attempt, then ack."""
        sig = self.signature_from_request(self.request, args, kwargs, countdown=countdown,
                                          retries=self.request.retries, **REDACTED_ARGS)
        try:
            sig.apply_async()
        except Exception as exc:
            raise Reject(type(exc).__name__, requeue=True) from None
        # The deferred copy is a new delivery of the same attempt, not a crash loop (only a
        # redelivery has a count to forget).
        counts = self._delivery_counts()
        if counts:
            get_runtime().redis.delete(*counts)

    def _retry(self, reason: str, countdown: float) -> None:
        try:
            # exc= is shown in Celery's own log line: give it the reason only, no detail.
            raise self.retry(exc=TransientError(reason), countdown=countdown, **REDACTED_ARGS)
        except Reject as rejected:
            # Celery drops the message (requeue=False) when the retry cannot be published;
            # hand it back to the broker instead, to be redelivered later.
            log.error("task %s[%s] retry could not be published; requeued", self.name,
                      self.request.id)
            raise Reject(rejected.reason, requeue=True) from None
        except Retry:
            raise

    def _dead_letter(self, args: Any, kwargs: Any, reason: str, detail: str, attempts: int
                     ) -> None:
        queue = self._queue()
        try:
            entry = get_runtime().dead_letters.record(
                self.name, queue, list(args), dict(kwargs), reason, detail, attempts,
                task_id=str(self.request.id))
        except REDIS_TRANSIENT as exc:
            # Not stored means not safe: refuse to ack, so the broker keeps the message until
            # Redis takes writes again.
            log.error("task %s[%s] could not be dead-lettered (%s); requeued", self.name,
                      self.request.id, type(exc).__name__)
            raise Reject(type(exc).__name__, requeue=True) from None
        except Exception as exc:
            # Not Redis: something about this message. Redelivering it would fail the same way.
            log.error("task %s[%s] could not be dead-lettered (%s)", self.name,
                      self.request.id, type(exc).__name__)
            self._quarantine(reason)
            return
        log.error("task %s[%s] dead-lettered as %s (reason %s, after %d attempts)",
                  self.name, self.request.id, entry.id, reason, attempts)
        self._count("dead_lettered")
        self._finished()  # safe in the dead-letter store: no longer the inbox's business
        get_runtime().metrics.inc("switchboard_dead_letters", task=self.name, reason=reason)
        self.dead_lettered(args, kwargs, reason, detail)

    def _queue(self) -> str:
        return str((self.request.delivery_info or {}).get("routing_key") or self.queue or "")

    def _quarantine(self, reason: str) -> None:
        """Drop a message that can be neither processed nor dead-lettered, leaving a minimal
        record, a metric and an error line (an alert should fire on any)."""
        rt = get_runtime()
        try:
            quarantine(rt.redis, self.name, str(self.request.id), self._queue(), reason)
        except REDIS_TRANSIENT as exc:
            raise Reject(type(exc).__name__, requeue=True) from None
        log.error("task %s[%s] QUARANTINED (reason %s): neither processed nor dead-lettered; "
                  "see `switchboard dlq quarantined`", self.name, self.request.id, reason)
        rt.metrics.inc("switchboard_quarantined", task=self.name, reason=reason)
        self._count("quarantined")
        self._finished()  # never re-published by the inbox sweep

    def _touch_inbox(self) -> None:
        key = self.request.get(INBOX_HEADER)
        if key:
            get_runtime().inbox.touch(str(key))

    def _finished(self, at_once: bool = True) -> None:
        """The message reached an end: its inbox entry and this attempt's delivery count (a
        redelivery's: a first delivery has none) go together. A written message's go from the
        inbox's own thread, moments later (`Inbox.done_soon`); a dead letter's at once."""
        rt = get_runtime()
        count = self._delivery_counts()
        key = self.request.get(INBOX_HEADER)
        if key and not at_once:
            rt.inbox.done_soon(str(key), also_delete=count)
        elif key:
            rt.inbox.done(str(key), also_delete=count)
        elif count:
            rt.redis.delete(*count)

    def _redelivered(self) -> bool:
        """The broker gave this message back after a worker took it (kombu and the liveness
        janitor mark it so)."""
        return bool((self.request.delivery_info or {}).get("redelivered"))

    def _count(self, outcome: str) -> None:
        get_runtime().metrics.inc("switchboard_tasks", task=self.name, outcome=outcome)

    def dead_lettered(self, args: Any, kwargs: Any, reason: str, detail: str) -> None:
        """Hook for a task that must tell someone its message was dead-lettered."""
