"""The task events Flower shows, from a real worker on Celery's stock consumer: every task's
received, started and succeeded events reach a Celery event receiver (what Flower runs), and a
task that finishes during a warm shutdown still has its succeeded event sent."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import Service, Services
from tests.integration.test_inbound_sms import PATIENT, deliver
from tests.support import Sandbox, eventually, sms_params
from worker.broker.celery_app import create_celery
from worker.ops import devstack


class Events:
    """Task events as Flower's receiver gets them, by task id, and how many broker messages
    carried them (a pattern subscription beside the receiver counts the messages)."""

    def __init__(self, svc: Service) -> None:
        self._by_task: dict[str, list[str]] = defaultdict(list)
        self._lock = threading.Lock()
        self.messages = 0
        self._stop = threading.Event()
        self._app = create_celery(svc.settings)
        self._client = redis.Redis.from_url(svc.settings.redis_url)
        self._pubsub = self._client.pubsub()
        self._pubsub.psubscribe("*celeryev/task*")
        self._pubsub.get_message(timeout=5)  # our subscription confirmed
        # PUBSUB NUMPAT counts the whole server's pattern subscriptions (other tests' workers).
        others = self._client.pubsub_numpat()
        self._connection = self._app.connection_for_read()
        self._receiver = self._app.events.Receiver(self._connection,
                                                   handlers={"*": self._on_event})
        self._threads = [threading.Thread(target=self._receive, daemon=True),
                         threading.Thread(target=self._count, daemon=True)]
        for thread in self._threads:
            thread.start()
        # Events sent before the receiver subscribes are missed: wait for its subscription
        # beside ours (kombu's Redis fanout subscribes by pattern).
        eventually(lambda: self._client.pubsub_numpat() > others or None, timeout=10,
                   what="the event receiver subscribed")

    def by_task(self) -> dict[str, list[str]]:
        """The task events received so far, by task id (a copy)."""
        with self._lock:
            return {task: list(kinds) for task, kinds in self._by_task.items()}

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["type"].startswith("task-"):
            with self._lock:
                self._by_task[event["uuid"]].append(event["type"])

    def _receive(self) -> None:
        # Until close() sets should_stop (looked at every 0.2 s, events or not).
        for _ in self._receiver.consume(limit=None, timeout=None, safety_interval=0.2):
            pass

    def _count(self) -> None:
        while not self._stop.is_set():
            if self._pubsub.get_message(timeout=0.2, ignore_subscribe_messages=True):
                self.messages += 1

    def close(self) -> None:
        self._stop.set()
        self._receiver.should_stop = True
        for thread in self._threads:
            thread.join(5)
        self._pubsub.close()
        self._client.close()
        self._connection.close()


@pytest.fixture
def events_of(services: Services) -> Iterator[Any]:
    opened: list[Events] = []

    def start(svc: Service) -> Events:
        opened.append(Events(svc))
        return opened[-1]

    yield start
    for e in opened:
        e.close()


def _settled(events: Events, tasks: int) -> bool:
    done = [kinds for kinds in events.by_task().values() if "task-succeeded" in kinds]
    return len(done) >= tasks


def test_every_task_event_reaches_the_receiver(
        services: Services, sandbox: Sandbox, events_of: Any, log_dir: Path) -> None:
    svc = services.get(worker=False, SMS_THREAD_STRATEGY="new-thread")
    sandbox.patient(PATIENT)
    events = events_of(svc)
    # Queued before the worker starts, so they run as one burst however slow the machine.
    for i in range(12):
        deliver(svc, sms_params(PATIENT, f"events {i}"))
    worker = devstack.start_worker(svc.env, log_dir, name="worker-events", concurrency=8)
    try:
        eventually(lambda: _settled(events, 12), timeout=30, what="12 tasks succeeded")
    finally:
        worker.stop()
    seen = events.by_task()
    assert len(seen) == 12
    for kinds in seen.values():
        assert sorted(kinds) == ["task-received", "task-started", "task-succeeded"], kinds
    assert events.messages > 0  # carried by the broker, as Flower receives them


def test_a_task_finishing_in_a_warm_shutdown_still_reports_success(
        services: Services, sandbox: Sandbox, events_of: Any, log_dir: Path) -> None:
    # Its events are sent after the consumer's loop stopped: were they lost, the task would show
    # in Flower as started forever.
    svc = services.get(worker=False, SMS_THREAD_STRATEGY="new-thread")
    sandbox.patient(PATIENT)
    sandbox.fault(delay_ms=3000, count=1, method="POST")  # the task's FHIR write is slow
    events = events_of(svc)
    worker = devstack.start_worker(svc.env, log_dir, name="worker-events-shutdown",
                                   concurrency=1)
    try:
        deliver(svc, sms_params(PATIENT, "finishing during shutdown"))
        task = eventually(lambda: next((t for t, kinds in events.by_task().items()
                                        if "task-started" in kinds), None),
                          timeout=20, what="the task started")
        eventually(lambda: sum(f.get("count", 0) for f in sandbox.faults()) == 0 or None,
                   timeout=10, what="the slow write under way")
    finally:
        worker.stop(timeout=20)  # SIGTERM: warm shutdown waits for the running task
    assert "succeeded" in worker.output()  # it did finish, inside the shutdown
    eventually(lambda: "task-succeeded" in events.by_task()[task] or None, timeout=5,
               what="its succeeded event")
