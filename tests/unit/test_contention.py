"""Serialization conflicts: what a 409 means, how the client retries it, how the limit adapts."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import httpx
import pytest

from tests.support import most_in_flight
from tests.unit.test_fhir_client import BASE, TOKEN_URL, FakeFhir, Request, answer
from worker.errors import PermanentError, TransientError
from worker.fhir.client import FhirClient
from worker.fhir.contention import Tuning, WriteLimit
from worker.fhir.outcome import (
    FhirConflictError,
    FhirPermanentError,
    classify,
    is_contention,
)

# Exactly what Medplum answers when PostgreSQL aborts a serializable transaction: @medplum/core's
# conflict(text, '40001'), as seen on a 5.0.10 server under load.
MEDPLUM_40001 = {
    "resourceType": "OperationOutcome",
    "id": "conflict",
    "issue": [{"severity": "error", "code": "conflict", "details": {
        "coding": [{"code": "40001"}],
        "text": "could not serialize access due to read/write dependencies among transactions"}}],
}


def test_medplums_serialization_conflict_is_transient() -> None:
    err = classify(409, {}, MEDPLUM_40001)
    assert isinstance(err, FhirConflictError) and isinstance(err, TransientError)
    assert err.reason == "fhir-conflict" and err.retryable
    assert "could not serialize access" in err.detail


def test_a_deadlock_abort_is_contention_too() -> None:
    body = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "conflict", "details": {"coding": [{"code": "40P01"}]}}]}
    assert isinstance(classify(409, {}, body), FhirConflictError)


@pytest.mark.parametrize("body", [
    # Medplum's conflict() without a SQLSTATE: e.g. a create whose id already exists.
    {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "conflict", "details": {"text": "Resource already exists"}}]},
    # Another SQLSTATE (unique violation) is not contention.
    {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "conflict", "details": {"coding": [{"code": "23505"}]}}]},
    # 40001 under another issue code is not Medplum's contention answer.
    {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "processing", "details": {"coding": [{"code": "40001"}]}}]},
    {"resourceType": "Patient", "issue": MEDPLUM_40001["issue"]},
    None,
    "could not serialize access",
    {"resourceType": "OperationOutcome", "issue": ["conflict", {"details": "40001"},
                                                  {"code": "conflict", "details": {
                                                      "coding": "40001"}}]},
])
def test_other_409s_stay_permanent(body: Any) -> None:
    err = classify(409, {}, body)
    assert isinstance(err, FhirPermanentError) and isinstance(err, PermanentError)
    assert err.reason == "fhir-409"
    assert not is_contention(409, body)


def test_40001_on_another_status_is_not_contention() -> None:
    assert not is_contention(400, MEDPLUM_40001)
    assert isinstance(classify(400, {}, MEDPLUM_40001), FhirPermanentError)


class Conflicts:
    """Answers `n` serialization conflicts, then creates."""

    def __init__(self, n: int) -> None:
        self.left = n

    def __call__(self, request: Request) -> httpx.Response:
        if self.left > 0:
            self.left -= 1
            return answer(409, MEDPLUM_40001)
        return answer(201, {"resourceType": "Patient", "id": "p1"})


def client(fake: FakeFhir, retries: int = 8) -> tuple[FhirClient, list[str], list[float]]:
    events: list[str] = []
    sleeps: list[float] = []
    c = FhirClient(BASE, TOKEN_URL, "cid", "secret", transport=fake.transport(),
                   conflict_retries=retries, conflict_backoff=(0.02, 1.0),
                   on_contention=events.append, sleep=sleeps.append)
    return c, events, sleeps


def test_a_conflicting_write_is_retried_within_milliseconds_until_it_lands() -> None:
    fake = FakeFhir(Conflicts(3))
    c, events, sleeps = client(fake)
    resp = c.create({"resourceType": "Patient"}, if_none_exist=[("identifier", "s|1")])
    assert resp.created
    assert len(fake.fhir_requests()) == 4
    assert len({r.headers["If-None-Exist"] for r in fake.fhir_requests()}) == 1  # the same write
    assert events == ["conflict", "retried"] * 3
    # Exponential with jitter, in milliseconds: 10-20 ms, 20-40 ms, 40-80 ms.
    assert [(lo <= s <= hi) for s, (lo, hi) in zip(sleeps, [(0.01, 0.02), (0.02, 0.04),
                                                             (0.04, 0.08)], strict=True)]\
        == [True, True, True]


def test_after_its_retries_a_conflict_goes_up_as_a_transient_error() -> None:
    fake = FakeFhir(Conflicts(100))
    c, events, sleeps = client(fake, retries=4)
    with pytest.raises(FhirConflictError) as info:
        c.update({"resourceType": "Communication", "id": "c1"}, if_match_version="3")
    assert info.value.retryable and info.value.status == 409
    assert len(fake.fhir_requests()) == 5
    assert events.count("conflict") == 5 and events[-1] == "gave-up"
    assert max(sleeps) <= 1.0


def test_transactions_and_upserts_are_retried_too() -> None:
    answers = iter([answer(409, MEDPLUM_40001),
                    answer(200, {"resourceType": "Bundle", "type": "transaction-response",
                                 "entry": [{"response": {"status": "201 Created"}}]}),
                    answer(409, MEDPLUM_40001),
                    answer(201, {"resourceType": "Patient", "id": "p1"})])
    fake = FakeFhir(lambda request: next(answers))
    c, events, _ = client(fake)
    c.transaction({"resourceType": "Bundle", "type": "transaction",
                   "entry": [{"request": {"method": "POST", "url": "Patient"}}]})
    c.upsert({"resourceType": "Patient"}, [("identifier", "s|1")])
    assert events == ["conflict", "retried"] * 2


def test_reads_and_other_errors_are_not_retried_here() -> None:
    fake = FakeFhir(lambda request: answer(409, {
        "resourceType": "OperationOutcome", "issue": [{"code": "conflict"}]}))
    c, events, _ = client(fake)
    with pytest.raises(FhirPermanentError):
        c.create({"resourceType": "Patient"})
    with pytest.raises(FhirPermanentError):
        c.read("Patient", "p1")
    assert len(fake.fhir_requests()) == 2 and events == []


def test_a_429_on_a_write_halves_the_limit_and_is_left_to_the_task() -> None:
    fake = FakeFhir(lambda request: answer(429, {}, headers={"Retry-After": "3"}))
    events: list[str] = []
    limit = WriteLimit(Tuning(ceiling=16))
    limit.state = replace(limit.state, limit=8, home=8)
    c = FhirClient(BASE, TOKEN_URL, "cid", "secret", transport=fake.transport(),
                   write_limit=limit, on_contention=events.append)
    with pytest.raises(TransientError) as info:
        c.create({"resourceType": "Patient"})
    assert info.value.reason == "fhir-throttled" and events == ["throttled"]
    assert limit.limit == 4


def test_writers_wait_for_room_under_the_limit() -> None:
    limit = WriteLimit(Tuning(ceiling=2))
    limit.state = replace(limit.state, limit=2, home=2)
    assert most_in_flight(limit, lambda: limit.in_flight, writers=12, hold=0.01) == 2
    assert limit.in_flight == 0
