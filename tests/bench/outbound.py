"""Outbound sends/s: Switchboard's send task against a bare Celery task making the same Twilio
call (tests/bench/bare_outbound.py), the same pool and concurrency, side by side in one run.

The provider sandbox answers every Twilio send 5 ms late. Switchboard's send also reads the
message, its thread and the patient from the FHIR sandbox, passes the send gate and records the
send in Redis and writes the provider id back onto the Communication (If-Match): the ratio is
the price of never double-sending and of a record in the EHR. The bare worker runs twice: with
Celery's task events on, as Switchboard's worker sends them for Flower (like for like), and
stock (events off). Worker CPU per send says where the time goes: on 2 cores both workers are
CPU-bound, so the ratio is close to the ratio of CPU per send. The queues are filled before
each worker starts; the clock runs from the worker's "ready" to its last "succeeded" line.

The FHIR sandbox runs in contention mode, as everywhere in the benchmarks. Each send's
write-back is an If-Match update of its own Communication, which Medplum runs at REPEATABLE READ:
it conflicts only with another write to the same resource, so here (one send per message) never.
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import uuid
from pathlib import Path
from typing import Any

import redis

from tests.bench import bare_outbound
from tests.bench.backends import start
from tests.bench.workers import cpu_seconds, rss_mib, wait_finished
from tests.support import AUTH_TOKEN, PUBLIC_BASE_URL, ProviderSandbox, Sandbox
from web.enqueue import Enqueuer
from worker.broker.celery_app import QUEUE_OUTBOUND, TASK_OUTBOUND_SEND
from worker.ops import devstack
from worker.settings import load_settings

CLINIC = "+15557654321"
# The pools Switchboard offers: threads (deployed: the tasks wait on HTTP) and prefork. Not
# gevent: under it Celery runs its synchronous loop, where kombu's Redis transport waits out a
# 2 s poll timeout while the prefetch window is full (measured before the transport override
# that hid it was removed: 6 sends/s against 119 under threads).
POOLS = ("threads", "prefork")
CONCURRENCY = 8
ROUNDS = 3  # of the threads pool (see run)


def _messages(fhir: Any, count: int, phones: list[str]) -> list[str]:
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


def _switchboard(log_dir: Path, env: dict[str, str], sandbox: Sandbox, comm_ids: list[str],
                 pool: str, fhir_pid: int) -> dict[str, float]:
    """Sends/s, worker RSS MiB, worker and FHIR sandbox CPU ms per send and FHIR requests per
    send, for Switchboard's own send task."""
    settings = load_settings(env)
    redis.Redis.from_url(settings.redis_url).flushdb()
    enqueuer = Enqueuer.from_settings(settings)
    for cid in comm_ids:
        request_id = uuid.uuid4().hex
        enqueuer.send(TASK_OUTBOUND_SEND, QUEUE_OUTBOUND,
                      [{"communication": f"Communication/{cid}", "request_id": request_id}],
                      f"outbound:{request_id}")
    child = devstack.start_worker(env, log_dir, name=f"bench-out-{pool}", queues="outbound",
                                  concurrency=CONCURRENCY, pool=pool)
    sandbox.reset_counter()
    return {**_measure(child, len(comm_ids), fhir_pid),
            "trips": sandbox.stats()["requests"] / len(comm_ids)}


def _bare(log_dir: Path, env: dict[str, str], count: int, phones: list[str], pool: str,
          events: bool, http: str = "sdk") -> dict[str, float]:
    """Sends/s, worker RSS MiB and worker CPU ms per send for the bare task, with or without
    Celery's task events (what Flower shows; Switchboard's worker sends them), its Twilio call
    through the SDK's own HTTP client or Switchboard's (`http="switchboard"`)."""
    redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    app = bare_outbound.app
    app.conf.broker_url = env["REDIS_URL"]
    with app.connection_for_write() as conn:
        for i in range(count):
            app.send_task(bare_outbound.TASK, args=[phones[i % len(phones)],
                                                    f"Your results are ready ({i})"],
                          queue=bare_outbound.QUEUE, connection=conn)
    child = devstack.start_worker({**env, "BARE_TASK_EVENTS": "1" if events else "0",
                                   "BARE_HTTP": http}, log_dir,
                                  name=f"bench-bare-{pool}-{'events' if events else 'stock'}"
                                       f"-{http}",
                                  queues=bare_outbound.QUEUE, concurrency=CONCURRENCY,
                                  pool=pool, app="tests.bench.bare_outbound")
    return _measure(child, count)


def _measure(child: devstack.Child, count: int, fhir_pid: int | None = None
             ) -> dict[str, float]:
    """Wait for `child` to finish `count` sends, then stop it: sends/s, its RSS MiB, its CPU ms
    per send, and the FHIR sandbox's (`fhir_pid`) when given."""
    pids = [child.proc.pid, *([fhir_pid] if fhir_pid else [])]
    try:
        before = [cpu_seconds(pid) for pid in pids]
        seconds = wait_finished([child], count, 600)
        used = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
        rss = rss_mib(child.proc.pid)
    finally:
        child.stop()
    out = {"rate": count / seconds, "rss": rss, "cpu": 1000 * used[0] / count}
    if fhir_pid:
        out["fhir_cpu"] = 1000 * used[1] / count
    return out


