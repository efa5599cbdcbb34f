"""Issue #28's hosts, CI-sized: Redis primary, two replicas and three Sentinels, two worker
hosts and a receiver host as network namespaces (tests/reliability/multihost.py), and the three
faults: the primary SIGKILLed under load, a worker host cut off for 20 s, every Redis server
SIGSTOPped for 15 s. `make reliability` runs them at full size."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import multihost
from tests.reliability.harness import Counts

WHY_NOT = multihost.missing_requirement()
pytestmark = pytest.mark.skipif(WHY_NOT is not None,
                                reason=f"multi-host suite: {WHY_NOT} (CI runs as root)")


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Counts]:
    counted = multihost.run(multihost.CI, min_replicas_ack=1,
                            log_dir=Path(tmp_path_factory.mktemp("multihost")))
    return {c.scenario: c for c in counted}


def _row(rows: dict[str, Counts], prefix: str) -> Counts:
    (row,) = [c for name, c in rows.items() if name.startswith(prefix)]
    return row


def test_nothing_is_left_behind(rows: dict[str, Counts]) -> None:
    assert rows  # the run finished (and tore down: checked here)
    out = multihost._ip("netns", "list").stdout + multihost._ip("link", "show").stdout
    assert multihost.PREFIX not in out


def test_primary_killed(rows: dict[str, Counts]) -> None:
    c = _row(rows, "mh-a")
    assert c.sent == multihost.CI.primary_webhooks and c.accepted > 0, c
    assert not c.problems, c  # promoted, 2xx again within 10 s of it, topology healed
    assert c.seconds_to_recover is not None and c.seconds_to_recover <= 10, c
    assert c.lost == 0 and c.duplicates == 0, c
    assert c.written == c.accepted and c.dead_lettered == 0, c


def test_worker_host_cut_off(rows: dict[str, Counts]) -> None:
    cin, cout = _row(rows, "mh-b worker host cut 20s (in)"), _row(rows, "mh-b worker host "
                                                                  "cut 20s (out)")
    assert not cin.problems, cin  # the host held messages when it was cut
    assert cin.accepted == cin.sent and cout.accepted == cout.sent, (cin, cout)
    assert cin.lost == 0 and cin.duplicates == 0 and cin.written == cin.accepted, cin
    # A send whose answer the cut swallowed has an unknown outcome: dead-lettered for a person,
    # never sent twice, never lost.
    assert cout.lost == 0 and cout.duplicates == 0, cout
    assert cout.written + cout.dead_lettered >= cout.accepted, cout


def test_every_redis_stopped(rows: dict[str, Counts]) -> None:
    c = _row(rows, "mh-c")
    assert c.sent == multihost.CI.frozen_webhooks, c
    assert c.accepted == c.sent, c  # every webhook answered 2xx (spooled)
    assert c.written == c.sent and c.lost == 0 and c.duplicates == 0, c
    assert c.seconds_to_recover is not None and c.seconds_to_recover <= 90, c
    assert not c.problems, c
