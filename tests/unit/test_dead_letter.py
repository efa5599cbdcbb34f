"""The dead-letter store's bookkeeping (fakeredis: a pure unit test of the data layout)."""

from __future__ import annotations

import fakeredis

from worker.dead_letter import DeadLetterStore, entry_id


def store() -> DeadLetterStore:
    return DeadLetterStore(fakeredis.FakeRedis())


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
