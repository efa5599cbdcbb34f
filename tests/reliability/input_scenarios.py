"""Scenarios 6 (bad input) and 7 (forgery): hostile requests against the receiver, counted.

Both drive a Flask app from `web.app.create_app(settings)` through its test client, exactly as
production would run it (no PROPAGATE_EXCEPTIONS, no testing mode), and measure the broker
queues (`inbound`, `outbound`, `status`) in the app's Redis database around every request.
Neither needs a worker, the FHIR sandbox or the provider sandbox.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import string
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator
from werkzeug.datastructures import Headers

from tests.email_payloads import signed as sendgrid_signed

log = logging.getLogger("switchboard.reliability")

QUEUES = ("inbound", "outbound", "status")
SMS_PATH = "/webhooks/twilio/sms"
STATUS_PATH = "/webhooks/twilio/status"
EVENTS_PATH = "/webhooks/sendgrid/events"
EMAIL_PATH = "/webhooks/sendgrid/inbound"
CONVERSATIONS_PATH = "/webhooks/twilio/conversations"
# The Twilio webhooks: signed the same way (X-Twilio-Signature over the URL and the form).
TWILIO_KINDS = ("sms", "status", "conversations")


def queue_total(redis_client: redis.Redis) -> int:
    """Messages waiting in the three broker queues."""
    pipe = redis_client.pipeline()
    for q in QUEUES:
        pipe.llen(q)
    return sum(int(n) for n in pipe.execute())


# --------------------------------------------------------------------------------------------
# Scenario 6: bad input
# --------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """One generated request."""

    endpoint: str  # a label: which route this probes
    method: str
    path: str
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    content_type: str | None = None
    authorised: bool = False  # carries a valid bearer token (POST bodies never validate then)

    def describe(self) -> str:
        """A short, loggable description (bodies and headers truncated)."""
        heads = [(k, v if len(v) <= 60 else f"{v[:60]}...({len(v)})") for k, v in self.headers]
        body = self.body if len(self.body) <= 120 else self.body[:120] + b"..."
        return (f"{self.method} {self.path}?{self.query[:80]} ct={self.content_type!r} "
                f"auth={self.authorised} headers={heads} body[{len(self.body)}]={body!r}")


# Header values travel as latin-1 on the wire; CR/LF/NUL and other controls are refused by every
# HTTP server before an app sees them, so they are left out (a tab is allowed).
_HEADER_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                              blacklist_characters="\x7f")
_header_value = st.one_of(
    st.text(_HEADER_CHARS, max_size=200),
    st.builds(lambda c, n: c * n, st.sampled_from("aZ=+/ \t\xe9"), st.integers(1000, 20_000)),
)
_header_name = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=40
                       ).filter(lambda n: n.lower() not in {
                           "content-length", "content-type", "transfer-encoding", "host"})
# Any unicode except lone surrogates (they cannot be encoded at all, so no client can send them).
_char = st.characters(codec="utf-8")
_text = st.text(_char, max_size=60)
_huge = st.builds(lambda c, n: c * n, _char, st.integers(0, 300_000))
_value = st.one_of(_text, _text, _text, _huge)


def _json_values() -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | _text
    return st.recursive(leaves, lambda c: st.lists(c, max_size=5)
                        | st.dictionaries(_text, c, max_size=5), max_leaves=30)


def _never_valid(value: Any) -> Any:
    """A JSON value that cannot validate as a send request (so an authorised POST must fail)."""
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in ("communication", "resourceType")}
    return value


@st.composite
def _form_body(draw: st.DrawFn) -> tuple[bytes, str | None]:
    pairs = draw(st.lists(st.tuples(_text, _value), max_size=8))
    repeat = draw(st.booleans())
    if pairs and repeat:  # repeated keys
        pairs += [(pairs[0][0], draw(_value)) for _ in range(draw(st.integers(1, 3)))]
    body = urlencode(pairs).encode()
    if draw(st.integers(0, 4)) == 0:  # not what it claims: broken escapes, stray separators
        body += draw(st.sampled_from([b"&%ZZ=%", b"&&==&", b"&x=%FF%FE%ED%A0%80", b"=", b"%"]))
    ctype = draw(st.sampled_from([
        "application/x-www-form-urlencoded", "application/x-www-form-urlencoded; charset=utf-8",
        "application/x-www-form-urlencoded; charset=utf-16", "application/x-www-form-urlencoded;"
        " charset=no-such-charset", "APPLICATION/X-WWW-FORM-URLENCODED", None]))
    return body, ctype


@st.composite
def _json_body(draw: st.DrawFn) -> tuple[bytes, str | None]:
    kind = draw(st.integers(0, 6))
    if kind == 6:  # a number longer than Python converts by default (4300 digits)
        body = b'{"payload": [' + b"9" * draw(st.integers(4000, 50_000)) + b"]}"
    elif kind == 0:  # nested far deeper than any parser's recursion limit
        depth = draw(st.integers(500, 100_000))
        opener, middle, closer = draw(st.sampled_from([(b"[", b"", b"]"),
                                                       (b'{"a":', b"1", b"}")]))
        body = opener * depth + middle + closer * depth
    else:
        body = json.dumps(_never_valid(draw(_json_values())), allow_nan=True).encode()
        if kind == 1:
            body = body[: draw(st.integers(0, len(body)))]  # truncated
    ctype = draw(st.sampled_from(["application/json", "application/json; charset=latin-1",
                                  "application/vnd.api+json", "text/json", None]))
    return body, ctype


@st.composite
def _multipart_body(draw: st.DrawFn) -> tuple[bytes, str | None]:
    # Mostly parseable (so the parts reach request.form), some broken in structure.
    boundary = draw(st.text(string.ascii_letters + string.digits + "-_", min_size=1,
                            max_size=70))
    parts = []
    for _ in range(draw(st.integers(1, 5))):
        name = draw(_text).replace('"', draw(st.sampled_from(['"', '\\"', "%22"])))
        # A well-formed part, or one whose headers are not: no name, an unquoted name, another
        # disposition, no Content-Disposition at all.
        head = draw(st.sampled_from([
            f'Content-Disposition: form-data; name="{name}"',
            f'Content-Disposition: form-data; name="{name}"',
            f'Content-Disposition: form-data; name="{name}"; filename="{name}.bin"',
            "Content-Disposition: form-data", f"Content-Disposition: form-data; name={name}",
            f'Content-Disposition: attachment; name="{name}"', "X-Other: 1"]))
        content = draw(st.one_of(st.binary(max_size=200), _value.map(str.encode)))
        parts.append(b"--" + boundary.encode() + b"\r\n" + head.encode() + b"\r\n\r\n"
                     + content + b"\r\n")
    body = b"".join(parts)
    ending = draw(st.sampled_from(["closed", "closed", "closed", "open", "truncated"]))
    if ending == "closed":
        body += b"--" + boundary.encode() + b"--\r\n"
    elif ending == "truncated":
        body = body[: draw(st.integers(0, len(body)))]
    ctype = draw(st.sampled_from([
        f"multipart/form-data; boundary={boundary}", f"multipart/form-data; boundary={boundary}",
        f'multipart/form-data; boundary="{boundary}"', "multipart/form-data",
        "multipart/form-data; boundary=", f"multipart/mixed; boundary={boundary}",
        f"multipart/form-data; boundary={boundary}x"]))
    return body, ctype


@st.composite
def _raw_body(draw: st.DrawFn) -> tuple[bytes, str | None]:
    body = draw(st.one_of(st.binary(max_size=2000),
                          st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=4),
                                    st.integers(0, 100_000))))
    ctype = draw(st.one_of(st.none(), st.text(_HEADER_CHARS, max_size=80), st.sampled_from([
        "application/octet-stream", "text/plain; charset=utf-8", "application/json",
        "application/x-www-form-urlencoded", "multipart/form-data; boundary=zz", "*/*", ";;;",
        "text/xml"])))
    return body, ctype


_BODIES = (_form_body(), _json_body(), _multipart_body(), _raw_body())
# Every endpoint, auth state and body kind gets its share of the examples (one hypothesis run
# per cell), rather than whatever share hypothesis's biased choices would give it. A body kind
# of None: drawn from all four; "wrong-method" sends any route a method it does not take.
_CELLS: tuple[tuple[str, bool, int | None], ...] = (
    *((ep, auth, kind) for ep, auth in (("sms", False), ("status", False),
                                        ("conversations", False),
                                        ("sendgrid-events", False), ("email", False),
                                        ("post-messages", False), ("post-messages", True),
                                        ("fhir-subscription", False))
      for kind in range(len(_BODIES))),
    ("get-message", False, None), ("get-message", True, None), ("healthz", False, None),
    ("metrics", False, None), ("openapi", False, None), ("wrong-method", False, None))
_PATHS = {"sms": SMS_PATH, "status": STATUS_PATH, "conversations": CONVERSATIONS_PATH,
          "sendgrid-events": EVENTS_PATH,
          "email": EMAIL_PATH,
          "post-messages": "/v1/messages", "fhir-subscription": "/webhooks/fhir/subscription",
          "healthz": "/healthz", "metrics": "/metrics", "openapi": "/v1/openapi.json"}


@st.composite
def _query(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return ""
    if kind == 1:
        return urlencode(draw(st.lists(st.tuples(_text, _text), max_size=5)))
    if kind == 2:  # raw: broken escapes, separators, unreserved and reserved characters
        return draw(st.text(string.ascii_letters + string.digits + "%&=;+?/:@!$'()*,-._~[]",
                            max_size=200))
    return "bodySHA256=" + draw(st.text(string.hexdigits, max_size=64))


def _is_valid_bearer(value: str | None, token: str) -> bool:
    return value is not None and value.startswith("Bearer ") and value[7:].strip() == token


def _signature_garbage() -> st.SearchStrategy[str | None]:
    return st.one_of(
        st.none(), st.just(""),
        st.text(_HEADER_CHARS, max_size=100),
        st.binary(min_size=20, max_size=20).map(lambda b: base64.b64encode(b).decode()),
        st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode()),
        _header_value,
    )


def _invalid_authorization(token: str) -> st.SearchStrategy[str | None]:
    return st.one_of(
        st.none(),
        st.text(_HEADER_CHARS, max_size=100),
        st.text(_HEADER_CHARS, max_size=100).map(lambda v: f"Bearer {v}"),
        st.sampled_from(["Bearer", "Bearer ", "bearer " + token, "Basic " + token,
                         f"Bearer {token}x", f"Bearer {token[:-1]}", f"Bearer{token}",
                         f"Bearer {token},{token}", f"Token {token}", f" Bearer {token}"]),
    ).filter(lambda v: not _is_valid_bearer(v, token))


@st.composite
def _probes(draw: st.DrawFn, token: str, endpoint: str, authorised: bool, body_kind: int | None
            ) -> Probe:
    """A request to `endpoint` (a _CELLS entry)."""
    wrong_method = endpoint == "wrong-method"
    if wrong_method:
        endpoint = draw(st.sampled_from([*_PATHS, "get-message"]))
    headers: list[tuple[str, str]] = draw(st.lists(st.tuples(_header_name, _header_value),
                                                    max_size=4))
    body, ctype = b"", None
    method = "GET"
    bodies = st.one_of(_BODIES) if body_kind is None else _BODIES[body_kind]
    if endpoint in (*TWILIO_KINDS, "sendgrid-events", "email", "post-messages",
                    "fhir-subscription"):
        method = "POST"
        body, ctype = draw(bodies)
    elif draw(st.booleans()):  # a GET route with a body anyway
        body, ctype = draw(bodies)
    path = _PATHS.get(endpoint, "")
    if endpoint == "get-message":
        raw = draw(st.one_of(_text.filter(bool), st.text(string.hexdigits, min_size=32,
                                                         max_size=32), _huge.filter(bool)))
        path = "/v1/messages/" + quote(raw[:5000], safe=draw(st.sampled_from(["", "/", "%"])))
    if endpoint in TWILIO_KINDS:
        sig = draw(_signature_garbage())
        if sig is not None:
            name = draw(st.sampled_from(["X-Twilio-Signature", "x-twilio-signature"]))
            headers.append((name, sig))
        if draw(st.booleans()):
            headers.append(("X-Twilio-Webhooks-Signature-Settings", draw(_header_value)))
    if endpoint in ("sendgrid-events", "email"):
        # No valid ECDSA signature can be drawn: garbage, or genuine-looking base64 of the
        # right length, with a current, stale or malformed timestamp.
        sig = draw(st.one_of(_signature_garbage(), st.binary(min_size=70, max_size=72).map(
            lambda b: base64.b64encode(b).decode())))
        if sig is not None:
            headers.append(("X-Twilio-Email-Event-Webhook-Signature", sig))
        stamp = draw(st.one_of(st.none(), st.just(str(int(time.time()))), _header_value,
                               st.integers(-10**12, 10**13).map(str)))
        if stamp is not None:
            headers.append(("X-Twilio-Email-Event-Webhook-Timestamp", stamp))
    if endpoint == "fhir-subscription":
        sig = draw(st.one_of(_signature_garbage(), st.text(string.hexdigits, min_size=64,
                                                           max_size=64)))
        if sig is not None:
            headers.append(("X-Signature", sig))
        if draw(st.booleans()):
            headers.append(("X-Medplum-Interaction", draw(st.one_of(
                st.sampled_from(["create", "update", "delete"]), _header_value))))
    auth = draw(st.sampled_from([f"Bearer {token}", f"Bearer  {token}\t", f"Bearer {token} "])
                if authorised else _invalid_authorization(token))
    if auth is not None:
        headers.append(("Authorization", auth))
    if endpoint == "post-messages" and draw(st.booleans()):
        headers.append(("Prefer", draw(st.one_of(
            _header_value, st.integers(-5, 10**30).map(lambda n: f"wait={n}")))))
    if wrong_method:
        method = draw(st.sampled_from(["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD",
                                       "GET" if method == "POST" else "POST"]))
    return Probe(endpoint, method, path, draw(_query()), headers, body, ctype, authorised)


def _known_probes(token: str) -> list[Probe]:
    """Inputs that once found a defect, always sent first (a regression corpus)."""
    nameless = (b'--b\r\nContent-Disposition: form-data; name="MessageSid"\r\n\r\nSM1\r\n'
                b"--b\r\nContent-Disposition: form-data\r\n\r\nno name\r\n--b--\r\n")
    deep = b"[" * 5000 + b"]" * 5000
    def email(parts: list[tuple[str, bytes]]) -> bytes:
        return b"".join(b'--e\r\nContent-Disposition: form-data; name="' + n.encode()
                        + b'"\r\n\r\n' + v + b"\r\n" for n, v in parts) + b"--e--\r\n"

    # Signed with the sandbox's key (the test configurations use it): past authentication, the
    # parser must refuse each with a 4xx, never crash, never enqueue.
    emails = [
        (email([("subject", b"no sender")]), "multipart/form-data; boundary=e"),
        (email([("from", b"not an address"), ("text", b"hi")]), "multipart/form-data; boundary=e"),
        (email([("email", b"\xff\xfe\x00garbage without headers")]),
         "multipart/form-data; boundary=e"),
        (nameless, "multipart/form-data; boundary=b"),
        (email([("from", b"<>"), ("headers", b"From: \r\n\x00")]),
         "multipart/form-data; boundary=e"),
        (b'{"from": "a@b.example"}', "application/json"),
        # Issue #26 finding 6: the signature does not cover the boundary, so the framing must
        # be exact: no preamble, no epilogue, no repeated field, no replay with another one.
        (b"preamble\r\n" + email([("from", b"a@b.example")]), "multipart/form-data; boundary=e"),
        (email([("from", b"a@b.example")]) + b"epilogue", "multipart/form-data; boundary=e"),
        (email([("from", b"a@b.example"), ("from", b"c@d.example")]),
         "multipart/form-data; boundary=e"),
        (email([("from", b"a@b.example"), ("text", b"hi\r\n--x\r\nContent-Disposition: "
                                                   b'form-data; name="from"\r\n\r\nc@d.example'
                                                   b"\r\n--x--")]),
         "multipart/form-data; boundary=x"),
    ]
    return [
        *(Probe("email", "POST", EMAIL_PATH, body=body, content_type=ctype, authorised=True,
                headers=[(k, v) for k, v in sendgrid_signed(ctype, body).items()
                         if k != "Content-Type"])
          for body, ctype in emails),
        # A multipart part without a name becomes form key None: the signature check crashed.
        Probe("sms", "POST", SMS_PATH, body=nameless, headers=[("X-Twilio-Signature", "x")],
              content_type="multipart/form-data; boundary=b"),
        Probe("status", "POST", STATUS_PATH, body=nameless, headers=[("X-Twilio-Signature", "x")],
              content_type="multipart/form-data; boundary=b"),
        Probe("conversations", "POST", CONVERSATIONS_PATH, body=nameless,
              headers=[("X-Twilio-Signature", "x")],
              content_type="multipart/form-data; boundary=b"),
        # JSON nested deeper than the recursion limit: RecursionError, not ValueError.
        Probe("post-messages", "POST", "/v1/messages", body=deep,
              headers=[("Authorization", f"Bearer {token}")], content_type="application/json",
              authorised=True),
        Probe("post-messages", "POST", "/v1/messages", body=deep,
              content_type="application/json"),
        # The hardening review's findings: each must be refused (4xx), never queued.
        *(Probe("post-messages", "POST", "/v1/messages", body=json.dumps(body).encode(),
                headers=[("Authorization", f"Bearer {token}")],
                content_type="application/json", authorised=True)
          for body in _hostile_api_bodies()),
    ]


def _hostile_api_bodies() -> list[dict[str, Any]]:
    """API bodies from the hardening review: a poison payload, reference traversal, sends that
    lie. (A valid body, to which each adds one hostile thing.)"""
    deep: Any = "x"
    for _ in range(500):  # a field nested ~500 lists deep made a dead letter loop forever
        deep = [deep]
    ok = {"resourceType": "Communication", "payload": [{"contentString": "hello"}],
          "recipient": [{"reference": "Patient/p1"}]}
    return [
        {**ok, "extension": deep},
        {**ok, "payload": [{"contentString": "hi", "x": deep}]},
        {"communication": "Communication/p1", "x": deep},
        {"communication": "Communication/.."},
        {"communication": "Communication/."},
        {"communication": "Communication/../Patient/p1"},
        {**ok, "recipient": [{"reference": "Patient/../Practitioner/p1"}]},
        {**ok, "recipient": [{"reference": "Patient/../../../x"}]},
        {**ok, "partOf": [{"reference": "Communication/.."}]},
        {**ok, "partOf": [{"reference": "Patient/p1"}]},
        {**ok, "identifier": [{"system": "https://www.twilio.com/docs/api/messaging/message#sid",
                               "value": "SM" + "0" * 32}]},
        {**ok, "sender": {"reference": "Patient/p1"}},
        {"resourceType": "Communication", "recipient": [{"reference": "Patient/p1"}]},
        {**ok, "payload": [{"contentAttachment": {"url": "file:///etc/passwd"}}]},
        # Round 3: strings and numbers FHIR refuses, which used to be a 202 then a fhir-400.
        {**ok, "recipient": [{"reference": "Patient/p1", "display": "a\x1bb"}]},
        {**ok, "topic": {"text": "sub\x00ject"}},
        {**ok, "payload": [{"contentAttachment": {"url": "https://x.example/y",
                                                  "size": 10**12}}]},
        {**ok, "payload": [{"contentAttachment": {"url": "https:// not a url"}}]},
        {**ok, "category": [{"coding": [{"system": "not a uri with spaces"}]}]},
        {**ok, "payload": [{}]},
    ]


def run_bad_input(app: Any, redis_client: redis.Redis, examples: int, seed: int = 0,
                  failures: list[str] | None = None) -> dict[str, int]:
    """Scenario 6: `examples` generated hostile requests against every endpoint but /readyz.

    Bodies: random forms (unicode, values up to ~300 KB, repeated keys, broken escapes), random
    and deeply nested JSON, well- and ill-formed multipart, raw binary; random headers (huge,
    garbage Content-Type, X-Twilio-Signature and Authorization garbage, `Bearer <random>`),
    random query strings, path ids and wrong methods. No request carries a valid Twilio
    signature; some POST /v1/messages carry the valid token with a body that cannot validate
    (deep JSON reaches the parser only past authentication).

    Counts (`requests` and `authorised` aside, all must be 0): `requests`, `authorised`,
    `status_5xx`, `accepted_without_auth` (2xx from a webhook or a token-protected route
    without valid credentials), `authorised_2xx` (2xx for a body that cannot validate),
    `enqueued` (growth of the `inbound`/`outbound`/`status` lists), `exceptions` (raised through
    the test client); plus `http_<code>`: how many requests got each status code.
    `failures`, when given, receives a description of each offending request.

    A few known-bad inputs (`_known_probes`) are sent first, then `examples` generated ones.
    Deterministic: seed 0 runs hypothesis derandomized; another seed is passed to
    `hypothesis.seed`.
    """
    token = (app.extensions["switchboard.settings"].api_token_list() or ["<none>"])[0]
    counts: Counter[str] = Counter(requests=0, authorised=0, status_5xx=0,
                                   accepted_without_auth=0, authorised_2xx=0, enqueued=0,
                                   exceptions=0)
    sink = failures if failures is not None else []
    client = app.test_client()
    start = queue_total(redis_client)

    def note(what: str, probe: Probe) -> None:
        counts[what] += 1
        message = f"{what}: {probe.describe()}"
        sink.append(message)
        log.error("bad-input %s", message)

    def probe_once(probe: Probe) -> None:
        counts["requests"] += 1
        counts["authorised"] += int(probe.authorised)
        before = queue_total(redis_client)
        try:
            resp = client.open(probe.path, method=probe.method, query_string=probe.query,
                               headers=Headers(probe.headers), data=probe.body,
                               content_type=probe.content_type)
        except Exception as exc:
            note("exceptions", probe)
            sink.append(f"  -> {type(exc).__name__}: {str(exc)[:200]}")
            return
        status = resp.status_code
        resp.close()
        counts[f"http_{status}"] += 1
        if status >= 500:
            note("status_5xx", probe)
        needs_auth = probe.endpoint in (*TWILIO_KINDS, "sendgrid-events", "email",
                                        "post-messages", "get-message",
                                        "fhir-subscription")
        if 200 <= status < 300 and needs_auth and probe.method in ("GET", "POST"):
            if not probe.authorised:
                note("accepted_without_auth", probe)
            elif probe.endpoint in ("post-messages", "email") and probe.method == "POST":
                note("authorised_2xx", probe)
        grown = queue_total(redis_client) - before
        if grown > 0:
            counts["enqueued"] += grown
            sink.append(f"enqueued {grown}: {probe.describe()}")

    for known in _known_probes(token):
        probe_once(known)
    for i, cell in enumerate(_CELLS):
        quota = examples // len(_CELLS) + int(i < examples % len(_CELLS))
        if not quota:
            continue
        config = settings(max_examples=quota, derandomize=seed == 0, database=None,
                          deadline=None, suppress_health_check=list(HealthCheck),
                          phases=[Phase.generate], print_blob=False)
        runner: Callable[[], None] = config(given(_probes(token, *cell))(probe_once))
        if seed != 0:
            runner = hypothesis_seed(seed + i)(runner)
        runner()
    # Belt and braces: nothing may have grown over the whole run either.
    counts["enqueued"] = max(counts["enqueued"], queue_total(redis_client) - start)
    return dict(counts)


# --------------------------------------------------------------------------------------------
# Scenario 7: forgery
# --------------------------------------------------------------------------------------------

_STATUSES = ("queued", "sending", "sent", "delivered", "undelivered", "failed", "read")
_BODY_CHARS = string.ascii_letters + string.digits + " .,!?'é漢字🙂\n"


def _sid(rng: random.Random, prefix: str) -> str:
    return prefix + "".join(rng.choice("0123456789abcdef") for _ in range(32))


def _phone(rng: random.Random) -> str:
    return "+1555" + "".join(rng.choice(string.digits) for _ in range(7))


def _payload(rng: random.Random, kind: str, account_sid: str) -> dict[str, str]:
    """A valid-looking Twilio webhook form of this kind (`sms`, `status` or `conversations`:
    a Conversations onMessageAdded or onDeliveryUpdated, as Twilio documents them)."""
    if kind == "conversations":
        return _conversations_payload(rng, account_sid)
    common = {"MessageSid": _sid(rng, "SM"), "AccountSid": account_sid,
              "From": _phone(rng), "To": _phone(rng), "ApiVersion": "2010-04-01"}
    if kind == "sms":
        body = "".join(rng.choice(_BODY_CHARS) for _ in range(rng.randint(1, 160)))
        out = {**common, "SmsMessageSid": common["MessageSid"], "Body": body, "NumMedia": "0",
               "NumSegments": "1", "FromCountry": "US"}
        if rng.random() < 0.3:
            out.update(NumMedia="1", MediaUrl0=f"https://api.twilio.com/media/{_sid(rng, 'ME')}",
                       MediaContentType0="image/jpeg")
        if rng.random() < 0.4:  # WhatsApp, on the same webhook: its own fields (PHI included)
            out.update(From="whatsapp:" + out["From"], To="whatsapp:" + out["To"],
                       WaId=out["From"][1:], MessageType="text",
                       ProfileName="".join(rng.choice(_BODY_CHARS.replace("\n", ""))
                                           for _ in range(rng.randint(1, 40))))
        return out
    out = {**common, "MessageStatus": rng.choice(_STATUSES)}
    out["SmsStatus"] = out["MessageStatus"]
    if rng.random() < 0.4:  # a WhatsApp send's callback (`read` among its statuses)
        out.update(From="whatsapp:" + out["From"], To="whatsapp:" + out["To"],
                   ChannelPrefix="whatsapp", ChannelToAddress=out["To"])
    if out["MessageStatus"] in ("failed", "undelivered"):
        out["ErrorCode"] = rng.choice(["30003", "30005", "21610"])
    return out


def _conversations_payload(rng: random.Random, account_sid: str) -> dict[str, str]:
    common = {"AccountSid": account_sid, "ChatServiceSid": _sid(rng, "IS"),
              "ConversationSid": _sid(rng, "CH"), "MessageSid": _sid(rng, "IM"),
              "ParticipantSid": _sid(rng, "MB"), "WebhookSid": _sid(rng, "WH"),
              "RetryCount": "0", "WebhookType": "webhook",
              "DateCreated": "2026-12-07T10:00:00.000Z"}
    if rng.random() < 0.25:
        return {**common, "EventType": "onDeliveryUpdated", "Status": rng.choice(
            ["sent", "delivered", "read", "failed", "undelivered"]),
            "DeliveryReceiptSid": _sid(rng, "DY"), "ChannelMessageSid": _sid(rng, "SM"),
            "ErrorCode": "0", "DateUpdated": "2026-12-07T10:00:01.000Z"}
    body = "".join(rng.choice(_BODY_CHARS) for _ in range(rng.randint(1, 160)))
    out = {**common, "EventType": "onMessageAdded", "Index": str(rng.randint(0, 99)),
           "Author": rng.choice([_phone(rng), "whatsapp:" + _phone(rng)]), "Body": body,
           "Source": "SMS", "Attributes": "{}"}
    if rng.random() < 0.3:
        out["Media"] = json.dumps([{"Sid": _sid(rng, "ME"), "Filename": "photo.jpg",
                                    "ContentType": "image/jpeg", "Size": 1234}])
    return out


_TWILIO_PATHS = {"sms": SMS_PATH, "status": STATUS_PATH, "conversations": CONVERSATIONS_PATH}


@dataclass
class _Attempt:
    category: str  # "attack", "control" or "tolerated"
    name: str
    path: str
    params: list[tuple[str, str]]
    headers: list[tuple[str, str]]
    query: str = ""
    expect: int = 403  # what an attack must get: 403 (forged), 400 (signed, malformed field)


def _shifted(params: dict[str, str]) -> dict[str, str] | None:
    """The params with one key/value boundary moved so that Twilio's signed string (url +
    sorted name+value pairs, no separators) is unchanged, or None if no such shift exists.
    The message's content fields are tried first."""
    names = sorted(params)
    first = ("Body", "MessageStatus", "ErrorCode", "Status")
    for name in sorted(names, key=lambda n: (n not in first, first.index(n) if n in first
                                             else 0)):
        i = names.index(name)
        value = params[name]
        for cut in range(1, len(value)):
            new_name = name + value[:cut]
            others = [n for n in names if n != name]
            if new_name in others:
                continue
            if sorted([*others, new_name]).index(new_name) == i:
                out = {k: v for k, v in params.items() if k != name}
                out[new_name] = value[cut:]
                return out
    return None


