"""Scenario 12: a day in the clinic (issue #26), counted.

Realistic mixed traffic over `patients` patients for `seconds`, against the harness's real
parts (Redis, the FHIR sandbox in contention mode, the provider sandbox, gunicorn, Celery
workers, and the sandbox's own rest-hook Subscription delivery), at the service's default
pacing and unknown-sender policy (see `DEFAULTS_KEPT`):

- inbound SMS and MMS, signed as Twilio signs them;
- inbound email in both Inbound Parse modes, signed as SendGrid signs them: conversations
  with long quoted histories, some carrying 1-5 MB photos;
- clinicians' replies written straight into FHIR (the Subscription posts them to the
  receiver) in bursts of 2-5 within a second, into the patient's SMS or email thread;
- API sends (SMS) and pushes;
- Twilio status callbacks and SendGrid event batches about what was sent;
- the hostile emails of findings 2 (a quadratic quote-stripper input), 3 (thousands of
  one-line MIME parts, several at once) and 7 (broken charsets, 1,200 nested multiparts),
  from a sender who is no patient, mixed in after a baseline phase.

Counted: every inbound message written exactly once and in its thread; every reply sent
exactly once and in order within its thread; each send's delay beyond its pacing slot
(p50/p95/max, printed); dead letters, of which only the hostile inputs' may exist; and
responsiveness: the receiver's /healthz and webhook answers and the inbound messages'
time-to-FHIR after the hostile emails arrive, compared with the same measures before them in
the same run (a relative check: a loaded machine slows both).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import random
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import httpx

from tests.email_payloads import (
    HOSTILE_CHARSETS,
    nested_email,
    new_message_id,
    one_line_parts_email,
    parsed_post,
    photo,
    quadratic_quote_text,
    quoted_history,
    raw_charset_email,
    raw_email,
    raw_post,
)
from tests.reliability.harness import API_TOKEN, CLINIC, Counts, Stack
from tests.support import sign
from worker.fhir import subscription
from worker.settings import Settings
from worker.stores.email_posts import post_ref

SUBSCRIPTION_SECRET = "reliability-sub-secret"  # the harness's FHIR_SUBSCRIPTION_SECRET
# Settings the harness shortens for every scenario that this one puts back to the service's
# defaults: the send pacing (the point of finding 1) and the unknown-sender policy (the
# hostile emails come from strangers). Retries, timeouts and the inbox sweep stay as the
# harness sets them for every scenario.
DEFAULTS_KEPT = ("sms_rate_per_second", "email_rate_per_second", "push_rate_per_second",
                 "unknown_sender_policy")
HOSTILE_DOMAIN = "hostile.example"
PATIENT_DOMAIN = "clinic-day.example"
SMS_MEDIUM, EMAIL_MEDIUM = "SMSWRIT", "EMAILWRIT"
_REPLY = re.compile(r"\[(r-[0-9a-f]{8}-\d+)\]")
_NOTICE = re.compile(r"\[(n-[0-9a-f]{8})\]")


def default_overrides() -> dict[str, str]:
    """Environment overrides that put `DEFAULTS_KEPT` back to Settings' own defaults."""
    fields = Settings.model_fields
    return {name.upper(): str(fields[name].default) for name in DEFAULTS_KEPT}


@dataclass(frozen=True)
class DaySize:
    """How much of each kind of traffic one run makes."""

    seconds: float
    patients: int
    sms: int  # inbound SMS (every `mms_every`-th an MMS)
    mms_every: int
    emails: int  # inbound emails (every `photo_every`-th with a photo)
    photo_every: int
    photo_bytes: tuple[int, int]
    bursts: int  # clinician reply bursts of 2-5
    api_sms: int
    pushes: int
    quote_chars: int  # finding 2's "On " text
    parts_bytes: int  # finding 3's email size
    parts_parallel: int  # how many finding-3 emails at once
    canaries: int  # SMS posted right after each hostile email


FULL = DaySize(seconds=300, patients=50, sms=180, mms_every=6, emails=45, photo_every=3,
               photo_bytes=(1_000_000, 5_000_000), bursts=55, api_sms=30, pushes=20,
               quote_chars=32_000, parts_bytes=1_800_000, parts_parallel=3, canaries=6)
REDUCED = DaySize(seconds=30, patients=8, sms=16, mms_every=4, emails=6, photo_every=3,
                  photo_bytes=(1_100_000, 1_500_000), bursts=5, api_sms=4, pushes=3,
                  quote_chars=12_000, parts_bytes=300_000, parts_parallel=2, canaries=4)


