"""Publishing a task in one Redis round trip, together with its inbox entry.

A stock `send_task` costs the receiver three round trips per webhook on the Redis transport
(the inbox write, kombu's exchange lookup, the LPUSH) and about 250 µs of Python. Here the
message is the exact one kombu would have pushed (Celery protocol 2, sealed body, base64),
built from a template that Celery's own `send_task` produced once on kombu's in-memory
transport, and one Lua script writes the inbox entry and pushes the message atomically: both or
neither. A stock `celery worker` consumes it like any other, and Flower shows it. The message
layout on Redis is an internal of Celery and kombu, so both are pinned to the minor release this
was written against (pyproject.toml), and tests/integration/test_publish.py fails when an upgrade
changes it.

The body is sealed once (worker/crypto.py, the app's sealed serializer): the task message carries
it (base64, as kombu encodes binary bodies) and the inbox entry the same sealed value as text.

The script also carries the time after which the receiver no longer waits for an answer: run
later than that (a Redis that stalled and resumed), it does nothing, so a webhook answered 5xx
leaves nothing behind.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from typing import Any

from celery import Celery
from kombu.connection import Connection
from kombu.entity import Queue
from redis.exceptions import NoScriptError

from worker.broker.celery_app import EMBED, QUEUE_INBOUND, REDACTED_ARGS, SEALED_CONTENT_TYPE
from worker.crypto import PREFIX, Sealer
from worker.stores.inbox import ENTRIES as INBOX_ENTRIES
from worker.stores.inbox import INDEX as INBOX_INDEX

# KEYS: inbox entries, inbox index, queue. ARGV: inbox key, inbox entry, message, deadline.
_IN_TIME = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if tonumber(ARGV[4]) > 0 and now > tonumber(ARGV[4]) then
  return 0
end
"""
_WRITE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[3])
return 1
"""
ACCEPT_AND_PUBLISH = _IN_TIME + _WRITE
# The same, at most once per spooled entry (worker/broker/spool.py): KEYS[4] is the entry's
# marker, ARGV[5] its lifetime. A flusher that died after the publish and before recording its
# progress publishes the entry again; the marker, set in the same atomic step as the writes,
# makes that a no-op (2) instead of a second task. Checked after the deadline, so a step run
# too late leaves no marker behind.
REPUBLISH_ONCE = _IN_TIME + """
if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[5]) then
  return 2
