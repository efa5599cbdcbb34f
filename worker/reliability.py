"""The one place that turns a task's failure into a retry or a dead letter (STYLE.md habit 2).

- TransientError (and Redis blips): retry with exponential backoff and jitter, up to
  RETRY_MAX_ATTEMPTS; then dead letter with reason `retries-exhausted`.
- PermanentError: dead letter at once with its reason; the task then succeeds (the message is
  safe in the store, so Celery must not redeliver it).
- Anything else is a bug: dead letter as `unexpected-error` and re-raise so it is loud.
Logs carry reasons and ids only, never payloads or error details (which can hold PHI).
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
from celery import Task

from worker.backoff import retry_delay
from worker.dead_letter import REPLAY_HEADER
from worker.errors import PermanentError, TransientError
from worker.runtime import get_runtime

log = logging.getLogger("switchboard.tasks")


class SwitchboardTask(Task):  # type: ignore[misc]
    """Base class of every Switchboard task: retry vs dead letter, decided here only."""

    abstract = True
    # Retries are scheduled by __call__ below; Celery's own max_retries must not cut them short.
    max_retries = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rt = get_runtime()
        settings = rt.settings
        attempt = int(self.request.retries or 0) + 1
        try:
            result = self.run(*args, **kwargs)
        except (TransientError, redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError) as exc:
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
            # exc= is shown in Celery's own log line: give it the reason only, no detail.
            raise self.retry(exc=TransientError(reason), countdown=countdown) from None
        except PermanentError as exc:
            self._dead_letter(args, kwargs, exc.reason, exc.detail, attempt)
            return None
        except Exception as exc:
            self._dead_letter(args, kwargs, "unexpected-error", type(exc).__name__, attempt)
            raise
        replay_of = self.request.get(REPLAY_HEADER) or (self.request.headers or {}).get(
            REPLAY_HEADER)
        if replay_of:
            rt.dead_letters.remove(str(replay_of))
            log.info("task %s[%s] replay of dead letter %s succeeded; entry removed",
                     self.name, self.request.id, replay_of)
        return result

    def _dead_letter(self, args: Any, kwargs: Any, reason: str, detail: str, attempts: int
                     ) -> None:
        queue = (self.request.delivery_info or {}).get("routing_key") or self.queue or ""
        entry = get_runtime().dead_letters.record(
            self.name, str(queue), list(args), dict(kwargs), reason, detail, attempts)
        log.error("task %s[%s] dead-lettered as %s (reason %s, after %d attempts)",
                  self.name, self.request.id, entry.id, reason, attempts)
