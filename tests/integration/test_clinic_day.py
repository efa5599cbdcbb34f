"""The "day in the clinic" (issue #26) at a reduced size, so CI guards what it counts: every
inbound message written once and in its thread, every reply sent once and in order, no dead
letter but the hostile inputs', and the receiver and workers as responsive after the hostile
emails as before them (relative to the same run: no wall-clock target; the delays beyond the
pacing slots are printed, not asserted). `make reliability` runs it at full size."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.clinic_day import REDUCED, DayReport, clinic_day, default_overrides
from tests.reliability.harness import Stack
from tests.reliability.input_scenarios import FindingResult, run_findings


def private_stack(tmp_path_factory: pytest.TempPathFactory, name: str) -> Stack:
    """A stack at the default pacing and unknown-sender policy. Each part gets its own: a
    reply the service keeps re-queuing would otherwise spend the next part's send slots."""
    return Stack(log_dir=Path(tmp_path_factory.mktemp(name)), **default_overrides())


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> DayReport:
    """One reduced day, shared by the assertions below."""
    stack = private_stack(tmp_path_factory, "clinic-day")
    try:
        counts, report = clinic_day(stack, REDUCED, settle_timeout=90)
    finally:
        stack.stop()
    print("\n".join(counts.notes))
    return report


@pytest.fixture(scope="module")
def findings(tmp_path_factory: pytest.TempPathFactory) -> list[FindingResult]:
    """Issue #26's input classes, each with its outcome."""
    stack = private_stack(tmp_path_factory, "issue-26-inputs")
    try:
        results = run_findings(stack)
    finally:
        stack.stop()
    print("\n".join(r.line() for r in results))
    return results


def test_the_day_settles(day: DayReport) -> None:
    assert day.settled, day.problems


def test_every_inbound_message_is_written_once_in_its_thread(day: DayReport) -> None:
    assert day.inbound_accepted > 0
    assert day.inbound_not_accepted == 0, day
    assert day.inbound_written == day.inbound_accepted, day.problems
    assert day.inbound_duplicates == 0 and day.inbound_lost == 0, day.problems
    assert day.inbound_wrong_thread == 0, day.problems


def test_every_reply_is_sent_once_in_order(day: DayReport) -> None:
    assert day.replies > 0 and day.skipped_bursts == 0, day.problems
    assert day.replies_sent == day.replies, day.problems
    assert day.replies_duplicates == 0 and day.replies_missing == 0, day.problems
    assert day.replies_out_of_order == 0, day.problems
    assert day.slot_delays.get("sms"), day.slot_delays  # measured (printed, not asserted)


def test_only_hostile_inputs_are_dead_lettered(day: DayReport) -> None:
    assert day.unexpected_dead_letters == [], day.unexpected_dead_letters


def test_hostile_emails_get_no_5xx(day: DayReport) -> None:
    # A 5xx makes SendGrid retry for 72 hours: each is refused (4xx) or accepted.
    assert day.hostile and day.hostile_5xx == 0, day.hostile


def test_callbacks_and_events_are_accepted(day: DayReport) -> None:
    assert day.callbacks > 0 and day.callbacks_accepted == day.callbacks, day


def test_hostile_emails_slow_nothing_else(day: DayReport) -> None:
    assert day.health_after and day.webhook_after and day.inbound_delays_after, day
    assert not [p for p in day.problems if "slowed by the hostile emails" in p], day.problems


FINDINGS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "13")


@pytest.mark.parametrize("finding", FINDINGS)
def test_each_finding_class_has_its_expected_outcome(findings: list[FindingResult],
                                                     finding: str) -> None:
    mine = [r for r in findings if r.finding == finding]
    assert mine, f"finding {finding} was not exercised"
    failed = [r.line() for r in mine if not r.ok]
    assert not failed, "\n".join(failed)
