"""The write controller (worker.fhir.contention): pure rules, driven window by window against
model servers whose write rate at each number of writes in flight is known."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from worker.fhir.contention import (
    CONGESTED,
    OK,
    THROTTLED,
    LimitState,
    Tuning,
    Window,
    after_congestion,
    after_window,
    initial,
    window_due,
)

TUNING = Tuning(ceiling=16)
Curve = Callable[[int], float]


def medplum(n: int) -> float:
    """Medplum 5.0.10 as measured (45 / 41 / 27 / 15 / 9 writes/s at 1 / 2 / 4 / 8 / 16)."""
    points = {1: 45.0, 2: 41.0, 3: 34.0, 4: 27.0, 5: 24.0, 6: 20.0, 7: 17.0, 8: 15.0}
    return points.get(n, 15.0 * 8 / n * 0.9)


def peak8(n: int) -> float:
    """A server with 8 writes' worth of parallelism: the rate grows to 8 and falls past it."""
    return 4.0 * n if n <= 8 else 32.0 * (8 / n) ** 2


def window(curve: Curve, limit: int, seconds: float = 0.5, **kw: int) -> Window:
    """One window at `limit`: the curve's rate, latency by Little's law, the limit binding."""
    rate = curve(limit)
    completed = max(1, round(rate * seconds))
    fields = {"waited": 1, **kw}
    return Window(seconds, completed, latency_sum=completed * limit / rate, **fields)


def drive(curve: Curve, windows: int, state: LimitState | None = None,
          tuning: Tuning = TUNING) -> tuple[LimitState, list[float]]:
    """Run `windows` windows; returns the final state and the rate of each window."""
    s = state or initial(tuning)
    rates = []
    for i in range(windows):
        rates.append(curve(s.limit))
        s = after_window(tuning, s, window(curve, s.limit), now=i * 0.5)
    return s, rates


def best(curve: Curve) -> float:
    return max(curve(n) for n in range(1, TUNING.ceiling + 1))


def test_on_medplums_curve_it_settles_at_one_and_keeps_the_best_rate() -> None:
    s, rates = drive(medplum, 200)
    assert s.home == 1
    assert sum(rates) / len(rates) >= 0.9 * best(medplum)


def test_on_a_server_whose_best_is_8_it_climbs_there_quickly_and_stays() -> None:
    s, rates = drive(peak8, 200)
    assert s.home == 8
    assert rates.index(best(peak8)) <= 8  # slow start: 1, 2, 4, 8 within a few windows
    assert sum(rates) / len(rates) >= 0.85 * best(peak8)


def test_a_limit_collapsed_to_one_does_not_stay_there_on_a_server_whose_best_is_higher() -> None:
    # After a burst of conflicts (or a 429) drove it down, with old estimates saying 1 was best.
    collapsed = LimitState(limit=1, home=1, estimates={1: 4.0, 2: 3.0}, growing=False)
    s, rates = drive(peak8, 200, collapsed)
    assert s.home == 8
    assert sum(rates[-100:]) / 100 >= 0.85 * best(peak8)


def test_it_follows_a_server_whose_best_moves() -> None:
    s, _ = drive(peak8, 100)
    assert s.home == 8
    s, rates = drive(medplum, 200, s)  # the server got contended: its best is now 1
    assert s.home == 1
    assert sum(rates[-100:]) / 100 >= 0.9 * best(medplum)


def test_it_never_exceeds_the_ceiling() -> None:
    tuning = Tuning(ceiling=4)
    s, _ = drive(peak8, 100, tuning=tuning)
    assert s.home == 4 and s.limit <= 4


def test_a_probe_that_does_no_better_goes_home() -> None:
    s = LimitState(limit=3, home=2, estimates={2: 30.0}, growing=True)
    after = after_window(TUNING, s, window(lambda n: 30.0, 3), now=0)
    assert (after.limit, after.home, after.growing) == (2, 2, False)
    better = after_window(TUNING, s, window(lambda n: 40.0, 3), now=0)
    assert (better.limit, better.home) == (3, 3)


