"""The dead-letter store's bookkeeping (fakeredis: a pure unit test of the data layout)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import fakeredis
import pytest
import redis

from tests.support import DATA_KEY
from worker.crypto import sealer_for
from worker.ops.cli import build_parser
from worker.stores.dead_letters import (
    ENTRIES_KEY,
    INDEX_KEY,
    DeadLetter,
    DeadLetterStore,
    entry_id,
    parse_since,
)

SEALER = sealer_for(DATA_KEY)


def store() -> DeadLetterStore:
    return DeadLetterStore(fakeredis.FakeRedis(), SEALER)


def test_record_list_show_remove_purge() -> None:
    s = store()
    a = s.record("t.a", "inbound", [{"MessageSid": "SM1"}], {}, "unknown-sender", "why", 1,
                 now=100.0)
    b = s.record("t.b", "inbound", [{"MessageSid": "SM2"}], {}, "fhir-400", "bad", 3, now=200.0)
    assert [e.id for e in s.list()] == [b.id, a.id]  # newest failure first
    assert s.get(a.id) == a
    assert s.count() == 2
    assert s.remove(a.id) and not s.remove(a.id)
    assert s.purge() == 1 and s.count() == 0 and s.list() == []


def test_same_message_failing_again_updates_its_entry() -> None:
    s = store()
    first = s.record("t", "inbound", [{"MessageSid": "SM1"}], {}, "fhir-400", "x", 2, now=10.0)
    again = s.record("t", "inbound", [{"MessageSid": "SM1"}], {}, "unknown-sender", "y", 1,
                     now=20.0)
    assert again.id == first.id == entry_id("t", [{"MessageSid": "SM1"}], {})
    assert s.count() == 1
    assert (again.first_failed_at, again.last_failed_at) == (10.0, 20.0)
    assert again.attempts == 3 and again.failures == 2 and again.reason == "unknown-sender"


def seeded(client: fakeredis.FakeRedis | None = None
           ) -> tuple[DeadLetterStore, list[DeadLetter]]:
    """Four entries: two reasons, two tasks, failing at t=100, 200, 300, 400."""
    s = DeadLetterStore(client or fakeredis.FakeRedis(), SEALER)
    made = [
        s.record("t.a", "inbound", [{"MessageSid": "SM1"}], {}, "unknown-sender", "", 1,
                 now=100.0),
        s.record("t.b", "inbound", [{"MessageSid": "SM2"}], {}, "fhir-422", "", 1, now=200.0),
        s.record("t.a", "inbound", [{"MessageSid": "SM3"}], {}, "fhir-422", "", 1, now=300.0),
        s.record("t.a", "inbound", [{"MessageSid": "SM4"}], {}, "unknown-sender", "", 1,
                 now=400.0),
    ]
    return s, made


def test_query_filters_by_reason_task_and_since_newest_first() -> None:
    s, (e1, e2, e3, e4) = seeded()
    assert [e.id for e in s.query()] == [e4.id, e3.id, e2.id, e1.id]
    assert [e.id for e in s.query(reason="unknown-sender")] == [e4.id, e1.id]
    assert [e.id for e in s.query(task="t.b")] == [e2.id]
    assert [e.id for e in s.query(since=300.0)] == [e4.id, e3.id]  # inclusive
    assert [e.id for e in s.query(reason="fhir-422", task="t.a")] == [e3.id]
    assert [e.id for e in s.query(reason="fhir-422", since=250.0)] == [e3.id]
    assert s.query(reason="nope") == [] and s.query(since=401.0) == []


def test_query_limit_applies_after_the_filters() -> None:
    s, (e1, _, e3, e4) = seeded()
    assert [e.id for e in s.query(limit=2)] == [e4.id, e3.id]
    assert [e.id for e in s.query(reason="unknown-sender", limit=1)] == [e4.id]
    assert len(s.query(limit=None)) == 4 and s.query(limit=0) == []
    assert [e.id for e in s.list(limit=0)] == [e4.id]  # list keeps its at-least-one rule
    assert [e.id for e in s.query(task="t.a", since=50.0, limit=None)][-1] == e1.id


def test_query_pages_through_many_entries() -> None:
    s = store()
    for n in range(1203):
        s.record("t", "q", [n], {}, "unknown-sender" if n % 2 else "fhir-400", "", 1,
                 now=float(n))
    odd = s.query(reason="unknown-sender", limit=None)
    assert len(odd) == 601 and odd[0].args == [1201] and odd[-1].args == [1]
    assert len(s.query(limit=None)) == 1203


def test_filtered_purge_deletes_only_the_matching_entries() -> None:
    s, (e1, e2, e3, _) = seeded()
    assert s.purge(reason="unknown-sender") == 2
    assert [e.id for e in s.list()] == [e3.id, e2.id]
    assert s.purge(task="t.a", since=250.0) == 1
    assert [e.id for e in s.list()] == [e2.id]
    assert s.purge(reason="nope") == 0 and s.count() == 1
    assert s.remove_many([e2.id, e1.id]) == 1 and s.count() == 0


def test_prune_removes_entries_older_than_the_retention() -> None:
    client = fakeredis.FakeRedis()
    s, (_, _, e3, e4) = seeded(client)
    assert s.prune(150.0, now=450.0) == 2  # last failures at 100 and 200 are before 300
    assert [e.id for e in s.list()] == [e4.id, e3.id]
    assert s.prune(150.0, now=450.0) == 0
    assert s.prune(1.0, now=10_000.0) == 2 and s.count() == 0
    assert client.hlen(ENTRIES_KEY) == 0 and client.zcard(INDEX_KEY) == 0
    with pytest.raises(ValueError):
        s.prune(0)


def test_prune_works_in_batches() -> None:
    s = store()
    for n in range(1100):
        s.record("t", "q", [n], {}, "fhir-400", "", 1, now=float(n))
    s.record("t", "q", ["new"], {}, "fhir-400", "", 1, now=5000.0)
    assert s.prune(100.0, now=5000.0) == 1100
    assert [e.args for e in s.list()] == [["new"]]


def test_an_entry_failing_again_is_not_pruned() -> None:
    s, (e1, *_) = seeded()
    s.record("t.a", "inbound", [{"MessageSid": "SM1"}], {}, "unknown-sender", "", 1, now=500.0)
    assert s.prune(250.0, now=500.0) == 1  # only e2 (200) is that old; e1 is now at 500
    assert s.get(e1.id) is not None


def test_record_prunes_with_a_retention_at_most_once_a_minute() -> None:
    client = fakeredis.FakeRedis()
    s = DeadLetterStore(client, SEALER, retention_seconds=1000.0)
    s.record("t", "q", ["old"], {}, "fhir-400", "", 1, now=100.0)  # prunes (nothing old yet)
    s.record("t", "q", ["mid"], {}, "fhir-400", "", 1, now=130.0)
    s.record("t", "q", ["a"], {}, "fhir-400", "", 1, now=1_110.0)  # old is >1000s old: pruned
    assert sorted(e.args[0] for e in s.list()) == ["a", "mid"]
    s.record("t", "q", ["b"], {}, "fhir-400", "", 1, now=1_150.0)  # within the minute: no prune
    assert len(s.list()) == 3
    s.record("t", "q", ["c"], {}, "fhir-400", "", 1, now=1_170.0)  # a minute later: mid goes
    assert sorted(e.args[0] for e in s.list()) == ["a", "b", "c"]
    assert s.get(entry_id("t", ["old"], {})) is None


def test_record_without_a_retention_never_prunes() -> None:
    s = store()
    s.record("t", "q", ["old"], {}, "fhir-400", "", 1, now=1.0)
    s.record("t", "q", ["new"], {}, "fhir-400", "", 1, now=10_000_000.0)
    assert s.count() == 2


def test_a_failing_prune_does_not_fail_the_record(monkeypatch: pytest.MonkeyPatch) -> None:
    s = DeadLetterStore(fakeredis.FakeRedis(), SEALER, retention_seconds=10.0)

    def broken(*_: object, **__: object) -> int:
        raise redis.ConnectionError("down")

    monkeypatch.setattr(s, "prune", broken)
    entry = s.record("t", "q", ["x"], {}, "fhir-400", "", 1, now=100.0)
    assert s.get(entry.id) == entry


@pytest.mark.parametrize(("text", "expected"), [
    ("90s", 10_000.0 - 90), ("30m", 10_000.0 - 1800), ("2h", 10_000.0 - 7200),
    ("7d", 10_000.0 - 7 * 86400), ("0s", 10_000.0), (" 2H ", 10_000.0 - 7200),
    ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()),
    ("2024-05-01T14:00:00+02:00", datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()),
    ("2024-05-01T12:00:00.5+00:00", datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp() + 0.5),
])
def test_parse_since(text: str, expected: float) -> None:
    assert parse_since(text, now=10_000.0) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("2024-05-01T12:00:00", "no timezone"), ("2024-05-01", "no timezone"),
    ("yesterday", "neither a duration"), ("2w", "neither a duration"),
    ("-2h", "neither a duration"), ("1.5h", "neither a duration"), ("", "neither a duration"),
])
def test_parse_since_rejects_bad_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_since(text, now=10_000.0)


def test_parse_since_defaults_to_the_clock() -> None:
    assert abs(parse_since("1h") - (time.time() - 3600)) < 5


@pytest.mark.parametrize("bad", ["yesterday", "2024-05-01T12:00:00"])
def test_cli_rejects_a_bad_since_with_a_clear_error(bad: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["dlq", "list", "--since", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --since" in err and repr(bad) in err


def test_cli_parses_filters_for_list_replay_purge() -> None:
    args = build_parser().parse_args(["dlq", "replay", "--reason", "unknown-sender", "--task",
                                      "t.a", "--since", "2h", "--dry-run"])
    assert (args.id, args.all, args.reason, args.task, args.dry_run) == \
        (None, False, "unknown-sender", "t.a", True)
    assert abs(args.since - (time.time() - 7200)) < 5
    purge = build_parser().parse_args(["dlq", "purge", "--yes", "--reason", "x"])
    assert purge.yes and purge.reason == "x" and purge.since is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dlq", "replay", "abc", "--all"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dlq", "list", "--limit", "0"])
