"""Inbound SMS through real workers against the FHIR sandbox (contention mode on, as Medplum on
PostgreSQL): FHIR round trips per message for each thread strategy, how throughput grows with
1, 2 and 4 worker processes, and webhook-to-FHIR latency behind a large backlog.

Messages are queued by the receiver's own enqueue (the one-step publish); probes behind the
backlog go through the real receiver under gunicorn, signed as Twilio signs.
"""

from __future__ import annotations

import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis

from tests.bench.backends import Backends, start
from tests.bench.workers import wait_finished
from tests.support import sign
from web.enqueue import Enqueuer
from worker.broker.celery_app import QUEUE_INBOUND, TASK_INBOUND_SMS
from worker.ops import devstack
from worker.settings import load_settings

CLINIC = "+15557654321"
STRATEGIES = ("conversation", "active-thread", "new-thread")
THREADS = 8  # per worker process (the threads pool, as deployed)


def _sms(phone: str, body: str, sid: str | None = None) -> dict[str, str]:
    return {"MessageSid": sid or "SM" + uuid.uuid4().hex, "AccountSid": "ACbench",
            "From": phone, "To": CLINIC, "Body": body, "NumMedia": "0"}


def _enqueue(enqueuer: Enqueuer, batch: list[dict[str, str]]) -> None:
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    for params in batch:
        enqueuer.send(TASK_INBOUND_SMS, QUEUE_INBOUND, [params, {"received_at": now}],
                      f"sms:{params['MessageSid']}:{uuid.uuid4().hex[:8]}")


def _fresh(backends: Backends, phones: list[str]) -> None:
    redis.Redis.from_url(backends.settings.redis_url).flushdb()
    backends.sandbox.reset()
    for phone in phones:
        backends.sandbox.patient(phone)


def round_trips(log_dir: Path, backends: Backends, quick: bool) -> list[str]:
    """FHIR requests per message: the first in a thread, a later one, and a duplicate."""
    count = 10 if quick else 30
    phones = [f"+1555{6000000 + i:07d}" for i in range(count)]
    rows = []
    for strategy in STRATEGIES:
        _fresh(backends, phones)
        env = {**backends.env, "SMS_THREAD_STRATEGY": strategy}
        # One thread, one at a time: the count is what one message costs, not what
        # contention between messages adds (the contention section measures that).
        child = devstack.start_worker(env, log_dir, name=f"bench-trips-{strategy}",
                                      queues="inbound", concurrency=1)
        enqueuer = Enqueuer.from_settings(load_settings(env))
        per_phase = []
        done = 0
        try:
            firsts = [_sms(p, "first") for p in phones]
            for batch in (firsts, [_sms(p, "later") for p in phones], firsts):
                backends.sandbox.reset_counter()
                _enqueue(enqueuer, batch)
                done += len(batch)
                wait_finished([child], done, 300)
                per_phase.append(backends.sandbox.stats()["requests"] / len(batch))
        finally:
            child.stop()
        rows.append(f"| {strategy} | {per_phase[0]:.1f} | {per_phase[1]:.1f} | "
                    f"{per_phase[2]:.1f} |")
    return ["### FHIR round trips per inbound SMS", "",
            f"{count} patients, one worker thread (requests counted at the FHIR sandbox; "
            "a conflict retried would count too).", "",
            "| strategy | first message of a thread | a later message | duplicate delivery |",
            "|---|---:|---:|---:|", *rows]


