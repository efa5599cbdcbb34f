"""FHIR contention: the sandbox's direct-rate curves, and a backlog drained through Switchboard.

For each sandbox curve (`medplum`, calibrated on the issue's Medplum 5.0.10 figures, and `peak8`,
a server whose best is 8 writes in flight):

- Direct: conditional creates of child messages into distinct threads of distinct patients,
  sent straight to the sandbox by N concurrent clients that retry a 409 40001 correctly
  (jittered, milliseconds apart): writes/s and 409s per write at each concurrency, printed next
  to the issue's figures for `medplum`.
- Drain: a backlog of inbound SMS (conversation strategy, threads there, so one conditional
  create per message) queued at once and drained by 1, 2 or 4 worker processes, with default
  settings and a cold controller; msgs/s as a fraction of the best direct rate, with dead
  letters, duplicates and missing messages counted.

Runs alone: `python -m tests.bench --only contention` (about 8 minutes on a quiet machine, 11.5 on a
loaded one).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis

from tests.bench.backends import Backends, start
from tests.bench.workers import wait_finished
from tests.support import Sandbox
from web.enqueue import Enqueuer
from worker.broker.backoff import retry_delay
from worker.broker.celery_app import QUEUE_INBOUND, TASK_INBOUND_SMS
from worker.channels import twilio
from worker.fhir import budget
from worker.fhir.contention import LimitState, Tuning
from worker.fhir.query import conditional_reference, query_string, token
from worker.fhir.resources import (
    IdentifierSystems,
    Resource,
    clinic_participant,
    identifier,
    inbound_message,
)
from worker.inbound.threads import sender_reference
from worker.ops import devstack
from worker.settings import Settings, load_settings
from worker.stores.dead_letters import DeadLetterStore

CLINIC = "+15557654321"
THREADS = 16  # per worker process: enough to fill a limit of 8 on its own


def _inbound_write(settings: Settings, params: dict[str, str]) -> tuple[Resource, str]:
    """The exact conditional create the conversation strategy makes once the thread exists:
    (resource, If-None-Exist), built by Switchboard's own code."""
    msg = twilio.parse_inbound(params, received_at=datetime.now(UTC).isoformat())
    systems = IdentifierSystems(settings.message_id_system, settings.conversation_id_system,
                                settings.thread_id_system, settings.clinic_number_system)
    header_ref = conditional_reference("Communication", [
        ("identifier", token(systems.conversation, msg.conversation_key()))])
    resource = inbound_message(msg, header_ref, sender_reference(msg), systems,
                               clinic_participant(msg, systems, ""))
    return resource, query_string([("identifier", token(systems.message, params["MessageSid"]))])


def _direct(sandbox: Sandbox, settings: Settings, concurrency: int, messages: int,
            phones: list[str]) -> dict[str, float]:
    """Switchboard's inbound writes sent straight to the sandbox by `concurrency` clients, each
    retrying a 409 correctly (jittered, milliseconds apart), with no limit on writes in flight."""
    sandbox.reset()
    for p in phones:  # the patients and their conversation threads, as after a warm-up
        patient = sandbox.patient(p)
        msg = twilio.parse_inbound(_sms(p, "x"), received_at="2026-01-01T00:00:00Z")
        sandbox.fhir.create({
            "resourceType": "Communication", "status": "in-progress",
            "subject": {"reference": f"Patient/{patient['id']}"},
            "identifier": [identifier(settings.conversation_id_system,
                                      msg.conversation_key())]})
    writes = [_inbound_write(settings, _sms(phones[i % len(phones)], f"direct {i}"))
              for i in range(messages)]
    headers = {"Authorization": f"Bearer {sandbox.token()}",
               "Content-Type": "application/fhir+json"}
    http = httpx.Client(base_url=settings.fhir_base_url, headers=headers, timeout=30,
                        limits=httpx.Limits(max_connections=concurrency + 4))
    sandbox.reset_counter()

    def write(i: int) -> int:
        resource, key = writes[i]
        for attempt in range(1, 40):
            resp = http.post("Communication", json=resource, headers={"If-None-Exist": key})
            if resp.status_code != 409:
                resp.raise_for_status()
                return attempt - 1
            time.sleep(retry_delay(attempt, 0.02, 1.0))
        raise RuntimeError("a write kept conflicting")

    started = time.monotonic()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        retries = sum(pool.map(write, range(messages)))
    seconds = time.monotonic() - started
    http.close()
    stats = sandbox.stats()
    return {"rate": messages / seconds, "conflicts": stats["conflicts"] / messages,
            "retries": retries / messages}


