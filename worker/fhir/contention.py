"""How many FHIR writes one process keeps in flight, adapted to the server's contention.

Medplum runs every conditional write (If-None-Exist, conditional references, conditional
update, transactions) in a SERIALIZABLE PostgreSQL transaction. Overlapping ones abort with
SQLSTATE 40001 and come back as 409 (see worker.fhir.outcome.is_contention). More writes in
flight means more aborts and *fewer* writes per second: measured on Medplum 5.0.10, 45 / 41 /
27 / 15 / 9 writes/s at 1 / 2 / 4 / 8 / 16 concurrent requests. So the limit behaves like TCP's
congestion window: additive increase (one more write in flight per window of successes),
multiplicative decrease (halve on a conflict or a 429), at most one decrease per window so one
burst of aborted writes counts once. Reads and provider sends never wait on it.

The limit is shared by the threads of one process. Worker processes on other machines each run
their own and converge the way TCP flows do: every one of them backs off when the server says
it is contended.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

CONGESTED = "congested"  # a serialization conflict or a 429: the server is contended
OK = "ok"  # the write went through (or failed for a reason unrelated to load)


@dataclass
class Slot:
    """One write in flight; `outcome` says what the server made of it."""

    epoch: int
    outcome: str = OK


class WriteLimit:
    """AIMD limit on concurrent FHIR writes, shared by the threads of one process."""

    def __init__(self, maximum: int, initial: int | None = None, minimum: int = 1) -> None:
        self.maximum = max(1, maximum)
        self.minimum = max(1, min(minimum, self.maximum))
        self._limit = float(min(self.maximum, max(self.minimum, initial or self.maximum)))
        self._in_flight = 0
        self._epoch = 0  # bumped by every decrease; slots started before it don't decrease again
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        """Writes allowed in flight right now."""
        return int(self._limit)

    @property
    def in_flight(self) -> int:
        """Writes in flight right now."""
        return self._in_flight

    @contextmanager
    def slot(self) -> Iterator[Slot]:
        """Wait for room, hold it for one write; set `slot.outcome` before leaving."""
        with self._cond:
            while self._in_flight >= int(self._limit):
                self._cond.wait()
            self._in_flight += 1
            held = Slot(self._epoch)
        try:
            yield held
        finally:
            with self._cond:
                self._in_flight -= 1
                self._adjust(held)
                self._cond.notify_all()

    def _adjust(self, held: Slot) -> None:
        if held.outcome == CONGESTED:
            if held.epoch == self._epoch:  # first conflict of this window: halve, once
                self._limit = max(float(self.minimum), self._limit / 2)
                self._epoch += 1
        else:
            self._limit = min(float(self.maximum), self._limit + 1.0 / self._limit)
