"""The broker transport keeps one Redis client per channel for its publishes and acks."""

from __future__ import annotations

import json

import redis

from tests.conftest import make_env
from worker.broker.celery_app import QUEUE_STATUS, create_celery
from worker.broker.transport import Transport
from worker.ops import devstack
from worker.settings import load_settings


def test_one_client_per_channel_and_a_new_one_with_a_new_pool(
        redis_server: devstack.RedisServer) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/62"
    r = redis.Redis(port=redis_server.port, db=62)
    r.flushdb()
    app = create_celery(load_settings(make_env(url, "http://127.0.0.1:1/fhir/R4/")))
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
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
    r.flushdb()
    r.close()