def _sms(phone: str, body: str) -> dict[str, str]:
    return {"MessageSid": "SM" + uuid.uuid4().hex, "AccountSid": "ACbench", "From": phone,
            "To": CLINIC, "Body": body, "NumMedia": "0"}


def _drain(log_dir: Path, backends: Backends, processes: int, messages: int,
           phones: list[str]) -> dict[str, float]:
    """A backlog of `messages` inbound SMS (threads already there, so one conditional create
    each) drained by `processes` worker processes from a cold controller: msgs/s from the first
    enqueue to the last write, the limit the cluster ended on, dead letters and duplicates."""
    env, sandbox = backends.env, backends.sandbox
    settings = load_settings(env)
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    sandbox.reset()
    for p in phones:
        sandbox.patient(p)
    workers = [devstack.start_worker(env, log_dir, name=f"bench-drain-{processes}-{i}",
                                     queues="inbound", concurrency=THREADS)
               for i in range(processes)]
    enqueuer = Enqueuer.from_settings(settings)

    def enqueue(batch: list[dict[str, str]]) -> None:
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        for params in batch:
            enqueuer.send(TASK_INBOUND_SMS, QUEUE_INBOUND,
                          [params, {"received_at": now}], f"bench:{params['MessageSid']}")

    # Progress is read from the workers' logs, not by searching the sandbox: a search there
    # takes its single-threaded engine from the writes being measured.
    try:
        enqueue([_sms(p, "warm-up") for p in phones])  # creates the threads
        wait_finished(workers, len(phones), 300)
        # A cold controller: what the cluster learnt from the warm-up is forgotten.
        for key in client.scan_iter(match=budget.PREFIX + "*"):
            client.delete(key)
        sandbox.reset_counter()
        backlog = [_sms(phones[i % len(phones)], f"bench {i}") for i in range(messages)]
        started = time.monotonic()
        enqueue(backlog)
        wait_finished(workers, len(phones) + messages, 1800)
        seconds = time.monotonic() - started
        state = budget_state(client, settings)
    finally:
        for w in workers:
            w.stop()
    stats = sandbox.stats()
    children = sandbox.fhir.search("Communication", [("part-of:missing", "false"),
                                                     ("_count", str(10 * messages))])
    sids = Counter(i["value"] for e in children.get("entry") or []
                   for i in e["resource"].get("identifier") or []
                   if i.get("system") == settings.message_id_system)
    dead = DeadLetterStore(client, settings.sealer()).count()
    client.close()
    return {"rate": messages / seconds, "conflicts": stats["conflicts"] / messages,
            "limit": state.home, "dead": dead,
            "duplicates": sum(n - 1 for n in sids.values()),
            "missing": sum(1 for m in backlog if m["MessageSid"] not in sids),
            "in_flight_max": stats["writes_in_flight_max"]}


def budget_state(client: redis.Redis, settings: Settings) -> LimitState:
    """The cluster's controller state as the workers left it."""
    raw = client.hget(budget.CONTROL, "state")
    tuning = Tuning(ceiling=settings.fhir_max_writes_in_flight)
    return LimitState.from_json(raw or b"", tuning)


