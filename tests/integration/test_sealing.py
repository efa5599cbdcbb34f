"""Sealing against a real Redis: rotation of every sealed store (Lua compare-and-set), a
message sealed with a key the worker lacks, and no PHI in Redis's files, Flower or /metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from tests.unit.test_sealing import ARGS, BODY, EMBED, NEW, OLD, PHONE
from worker.crypto import sealer_for
from worker.ops import devstack
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
