"""What every benchmark section stands on: its own redis-server and FHIR sandbox (contention
mode), the environment of a Switchboard process against them, and test-side sandbox access."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.support import AUTH_TOKEN, DATA_KEY, PUBLIC_BASE_URL, Sandbox
from worker.ops import devstack
from worker.settings import Settings, load_settings

FHIR_ID, FHIR_SECRET = "bench", "bench-secret"


@dataclass
class Backends:
    """A private Redis and FHIR sandbox, and settings for workers against them."""

    redis: devstack.RedisServer
    fhir: devstack.FhirSandbox
    env: dict[str, str]
    settings: Settings
    sandbox: Sandbox

    def stop(self) -> None:
        """Stop both servers."""
        self.sandbox.close()
        self.fhir.stop()
        self.redis.stop()


def start(log_dir: Path, name: str, curve: str = "", **overrides: str) -> Backends:
    """Start them; `overrides` are settings on top of the defaults. The sandbox is in
    contention mode, with the direct-rate `curve` when one is named (sandbox/fhir/README.md)."""
    rds = devstack.start_redis(log_dir, data_dir=log_dir / f"{name}-redis")
    fhir = devstack.start_fhir_sandbox(log_dir, extra_env={
        "FHIR_SANDBOX_CLIENT_ID": FHIR_ID, "FHIR_SANDBOX_CLIENT_SECRET": FHIR_SECRET,
        "FHIR_SANDBOX_CURVE": curve}, contention_rate=1.0)
    env = {"REDIS_URL": rds.url, "FHIR_BASE_URL": fhir.base_url, "FHIR_CLIENT_ID": FHIR_ID,
           "FHIR_CLIENT_SECRET": FHIR_SECRET, "TWILIO_ACCOUNT_SID": "ACbench",
           "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
           "DATA_ENCRYPTION_KEYS": DATA_KEY, **overrides}
    settings = load_settings(env)
    return Backends(rds, fhir, env, settings, Sandbox(fhir.origin, settings))
