"""One pooled FHIR HTTP client per worker process, with OAuth2 client credentials."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

import httpx

from worker.broker.backoff import retry_delay
from worker.fhir.contention import CONGESTED, THROTTLED, Slot, Tuning, WriteLimit
from worker.fhir.outcome import FhirConflictError, FhirTransientError, classify
from worker.fhir.query import Params, query_string
from worker.fhir.reference import InvalidReference, ref, valid_type
from worker.httpclient import Answer, fetch, new_client

T = TypeVar("T")
FHIR_JSON = "application/fhir+json"
# Connections per client (the worker's threads share one client).
POOL_SIZE = 64
# The largest answer read, decoded. Medplum refuses a JSON string over 1 MB, and the searches
# Switchboard makes ask for a few entries, so a real answer is far smaller: this only stops a
# broken or hostile server from filling the worker's memory. Not a setting: nothing a clinic
# does makes a legitimate answer approach it.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
# Refresh this long before the token's stated expiry, so a request never races the deadline.
TOKEN_REFRESH_MARGIN_SECONDS = 60.0


class WriteSlots(Protocol):
    """Where writes wait for room: a process's WriteLimit, or the cluster's budget
    (worker.fhir.budget.ClusterWriteBudget)."""

    def slot(self) -> AbstractContextManager[Slot]:
        """Hold room for one write; the caller sets `slot.outcome`."""


@dataclass(frozen=True)
class FhirResponse:
    """A successful FHIR answer: status (200/201) and the resource or Bundle returned."""

    status: int
    resource: dict[str, Any]

    @property
    def created(self) -> bool:
        """True when the server created a new resource (201), False when it found one (200)."""
        return self.status == 201


class TokenSource:
    """OAuth2 client-credentials token, cached and refreshed before expiry (thread-safe)."""

    def __init__(self, http: httpx.Client, token_url: str, client_id: str, secret: str,
                 timeout: float = 10.0) -> None:
        self._http = http
        self._token_url = token_url
        self._client_id = client_id
        self._secret = secret
        self._timeout = timeout
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0

    def get(self) -> str:
        """A bearer token valid for at least the refresh margin."""
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                self._fetch()
            assert self._token is not None
            return self._token

    def invalidate(self, token: str) -> None:
        """Forget `token` after a 401, unless another thread already replaced it."""
        with self._lock:
            if self._token == token:
                self._token = None

    def _fetch(self) -> None:
        form = urlencode({
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._secret,
        }).encode()
        try:
            resp = fetch(self._http, "POST", self._token_url, headers={
                "Accept": "application/json",
                "Content-Type": "application/x-www-form-urlencoded",
            }, content=form, timeout=self._timeout, max_bytes=MAX_ANSWER_BYTES)
        except httpx.HTTPError as exc:  # the class name only: never a URL or a secret
            raise FhirTransientError(
                f"token endpoint unreachable: {type(exc).__name__}") from exc
        if resp.status >= 500 or resp.status == 429:
            raise FhirTransientError(f"token endpoint answered {resp.status}", resp.status)
        if resp.status != 200:
            # Wrong credentials: retrying the message will not help until an operator fixes
            # the configuration, but the message must survive until then (see classify, 401).
            raise FhirTransientError(f"token request refused ({resp.status})", 401)
        body = json.loads(resp.body)
        self._token = str(body["access_token"])
        ttl = float(body.get("expires_in", 3600))
        self._expires_at = time.monotonic() + max(ttl - TOKEN_REFRESH_MARGIN_SECONDS, ttl / 2)


class FhirClient:
    """The FHIR operations Switchboard uses; every failure is a FhirTransientError or
    FhirPermanentError (worker.fhir.outcome)."""

    def __init__(
        self,
        base_url: str,
        token_url: str,
        client_id: str,
        client_secret: str,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        observe: Callable[[str, float], None] | None = None,
        write_limit: WriteSlots | None = None,
        conflict_retries: int = 8,
        conflict_backoff: tuple[float, float] = (0.02, 1.0),
        on_contention: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._observe = observe  # (operation, seconds) for the latency histogram
        # Writes wait for room under the limit that gives the server's best write rate
        # (worker.fhir.contention), shared by the cluster (worker.fhir.budget); a
        # serialization conflict is retried here, milliseconds apart, before it becomes the
        # task's transient failure.
        self.write_limit: WriteSlots = write_limit or WriteLimit(Tuning(ceiling=64), start=64)
        self._conflict_retries = conflict_retries
        self._conflict_backoff = conflict_backoff
        self._on_contention = on_contention  # "conflict", "retried", "gave-up", "throttled"
        self._sleep = sleep
        # Relative URLs (`Type/id`, `Type?query`, "" for the base) are appended to the base.
        self._base = base_url if base_url.endswith("/") else base_url + "/"
        self._timeout = timeout
        # One httpx client (and pool) per FhirClient, so per process; `transport` replaces
        # the network in tests (httpx.MockTransport).
        self._http = (new_client(self._base, POOL_SIZE, timeout) if transport is None
                      else httpx.Client(transport=transport))
        self._tokens = TokenSource(self._http, token_url, client_id, client_secret, timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- operations ---------------------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str,
             headers: Mapping[str, str] | None = None) -> FhirResponse:
        """GET Type/id (both parts checked: InvalidReference otherwise)."""
        return self._request("GET", str(ref(resource_type, resource_id)), headers=headers,
                             op="read")

    def search(self, resource_type: str, params: Params,
               headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """GET Type?params, returning the searchset Bundle."""
        return self._request("GET", f"{_type(resource_type)}?{query_string(params)}",
                             headers=headers, op="search").resource

    def create(self, resource: Mapping[str, Any], if_none_exist: Params | None = None
               ) -> FhirResponse:
        """POST a resource; with `if_none_exist`, a conditional create (201 new, 200 found)."""
        headers = {"If-None-Exist": query_string(if_none_exist)} if if_none_exist else {}
        return self._write(lambda: self._request(
            "POST", _type(resource.get("resourceType")), json=resource, headers=headers,
            op="conditional-create" if headers else "create"))

    def update(self, resource: Mapping[str, Any], if_match_version: str | None = None
               ) -> FhirResponse:
        """PUT Type/id; with a version, only if the stored version still matches (If-Match)."""
        headers = {"If-Match": f'W/"{if_match_version}"'} if if_match_version else {}
        return self._write(lambda: self._request(
            "PUT", str(ref(resource.get("resourceType"), resource.get("id"))), json=resource,
            headers=headers, op="update"))

    def upsert(self, resource: Mapping[str, Any], params: Params) -> FhirResponse:
        """Conditional update `PUT Type?params`: creates (201) or updates (200) one resource."""
        return self._write(lambda: self._request(
            "PUT", f"{_type(resource.get('resourceType'))}?{query_string(params)}", json=resource,
            op="upsert"))

    def create_binary(self, data: bytes, content_type: str) -> str:
        """POST the bytes as a raw Binary (the body is the file, with its own Content-Type);
        returns the Binary id.

        Medplum refuses a JSON body over 1 MiB and a base64Binary over 1 MiB, so a file sent as
        base64 `data` inside a Binary resource caps near 750 KB; a raw upload goes to its binary
        storage without that limit (docs/design.md, "Medplum's size limits").
        """
        if "json" in content_type.split(";", 1)[0].lower():
            # The server would read a JSON body as a resource (a file could pass itself off as
            # a Binary of its choosing): a JSON file is stored as plain bytes.
            content_type = "application/octet-stream"
        resp = self._write(lambda: self._request(
            "POST", "Binary", content=data, content_type=content_type, op="create-binary"))
        binary_id = resp.resource.get("id")
        if not isinstance(binary_id, str) or not binary_id:
            raise FhirTransientError("Binary created without an id")
        return binary_id

    def transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """POST a transaction Bundle and check every entry's status.

        Without Medplum's `transaction-bundles` feature a failing entry does not roll back the
        others and the Bundle still comes back 200, so the per-entry statuses are the truth.
        """
        return self._write(lambda: self._transaction_once(bundle))

    def _transaction_once(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        result = self._request("POST", "", json=bundle, op="transaction").resource
        sent, got = len(bundle.get("entry") or []), len(result.get("entry") or [])
        if got != sent:
            # Never take a short answer as success; the entries are idempotent, so retry.
            raise FhirTransientError(f"transaction answered {got} entries for {sent}")
        for entry in result.get("entry") or []:
            status = str((entry.get("response") or {}).get("status", "200"))
            code = int(status.split()[0])
            err = classify(code, {}, (entry.get("response") or {}).get("outcome"))
            if err is not None:
                raise err
        return result

    # -- plumbing -----------------------------------------------------------------------------

    def _write(self, attempt: Callable[[], T]) -> T:
        """Run one write under the write limit, retrying serialization conflicts.

        A conflict means PostgreSQL aborted the whole transaction, so nothing was written and
        the same request is safe to send again. Each retry takes a fresh slot, so a contended
        server sees fewer writes in flight on the next try. After `conflict_retries` the
        FhirConflictError goes up to the task, which retries it like any transient failure.
        """
        for retry in range(self._conflict_retries + 1):
            with self.write_limit.slot() as slot:
                try:
                    return attempt()
                except FhirConflictError:
                    slot.outcome = CONGESTED
                    self._event("conflict")
                    if retry == self._conflict_retries:
                        self._event("gave-up")
                        raise
                except FhirTransientError as exc:
                    if exc.status == 429:
                        slot.outcome = THROTTLED
                        self._event("throttled")
                    raise
            self._event("retried")
            self._sleep(retry_delay(retry + 1, *self._conflict_backoff))
        raise AssertionError("unreachable")  # the loop returns or raises

    def _event(self, what: str) -> None:
        if self._on_contention is not None:
            self._on_contention(what)

    def _request(self, method: str, url: str, json: Any = None,
                 headers: Mapping[str, str] | None = None, op: str = "other",
                 content: bytes | None = None, content_type: str = "") -> FhirResponse:
        """`url` is relative to the base and built only from checked parts (ref, _type,
        query_string), so it can neither leave the base nor carry a raw '+'. The body is
        `json` encoded as FHIR JSON, or raw `content` of `content_type`."""
        hdrs = {"Accept": FHIR_JSON, **(headers or {})}
        if json is not None:
            hdrs["Content-Type"] = FHIR_JSON
            content = _encode(json)
        elif content is not None:
            hdrs["Content-Type"] = content_type
        for attempt in (1, 2):
            token = self._tokens.get()
            started = time.perf_counter()
            try:
                resp = fetch(self._http, method, self._base + url,
                             headers={**hdrs, "Authorization": f"Bearer {token}"},
                             content=content, timeout=self._timeout,
                             max_bytes=MAX_ANSWER_BYTES)
            except httpx.TimeoutException as exc:
                raise FhirTransientError(f"timeout on {method} {_path(url)}") from exc
            except httpx.HTTPError as exc:  # the class name only: a URL may carry a phone
                raise FhirTransientError(
                    f"{type(exc).__name__} on {method} {_path(url)}") from exc
            finally:
                if self._observe is not None:
                    self._observe(op, time.perf_counter() - started)
            if resp.status == 401 and attempt == 1:
                # Tokens can be revoked or expire early; refresh once, then believe the 401.
                self._tokens.invalidate(token)
                continue
            break
        body = _json_or_none(resp)
        err = classify(resp.status, resp.headers, body)
        if err is not None:
            raise err
        return FhirResponse(resp.status, body if isinstance(body, dict) else {})


def _type(resource_type: object) -> str:
    if not valid_type(resource_type):
        raise InvalidReference("not a FHIR resource type")
    return str(resource_type)


def _path(url: str) -> str:
    # Only the resource type goes into error text: a query string may carry a phone number.
    return url.split("?", 1)[0].split("/", 1)[0] or "/"


def _encode(resource: Any) -> bytes:
    # The bytes httpx sent for json=: compact UTF-8, and NaN/Infinity refused (not JSON).
    return json.dumps(resource, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode()


def _json_or_none(resp: Answer) -> Any:
    try:
        return json.loads(resp.body)
    except ValueError:  # not JSON (or not UTF-8): classified by its status alone
        return None
