"""The liveness janitor against a real redis-server, on unacked records written by kombu itself:
messages are published and taken (`basic_get`, acks late) through kombu's Redis transport, as a
worker's consumer takes them, and given back through kombu's own restore."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Producer

from tests.conftest import make_env
from worker.broker.celery_app import QUEUE_INBOUND, REDACTED_ARGS, create_celery
from worker.broker.liveness import ALIVE, HELD, WORKERS, Liveness
from worker.ops import devstack
from worker.settings import load_settings

QUEUES = ("inbound", "outbound", "status")
DB = 62
PINNED = ("kombu's Redis transport changed how it records unacknowledged messages: re-check "
          "worker/broker/liveness.py (and worker/ops/metrics.py's in-flight gauge) before "
          "widening kombu's range in pyproject.toml")


@pytest.fixture()
def r(redis_server: devstack.RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port, db=DB)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


class Broker:
    """kombu on the test database: a publisher, a consumer channel that takes messages as a
    worker does (kombu records each in its unacked hash and index until acked), and the channel
    a janitor restores with."""

    def __init__(self, url: str) -> None:
        self._connections = [Connection(url), Connection(url)]  # type: ignore[no-untyped-call]
        self.consumer: Any = self._connections[0].channel()
        # A killed worker never gives its messages back: no restore when this channel closes.
        self.consumer.do_restore = False
        self.janitor: Any = self._connections[1].default_channel
        self._producer = Producer(self.consumer)

    def publish(self, queue: str, name: str) -> None:
        self._producer.publish({"name": name}, exchange="", routing_key=queue)

    def take(self, queue: str, worker: Liveness | None = None, age: float = 0.0,
             task_id: str = "") -> Any:
        """Take the next message of `queue` (kombu: BRPOP's counterpart, then its unacked
        record), then what our task_received hook records; `age` backdates kombu's record."""
        message = self.consumer.basic_get(queue, no_ack=False)
        assert message is not None, f"nothing in {queue}"
        if age:
            self.consumer.client.zadd(self.consumer.unacked_index_key,
                                      {message.delivery_tag: time.time() - age}, xx=True)
        if worker is not None:
            worker.received(message.delivery_tag, task_id or message.delivery_tag)
            worker.record_held()  # what the worker's recording thread does a moment later
        return message

    def next(self, queue: str) -> tuple[str, bool] | None:
        """The name and redelivered flag of the next message of `queue` (acked), if any."""
        message = self.consumer.basic_get(queue, no_ack=True)
        if message is None:
            return None
        return message.payload["name"], bool(message.delivery_info.get("redelivered"))

    def liveness(self, r: redis.Redis, worker_id: str, **kwargs: Any) -> Liveness:
        return Liveness(r, self.janitor, QUEUES, worker_id=worker_id, **kwargs)

    def close(self) -> None:
        for connection in self._connections:
            connection.close()


@pytest.fixture()
def broker(r: redis.Redis, redis_server: devstack.RedisServer) -> Iterator[Broker]:
    b = Broker(f"redis://127.0.0.1:{redis_server.port}/{DB}")
    yield b
    b.close()


def test_kombu_records_a_taken_task_message_as_the_janitor_reads_it(
        r: redis.Redis, broker: Broker, redis_server: devstack.RedisServer) -> None:
    """Pins the kombu internals liveness relies on: the `unacked` hash keyed by delivery tag
    holding [message, exchange, routing key], the `unacked_index` scored by time() at delivery,
    and QoS.restore_by_tag giving it back at the head of its queue, marked redelivered."""
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    app = create_celery(load_settings(make_env(url, "http://127.0.0.1:1/fhir/R4/")))
    app.send_task("switchboard.inbound.sms", args=[{"MessageSid": "SM1"}], queue=QUEUE_INBOUND,
                  **REDACTED_ARGS)
    broker.publish(QUEUE_INBOUND, "waiting behind it")  # LPUSH: the task message goes first
    before = time.time()
    message = broker.consumer.basic_get(QUEUE_INBOUND, no_ack=False)
    after = time.time()
    tag = message.delivery_tag
    assert message.headers["task"] == "switchboard.inbound.sms"
    channel = broker.janitor
    assert (channel.unacked_key, channel.unacked_index_key) == ("unacked", "unacked_index"), \
        PINNED
    record = json.loads(r.hget("unacked", tag) or "null")
    assert isinstance(record, list) and len(record) == 3, PINNED
    payload, exchange, routing_key = record
    assert (exchange, routing_key) == ("", QUEUE_INBOUND), PINNED
    assert payload["properties"]["delivery_tag"] == tag, PINNED
    assert payload["headers"]["task"] == "switchboard.inbound.sms", PINNED
    score = r.zscore("unacked_index", tag)
    assert score is not None and before <= score <= after, PINNED

    dead = broker.liveness(r, "dead", dead_after=0.2)
    dead.beat()
    dead.received(tag, message.headers["id"])
    dead.record_held()
    live = broker.liveness(r, "live", dead_after=10)
    live.beat()
    time.sleep(0.3)
    assert live.sweep() == 1
    assert not r.hexists("unacked", tag) and r.zscore("unacked_index", tag) is None, PINNED
    again = broker.consumer.basic_get(QUEUE_INBOUND, no_ack=True)  # the head of the queue
    assert again.headers["id"] == message.headers["id"], PINNED
    assert again.body == message.body and again.delivery_info["redelivered"] is True, PINNED
    assert broker.next(QUEUE_INBOUND) == ("waiting behind it", False)


