"""Batched writes: what many threads hand over is written together by one thread of its own."""

from __future__ import annotations

import threading
import time

import redis

from tests.support import eventually
from worker.batched import Batched


def test_items_from_many_threads_are_written_together_by_the_batch_thread() -> None:
    calls: list[tuple[str, list[int]]] = []
    batch: Batched[int] = Batched(
        lambda items: calls.append((threading.current_thread().name, items)), "test-batch",
        gather=0.1)
    adders = [threading.Thread(target=batch.add, args=(i,)) for i in range(5)]
    for t in adders:
        t.start()
    for t in adders:
        t.join()
    assert calls == []  # not on the adding threads: the batch thread gathers first
    eventually(lambda: calls, timeout=5, interval=0.005, what="the batch written")
    assert [(name, sorted(items)) for name, items in calls] == [("test-batch", [0, 1, 2, 3, 4])]
    assert batch.flush() == 0
    batch.close()


def test_items_are_kept_while_redis_refuses_them_and_written_once_it_takes_them() -> None:
    written: list[list[str]] = []
    failures = [redis.exceptions.ConnectionError("down")] * 2

    def write(items: list[str]) -> None:
        if failures:
            raise failures.pop()
        written.append(items)

    batch: Batched[str] = Batched(write, "test-retry", gather=0.01, retry=0.02)
    batch.add("a")
    batch.add("b")
    eventually(lambda: written, timeout=5, interval=0.005, what="the batch written")
    assert written == [["a", "b"]] and failures == []
    batch.close()


def test_nothing_is_written_after_close() -> None:
    written: list[list[str]] = []
    batch: Batched[str] = Batched(written.append, "test-close", gather=0.05)
    batch.add("a")
    batch.close()  # before the gather window ends
    time.sleep(0.2)
    batch._flush_quietly()  # what runs at exit
    assert written == []
