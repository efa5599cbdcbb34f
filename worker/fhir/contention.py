"""How many FHIR writes are kept in flight: the limit that gives the server's best write rate.

Medplum runs every conditional write (If-None-Exist, conditional references, conditional
update, transactions) in a SERIALIZABLE PostgreSQL transaction. Overlapping ones abort with
SQLSTATE 40001; Medplum retries them inside the server (transactionAttempts 2, 50 ms apart) and
then answers 409 (worker.fhir.outcome.is_contention). Aborted transactions cost the server work,
so more writes in flight means *fewer* writes per second long before many 409s reach us:
measured on Medplum 5.0.10, 61 / 41 / 29 writes/s at 1 / 2 / 4 concurrent clients with 0.06
409s per write at 2. Another server (more cores, fewer hot rows) has its best higher up. Halving
on a 409 (AIMD) cannot tell these apart; measuring can.

So the controller here measures, per window of writes, the completed writes per second and their
mean latency at the limit in force, keeps a smoothed estimate of the rate at each limit it has
tried, and moves toward the limit with the best rate:

- at its best known limit ("home") it stays, and every `probe_every` windows tries one
  neighbour (alternately one more and one fewer) for one window; the probe becomes home only if
  it beat home's rate by `margin`, and then the next step the same way is tried at once (hill
  climbing on measured throughput, with exploration and momentum, so a server whose best moves
  is followed, and a limit of 1 is left again when 2 is better);
- latency says when more is plainly better: while the mean latency stays near the no-load
  latency (TCP Vegas' and Netflix concurrency-limits' estimate of queued requests,
  limit * (1 - rtt_min / rtt), below `queue_alpha`), the server runs the writes side by side, and
  the next probe comes at once and doubles the limit until the first probe fails (slow start),
  one more at a time after that;
- a 409 or a 429 still acts at once, without waiting for the window: a conflict during a probe
  ends the probe (back home), a conflict at home steps home down by one, a 429 halves it and
  holds off probing up for `throttle_hold_seconds`; at most once per window (`version`).
- a window in which no write had to wait (the limit was not what bounded the rate) teaches
  nothing about the limit: it is not recorded, and a probe up that nobody used goes back home.

Everything here is pure (no clock, no I/O: `now` is passed in), so it is unit-tested directly;
`WriteLimit` applies it to the threads of one process, and worker.fhir.budget to every process of
the cluster through Redis, with `WriteLimit` as its fallback. Reads and provider sends never wait
on either.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

OK = "ok"  # the write went through (or failed for a reason unrelated to load)
CONGESTED = "congested"  # a serialization conflict (409 40001): the server is contended
THROTTLED = "throttled"  # a 429: the server's rate limit


@dataclass(frozen=True)
class Tuning:
    """The controller's constants; the defaults need no tuning (docs/reliability.md)."""

    ceiling: int = 16  # never more in flight than this (FHIR_MAX_WRITES_IN_FLIGHT)
    probe_every: int = 4  # windows at home between two probes
    margin: float = 0.05  # a probe must beat home's rate by this fraction to become home
    smoothing: float = 0.5  # weight of the newest window in a limit's rate estimate
    queue_alpha: float = 0.5  # fewer writes queued than this (Vegas' estimate): room to grow
    rtt_drift: float = 0.02  # the no-load latency estimate may rise this fraction per window
    throttle_hold_seconds: float = 10.0  # after a 429, no probe up for this long
    window_min_seconds: float = 0.2  # a window lasts at least this long
    window_max_seconds: float = 2.0  # and at most this long
    window_min_writes: int = 8  # and until this many writes (or 2 per write allowed) completed


