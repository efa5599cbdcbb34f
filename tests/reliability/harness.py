"""A whole Switchboard on loopback for fault scenarios: its own redis-server (AOF, always
fsync), FHIR sandbox, provider sandbox, gunicorn receiver and Celery workers that can be killed
and restarted. Every request goes to 127.0.0.1 and every loop is bounded."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import random
import re
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import redis

from tests.email_payloads import VERIFICATION_KEY, signed
from tests.support import (
    AUTH_TOKEN,
    DATA_KEY,
    PUBLIC_BASE_URL,
    ProviderSandbox,
    Sandbox,
    metric,
    sign,
    worker_metrics,
)
from worker.channels.sendgrid import EMAIL_INBOUND_MESSAGE_ID_SYSTEM
from worker.ops import devstack
from worker.settings import Settings, load_settings
from worker.stores.dead_letters import DeadLetterStore
from worker.stores.email_posts import EmailPosts

API_TOKEN = "reliability-api-token"
CONVERSATIONS_IDENTITY = "clinic-desk"
CLINIC = "+15557654321"
WHATSAPP_TEMPLATE = "HX" + "a" * 32
FHIR_ID, FHIR_SECRET = "reliability", "reliability-secret"


@dataclass
class Counts:
    """What one scenario measured (the table `make reliability` prints)."""

    scenario: str
    sent: int = 0  # requests made (webhooks posted, sends asked for)
    accepted: int = 0  # answered 2xx
    written: int = 0  # distinct messages that reached FHIR / the provider
    duplicates: int = 0  # extra rows or extra provider sends
    lost: int = 0  # accepted but neither written nor dead-lettered
    dead_lettered: int = 0
    conflicts: int = 0  # FHIR serialization conflicts (409 40001) the service met
    seconds: float = 0.0
    seconds_to_recover: float | None = None  # from the fault's end (or a promotion) to whole
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # other guarantees that failed, in words

    def ok(self) -> bool:
        """The guarantees: nothing lost, nothing twice (and no other problem counted)."""
        return self.lost == 0 and self.duplicates == 0 and not self.problems


class Stack:
    """Start, fault and inspect a private deployment."""

    def __init__(self, log_dir: Path | None = None, workers: int = 2, **overrides: str) -> None:
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="switchboard-reliability-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis = devstack.start_redis(self.log_dir, data_dir=self.log_dir / "redis")
        self.start_sandboxes()
        self.env = self.app_env({"REDIS_URL": self.redis.url}, overrides)
        self.settings: Settings = load_settings(self.env)
        self.sandbox = Sandbox(self.fhir_server.origin, self.settings)
        self.port = devstack.free_port()
        self.web = devstack.start_web(self.env, self.log_dir, self.port, workers=2)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60,
                                 limits=httpx.Limits(max_connections=32))
        self.workers = [self.start_worker(n) for n in range(workers)]
        self.beat = devstack.start_beat(self.env, self.log_dir)
        # Flower watches the whole run: scenario 10 reads its task pages for PHI.
        self.flower_auth = ("admin", uuid.uuid4().hex)
        self.flower_origin = f"http://127.0.0.1:{devstack.free_port()}"
        self.flower = devstack.start_flower(self.env, self.log_dir,
                                            int(self.flower_origin.rsplit(":", 1)[1]),
                                            ":".join(self.flower_auth))
        self.start_supervisor()
        self._r = redis.Redis.from_url(self.redis.url)

    # -- parts shared with the multi-host stack (multihost.py) ----------------------------------

    def start_sandboxes(self, host: str = "127.0.0.1") -> None:
        """The FHIR sandbox and the provider sandbox, listening on `host`."""
        # Contention mode throughout, as on Medplum with PostgreSQL: overlapping conditional
        # writes abort with 409 40001 once the server's own retry is spent.
        self.fhir_server = devstack.start_fhir_sandbox(self.log_dir, extra_env={
            "FHIR_SANDBOX_CLIENT_ID": FHIR_ID, "FHIR_SANDBOX_CLIENT_SECRET": FHIR_SECRET},
            contention_rate=1.0, host=host)
        self.event_keys = devstack.sendgrid_event_keys()
        self.providers_child, self.provider_origin = devstack.start_provider_sandbox(
            self.log_dir, ["--twilio-account-sid", "ACtest", "--twilio-auth-token", AUTH_TOKEN,
                           "--sendgrid-api-key", "SG.reliability", "--host", host],
            env={"PROVIDER_SANDBOX_SENDGRID_EVENT_KEY": self.event_keys[0]})
        self.providers = ProviderSandbox(self.provider_origin, event_keys=self.event_keys)

    def app_env(self, redis_env: dict[str, str], overrides: dict[str, str]) -> dict[str, str]:
        """The service's environment: `redis_env` says where Redis is, `overrides` win."""
        origin, event_keys = self.provider_origin, self.event_keys
        # Push goes to the provider sandbox's FCM stand-in, with a service account whose
        # token_uri is the sandbox (scenario 12 sends pushes).
        account = devstack.write_sandbox_service_account(self.log_dir / "fcm-account.json",
                                                         origin)
        return {
            **redis_env, "FHIR_BASE_URL": self.fhir_server.base_url,
            "FHIR_CLIENT_ID": FHIR_ID, "FHIR_CLIENT_SECRET": FHIR_SECRET,
            "TWILIO_ACCOUNT_SID": "ACtest", "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "DATA_ENCRYPTION_KEYS": DATA_KEY, "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
            "TWILIO_API_BASE_URL": origin,
            "TWILIO_FROM_NUMBER": CLINIC, "SENDGRID_API_KEY": "SG.reliability",
            "TWILIO_WHATSAPP_FROM": "whatsapp:" + CLINIC, "WHATSAPP_RATE_PER_SECOND": "1000",
            "WHATSAPP_TEMPLATE_CONTENT_SID": WHATSAPP_TEMPLATE,
            "SENDGRID_FROM_EMAIL": "care@clinic.example", "SENDGRID_API_BASE_URL": origin,
            "SENDGRID_EVENT_VERIFICATION_KEY": event_keys[1], "API_TOKENS": API_TOKEN,
            "FHIR_SUBSCRIPTION_SECRET": "reliability-sub-secret",
            "SMS_RATE_PER_SECOND": "1000",
            "EMAIL_RATE_PER_SECOND": "1000", "UNKNOWN_SENDER_POLICY": "create-patient",
            # Retries within seconds and enough attempts to outlast every injected outage. A
            # dead worker's messages come back at the default settings (the liveness janitor,
            # not a shrunk visibility timeout); only the inbox sweep, which covers a Redis
            # crash between kombu's pop and its unacked record, runs at test speed.
            "RETRY_BACKOFF_BASE_SECONDS": "0.3", "RETRY_BACKOFF_MAX_SECONDS": "3",
            "RETRY_MAX_ATTEMPTS": "40", "FHIR_TIMEOUT_SECONDS": "3", "SEND_CLAIM_SECONDS": "30",
            "THREAD_LOCK_TIMEOUT_SECONDS": "15", "INBOX_STALE_SECONDS": "15",
            "INBOX_SWEEP_INTERVAL_SECONDS": "3", "RECONCILE_INTERVAL_SECONDS": "3600",
            "SENDGRID_INBOUND_VERIFICATION_KEY": VERIFICATION_KEY,
            "FCM_CREDENTIALS_FILE": str(account), "FCM_API_BASE_URL": origin,
            "TWILIO_CONVERSATIONS_IDENTITY": CONVERSATIONS_IDENTITY,
            # The receiver's disk spool (docs/spool.md) in this run's directory: webhooks that
            # arrive while Redis is down are answered 2xx and published when it is back.
            "DATA_DIR": str(self.log_dir),
            **overrides,
        }

    # -- processes ------------------------------------------------------------------------------

    def start_worker(self, n: int) -> devstack.Child:
        """A worker process (threads pool, 16 threads)."""
        name = f"worker-{n}-{uuid.uuid4().hex[:6]}"
        return devstack.start_worker(self.env, self.log_dir, name=name, concurrency=16)

    def kill_worker(self, index: int) -> None:
        """SIGKILL one worker and start a replacement in its place."""
        with self._lock:
            self.workers[index].kill()
            self.workers[index] = self.start_worker(index)

    def start_supervisor(self) -> None:
        """Like compose's `restart: unless-stopped` or a Procfile runner: a worker that exits
        is started again. (Celery exits with "Unrecoverable error" after some broker
        reconnects, an upstream bug, celery#8030 / #10205; deployments must supervise
        workers.)"""
        self.restarts = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            with self._lock:
                for i, w in enumerate(self.workers):
                    if w.proc.poll() is not None and not self._stopping.is_set():
                        try:
                            self.workers[i] = self.start_worker(i)
                        except devstack.StartError:
                            continue  # its broker is unreachable (a partition): next tick
                        self.restarts += 1

    def stop(self) -> None:
        """Stop everything."""
        self._stopping.set()
        self._supervisor.join(5)
        self.http.close()
        for w in self.workers:
            w.stop()
        self.beat.stop()
        self.flower.stop()
        self.web.stop()
        self.providers.close()
        self.providers_child.stop()
        self.sandbox.close()
        self.fhir_server.stop()
        self.redis.stop()

    def reset(self) -> None:
        """Empty FHIR, the provider record and the dead-letter store between scenarios."""
        self.sandbox.reset()
        self.providers.reset()
        DeadLetterStore(self._r, self.settings.sealer()).purge()

    # -- traffic --------------------------------------------------------------------------------

    def post_sms(self, params: dict[str, str]) -> int:
        """POST a signed Twilio SMS webhook to gunicorn; the HTTP status (599: no answer)."""
        headers = {"X-Twilio-Signature": sign(params),
                   "Content-Type": "application/x-www-form-urlencoded"}
        try:
            return self.http.post("/webhooks/twilio/sms", content=urlencode(params),
                                  headers=headers).status_code
        except httpx.HTTPError:
            return 599

    def post_email(self, email: tuple[str, bytes]) -> int:
        """POST a signed Inbound Parse email to gunicorn; the HTTP status (599: no answer)."""
        content_type, body = email
        try:
            return self.http.post("/webhooks/sendgrid/inbound", content=body,
                                  headers=signed(content_type, body)).status_code
        except httpx.HTTPError:
            return 599

    def post_conversations(self, webhook: dict[str, Any]) -> int:
        """POST a Conversations webhook as the provider sandbox signed it (over
        PUBLIC_BASE_URL) to gunicorn; the HTTP status (599: no answer)."""
        headers = {"X-Twilio-Signature": webhook["signature"],
                   "Content-Type": "application/x-www-form-urlencoded"}
        try:
            return self.http.post("/webhooks/twilio/conversations",
                                  content=urlencode(webhook["params"]),
                                  headers=headers).status_code
        except httpx.HTTPError:
            return 599

    def emails_written(self) -> Counter[str]:
        """Message-ID → number of inbound email Communications with it."""
        system = EMAIL_INBOUND_MESSAGE_ID_SYSTEM
        bundle = self.sandbox.fhir.search("Communication", [
            ("identifier", f"{system}|"), ("_count", "10000")])
        counts: Counter[str] = Counter()
        for entry in bundle.get("entry") or []:
            for ident in entry["resource"].get("identifier") or []:
                if ident.get("system") == system:
                    counts[str(ident["value"])] += 1
        return counts

    def send(self, communication_id: str) -> tuple[int, str]:
        """Ask the API to send a Communication; (status, request id)."""
        try:
            resp = self.http.post("/v1/messages", json={
                "communication": f"Communication/{communication_id}"},
                headers={"Authorization": f"Bearer {API_TOKEN}"})
        except httpx.HTTPError:
            return 599, ""
        return resp.status_code, str((resp.json() or {}).get("id", ""))

    def send_on(self, communication_id: str, channel: str) -> tuple[int, str]:
        """Ask the API to send a Communication on `channel`; (status, request id)."""
        try:
            resp = self.http.post("/v1/messages", json={
                "communication": f"Communication/{communication_id}", "channel": channel},
                headers={"Authorization": f"Bearer {API_TOKEN}"})
        except httpx.HTTPError:
            return 599, ""
        return resp.status_code, str((resp.json() or {}).get("id", ""))

    def parallel(self, fn: Any, items: list[Any], threads: int = 16) -> list[Any]:
        """Run fn over items on a thread pool, keeping order."""
        with cf.ThreadPoolExecutor(threads) as pool:
            return list(pool.map(fn, items))

    # -- what happened --------------------------------------------------------------------------

    def inbound_written(self) -> Counter[str]:
        """MessageSid → number of inbound child Communications (sender: a Patient) with it."""
        system = self.settings.message_id_system
        bundle = self.sandbox.fhir.search("Communication", [
            ("identifier", f"{system}|"), ("part-of:missing", "false"), ("_count", "10000")])
        counts: Counter[str] = Counter()
        for entry in bundle.get("entry") or []:
            resource = entry["resource"]
            if not str((resource.get("sender") or {}).get("reference", "")).startswith(
                    "Patient/"):
                continue  # an outbound message carrying its Twilio SID
            for ident in resource.get("identifier") or []:
                if ident.get("system") == system:
                    counts[str(ident["value"])] += 1
        return counts

    def worker_metrics(self) -> str:
        """The running workers' Prometheus pages (a restarted worker counts from zero; one
        still starting after a kill is left out: the figures are notes, not guarantees)."""
        pages = []
        for w in list(self.workers):
            try:
                pages.append(worker_metrics(w.metrics_port))
            except httpx.HTTPError:
                continue
        return "\n".join(pages)

    def contention_events(self) -> Counter[str]:
        """The workers' contention counters so far (conflict, retried, gave-up, throttled) and
        task retries for `fhir-conflict` (as `task-retry`), scraped from every worker."""
        text = self.worker_metrics()
        events: Counter[str] = Counter()
        for event in ("conflict", "retried", "gave-up", "throttled"):
            events[event] = int(metric(text, "switchboard_fhir_contention_total", event=event))
        events["task-retry"] = int(metric(text, "switchboard_task_retries_total",
                                          reason="fhir-conflict"))
        return events

    def dead_letters(self) -> list[Any]:
        """Every dead-letter entry."""
        return DeadLetterStore(self._r, self.settings.sealer()).list(limit=100000)

    def dead_letter_texts(self) -> list[tuple[Any, str]]:
        """Every dead-letter entry with its payload as one searchable text: long base64
        strings decoded, and an inbound email's post read back from the store it waits in (the
        receiver keeps an email's bytes there and queues only a reference to them)."""
        posts = EmailPosts.from_settings(self._r, self.settings)
        out = []
        for e in self.dead_letters():
            text = json.dumps([e.args, e.kwargs], default=str)
            blobs = [text]
            for b in re.findall(r'"([A-Za-z0-9+/=]{200,})"', text):
                try:
                    blobs.append(base64.b64decode(b).decode("utf-8", "replace"))
                except ValueError:
                    pass
            for ref in re.findall(r'"email_ref": "(email-[0-9a-f]{16})"', text):
                post = posts.get(ref)
                if post:
                    blobs.append(post.decode("utf-8", "replace"))
            out.append((e, "\n".join(blobs)))
        return out

    def queues_idle(self) -> bool:
        """No message waiting, in flight, or accepted and unfinished (the inbox)."""
        pipe = self._r.pipeline()
        for q in ("inbound", "outbound", "status"):
            pipe.llen(q)
        pipe.hlen("unacked")
        pipe.zcard("switchboard:inbox:index")  # accepted, not yet finished
        return sum(int(n) for n in pipe.execute()) == 0

    def settle(self, timeout: float, check: Any = None) -> bool:
        """Wait until queues are idle (and `check()` holds) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queues_idle() and (check is None or check()):
                time.sleep(0.5)
                if self.queues_idle():
                    return True
            time.sleep(0.25)
        return False


def sms(sender: str, body: str) -> dict[str, str]:
    """A fresh inbound SMS from `sender`."""
    return {"MessageSid": "SM" + uuid.uuid4().hex, "AccountSid": "ACtest", "From": sender,
            "To": CLINIC, "Body": body, "NumMedia": "0"}


def whatsapp(sender: str, body: str, profile_name: str) -> dict[str, str]:
    """A fresh inbound WhatsApp message from `sender` (its display name is PHI too)."""
    return {**sms("whatsapp:" + sender, body), "To": "whatsapp:" + CLINIC,
            "WaId": sender.lstrip("+"), "ProfileName": profile_name, "MessageType": "text"}


def profile_name(n: int) -> str:
    """Distinct WhatsApp display names (searched for in logs and at rest)."""
    return f"Zelda{n} Quartermain"


def email_address(n: int) -> str:
    """Distinct test email addresses."""
    return f"patient{n}@reliability.example"


def phone(n: int) -> str:
    """Distinct test numbers in the 555 range."""
    return f"+1555{2000000 + n:07d}"


def shuffled(items: list[Any], seed: int = 7) -> list[Any]:
    """A deterministic shuffle."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