def _attempts(rng: random.Random, base: str, token: str, kind: str, account_sid: str
              ) -> list[_Attempt]:
    path = _TWILIO_PATHS[kind]
    other_path = _TWILIO_PATHS[TWILIO_KINDS[(TWILIO_KINDS.index(kind) + 1) % 3]]
    params = _payload(rng, kind, account_sid)
    items = list(params.items())
    right = RequestValidator(token)

    def sig(p: dict[str, str] | list[tuple[str, str]], url: str = base + path,
            validator: RequestValidator = right, algorithm: str | None = None) -> str:
        from werkzeug.datastructures import MultiDict

        return str(validator.compute_signature(url, MultiDict(p), algorithm))

    good = sig(params)
    h = "X-Twilio-Signature"

    def attack(name: str, p: list[tuple[str, str]], headers: list[tuple[str, str]],
               at: str = path, query: str = "") -> _Attempt:
        return _Attempt("attack", name, at, p, headers, query)

    changed_key = rng.choice([k for k in params if k not in ("ApiVersion",)])
    changed = {**params, changed_key: params[changed_key] + rng.choice(["x", " ", "0", "é"])}
    removed_key = rng.choice(list(params))
    removed = {k: v for k, v in params.items() if k != removed_key}
    other = _payload(rng, kind, account_sid)
    flip = "".join(c.lower() if c.isupper() else c.upper() for c in good)
    out = [
        _Attempt("control", "signed", path, items, [(h, good)]),
        attack("unsigned", items, []),
        attack("empty-signature", items, [(h, "")]),
        attack("other-body", items, [(h, sig(other))]),
        attack(f"changed-{changed_key}", list(changed.items()), [(h, good)]),
        attack("added-param", [*items, ("Foo", "bar")], [(h, good)]),
        attack("added-repeat-value", [*items, (changed_key, "other")], [(h, good)]),
        attack(f"removed-{removed_key}", list(removed.items()), [(h, good)]),
        attack("url-other-path", items, [(h, sig(params, base + other_path))]),
        attack("url-other-host", items, [(h, sig(params, "https://evil.example" + path))]),
        attack("url-http", items, [(h, sig(params, base.replace("https://", "http://", 1)
                                            + path))]),
        attack("url-other-port", items, [(h, sig(params, base + ":8443" + path))]),
        attack("url-signed-with-query", items, [(h, sig(params, base + path + "?x=1"))]),
        attack("url-posted-with-query", items, [(h, good)], query="x=1"),
        attack("url-trailing-slash", items, [(h, sig(params, base + path + "/"))]),
        attack("other-token", items, [(h, sig(params, validator=RequestValidator(
            token + "x")))]),
        attack("sha256-signature", items, [(h, sig(params, algorithm="HMAC_SHA256"))]),
        attack("replayed-other-endpoint", items, [(h, good)], at=other_path),
        attack("value-case-flipped", items, [(h, flip)]),
        attack("value-inner-space", items, [(h, good[:10] + " " + good[10:])]),
        attack("value-truncated", items, [(h, good[:-2])]),
        attack("value-extra-padding", items, [(h, good + "=")]),
        attack("value-joined-twice", items, [(h, f"{good}, {good}")]),
        attack("wrong-then-right-header", items, [(h, sig(other)), (h, good)]),
        attack("other-header-name", items, [("X-Twilio-Signature-256", good)]),
        attack("raw-hmac-not-base64", items, [(h, base64.b64decode(good).hex())]),
        # Header name case is not part of HTTP (RFC 9110 §5.1): the same request.
        _Attempt("control", "header-name-lower", path, items, [(h.lower(), good)]),
        _Attempt("control", "header-name-upper", path, items, [(h.upper(), good)]),
        # Outer whitespace is optional whitespace (RFC 9110 §5.5) that servers such as gunicorn
        # strip before the app sees it; stripped it is byte-identical, so accepting it is fine,
        # and so is refusing it (the test client passes it through unstripped).
        _Attempt("tolerated", "value-outer-whitespace", path, items, [(h, f" {good}\t")]),
    ]
    # Same signed string under Twilio's scheme (the SDK signs url + sorted name+value with no
    # separators, over the *set* of values): a default port, an identical repeated value, an
    # empty pair, a moved key/value boundary. Accepted by any Twilio-SDK verifier.
    out += [
        _Attempt("tolerated", "url-default-port", path, items,
                 [(h, sig(params, base + ":443" + path))]),
        _Attempt("tolerated", "repeated-identical-value", path,
                 [*items, (changed_key, params[changed_key])], [(h, good)]),
        _Attempt("tolerated", "empty-pair", path, [*items, ("", "")], [(h, good)]),
    ]
    shifted = _shifted(params)
    if shifted is not None:
        out.append(_Attempt("tolerated", "boundary-shift", path, list(shifted.items()),
                            [(h, good)]))
    # Validly signed, malformed fields (Twilio's signature binds no name to its value): each
    # must be refused with 400 and nothing queued.
    for name, signed in _malformed(params, kind, rng):
        out.append(_Attempt("attack", name, path, list(signed.items()), [(h, sig(signed))],
                            expect=400))
    return out


