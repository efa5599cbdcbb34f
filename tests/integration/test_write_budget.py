"""The cluster's FHIR write budget (worker.fhir.budget) with real parts: worker processes
sharing it through a real redis-server, a SIGKILLed holder whose leases lapse, and a stopped
redis-server under which each process falls back to its own limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from tests.conftest import Services
from tests.support import Sandbox, eventually, most_in_flight, post_signed, sms_params
from worker.fhir.budget import CONTROL, LEASES, PREFIX, RETRY_REDIS_SECONDS, ClusterWriteBudget
from worker.fhir.contention import LimitState, Tuning, WriteLimit
from worker.ops import devstack

ROOT = Path(__file__).resolve().parents[2]


def burst(svc_app: object, phones: list[str], n: int, body: str) -> list[dict[str, str]]:
    """Post n signed inbound SMS through the receiver; returns their params."""
    client = svc_app.test_client()  # type: ignore[attr-defined]
    sent = [sms_params(phones[i % len(phones)], f"{body} {i}") for i in range(n)]
    assert {post_signed(client, m).status_code for m in sent} == {200}
    return sent


def test_two_worker_processes_never_hold_more_writes_in_flight_than_the_budget(
        services: Services, sandbox: Sandbox) -> None:
    svc = services.get(workers=2, SMS_THREAD_STRATEGY="conversation",
                       FHIR_MAX_WRITES_IN_FLIGHT="3")
    # Every conditional write costs the server 40 ms and it could run 8 side by side without
    # aborting any: latency shows no queue, so the controller climbs to the ceiling and the
    # budget is what bounds the writes (2 processes x 8 threads would put up to 16 in flight).
    sandbox.contention(rate=0, write_ms=40, lanes=8)
    phones = [f"+1555710{i:04d}" for i in range(6)]
    for phone in phones:
        sandbox.patient(phone)
    sandbox.reset_counter()
    sent = burst(svc.app(), phones, 80, "budget")

    eventually(lambda: all(sandbox.messages(m["MessageSid"]) for m in sent), timeout=120,
               what="every message written")
    assert all(len(sandbox.messages(m["MessageSid"])) == 1 for m in sent)
    assert svc.dead_letters.count() == 0
    most = sandbox.stats()["writes_in_flight_max"]
    assert 2 <= most <= 3, most  # the processes did write side by side, and never over 3
    state = LimitState.from_json(svc.redis.hget(CONTROL, "state") or b"", Tuning(ceiling=3))
    assert state.version > 0 and state.limit <= 3  # the cluster's controller ran, in Redis
    # What the budget keeps in Redis is numbers and random lease ids: no phone, no text.
    for key in svc.redis.scan_iter(match=PREFIX + "*"):
        kind = svc.redis.type(key)
        dump = repr(svc.redis.hgetall(key) if kind == b"hash" else svc.redis.zrange(key, 0, -1)
                    if kind == b"zset" else svc.redis.lrange(key, 0, -1))
        assert "budget" not in dump and not any(p[2:] in dump for p in phones), key


HOLDER = """
import sys, threading, time
import redis
from worker.fhir.budget import ClusterWriteBudget
from worker.fhir.contention import Tuning, WriteLimit
tuning = Tuning(ceiling=2)
budget = ClusterWriteBudget(redis.Redis.from_url(sys.argv[1]), tuning, 1.0, WriteLimit(tuning))
def hold():
    with budget.slot():
        time.sleep(3600)
for _ in range(2):
    threading.Thread(target=hold, daemon=True).start()
time.sleep(0.5)
print("holding", flush=True)
time.sleep(3600)
"""


def test_a_killed_workers_leases_lapse_and_the_others_go_on(
        services: Services, sandbox: Sandbox, log_dir: Path) -> None:
    svc = services.get(SMS_THREAD_STRATEGY="conversation", FHIR_WRITE_LEASE_SECONDS="1")
    phones = [f"+1555720{i:04d}" for i in range(2)]
    for phone in phones:
        sandbox.patient(phone)
    # A budget of 2, both slots taken by another process that then dies mid-write.
    svc.redis.hset(CONTROL, mapping={"limit": 2, "version": 0,
                                     "state": LimitState(limit=2, home=2).to_json()})
    with (log_dir / "budget-holder.log").open("ab") as out:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, svc.settings.redis_url],
                                  stdout=subprocess.PIPE, stderr=out, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        assert svc.redis.zcard(LEASES) == 2
        sent = burst(svc.app(), phones, 4, "after the crash")
        # While the holder lives it renews its leases: they outlast their 1 s and nothing is
        # written (the worker waits for room).
        time.sleep(2.5)
        assert svc.redis.zcard(LEASES) == 2
        assert not any(sandbox.messages(m["MessageSid"]) for m in sent)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        eventually(lambda: all(sandbox.messages(m["MessageSid"]) for m in sent), timeout=30,
                   what="the messages written once the dead holder's leases lapsed")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert svc.dead_letters.count() == 0


def test_with_redis_down_a_process_falls_back_to_its_own_limit(
        log_dir: Path, tmp_path: Path) -> None:
    server = devstack.start_redis(log_dir, data_dir=tmp_path / "budget-redis")
    client = redis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    now = [0.0]
    tuning = Tuning(ceiling=4)
    local = WriteLimit(tuning, start=2)
    budget = ClusterWriteBudget(client, tuning, 5.0, local, clock=lambda: now[0])
    try:
        with budget.slot():
            assert client.zcard(LEASES) == 1  # the lease is in Redis
        server.stop()
        most = most_in_flight(budget, lambda: local.in_flight)
        assert not budget.using_redis
        assert most == 2  # the process's own limit held the writes
        server.start()
        now[0] += RETRY_REDIS_SECONDS  # after the pause, Redis is tried again
        with budget.slot():
            assert client.zcard(LEASES) == 1 and local.in_flight == 0
        assert budget.using_redis
    finally:
        client.close()
        server.stop()