# The figures (writes/s of conditional creates straight to Medplum 5.0.10 on PostgreSQL).
MEDPLUM = {1: (61, 45), 2: (41, 41), 4: (29, 27), 8: (None, 15), 16: (None, 9)}
MEDPLUM_CONFLICTS = {1: 0.0, 2: 0.06, 4: 0.23, 8: 0.77, 16: 1.73}
CURVES = {  # curve -> (direct concurrencies, worker processes draining)
    "medplum": ((1, 2, 4, 8, 16), (1, 2, 4)),
    "peak8": ((1, 2, 4, 8, 12, 16), (1, 4)),
}


def curve_section(log_dir: Path, curve: str, quick: bool) -> list[str]:
    """One sandbox curve: its direct rates, then the backlog drained through Switchboard."""
    concurrencies, process_counts = CURVES[curve]
    backends = start(log_dir, f"contention-{curve}", curve=curve,
                     SMS_THREAD_STRATEGY="conversation")
    messages = 300 if quick else 1000
    phones = [f"+1555{3000000 + i:07d}" for i in range(50)]
    began = time.monotonic()
    try:
        # A slow curve at low concurrency gets fewer writes: each point runs seconds, not minutes.
        direct = {c: _direct(backends.sandbox, backends.settings, c,
                             min(100 if quick else 200, 30 * c), phones) for c in concurrencies}
        best = max(d["rate"] for d in direct.values())
        drains = {n: _drain(log_dir, backends, n, messages, phones) for n in process_counts}
    finally:
        backends.stop()
    lines = [f"### Curve `{curve}`", "",
             f"Direct: Switchboard's inbound writes straight to the sandbox "
             f"(`FHIR_SANDBOX_CURVE={curve}`) by N clients retrying 409s correctly.", ""]
    if curve == "medplum":
        lines += ["| direct clients | sandbox writes/s | of its 1 client | 409s per write | "
                  "Medplum 5.0.10 writes/s (this machine, other machine) | of its 1 client "
                  "(other) | Medplum 409s per write (other) |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        one = direct[1]["rate"]
        for c, d in direct.items():
            ours, theirs = MEDPLUM[c]
            lines.append(f"| {c} | {d['rate']:.1f} | {d['rate'] / one:.2f} | "
                         f"{d['conflicts']:.2f} | {ours or '-'}, {theirs} | "
                         f"{theirs / MEDPLUM[1][1]:.2f} | {MEDPLUM_CONFLICTS[c]:.2f} |")
    else:
        lines += ["| direct clients | sandbox writes/s | 409s per write |", "|---:|---:|---:|"]
        lines += [f"| {c} | {d['rate']:.1f} | {d['conflicts']:.2f} |" for c, d in direct.items()]
    lines += ["", f"Drain: {messages} inbound SMS queued at once (one conditional create each, "
              f"threads there), worker processes of {THREADS} threads, default settings "
              "(cluster budget, ceiling FHIR_MAX_WRITES_IN_FLIGHT), the controller cold; timed "
              "from the first enqueue to the last write.", "",
              "| worker processes | msgs/s | of best direct | limit at the end | most writes "
              "in flight | 409s per message | dead letters | duplicates | missing |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, d in drains.items():
        lines.append(f"| {n} | {d['rate']:.1f} | {d['rate'] / best:.2f} | {d['limit']:.0f} | "
                     f"{d['in_flight_max']:.0f} | {d['conflicts']:.2f} | {d['dead']:.0f} | "
                     f"{d['duplicates']:.0f} | {d['missing']:.0f} |")
    lines += ["", f"({time.monotonic() - began:.0f} s for this curve.)", ""]
    return lines


def run(log_dir: Path, quick: bool = False) -> list[str]:
    """Both curves; returns the Markdown section for bench/results.md."""
    lines = ["## FHIR contention: draining at the server's best rate", "",
             "The FHIR sandbox costs what Medplum costs under contention (docs/benchmarks.md, "
             "\"The sandbox's curve\"); the best direct rate is the target, 0.80 of it the bar.",
             ""]
    for curve in CURVES:
        lines += curve_section(log_dir, curve, quick)
    return lines