def _malformed(params: dict[str, str], kind: str, rng: random.Random
               ) -> list[tuple[str, dict[str, str]]]:
    """(name, params) variants a valid signature can carry but whose fields are malformed."""
    out = []
    if "NumMedia" in params:
        # The captured-webhook replay: `NumMedia0` moved into MessageSid, NumMedia dropped; the
        # signed string is unchanged, so the original signature still matches.
        shifted = {k: v for k, v in params.items() if k != "NumMedia"}
        shifted["MessageSid"] = params["MessageSid"] + "NumMedia" + params["NumMedia"]
        out.append(("sid-absorbs-nummedia", shifted))
        out.append(("media-file-url", {**params, "NumMedia": "1",
                                       "MediaUrl0": "file:///etc/passwd"}))
        out.append(("media-foreign-host", {**params, "NumMedia": "1",
                                           "MediaUrl0": "https://evil.example/x.jpg"}))
        out.append(("media-beyond-count", {**params, "NumMedia": "0",
                                           "MediaUrl3": "https://api.twilio.com/m"}))
        out.append(("from-not-a-number", {**params, "From": "javascript:alert(1)"}))
    if kind == "conversations":
        # A Conversations webhook's SIDs become REST paths (a participant read) and FHIR
        # identifiers: traversal, a second SID, the wrong kind of SID, media that is no list.
        out.append(("conversation-sid-traversal", {**params, "ConversationSid": "CH../../x"}))
        out.append(("participant-sid-traversal", {**params,
                                                  "ParticipantSid": "MB/../Conversations"}))
        out.append(("sms-sid-as-message", {**params, "MessageSid": "SM" + "0" * 32}))
        out.append(("unknown-event", {**params, "EventType": "onConversationRemoved"}))
        out.append(("media-not-a-list", {**params, "Media": '{"Sid": "ME1"}'}))
        out.append(("media-foreign-sid", {**params, "Media": json.dumps(
            [{"Sid": "../../etc/passwd", "ContentType": "image/jpeg"}])}))
    if "WaId" in params:
        # WhatsApp's fields: the id must be From's number, the name printable and bounded, and
        # an SMS may not carry a WhatsApp id.
        out.append(("waid-of-another-number", {**params, "WaId": "15550000000"}))
        out.append(("waid-not-digits", {**params, "WaId": params["WaId"] + "x"}))
        out.append(("profile-name-control-chars", {**params, "ProfileName": "Ann\x00\x1b[2J"}))
        out.append(("profile-name-huge", {**params, "ProfileName": "A" * 5000}))
        out.append(("whatsapp-scheme-smuggled", {**params, "From": "whatsapp:javascript:1"}))
        out.append(("sms-claims-waid", {**params, "From": params["From"][len("whatsapp:"):],
                                        "To": params["To"][len("whatsapp:"):]}))
    if params.get("ChannelPrefix"):
        out.append(("channel-prefix-not-a-word", {**params, "ChannelPrefix": "what sapp"}))
        out.append(("channel-address-not-a-number", {**params, "ChannelToAddress": "x;y"}))
    out.append(("sid-with-comma", {**params, "MessageSid": params["MessageSid"] + ",SM" +
                                   "0" * 32}))
    out.append(("foreign-account", {**params, "AccountSid": "AC" + "f" * 32}))
    if kind == "status":
        out.append(("unknown-status", {**params, "MessageStatus": "pwned"}))
    return out