@dataclass(frozen=True)
class Window:
    """What the writes of one measurement window did."""

    seconds: float
    completed: int = 0  # writes that finished, any outcome
    conflicts: int = 0  # of which serialization conflicts (409 40001)
    throttled: int = 0  # of which 429s
    latency_sum: float = 0.0  # their time in flight, seconds
    waited: int = 0  # times a write found no room (the limit was binding)

    @property
    def rate(self) -> float:
        """Completed writes per second."""
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    @property
    def conflict_rate(self) -> float:
        """Serialization conflicts per second."""
        return self.conflicts / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class LimitState:
    """The controller's state: shared through Redis as JSON by every worker process."""

    limit: int  # writes allowed in flight now
    home: int  # the best limit known; a probe returns here
    estimates: dict[int, float] = field(default_factory=dict)  # smoothed writes/s per limit
    rtt_min: float = 0.0  # no-load latency estimate, seconds (0: none yet)
    windows: int = 0  # windows at home since the last probe
    probe_up: bool = True  # direction of the next probe
    growing: bool = True  # slow start: double while latency shows no queue
    hold_until: float = 0.0  # no probe up before this time (after a 429)
    version: int = 0  # bumped by every change; a slot remembers the version it started under
    rate: float = 0.0  # writes/s of the last window (for the metrics)
    conflict_rate: float = 0.0  # 409s/s of the last window (for the metrics)

    def to_json(self) -> str:
        """The state as JSON (estimates keyed by the limit as a string)."""
        d = {**self.__dict__, "estimates": {str(k): v for k, v in self.estimates.items()}}
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, tuning: Tuning) -> LimitState:
        """Parse a stored state; anything malformed or outside the ceiling starts afresh."""
        try:
            d = json.loads(text)
            state = cls(**{**d, "estimates": {int(k): float(v)
                                              for k, v in d["estimates"].items()}})
            if not (1 <= state.limit and 1 <= state.home) or not isinstance(state.version, int):
                raise ValueError("limits below 1")
        except (ValueError, TypeError, KeyError, AttributeError):
            return initial(tuning)
        ceiling = tuning.ceiling  # the ceiling may have been lowered since it was stored
        return replace(state, limit=min(state.limit, ceiling), home=min(state.home, ceiling))


# Where a cluster with no history starts: the old per-process default. A server whose best is
# lower answers conflicts and the limit steps down at once; a slow one with room shows no queue
# and the limit doubles; one write at a time would make a slow server's backlog wait.
START = 4


def initial(tuning: Tuning) -> LimitState:
    """Where a cluster with no history starts (START, within the ceiling), growing."""
    first = min(START, tuning.ceiling)
    return LimitState(limit=first, home=first)


def window_due(tuning: Tuning, limit: int, window: Window) -> bool:
    """Whether `window` has measured enough at `limit` to be judged."""
    if window.seconds < tuning.window_min_seconds or window.completed == 0:
        return False  # nothing finished yet (a slow server): the window goes on
    need = max(tuning.window_min_writes, 2 * limit)
    return window.completed >= need or window.seconds >= tuning.window_max_seconds


def after_window(tuning: Tuning, state: LimitState, window: Window, now: float) -> LimitState:
    """The state after a window measured at `state.limit` closed at `now`."""
    s = replace(state, version=state.version + 1, rate=window.rate,
                conflict_rate=window.conflict_rate)
    probing = s.limit != s.home
    if window.waited == 0 or window.completed == 0:
        # The limit did not bound the rate: no lesson. A probe up nobody used goes home.
        return replace(s, limit=s.home, windows=0) if probing else s
    latency = window.latency_sum / window.completed
    rtt_min = latency if s.rtt_min <= 0 else min(s.rtt_min * (1 + tuning.rtt_drift), latency)
    old = s.estimates.get(s.limit)
    estimate = window.rate if old is None else (
        tuning.smoothing * window.rate + (1 - tuning.smoothing) * old)
    s = replace(s, rtt_min=rtt_min, estimates={**s.estimates, s.limit: estimate})
    if probing:
        home_rate = s.estimates.get(s.home, 0.0)
        if estimate <= home_rate * (1 + tuning.margin):
            return replace(s, limit=s.home, windows=0, growing=False)
        went_up = s.limit > s.home
        s = replace(s, home=s.limit, windows=0)  # the probe was better: it is home now
        if s.growing and went_up:
            return s  # slow start: the latency at the new home decides the next step
        step = s.limit + 1 if went_up else s.limit - 1
        if (step <= tuning.ceiling and now >= s.hold_until) if went_up else step >= 1:
            return replace(s, limit=step, probe_up=went_up)  # it paid: one more step that way
        return s
    queued = s.limit * (1 - rtt_min / latency) if latency > 0 else 0.0
    can_grow = s.limit < tuning.ceiling and now >= s.hold_until
    up = min(tuning.ceiling, s.limit * 2 if s.growing else s.limit + 1)
    known_worse = s.estimates.get(up, float("inf")) <= estimate
    if can_grow and queued < tuning.queue_alpha and window.conflicts == 0 and not known_worse:
        # Vegas: no queue builds at this limit, so the server has room for more: probe up now
        # (unless the last probe there found less; the periodic probe re-checks that).
        return replace(s, limit=up, windows=0, probe_up=False)
    if s.windows + 1 < tuning.probe_every:
        return replace(s, windows=s.windows + 1)
    go_up = (s.probe_up and can_grow) or s.limit == 1
    if go_up and not can_grow:
        return replace(s, windows=0)  # nowhere to go
    target = s.limit + 1 if go_up else s.limit - 1
    return replace(s, limit=target, windows=0, probe_up=not go_up)


