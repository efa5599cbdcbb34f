"""The receiver's one-step publish pushes exactly the message a stock `send_task` would."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator

import pytest
import redis

from tests.conftest import make_env
from tests.support import eventually
from worker.broker.celery_app import QUEUE_INBOUND, REDACTED_ARGS, create_celery
from worker.broker.publish import ACCEPT_AND_PUBLISH, TaskMessages, accept_and_publish
from worker.crypto import Sealer
from worker.ops import devstack
from worker.settings import load_settings
from worker.stores.inbox import ENTRIES, INDEX, Inbox, InboxEntry

VARIABLE = {"id", "root_id", "correlation_id", "delivery_tag", "origin"}
# The one-step publish copies Celery's protocol-2 message as kombu's Redis transport stores it:
# an internal, so celery and kombu are pinned to a minor release (pyproject.toml).
PINNED = ("Celery or kombu changed the task message on Redis: re-check worker/broker/publish.py "
          "before widening their range in pyproject.toml")


@pytest.fixture()
def r(redis_server: devstack.RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port, db=61)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def _strip(message: dict, sealer: Sealer) -> dict:  # type: ignore[type-arg]
    headers = {k: v for k, v in message["headers"].items() if k not in VARIABLE}
    props = {k: v for k, v in message["properties"].items() if k not in VARIABLE}
    # Sealing is randomised (a fresh nonce each time): compare what the bodies open to.
    body = json.loads(sealer.open_bytes(base64.b64decode(message["body"])))
    return {**message, "headers": headers, "properties": props, "body": body}


def test_the_same_message_as_send_task_in_one_step(r: redis.Redis,
                                                   redis_server: devstack.RedisServer) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/61"
    settings = load_settings(make_env(url, "http://127.0.0.1:1/fhir/R4/"))
    app, sealer = create_celery(settings), settings.sealer()
    args = [{"MessageSid": "SM1", "Body": "hé"}, {"received_at": "2026-11-30T00:00:00Z"}]
    headers = {"switchboard_inbox": "sms:SM1"}
    app.send_task("switchboard.inbound.sms", args=args, queue=QUEUE_INBOUND, headers=headers,
                  **REDACTED_ARGS)
    stock = json.loads(r.rpop(QUEUE_INBOUND))
    task_id = accept_and_publish(r.register_script(ACCEPT_AND_PUBLISH), TaskMessages(app, sealer),
                                 "switchboard.inbound.sms", QUEUE_INBOUND, args, "sms:SM1",
                                 1.0, headers)
    ours = json.loads(r.rpop(QUEUE_INBOUND))
    assert ours["headers"]["id"] == ours["properties"]["correlation_id"] == task_id
    assert ours["properties"]["delivery_tag"] != stock["properties"]["delivery_tag"]
    assert ours["content-type"] == "application/x-switchboard-sealed"
    assert set(stock["headers"]) == set(ours["headers"]), PINNED
    assert set(stock["properties"]) == set(ours["properties"]), PINNED
    assert _strip(ours, sealer) == _strip(stock, sealer), PINNED  # same args, same encoding
    assert "hé" not in json.dumps(ours) and b"SM1" not in base64.b64decode(ours["body"])
    # ... and the inbox entry was written in the same step, holding the same sealed body.
    entry = json.loads(r.hget(ENTRIES, "sms:SM1"))
    assert entry["body"] == "sb1:" + ours["body"]
    assert Inbox(r, sealer).stale(-1) == [InboxEntry("sms:SM1", "switchboard.inbound.sms",
                                                     QUEUE_INBOUND, args)]
    assert r.zscore(INDEX, "sms:SM1") is not None
    app.close()


def test_a_publish_that_reaches_redis_too_late_writes_nothing(r: redis.Redis) -> None:
    script = r.register_script(ACCEPT_AND_PUBLISH)
    # A deadline already past by Redis's clock: what a stalled-then-resumed Redis would run.
    assert script(keys=[ENTRIES, INDEX, QUEUE_INBOUND], args=["k", "{}", "{}", 1.0]) == 0
    assert r.llen(QUEUE_INBOUND) == 0 and r.hlen(ENTRIES) == 0 and r.zcard(INDEX) == 0


def test_finished_entries_are_removed_together_from_the_inbox_thread(r: redis.Redis) -> None:
    inbox = Inbox(r, Sealer([b"\x01" * 32]))
    for key in ("a", "b", "c", "kept"):
        r.hset(ENTRIES, key, "{}")
        r.zadd(INDEX, {key: 1.0})
    r.set("count:b", 2)
    for key in ("a", "b", "c"):
        inbox.done_soon(key, also_delete=("count:b",) if key == "b" else ())
    # Not on the caller's thread: the inbox's own gathers for DONE_GATHER_SECONDS first.
    assert r.hlen(ENTRIES) == 4
    assert any(t.name == "inbox-done" for t in threading.enumerate())
    eventually(lambda: r.hlen(ENTRIES) == 1, timeout=5, interval=0.01,
               what="finished entries removed")
    assert r.hkeys(ENTRIES) == [b"kept"] and r.zrange(INDEX, 0, -1) == [b"kept"]
    assert not r.exists("count:b")
    assert inbox.flush() == 0  # nothing left over
