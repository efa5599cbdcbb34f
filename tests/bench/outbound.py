"""Outbound sends against the configured pace: what a clinic feels when it sends many replies
at once.

A burst of clinician replies (one per patient in turn, as `/v1/messages` queues them) is queued
before one worker (threads pool, default concurrency) starts. The shared pacing (a Redis token
bucket per channel and sending address) spaces the sends at SMS_RATE_PER_SECOND: the figure is
the pace achieved at the provider against the pace configured, and how late each send reached
the provider beyond its own slot (slot k = first send + k / pace). A worker that kept up shows
an achieved pace at the configured one and lateness near zero; one that could not keep up (CPU,
FHIR round trips) falls behind its slots. The default pace (1/s) is the first row; faster paces
show the headroom above it. Worker CPU per send is reported as information.

The provider sandbox answers every Twilio send 5 ms late; the FHIR sandbox runs in contention
mode, as everywhere in the benchmarks.
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from tests.bench.backends import Backends, start
from tests.bench.workers import cpu_seconds, rss_mib
from tests.support import ProviderSandbox
from web.enqueue import Enqueuer
from worker.broker.celery_app import QUEUE_OUTBOUND, TASK_OUTBOUND_SEND
from worker.ops import devstack
from worker.settings import load_settings

CLINIC = "+15557654321"
CONCURRENCY = 16  # the Procfile's default WORKER_CONCURRENCY
# (sends per second configured, sends in the burst; quick runs take a quarter)
PACES = ((1.0, 40), (10.0, 300), (50.0, 1000))


def _replies(fhir: Any, count: int, phones: list[str]) -> list[str]:
    """`count` clinician replies, each a child of its patient's SMS thread; their ids."""
    sms = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode",
                        "code": "SMSWRIT"}]}]
    headers = []
    for phone in phones:
        patient = fhir.create({"resourceType": "Patient", "telecom": [
            {"system": "phone", "value": phone, "use": "mobile"}]}).resource
        headers.append(fhir.create({
            "resourceType": "Communication", "status": "in-progress", "medium": sms,
            "subject": {"reference": f"Patient/{patient['id']}"}}).resource)

    def reply(i: int) -> str:
        h = headers[i % len(headers)]
        return str(fhir.create({
            "resourceType": "Communication", "status": "in-progress",
            "partOf": [{"reference": f"Communication/{h['id']}"}],
            "recipient": [h["subject"]],
            "payload": [{"contentString": f"Your results are ready ({i})"}]}).resource["id"])

    with cf.ThreadPoolExecutor(8) as pool:
        return list(pool.map(reply, range(count)))


def _burst(log_dir: Path, backends: Backends, providers: ProviderSandbox, pace: float,
           count: int, phones: list[str]) -> dict[str, float]:
    """Queue `count` replies, let one worker send them at `pace`; what the provider saw."""
    env = {**backends.env, "SMS_RATE_PER_SECOND": f"{pace:g}"}
    redis.Redis.from_url(backends.settings.redis_url).flushdb()
    backends.sandbox.reset()
    providers.reset()
    providers.fault(provider="twilio", delay_ms=5, count=0, sticky=True)
    ids = _replies(backends.sandbox.fhir, count, phones)
    enqueuer = Enqueuer.from_settings(load_settings(env))
    for cid in ids:
        request_id = uuid.uuid4().hex
        enqueuer.send(TASK_OUTBOUND_SEND, QUEUE_OUTBOUND,
                      [{"communication": f"Communication/{cid}", "request_id": request_id}],
                      f"outbound:{request_id}")
    child = devstack.start_worker(env, log_dir, name=f"bench-pace-{pace:g}", queues="outbound",
                                  concurrency=CONCURRENCY)
    def sent() -> list[float]:
        return sorted(float(r["at"]) for r in providers.requests(provider="twilio")
                      if r.get("method") == "POST")

    try:
        before = cpu_seconds(child.proc.pid)
        # A deferred send finishes its task run and comes back at its slot, so the worker's
        # count of finished tasks says nothing: the provider's count does.
        deadline = time.monotonic() + 120 + 3 * count / pace
        while len(sent()) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        cpu = cpu_seconds(child.proc.pid) - before
        rss = rss_mib(child.proc.pid)
    finally:
        child.stop()
    at = sent()
    span = at[-1] - at[0] if len(at) > 1 else 0.0
    late = sorted(max(0.0, t - (at[0] + k / pace)) for k, t in enumerate(at))
    return {"sent": len(at), "achieved": (len(at) - 1) / span if span else 0.0,
            "p50": statistics.median(late), "p95": late[int(0.95 * (len(late) - 1))],
            "max": late[-1], "cpu": 1000 * cpu / count, "rss": rss}


def run(log_dir: Path, quick: bool = False) -> list[str]:
    """Each pace in turn; returns the Markdown section for bench/results.md."""
    provider, origin = devstack.start_provider_sandbox(log_dir, [])
    providers = ProviderSandbox(origin)
    backends = start(log_dir, "outbound", TWILIO_API_BASE_URL=origin, TWILIO_FROM_NUMBER=CLINIC)
    phones = [f"+1555{5000000 + i:07d}" for i in range(50)]
    rows = []
    try:
        for pace, count in PACES:
            n = max(10, count // 4) if quick else count
            rows.append((pace, n, _burst(log_dir, backends, providers, pace, n, phones)))
    finally:
        backends.stop()
        providers.close()
        provider.stop()
    return ["## Outbound sends against the configured pace", "",
            f"A burst of SMS replies to {len(phones)} patients in turn, queued before one worker "
            f"(threads pool, concurrency {CONCURRENCY}) starts; the provider sandbox answers each "
            "send 5 ms late, the FHIR sandbox runs in contention mode, every other setting at "
            "its default. Lateness: how long after its own slot (first send + k / pace) each "
            "send reached the provider.", "",
            "| configured pace /s | sends | reached the provider | achieved pace /s "
            "| lateness p50 s | p95 s | max s | worker CPU ms/send | worker RSS MiB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *(f"| {pace:g} | {n} | {r['sent']:.0f} | {r['achieved']:.2f} | {r['p50']:.2f} | "
              f"{r['p95']:.2f} | {r['max']:.2f} | {r['cpu']:.1f} | {r['rss']:.0f} |"
              for pace, n, r in rows)]