end
""" + _WRITE
# How long a marker outlives its publish: far longer than a flusher takes to come back.
ONCE_TTL_SECONDS = 7 * 86400
ONCE_PREFIX = "switchboard:spool:published:"
_TEMPLATE_TASK = "switchboard.template"
_TEMPLATE_QUEUE = QUEUE_INBOUND  # any of our queues: the routing is set per message


class TaskMessages:
    """Builds the Redis message of a task publish, as kombu would (see module doc)."""

    def __init__(self, app: Celery, sealer: Sealer) -> None:
        self._template = _capture(app)
        self._origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self._seal = sealer.seal_bytes

    def build(self, task: str, queue: str, args: list[Any], headers: dict[str, str]
              ) -> tuple[str, str, str]:
        """(task id, the JSON message to LPUSH onto `queue`, its sealed body as text)."""
        task_id = str(uuid.uuid4())
        # A shallow copy of the two dicts that change (a deepcopy costs more than the rest).
        t = self._template
        message = {**t, "headers": {**t["headers"], "task": task, "id": task_id,
                                    "root_id": task_id, "origin": self._origin, **headers},
                   "properties": {**t["properties"], "correlation_id": task_id,
                                  "delivery_tag": str(uuid.uuid4()),
                                  "delivery_info": {"exchange": "", "routing_key": queue}}}
        body = base64.b64encode(self._seal(json.dumps([args, {}, EMBED]).encode())).decode()
        message["body"] = body
        return task_id, json.dumps(message), PREFIX + body


def _capture(app: Celery) -> dict[str, Any]:
    """One message exactly as Celery and kombu publish it, caught on the in-memory transport."""
    with Connection("memory://") as conn:  # type: ignore[no-untyped-call]
        channel = conn.default_channel
        Queue(_TEMPLATE_QUEUE)(channel).declare()  # type: ignore[no-untyped-call]
        producer = app.amqp.Producer(channel)
        app.send_task(_TEMPLATE_TASK, args=[], queue=_TEMPLATE_QUEUE, producer=producer,
                      headers={}, **REDACTED_ARGS)
        message: dict[str, Any] = channel._get(_TEMPLATE_QUEUE)
    if message["properties"].get("body_encoding") != "base64" or \
            message.get("content-type") != SEALED_CONTENT_TYPE or \
            message.get("content-encoding") != "binary":
        raise RuntimeError("unexpected kombu message layout; publish with send_task instead")
    return message


class NotReplicated(Exception):
    """Redis took the step, but fewer replicas than asked acknowledged it in time (WAIT): a
    primary that dies now takes it along, so it must not be answered as accepted."""

    def __init__(self, acked: int, wanted: int) -> None:
        super().__init__(f"{acked} of {wanted} replicas acknowledged")
        self.acked = acked
        self.wanted = wanted


def replicated(script: Any, replicas: int, timeout_ms: int) -> Any:
    """`script`, run as `WAIT replicas timeout_ms` right behind it ON THE SAME CONNECTION, in
    one round trip (a pipeline without MULTI): WAIT counts the replicas that acknowledged the
    writes of the connection it runs on, so a WAIT on another pooled connection would prove
    nothing. A replica holding the step holds everything the primary wrote before it too (one
    ordered replication stream), such as an email post stored just before its task.
    Raises NotReplicated when fewer replicas acknowledged it in time."""
    client = script.registered_client

    def run(keys: list[str], args: list[Any]) -> Any:
        for attempt in (1, 2):
            pipe = client.pipeline(transaction=False)
            # EVALSHA by hand: redis-py's Script in a pipeline asks SCRIPT EXISTS first, one
            # more round trip on every request.
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", replicas, timeout_ms)
            done, acked = pipe.execute(raise_on_error=False)
            if isinstance(done, NoScriptError) and attempt == 1:
                # A primary that never ran it (a new one after a failover, or a restart).
                client.script_load(script.script)
                continue
            for result in (done, acked):
                if isinstance(result, Exception):
                    raise result
            if done and int(acked) < replicas:
                raise NotReplicated(int(acked), replicas)
            return done
        raise NoScriptError("script not loaded")  # pragma: no cover - loaded just above

    return run


def accept_and_publish(script: Any, messages: TaskMessages, task: str, queue: str,
                       args: list[Any], inbox_key: str, wait_seconds: float | None,
                       extra_headers: dict[str, str], once: str | None = None) -> str:
    """Write the inbox entry and push the task message in one step; returns the task id.

    With `wait_seconds`, the step carries the time after which the caller no longer waits: run
    later than that by Redis's clock, it does nothing. An answer that comes back in time yet
    says "too late" means the caller's clock is behind Redis's, so the step is sent again
    without a deadline. `script` is the registered ACCEPT_AND_PUBLISH, or replicated(it) to
    wait for replicas. With `once` (a spooled entry's id; `script` is then REPUBLISH_ONCE, or
    replicated(it)), a second publish of the same id does nothing. Raises whatever redis-py
    raises (nothing was kept, or it is unknown), or NotReplicated.
    """
    task_id, message, sealed = messages.build(task, queue, args, extra_headers)
    entry = json.dumps({"task": task, "queue": queue, "body": sealed})
    keys = [INBOX_ENTRIES, INBOX_INDEX, queue]
    extra: list[Any] = []
    if once is not None:
        keys.append(ONCE_PREFIX + once)
        extra.append(ONCE_TTL_SECONDS)
    if wait_seconds is not None and script(
            keys=keys, args=[inbox_key, entry, message, time.time() + wait_seconds, *extra]):
        return task_id
    script(keys=keys, args=[inbox_key, entry, message, 0, *extra])
    return task_id