def test_a_window_where_no_write_waited_teaches_nothing() -> None:
    s = LimitState(limit=1, home=1, estimates={1: 45.0})
    idle = window(medplum, 1, waited=0)
    after = after_window(TUNING, s, idle, now=0)
    assert after.estimates == s.estimates and after.limit == 1
    # A probe up that the workers did not fill goes back home.
    probe = replace(s, limit=2)
    assert after_window(TUNING, probe, window(medplum, 2, waited=0), now=0).limit == 1


def test_a_conflict_during_a_probe_ends_it_at_once() -> None:
    s = LimitState(limit=3, home=2, version=7)
    after = after_congestion(TUNING, s, CONGESTED, now=0, seen_version=7)
    assert (after.limit, after.home, after.version) == (2, 2, 8)


def test_a_conflict_at_home_steps_down_once_per_change() -> None:
    s = LimitState(limit=4, home=4, version=3)
    after = after_congestion(TUNING, s, CONGESTED, now=0, seen_version=3)
    assert (after.limit, after.home) == (3, 3)
    # Writes that started under the old version conflicted for the same reason: no second cut.
    assert after_congestion(TUNING, after, CONGESTED, now=0, seen_version=3) is after
    assert after_congestion(TUNING, after, OK, now=0, seen_version=after.version) is after
    one = LimitState(limit=1, home=1)
    assert after_congestion(TUNING, one, CONGESTED, now=0, seen_version=0).limit == 1


def test_a_429_halves_at_once_and_holds_off_probing_up() -> None:
    s = LimitState(limit=8, home=8, estimates={8: 32.0})
    after = after_congestion(TUNING, s, THROTTLED, now=100.0, seen_version=0)
    assert (after.limit, after.home) == (4, 4)
    assert after.hold_until == 100.0 + TUNING.throttle_hold_seconds
    # Latency says there is room, but the hold keeps it at 4 ...
    held = after
    for i in range(8):
        held = after_window(TUNING, held, window(peak8, held.limit), now=101.0 + i)
    assert held.limit <= 4
    # ... and after the hold it climbs again.
    s2, _ = drive(peak8, 60, replace(held, hold_until=0.0))
    assert s2.home == 8


def test_the_no_load_latency_may_rise_slowly_when_the_server_gets_slower() -> None:
    s = LimitState(limit=1, home=1, rtt_min=0.010, estimates={1: 100.0})
    after = after_window(TUNING, s, window(lambda n: 50.0, 1), now=0)
    assert after.rtt_min == pytest.approx(0.010 * (1 + TUNING.rtt_drift))


@pytest.mark.parametrize(("seconds", "completed", "limit", "due"), [
    (0.1, 100, 1, False),  # too short, however many writes
    (0.3, 7, 1, False),  # too few writes
    (0.3, 8, 1, True),
    (0.3, 15, 8, False),  # two per write allowed in flight
    (0.3, 16, 8, True),
    (2.0, 1, 8, True),  # a slow server: the window ends on time
    (3.0, 0, 8, False),  # ... once something finished
])
def test_when_a_window_is_due(seconds: float, completed: int, limit: int, due: bool) -> None:
    assert window_due(TUNING, limit, Window(seconds, completed)) is due


def test_the_state_round_trips_through_json_and_junk_starts_afresh() -> None:
    s = LimitState(limit=3, home=2, estimates={1: 40.5, 2: 44.0}, rtt_min=0.02, version=9,
                   hold_until=12.5)
    assert LimitState.from_json(s.to_json(), TUNING) == s
    for junk in ("", "{}", "[1]", '{"limit": 0, "home": 1, "estimates": {}}', "null",
                 '{"limit": "x", "home": 1, "estimates": {}}', b"\xff"):
        assert LimitState.from_json(junk, TUNING) == initial(TUNING)
    # A ceiling lowered since the state was stored applies at once.
    assert LimitState.from_json(replace(s, limit=12, home=12).to_json(),
                                Tuning(ceiling=4)).limit == 4
