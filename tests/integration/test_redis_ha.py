"""Redis behind Sentinel (docs/redis-ha.md): a real primary, two replicas and three Sentinels on
loopback (worker/ops/devstack.py SentinelGroup). Every process follows the primary through a
failover by itself, an idle worker blocked in BRPOP included (celery/celery#6348), and with
REDIS_MIN_REPLICAS_ACK a 2xx means replicated."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_env
from tests.integration.test_inbound_sms import PATIENT
from tests.support import Sandbox, eventually, post_signed, sms_params
from worker.ops import devstack
from worker.settings import load_settings

# Failure deadlines far above the goals: the machine is shared with parallel runs.
WRITTEN_WITHIN = 90.0


@pytest.fixture()
def group(log_dir: Path, tmp_path: Path) -> Iterator[devstack.SentinelGroup]:
    """A fresh primary + 2 replicas + 3 Sentinels (each test may kill some of it)."""
    g = devstack.start_sentinel_group(log_dir, tmp_path / "ha", password="sentinel-test-pw")
    yield g
    g.stop()


def ha_env(group: devstack.SentinelGroup, fhir: devstack.FhirSandbox, **overrides: str
           ) -> dict[str, str]:
    """A worker's or receiver's environment pointing at the Sentinels."""
    return make_env(group.env()["REDIS_URL"], fhir.base_url, **{**group.env(), **overrides})


@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
def test_an_idle_worker_follows_a_failover_without_a_restart(
        group: devstack.SentinelGroup, fhir_server: devstack.FhirSandbox, sandbox: Sandbox,
        log_dir: Path, fault: str) -> None:
    # celery/celery#6348: a worker waiting in BRPOP on the primary that dies. SIGKILL closes
    # its sockets (the worker gets a reset at once); SIGSTOP is a host gone silent (a power
    # cut, a partition): no reset, the BRPOP just never answers.
    env = ha_env(group, fhir_server)
    sandbox.patient(PATIENT)
    worker = devstack.start_worker(env, log_dir, name="worker-ha-idle", concurrency=4)
    app = _app(env)
    try:
        first = sms_params(PATIENT, "before the failover")
        assert post_signed(app, first).status_code == 200
        eventually(lambda: sandbox.messages(first["MessageSid"]), timeout=WRITTEN_WITHIN,
                   what="the first message written")
        time.sleep(1.0)  # the worker is back in BRPOP, idle
        old = group.primary().port
        group.server(old).kill() if fault == "sigkill" else group.server(old).pause()
        killed = time.monotonic()
        new = group.wait_for_new_primary(old)
        promoted = time.monotonic()
        after = sms_params(PATIENT, "after the failover")
        resp = eventually(lambda: _accepted(app, after), timeout=30,
                          what="the receiver accepting again")
        answered = time.monotonic()
        eventually(lambda: sandbox.messages(after["MessageSid"]), timeout=WRITTEN_WITHIN,
                   what="the message after the failover written by the same worker")
        written = time.monotonic()
        assert worker.proc.poll() is None  # the same process, never restarted
        assert resp.status_code == 200
        print(f"{fault} failover {old}->{new}: promoted {promoted - killed:.1f}s after the kill, "
              f"accepted {answered - promoted:.1f}s and written {written - promoted:.1f}s "
              "after the promotion")
    finally:
        worker.stop()


def _app(env: dict[str, str]):  # type: ignore[no-untyped-def]
    from web.app import create_app

    return create_app(load_settings(env)).test_client()


def _accepted(client, params):  # type: ignore[no-untyped-def]
    resp = post_signed(client, params)
    return resp if resp.status_code == 200 else None