@dataclass
class Posted:
    """One request the scenario made, with when and how it was answered."""

    kind: str  # sms, mms, email, email-photo, canary, hostile-*, api-sms, push, callback...
    key: str  # MessageSid / Message-ID / reply token / request id
    patient: int  # index, or -1
    at: float = 0.0
    answered: float = 0.0
    status: int = 0
    hostile: bool = False
    # An email's stored post (its dead letter names the post, whose bytes a refused sender's
    # large email does not keep).
    post_ref: str = ""

    def named_in(self, text: str) -> bool:
        """Whether a dead letter's text names this request."""
        return self.key in text or bool(self.post_ref and self.post_ref in text)

    @property
    def accepted(self) -> bool:
        """Answered 2xx."""
        return 200 <= self.status < 300


@dataclass
class Reply:
    """A clinician's reply written into FHIR (or an API send): what must go out once."""

    token: str
    patient: int
    channel: str  # sms / email / push
    thread: str  # header id ('' for API sends)
    order: int  # position in its thread
    asked: float  # when it was written (or the API accepted it)
    comm_id: str = ""


@dataclass
class DayReport:
    """Everything the scenario measured (the CI test asserts on it)."""

    inbound_accepted: int = 0
    inbound_written: int = 0
    inbound_duplicates: int = 0
    inbound_lost: int = 0
    inbound_wrong_thread: int = 0
    inbound_not_accepted: int = 0
    replies: int = 0
    replies_sent: int = 0
    replies_duplicates: int = 0
    replies_missing: int = 0
    replies_out_of_order: int = 0
    skipped_bursts: int = 0
    slot_delays: dict[str, list[float]] = field(default_factory=dict)
    inbound_delays_before: list[float] = field(default_factory=list)
    inbound_delays_after: list[float] = field(default_factory=list)
    email_delays: list[float] = field(default_factory=list)
    health_before: list[float] = field(default_factory=list)
    health_after: list[float] = field(default_factory=list)
    webhook_before: list[float] = field(default_factory=list)
    webhook_after: list[float] = field(default_factory=list)
    callbacks: int = 0
    callbacks_accepted: int = 0
    dead_letters: int = 0
    unexpected_dead_letters: list[str] = field(default_factory=list)
    hostile: list[str] = field(default_factory=list)  # one line per hostile input
    hostile_5xx: int = 0
    settled: bool = True
    problems: list[str] = field(default_factory=list)


def percentiles(values: list[float]) -> str:
    """p50/p95/max of `values`, as printed."""
    if not values:
        return "n/a"
    s = sorted(values)
    def at(q: float) -> float:
        return s[min(len(s) - 1, round(q * (len(s) - 1)))]
    return f"p50 {at(0.5):.2f}s p95 {at(0.95):.2f}s max {s[-1]:.2f}s (n={len(s)})"


def responsive(before: list[float], after: list[float], factor: float = 4.0,
               slack: float = 2.0) -> tuple[bool, str]:
    """True when the worst of `after` stays within `factor` times the worst of `before` (same
    run, same machine) plus `slack` seconds, so that noise on a tiny baseline does not count.
    Nothing measured on either side: nothing to compare (True)."""
    if not before or not after:
        return True, "not measured"
    bound = factor * max(before) + slack
    return max(after) <= bound, f"worst {max(after):.2f}s against a bound of {bound:.2f}s"


def _epoch(instant: str) -> float:
    return datetime.fromisoformat(instant.replace("Z", "+00:00")).timestamp()


