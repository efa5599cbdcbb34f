"""Reduced versions of the fault scenarios, so CI guards the guarantees (make reliability runs
them at full size). One private stack for the module: its Redis is killed on purpose."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability import scenarios
from tests.reliability.harness import Counts, Stack, email_address, phone, profile_name

USED_NUMBERS: list[str] = []


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(log_dir=Path(tmp_path_factory.mktemp("reliability")))
    yield s
    s.stop()


def check(counts: Counts, expect_dead: int = 0) -> None:
    assert counts.sent > 0 and counts.accepted > 0, counts
    assert counts.lost == 0, counts
    assert counts.duplicates == 0, counts
    assert counts.dead_lettered == expect_dead, counts
    assert not any("did not settle" in n for n in counts.notes), counts


def test_duplicate_storm(stack: Stack) -> None:
    counts = scenarios.duplicate_storm(stack, n=30)
    check(counts)
    assert counts.accepted == counts.sent == 30 * 6 and counts.written == 30


def test_worker_killed(stack: Stack) -> None:
    cin, cout = scenarios.worker_killed(stack, n_in=40, n_out=15, every=2.0, duration=6.0)
    check(cin)
    assert cin.written == cin.accepted
    # A worker killed while Twilio was answering leaves an unknown outcome: dead-lettered for a
    # person, never sent twice, never lost.
    assert cout.lost == 0 and cout.duplicates == 0, cout
    assert cout.written + cout.dead_lettered == cout.accepted, cout


def test_fhir_outage(stack: Stack) -> None:
    counts = scenarios.fhir_outage(stack, n=21, phase_seconds=2.0)
    check(counts)
    assert counts.written == counts.accepted == 21


def test_redis_restart(stack: Stack) -> None:
    counts = scenarios.redis_restart(stack, n=60, down_seconds=1.5)
    check(counts)
    assert counts.written == counts.accepted


def test_provider_faults(stack: Stack) -> None:
    counts = scenarios.provider_faults(stack, n=14)
    # 21211, 21610 and a dropped connection (outcome unknown) per 7 messages.
    assert counts.lost == 0 and counts.duplicates == 0, counts
    assert counts.dead_lettered == 6 and counts.written == 8, counts


def test_contention(stack: Stack) -> None:
    counts = scenarios.contention(stack, n=150, patients=15)
    check(counts)
    assert counts.written == counts.accepted == 150
    assert counts.conflicts > 0, counts.notes  # the burst did meet Medplum's 409s


def test_inbound_email(stack: Stack) -> None:
    counts = scenarios.inbound_email(stack, n=12, patients=4)
    check(counts)
    assert counts.accepted == counts.sent == 36 and counts.written == 12


def test_conversations(stack: Stack) -> None:
    counts = scenarios.conversations(stack, n=8)
    check(counts)
    assert counts.accepted == counts.sent == 8 * 5 and counts.written == 8


def test_whatsapp(stack: Stack) -> None:
    counts = scenarios.whatsapp(stack, n=10)
    assert counts.ok() and counts.lost == 0 and counts.dead_lettered == 0, counts
    # 10 inbound written once each (each accepted in one of its 3 copies at least: a 503 is
    # allowed right after the Redis restart scenario), 5 held replies released once each.
    assert counts.sent == 10 * 3 + 5 and counts.written == 15, counts


def test_privacy(stack: Stack) -> None:
    numbers = [phone(i) for i in range(30)] + [phone(5000 + i) for i in range(15)]
    numbers += [phone(7000 + i) for i in range(8)]  # the Conversations scenario's
    numbers += [email_address(i) for i in range(4)]
    # WhatsApp: the numbers, and the display names (ProfileName) of scenario 14.
    numbers += [phone(8000 + i) for i in range(10)] + [phone(8500 + i) for i in range(5)]
    bodies = ["storm 1", "kill 3", "outage 2", "redis 4", "faults reply 1", "kill reply 2",
              "email body 1", "email body 3", "conversation 3", "conversation reply 5",
              "whatsapp 3", "whatsapp reply", *(profile_name(i) for i in range(10))]
    counts = scenarios.privacy(stack, numbers, bodies)
    assert counts.sent > 100  # there were logs to scan
    assert counts.duplicates == 0, counts.notes
