"""The FHIR client against a recording fake at its HTTP boundary (an httpx.MockTransport)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from worker.fhir.client import FhirClient
from worker.fhir.outcome import FhirPermanentError, FhirTransientError

BASE = "https://fhir.test/fhir/R4/"
TOKEN_URL = "https://fhir.test/oauth2/token"


@dataclass(frozen=True)
class Request:
    """One request as it reached the HTTP boundary."""

    method: str
    url: str
    headers: dict[str, str]
    content: bytes | None
    timeout: float


def answer(status: int, json_body: Any = None, headers: Mapping[str, str] | None = None
           ) -> httpx.Response:
    """An answer with a JSON body (none when `json_body` is None)."""
    body = b"" if json_body is None else json.dumps(json_body).encode()
    # A stream, as from the network (content= would hand the client an answer already read).
    return httpx.Response(status, headers=dict(headers or {}), stream=httpx.ByteStream(body))


# The request headers httpx adds itself (the recorded headers are the FHIR client's own).
HTTPX_HEADERS = {"host", "accept-encoding", "connection", "user-agent", "content-length"}


class FakeFhir:
    """Answers token requests with numbered tokens; FHIR requests from a handler; records all.
    `transport()` is the httpx.MockTransport that puts it at the client's HTTP boundary."""

    def __init__(self, handler: Callable[[Request], httpx.Response],
                 expires_in: int = 3600) -> None:
        self.handler = handler
        self.expires_in = expires_in
        self.tokens_issued = 0
        self.requests: list[Request] = []

    def __call__(self, sent: httpx.Request) -> httpx.Response:
        headers = {name.title(): value for name, value in sent.headers.items()
                   if name not in HTTPX_HEADERS}
        body = sent.read() or None
        url = str(sent.url)
        request = Request(sent.method, url, headers, body, sent.extensions["timeout"]["read"])
        self.requests.append(request)
        if url == TOKEN_URL:
            self.tokens_issued += 1
            assert sent.method == "POST"
            assert headers["Content-Type"] == "application/x-www-form-urlencoded"
            form = dict(x.split("=") for x in (body or b"").decode().split("&"))
            assert form["grant_type"] == "client_credentials"
            assert form["client_id"] == "cid"
            return answer(200, {"access_token": f"t{self.tokens_issued}",
                                "token_type": "Bearer", "expires_in": self.expires_in})
        return self.handler(request)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def client(self, **options: Any) -> FhirClient:
        return FhirClient(BASE, TOKEN_URL, "cid", "secret", transport=self.transport(),
                          **options)

    def fhir_requests(self) -> list[Request]:
        return [r for r in self.requests if r.url != TOKEN_URL]


def ok(request: Request) -> httpx.Response:
    return answer(201, {"resourceType": "Patient", "id": "p1"})


def test_token_is_fetched_once_and_reused() -> None:
    fake = FakeFhir(ok)
    c = fake.client()
    for _ in range(3):
        c.create({"resourceType": "Patient"})
    assert fake.tokens_issued == 1
    assert all(r.headers["Authorization"] == "Bearer t1" for r in fake.fhir_requests())


def test_requests_ask_for_fhir_json_and_send_it_with_the_timeout() -> None:
    fake = FakeFhir(ok)
    fake.client(timeout=2.5).create({"resourceType": "Patient", "name": [{"text": "Zoë"}]})
    token, create = fake.requests
    assert token.headers["Accept"] == "application/json" and token.timeout == 2.5
    assert token.content == b"grant_type=client_credentials&client_id=cid&client_secret=secret"
    assert (create.method, create.url) == ("POST", BASE + "Patient")
    assert create.headers == {"Accept": "application/fhir+json",
                              "Content-Type": "application/fhir+json",
                              "Authorization": "Bearer t1"}
    assert create.content == '{"resourceType":"Patient","name":[{"text":"Zoë"}]}'.encode()
    assert create.timeout == 2.5


def test_a_base_without_its_trailing_slash_keeps_its_path() -> None:
    fake = FakeFhir(ok)
    FhirClient(BASE.rstrip("/"), TOKEN_URL, "cid", "secret",
               transport=fake.transport()).read("Patient", "p1")
    assert [r.url for r in fake.fhir_requests()] == [BASE + "Patient/p1"]