def test_a_dead_workers_messages_go_back_to_the_head_of_their_queue(
        r: redis.Redis, broker: Broker) -> None:
    dead = broker.liveness(r, "dead", dead_after=0.2)
    live = broker.liveness(r, "live", dead_after=10)
    dead.beat()
    live.beat()
    for queue, name in (("inbound", "t1"), ("outbound", "t2"), ("inbound", "t3"),
                        ("inbound", "t4"), ("inbound", "waiting")):
        broker.publish(queue, name)
    broker.take("inbound", dead)  # t1
    broker.take("outbound", dead)  # t2
    broker.take("inbound", dead).ack()  # t3: acknowledged before the worker died: not redone
    mine = broker.take("inbound", live)  # t4
    assert live.sweep() == 0  # still beating
    time.sleep(0.3)
    assert live.sweep() == 2
    assert r.hkeys("unacked") == [mine.delivery_tag.encode()]
    # The restored message is the next one the queue hands out, marked redelivered.
    assert broker.next("inbound") == ("t1", True)
    assert broker.next("inbound") == ("waiting", False)
    assert broker.next("outbound") == ("t2", True)
    assert r.smembers(WORKERS) == {b"live"} and not r.exists(HELD + "dead")
    assert live.sweep() == 0  # nothing restored twice


def test_a_message_nobody_holds_is_restored_once_old_enough(r: redis.Redis,
                                                             broker: Broker) -> None:
    live = broker.liveness(r, "live", dead_after=1)
    live.beat()
    for name in ("orphan", "young", "mine"):
        broker.publish("inbound", name)
    broker.take("inbound", age=5.0)  # its worker died before recording it as held
    young = broker.take("inbound")
    mine = broker.take("inbound", live, age=5.0)
    assert live.sweep() == 1
    assert set(r.hkeys("unacked")) == {young.delivery_tag.encode(), mine.delivery_tag.encode()}
    assert broker.next("inbound") == ("orphan", True)


def test_held_tags_of_acknowledged_messages_are_pruned(r: redis.Redis, broker: Broker) -> None:
    live = broker.liveness(r, "live", interval=0.05, dead_after=1)
    broker.publish("inbound", "a")
    broker.publish("inbound", "b")
    a = broker.take("inbound", live)
    b = broker.take("inbound", live)
    a.ack()
    live.start()
    try:
        deadline = time.monotonic() + 5
        while r.smembers(HELD + "live") != {b.delivery_tag.encode()} and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.smembers(HELD + "live") == {b.delivery_tag.encode()}
        assert r.pttl(ALIVE + "live") > 0
    finally:
        live.stop()
    assert not r.exists(ALIVE + "live") and r.smembers(WORKERS) == set()


def test_received_messages_reach_the_held_set_from_the_recording_thread(
        r: redis.Redis, broker: Broker) -> None:
    live = broker.liveness(r, "live", interval=60)
    live.start()  # the heartbeat round is a minute away: only the recording thread writes
    try:
        tags = []
        for name in ("m1", "m2", "m3"):
            broker.publish("inbound", name)
            message = broker.take("inbound")
            live.received(message.delivery_tag, name)  # as kombu's consumer does, no wait
            tags.append(message.delivery_tag.encode())
        deadline = time.monotonic() + 5
        while len(r.smembers(HELD + "live")) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.smembers(HELD + "live") == set(tags)
        assert live.record_held() == 0  # nothing left over
    finally:
        live.stop()


def test_messages_on_foreign_routes_are_left_alone(r: redis.Redis, broker: Broker) -> None:
    dead = broker.liveness(r, "dead", dead_after=0.1)
    live = broker.liveness(r, "live")
    dead.beat()
    live.beat()
    broker.publish("celery", "another app's")
    message = broker.take("celery", dead)
    time.sleep(0.2)
    assert live.sweep() == 0
    assert r.hexists("unacked", message.delivery_tag)  # kombu's visibility timeout covers it


def test_messages_whose_ack_was_lost_are_restored_after_two_rounds(r: redis.Redis,
                                                                   broker: Broker) -> None:
    """After a broker reconnect kombu forgets the old channel's messages: acks are lost and the
    unacked records stay. Ours no longer held in memory go back; those still held stay."""
    me = broker.liveness(r, "me")
    me.beat()
    broker.publish("inbound", "done-but-unacked")
    broker.publish("inbound", "still-running")
    done = broker.take("inbound", me)
    running = broker.take("inbound", me)
    me.finished(done.delivery_tag)  # take() used the tag as the task id
    assert me.own_stale() == 0  # first round: only a suspect (its ack may be on its way)
    assert me.own_stale() == 1  # second round: restored
    assert r.hkeys("unacked") == [running.delivery_tag.encode()]
    assert broker.next("inbound") == ("done-but-unacked", True)
    assert me.own_stale() == 0


def test_a_deferred_copy_of_a_running_task_stays_held(r: redis.Redis, broker: Broker) -> None:
    """A retry or a deferral publishes the task again under the same id, and this worker may
    receive the copy (waiting for its ETA) before the running one ends. The running one's end
    must not make the waiting copy look lost: it would be restored and run twice."""
    for exact in (True, False):  # the tag known at the end (kombu's Redis), or not
        r.flushdb()
        me = broker.liveness(r, "me")
        me.beat()
        broker.publish("inbound", "running")
        broker.publish("inbound", "waiting-copy")
        running = broker.take("inbound", me, task_id="T")
        copy = broker.take("inbound", me, task_id="T")
        me.finished("T", running.delivery_tag if exact else None)
        running.ack()
        assert me.own_stale() == 0
        assert me.own_stale() == 0  # still held: never restored
        assert r.hkeys("unacked") == [copy.delivery_tag.encode()] and r.llen("inbound") == 0
        me.finished("T", copy.delivery_tag if exact else None)
        assert me.own_stale() == 0
        assert me.own_stale() == 1  # only now, no longer held and still unacked
