"""Contention: the FHIR sandbox aborts overlapping conditional writes the way Medplum on
PostgreSQL does (409, SQLSTATE 40001), and every write path of Switchboard rides it out:
each message written once, nothing dead-lettered, each send made once."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any

import httpx
import pytest

from tests.conftest import Services
from tests.integration.test_outbound import AUTH, outbound, patient, recorded, state
from tests.support import ProviderSandbox, Sandbox, eventually, post_signed, sms_params
from worker.fhir.update import guarded_update

SERIALIZATION_FAILURE = ("could not serialize access due to read/write dependencies among "
                         "transactions")


def at_once(n: int, fn: Any) -> list[Any]:
    """Run fn(i) for i in range(n) on n threads released together."""
    gate = threading.Barrier(n)

    def run(i: int) -> Any:
        gate.wait()
        return fn(i)

    with cf.ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_the_sandbox_aborts_overlapping_conditional_writes_like_medplum(sandbox: Sandbox
                                                                         ) -> None:
    # Long transactions and no server-side retry: two writes sent together always overlap.
    sandbox.contention(rate=1, attempts=1, transaction_ms=300)
    headers = {"Authorization": f"Bearer {sandbox.token()}",
               "Content-Type": "application/fhir+json"}
    base = sandbox.settings.fhir_base_url
    with httpx.Client(base_url=base, headers=headers, timeout=10) as http:
        def conditional(i: int) -> httpx.Response:
            return http.post("Patient", headers={"If-None-Exist": f"identifier=urn:t|{i}"},
                             json={"resourceType": "Patient",
                                   "identifier": [{"system": "urn:t", "value": str(i)}]})

        def plain(i: int) -> httpx.Response:
            return http.post("Patient", json={"resourceType": "Patient"})

        answers = at_once(2, conditional)
        assert sorted(r.status_code for r in answers) == [201, 409]
        refused = next(r for r in answers if r.status_code == 409)
        assert refused.json()["issue"] == [{
            "severity": "error", "code": "conflict",
            "details": {"coding": [{"code": "40001"}], "text": SERIALIZATION_FAILURE}}]
        # Nothing of the aborted write was kept; plain creates never conflict.
        assert len(sandbox.all("Patient", identifier="urn:t|")) <= 1
        assert [r.status_code for r in at_once(2, plain)] == [201, 201]
        # Medplum's own retry (transactionAttempts 2) absorbs a single overlap.
        sandbox.contention(attempts=2)
        assert sorted(r.status_code for r in at_once(2, lambda i: conditional(10 + i))) \
            == [201, 201]
    stats = sandbox.stats()
    assert stats["conflicts"] == 1 and stats["aborts"] == 2


def test_the_sandbox_aborts_if_match_updates_only_of_the_same_resource_like_medplum(
        sandbox: Sandbox) -> None:
    # Medplum runs an If-Match update in a REPEATABLE READ transaction, not a serializable one:
    # PostgreSQL aborts it only when another transaction committed a change to the same row.
    sandbox.contention(rate=1, attempts=1, transaction_ms=300)
    headers = {"Authorization": f"Bearer {sandbox.token()}",
               "Content-Type": "application/fhir+json"}
    with httpx.Client(base_url=sandbox.settings.fhir_base_url, headers=headers,
                      timeout=10) as http:
        created = [http.post("Communication", json={"resourceType": "Communication",
                                                    "status": "in-progress"}).json()
                   for _ in range(2)]

        def update(resource: dict[str, Any], status: str) -> httpx.Response:
            return http.put(f"Communication/{resource['id']}",
                            headers={"If-Match": f'W/"{resource["meta"]["versionId"]}"'},
                            json={**resource, "status": status})

        # Two resources at once: no conflict.
        assert [r.status_code for r in at_once(2, lambda i: update(created[i], "completed"))] \
            == [200, 200]
        assert sandbox.stats()["conflicts"] == 0
        # The same resource at once: the second committer is aborted.
        current = http.get(f"Communication/{created[0]['id']}").json()
        answers = at_once(2, lambda i: update(current, ["stopped", "on-hold"][i]))
        assert sorted(r.status_code for r in answers) == [200, 409]
        refused = next(r for r in answers if r.status_code == 409)
        assert refused.json()["issue"][0]["details"] == {
            "coding": [{"code": "40001"}],
            "text": "could not serialize access due to concurrent update"}
        # With Medplum's own retry the retried update finds the version moved: 412, not 409.
        sandbox.contention(attempts=2)
        current = http.get(f"Communication/{created[1]['id']}").json()
        answers = at_once(2, lambda i: update(current, ["stopped", "on-hold"][i]))
        assert sorted(r.status_code for r in answers) == [200, 412]
    stats = sandbox.stats()
    assert stats["version_checked"] == 6 and stats["serializable"] == 0
    assert stats["conflicts"] == 1 and stats["aborts"] == 2


def test_concurrent_guarded_updates_of_one_communication_all_land(sandbox: Sandbox) -> None:
    # Status callbacks and the send's write-back can update the same Communication at once:
    # Medplum aborts all but one (409, or 412 after its own retry); each change is re-applied.
    sandbox.contention(rate=1, attempts=2, transaction_ms=50)
    comm = sandbox.fhir.create({"resourceType": "Communication", "status": "in-progress"}
                               ).resource

    def tag(i: int) -> None:
        def change(c: dict[str, Any]) -> dict[str, Any]:
            return {**c, "identifier": [*(c.get("identifier") or []),
                                        {"system": "urn:test", "value": str(i)}]}
        guarded_update(sandbox.fhir, "Communication", comm["id"], change, attempts=20)

    at_once(4, tag)
    final = sandbox.fhir.read("Communication", comm["id"]).resource
    assert sorted(i["value"] for i in final["identifier"]) == ["0", "1", "2", "3"]
    assert sandbox.stats()["aborts"] > 0  # they did collide


STRATEGY_HEADERS = {"conversation": "one per number", "active-thread": "one per patient",
                    "new-thread": "one per message"}


@pytest.mark.parametrize("strategy", list(STRATEGY_HEADERS))
def test_an_inbound_burst_under_contention_lands_once_with_no_dead_letters(
        services: Services, sandbox: Sandbox, strategy: str) -> None:
    svc = services.get(SMS_THREAD_STRATEGY=strategy, UNKNOWN_SENDER_POLICY="create-patient")
    # Every overlap reaches Switchboard as a 409 (no server-side retry to hide it).
    sandbox.contention(rate=1, attempts=1)
    phones = [f"+1555300{i:04d}" for i in range(6)]
    for phone in phones[:3]:  # half the senders known, half created on their first message
        sandbox.patient(phone)
    burst = [sms_params(phones[i % len(phones)], f"burst {i}") for i in range(30)]
    # One receiver per thread, built beforehand: building Flask apps on several threads at once
    # trips a CPython 3.11 AST bug (werkzeug compiles its routes).
    clients = [svc.app().test_client() for _ in range(10)]
    codes = at_once(10, lambda k: [post_signed(clients[k], m).status_code for m in burst[k::10]])
    assert {c for chunk in codes for c in chunk} == {200}

    def all_landed() -> bool:
        return all(sandbox.messages(m["MessageSid"]) for m in burst)

    eventually(all_landed, timeout=60, what="every message of the burst")
    assert all(len(sandbox.messages(m["MessageSid"])) == 1 for m in burst)
    assert svc.dead_letters.count() == 0
    assert sorted(len(sandbox.all("Patient", phone=p)) for p in phones) == [1] * 6
    threads = {m["partOf"][0]["reference"]
               for b in burst for m in sandbox.messages(b["MessageSid"])}
    assert len(threads) == (30 if strategy == "new-thread" else 6)
    assert sandbox.stats()["conflicts"] > 0  # the worker did meet Medplum's 409s


def test_outbound_under_contention_sends_each_once_and_follows_status(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox) -> None:
    providers.reset()
    svc = outbound(services, providers)
    # Transactions held 100 ms: the writes the worker keeps in flight overlap, and so meet 409s,
    # however the write controller has sized its limit and however busy the machine is (at the
    # default 5 ms two writes rarely overlap once the limit has stepped down).
    sandbox.contention(rate=1, attempts=1, transaction_ms=100)
    pats = [patient(sandbox, phone=f"+1555400{i:04d}", email=None) for i in range(5)]
    bodies = [{"resourceType": "Communication", "status": "in-progress",
               "recipient": [{"reference": f"Patient/{pats[i % 5]['id']}"}],
               "payload": [{"contentString": f"reply {i}"}]} for i in range(20)]
    clients = [svc.app().test_client() for _ in range(10)]  # built beforehand (see above)
    ids = at_once(10, lambda k: [clients[k].post("/v1/messages", json=b, headers=AUTH)
                                 .get_json()["id"] for b in bodies[k::10]])
    done = [state(svc, request_id, "sent", "failed") for chunk in ids for request_id in chunk]
    assert {d["status"] for d in done} == {"sent"}, [d.get("error") for d in done]
    sent = providers.requests("twilio")
    assert sorted(r["form"]["Body"] for r in sent) == sorted(f"reply {i}" for i in range(20))
    # Each Communication carries its provider id once (the send-record update under contention).
    sid_system = svc.settings.message_id_system
    comms = [recorded(sandbox, d["communication"], sid_system) for d in done]
    assert all(sum(i.get("system") == sid_system for i in c["identifier"]) == 1 for c in comms)
    # Delivery callbacks for all of them at once: every one applied (If-Match updates).
    at_once(10, lambda k: [post_signed(clients[k], {
        "MessageSid": d["provider_id"], "MessageStatus": "delivered", "AccountSid": "ACtest"},
        "/webhooks/twilio/status") for d in done[k::10]])

    def all_completed() -> bool:
        return all(sandbox.fhir.read("Communication", d["communication"]).resource["status"]
                   == "completed" for d in done)

    eventually(all_completed, timeout=60, what="every Communication completed")
    assert svc.dead_letters.count() == 0
    assert sandbox.stats()["conflicts"] > 0