def test_every_request_is_observed_with_its_operation() -> None:
    seen: list[str] = []

    def refuse(request: Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response")

    c = FakeFhir(ok).client(observe=lambda op, seconds: seen.append(op))
    c.read("Patient", "p1")
    c.create({"resourceType": "Patient"}, if_none_exist=[("identifier", "s|1")])
    with pytest.raises(FhirTransientError):
        FakeFhir(refuse).client(observe=lambda op, seconds: seen.append(op)).search(
            "Patient", [("_count", "1")])
    assert seen == ["read", "conditional-create", "search"]


def test_token_is_refreshed_before_expiry() -> None:
    fake = FakeFhir(ok, expires_in=0)  # already inside the refresh margin
    c = fake.client()
    c.create({"resourceType": "Patient"})
    c.create({"resourceType": "Patient"})
    assert fake.tokens_issued == 2


def test_a_401_refreshes_the_token_once_then_gives_up() -> None:
    def handler(request: Request) -> httpx.Response:
        if request.headers["Authorization"] == "Bearer t1":
            return answer(401, {"resourceType": "OperationOutcome", "issue": []})
        return ok(request)

    fake = FakeFhir(handler)
    assert fake.client().create({"resourceType": "Patient"}).status == 201
    assert fake.tokens_issued == 2

    always = FakeFhir(lambda r: answer(401))
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
    fake = FakeFhir(lambda r: answer(200, {"resourceType": "Bundle"}))
    c = fake.client()
    c.search("Patient", [("phone", "+15551234567")])
    c.upsert({"resourceType": "Communication"}, [("identifier", "sys|+1")])
    urls = [r.url for r in fake.fhir_requests()]
    assert urls == ["https://fhir.test/fhir/R4/Patient?phone=%2B15551234567",
                    "https://fhir.test/fhir/R4/Communication?identifier=sys|%2B1"]


def test_update_sends_if_match() -> None:
    fake = FakeFhir(lambda r: answer(200, {"resourceType": "Communication"}))
    fake.client().update({"resourceType": "Communication", "id": "c1"}, if_match_version="7")
    (req,) = fake.fhir_requests()
    assert req.method == "PUT" and req.headers["If-Match"] == 'W/"7"'


def test_429_without_retry_after_uses_ratelimit_t() -> None:
    fake = FakeFhir(lambda r: answer(
        429, {"resourceType": "OperationOutcome", "issue": [{"code": "throttled"}]},
        headers={"RateLimit": '"requests";r=99;t=3, "fhirInteractions";r=0;t=56'}))
    with pytest.raises(FhirTransientError) as exc:
        fake.client().read("Patient", "x")
    assert exc.value.retry_after == 56


def test_connection_errors_and_timeouts_are_transient() -> None:
    def refuse(request: Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    def slow(request: Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out")

    for handler, text in ((refuse, "ConnectError on GET Patient"),
                          (slow, "timeout on GET Patient")):
        with pytest.raises(FhirTransientError) as exc:
            FakeFhir(handler).client().search("Patient", [("phone", "+15551234567")])
        assert exc.value.detail == text  # the resource type only: no query, no phone number


def test_permanent_errors_carry_the_outcome_text() -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "details": {"text": "Invalid additional property"},
         "expression": ["Communication.foo"]}]}
    fake = FakeFhir(lambda r: answer(400, outcome))
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
    fake = FakeFhir(lambda r: answer(200, body))
    with pytest.raises(FhirPermanentError) as exc:
        fake.client().transaction(sent)
    assert "second entry failed" in exc.value.outcome_text
    (req,) = fake.fhir_requests()
    assert req.method == "POST" and req.url == BASE  # a transaction goes to the base itself
    assert json.loads(req.content or b"")["type"] == "transaction"


def test_a_short_transaction_answer_is_not_success() -> None:
    body = {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": {"status": "201 Created"}}]}
    fake = FakeFhir(lambda r: answer(200, body))
    with pytest.raises(FhirTransientError):
        fake.client().transaction({"resourceType": "Bundle", "entry": [{}, {}]})


def test_create_binary_posts_the_raw_bytes_with_their_type() -> None:
    fake = FakeFhir(lambda r: answer(201, {"resourceType": "Binary", "id": "b7",
                                           "contentType": "image/jpeg"}))
    assert fake.client().create_binary(b"\xff\xd8\xff\xe0", "image/jpeg") == "b7"
    (req,) = fake.fhir_requests()
    assert (req.method, req.url, req.content) == ("POST", BASE + "Binary", b"\xff\xd8\xff\xe0")
    assert req.headers["Content-Type"] == "image/jpeg"
    assert req.headers["Accept"] == "application/fhir+json"


def test_a_binary_answered_without_an_id_is_not_success() -> None:
    fake = FakeFhir(lambda r: answer(201, {"resourceType": "Binary"}))
    with pytest.raises(FhirTransientError):
        fake.client().create_binary(b"x", "text/plain")
