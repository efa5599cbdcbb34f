"""Writes many threads hand over, made by one thread of their own in one round trip per moment.

The liveness record of received messages and the inbox's removal of finished ones both happen
once per message, from the threads that run (or receive) messages; each round trip there costs
a CPU-bound worker far more than its bytes (the GIL changes hands on both sides of it). So the
items are gathered for a moment and written together, and kept for the next try when the write
fails.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import redis

T = TypeVar("T")
log = logging.getLogger("switchboard.batched")


class Batched(Generic[T]):
    """Items added from any thread, written by `write` (one call for all gathered so far) from
    a daemon thread started on first use in each process (a forked child starts its own),
    `gather` seconds after the first of them; on a Redis error they are kept, and tried again
    `retry` seconds later. `close()` stops the thread: nothing is written after it."""

    def __init__(self, write: Callable[[list[T]], None], name: str, gather: float,
                 retry: float = 1.0) -> None:
        self._write = write
        self._name = name
        self._gather = gather
        self._retry = retry
        self._items: list[T] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._pid: int | None = None

    def add(self, item: T) -> None:
        """Hand an item over; it is written within `gather` seconds (while Redis answers)."""
        with self._lock:
            self._items.append(item)
            if self._pid != os.getpid():  # first use in this process, or we were forked
                self._pid = os.getpid()
                threading.Thread(target=self._run, name=self._name, daemon=True).start()
                atexit.register(self._flush_quietly)
        self._wake.set()

    def flush(self) -> int:
        """Write what has been gathered, now, in this thread; how many items."""
        with self._lock:
            items, self._items = self._items, []
        if not items:
            return 0
        try:
            self._write(items)
        except redis.exceptions.RedisError:
            with self._lock:
                self._items[:0] = items  # kept for the next try
            raise
        return len(items)

    def close(self) -> None:
        """Stop writing (what is still gathered is dropped with the process)."""
        self._closed.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait()
            self._closed.wait(self._gather)  # gather what else arrives meanwhile
            self._wake.clear()
            if self._closed.is_set():
                return
            try:
                self.flush()
            except redis.exceptions.RedisError as exc:
                log.warning("%s: not written yet (%s); next try in %.0fs", self._name,
                            type(exc).__name__, self._retry)
                self._closed.wait(self._retry)
                self._wake.set()

    def _flush_quietly(self) -> None:
        if self._closed.is_set():
            return
        try:
            self.flush()
        except redis.exceptions.RedisError:
            pass  # at exit with Redis gone: nobody is left to tell
