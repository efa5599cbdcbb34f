"""Per-process dependencies of the worker: settings, one FHIR client, one Redis client."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import redis

from worker.coordination import RedisLocks, RedisSeenMessages
from worker.dead_letter import DeadLetterStore
from worker.fhir.client import FhirClient
from worker.fhir.resources import IdentifierSystems
from worker.settings import Settings, load_settings


@dataclass
class Runtime:
    """What tasks share within one worker process (thread-safe pieces only)."""

    settings: Settings
    fhir: FhirClient
    redis: redis.Redis
    dead_letters: DeadLetterStore
    seen: RedisSeenMessages
    locks: RedisLocks

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
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5,
                                  socket_connect_timeout=5, health_check_interval=30)
    fhir = FhirClient(settings.fhir_base_url, settings.fhir_token_url, settings.fhir_client_id,
                      settings.fhir_client_secret.get_secret_value(),
                      timeout=settings.fhir_timeout_seconds)
    return Runtime(settings, fhir, client, DeadLetterStore(client),
                   RedisSeenMessages(client, settings.inbound_seen_ttl_seconds),
                   RedisLocks(client, settings.thread_lock_timeout_seconds))


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
