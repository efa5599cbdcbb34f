"""The WhatsApp store on a real redis-server: windows keep the latest message and close by
themselves, holds are idempotent and ordered, the template is due once per hold, and nothing
about the patient is in Redis in clear."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from tests.support import DATA_KEY
from worker.crypto import sealer_for
from worker.ops import devstack
from worker.stores.whatsapp import WhatsAppStore

PATIENT = "+447700900123"
SENDER = "whatsapp:+15557654321"


@pytest.fixture()
def client(redis_server: devstack.RedisServer) -> Iterator[redis.Redis]:
    """A Redis database of its own (the services use 1-63 from the bottom)."""
    c = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/63")
    c.flushdb()
    yield c
    c.flushdb()
    c.close()


def store(client: redis.Redis, window: float = 24 * 3600) -> WhatsAppStore:
    return WhatsAppStore(client, sealer_for(DATA_KEY), b"address-key", window)


def test_a_window_keeps_the_latest_message_and_closes_by_itself(client: redis.Redis) -> None:
    s = store(client, window=2)
    queue = s.queue(PATIENT, SENDER)
    assert s.last_inbound(queue) is None
    now = time.time()
    s.opened(queue, now)
    s.opened(queue, now - 1)  # an older message processed late does not move it back
    assert s.last_inbound(queue) == pytest.approx(now, abs=0.01)
    time.sleep(2.5)
    assert s.last_inbound(queue) is None  # expired with the window
    s.opened(queue, time.time())
    s.close(queue)
    assert s.last_inbound(queue) is None


def test_holds_are_idempotent_ordered_and_template_due_once(client: redis.Redis) -> None:
    s = store(client)
    queue = s.queue(PATIENT, SENDER)
    assert s.queue(PATIENT, "whatsapp:+15550000000") != queue  # per sender
    assert s.hold(queue, "c1", "r1", 100.0) is True
    assert s.hold(queue, "c2", "r2", 101.0) is True
    assert s.hold(queue, "c1", "r1", 105.0) is False  # a redelivery keeps its place
    assert s.held(queue) == ["c1", "c2"]
    assert s.template_due(queue, 60) is True
    assert s.template_due(queue, 60) is False
    s.template_failed(queue)
    assert s.template_due(queue, 60) is True
    reply = s.get("c2")
    assert reply is not None and (reply.request_id, reply.queue) == ("r2", queue)
    assert s.held_before(101.0) == ["c1"]
    s.release("c1")
    assert s.held(queue) == ["c2"] and [r.communication_id for r in s.all()] == ["c2"]
    s.release("c2")
    assert s.held(queue) == [] and s.all() == []
    assert s.template_due(queue, 60) is True  # a new hold asks again


def test_nothing_about_the_patient_is_in_clear(client: redis.Redis) -> None:
    s = store(client)
    queue = s.queue(PATIENT, SENDER)
    s.opened(queue, time.time())
    s.hold(queue, "comm-1", "request-1", time.time())
    s.template_due(queue, 60)
    digits = PATIENT[1:].encode()
    for key in client.scan_iter("*"):
        assert digits not in key
        kind = client.type(key)
        values = ([client.get(key) or b""] if kind == b"string"
                  else [m for m, _ in client.zscan_iter(key)])
        assert all(digits not in v and b"request-1" not in v for v in values), key
    assert s.reseal().current == 1  # the one record, sealed with the first key