class ClinicDay:
    """One run of the scenario on a Stack (use `run`)."""

    def __init__(self, stack: Stack, size: DaySize, seed: int = 26) -> None:
        self.stack = stack
        self.size = size
        self.rng = random.Random(seed)
        self.posted: list[Posted] = []
        self.replies: list[Reply] = []
        self.hostile_started: float | None = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.health: list[tuple[float, float]] = []
        self.report = DayReport()
        self.patients: list[dict[str, Any]] = []
        self.phones: list[str] = []
        self.emails: list[str] = []
        self.devices: dict[int, str] = {}
        self.conversations: dict[int, list[str]] = {}  # patient → Message-IDs so far
        self.threads: dict[tuple[int, str], str] = {}  # (patient, medium) → header id
        self.thread_order: Counter[str] = Counter()
        self.called_back: set[str] = set()
        self.practitioner = ""
        self.base = f"http://127.0.0.1:{stack.port}"

    # -- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Patients (phone + email; some with an app Device), a clinician, the Subscription."""
        s = self.stack
        s.reset()
        fhir = s.sandbox.fhir
        self.practitioner = str(fhir.create({
            "resourceType": "Practitioner", "name": [{"family": "Clinic", "given": ["Dr"]}]}
        ).resource["id"])
        tag = uuid.uuid4().hex[:6]
        for i in range(self.size.patients):
            number = f"+1555{3000000 + i:07d}"
            address = f"patient{i}-{tag}@{PATIENT_DOMAIN}"
            pat = fhir.create({"resourceType": "Patient", "name": [{"family": f"Day{i}"}],
                               "telecom": [{"system": "phone", "value": number,
                                            "use": "mobile"},
                                           {"system": "email", "value": address}]}).resource
            self.patients.append(pat)
            self.phones.append(number)
            self.emails.append(address)
            if i % 4 == 3:
                tok = f"fcmtok{uuid.uuid4().hex}:APA91b{uuid.uuid4().hex}"
                fhir.create({"resourceType": "Device", "status": "active",
                             "identifier": [{"system": s.settings.device_token_system,
                                             "value": tok}],
                             "patient": {"reference": f"Patient/{pat['id']}"}})
                self.devices[i] = tok
        subscription.install(fhir, self.base, SUBSCRIPTION_SECRET)

    # -- traffic ---------------------------------------------------------------------------------

    def _post(self, item: Posted, path: str, content: bytes, headers: dict[str, str],
              client: httpx.Client) -> None:
        item.at = time.time()
        try:
            item.status = client.post(path, content=content, headers=headers).status_code
        except httpx.HTTPError:
            item.status = 599
        item.answered = time.time()
        with self.lock:
            self.posted.append(item)

    def sms(self, i: int, client: httpx.Client, kind: str = "sms") -> None:
        """An inbound SMS (or MMS) from patient i."""
        sid = "SM" + uuid.uuid4().hex
        params = {"MessageSid": sid, "AccountSid": "ACtest", "From": self.phones[i],
                  "To": CLINIC, "Body": f"Message from patient {i}: can I come at {i % 12}?",
                  "NumMedia": "0"}
        if kind == "mms":
            params.update(NumMedia="1", MediaContentType0="image/jpeg", MediaUrl0=(
                f"https://api.twilio.com/2010-04-01/Accounts/ACtest/Messages/{sid}/Media/"
                f"ME{uuid.uuid4().hex}"))
        self._post(Posted(kind, sid, i), "/webhooks/twilio/sms", urlencode(params).encode(),
                   {"X-Twilio-Signature": sign(params),
                    "Content-Type": "application/x-www-form-urlencoded"}, client)

    def email(self, i: int, client: httpx.Client, with_photo: bool) -> None:
        """An inbound email from patient i in their conversation: the first opens it, later
        ones answer it, quoting the history."""
        with self.lock:
            earlier = list(self.conversations.setdefault(i, []))
        mid = new_message_id(PATIENT_DOMAIN)
        turns = len(earlier)
        text = (f"Hello from patient {i}." if not turns else
                f"Answer {turns} from patient {i}.\n\n" + quoted_history(4 + 6 * turns))
        files = []
        if with_photo:
            lo, hi = self.size.photo_bytes
            files = [(f"photo-{i}.jpg", "image/jpeg", photo(self.rng.randint(lo, hi), seed=i))]
        refs = earlier[:1] + earlier[-1:] if earlier else None
        replying = earlier[-1] if earlier else None
        if self.rng.random() < 0.5:
            post = raw_post(self.emails[i], raw_email(
                self.emails[i], subject="About my visit", text=text, message_id=mid,
                in_reply_to=replying, references=refs, attachments=files))
        else:
            post = parsed_post(self.emails[i], subject="About my visit", text=text,
                               message_id=mid, in_reply_to=replying, references=refs,
                               attachments=files)
        with self.lock:
            self.conversations[i].append(mid)
        self._signed_email(Posted("email-photo" if with_photo else "email", mid, i), post,
                           client)

    def _signed_email(self, item: Posted, post: tuple[str, bytes], client: httpx.Client) -> None:
        from tests.email_payloads import signed

        content_type, body = post
        item.post_ref = post_ref(body)
        self._post(item, "/webhooks/sendgrid/inbound", body, signed(content_type, body), client)

    def thread_of(self, i: int, medium: str) -> str:
        """The header of patient i's thread on `medium`, once inbound traffic made it ('')."""
        key = (i, medium)
        if key in self.threads:
            return self.threads[key]
        bundle = self.stack.sandbox.fhir.search("Communication", [
            ("subject", f"Patient/{self.patients[i]['id']}"), ("part-of:missing", "true"),
            ("_count", "50")])
        for entry in bundle.get("entry") or []:
            res = entry["resource"]
            codes = {c.get("code") for m in res.get("medium") or [] for c in m.get("coding") or []}
            if medium in codes:
                self.threads[key] = str(res["id"])
                return self.threads[key]
        return ""

    def burst(self, i: int, medium: str, count: int) -> None:
        """A clinician writes `count` replies into patient i's thread within a second."""
        header = ""
        for _ in range(10):  # the patient's first message may still be on its way
            header = self.thread_of(i, medium)
            if header:
                break
            time.sleep(0.5)
        if not header:
            with self.lock:
                self.report.skipped_bursts += 1
            return
        channel = "sms" if medium == SMS_MEDIUM else "email"
        for _ in range(count):
            with self.lock:
                order = self.thread_order[header]
                self.thread_order[header] += 1
            tag = f"r-{header[:8] if len(header) >= 8 else header.rjust(8, '0')}-{order}"
            # Logged in as the clinician: only what the clinic wrote (meta.author) is sent.
            comm = self.stack.sandbox.write_as(f"Practitioner/{self.practitioner}", {
                "resourceType": "Communication", "status": "in-progress",
                "partOf": [{"reference": f"Communication/{header}"}],
                "subject": {"reference": f"Patient/{self.patients[i]['id']}"},
                "recipient": [{"reference": f"Patient/{self.patients[i]['id']}"}],
                "sender": {"reference": f"Practitioner/{self.practitioner}"},
                "payload": [{"contentString": f"Please take the tablets twice a day [{tag}]"}],
            })
            with self.lock:
                self.replies.append(Reply(tag, i, channel, header, order, time.time(),
                                          str(comm["id"])))

    def api_send(self, i: int, client: httpx.Client, channel: str) -> None:
        """Another service asks for an SMS or a push through /v1/messages."""
        tag = f"n-{uuid.uuid4().hex[:8]}"
        body = {"resourceType": "Communication", "channel": channel,
                "recipient": [{"reference": f"Patient/{self.patients[i]['id']}"}],
                "sender": {"reference": f"Practitioner/{self.practitioner}"},
                "payload": [{"contentString": f"Your appointment is confirmed [{tag}]"}]}
        item = Posted("api-" + channel, tag, i)
        self._post(item, "/v1/messages", json.dumps(body).encode(),
                   {"Authorization": f"Bearer {API_TOKEN}",
                    "Content-Type": "application/json"}, client)
        if item.accepted:
            with self.lock:
                self.replies.append(Reply(tag, i, channel, "", 0, item.answered))

    def hostile(self, what: str, client: httpx.Client, n: int = 0) -> None:
        """One hostile email of findings 2, 3 or 7, from a stranger."""
        sender = f"stranger{n}@{HOSTILE_DOMAIN}"
        mid = new_message_id(HOSTILE_DOMAIN)
        if what == "quote":
            post = parsed_post(sender, text=quadratic_quote_text(self.size.quote_chars),
                               message_id=mid)
        elif what == "parts":
            post = raw_post(sender, one_line_parts_email(sender, self.size.parts_bytes, mid))
        elif what == "nested":
            post = raw_post(sender, nested_email(sender, 1200, mid))
        else:
            charset, body = HOSTILE_CHARSETS[what]
            post = raw_post(sender, raw_charset_email(sender, charset, body, mid))
        with self.lock:
            if self.hostile_started is None:
                self.hostile_started = time.time()
        self._signed_email(Posted("hostile-" + what, mid, -1, hostile=True), post, client)

    def callbacks(self, client: httpx.Client) -> None:
        """Status callbacks for every SMS sent (Twilio's; every fifth twice, as Twilio may),
        and event batches for every email sent (SendGrid's, through the provider sandbox)."""
        events_url = self.base + "/webhooks/sendgrid/events"
        for req in self.stack.providers.requests():
            sid = req.get("message_sid") or req.get("message_id")
            if not sid or req.get("answered") not in (201, 202):
                continue
            with self.lock:  # two rounds may overlap on the pool
                if sid in self.called_back:
                    continue
                self.called_back.add(sid)
            if req["provider"] == "twilio":
                for status in ("sent", "delivered", *(["delivered"] if len(self.called_back)
                                                      % 5 == 0 else [])):
                    params = {"MessageSid": sid, "SmsSid": sid, "AccountSid": "ACtest",
                              "From": CLINIC, "To": str(req.get("to") or ""),
                              "MessageStatus": status, "SmsStatus": status,
                              "ApiVersion": "2010-04-01"}
                    self._post(Posted("callback", sid, -1), "/webhooks/twilio/status",
                               urlencode(params).encode(),
                               {"X-Twilio-Signature": sign(params, "/webhooks/twilio/status"),
                                "Content-Type": "application/x-www-form-urlencoded"}, client)
            elif req["provider"] == "sendgrid":
                item = Posted("callback", sid, -1, at=time.time())
                try:
                    result = self.stack.providers.email_events(sid, "processed", "delivered",
                                                               url=events_url)
                    item.status = int(result.get("status") or 599)
                except httpx.HTTPError:
                    item.status = 599
                item.answered = time.time()
                with self.lock:
                    self.posted.append(item)

    def probe(self) -> None:
        """/healthz every half second, timed, until the run ends."""
        with httpx.Client(base_url=self.base, timeout=120) as client:
            while not self.stop.is_set():
                started = time.time()
                try:
                    client.get("/healthz")
                except httpx.HTTPError:
                    pass
                with self.lock:
                    self.health.append((started, time.time() - started))
                self.stop.wait(0.5)

    def schedule(self) -> list[tuple[float, str, Any]]:
        """(offset, action, argument), sorted: a first message from every patient early, then
        mixed traffic; the hostile emails after the first third, each followed by canaries."""
        z, rng, d = self.size, self.rng, self.size.seconds
        plan: list[tuple[float, str, Any]] = []
        # Every patient opens an SMS thread early; every other one an email thread too.
        for i in range(z.patients):
            plan.append((rng.uniform(0, 0.15 * d), "sms", i))
        for i in range(0, z.patients, 2):
            plan.append((rng.uniform(0, 0.15 * d), "email", (i, False)))
        for n in range(max(0, z.sms - z.patients)):
            kind = "mms" if n % z.mms_every == 0 else "sms"
            plan.append((rng.uniform(0.15 * d, d), kind, rng.randrange(z.patients)))
        for n in range(max(0, z.emails - (z.patients + 1) // 2)):
            i = rng.randrange(0, z.patients, 2)
            plan.append((rng.uniform(0.15 * d, d), "email", (i, n % z.photo_every == 0)))
        for _ in range(z.bursts):
            i = rng.randrange(z.patients)
            medium = EMAIL_MEDIUM if i % 2 == 0 and rng.random() < 0.4 else SMS_MEDIUM
            plan.append((rng.uniform(0.2 * d, 0.95 * d), "burst", (i, medium,
                                                                   rng.randint(2, 5))))
        for _ in range(z.api_sms):
            plan.append((rng.uniform(0.1 * d, d), "api-sms", rng.randrange(z.patients)))
        with_app = sorted(self.devices)
        for _ in range(z.pushes if with_app else 0):
            plan.append((rng.uniform(0.1 * d, d), "push", rng.choice(with_app)))
        hostile = ["quote", *["parts"] * z.parts_parallel, "nested", *HOSTILE_CHARSETS]
        start = 0.4 * d
        for n, what in enumerate(hostile):
            # The finding-3 emails go together (three at once stalled the receiver).
            at = start if what == "parts" else start + (n + 1) * 0.3 * d / len(hostile)
            plan.append((at, "hostile", (what, n)))
            for c in range(z.canaries):
                plan.append((at + 0.1 + 0.5 * c, "canary", rng.randrange(z.patients)))
        return sorted(plan, key=lambda p: p[0])

    def traffic(self) -> None:
        """Run the schedule in real time on a pool (slow answers never hold later requests)."""
        plan = self.schedule()
        t0 = time.time()
        limits = httpx.Limits(max_connections=64)
        with httpx.Client(base_url=self.base, timeout=120, limits=limits) as client, \
                cf.ThreadPoolExecutor(24) as pool:
            futures = []
            next_callbacks = 0.0
            for offset, action, arg in plan:
                while True:
                    now = time.time() - t0
                    if now >= next_callbacks:
                        futures.append(pool.submit(self.callbacks, client))
                        next_callbacks = now + 2.0
                    wait = offset - now
                    if wait <= 0:
                        break
                    time.sleep(min(wait, 0.5))
                futures.append(pool.submit(self._act, action, arg, client))
            for f in futures:
                f.result()

    def _act(self, action: str, arg: Any, client: httpx.Client) -> None:
        if action in ("sms", "mms"):
            self.sms(arg, client, action)
        elif action == "canary":
            self.sms(arg, client, "canary")
        elif action == "email":
            self.email(arg[0], client, arg[1])
        elif action == "burst":
            self.burst(*arg)
        elif action == "api-sms":
            self.api_send(arg, client, "sms")
        elif action == "push":
            self.api_send(arg, client, "push")
        elif action == "hostile":
            self.hostile(arg[0], client, arg[1])

    # -- counting --------------------------------------------------------------------------------

    def sent_tokens(self) -> dict[str, list[float]]:
        """Reply/notice token → provider request times (2xx answers only)."""
        out: dict[str, list[float]] = defaultdict(list)
        for req in self.stack.providers.requests():
            if req.get("answered") not in (200, 201, 202):
                continue
            text = json.dumps(req.get("form") or req.get("json") or {})
            for tok in {*_REPLY.findall(text), *_NOTICE.findall(text)}:
                out[tok].append(float(req["at"]))
        return out

    def pushes_sent(self) -> Counter[str]:
        """Device token → pushes FCM accepted."""
        return Counter(str(r.get("to")) for r in self.stack.providers.requests("fcm")
                       if r.get("answered") == 200)

    def _normal_inbound(self) -> list[Posted]:
        return [p for p in self.posted if p.kind in ("sms", "mms", "canary", "email",
                                                     "email-photo")]

    def done(self) -> bool:
        """Every accepted inbound message written or dead-lettered, every reply sent."""
        dead = self._dead_text()
        inbound = self._inbound_children()
        for p in self._normal_inbound():
            if p.accepted and p.key not in inbound and p.key not in dead:
                return False
        sent = self.sent_tokens()
        pushes = self.pushes_sent()
        for r in self.replies:
            if r.channel == "push":
                continue
            if r.token not in sent and r.token not in dead and not (
                    r.comm_id and r.comm_id in dead):  # ('' is in every text)
                return False
        want = Counter(self.devices[r.patient] for r in self.replies if r.channel == "push")
        return all(pushes[t] >= n for t, n in want.items())

    def _dead_text(self) -> str:
        """Every dead letter as one searchable text (long strings base64-decoded too, so a
        raw email's Message-ID is found inside it)."""
        return "\n".join(text for _, text in self.stack.dead_letter_texts())

    def _inbound_children(self) -> dict[str, list[dict[str, Any]]]:
        """Provider id (MessageSid / Message-ID) → inbound child Communications carrying it."""
        systems = {self.stack.settings.message_id_system}
        from worker.channels.sendgrid import EMAIL_INBOUND_MESSAGE_ID_SYSTEM

        systems.add(EMAIL_INBOUND_MESSAGE_ID_SYSTEM)
        bundle = self.stack.sandbox.fhir.search("Communication", [
            ("part-of:missing", "false"), ("_count", "20000")])
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for entry in bundle.get("entry") or []:
            res = entry["resource"]
            if not str((res.get("sender") or {}).get("reference", "")).startswith("Patient/"):
                continue
            for ident in res.get("identifier") or []:
                if ident.get("system") in systems:
                    out[str(ident["value"])].append(res)
        return out

    def count(self) -> None:
        """Fill the report from FHIR, the provider sandbox and the dead-letter store."""
        rep, s = self.report, self.stack
        children = self._inbound_children()
        headers = {str(e["resource"]["id"]): e["resource"] for e in (s.sandbox.fhir.search(
            "Communication", [("part-of:missing", "true"), ("_count", "5000")]).get("entry")
            or [])}
        texts = s.dead_letter_texts()  # each entry with its payload (and email post) as text
        entries = [e for e, _ in texts]
        dead_text = "\n".join(text for _, text in texts)
        # Inbound: once each, in its thread (one header per patient and medium / email
        # conversation, whose subject is that patient).
        thread_of: dict[tuple[int, str], set[str]] = defaultdict(set)
        first = self.hostile_started or float("inf")
        for p in self._normal_inbound():
            if not p.accepted:
                rep.inbound_not_accepted += 1
                continue
            rep.inbound_accepted += 1
            got = children.get(p.key, [])
            if not got:
                if p.key in dead_text:
                    rep.unexpected_dead_letters.append(f"{p.kind} {p.key[:12]}")
                else:
                    rep.inbound_lost += 1
                continue
            rep.inbound_written += 1
            rep.inbound_duplicates += len(got) - 1
            msg = got[0]
            parent = str((msg.get("partOf") or [{}])[0].get("reference", "")).split("/")[-1]
            header = headers.get(parent, {})
            owner = f"Patient/{self.patients[p.patient]['id']}"
            medium = "email" if p.kind.startswith("email") else "sms"
            thread_of[(p.patient, medium)].add(parent)
            if (header.get("subject") or {}).get("reference") != owner:
                rep.inbound_wrong_thread += 1
            written = _epoch(str((msg.get("meta") or {}).get("lastUpdated")))
            delay = max(0.0, written - p.at)
            if medium == "email":
                # An email's time depends on its size (a 5 MB photo is stored first): printed,
                # and left out of the before/after comparison, which SMS make like for like.
                rep.email_delays.append(delay)
            else:
                (rep.inbound_delays_before if p.at < first
                 else rep.inbound_delays_after).append(delay)
        # One conversation per patient and medium here (emails answer the patient's first).
        rep.inbound_wrong_thread += sum(len(h) - 1 for h in thread_of.values() if len(h) > 1)
        # Replies and API sends: once each, in order in their thread, delay beyond the slot.
        sent = self.sent_tokens()
        pushes = self.pushes_sent()
        rep.replies = len(self.replies)
        by_thread: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in self.replies:
            if r.channel == "push":
                continue
            times = sent.get(r.token, [])
            if not times:
                if (r.comm_id and r.comm_id in dead_text) or r.token in dead_text:
                    rep.unexpected_dead_letters.append(f"{r.channel} reply {r.token}")
                else:
                    rep.replies_missing += 1
                continue
            rep.replies_sent += 1
            rep.replies_duplicates += len(times) - 1
            if r.thread:
                by_thread[r.thread].append((r.order, min(times)))
        for sends in by_thread.values():
            in_time = [o for o, _ in sorted(sends, key=lambda x: x[1])]
            rep.replies_out_of_order += sum(1 for a, b in itertools.pairwise(in_time)
                                            if a > b)
        want = Counter(self.devices[r.patient] for r in self.replies if r.channel == "push")
        for tok, n in want.items():
            got_n = pushes.get(tok, 0)
            rep.replies_sent += min(n, got_n)
            rep.replies_missing += max(0, n - got_n)
            rep.replies_duplicates += max(0, got_n - n)
        rep.slot_delays = self.slot_delays(sent)
        # Dead letters: only the hostile inputs may have any.
        rep.dead_letters = len(entries)
        hostile = {p.key: p for p in self.posted if p.hostile}
        for e, text in texts:
            if HOSTILE_DOMAIN in text or any(p.named_in(text) for p in hostile.values()):
                continue
            if not any(u.split(" ")[-1] in text for u in rep.unexpected_dead_letters):
                rep.unexpected_dead_letters.append(f"{e.task}:{e.reason}")
        for p in sorted(hostile.values(), key=lambda p: p.at):
            fate = "written" if p.key in children else \
                "dead-lettered" if p.named_in(dead_text) else "neither"
            reasons = sorted({e.reason for e, text in texts if p.named_in(text)})
            rep.hostile.append(f"{p.kind}: HTTP {p.status} after {p.answered - p.at:.1f}s, "
                               f"{fate}{' (' + ', '.join(reasons) + ')' if reasons else ''}")
            rep.hostile_5xx += int(p.status >= 500)
        # Responsiveness, before and after the first hostile email.
        for started, took in self.health:
            (rep.health_before if started < first else rep.health_after).append(took)
        for p in self.posted:
            if p.kind in ("sms", "mms", "canary") and p.status:
                (rep.webhook_before if p.at < first else rep.webhook_after).append(
                    p.answered - p.at)
        callbacks = [p for p in self.posted if p.kind == "callback"]
        rep.callbacks = len(callbacks)
        rep.callbacks_accepted = sum(1 for p in callbacks if p.accepted)

    def slot_delays(self, sent: dict[str, list[float]]) -> dict[str, list[float]]:
        """Per channel: each send's first provider request minus its pacing slot. The slots
        are the schedule a perfect pacer would keep at the configured rate (one sender per
        channel, burst 1): slot = max(asked, previous slot + 1/rate), in the order asked."""
        rates = {"sms": self.stack.settings.sms_rate_per_second,
                 "email": self.stack.settings.email_rate_per_second}
        out: dict[str, list[float]] = {}
        for channel, rate in rates.items():
            slot = float("-inf")
            delays = []
            for r in sorted((r for r in self.replies if r.channel == channel),
                            key=lambda r: r.asked):
                slot = max(r.asked, slot + 1.0 / rate)
                if sent.get(r.token):
                    delays.append(max(0.0, min(sent[r.token]) - slot))
            out[channel] = delays
        return out

    # -- the run ---------------------------------------------------------------------------------

    def run(self, settle_timeout: float) -> DayReport:
        """Set up, run the traffic, wait for it to settle, count."""
        self.setup()
        prober = threading.Thread(target=self.probe, daemon=True)
        prober.start()
        try:
            self.traffic()
            with httpx.Client(base_url=self.base, timeout=120) as client:
                deadline = time.monotonic() + settle_timeout
                settled = False
                while time.monotonic() < deadline:
                    self.callbacks(client)
                    if self.stack.queues_idle() and self.done():
                        settled = True
                        break
                    time.sleep(1.0)
                self.callbacks(client)
                self.report.settled = settled
        finally:
            self.stop.set()
            prober.join(130)
        time.sleep(1.0)  # the last callbacks' tasks
        self.stack.settle(30)
        self.count()
        self.judge()
        return self.report

    def judge(self) -> None:
        """What failed, in words (empty: every guarantee held)."""
        rep = self.report
        p = rep.problems
        if not rep.settled:
            p.append("did not settle: messages still unwritten or unsent at the deadline")
        for name in ("inbound_lost", "inbound_duplicates", "inbound_wrong_thread",
                     "inbound_not_accepted", "replies_missing", "replies_duplicates",
                     "replies_out_of_order", "skipped_bursts", "hostile_5xx"):
            if getattr(rep, name):
                p.append(f"{name.replace('_', ' ')}: {getattr(rep, name)}")
        if rep.unexpected_dead_letters:
            p.append("unexpected dead letters: " + ", ".join(
                sorted(set(rep.unexpected_dead_letters))[:8]))
        if rep.callbacks_accepted != rep.callbacks:
            p.append(f"callbacks refused: {rep.callbacks - rep.callbacks_accepted}")
        for what, before, after in (
                ("receiver /healthz", rep.health_before, rep.health_after),
                ("receiver SMS webhook answers", rep.webhook_before, rep.webhook_after),
                ("inbound SMS time to FHIR", rep.inbound_delays_before,
                 rep.inbound_delays_after)):
            ok, detail = responsive(before, after)
            if not ok:
                p.append(f"{what} slowed by the hostile emails: {detail}")

    def counts(self) -> Counts:
        """The row `make reliability` prints, with the details as notes."""
        rep = self.report
        c = Counts("12 clinic day")
        c.sent = len(self.posted) + sum(1 for r in self.replies if r.thread)
        c.accepted = sum(1 for p in self.posted if p.accepted) + sum(
            1 for r in self.replies if r.thread)
        c.written = rep.inbound_written + rep.replies_sent
        c.duplicates = rep.inbound_duplicates + rep.replies_duplicates
        c.lost = rep.inbound_lost + rep.replies_missing
        c.dead_lettered = rep.dead_letters
        c.seconds = 0.0
        c.notes += [
            f"inbound: {rep.inbound_accepted} accepted, {rep.inbound_written} written, "
            f"{rep.inbound_duplicates} twice, {rep.inbound_lost} lost, "
            f"{rep.inbound_wrong_thread} in a wrong thread, {rep.inbound_not_accepted} "
            "refused",
            f"replies and API sends: {rep.replies} asked, {rep.replies_sent} sent, "
            f"{rep.replies_duplicates} twice, {rep.replies_missing} missing, "
            f"{rep.replies_out_of_order} out of order, {rep.skipped_bursts} bursts skipped "
            "(no thread yet)",
            *(f"{ch} delay beyond its pacing slot: {percentiles(v)}"
              for ch, v in rep.slot_delays.items()),
            f"inbound SMS/MMS time to FHIR before the hostile emails: "
            f"{percentiles(rep.inbound_delays_before)}; after: "
            f"{percentiles(rep.inbound_delays_after)}",
            f"inbound email time to FHIR: {percentiles(rep.email_delays)}",
            f"/healthz before: {percentiles(rep.health_before)}; after: "
            f"{percentiles(rep.health_after)}",
            f"SMS webhook answers before: {percentiles(rep.webhook_before)}; after: "
            f"{percentiles(rep.webhook_after)}",
            f"callbacks and event batches: {rep.callbacks_accepted}/{rep.callbacks} accepted",
            f"dead letters: {rep.dead_letters} ({len(rep.unexpected_dead_letters)} "
            "not from a hostile input)",
            *(f"hostile {line}" for line in rep.hostile),
            *(f"PROBLEM: {line}" for line in rep.problems),
        ]
        c.problems = list(rep.problems)
        return c


def clinic_day(stack: Stack, size: DaySize = FULL, settle_timeout: float | None = None
               ) -> tuple[Counts, DayReport]:
    """12. Run the day on `stack` (started with `default_overrides()`); the printed row and the
    full report."""
    started = time.monotonic()
    day = ClinicDay(stack, size)
    report = day.run(settle_timeout if settle_timeout is not None
                     else 120 + size.seconds / 2)
    counts = day.counts()
    counts.seconds = time.monotonic() - started
    return counts, report