def after_congestion(tuning: Tuning, state: LimitState, outcome: str, now: float,
                     seen_version: int) -> LimitState:
    """The state right after a write met a conflict or a 429 (at once, not at window end).

    `seen_version` is the version the write started under: writes that started before the last
    change already had their effect counted, so one burst of aborts backs off once."""
    if outcome not in (CONGESTED, THROTTLED) or seen_version != state.version:
        return state
    s = replace(state, version=state.version + 1, windows=0, growing=False)
    if outcome == THROTTLED:
        home = max(1, min(s.limit, s.home) // 2)
        return replace(s, limit=home, home=home, hold_until=now + tuning.throttle_hold_seconds)
    if s.limit > s.home:
        return replace(s, limit=s.home)  # the probe up found conflicts: back home
    home = max(1, s.limit - 1)
    return replace(s, limit=home, home=home)


@dataclass
class Slot:
    """One write in flight; `outcome` says what the server made of it."""

    version: int
    outcome: str = OK


class Meter:
    """Counts one window's writes (used under its owner's lock)."""

    def __init__(self, now: float) -> None:
        self.started = now
        self.completed = self.conflicts = self.throttled = self.waited = 0
        self.latency_sum = 0.0

    def record(self, outcome: str, seconds: float) -> None:
        """One write finished."""
        self.completed += 1
        self.latency_sum += seconds
        self.conflicts += outcome == CONGESTED
        self.throttled += outcome == THROTTLED

    def window(self, now: float) -> Window:
        """The window so far."""
        return Window(now - self.started, self.completed, self.conflicts, self.throttled,
                      self.latency_sum, self.waited)


class WriteLimit:
    """The controller applied to the threads of one process: wait for room, hold it for one
    write, learn from how it went."""

    def __init__(self, tuning: Tuning, clock: Callable[[], float] = time.monotonic,
                 on_state: Callable[[LimitState], None] | None = None,
                 start: int | None = None) -> None:
        self.tuning = tuning
        self._clock = clock
        self._on_state = on_state  # called with each new state (metrics)
        # `start`: begin at this limit instead of 1 (a client with no budget of its own).
        first = min(tuning.ceiling, start) if start else initial(tuning).limit
        self.state = LimitState(limit=first, home=first)
        self._in_flight = 0
        self._meter = Meter(clock())
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        """Writes allowed in flight right now."""
        return self.state.limit

    @property
    def in_flight(self) -> int:
        """Writes in flight right now."""
        return self._in_flight

    @contextmanager
    def slot(self) -> Iterator[Slot]:
        """Wait for room, hold it for one write; set `slot.outcome` before leaving."""
        with self._cond:
            if self._in_flight >= self.state.limit:
                self._meter.waited += 1
                while self._in_flight >= self.state.limit:
                    self._cond.wait()
            self._in_flight += 1
            held = Slot(self.state.version)
        started = self._clock()
        try:
            yield held
        finally:
            self.release(held, self._clock() - started)

    def release(self, held: Slot, seconds: float) -> None:
        """Give back a slot taken by `slot()` and learn from its outcome."""
        with self._cond:
            self._in_flight -= 1
            now = self._clock()
            self._meter.record(held.outcome, seconds)
            state = after_congestion(self.tuning, self.state, held.outcome, now, held.version)
            window = self._meter.window(now)
            if state is self.state and window_due(self.tuning, state.limit, window):
                state = after_window(self.tuning, state, window, now)
            if state is not self.state:
                self.state = state
                self._meter = Meter(now)  # a new limit: a new window
                if self._on_state is not None:
                    self._on_state(state)
            self._cond.notify_all()