def run(log_dir: Path, quick: bool = False) -> list[str]:
    """Both tasks under each pool; returns the Markdown section for bench/results.md."""
    # Enough sends that the figure is the workers' steady rate, not their first seconds (a
    # fresh worker opens its connections and fetches a token first; 600 sends took 2 s).
    count = 300 if quick else 2000
    provider, origin = devstack.start_provider_sandbox(log_dir, [])
    providers = ProviderSandbox(origin)
    providers.fault(provider="twilio", delay_ms=5, count=0, sticky=True)
    backends = start(log_dir, "outbound", TWILIO_API_BASE_URL=origin,
                     TWILIO_FROM_NUMBER=CLINIC, SMS_RATE_PER_SECOND="100000",
                     BARE_TWILIO_BASE=origin, BARE_TWILIO_SID="ACbench",
                     BARE_TWILIO_TOKEN=AUTH_TOKEN, BARE_TWILIO_FROM=CLINIC,
                     BARE_STATUS_CALLBACK=f"{PUBLIC_BASE_URL}/webhooks/twilio/status")
    phones = [f"+1555{5000000 + i:07d}" for i in range(50)]
    # The machine's speed drifts by a fifth within minutes, and each worker's figure with it:
    # the goal's pool (threads) runs its four workers in alternating rounds, and each figure
    # is the median of its rounds.
    rounds = {pool: 1 if quick or pool != "threads" else ROUNDS for pool in POOLS}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        for pool in POOLS:
            runs[pool] = {"ours": [], "bare": [], "stock": [], "same_http": []}
            for _ in range(rounds[pool]):
                ids = _messages(backends.sandbox.fhir, count, phones)
                runs[pool]["ours"].append(_switchboard(
                    log_dir, backends.env, backends.sandbox, ids, pool,
                    backends.fhir.child.proc.pid))
                runs[pool]["bare"].append(_bare(log_dir, backends.env, count, phones, pool,
                                                events=True))
                runs[pool]["stock"].append(_bare(log_dir, backends.env, count, phones, pool,
                                                 events=False))
                runs[pool]["same_http"].append(_bare(log_dir, backends.env, count, phones, pool,
                                                     events=True, http="switchboard"))
    finally:
        backends.stop()
        providers.close()
        provider.stop()
    rows = {pool: {worker: {key: statistics.median(run[key] for run in worker_runs)
                            for key in worker_runs[0]}
                   for worker, worker_runs in by_worker.items()}
            for pool, by_worker in runs.items()}
    lines = ["## Outbound sends", "",
             f"{count} SMS replies per row, the provider sandbox answering each send 5 ms late; "
             f"one worker, concurrency {CONCURRENCY}, queue filled before it starts, every "
             "setting at its default. Switchboard's send reads the message, thread and "
             "patient from FHIR (contention mode), passes the send gate "
             "in Redis (sent before? opted out? send slot, claim), records the send in Redis "
             "and writes the provider id back (If-Match); the bare task makes the same Twilio "
             "call with the same SDK and nothing else. Like for like, the bare worker sends "
             "Celery's task events as Switchboard's does (Flower shows them); the stock bare "
             "worker (events off, Celery's default) is shown too. CPU is the worker's own (all "
             "its processes), per send; the FHIR sandbox's CPU per send is shown too, as it "
             f"shares the 2 cores. Threads: the median of {rounds['threads']} alternating "
             "rounds of all four workers (the machine's speed drifts); prefork: one "
             "round.", "",
             "| pool | Switchboard sends/s | bare sends/s | ratio | stock bare sends/s "
             "| ratio | bare, Switchboard's HTTP, sends/s | ratio "
             "| CPU ms/send: Switchboard, bare, stock, bare with Switchboard's HTTP "
             "| RSS MiB: Switchboard, bare | FHIR requests per send | FHIR sandbox CPU ms/send |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for pool, r in rows.items():
        ours, bare, stock, same = r["ours"], r["bare"], r["stock"], r["same_http"]
        lines.append(
            f"| {pool} | {ours['rate']:.0f} | {bare['rate']:.0f} | "
            f"{ours['rate'] / bare['rate']:.2f} | {stock['rate']:.0f} | "
            f"{ours['rate'] / stock['rate']:.2f} | {same['rate']:.0f} | "
            f"{ours['rate'] / same['rate']:.2f} | {ours['cpu']:.1f}, {bare['cpu']:.1f}, "
            f"{stock['cpu']:.1f}, {same['cpu']:.1f} | {ours['rss']:.0f}, {bare['rss']:.0f} | "
            f"{ours['trips']:.1f} | {ours['fhir_cpu']:.1f} |")
    per_round = {key: ", ".join(
        f"{ours['rate'] / other['rate']:.2f}"
        for ours, other in zip(runs["threads"]["ours"], runs["threads"][key], strict=True))
        for key in ("bare", "stock", "same_http")}
    lines.append(f"\nThreads, round by round: {per_round['bare']} like for like; "
                 f"{per_round['stock']} against the stock bare worker; {per_round['same_http']} "
                 "against the bare task with Switchboard's HTTP client.")
    ratios = {pool: r["ours"]["rate"] / r["bare"]["rate"] for pool, r in rows.items()}
    same = {pool: r["ours"]["rate"] / r["same_http"]["rate"] for pool, r in rows.items()}
    lines.append(f"\nMedian ratio over the pools {statistics.median(ratios[p] for p in POOLS):.2f}"
                 f" like for like (goal ≥ 0.80); threads {ratios['threads']:.2f}. Against a "
                 f"bare task whose Twilio call goes through Switchboard's own HTTP client "
                 f"(worker.http) instead of the SDK's `requests` one: threads "
                 f"{same['threads']:.2f}, median {statistics.median(same.values()):.2f}: what "
                 "Switchboard's own work costs, apart from how cheaply it makes its HTTP calls.")
    return lines