def run_forgery(app: Any, redis_client: redis.Redis, public_base_url: str, auth_token: str,
                n: int, seed: int = 0, failures: list[str] | None = None) -> dict[str, int]:
    """Scenario 7: forged and tampered Twilio webhooks for `n` random payloads (sms, status and
    Conversations in turn), each with a correctly signed control.

    Attacks (must all be 403, nothing enqueued): unsigned, empty signature, the signature of
    another body, a valid signature with a param changed / added / given a second value /
    removed, signatures for another path, host, scheme, port, with or without a query param, a
    trailing slash, another auth token, HMAC-SHA256 instead of SHA1, a valid request replayed
    against the other webhook, and header values altered (case flipped, inner space, truncated,
    padded, sent twice, a wrong header before the right one, another header name, hex).

    Controls (must all be 200): the signed request, and the same with the header name in lower
    or upper case (header names are case-insensitive, so it is the same request).

    Tolerated (either answer is fine; counted, not asserted): the signature value with outer
    whitespace (byte-identical once stripped, which the HTTP server does), and requests whose
    signed string is identical under Twilio's scheme (url with :443, an identical repeated
    value, an empty `=` pair, a key/value boundary moved: {"Body": "hello"} -> {"Bodyh": "ello"}).
    The last one is a limit of Twilio's signature design, not of Switchboard: a party holding one
    valid signed request can resend it with a field dropped or truncated. It requires capturing
    the request (TLS prevents that), and the worker's MessageSid idempotency makes a copy
    arriving after the genuine request write nothing.

    Replay: Twilio's signature covers only the URL and the parameters (no timestamp or nonce),
    so an identical valid request replayed later ("stale timestamp") cannot be told apart by the
    signature and is accepted (`replays_accepted`). The defence is idempotency on MessageSid:
    the worker's conditional creates (and the seen-marker) make a replay write nothing new, and
    status callbacks never move a final state.

    Counts: `attacks`, `rejected` (403 to an attack), `accepted` (2xx to an attack),
    `enqueued` (queue growth caused by attacks; must be 0), `status_5xx`, `controls`,
    `controls_accepted`, `controls_enqueued`, `tolerated`, `tolerated_accepted`, `replays`,
    `replays_accepted`, `enqueued_total`; plus `tolerated.<name>.http_<code>` per variant.
    """
    rng = random.Random(seed)
    client = app.test_client()
    account_sid = app.extensions["switchboard.settings"].twilio_account_sid
    base = public_base_url.rstrip("/")
    counts: Counter[str] = Counter(attacks=0, rejected=0, accepted=0, enqueued=0, status_5xx=0,
                                   controls=0, controls_accepted=0, controls_enqueued=0,
                                   tolerated=0, tolerated_accepted=0, replays=0,
                                   replays_accepted=0, enqueued_total=0)
    sink = failures if failures is not None else []
    start = queue_total(redis_client)

    def send(a: _Attempt) -> tuple[int, int]:
        before = queue_total(redis_client)
        resp = client.post(a.path, query_string=a.query, data=urlencode(a.params),
                           headers=Headers(a.headers),
                           content_type="application/x-www-form-urlencoded")
        status = resp.status_code
        resp.close()
        return status, queue_total(redis_client) - before

    for i in range(n):
        kind = TWILIO_KINDS[i % len(TWILIO_KINDS)]
        attempts = _attempts(rng, base, auth_token, kind, account_sid)
        for a in attempts:
            status, grown = send(a)
            counts["status_5xx"] += int(status >= 500)
            ok = 200 <= status < 300
            if a.category == "attack":
                counts["attacks"] += 1
                counts["rejected"] += int(status == a.expect)
                counts["accepted"] += int(ok)
                counts["enqueued"] += grown
                if status != a.expect or grown:
                    sink.append(f"attack {a.name} ({kind}) -> {status}, enqueued {grown}")
            elif a.category == "control":
                counts["controls"] += 1
                counts["controls_accepted"] += int(ok)
                counts["controls_enqueued"] += grown
                if not ok:
                    sink.append(f"control {a.name} ({kind}) -> {status}")
            else:
                counts["tolerated"] += 1
                counts["tolerated_accepted"] += int(ok)
                counts[f"tolerated.{a.name}.http_{status}"] += 1
        control = attempts[0]
        if i % 5 == 0:  # replay the control: identical bytes, later
            status, _ = send(control)
            counts["replays"] += 1
            counts["replays_accepted"] += int(200 <= status < 300)
    counts["enqueued_total"] = queue_total(redis_client) - start
    return dict(counts)


