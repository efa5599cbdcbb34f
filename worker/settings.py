"""Typed settings: the only reader of the environment (docs/design.md, habit 8)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.channels.phones import DEFAULT_REGION, valid_region
from worker.crypto import Sealer, parse_keys, sealer_for

ThreadStrategy = Literal["conversation", "active-thread", "new-thread"]
UnknownSenderPolicy = Literal["reject", "create-patient"]
# A Sentinel address: a host name or IPv4 address, or a bracketed IPv6 address, and a port.
_HOST_PORT = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?"
                        r"|\[[0-9A-Fa-f:.]{2,45}\]):[0-9]{1,5}")
# What Sentinel accepts as a master name in practice (it is also a key in its own config file).
_MASTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
CHANNELS = ("sms", "email", "push", "whatsapp")
# Shapes of the WhatsApp settings: (pattern, what it says when it does not match).
_WHATSAPP_SHAPES = {
    "twilio_whatsapp_from": (r"whatsapp:\+[1-9][0-9]{6,14}",
                             "whatsapp:+E164 (e.g. whatsapp:+14155238886)"),
    "whatsapp_template_content_sid": (r"HX[0-9a-f]{32}",
                                      "a Twilio Content SID (HX + 32 hex digits)"),
}

# What to tell an operator for each setting that is missing or wrong.
_HINTS: dict[str, str] = {
    "REDIS_URL": "set it to the broker, e.g. redis://127.0.0.1:6379/0",
    "REDIS_SENTINELS": "comma-separated host:port of the Sentinels, e.g. "
                       "10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379",
    "REDIS_SENTINEL_MASTER": "the name in `sentinel monitor <name> ...`, e.g. switchboard",
    "FHIR_BASE_URL": "set it to the FHIR base, e.g. https://api.medplum.com/fhir/R4/",
    "FHIR_CLIENT_ID": "set it to the Medplum ClientApplication id (client credentials)",
    "FHIR_CLIENT_SECRET": "set it to the Medplum ClientApplication secret",
    "FHIR_TOKEN_URL": "leave unset for <base origin>/oauth2/token, or give the full token URL",
    "TWILIO_ACCOUNT_SID": "set it to your Twilio Account SID (starts with AC)",
    "TWILIO_AUTH_TOKEN": "set it to your Twilio auth token (used to verify webhook signatures)",
    "PUBLIC_BASE_URL": "set it to the public https URL Twilio calls, e.g. https://sb.example.org",
    "SMS_THREAD_STRATEGY": "one of: conversation, active-thread, new-thread",
    "UNKNOWN_SENDER_POLICY": "one of: reject, create-patient",
    "EMAIL_THREAD_STRATEGY": "one of: conversation, active-thread, new-thread",
    "SENDGRID_INBOUND_VERIFICATION_KEY": "the base64 public key SendGrid shows for the "
    "Inbound Parse security policy, without PEM armour",
    "SENDGRID_INBOUND_BASIC_AUTH": "user:password, as embedded in the Inbound Parse URL",
    "PHONE_DEFAULT_REGION": "a two-letter country code such as US, GB or AU",
    "DATA_ENCRYPTION_KEYS": "comma-separated keys, the first seals; make one with "
                            "`switchboard keys generate`",
}


class ConfigError(Exception):
    """The environment does not describe a runnable service; str() lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class Settings(BaseSettings):
    """Everything Switchboard reads from its environment, validated at start-up."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True,
                                      use_attribute_docstrings=True)

    redis_url: str
    """Broker and dead-letter store, `redis://host:6379/0`"""
    fhir_base_url: str
    """e.g. `https://api.medplum.com/fhir/R4/`"""
    # Redis behind Sentinel (docs/redis-ha.md). With REDIS_SENTINELS set, every Redis client
    # and the broker ask the Sentinels for the current primary of REDIS_SENTINEL_MASTER and
    # follow it through a failover; REDIS_URL then gives only the database, credentials and
    # TLS (rediss://) of the data nodes, its host and port are not used.
    redis_sentinels: str = ""
    """Redis Sentinels, comma-separated `host:port` (e.g. `s1:26379,s2:26379,s3:26379`); empty:
    Redis is REDIS_URL alone. Set, REDIS_URL gives only the database, password and TLS of the
    data nodes (a `redis://` URL; docs/redis-ha.md)"""
    redis_sentinel_master: str = ""
    """the master name the Sentinels monitor (`sentinel monitor <name> …`); required with
    REDIS_SENTINELS"""
    redis_sentinel_password: SecretStr = SecretStr("")
    """the Sentinels' own password (`requirepass` in sentinel.conf), when they have one; the
    data nodes' password goes in REDIS_URL"""
    # Asynchronous replication loses the writes a dead primary had not passed on. With N > 0
    # the receiver answers 2xx only once N replicas hold the accepted message (WAIT).
    redis_min_replicas_ack: int = Field(default=0, ge=0, le=16)
    """replicas that must hold an accepted message before the receiver answers 2xx (Redis
    `WAIT`; 0: the primary alone). Not met in time: the answer is that of Redis being
    unavailable (docs/redis-ha.md)"""
    fhir_client_id: str = Field(min_length=1)
    """Medplum ClientApplication id (OAuth2 client credentials)"""
    fhir_client_secret: SecretStr
    """Medplum ClientApplication secret"""
    fhir_token_url: str = ""
    """OAuth2 token endpoint. Default when empty: base origin + `/oauth2/token`."""
    fhir_timeout_seconds: float = Field(default=10.0, gt=0)
    """the deadline of each whole FHIR request (connect, send, answer)"""
    # Under contention Medplum aborts overlapping conditional writes (409, SQLSTATE 40001) and
    # gets slower the more are in flight. The cluster keeps in flight the number of FHIR writes
    # that measured the best write rate (worker/fhir/contention.py), at most this ceiling, in a
    # budget shared through Redis (worker/fhir/budget.py), and retries a conflict this many
    # times, milliseconds apart, before the task's own retry.
    fhir_max_writes_in_flight: int = Field(default=16, ge=1, le=1024)
    """most FHIR writes in flight: the ceiling of the limit Switchboard finds by measuring the
    server's write rate, for the whole cluster (or each process, see FHIR_WRITE_BUDGET)
    (docs/reliability.md, "FHIR under contention")"""
    fhir_write_budget: Literal["cluster", "process"] = "cluster"
    """`cluster`: one write limit for every worker process, held in Redis (each falls back to
    its own while Redis is unreachable); `process`: each worker process has its own"""
    fhir_write_lease_seconds: float = Field(default=3.0, ge=0.5, le=60)
    """a write's slot in the cluster budget lapses this long after its worker stopped renewing
    it (a crashed worker's slots come back within it)"""
    fhir_conflict_retries: int = Field(default=8, ge=0, le=100)
    """retries of a serialization conflict inside one task run, before it becomes a task retry"""
    fhir_conflict_backoff_base_seconds: float = Field(default=0.02, gt=0)
    """first jittered wait between retries of a serialization conflict"""
    fhir_conflict_backoff_max_seconds: float = Field(default=1.0, gt=0)
    """longest jittered wait between retries of a serialization conflict"""
    twilio_account_sid: str = Field(min_length=1)
    """your Twilio Account SID (starts with AC)"""
    twilio_auth_token: SecretStr
    """your Twilio auth token: verifies webhook signatures and authenticates sends"""
    public_base_url: str
    """the public URL Twilio calls, e.g. `https://sb.example.org` (behind a proxy, Flask's idea
    of scheme/host is not what Twilio signed)"""
    # Keys that seal PHI at rest in Redis (worker/crypto.py): the first seals, all open.
    # Required: without one Switchboard refuses to start (make run and the test bed make one).
    data_encryption_keys: SecretStr
    """keys that seal PHI at rest in Redis, comma-separated: the first seals, all open
    (`switchboard keys generate` makes one; docs/phi-at-rest.md)"""
    sms_thread_strategy: ThreadStrategy = "conversation"
    """how SMS find their thread: `conversation`, `active-thread` or `new-thread`
    (docs/architecture.md, "Thread strategies")"""
    unknown_sender_policy: UnknownSenderPolicy = "reject"
    """a message from no known Patient: `reject` (dead letter) or `create-patient`
    (docs/architecture.md, "Senders")"""
    # The region (ISO 3166-1 alpha-2: US, GB, AU…) of phone numbers written without a country
    # code: patients' stored numbers (`07700 900123` is +447700900123 under GB) and the
    # national spellings an inbound number is looked up by (worker/channels/phones.py).
    phone_default_region: str = DEFAULT_REGION
    """the region (ISO 3166-1 alpha-2, e.g. `GB`, `AU`) of phone numbers stored without a
    country code (docs/phone-numbers.md)"""

    # Outbound (all optional: a channel without credentials refuses sends as misconfigured).
    twilio_from_number: str = ""
    """the SMS sender number; without it or TWILIO_MESSAGING_SERVICE_SID, SMS sends fail as
    `misconfigured`"""
    twilio_messaging_service_sid: str = ""
    """a Twilio Messaging Service as the SMS sender (instead of TWILIO_FROM_NUMBER)"""
    twilio_api_base_url: str = "https://api.twilio.com"
    """where the Twilio SDK sends (the provider sandbox in tests / `make run`)"""
    # Twilio Conversations (docs/channels.md, "Twilio Conversations"): the identity our replies
    # are authored by, which is also how their onMessageAdded echo is recognised and dropped.
    twilio_conversations_identity: str = ""
    """the Conversations author of the clinic's replies (e.g. `clinic`); a reply in a thread
    keyed by a Conversation is posted into it as this identity, and messages it authored are
    never written back as the patient's. Empty: such replies fail as `misconfigured` (inbound
    Conversations messages are written either way). The same `TWILIO_API_BASE_URL` override
    reaches conversations.twilio.com and mcs.us1.twilio.com"""
    sendgrid_api_key: SecretStr = SecretStr("")
    """SendGrid API key; without it and SENDGRID_FROM_EMAIL, email sends fail as `misconfigured`"""
    sendgrid_from_email: str = ""
    """the clinic address emails are sent from"""
    sendgrid_api_base_url: str = "https://api.sendgrid.com"
    """where the SendGrid SDK sends"""
    # The Event Webhook's verification key (the base64 public key SendGrid shows, without PEM
    # armour). Unset: POST /webhooks/sendgrid/events refuses every request (fail closed).
    sendgrid_event_verification_key: str = ""
    """the signed Event Webhook's verification key (the base64 public key SendGrid shows,
    without PEM armour; checked at start-up). Empty: `POST /webhooks/sendgrid/events` refuses
    everything with 403 and `switchboard check` warns"""
    # Bearer tokens accepted by POST /v1/messages, comma-separated.
    api_tokens: SecretStr = SecretStr("")
    """comma-separated bearer tokens accepted by `/v1/messages` (none → the API answers 401)"""
    # Key of the HMAC-SHA256 that FHIR Subscription rest-hooks are signed with (X-Signature);
    # `switchboard subscription install` writes it into Medplum's subscription-secret
    # extension. Empty: POST /webhooks/fhir/subscription refuses every delivery (403).
    fhir_subscription_secret: SecretStr = SecretStr("")
    """key of the HMAC-SHA256 (`X-Signature`) that FHIR Subscription notifications are signed
    with; `switchboard subscription install` puts it on the Subscription. Empty: `POST
    /webhooks/fhir/subscription` answers 403 (automatic outbound off)"""
    # Automatic outbound sends only what the clinic wrote: a Communication whose meta.author
    # (set by Medplum from the login) is a Practitioner, PractitionerRole or Organization, or
    # one of these ClientApplication ids (comma-separated: an EHR integration or bot writing
    # replies with client credentials). docs/automatic-outbound.md
    automatic_outbound_clients: str = ""
    """ClientApplication ids (comma-separated) whose writes count as the clinic's for automatic
    outbound, besides Practitioners, PractitionerRoles and Organizations
    (docs/automatic-outbound.md)"""
    # Which medium a reply follows: the thread header's, or the patient's last inbound message's.
    reply_channel_source: Literal["header", "last-inbound"] = "header"
    """a reply follows the thread header's `medium` (`header`) or the medium of the patient's
    last message in the thread (`last-inbound`)"""
    # Send pacing shared by every worker: messages per second per channel and sending address
    # (a Twilio long code takes about 1/s).
    sms_rate_per_second: float = Field(default=1.0, gt=0)
    """SMS send pace per sending number, shared by all workers (Redis token bucket)"""
    email_rate_per_second: float = Field(default=10.0, gt=0)
    """email send pace per sending address, shared by all workers"""
    # When an SMS fails because the number cannot take texts, send the same message by email.
    channel_fallback: bool = False
    """when an SMS fails because the number is invalid or cannot take texts (21211, 21612,
    21614, 21635, 30003-30006), send the same message by email"""
    email_message_id_system: str = "https://docs.sendgrid.com/x-message-id"
    """identifier system of SendGrid `X-Message-Id`s (Twilio SIDs use `MESSAGE_ID_SYSTEM`). Not
    to be confused with the fixed systems of RFC 5322 Message-IDs (`urn:ietf:rfc:5322` for
    ours, `urn:switchboard:email-message-id:inbound` for a patient's; docs/channels.md,
    "Email threads")"""

    # Inbound email (SendGrid Inbound Parse, POST /webhooks/sendgrid/inbound). Requests are
    # accepted only when signed with this key (the base64 ECDSA public key SendGrid shows, no
    # PEM armour) or when they carry these Basic credentials ("user:password" embedded in the
    # configured URL). With neither set the route refuses everything.
    sendgrid_inbound_verification_key: str = ""
    """the base64 ECDSA public key SendGrid shows for the Inbound Parse security policy (no PEM
    armour); checked at start-up"""
    sendgrid_inbound_basic_auth: SecretStr = SecretStr("")
    """`user:password`, when the Inbound Parse URL carries Basic credentials instead of a
    signature (compared in constant time). With neither set, `/webhooks/sendgrid/inbound`
    refuses everything and `switchboard check` says so"""
    # Attribute an email to a Patient only when its From domain is authenticated (DKIM aligned
    # with it, or SPF with the envelope sender in it); otherwise dead letter
    # `unauthenticated-sender`.
    email_require_sender_auth: bool = True
    """attribute an email to a Patient only when its From domain is authenticated
    (docs/channels.md); otherwise dead letter `unauthenticated-sender`"""
    email_thread_strategy: ThreadStrategy = "conversation"
    """`conversation`, `active-thread` or `new-thread` for email (docs/channels.md)"""
    # Size of a whole email above which its attachments are left out (its text still lands).
    email_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    """an email bigger than this (10 MB) lands with its text and a note naming each attachment
    left out"""
    # Conversation ids on email thread headers (the root of References, scoped by the sender).
    # An inbound email is keyed on (sender, Message-ID) under worker.channels.sendgrid's
    # EMAIL_INBOUND_KEY_SYSTEM, and carries its bare Message-ID under
    # EMAIL_INBOUND_MESSAGE_ID_SYSTEM, which the outbound side reads to answer it.
    email_conversation_id_system: str = "urn:switchboard:email-conversation"
    """identifier system of email conversation ids (root of `References`) on headers"""
    outbound_request_system: str = "urn:switchboard:outbound-request"
    """identifier linking a Communication to the API request that sent it"""
    # Key of the HMAC that stores opt-outs (phone numbers, emails) as digests nobody can
    # recompute without it. Unset: derived from TWILIO_AUTH_TOKEN (set it, so that rotating the
    # Twilio token does not make Switchboard forget who opted out).
    optout_hash_key: SecretStr = SecretStr("")
    """key of the HMAC under which opt-outs are stored; set it (a long random secret) so that
    rotating the Twilio token does not lose them (`switchboard check` warns while unset).
    Default when empty: derived from `TWILIO_AUTH_TOKEN`."""
    # How long a send claim blocks another attempt at the same Communication.
    send_claim_seconds: int = Field(default=600, ge=10)
    """a send claim younger than this is "in progress"; older without a result is
    `outcome-unknown`"""

    # Push (FCM HTTP v1). The service account comes from FCM_CREDENTIALS_FILE, else
    # GOOGLE_APPLICATION_CREDENTIALS; no file: push refuses sends as misconfigured.
    fcm_credentials_file: str = ""
    """Google service-account JSON for push; without one (nor GOOGLE_APPLICATION_CREDENTIALS),
    push sends fail as `misconfigured`"""
    google_application_credentials: str = ""
    """Google's standard variable, used for push when FCM_CREDENTIALS_FILE is empty"""
    # Unset: the `project_id` of the service account.
    fcm_project_id: str = ""
    """the Firebase project pushed through. Default when empty: the file's `project_id`."""
    fcm_api_base_url: str = "https://fcm.googleapis.com"
    """where pushes go (the provider sandbox in tests / `make run`)"""
    # What a push says. No PHI: the app fetches the message itself over FHIR (data carries the
    # Communication id); PUSH_INCLUDE_BODY puts the text in the push, for deployments that
    # choose to.
    push_notification_title: str = "You have a new message"
    """the title of every push (no PHI)"""
    push_notification_body: str = ""
    """the body of every push (no PHI); see PUSH_INCLUDE_BODY"""
    push_include_body: bool = False
    """put the message's text (first 1000 characters) in the push body; only for deployments
    that choose to send it through Google"""
    push_rate_per_second: float = Field(default=20.0, gt=0)
    """push pace per FCM project, shared by all workers"""
    # WhatsApp through Twilio's Messages API (docs/channels.md, "WhatsApp").
    twilio_whatsapp_from: str = ""
    """the WhatsApp sender, `whatsapp:+E164`; without it WhatsApp sends go through
    TWILIO_MESSAGING_SERVICE_SID (which must then hold a WhatsApp sender), and without either
    they fail as `misconfigured`"""
    whatsapp_template_content_sid: str = ""
    """the approved WhatsApp template (`HX…` Content SID) sent when a reply falls outside the
    24-hour window; the reply is held until the patient answers. Empty: such a reply fails
    with `outside-whatsapp-window`"""
    whatsapp_template_variables: str = "{}"
    """the template's `ContentVariables`, a JSON object of strings, the same for every patient
    (e.g. `{"1": "Riverside Clinic"}`): never anything about the patient"""
    whatsapp_hold_hours: float = Field(default=72.0, gt=0)
    """how long a reply held for a closed WhatsApp window waits for the patient's answer; then
    it fails (`whatsapp-hold-expired` on the Communication and the API request)"""
    whatsapp_rate_per_second: float = Field(default=1.0, gt=0)
    """WhatsApp send pace per sender, shared by all workers"""
    whatsapp_expire_interval_seconds: float = Field(default=300.0, gt=0)
    """how often beat fails held WhatsApp replies older than WHATSAPP_HOLD_HOURS"""
    # Where a device token is kept on its FHIR Device (identifier system), and the provider
    # id system of the pushes recorded on a Communication.
    device_token_system: str = "urn:switchboard:fcm-token"  # noqa: S105 (a URI, no secret)
    """identifier system of the push token on a `Device`"""
    push_message_id_system: str = "https://fcm.googleapis.com/v1/message-name"
    """identifier system of FCM message names recorded on a Communication"""
    # Channels tried in this order when neither the caller nor the thread names one.
    channel_order: str = "sms,email"
    """channels tried in this order when neither the caller nor the thread names one; may list
    `push` (e.g. `push,sms,email`)"""

    # Reconciliation of sends whose final status never arrived (Celery beat).
    reconcile_interval_seconds: float = Field(default=300.0, gt=0)
    """how often beat looks for sends without a final status"""
    stuck_after_seconds: float = Field(default=900.0, ge=0)
    """how old a send without a final status must be before the provider is asked"""

    # Accepted messages that no worker has touched for this long are published again (they
    # fell between kombu's BRPOP and its unacked record when Redis died; see
    # worker/stores/inbox.py).
    inbox_stale_seconds: float = Field(default=1800.0, gt=0)
    """accepted messages untouched this long are published again"""
    inbox_sweep_interval_seconds: float = Field(default=60.0, gt=0)
    """how often beat looks for stale accepted messages"""

    # A request body that has not fully arrived after this long gets 408 and its connection is
    # closed (slow clients must not hold the receiver's connection slots; Twilio waits 15 s).
    receiver_body_timeout_seconds: float = Field(default=10.0, gt=0, le=14)
    """a request body not fully arrived by then gets 408 and its connection is closed"""
    # This host's own state on disk (the receiver's spool). Relative paths are taken from the
    # working directory (/app in the image, where the non-root user may write).
    data_dir: str = "data"
    """directory of this host's local state (the receiver's spool)"""
    # When Redis cannot take an accepted webhook in time, the receiver appends it here (sealed,
    # fsynced) and still answers 2xx; each web process publishes the entries once Redis is back
    # (docs/spool.md). Unset: DATA_DIR/spool. Empty: no spool (503 while Redis is away).
    spool_dir: str | None = None
    """where accepted webhooks wait while Redis is unreachable (default `DATA_DIR/spool`; empty:
    no spool, the receiver answers 503 instead)"""
    spool_max_bytes: int = Field(default=1024 * 1024 * 1024, ge=4096)
    """the spool's size cap (1 GiB); past it the receiver answers 503 as without a spool"""
    spool_max_record_bytes: int = Field(default=12 * 1024 * 1024, ge=4096)
    """the largest spooled entry (an inbound email carries its post); a bigger one gets 503"""
    spool_flush_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    """how often each web process tries to publish what the spool holds"""
    # Log lines: JSON (one object per line, for log shippers) or console text.
    log_format: Literal["json", "console"] = "json"
    """`json` (one object per line) or `console`"""
    # Each Celery worker process serves its Prometheus metrics at http://HOST:PORT/metrics
    # (prometheus_client's own server); 0 serves none. Two workers on one host need two ports.
    # The web app serves its own at /metrics (docs/operations-metrics.md).
    worker_metrics_port: int = Field(default=9540, ge=0, le=65535)
    """the port each worker serves its Prometheus metrics on (0: off;
    docs/operations-metrics.md)"""
    # All interfaces: Prometheus scrapes from another container or host. The page holds counts
    # and labels only, never PHI.
    worker_metrics_host: str = "0.0.0.0"  # noqa: S104
    """the address the worker metrics port binds to"""

    # Identifier systems (docs/configuration.md). Changing one after go-live orphans the
    # idempotency keys already written, so they are settings rather than code constants.
    message_id_system: str = "https://www.twilio.com/docs/api/messaging/message#sid"
    """identifier system of Twilio MessageSids on child Communications"""
    conversation_id_system: str = "urn:switchboard:sms-conversation"
    """identifier system of external conversation ids on headers"""
    thread_id_system: str = "urn:switchboard:thread"
    """identifier system of the headers Switchboard creates itself"""
    clinic_number_system: str = "urn:switchboard:clinic-number"
    """system of the clinic's number when the clinic is a logical reference"""
    # Optional reference (e.g. "Organization/123") for the clinic side of a thread; when empty
    # the clinic is a logical reference by its Twilio number.
    clinic_reference: str = ""
    """e.g. `Organization/123`: the clinic side of threads; empty → a logical reference by the
    Twilio number"""

    # Retries of transient failures: exponential backoff with full jitter, capped.
    # Defaults keep retrying for about 3 hours (cap 600 s), long enough to ride out a FHIR
    # maintenance window; then the message waits in the dead-letter store for a replay.
    retry_max_attempts: int = Field(default=25, ge=1, le=1000)
    """attempts before a transiently failing message is dead-lettered"""
    retry_backoff_base_seconds: float = Field(default=2.0, gt=0)
    """first retry delay of the exponential backoff with jitter (≈ 3 h of retrying with the
    defaults)"""
    retry_backoff_max_seconds: float = Field(default=600.0, gt=0)
    """longest retry delay of the exponential backoff"""
    # A message the broker redelivers this often without the task ever finishing (the worker
    # died each time) is dead-lettered as `delivery-loop` instead of killing workers forever.
    max_deliveries: int = Field(default=5, ge=1)
    """a message the broker redelivers this often without finishing (it kills workers) is
    dead-lettered as `delivery-loop`"""
    # A send deferred this often (each wait is at most half the visibility timeout) is
    # dead-lettered as `deferral-loop`: a wait that never ends must not cycle forever. A send
    # waits for its reserved slot in a few steps at most, so the default is far from normal use.
    max_deferrals: int = Field(default=50, ge=1)
    """a send deferred this often (pacing, thread order) is dead-lettered as `deferral-loop`"""
    # Dead letters whose last failure is older than this many days are pruned.
    dead_letter_retention_days: int = Field(default=30, ge=1)
    """dead letters older than this are pruned"""
    # Every worker process refreshes a heartbeat this often; one silent for WORKER_DEAD_AFTER
    # is taken for dead and the messages it held go back to their queues at once
    # (worker/broker/liveness.py), instead of after the visibility timeout. The defaults put
    # a dead worker's messages back within 10 s of its death (liveness.restored_within),
    # leaving 5 s of the recovery goal (every message written within 15 s of a SIGKILL) to
    # run them; a worker silent for 8 s (4 heartbeats missed) is taken for dead.
    worker_heartbeat_seconds: float = Field(default=2.0, gt=0)
    """how often a worker refreshes its heartbeat (docs/architecture.md, "The broker path")"""
    worker_dead_after_seconds: float = Field(default=8.0, gt=0)
    """the silence after which a worker is taken for dead and its messages go back to their
    queues; at least 3 x WORKER_HEARTBEAT_SECONDS (checked)"""
    # Must exceed the longest countdown, or Redis redelivers a message still waiting (kombu).
    broker_visibility_timeout_seconds: int = Field(default=3600, ge=1)
    """kombu redelivers an unacknowledged message after this; must exceed
    `RETRY_BACKOFF_MAX_SECONDS + FHIR_TIMEOUT_SECONDS` (checked)"""
    # How long a processed MessageSid is remembered to skip FHIR for provider retries.
    inbound_seen_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    """how long a written MessageSid is remembered to skip FHIR for provider retries"""
    thread_lock_timeout_seconds: float = Field(default=60.0, gt=0)
    """per-patient lock of `active-thread`; at least 4 x `FHIR_TIMEOUT_SECONDS` (checked)"""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, *args, **kwargs):  # type: ignore[no-untyped-def]
        # load_settings() is the one reader of the environment; the model only validates.
        return (init_settings,)

    @field_validator("twilio_auth_token", "fhir_client_secret")
    @classmethod
    def _secret_present(cls, v: SecretStr) -> SecretStr:
        # An empty Twilio token would let anyone compute a valid webhook signature.
        if not v.get_secret_value().strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("sendgrid_event_verification_key", "sendgrid_inbound_verification_key")
    @classmethod
    def _ec_public_key(cls, v: str) -> str:
        v = "".join(v.split())  # pasted keys come wrapped
        if v:
            from worker.channels.sendgrid_signing import load_verification_key

            try:
                load_verification_key(v)
            except ValueError:
                raise ValueError("must be the base64 public key SendGrid shows for its signed "
                                 "webhooks (without -----BEGIN PUBLIC KEY-----)") from None
        return v

    @field_validator("sendgrid_inbound_basic_auth")
    @classmethod
    def _basic_auth(cls, v: SecretStr) -> SecretStr:
        value = v.get_secret_value()
        if value and (":" not in value or not value.split(":", 1)[1]):
            raise ValueError("must be user:password")
        return v

    @field_validator("data_encryption_keys")
    @classmethod
    def _keys_valid(cls, v: SecretStr) -> SecretStr:
        # The error names the position of a bad key, never its value (errors reach logs).
        parse_keys(v.get_secret_value())
        return v

    @field_validator("phone_default_region")
    @classmethod
    def _phone_region(cls, v: str) -> str:
        region = v.strip().upper()
        if not valid_region(region):
            raise ValueError("not a region of the phone numbering plans (ISO 3166-1 alpha-2)")
        return region

    @field_validator("twilio_conversations_identity")
    @classmethod
    def _conversations_identity(cls, v: str) -> str:
        # Compared with the webhook's Author to drop our own echoes: it must be an identity,
        # never a patient's address (`+E164`, `whatsapp:+E164`).
        if v and (not re.fullmatch(r"[^\x00-\x1f\x7f]{1,256}", v)
                  or re.fullmatch(r"(whatsapp:)?\+[0-9]+", v, re.IGNORECASE)):
            raise ValueError("must be a Conversations identity (1-256 characters, no control "
                             "characters, not a phone or WhatsApp address)")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if urlsplit(v).scheme not in {"redis", "rediss", "unix"}:
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_addresses(cls, v: str) -> str:
        # Parsed once here; sentinel_addresses() relies on the shape checked.
        items = [i.strip() for i in v.split(",") if i.strip()]
        bad = [n for n, i in enumerate(items, 1) if not _HOST_PORT.fullmatch(i)
               or not 0 < int(i.rsplit(":", 1)[1]) < 65536]
        if bad:
            raise ValueError("must be comma-separated host:port pairs (a host name, an IPv4 "
                             "address or a bracketed IPv6 address, and a port 1-65535); "
                             f"entry {bad[0]} is not")
        return ",".join(items)

    @field_validator("redis_sentinel_master")
    @classmethod
    def _master_name(cls, v: str) -> str:
        v = v.strip()
        if v and not _MASTER_NAME.fullmatch(v):
            raise ValueError("must be the Sentinel master name: letters, digits, '.', '_', '-' "
                             "(at most 64)")
        return v

    @model_validator(mode="after")
    def _sentinels_complete(self) -> Settings:
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise ValueError("REDIS_SENTINELS and REDIS_SENTINEL_MASTER go together: set both "
                             "(Redis behind Sentinel) or neither")
        if self.redis_sentinels and urlsplit(self.redis_url).scheme != "redis":
            # Sentinels name the primary by host and port (no unix socket); TLS to the data
            # nodes through Sentinel is not wired through kombu and redis-py here (yet).
            raise ValueError("with REDIS_SENTINELS, REDIS_URL must be a redis:// URL (its "
                             "database and password are used; unix:// and rediss:// are not "
                             "supported behind Sentinel)")
        return self

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs (IPv6 hosts without their brackets)."""
        out = []
        for item in filter(None, self.redis_sentinels.split(",")):
            host, port = item.rsplit(":", 1)
            out.append((host.strip("[]"), int(port)))
        return out

    @field_validator("fhir_base_url", "public_base_url", "twilio_api_base_url",
                     "sendgrid_api_base_url", "fcm_api_base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError("must be an absolute http(s) URL")
        return v

    @field_validator("fhir_base_url")
    @classmethod
    def _trailing_slash(cls, v: str) -> str:
        # The FHIR client appends relative paths (`Patient/1`) to the base.
        return v if v.endswith("/") else v + "/"

    @field_validator("public_base_url", "twilio_api_base_url", "sendgrid_api_base_url",
                     "fcm_api_base_url")
    @classmethod
    def _no_trailing_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @field_validator("automatic_outbound_clients")
    @classmethod
    def _client_ids(cls, v: str) -> str:
        ids = [i.strip() for i in v.split(",") if i.strip()]
        bad = [i for i in ids if not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", i)]
        if bad:
            raise ValueError("AUTOMATIC_OUTBOUND_CLIENTS must list ClientApplication ids")
        return ",".join(ids)

    @field_validator("twilio_whatsapp_from", "whatsapp_template_content_sid")
    @classmethod
    def _whatsapp_shapes(cls, v: str, info: ValidationInfo) -> str:
        pattern, shape = _WHATSAPP_SHAPES[str(info.field_name)]
        if v and not re.fullmatch(pattern, v):
            raise ValueError(f"must be {shape}")
        return v

    @field_validator("whatsapp_template_variables")
    @classmethod
    def _template_variables(cls, v: str) -> str:
        try:
            parsed = json.loads(v or "{}")
        except ValueError as exc:
            raise ValueError("must be a JSON object of strings") from exc
        if not isinstance(parsed, dict) or not all(
                isinstance(k, str) and isinstance(x, str) for k, x in parsed.items()):
            raise ValueError("must be a JSON object of strings")
        return json.dumps(parsed, separators=(",", ":"))

    @field_validator("channel_order")
    @classmethod
    def _channel_order(cls, v: str) -> str:
        names = [n.strip() for n in v.split(",") if n.strip()]
        if not names or len(set(names)) != len(names) or not set(names) <= set(CHANNELS):
            raise ValueError(f"a comma-separated list of distinct channels from {CHANNELS}")
        return ",".join(names)

    @model_validator(mode="after")
    def _visibility_outlasts_retries(self) -> Settings:
        # kombu hands a reserved message to another worker after the visibility timeout; a
        # retry waiting for its countdown, or a task still talking to FHIR, would run twice.
        needed = self.retry_backoff_max_seconds + self.fhir_timeout_seconds
        if self.broker_visibility_timeout_seconds <= needed:
            raise ValueError(
                f"BROKER_VISIBILITY_TIMEOUT_SECONDS must exceed RETRY_BACKOFF_MAX_SECONDS + "
                f"FHIR_TIMEOUT_SECONDS ({needed:g})")
        if self.worker_dead_after_seconds < 3 * self.worker_heartbeat_seconds:
            raise ValueError("WORKER_DEAD_AFTER_SECONDS must be at least 3 x "
                             "WORKER_HEARTBEAT_SECONDS (one late heartbeat is not a death)")
        if self.thread_lock_timeout_seconds < 4 * self.fhir_timeout_seconds:
            raise ValueError("THREAD_LOCK_TIMEOUT_SECONDS must be at least 4 x "
                             "FHIR_TIMEOUT_SECONDS (a token fetch, a retried 401, a search "
                             "and a write happen under the lock)")
        return self

    @model_validator(mode="after")
    def _default_token_url(self) -> Settings:
        if not self.fhir_token_url:
            parts = urlsplit(self.fhir_base_url)
            object.__setattr__(self, "fhir_token_url", f"{parts.scheme}://{parts.netloc}/oauth2/token")
        return self

    def optout_key(self) -> bytes:
        """The opt-out HMAC key (OPTOUT_HASH_KEY, else one derived from the Twilio token)."""
        own = self.optout_hash_key.get_secret_value().encode()
        if own:
            return own
        token = self.twilio_auth_token.get_secret_value().encode()
        return hmac.new(token, b"switchboard opt-out key", hashlib.sha256).digest()

    def automatic_outbound_client_list(self) -> tuple[str, ...]:
        """The ClientApplication ids whose writes automatic outbound sends."""
        return tuple(i for i in self.automatic_outbound_clients.split(",") if i)

    def channel_list(self) -> tuple[str, ...]:
        """CHANNEL_ORDER as a tuple."""
        return tuple(self.channel_order.split(","))

    def fcm_credentials(self) -> str:
        """The service-account file for push (FCM_CREDENTIALS_FILE, else the Google default)."""
        return self.fcm_credentials_file or self.google_application_credentials
    @property
    def spool_path(self) -> Path | None:
        """The spool directory (None: the spool is off)."""
        if self.spool_dir == "":
            return None
        return Path(self.spool_dir) if self.spool_dir is not None else Path(self.data_dir) / "spool"

    def sealer(self) -> Sealer:
        """The Sealer of DATA_ENCRYPTION_KEYS (one per key set per process)."""
        return sealer_for(self.data_encryption_keys.get_secret_value())

    def api_token_list(self) -> list[str]:
        """The accepted API bearer tokens."""
        return [t.strip() for t in self.api_tokens.get_secret_value().split(",") if t.strip()]

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables, to hand to a child process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue  # unset (SPOOL_DIR): the child derives the same default
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[name.upper()] = str(value)
        return env


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment, or raise ConfigError naming every bad value."""
    source = os.environ if environ is None else environ
    values = {k.lower(): v for k, v in source.items() if k.lower() in Settings.model_fields}
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]).upper() if err["loc"] else "SETTINGS"
            what = "missing" if err["type"] == "missing" else err["msg"]
            hint = _HINTS.get(name, "")
            problems.append(f"{name}: {what}" + (f" ({hint})" if hint else ""))
        raise ConfigError(problems) from None
