"""Sealing against a real Redis: rotation of every sealed store (Lua compare-and-set), a
message sealed with a key the worker lacks, and no PHI in Redis's files, Flower or /metrics."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests import at_rest
from tests.conftest import Services, make_env, outbound_env
from tests.integration.test_inbound_sms import PATIENT, landed
from tests.integration.test_operations import cli
from tests.integration.test_outbound import message_in_thread, patient, send, state
from tests.support import (
    DATA_KEY,
    ProviderSandbox,
    Sandbox,
    eventually,
    post_signed,
    sms_params,
    worker_metrics,
)
from tests.unit.test_sealing import ARGS, BODY, EMBED, NEW, OLD, PHONE
from web.app import create_app
from worker.broker.celery_app import undecryptable
from worker.crypto import generate_key, parse_keys, sealer_for
from worker.ops import devstack
from worker.settings import load_settings
from worker.stores.dead_letters import DeadLetterStore
from worker.stores.inbox import ENTRIES, INDEX, Inbox
from worker.stores.outbound_state import OutboundState
from worker.stores.send_ledger import SendLedger


@pytest.fixture()
def r(redis_server: devstack.RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port, db=60)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def _fill(r: redis.Redis, key: str) -> dict[str, object]:
    """One entry in each sealed store, sealed with `key`; returns handles to read them."""
    s = sealer_for(key)
    dlq = DeadLetterStore(r, s).record("t", "q", ARGS, {}, "r", f"detail {PHONE}", 1)
    r.hset(ENTRIES, "sms:SM1", json.dumps({"task": "t", "queue": "q",
                                           "body": s.seal(json.dumps([ARGS, {}, EMBED]))}))
    r.zadd(INDEX, {"sms:SM1": 0})
    OutboundState(r, s).create("req-1")
    OutboundState(r, s).update("req-1", "failed", error="invalid-recipient",
                               detail=f"21211 {PHONE}")
    SendLedger(r, s).record("comm-1", {"provider_id": "SM9", "channel": "sms"})
    return {"dlq": dlq.id}


def _sealed_values(r: redis.Redis) -> list[str]:
    out = [json.loads(r.hget("switchboard:dlq:entries", k))["sealed"]
           for k in r.hkeys("switchboard:dlq:entries")]
    out += [json.loads(v)["body"] for v in r.hvals(ENTRIES)]
    out += [v.decode() for k, v in r.hgetall("switchboard:outbound:req-1").items()
            if k not in (b"status", b"updated_at")]
    out.append(r.get(SendLedger.DONE + "comm-1").decode())
    return out


def test_rotation_old_entries_open_then_reseal_moves_everything_to_the_new_key(
        r: redis.Redis) -> None:
    ids = _fill(r, OLD)
    both = sealer_for(f"{NEW},{OLD}")
    # Before the rotation, the old entries open with the new configuration...
    assert DeadLetterStore(r, both).get(str(ids["dlq"])).detail == f"detail {PHONE}"  # type: ignore[union-attr]
    assert Inbox(r, both).stale(-1)[0].args == ARGS
    assert OutboundState(r, both).get("req-1")["detail"] == f"21211 {PHONE}"  # type: ignore[index]
    assert SendLedger(r, both).done("comm-1") == {"provider_id": "SM9", "channel": "sms"}
    # ... and what is written now is sealed with the new key.
    OutboundState(r, both).update("req-1", "failed", error="rejected")
    assert both.is_current(r.hget("switchboard:outbound:req-1", "error").decode())
    counts = {name: reseal() for name, reseal in (
        ("dlq", DeadLetterStore(r, both).reseal), ("inbox", Inbox(r, both).reseal),
        ("state", OutboundState(r, both).reseal), ("ledger", SendLedger(r, both).reseal))}
    assert [(c.resealed, c.current, c.unopenable) for c in counts.values()] == [
        (1, 0, 0), (1, 0, 0), (1, 1, 0), (1, 0, 0)]  # state: detail old, error new
    assert all(both.is_current(v) for v in _sealed_values(r))
    # The old key can now be retired: everything opens with the new one alone.
    new = sealer_for(NEW)
    assert DeadLetterStore(r, new).get(str(ids["dlq"])).detail == f"detail {PHONE}"  # type: ignore[union-attr]
    assert Inbox(r, new).stale(-1)[0].args == ARGS
    assert OutboundState(r, new).get("req-1")["detail"] == f"21211 {PHONE}"  # type: ignore[index]
    assert SendLedger(r, new).done("comm-1") == {"provider_id": "SM9", "channel": "sms"}
    # A second pass has nothing left to do.
    assert DeadLetterStore(r, both).reseal().resealed == 0


def test_rotation_without_the_old_key_leaves_its_values_and_says_so(r: redis.Redis) -> None:
    _fill(r, OLD)
    before = _sealed_values(r)
    new = sealer_for(NEW)
    assert DeadLetterStore(r, new).reseal().unopenable == 1
    assert Inbox(r, new).reseal().unopenable == 1
    assert OutboundState(r, new).reseal().unopenable == 2
    assert SendLedger(r, new).reseal().unopenable == 1
    assert _sealed_values(r) == before


def test_rotation_seals_entries_written_before_sealing(r: redis.Redis) -> None:
    r.hset("switchboard:dlq:entries", "e1", json.dumps({
        "id": "e1", "task": "t", "queue": "q", "args": ARGS, "kwargs": {}, "reason": "r",
        "detail": "d", "attempts": 1, "first_failed_at": 1.0, "last_failed_at": 1.0}))
    r.hset(ENTRIES, "k", json.dumps({"task": "t", "queue": "q", "args": ARGS}))
    r.zadd(INDEX, {"k": 0})
    r.hset("switchboard:outbound:req-2", mapping={"status": "sent",
                                                  "provider_id": json.dumps("SM1")})
    r.set(SendLedger.DONE + "c", json.dumps({"provider_id": "SM1"}))
    s = sealer_for(OLD)
    assert DeadLetterStore(r, s).get("e1").args == ARGS  # type: ignore[union-attr]
    assert [c.resealed for c in (DeadLetterStore(r, s).reseal(), Inbox(r, s).reseal(),
                                 OutboundState(r, s).reseal(), SendLedger(r, s).reseal())
            ] == [1, 1, 1, 1]
    dump = b"".join(r.dump(k) or b"" for k in r.keys())
    assert PHONE.encode() not in dump and BODY.encode() not in dump
    assert DeadLetterStore(r, s).get("e1").args == ARGS  # type: ignore[union-attr]
    assert Inbox(r, s).stale(-1)[0].args == ARGS
    assert OutboundState(r, s).get("req-2") == {"status": "sent", "provider_id": "SM1"}
    assert SendLedger(r, s).done("c") == {"provider_id": "SM1"}


# -- end to end --------------------------------------------------------------------------------


def test_a_message_sealed_with_a_key_the_worker_lacks_is_kept_then_replayed(
        services: Services, sandbox: Sandbox) -> None:
    lacking = generate_key()  # the worker has only this key; the receiver seals with DATA_KEY
    svc = services.get(DATA_ENCRYPTION_KEYS=lacking, SMS_THREAD_STRATEGY="conversation")
    sandbox.patient(PATIENT)
    receiver = create_app(load_settings({**svc.env, "DATA_ENCRYPTION_KEYS": DATA_KEY}))
    params = sms_params(PATIENT, "sealed with a key the worker does not have")
    assert post_signed(receiver.test_client(), params).status_code == 200
    entry = eventually(lambda: svc.dead_letters.query(reason="undecryptable"),
                       what="undecryptable dead letter")[0]
    assert entry.task == "switchboard.inbound.sms" and entry.queue == "inbound"
    assert "not configured" in entry.detail and DATA_KEY not in entry.detail
    held = undecryptable(entry.args)
    assert held is not None and held["why"] == "unknown-key"  # the sealed body, kept
    assert svc.redis.hlen(ENTRIES) == 0  # safe in the dead-letter store: out of the inbox
    assert sandbox.messages(params["MessageSid"]) == []
    # Replaying without the key changes nothing and says why.
    proc = cli(svc.env, "dlq", "replay", "--reason", "undecryptable")
    assert proc.returncode == 1 and "not replaying" in proc.stdout, proc.stdout + proc.stderr
    assert svc.dead_letters.get(entry.id) is not None
    # With the key back (after the new one, which seals), the message goes out as first sent.
    proc = cli({**svc.env, "DATA_ENCRYPTION_KEYS": f"{lacking},{DATA_KEY}"},
               "dlq", "replay", "--reason", "undecryptable")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 replayed" in proc.stdout
    landed(sandbox, params["MessageSid"])
    eventually(lambda: svc.dead_letters.get(entry.id) is None, what="entry removed")


def test_no_phi_in_redis_files_keys_flower_or_metrics(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox, r: redis.Redis,
        redis_server: devstack.RedisServer, log_dir: Path) -> None:
    providers.reset()
    svc = services.get(UNKNOWN_SENDER_POLICY="reject", **outbound_env(providers))
    flower_port, auth = devstack.free_port(), ("admin", uuid.uuid4().hex)
    flower = devstack.start_flower(svc.env, log_dir, flower_port, ":".join(auth))
    try:
        def number() -> str:
            return "+1555" + str(uuid.uuid4().int)[:7]

        known, stranger, mobile, failing, queued_sender = (number() for _ in range(5))
        email = f"p{uuid.uuid4().hex[:10]}@example.org"
        bodies = {k: f"{k} body {uuid.uuid4().hex}" for k in (
            "inbound", "stranger", "sms", "email", "failing", "queued")}
        sandbox.patient(known)
        web = svc.app().test_client()
        # Inbound: one written, one dead-lettered with its payload (unknown sender).
        written = sms_params(known, bodies["inbound"])
        assert post_signed(web, written).status_code == 200
        assert post_signed(web, sms_params(stranger, bodies["stranger"])).status_code == 200
        # Outbound: SMS and email sent, one refused by the provider (21211: failed state with
        # the provider's detail, and a dead letter).
        pat = patient(sandbox, phone=mobile, email=email)
        bad = patient(sandbox, phone=failing, email=None)
        providers.fault(provider="twilio", to=failing, status=400, twilio_code=21211)
        ids = []
        for who, medium, text, channel in ((pat, "SMSWRIT", bodies["sms"], None),
                                           (pat, None, bodies["email"], "email"),
                                           (bad, "SMSWRIT", bodies["failing"], None)):
            comm = message_in_thread(sandbox, who, medium, text)
            body = {"communication": f"Communication/{comm['id']}", "channel": channel}
            ids.append(send(svc, body).get_json()["id"])
        # And one accepted message still waiting in its queue and the inbox (no worker).
        idle = services.get(worker=False, UNKNOWN_SENDER_POLICY="reject",
                            **outbound_env(providers))
        assert post_signed(idle.app().test_client(),
                           sms_params(queued_sender, bodies["queued"])).status_code == 200
        landed(sandbox, written["MessageSid"])
        for request_id, final in zip(ids, ("sent", "sent", "failed"), strict=True):
            state(svc, request_id, final)
        eventually(lambda: len(svc.dead_letters.list()) >= 2, what="two dead letters")
        assert idle.redis.hlen(ENTRIES) == 1 and idle.redis.llen("inbound") == 1
        origin = f"http://127.0.0.1:{flower_port}"
        eventually(lambda: at_rest.flower_tasks(origin, auth) >= 5,
                   what="Flower showing the tasks")

        phi = [known, stranger, mobile, failing, queued_sender, email, *bodies.values()]
        # Digits alone too: a number may be stored without its "+".
        phi += [n.lstrip("+") for n in (known, stranger, mobile, failing, queued_sender)]
        # AOF (history and rewritten), RDB and every key's DUMP; each proven able to see a
        # clear-text canary.
        seen = at_rest.persisted(r, redis_server.data_dir)
        seen["Flower"] = at_rest.flower(origin, auth)
        seen["/metrics"] = web.get("/metrics").data
        seen["workers' /metrics"] = worker_metrics(
            *(w.metrics_port for w in svc.all_workers)).encode()
        assert b"switchboard_sends_total" in seen["workers' /metrics"]
        assert b"switchboard.outbound.send" in seen["Flower"]
        assert b"(redacted)" in seen["Flower"]
        # Flower reads the broker through the URI Celery gives it (our transport keeps it
        # redis://); its queue lengths answer only for a broker it knows.
        lengths = httpx.get(f"{origin}/api/queues/length", auth=auth, timeout=30)
        assert lengths.status_code == 200 and "active_queues" in lengths.json()
        assert b"switchboard_webhooks_enqueued_total" in seen["/metrics"]
        for name, blob in seen.items():
            assert at_rest.hits(blob, phi) == [], name
    finally:
        flower.stop()


def test_keys_generate_rotate_and_check_on_the_command_line(
        r: redis.Redis, redis_server: devstack.RedisServer) -> None:
    env = make_env(f"redis://127.0.0.1:{redis_server.port}/60", "http://127.0.0.1:1/fhir/R4/")
    made = [cli(env, "keys", "generate").stdout.strip() for _ in range(2)]
    assert made[0] != made[1] and all(len(parse_keys(k)) == 1 for k in made)
    new = made[0]
    entry = DeadLetterStore(r, sealer_for(DATA_KEY)).record("t", "q", ARGS, {}, "r", "d", 1)
    # Rotating without the old key leaves its values as they are and says so.
    proc = cli({**env, "DATA_ENCRYPTION_KEYS": new}, "keys", "rotate")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "dead letters: 0 re-sealed, 0 already sealed with the first key, 1 sealed with a " \
           "key not configured" in proc.stdout
    proc = cli({**env, "DATA_ENCRYPTION_KEYS": f"{new},{DATA_KEY}"}, "keys", "rotate")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dead letters: 1 re-sealed" in proc.stdout
    assert f"sealing key id {sealer_for(new).current_id}" in proc.stdout
    shown = cli({**env, "DATA_ENCRYPTION_KEYS": new}, "dlq", "show", entry.id)
    assert shown.returncode == 0 and PHONE in shown.stdout  # the old key can go
    for proc in (cli({**env, "DATA_ENCRYPTION_KEYS": new[:20]}, "check"),
                 cli({k: v for k, v in env.items() if k != "DATA_ENCRYPTION_KEYS"}, "check")):
        assert proc.returncode == 1
        assert "FAIL config: DATA_ENCRYPTION_KEYS" in proc.stdout
        assert new[:20] not in proc.stdout + proc.stderr
    check = cli({**env, "DATA_ENCRYPTION_KEYS": f"{new},{DATA_KEY}"}, "check")
    assert f"ok   keys: 2 configured, sealing with key id {sealer_for(new).current_id}" \
        in check.stdout
    for key in (new, DATA_KEY):
        assert key not in check.stdout + check.stderr