# --------------------------------------------------------------------------------------------
# Scenario 13: the classes of issue #26's findings, against the whole running service
# --------------------------------------------------------------------------------------------


@dataclass
class FindingResult:
    """One input class of issue #26: what it must come to, and what it came to."""

    finding: str  # "1".."13"
    name: str
    expected: str  # "4xx", "processed: …", "dead letter (reason)"; alternatives with " or "
    got: str = ""
    ok: bool = False

    def line(self) -> str:
        """One printable line."""
        verdict = "ok" if self.ok else "FAILS"
        return (f"finding {self.finding} {self.name}: expected {self.expected}; got "
                f"{self.got} [{verdict}]")


def run_findings(stack: Any, settle_timeout: float = 90.0) -> list[FindingResult]:
    """Scenario 13: each finding of issue #26 that is an input, sent to the running service
    (`stack`: a tests.reliability.harness.Stack at the default pacing), with its expected
    outcome: refused with a 4xx and a reason, dead-lettered with a reason, or processed
    correctly. Finding 12 (worker/http.py against a hostile *server*) is not an input of
    Switchboard's endpoints and is left to that client's own tests."""
    return _Findings(stack, settle_timeout).run()


class _Findings:
    """The inputs of scenario 13, sent in three steps: threads opened, every input sent, one
    settle; then each class is judged from FHIR, the provider sandbox and the dead letters."""

    def __init__(self, stack: Any, settle_timeout: float) -> None:
        from worker.channels.sendgrid import EMAIL_INBOUND_MESSAGE_ID_SYSTEM

        self.stack = stack
        self.fhir = stack.sandbox.fhir
        self.settle_timeout = settle_timeout
        self.email_system = EMAIL_INBOUND_MESSAGE_ID_SYSTEM
        self.results: list[FindingResult] = []
        self.tag = "".join(random.Random().choice("0123456789abcdef") for _ in range(8))

    # -- helpers -------------------------------------------------------------------------------

    def patient(self, n: int) -> tuple[str, str, str]:
        """A registered patient: (id, phone, email)."""
        phone, email = f"+1555{4000000 + n:07d}", f"finding{n}-{self.tag}@patients.example"
        pat = self.fhir.create({"resourceType": "Patient", "telecom": [
            {"system": "phone", "value": phone, "use": "mobile"},
            {"system": "email", "value": email}]}).resource
        return str(pat["id"]), phone, email

    def email(self, post: tuple[str, bytes]) -> int:
        return int(self.stack.post_email(post))

    def written(self, key: str) -> list[dict[str, Any]]:
        """Inbound Communications carrying this Message-ID / MessageSid."""
        from worker.fhir.query import token

        out = []
        for system in (self.email_system, self.stack.settings.message_id_system):
            out += self.stack.sandbox.all("Communication", identifier=token(system, key))
        return out

    def dead(self, needle: str) -> list[str]:
        """Reasons of the dead letters whose payload mentions `needle` (base64 looked into)."""
        return [e.reason for e, text in self.stack.dead_letter_texts() if needle in text]

    def header_of(self, comm: dict[str, Any]) -> dict[str, Any]:
        ref = str((comm.get("partOf") or [{}])[0].get("reference", ""))
        return dict(self.fhir.read("Communication", ref.split("/")[-1]).resource) if ref else {}

    def thread(self, patient_id: str, medium: str, timeout: float = 30.0) -> str:
        """The header of the patient's thread on `medium` (SMSWRIT/EMAILWRIT), once written."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for res in self.stack.sandbox.all("Communication", **{
                    "subject": f"Patient/{patient_id}", "part-of:missing": "true"}):
                codes = {c.get("code") for m in res.get("medium") or []
                         for c in m.get("coding") or []}
                if medium in codes:
                    return str(res["id"])
            time.sleep(0.5)
        return ""

    def reply(self, header: str, patient_id: str, text: str,
              recipient: str | None = None) -> str:
        """A clinician's reply written straight into FHIR (the Subscription notifies)."""
        # Logged in as the clinician: only what the clinic wrote (meta.author) is sent.
        return str(self.stack.sandbox.write_as(f"Practitioner/{self.practitioner}", {
            "resourceType": "Communication", "status": "in-progress",
            "partOf": [{"reference": f"Communication/{header}"}],
            "subject": {"reference": f"Patient/{patient_id}"},
            "recipient": [{"reference": recipient or f"Patient/{patient_id}"}],
            "sender": {"reference": f"Practitioner/{self.practitioner}"},
            "payload": [{"contentString": text}]})["id"])

    def sent(self, needle: str) -> list[dict[str, Any]]:
        """Provider requests (accepted) whose content holds `needle`."""
        return [r for r in self.stack.providers.requests()
                if r.get("answered") in (200, 201, 202)
                and needle in json.dumps(r.get("form") or r.get("json") or {})]

    def api(self, body: dict[str, Any], key: str | None = None,
            answer: dict[str, Any] | None = None) -> int:
        """POST /v1/messages; the status (the JSON answer into `answer`)."""
        headers = {"Authorization": "Bearer reliability-api-token"}
        if key:
            headers["Idempotency-Key"] = key
        resp = self.stack.http.post("/v1/messages", json=body, headers=headers)
        if answer is not None and resp.headers.get("content-type", "").startswith(
                "application/json"):
            answer.update(resp.json())
        return int(resp.status_code)

    def request_state(self, answer: dict[str, Any]) -> str:
        """The final state /v1/messages/<id> reports for an accepted request ('' if none)."""
        if not answer.get("id"):
            return ""
        resp = self.stack.http.get(f"/v1/messages/{answer['id']}",
                                   headers={"Authorization": "Bearer reliability-api-token"})
        body = resp.json() if resp.status_code == 200 else {}
        return " ".join(str(body.get(k)) for k in ("status", "reason", "error") if body.get(k))

    def judge(self, finding: str, name: str, expected: str, ok: bool, got: str) -> None:
        self.results.append(FindingResult(finding, name, expected, got, ok))

    def email_fate(self, mid: str, status: int) -> str:
        rows = self.written(mid)
        reasons = self.dead(mid)
        return (f"HTTP {status}, written {len(rows)}x"
                + (f", dead-lettered ({', '.join(sorted(set(reasons)))})" if reasons else ""))

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> list[FindingResult]:
        from tests import email_payloads as ep
        from tests.reliability.harness import sms
        from worker.fhir import subscription

        s = self.stack
        s.reset()
        subscription.install(self.fhir, f"http://127.0.0.1:{s.port}",
                             s.settings.fhir_subscription_secret.get_secret_value())
        self.practitioner = str(self.fhir.create({"resourceType": "Practitioner"}).resource["id"])
        a, b, c, d, e = (self.patient(n) for n in range(5))
        # Step 1: threads the later inputs need (SMS for A and B, email for B and D).
        s.post_sms(sms(a[1], "hello from A"))
        s.post_sms(sms(b[1], "hello from B"))
        b_root = ep.new_message_id("patients.example")
        self.email(ep.raw_post(b[2], ep.raw_email(b[2], text="B's question",
                                                  message_id=b_root)))
        crlf_mid = ep.new_message_id("patients.example")
        crlf_status = self.email(ep.raw_post(d[2], ep.crlf_subject_email(d[2], crlf_mid)))
        a_sms, b_sms = self.thread(a[0], "SMSWRIT"), self.thread(b[0], "SMSWRIT")
        b_mail, d_mail = self.thread(b[0], "EMAILWRIT"), self.thread(d[0], "EMAILWRIT")
        # (B's conversation must exist before A's email names its root, or A's would make it.)

        # Step 2: every input.
        # 1. Two replies within a second in one thread, then one in another thread.
        # (Four in A's thread, two in B's, all within about a second, at 1 SMS/s.)
        one = [f"[f1-{self.tag}-{k}]" for k in range(6)]
        if a_sms and b_sms:
            for k in range(4):
                self.reply(a_sms, a[0], f"reply {k} " + one[k])
            for k in range(4, 6):
                self.reply(b_sms, b[0], f"other patient {k} " + one[k])
        # 2. The quadratic quote-stripper text, from a patient and from a stranger.
        quote_mid, stranger_mid = (ep.new_message_id("patients.example") for _ in range(2))
        quote_status = self.email(ep.parsed_post(a[2], text=ep.quadratic_quote_text(12_000),
                                                 message_id=quote_mid))
        stranger_status = self.email(ep.parsed_post(
            "stranger@hostile.example", text=ep.quadratic_quote_text(12_000),
            message_id=stranger_mid))
        # 3. Thousands of one-line MIME parts.
        parts_mid = ep.new_message_id("patients.example")
        parts_status = self.email(ep.raw_post(a[2], ep.one_line_parts_email(
            a[2], 300_000, parts_mid)))
        # 4. A 2 MB photo; a 3 MB text.
        photo_mid, text_mid = (ep.new_message_id("patients.example") for _ in range(2))
        photo_status = self.email(ep.raw_post(a[2], ep.raw_email(
            a[2], text="my rash, photo attached", message_id=photo_mid,
            attachments=[("rash.jpg", "image/jpeg", ep.photo(2_000_000))])))
        text_status = self.email(ep.parsed_post(a[2], text="my diary " + "x" * 3_000_000,
                                                message_id=text_mid))
        # 5. A's email naming B's conversation root in References.
        hijack_mid = ep.new_message_id("patients.example")
        hijack_status = self.email(ep.raw_post(a[2], ep.raw_email(
            a[2], text="reply-all from A", message_id=hijack_mid, references=[b_root])))
        # 6. A signed post replayed with an injected boundary, claiming to be D.
        honest, evil_type = ep.boundary_injection("stranger@hostile.example", d[2],
                                                  text=f"injected {self.tag}")
        replay = self.stack.http.post("/webhooks/sendgrid/inbound", content=honest[1],
                                      headers=ep.signed(evil_type, honest[1])).status_code
        # 7. Broken charsets and deep nesting, from a patient.
        seven = {}
        for name, (charset, body) in ep.HOSTILE_CHARSETS.items():
            mid = ep.new_message_id("patients.example")
            seven[name] = (mid, self.email(ep.raw_post(a[2], ep.raw_charset_email(
                a[2], charset, body, mid))))
        mid = ep.new_message_id("patients.example")
        seven["nested-1200"] = (mid, self.email(ep.raw_post(a[2], ep.nested_email(
            a[2], 1200, mid))))
        # 8. Replies whose recipient is not the thread's patient.
        # (In E's email thread, opened now: email has its own send slots, which finding 1's
        # re-queued SMS replies do not spend. A proper reply after them is the control: it
        # must go out, or "never sent" would prove nothing.)
        eight = {"recipient-other-patient": f"[f8a-{self.tag}]",
                 "internal-note": f"[f8c-{self.tag}]"}
        eight_control = f"[f8-control-{self.tag}]"
        self.email(ep.raw_post(e[2], ep.raw_email(e[2], text="E's question")))
        e_mail = self.thread(e[0], "EMAILWRIT")
        if e_mail:
            # Half a second apart (email's slots are 0.1 s at 10/s): finding 8 alone, without
            # finding 1's quick-succession deferral.
            self.reply(e_mail, e[0], "for A " + eight["recipient-other-patient"],
                       recipient=f"Patient/{a[0]}")
            time.sleep(0.5)
            self.reply(e_mail, e[0], "note to a colleague " + eight["internal-note"],
                       recipient=f"Practitioner/{self.practitioner}")
            time.sleep(0.5)
            self.reply(e_mail, e[0], "a proper reply " + eight_control)
        # 9. One Message-ID from two senders.
        shared = ep.new_message_id("mailer.example")
        nine = (self.email(ep.raw_post(c[2], ep.raw_email(c[2], text="from C",
                                                          message_id=shared))),
                self.email(ep.raw_post(e[2], ep.raw_email(e[2], text="from E",
                                                          message_id=shared))))
        # 10. An Idempotency-Key reused with another body.
        key = f"key-{self.tag}"
        ten = (self.api({"resourceType": "Communication", "channel": "sms",
                         "recipient": [{"reference": f"Patient/{a[0]}"}],
                         "payload": [{"contentString": f"first [f10a-{self.tag}]"}]}, key),
               self.api({"resourceType": "Communication", "channel": "sms",
                         "recipient": [{"reference": f"Patient/{b[0]}"}],
                         "payload": [{"contentString": f"other [f10b-{self.tag}]"}]}, key))
        # 11. A signed unsubscribe naming a Communication that does not exist, for C.
        from tests.support import sign_email_events

        event = [{"email": c[2], "event": "unsubscribe", "timestamp": int(time.time()),
                  "sg_event_id": f"evt-{self.tag}", "sg_message_id": f"x{self.tag}.filter",
                  "communication_id": "does-not-exist"}]
        raw = json.dumps(event).encode()
        eleven = self.stack.http.post("/webhooks/sendgrid/events", content=raw,
                                      headers=sign_email_events(
                                          self.stack.providers.event_private_key, raw)
                                      ).status_code
        s.settle(30)  # the event's task runs before the send below is asked for
        eleven_answer: dict[str, Any] = {}
        eleven_send = self.api({"resourceType": "Communication", "channel": "email",
                                "recipient": [{"reference": f"Patient/{c[0]}"}],
                                "payload": [{"contentString": f"after [f11-{self.tag}]"}]},
                               answer=eleven_answer)
        # 13. A clinician answers D's email whose subject decodes to CR/LF + Bcc.
        if d_mail:
            time.sleep(1.0)  # after the send above has taken its email slot (as for 8)
            self.reply(d_mail, d[0], f"answer [f13-{self.tag}]")

        # Step 3: settle, then judge each class.
        s.settle(self.settle_timeout)
        time.sleep(2.0)  # a reply's Subscription delivery may still be on its way
        s.settle(self.settle_timeout / 3)

        if not (a_sms and b_sms):
            self.judge("1", "two replies within a second", "processed: all sent once, in "
                       "order", False, "no SMS thread was written for A or B")
        else:
            sends = [self.sent(t) for t in one]
            ok = all(len(x) == 1 for x in sends)
            order_ok = all([r["at"] for x in sends[a0:a1] for r in x] == sorted(
                r["at"] for x in sends[a0:a1] for r in x) for a0, a1 in ((0, 4), (4, 6)))
            self.judge("1", "4 replies within a second in one thread, 2 in another's",
                       "processed: each sent once, in order", ok and order_ok,
                       "sent " + "/".join(str(len(x)) for x in sends)
                       + ("" if order_ok else ", out of order"))
        self.judge("2", "'On ' x 12 KB from a patient", "processed: written once",
                   len(self.written(quote_mid)) == 1, self.email_fate(quote_mid, quote_status))
        self.judge("2", "'On ' x 12 KB from a stranger", "dead letter (unknown-sender)",
                   self.dead(stranger_mid) == ["unknown-sender"],
                   self.email_fate(stranger_mid, stranger_status))
        rows, reasons = self.written(parts_mid), self.dead(parts_mid)
        self.judge("3", "300 KB of one-line parts", "2xx, then processed (written once) "
                   "or dead letter with a reason", 200 <= parts_status < 300 and (
                       len(rows) == 1 or bool(reasons)), self.email_fate(parts_mid,
                                                                         parts_status))
        for name, mid, status in (("2 MB photo", photo_mid, photo_status),
                                  ("3 MB text", text_mid, text_status)):
            self.judge("4", name, "processed: written once, no dead letter",
                       len(self.written(mid)) == 1 and not self.dead(mid),
                       self.email_fate(mid, status))
        rows = self.written(hijack_mid)
        subject = ((self.header_of(rows[0]).get("subject") or {}).get("reference")
                   if rows else None)
        self.judge("5", "References naming another patient's conversation",
                   "processed: written in the sender's own thread", subject == f"Patient/{a[0]}",
                   f"HTTP {hijack_status}, thread of {subject}"
                   + ("" if b_mail else " (B's own email was never written)")
                   + (" (the other patient's)" if subject == f"Patient/{b[0]}" else ""))
        injected = [m for m in self.stack.sandbox.all("Communication", **{
            "part-of:missing": "false"}) if f"injected {self.tag}" in json.dumps(m)]
        self.judge("6", "signed post replayed with boundary=EVIL", "4xx, nothing written",
                   400 <= replay < 500 and not injected,
                   f"HTTP {replay}, {len(injected)} messages written from the injected parts")
        for name, (mid, status) in seven.items():
            rows, reasons = self.written(mid), self.dead(mid)
            self.judge("7", name, "no 5xx: 4xx with a reason, or processed, or dead letter "
                       "with a reason", status < 500 and (
                           400 <= status < 500 or len(rows) == 1 or bool(reasons)),
                       self.email_fate(mid, status))
        control = len(self.sent(eight_control))
        for name, needle in eight.items():
            out = self.sent(needle)
            self.judge("8", name, "never sent (ignored, or dead letter with a reason), while "
                       "a proper reply after it in the thread is sent once",
                       not out and control == 1,
                       f"sent {len(out)}x" + (f" to {out[0].get('to')!r}" if out else "")
                       + f", the proper reply {control}x"
                       + (" (inconclusive: nothing in that thread went out)"
                          if not out and not control else ""))
        rows = self.written(shared)
        senders = sorted({str((r.get("sender") or {}).get("reference")) for r in rows})
        self.judge("9", "one Message-ID from two senders", "processed: both written",
                   len(senders) == 2, f"HTTP {nine}, written {len(rows)}x "
                   f"from {len(senders)} sender(s)")
        wrong = self.sent(f"[f10b-{self.tag}]")
        self.judge("10", "Idempotency-Key reused with another body", "422",
                   ten[1] == 422, f"HTTP {ten}, second body sent {len(wrong)}x")
        after = self.sent(f"[f11-{self.tag}]")
        self.judge("11", "unsubscribe naming an unknown Communication",
                   "processed: no opt-out (a later email to that address is sent)",
                   len(after) == 1, f"HTTP {eleven}, then API {eleven_send}, "
                   f"sent {len(after)}x, request {self.request_state(eleven_answer)!r}")
        out = self.sent(f"[f13-{self.tag}]")
        subjects = [str(((r.get("json") or {}).get("personalizations") or [{}])[0].get(
            "subject") or (r.get("json") or {}).get("subject") or "") for r in out]
        clean = bool(out) and not any(ch in sub for sub in subjects for ch in "\r\n\x00")
        self.judge("13", "CR/LF in a decoded subject", "processed: the emailed reply's "
                   "subject has no control characters", clean,
                   f"inbound HTTP {crlf_status}, thread {'found' if d_mail else 'missing'}, "
                   f"reply sent {len(out)}x, subjects {[s[:40] for s in subjects]!r}")
        return self.results
