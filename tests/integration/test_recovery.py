"""A SIGKILLed worker's messages are written at default settings (no shrunk timeouts), brought
back by the liveness janitor when its heartbeat expires, not by kombu's visibility timeout. How
soon is a rule (tests/unit/test_recovery_rules.py) and a measurement (tests/bench/recovery.py),
not a timed assertion here."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import Services
from tests.integration.test_inbound_sms import PATIENT, deliver
from tests.support import Sandbox, eventually, sms_params
from worker.ops import devstack
from worker.settings import Settings

# A failure deadline, far above the goal: a machine shared by parallel runs can be slow.
GIVE_UP_SECONDS = 120.0


def test_defaults_are_what_production_runs() -> None:
    defaults = Settings.model_fields
    assert defaults["broker_visibility_timeout_seconds"].default == 3600
    assert defaults["inbox_stale_seconds"].default == 1800


def test_a_killed_workers_messages_come_back_when_its_heartbeat_expires(
        services: Services, sandbox: Sandbox, log_dir: Path) -> None:
    svc = services.get(worker=False, SMS_THREAD_STRATEGY="new-thread")
    for name in ("BROKER_VISIBILITY_TIMEOUT_SECONDS", "WORKER_HEARTBEAT_SECONDS",
                 "WORKER_DEAD_AFTER_SECONDS", "INBOX_STALE_SECONDS"):
        assert name not in svc.env  # the defaults: kombu would give them back after an hour
    sandbox.patient(PATIENT)
    # Slow writes, so the worker holds messages (running and prefetched) when it is killed.
    sandbox.fault(delay_ms=5000, count=4, method="POST")
    doomed = devstack.start_worker(svc.env, log_dir, name="worker-recovery-doomed",
                                   concurrency=4)
    messages = [sms_params(PATIENT, f"crash {i}") for i in range(8)]
    for m in messages:
        deliver(svc, m)
    eventually(lambda: svc.redis.hlen("unacked") >= 4, what="messages held by the worker")
    doomed.kill()
    replacement = devstack.start_worker(svc.env, log_dir, name="worker-recovery-replacement",
                                        concurrency=4)
    try:
        eventually(lambda: all(sandbox.messages(m["MessageSid"]) for m in messages),
                   timeout=GIVE_UP_SECONDS, what="every message written")
        assert all(len(sandbox.messages(m["MessageSid"])) == 1 for m in messages)
        assert svc.dead_letters.count() == 0
        eventually(lambda: svc.redis.hlen("unacked") == 0, what="everything acknowledged")
        # The janitor saw the heartbeat expire and gave back what the dead worker held (those
        # it had not finished; kombu's own restore would have waited the visibility timeout).
        restored = re.findall(r"stopped beating; (\d+) of its messages put back",
                              replacement.output())
        assert restored and int(restored[0]) >= 1, replacement.output()[-2000:]
    finally:
        replacement.stop()


def test_a_message_that_kills_every_worker_is_dead_lettered_after_max_deliveries(
        services: Services, sandbox: Sandbox, log_dir: Path) -> None:
    # Each worker that takes the message dies on it (SIGKILLed while its FHIR write hangs);
    # the liveness janitor gives it back, marked redelivered. With MAX_DELIVERIES=2 the third
    # delivery must not run it again: it is dead-lettered as a delivery loop.
    svc = services.get(worker=False, SMS_THREAD_STRATEGY="new-thread", MAX_DELIVERIES="2",
                       WORKER_HEARTBEAT_SECONDS="0.5", WORKER_DEAD_AFTER_SECONDS="1.5")
    sandbox.patient(PATIENT)
    # Two deliveries hang in their FHIR write (inside the client's 10 s timeout) until killed.
    sandbox.fault(delay_ms=8000, count=2, method="POST")
    poison = sms_params(PATIENT, "crash every worker")
    deliver(svc, poison)
    for n in (1, 2):
        doomed = devstack.start_worker(svc.env, log_dir, name=f"worker-loop-doomed-{n}",
                                       concurrency=1)
        eventually(lambda n=n: sum(f.get("count", 0) for f in sandbox.faults()) == 2 - n,
                   timeout=30, what=f"delivery {n} inside its FHIR write")
        doomed.kill()
    last = devstack.start_worker(svc.env, log_dir, name="worker-loop-last", concurrency=1)
    try:
        entry = eventually(lambda: svc.dead_letters.list(), timeout=60,
                           what="the poison message dead-lettered")[0]
        assert entry.reason == "delivery-loop"
        assert entry.args[0]["MessageSid"] == poison["MessageSid"]
        assert sandbox.messages(poison["MessageSid"]) == []
        eventually(lambda: svc.redis.hlen("unacked") == 0, what="acknowledged")
    finally:
        last.stop()
