"""The broker transport: one Redis client per channel for publishes and acks, and a short wait
while the prefetch window is full (the gevent pool's synchronous loop)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tests.conftest import make_env
from worker.broker.celery_app import QUEUE_STATUS, create_celery
from worker.broker.transport import WAIT_WHILE_FULL_SECONDS, Transport
from worker.ops import devstack
from worker.settings import load_settings

DB = 62


@pytest.fixture()
def r(redis_server: devstack.RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port, db=DB)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_one_client_per_channel_and_a_new_one_with_a_new_pool(
        r: redis.Redis, redis_server: devstack.RedisServer) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    app = create_celery(load_settings(make_env(url, "http://127.0.0.1:1/fhir/R4/")))
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
        # The URI Celery prints and Flower reads (its broker page knows redis:// only).
        assert conn.as_uri().startswith("redis://")
        channel = conn.default_channel
        kept = channel._create_client()
        assert channel._create_client() is kept  # not a new client per publish or ack
        assert channel._create_client(asynchronous=True) is not kept  # the consumer's own
        app.send_task("switchboard.status.reconcile", queue=QUEUE_STATUS, connection=conn)
        channel._disconnect_pools()  # what a reconnect does: the old pool is gone
        fresh = channel._create_client()
        assert fresh is not kept and fresh.connection_pool is channel.pool
        app.send_task("switchboard.status.reconcile", queue=QUEUE_STATUS, connection=conn)
    # Both went out as stock kombu would write them (any Celery worker consumes them).
    sent = [json.loads(m) for m in r.lrange(QUEUE_STATUS, 0, -1)]
    assert [m["headers"]["task"] for m in sent] == ["switchboard.status.reconcile"] * 2


def test_a_full_prefetch_window_shortens_the_wait_so_a_freed_slot_is_refilled(
        r: redis.Redis, redis_server: devstack.RedisServer) -> None:
    # Celery's loop under the gevent pool calls drain_events(timeout=2.0); while every prefetch
    # slot is taken kombu does not ask Redis for more, so that wait is all the next message
    # would get after the running one is acked.
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    queue = Queue("transport-test", Exchange("transport-test"), "transport-test")
    got: list[Any] = []
    with Connection(url, transport=Transport) as conn:
        channel = conn.channel()
        producer = Producer(channel)
        for n in (1, 2):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key="transport-test",
                             declare=[queue])
        waits: list[float] = []
        get = conn.transport.cycle.get

        def recording_get(callback: Any, timeout: float | None = None) -> Any:
            waits.append(timeout)  # type: ignore[arg-type]
            return get(callback, timeout=timeout)

        conn.transport.cycle.get = recording_get
        consumer = Consumer(channel, [queue], callbacks=[lambda body, m: got.append(m)])
        consumer.qos(prefetch_count=1)
        with consumer:
            conn.drain_events(timeout=2.0)  # the first message takes the one slot
            assert [m.payload for m in got] == [{"n": 1}] and waits[-1] == 2.0
            with pytest.raises(socket.timeout):
                conn.drain_events(timeout=2.0)  # full: a short wait, not two seconds
            assert waits[-1] == WAIT_WHILE_FULL_SECONDS
            got[0].ack()
            conn.drain_events(timeout=2.0)  # the freed slot is refilled
            assert [m.payload for m in got] == [{"n": 1}, {"n": 2}]
            got[1].ack()
