"""The test bed: a real redis-server, the Medplum-engine FHIR sandbox and real Celery workers.

Integration tests share one redis-server and one FHIR sandbox per session. Each distinct worker
configuration gets its own Redis database, so workers with different settings never consume
each other's messages; the FHIR sandbox is reset before every test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support import AUTH_TOKEN, DATA_KEY, PUBLIC_BASE_URL, ProviderSandbox, Sandbox
from worker.ops import devstack
from worker.settings import Settings, load_settings
from worker.stores.dead_letters import DeadLetterStore

FHIR_ID = "switchboard-test"
FHIR_SECRET = "switchboard-test-secret"
# Fast retries so fault tests finish in seconds; the schedule is still exponential with jitter.
FAST_RETRIES = {"RETRY_BACKOFF_BASE_SECONDS": "0.2", "RETRY_BACKOFF_MAX_SECONDS": "2",
                "RETRY_MAX_ATTEMPTS": "5"}


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where child processes write their output (scanned by the PHI test)."""
    return Path(tmp_path_factory.mktemp("logs"))


@pytest.fixture(scope="session")
def redis_server(log_dir: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[devstack.RedisServer]:
    """A private redis-server (AOF on) for the whole session."""
    server = devstack.start_redis(log_dir, data_dir=tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fhir_server(log_dir: Path) -> Iterator[devstack.FhirSandbox]:
    """The FHIR sandbox for the whole session, in contention mode: overlapping conditional writes
    abort with Medplum's 409 (after its own retry), as on the real server with PostgreSQL, so
    every write path of every test meets what production meets."""
    sandbox = devstack.start_fhir_sandbox(log_dir, extra_env={
        "FHIR_SANDBOX_CLIENT_ID": FHIR_ID, "FHIR_SANDBOX_CLIENT_SECRET": FHIR_SECRET},
        contention_rate=1.0)
    yield sandbox
    sandbox.stop()


API_TOKEN = "test-api-token"
CLINIC_SMS = "+15557654321"
CLINIC_EMAIL = "care@clinic.example"
SENDGRID_KEY = "SG.test-key"


@pytest.fixture(scope="session")
def providers(log_dir: Path) -> Iterator[ProviderSandbox]:
    """The Twilio/SendGrid sandbox, requiring our test credentials like the real APIs, and
    signing Event Webhook batches with a key pair made for this session."""
    private, public = devstack.sendgrid_event_keys()
    child, origin = devstack.start_provider_sandbox(log_dir, [
        "--twilio-account-sid", "ACtest", "--twilio-auth-token", AUTH_TOKEN,
        "--sendgrid-api-key", SENDGRID_KEY],
        env={"PROVIDER_SANDBOX_SENDGRID_EVENT_KEY": private})
    sandbox = ProviderSandbox(origin, event_keys=(private, public))
    yield sandbox
    sandbox.close()
    child.stop()


def outbound_env(providers: ProviderSandbox, **overrides: str) -> dict[str, str]:
    """Settings overrides that send through the provider sandbox."""
    return {"TWILIO_API_BASE_URL": providers.origin, "TWILIO_FROM_NUMBER": CLINIC_SMS,
            "SENDGRID_API_KEY": SENDGRID_KEY, "SENDGRID_FROM_EMAIL": CLINIC_EMAIL,
            "SENDGRID_API_BASE_URL": providers.origin, "API_TOKENS": API_TOKEN,
            "SENDGRID_EVENT_VERIFICATION_KEY": providers.event_public_key,
            "SMS_RATE_PER_SECOND": "50", "EMAIL_RATE_PER_SECOND": "50", **overrides}


def make_env(redis_url: str, fhir_base: str, **overrides: str) -> dict[str, str]:
    """Environment for a worker or web process under test."""
    env = {
        "REDIS_URL": redis_url,
        "FHIR_BASE_URL": fhir_base,
        "FHIR_CLIENT_ID": FHIR_ID,
        "FHIR_CLIENT_SECRET": FHIR_SECRET,
        "TWILIO_ACCOUNT_SID": "ACtest",
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
        "DATA_ENCRYPTION_KEYS": DATA_KEY,
        # No disk spool unless a test gives one (tests/integration/test_spool.py): a Redis
        # that is not there is then today's 503, and no test writes into the working tree.
        "SPOOL_DIR": "",
        **FAST_RETRIES,
    }
    env.update(overrides)
    return env


@pytest.fixture()
def sandbox(fhir_server: devstack.FhirSandbox, redis_server: devstack.RedisServer
            ) -> Iterator[Sandbox]:
    """The FHIR sandbox, emptied for this test."""
    settings = load_settings(make_env(redis_server.url, fhir_server.base_url))
    sb = Sandbox(fhir_server.origin, settings)
    sb.reset()
    yield sb
    sb.close()


@dataclass
class Service:
    """A running configuration: its settings, its Redis database and its worker process."""

    settings: Settings
    env: dict[str, str]
    redis: redis.Redis
    worker: devstack.Child | None
    all_workers: list[devstack.Child]

    @property
    def dead_letters(self) -> DeadLetterStore:
        """The dead-letter store of this configuration."""
        return DeadLetterStore(self.redis, self.settings.sealer())

    def app(self) -> Any:
        """A Flask app (the receiver) publishing to this configuration's Redis database."""
        from web.app import create_app

        return create_app(self.settings)


class Services:
    """Starts one worker per distinct configuration, on its own Redis database, and keeps it."""

    def __init__(self, redis_server: devstack.RedisServer, fhir: devstack.FhirSandbox,
                 log_dir: Path) -> None:
        self._redis = redis_server
        self._fhir = fhir
        self._log_dir = log_dir
        self._started: dict[tuple[tuple[str, str], ...], Service] = {}

    def get(self, worker: bool = True, workers: int = 1, **overrides: str) -> Service:
        """The Service for these settings overrides (started on first use)."""
        key = (("worker", str(worker)), ("workers", str(workers)), *sorted(overrides.items()))
        if key not in self._started:
            db = len(self._started) + 1
            if db > 63:
                raise RuntimeError("too many distinct service configurations for Redis dbs")
            url = f"redis://127.0.0.1:{self._redis.port}/{db}"
            env = make_env(url, self._fhir.base_url, **overrides)
            children = [devstack.start_worker(env, self._log_dir, name=f"worker-db{db}-{n}",
                                              concurrency=8)
                        for n in range(workers if worker else 0)]
            client = redis.Redis.from_url(url)
            self._started[key] = Service(load_settings(env), env, client,
                                         children[0] if children else None, children)
        service = self._started[key]
        service.dead_letters.purge()
        return service

    def workers(self) -> list[devstack.Child]:
        """Every worker process started so far."""
        return [s.worker for s in self._started.values() if s.worker]

    def stop(self) -> None:
        """Stop every worker."""
        for service in self._started.values():
            for child in service.all_workers:
                child.stop()
            service.redis.close()


@pytest.fixture(scope="session")
def services(redis_server: devstack.RedisServer, fhir_server: devstack.FhirSandbox,
             log_dir: Path) -> Iterator[Services]:
    """Factory of running configurations (see Services)."""
    s = Services(redis_server, fhir_server, log_dir)
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests talk to loopback only; a proxy setting in the environment must not reroute them.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    os.environ.setdefault("PYTHONHASHSEED", "0")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration is marked `integration`."""
    for item in items:
        if "integration" in item.nodeid.split("/"):
            item.add_marker(pytest.mark.integration)
