"""Per-process dependencies of the worker: settings, one FHIR client, one Redis client."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis

from worker.channels.registry import build_channels
from worker.channels.twilio_conversations import MESSAGE_SYSTEM as CONVERSATIONS_MESSAGE_SYSTEM
from worker.channels.whatsapp import WINDOW_SECONDS
from worker.fhir.budget import ClusterWriteBudget
from worker.fhir.client import FhirClient, WriteSlots
from worker.fhir.contention import LimitState, Tuning, WriteLimit
from worker.fhir.resources import IdentifierSystems
from worker.ops.metrics import Metrics, process_metrics
from worker.outbound.sending import OutboundDeps, WhatsAppPolicy
from worker.settings import Settings, load_settings
from worker.stores.binaries import StoredBinaries
from worker.stores.connection import redis_client
from worker.stores.dead_letters import DeadLetterStore
from worker.stores.inbox import Inbox
from worker.stores.locks import RedisLocks
from worker.stores.optouts import OptOuts
from worker.stores.outbound_state import OutboundState
from worker.stores.seen import RedisSeenMessages
from worker.stores.send_ledger import SendLedger
from worker.stores.whatsapp import WhatsAppStore


@dataclass
class Runtime:
    """What tasks share within one worker process (thread-safe pieces only)."""

    settings: Settings
    fhir: FhirClient
    redis: redis.Redis
    dead_letters: DeadLetterStore
    seen: RedisSeenMessages
    locks: RedisLocks
    outbound: OutboundDeps
    metrics: Metrics
    inbox: Inbox
    email_events_seen: RedisSeenMessages
    binaries: StoredBinaries

    @property
    def systems(self) -> IdentifierSystems:
        """The configured identifier systems."""
        s = self.settings
        return IdentifierSystems(message=s.message_id_system,
                                 conversation=s.conversation_id_system,
                                 thread=s.thread_id_system,
                                 clinic_number=s.clinic_number_system)


def build_runtime(settings: Settings) -> Runtime:
    """Build the process's dependencies from settings."""
    client = redis_client(settings, socket_timeout=5, socket_connect_timeout=5,
                          health_check_interval=30)
    metrics = process_metrics()
    sealer = settings.sealer()
    fhir = FhirClient(settings.fhir_base_url, settings.fhir_token_url, settings.fhir_client_id,
                      settings.fhir_client_secret.get_secret_value(),
                      timeout=settings.fhir_timeout_seconds,
                      observe=lambda op, seconds: metrics.observe(
                          "switchboard_fhir_request_seconds", seconds, operation=op),
                      write_limit=write_slots(settings, client, metrics),
                      conflict_retries=settings.fhir_conflict_retries,
                      conflict_backoff=(settings.fhir_conflict_backoff_base_seconds,
                                        settings.fhir_conflict_backoff_max_seconds),
                      on_contention=lambda event: metrics.inc(
                          "switchboard_fhir_contention", event=event))
    outbound = OutboundDeps(
        fhir=fhir, channels=build_channels(settings),
        ledger=SendLedger(client, sealer), optouts=OptOuts(client, settings.optout_key()),
        state=OutboundState(client, sealer),
        rates={"sms": settings.sms_rate_per_second, "email": settings.email_rate_per_second,
               "push": settings.push_rate_per_second,
               "whatsapp": settings.whatsapp_rate_per_second,
               # A Conversation's messages leave through its SMS/WhatsApp number: SMS's pace.
               "conversations": settings.sms_rate_per_second},
        # WhatsApp messages are Twilio messages: the same SID system, so the status callback
        # and the reconciler find them as they find SMS.
        id_systems={"sms": settings.message_id_system,
                    "whatsapp": settings.message_id_system,
                    "email": settings.email_message_id_system,
                    "push": settings.push_message_id_system,
                    "conversations": CONVERSATIONS_MESSAGE_SYSTEM},
        request_system=settings.outbound_request_system,
        reply_source=settings.reply_channel_source, fallback=settings.channel_fallback,
        claim_seconds=settings.send_claim_seconds,
        max_countdown=settings.broker_visibility_timeout_seconds / 2, metrics=metrics,
        device_system=settings.device_token_system, channel_order=settings.channel_list(),
        phone_region=settings.phone_default_region,
        whatsapp=WhatsAppPolicy(
            WhatsAppStore(client, sealer, settings.optout_key(), WINDOW_SECONDS),
            settings.whatsapp_template_content_sid, settings.whatsapp_template_variables,
            settings.whatsapp_hold_hours * 3600))
    return Runtime(settings, fhir, client, DeadLetterStore(
        client, sealer, retention_seconds=settings.dead_letter_retention_days * 86400),
                   RedisSeenMessages(client, settings.inbound_seen_ttl_seconds),
                   RedisLocks(client, settings.thread_lock_timeout_seconds), outbound, metrics,
                   Inbox(client, sealer),
                   # SendGrid retries a batch for up to 24 hours; a week covers it.
                   RedisSeenMessages(client, settings.inbound_seen_ttl_seconds,
                                     namespace="sendgrid-event"),
                   StoredBinaries(client, settings.inbound_seen_ttl_seconds))


def write_slots(settings: Settings, client: redis.Redis, metrics: Metrics) -> WriteSlots:
    """Where FHIR writes wait: the cluster's budget in Redis (the process's own limit while
    Redis is unreachable), or only the process's own limit."""
    tuning = Tuning(ceiling=settings.fhir_max_writes_in_flight)

    def report(scope: str) -> Callable[[LimitState], None]:
        def on_state(state: LimitState) -> None:
            metrics.set("switchboard_fhir_write_limit", state.limit, scope=scope)
            metrics.set("switchboard_fhir_writes_per_second", state.rate, scope=scope)
            metrics.set("switchboard_fhir_conflicts_per_second", state.conflict_rate,
                        scope=scope)
        return on_state

    local = WriteLimit(tuning, on_state=report("process"))
    if settings.fhir_write_budget == "process":
        return local
    return ClusterWriteBudget(client, tuning, settings.fhir_write_lease_seconds, local,
                              on_state=report("cluster"))


_lock = threading.Lock()
_runtime: Runtime | None = None
_pid = 0


def get_runtime() -> Runtime:
    """This process's Runtime, built on first use from the environment (rebuilt after fork)."""
    global _runtime, _pid
    with _lock:
        if _runtime is None or _pid != os.getpid():
            _runtime = build_runtime(load_settings())
            _pid = os.getpid()
        return _runtime
