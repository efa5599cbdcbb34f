"""FHIR contention: Medplum-like serialization conflicts, measured straight and through Switchboard.

Direct: conditional creates of child messages into distinct threads of distinct patients, sent
straight to the FHIR sandbox in contention mode by N concurrent clients that retry a 409 40001
correctly (jittered, milliseconds apart): writes/s and conflicts per write at each concurrency,
the curve the issue measured on Medplum 5.0.10 (it falls as concurrency rises).

Switchboard: the same kind of writes as inbound SMS (conversation strategy, thread headers
already there, so one conditional create per message) through a real worker at 4, 16 and 64
threads, its AIMD write limit deciding how many are in flight; msgs/s as a fraction of the best
direct rate, and conflicts per message.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.bench.backends import start
from tests.support import Sandbox
from web.enqueue import Enqueuer
from worker.broker.backoff import retry_delay
from worker.broker.celery_app import QUEUE_INBOUND, TASK_INBOUND_SMS
from worker.channels import twilio
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

CLINIC = "+15557654321"


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


def _through_switchboard(log_dir: Path, env: dict[str, str], sandbox: Sandbox, threads: int,
                         messages: int, phones: list[str]) -> dict[str, float]:
    """The same writes as inbound SMS through a real worker with `threads` threads."""
    settings = load_settings(env)
    redis.Redis.from_url(settings.redis_url).flushdb()
    sandbox.reset()
    for p in phones:
        sandbox.patient(p)
    worker = devstack.start_worker(env, log_dir, name=f"bench-worker-{threads}",
                                   concurrency=threads)
    enqueuer = Enqueuer.from_settings(settings)

    def sms(i: int, body: str) -> dict[str, str]:
        return _sms(phones[i % len(phones)], body)

    def enqueue(batch: list[dict[str, str]]) -> None:
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        for params in batch:
            enqueuer.send(TASK_INBOUND_SMS, QUEUE_INBOUND,
                          [params, {"received_at": now}], f"bench:{params['MessageSid']}")

    def written() -> int:
        bundle = sandbox.fhir.search("Communication", [
            ("part-of:missing", "false"), ("_summary", "count")])
        return int(bundle.get("total", 0))

    try:
        enqueue([sms(i, "warm-up") for i in range(len(phones))])  # creates the threads
        _wait(lambda: written() >= len(phones), 120)
        sandbox.reset_counter()
        burst = [sms(i, f"bench {i}") for i in range(messages)]
        started = time.monotonic()
        enqueue(burst)
        _wait(lambda: written() >= len(phones) + messages, 300)
        seconds = time.monotonic() - started
    finally:
        worker.stop()
    stats = sandbox.stats()
    return {"rate": messages / seconds, "conflicts": stats["conflicts"] / messages}


def _wait(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("the benchmark did not finish in time")
        time.sleep(0.2)


def run(log_dir: Path, quick: bool = False) -> list[str]:
    """Run both measurements; returns the Markdown section for bench/results.md."""
    backends = start(log_dir, "contention", SMS_THREAD_STRATEGY="conversation")
    env, settings, sandbox = backends.env, backends.settings, backends.sandbox
    messages = 100 if quick else 300
    phones = [f"+1555{3000000 + i:07d}" for i in range(50)]
    try:
        direct = {c: _direct(sandbox, settings, c, messages, phones) for c in (1, 2, 4, 8, 16)}
        best = max(d["rate"] for d in direct.values())
        ours = {t: _through_switchboard(log_dir, env, sandbox, t, messages, phones)
                for t in (4, 16, 64)}
    finally:
        backends.stop()
    lines = ["## FHIR contention", "",
             "FHIR sandbox in contention mode (every overlap aborts; Medplum's 2 attempts, 5 ms "
             f"transactions). {messages} inbound-message writes across {len(phones)} patients "
             "per row, built by Switchboard's own code (conversation strategy, threads there).",
             "", "| direct clients | writes/s | conflicts (409) per write | retries per write |",
             "|---:|---:|---:|---:|"]
    for c, d in direct.items():
        lines.append(f"| {c} | {d['rate']:.0f} | {d['conflicts']:.2f} | {d['retries']:.2f} |")
    lines += ["", "| worker threads | msgs/s | of best direct | conflicts per message |",
              "|---:|---:|---:|---:|"]
    for t, d in ours.items():
        lines.append(f"| {t} | {d['rate']:.0f} | {d['rate'] / best:.2f} | "
                     f"{d['conflicts']:.2f} |")
    return lines
