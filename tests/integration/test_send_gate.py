"""The send gate (opt-out, send slot, claim in one Lua step) on a real redis-server: each
outcome, and that a refused or waiting send leaves nothing behind it should not; and the step
that records a send with the API request's state."""

from __future__ import annotations

from collections.abc import Iterator
from unittest.mock import ANY

import pytest
import redis

from tests.support import DATA_KEY
from worker.crypto import sealer_for
from worker.ops import devstack
from worker.stores import digest
from worker.stores.optouts import OptOuts
from worker.stores.outbound_state import EVENTS, KEY, TTL, OutboundState
from worker.stores.rate_limit import bucket_key
from worker.stores.send_gate import SendGate
from worker.stores.send_ledger import SendLedger

PHONE = "+15551230001"
pytestmark = pytest.mark.integration


@pytest.fixture
def r(redis_server: devstack.RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def _stores(r: redis.Redis) -> tuple[SendGate, OptOuts, SendLedger]:
    optouts, ledger = OptOuts(r, b"k" * 32), SendLedger(r, sealer_for(DATA_KEY))
    return SendGate(optouts, ledger), optouts, ledger


def test_a_free_send_takes_its_slot_and_the_claim(r: redis.Redis) -> None:
    gate, _, _ = _stores(r)
    opened = gate.open("c1", "task-1", "sms:clinic", 100.0, opt_out=("sms", PHONE))
    assert opened.outcome == "claimed"
    assert r.exists(SendLedger.CLAIM + "c1") and r.exists(bucket_key("sms:clinic"))


def test_an_opted_out_address_is_refused_before_any_slot_or_claim(r: redis.Redis) -> None:
    gate, optouts, _ = _stores(r)
    optouts.add("sms", PHONE)
    assert gate.open("c1", "t", "sms:clinic", 1.0, opt_out=("sms", PHONE)).outcome == "opted-out"
    assert not r.exists(SendLedger.CLAIM + "c1") and not r.exists(bucket_key("sms:clinic"))
    # Another channel's opt-out is not this one's; no opt-out check at all for a push device.
    assert gate.open("c1", "t", "sms:clinic", 1.0, opt_out=("email", PHONE)).outcome == "claimed"
    assert gate.open("c2", "t", "push:app", 1.0).outcome == "claimed"


def test_a_legacy_opt_out_refuses_and_is_moved_to_the_keyed_form(r: redis.Redis) -> None:
    gate, optouts, _ = _stores(r)
    r.sadd(OptOuts.KEY, digest(f"sms:{PHONE}"))  # written before opt-outs were keyed
    assert gate.open("c1", "t", "sms:clinic", 1.0, opt_out=("sms", PHONE)).outcome == "opted-out"
    assert r.smembers(OptOuts.KEY) == {optouts.digests("sms", PHONE)[0].encode()}


def test_a_send_over_the_rate_waits_for_its_reserved_slot_without_a_claim(r: redis.Redis
                                                                          ) -> None:
    gate = _stores(r)[0]
    assert gate.open("c1", "t1", "sms:clinic", 1.0).outcome == "claimed"
    second = gate.open("c2", "t2", "sms:clinic", 1.0)
    assert second.outcome == "wait" and 0.5 < second.wait <= 1.0
    assert not r.exists(SendLedger.CLAIM + "c2")
    # Its next run keeps to the slot it reserved: still early → wait again, no new token.
    again = gate.open("c2", "t2", "sms:clinic", 1.0, slot=second.slot)
    assert again.outcome == "wait" and again.slot == pytest.approx(second.slot)
    # Once the slot has come, it sends without asking the bucket again.
    assert gate.open("c2", "t2", "sms:clinic", 1.0, slot=second.slot - 5).outcome == "claimed"


def test_a_claimed_send_is_held_for_anyone_else(r: redis.Redis) -> None:
    gate = _stores(r)[0]
    assert gate.open("c1", "task-1", "sms:clinic", 1e6).outcome == "claimed"
    held = gate.open("c1", "task-2", "sms:clinic", 1e6)
    assert held.outcome == "held" and held.claim is not None and held.done is None
    assert held.claim.task_id == "task-1" and 0 <= held.claim.age < 5


def test_a_sent_message_is_answered_before_any_other_check(r: redis.Redis) -> None:
    gate, optouts, ledger = _stores(r)
    ledger.record("c1", {"provider_id": "SM1", "channel": "sms"})
    optouts.add("sms", PHONE)  # opted out after the send: the send still happened
    after = gate.open("c1", "task-2", "sms:clinic", 1.0, opt_out=("sms", PHONE))
    assert after.outcome == "done" and after.done == {"provider_id": "SM1", "channel": "sms"}
    assert not r.exists(SendLedger.CLAIM + "c1") and not r.exists(bucket_key("sms:clinic"))


def test_recording_a_send_writes_the_record_and_the_requests_state_in_one_step(
        r: redis.Redis) -> None:
    sealer = sealer_for(DATA_KEY)
    ledger, state = SendLedger(r, sealer), OutboundState(r, sealer)
    state.create("req-1")
    state.update("req-1", "queued", communication="c1", last_error="provider-unavailable")
    r.delete(EVENTS + "req-1")
    sent = {"provider_id": "SM1", "channel": "sms", "message_id": ""}
    ledger.record("c1", sent, state.change("req-1", "sent", communication="c1", **sent))
    assert ledger.done("c1") == sent
    assert 29 * 86400 < r.ttl(SendLedger.DONE + "c1") <= SendLedger.KEEP
    # Settled: the error it was retried past is gone; the details are sealed, status is not.
    assert state.get("req-1") == {"status": "sent", "updated_at": ANY, "communication": "c1",
                                  "provider_id": "SM1", "channel": "sms", "message_id": ""}
    assert r.hget(KEY + "req-1", "status") == b"sent"
    assert b"SM1" not in r.hget(KEY + "req-1", "provider_id")  # type: ignore[operator]
    assert 29 * 86400 < r.ttl(KEY + "req-1") <= TTL
    # A caller waiting with `Prefer: wait` is woken.
    assert r.lrange(EVENTS + "req-1", 0, -1) == [b"sent"] and 0 < r.ttl(EVENTS + "req-1") <= 120


def test_an_unsettled_state_change_keeps_the_last_error(r: redis.Redis) -> None:
    state = OutboundState(r, sealer_for(DATA_KEY))
    state.update("req-2", "queued", last_error="provider-unavailable")
    state.update("req-2", "queued", communication="c2")
    assert state.get("req-2") == {"status": "queued", "updated_at": ANY, "communication": "c2",
                                  "last_error": "provider-unavailable"}
    assert r.lrange(EVENTS + "req-2", 0, -1) == [b"queued", b"queued"]
    state.update("req-2", "failed", error="invalid-recipient")  # settled: the error goes
    assert state.get("req-2") == {"status": "failed", "updated_at": ANY, "communication": "c2",
                                  "error": "invalid-recipient"}
    assert r.lrange(EVENTS + "req-2", 0, 0) == [b"failed"]
