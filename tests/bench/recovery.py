"""Recovery after a worker is SIGKILLed, at default settings (visibility timeout an hour, inbox
sweep half an hour, liveness heartbeat 2 s, dead after 8 s): how long after the kill each message
it held is written."""

from __future__ import annotations

import json
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from tests.bench.backends import start
from web.enqueue import Enqueuer
from worker.broker.celery_app import QUEUE_INBOUND, TASK_INBOUND_SMS
from worker.broker.liveness import restored_within
from worker.ops import devstack

CLINIC = "+15557654321"


def run(log_dir: Path, quick: bool = False) -> list[str]:
    """Kill a busy worker, start a replacement, time every message it held."""
    messages = 40 if quick else 120
    # Every broker and inbox setting at its default.
    backends = start(log_dir, "recovery")
    env, settings, sandbox = backends.env, backends.settings, backends.sandbox
    phones = [f"+1555{4000000 + i:07d}" for i in range(20)]
    for phone in phones:
        sandbox.patient(phone)
    # Slow FHIR writes, so the worker is holding work (running and prefetched) when it dies.
    sandbox.fault(delay_ms=3000, count=16, method="POST")
    doomed = devstack.start_worker(env, log_dir, name="bench-recovery-doomed", concurrency=16)
    enqueuer = Enqueuer.from_settings(settings)
    sids = []
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    for i in range(messages):
        sid = "SM" + uuid.uuid4().hex
        sids.append(sid)
        params = {"MessageSid": sid, "AccountSid": "ACbench", "From": phones[i % len(phones)],
                  "To": CLINIC, "Body": f"recovery {i}", "NumMedia": "0"}
        enqueuer.send(TASK_INBOUND_SMS, QUEUE_INBOUND, [params, {"received_at": now}],
                      f"sms:{sid}")
    time.sleep(2.0)
    doomed.kill()
    killed_at, killed_wall = time.monotonic(), time.time()
    replacement = devstack.start_worker(env, log_dir, name="bench-recovery-replacement",
                                        concurrency=16)
    written_at: dict[str, float] = {}
    try:
        deadline = killed_at + 300
        while len(written_at) < messages and time.monotonic() < deadline:
            for sid in sids:
                if sid not in written_at and sandbox.messages(sid):
                    written_at[sid] = time.monotonic() - killed_at
            time.sleep(0.25)
    finally:
        replacement.stop()
        backends.stop()
    restored = _restored_after(replacement.output(), killed_wall)
    delays = sorted(written_at.values())
    beat, dead_after = settings.worker_heartbeat_seconds, settings.worker_dead_after_seconds
    late = [d for d in delays if d > 0.5]  # written after the kill: what it held or had queued
    lines = ["## Recovery after a worker SIGKILL", "",
             f"{messages} inbound SMS queued; the worker (16 threads) is SIGKILLed while FHIR is "
             "slow, a replacement starts at once; every setting at its default "
             f"(visibility timeout {settings.broker_visibility_timeout_seconds} s, inbox sweep "
             f"{settings.inbox_stale_seconds:g} s, heartbeat {beat:g} s, a worker silent "
             f"{dead_after:g} s is dead: its messages are back in their queue within "
             f"{restored_within(beat, dead_after):g} s of the kill).", "",
             "| messages written | after the kill | p50 s | max s | held messages given back "
             "after s |", "|---:|---:|---:|---:|---:|",
             f"| {len(delays)} of {messages} | {len(late)} | "
             f"{statistics.median(late) if late else 0:.1f} | {max(late, default=0):.1f} | "
             f"{restored} |"]
    if len(delays) < messages:
        lines.append(f"\n**{messages - len(delays)} not written within 300 s.**")
    return lines


def _restored_after(output: str, killed_wall: float) -> str:
    """Seconds from the kill to the janitor's log line giving the dead worker's messages back
    (its JSON timestamp), or "-" when none was logged."""
    for line in output.splitlines():
        if "stopped beating" in line:
            try:
                stamp = datetime.fromisoformat(json.loads(line)["timestamp"])
            except (ValueError, KeyError):
                continue
            return f"{stamp.timestamp() - killed_wall:.1f}"
    return "-"
