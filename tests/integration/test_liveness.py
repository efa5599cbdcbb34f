"""The liveness janitor against a real redis-server, with kombu's unacked records laid out as
kombu's Redis transport writes them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis

from worker.broker.liveness import ALIVE, HELD, UNACKED, UNACKED_INDEX, WORKERS, Liveness
from worker.ops import devstack

QUEUES = ("inbound", "outbound", "status")


@pytest.fixture()
def r(redis_server: devstack.RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port, db=62)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def take(r: redis.Redis, worker: Liveness, tag: str, queue: str = "inbound",
         age: float = 0.0, task_id: str = "") -> None:
    """What kombu does when a worker takes a message (qos.append), then our task_received."""
    payload = {"body": "e30=", "headers": {"id": tag}, "properties": {
        "delivery_tag": tag, "delivery_info": {"exchange": queue, "routing_key": queue}}}
    r.hset(UNACKED, tag, json.dumps([payload, queue, queue]))
    r.zadd(UNACKED_INDEX, {tag: time.time() - age})
    worker.received(tag, task_id)
    worker.record_held()  # what the worker's recording thread does a moment later


def test_a_dead_workers_messages_go_back_to_the_head_of_their_queue(r: redis.Redis) -> None:
    dead = Liveness(r, QUEUES, dead_after=0.2, worker_id="dead")
    live = Liveness(r, QUEUES, dead_after=10, worker_id="live")
    dead.beat()
    live.beat()
    r.lpush("inbound", "waiting")
    take(r, dead, "t1")
    take(r, dead, "t2", queue="outbound")
    take(r, dead, "t3")
    r.hdel(UNACKED, "t3")  # acknowledged before the worker died (kombu's ack): not to be redone
    r.zrem(UNACKED_INDEX, "t3")
    take(r, live, "t4")
    assert live.sweep() == 0  # still beating
    time.sleep(0.3)
    assert live.sweep() == 2
    assert r.hkeys(UNACKED) == [b"t4"] and r.zrange(UNACKED_INDEX, 0, -1) == [b"t4"]
    # RPUSH: the restored message is the next one BRPOP hands out, marked redelivered.
    restored = json.loads(r.rpop("inbound"))
    assert restored["headers"] == {"id": "t1", "redelivered": True}
    assert restored["properties"]["delivery_info"]["redelivered"] is True
    assert r.rpop("inbound") == b"waiting"
    assert json.loads(r.rpop("outbound"))["headers"]["id"] == "t2"
    assert r.smembers(WORKERS) == {b"live"} and not r.exists(HELD + "dead")
    assert live.sweep() == 0  # nothing restored twice


def test_a_message_nobody_holds_is_restored_once_old_enough(r: redis.Redis) -> None:
    live = Liveness(r, QUEUES, dead_after=1, worker_id="live")
    live.beat()
    payload = {"headers": {"id": "orphan"}, "properties": {"delivery_info": {}}}
    for tag, age in (("orphan", 5.0), ("young", 0.0)):
        r.hset(UNACKED, tag, json.dumps([payload, "inbound", "inbound"]))
        r.zadd(UNACKED_INDEX, {tag: time.time() - age})
    take(r, live, "mine", age=5.0)
    assert live.sweep() == 1
    assert set(r.hkeys(UNACKED)) == {b"young", b"mine"}
    assert r.llen("inbound") == 1


def test_held_tags_of_acknowledged_messages_are_pruned(r: redis.Redis) -> None:
    live = Liveness(r, QUEUES, interval=0.05, dead_after=1, worker_id="live")
    take(r, live, "a")
    take(r, live, "b")
    r.hdel(UNACKED, "a")
    r.zrem(UNACKED_INDEX, "a")
    live.start()
    try:
        deadline = time.monotonic() + 5
        while r.smembers(HELD + "live") != {b"b"} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.smembers(HELD + "live") == {b"b"}
        assert r.pttl(ALIVE + "live") > 0
    finally:
        live.stop()
    assert not r.exists(ALIVE + "live") and r.smembers(WORKERS) == set()


def test_received_messages_reach_the_held_set_from_the_recording_thread(r: redis.Redis
                                                                        ) -> None:
    live = Liveness(r, QUEUES, interval=60, worker_id="live")
    live.start()  # the heartbeat round is a minute away: only the recording thread writes
    try:
        for tag in ("m1", "m2", "m3"):
            r.hset(UNACKED, tag, "[]")
            live.received(tag, tag)  # as kombu's consumer does, without waiting on Redis
        deadline = time.monotonic() + 5
        while len(r.smembers(HELD + "live")) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.smembers(HELD + "live") == {b"m1", b"m2", b"m3"}
        assert live.record_held() == 0  # nothing left over
    finally:
        live.stop()


def test_messages_on_foreign_routing_keys_are_left_alone(r: redis.Redis) -> None:
    dead = Liveness(r, QUEUES, dead_after=0.1, worker_id="dead")
    live = Liveness(r, QUEUES, worker_id="live")
    dead.beat()
    live.beat()
    take(r, dead, "x", queue="celery")
    time.sleep(0.2)
    assert live.sweep() == 0
    assert r.hexists(UNACKED, "x")  # kombu's visibility timeout still covers it


def test_messages_whose_ack_was_lost_are_restored_after_two_rounds(r: redis.Redis) -> None:
    """After a broker reconnect kombu forgets the old channel's messages: acks are lost and the
    unacked records stay. Ours no longer held in memory go back; those still held stay."""
    me = Liveness(r, QUEUES, worker_id="me")
    me.beat()
    take(r, me, "done-but-unacked")
    take(r, me, "still-running")
    me.finished("done-but-unacked")  # take() used the tag as the task id
    assert me.own_stale() == 0  # first round: only a suspect (its ack may be on its way)
    assert me.own_stale() == 1  # second round: restored
    assert r.hkeys(UNACKED) == [b"still-running"]
    assert json.loads(r.rpop("inbound"))["headers"]["id"] == "done-but-unacked"
    assert me.own_stale() == 0


def test_a_deferred_copy_of_a_running_task_stays_held(r: redis.Redis) -> None:
    """A retry or a deferral publishes the task again under the same id, and this worker may
    receive the copy (waiting for its ETA) before the running one ends. The running one's end
    must not make the waiting copy look lost: it would be restored and run twice."""
    for exact in (True, False):  # the tag known at the end (kombu's Redis), or not
        r.flushdb()
        me = Liveness(r, QUEUES, worker_id="me")
        me.beat()
        take(r, me, "running", task_id="T")
        take(r, me, "waiting-copy", task_id="T")
        me.finished("T", "running" if exact else None)
        r.hdel(UNACKED, "running")  # its ack
        assert me.own_stale() == 0
        assert me.own_stale() == 0  # still held: never restored
        assert r.hkeys(UNACKED) == [b"waiting-copy"] and r.llen("inbound") == 0
        me.finished("T", "waiting-copy" if exact else None)
        assert me.own_stale() == 0
        assert me.own_stale() == 1  # only now, no longer held and still unacked