def scaling(log_dir: Path, backends: Backends, quick: bool) -> list[str]:
    """Inbound msgs/s with 1, 2 and 4 worker processes (8 threads each)."""
    count = 150 if quick else 400
    phones = [f"+1555{7000000 + i:07d}" for i in range(50)]
    rows = []
    for processes in (1, 2, 4):
        _fresh(backends, phones)
        enqueuer = Enqueuer.from_settings(backends.settings)
        _enqueue(enqueuer, [_sms(p, "warm-up") for p in phones])  # threads exist first
        workers = [devstack.start_worker(backends.env, log_dir, name=f"bench-scale-{processes}-{i}",
                                         queues="inbound", concurrency=THREADS)
                   for i in range(processes)]
        try:
            wait_finished(workers, len(phones), 300)
            _enqueue(enqueuer, [_sms(phones[i % len(phones)], f"bench {i}")
                                for i in range(count)])
            seconds = wait_finished(workers, len(phones) + count, 600)
        finally:
            for w in workers:
                w.stop()
        # The clock started before the last enqueue finished, which counts against us.
        rows.append((processes, count / seconds))
    base = rows[0][1]
    return ["### Throughput by worker processes", "",
            f"{count} inbound SMS across {len(phones)} patients (threads there), each process "
            f"{THREADS} threads, FHIR sandbox in contention mode.", "",
            "| worker processes | msgs/s | of one process |", "|---:|---:|---:|",
            *(f"| {p} | {r:.0f} | {r / base:.2f} |" for p, r in rows)]


def backlog(log_dir: Path, backends: Backends, quick: bool) -> list[str]:
    """Webhook-to-FHIR latency of probes posted behind a backlog of queued messages."""
    queued = 1000 if quick else 10_000
    phones = [f"+1555{8000000 + i:07d}" for i in range(100)]
    _fresh(backends, phones)
    enqueuer = Enqueuer.from_settings(backends.settings)
    started = time.monotonic()
    _enqueue(enqueuer, [_sms(phones[i % len(phones)], f"backlog {i}") for i in range(queued)])
    enqueue_s = time.monotonic() - started
    port = devstack.free_port()
    web = devstack.start_web(backends.env, log_dir, port, name="bench-backlog-web")
    workers = [devstack.start_worker(backends.env, log_dir, name=f"bench-backlog-{i}",
                                     queues="inbound", concurrency=THREADS) for i in range(2)]
    draining = time.monotonic()
    probes: dict[str, float] = {}
    latency: dict[str, float] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for i in range(5):  # one probe a second once the workers are draining
                params = _sms(phones[i], f"probe {i}")
                resp = http.post("/webhooks/twilio/sms", data=params, headers={
                    "X-Twilio-Signature": sign(params)})
                resp.raise_for_status()
                probes[params["MessageSid"]] = time.monotonic()
                time.sleep(1.0)
        # Watch the probes while the backlog drains (a search per probe each second).
        deadline = time.monotonic() + 1800
        while len(latency) < len(probes) and time.monotonic() < deadline:
            for sid, at in probes.items():
                if sid not in latency and backends.sandbox.messages(sid):
                    latency[sid] = time.monotonic() - at
            time.sleep(1.0)
        wait_finished(workers, queued + len(probes), 1800)
        drained = time.monotonic() - draining
    finally:
        for w in workers:
            w.stop()
        web.stop()
    lat = sorted(latency.values())
    return ["### Latency behind a backlog", "",
            f"{queued} inbound SMS queued ({enqueue_s:.0f} s to enqueue), then 2 worker "
            f"processes ({THREADS} threads each) start and 5 probes are posted through the "
            "receiver, one a second. The queue is first in, first out: a probe waits for the "
            "backlog ahead of it.", "",
            "| backlog | drained in s | msgs/s | probes written | probe latency p50 s | max s |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {queued} | {drained:.0f} | {queued / drained:.0f} | {len(lat)} of "
            f"{len(probes)} | {statistics.median(lat) if lat else 0:.0f} | "
            f"{max(lat, default=0):.0f} |"]


def run(log_dir: Path, quick: bool = False) -> list[str]:
    """All three; returns the Markdown section for bench/results.md."""
    backends = start(log_dir, "inbound")
    try:
        lines = ["## Inbound through workers", ""]
        for part in (round_trips, scaling, backlog):
            lines += [*part(log_dir, backends, quick), ""]
    finally:
        backends.stop()
    return lines
