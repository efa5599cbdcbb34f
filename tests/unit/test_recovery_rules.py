"""The recovery goal as a rule: at the default settings a SIGKILLed worker's messages are back in
their queue early enough to be written within 15 s of its death, without a timed test."""

from __future__ import annotations

from tests.unit.test_settings import GOOD
from worker.broker.liveness import restored_within
from worker.settings import load_settings

RECOVERY_GOAL_SECONDS = 15.0  # every message written within this long of a worker SIGKILL
# What the goal leaves for the restored messages to run once back at the head of their queue:
# a FHIR write or two each (measured in tests/bench/recovery.py).
RUN_SECONDS = 5.0


def test_a_dead_workers_messages_wait_at_most_a_beat_past_its_expiry() -> None:
    assert restored_within(heartbeat=2.0, dead_after=8.0) == 10.0
    assert restored_within(heartbeat=0.5, dead_after=1.5) == 2.0


def test_at_the_defaults_they_are_back_in_time_to_meet_the_recovery_goal() -> None:
    s = load_settings(GOOD)
    waited = restored_within(s.worker_heartbeat_seconds, s.worker_dead_after_seconds)
    assert waited + RUN_SECONDS <= RECOVERY_GOAL_SECONDS, waited
    # ...and long before kombu's own restore, the visibility timeout, which must outlast every
    # retry countdown and so cannot be what brings them back.
    assert s.broker_visibility_timeout_seconds > s.retry_backoff_max_seconds > waited
