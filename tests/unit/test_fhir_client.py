"""The FHIR client against a recording fake at the HTTP boundary (httpx.MockTransport)."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from worker.fhir.client import FhirClient
from worker.fhir.outcome import FhirPermanentError, FhirTransientError

BASE = "https://fhir.test/fhir/R4/"
TOKEN_URL = "https://fhir.test/oauth2/token"


class FakeFhir:
    """Answers token requests with numbered tokens; FHIR requests from a handler; records all."""

    def __init__(self, handler: Callable[[httpx.Request], httpx.Response],
                 expires_in: int = 3600) -> None:
        self.handler = handler
        self.expires_in = expires_in
        self.tokens_issued = 0
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if str(request.url) == TOKEN_URL:
            self.tokens_issued += 1
            body = dict(x.split("=") for x in request.content.decode().split("&"))
            assert body["grant_type"] == "client_credentials"
            assert body["client_id"] == "cid"
            return httpx.Response(200, json={"access_token": f"t{self.tokens_issued}",
                                             "token_type": "Bearer",
                                             "expires_in": self.expires_in})
        return self.handler(request)

    def client(self) -> FhirClient:
        return FhirClient(BASE, TOKEN_URL, "cid", "secret", transport=httpx.MockTransport(self))

    def fhir_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if str(r.url) != TOKEN_URL]


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(201, json={"resourceType": "Patient", "id": "p1"})


def test_token_is_fetched_once_and_reused() -> None:
    fake = FakeFhir(ok)
    c = fake.client()
    for _ in range(3):
        c.create({"resourceType": "Patient"})
    assert fake.tokens_issued == 1
    assert all(r.headers["Authorization"] == "Bearer t1" for r in fake.fhir_requests())


def test_token_is_refreshed_before_expiry() -> None:
    fake = FakeFhir(ok, expires_in=0)  # already inside the refresh margin
    c = fake.client()
    c.create({"resourceType": "Patient"})
    c.create({"resourceType": "Patient"})
    assert fake.tokens_issued == 2


def test_a_401_refreshes_the_token_once_then_gives_up() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers["Authorization"] == "Bearer t1":
            return httpx.Response(401, json={"resourceType": "OperationOutcome", "issue": []})
        return ok(request)

    fake = FakeFhir(handler)
    assert fake.client().create({"resourceType": "Patient"}).status == 201
    assert fake.tokens_issued == 2

    always = FakeFhir(lambda r: httpx.Response(401))
    with pytest.raises(FhirTransientError) as exc:
        always.client().read("Patient", "x")
    assert exc.value.reason == "fhir-unauthorized"
    assert always.tokens_issued == 2 and len(always.fhir_requests()) == 2


def test_conditional_create_encodes_plus_in_if_none_exist() -> None:
    fake = FakeFhir(ok)
    fake.client().create({"resourceType": "Patient"}, if_none_exist=[("phone", "+15551234567")])
    (req,) = fake.fhir_requests()
    assert req.headers["If-None-Exist"] == "phone=%2B15551234567"
    assert req.headers["Content-Type"] == "application/fhir+json"


def test_search_and_upsert_encode_plus_in_the_url() -> None:
    fake = FakeFhir(lambda r: httpx.Response(200, json={"resourceType": "Bundle"}))
    c = fake.client()
    c.search("Patient", [("phone", "+15551234567")])
    c.upsert({"resourceType": "Communication"}, [("identifier", "sys|+1")])
    urls = [r.url.raw_path.decode() for r in fake.fhir_requests()]
    assert urls == ["/fhir/R4/Patient?phone=%2B15551234567",
                    "/fhir/R4/Communication?identifier=sys|%2B1"]


def test_update_sends_if_match() -> None:
    fake = FakeFhir(lambda r: httpx.Response(200, json={"resourceType": "Communication"}))
    fake.client().update({"resourceType": "Communication", "id": "c1"}, if_match_version="7")
    (req,) = fake.fhir_requests()
    assert req.method == "PUT" and req.headers["If-Match"] == 'W/"7"'


def test_429_without_retry_after_uses_ratelimit_t() -> None:
    fake = FakeFhir(lambda r: httpx.Response(
        429, headers={"RateLimit": '"requests";r=99;t=3, "fhirInteractions";r=0;t=56'},
        json={"resourceType": "OperationOutcome", "issue": [{"code": "throttled"}]}))
    with pytest.raises(FhirTransientError) as exc:
        fake.client().read("Patient", "x")
    assert exc.value.retry_after == 56


def test_connection_errors_and_timeouts_are_transient() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow")

    for handler in (refuse, slow):
        with pytest.raises(FhirTransientError):
            FakeFhir(handler).client().read("Patient", "x")


def test_permanent_errors_carry_the_outcome_text() -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "details": {"text": "Invalid additional property"},
         "expression": ["Communication.foo"]}]}
    fake = FakeFhir(lambda r: httpx.Response(400, json=outcome))
    with pytest.raises(FhirPermanentError) as exc:
        fake.client().create({"resourceType": "Communication"})
    assert exc.value.status == 400
    assert exc.value.outcome_text == "Invalid additional property (Communication.foo)"


def test_transaction_checks_every_entry() -> None:
    body = {"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"response": {"status": "201 Created"}},
        {"response": {"status": "400 Bad Request", "outcome": {
            "resourceType": "OperationOutcome",
            "issue": [{"details": {"text": "second entry failed"}}]}}},
    ]}
    sent = {"resourceType": "Bundle", "type": "transaction", "entry": [{}, {}]}
    fake = FakeFhir(lambda r: httpx.Response(200, json=body))
    with pytest.raises(FhirPermanentError) as exc:
        fake.client().transaction(sent)
    assert "second entry failed" in exc.value.outcome_text
    assert json.loads(fake.fhir_requests()[0].content)["type"] == "transaction"


def test_a_short_transaction_answer_is_not_success() -> None:
    body = {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": {"status": "201 Created"}}]}
    fake = FakeFhir(lambda r: httpx.Response(200, json=body))
    with pytest.raises(FhirTransientError):
        fake.client().transaction({"resourceType": "Bundle", "entry": [{}, {}]})
