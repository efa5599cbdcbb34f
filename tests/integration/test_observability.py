"""Metrics move after real flows; readiness and `switchboard check` name the broken dependency."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.conftest import Services, make_env, outbound_env
from tests.integration.test_inbound_sms import deliver
from tests.integration.test_outbound import message_in_thread, patient, recorded, send, state
from tests.support import (
    ProviderSandbox,
    Sandbox,
    eventually,
    metric,
    post_signed,
    sms_params,
    worker_metrics,
)
from worker.ops import devstack


def test_metrics_move_after_an_inbound_and_an_outbound_flow(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox) -> None:
    providers.reset()
    svc = services.get(**outbound_env(providers))
    client = svc.app().test_client()

    def scrape() -> str:
        # The receiver's page (its counters and the shared gauges) and the worker's own.
        resp = client.get("/metrics")
        assert resp.status_code == 200
        assert svc.worker is not None
        return resp.get_data(as_text=True) + worker_metrics(svc.worker.metrics_port)

    before = scrape()
    sandbox.patient("+15551234567")
    params = sms_params("+15551234567", "metrics please")
    assert post_signed(client, params).status_code == 200
    assert client.post("/webhooks/twilio/sms", data=params).status_code == 403
    comm = message_in_thread(sandbox, patient(sandbox), "SMSWRIT")
    state(svc, send(svc, {"communication": f"Communication/{comm['id']}"}).get_json()["id"],
          "sent")

    def moved() -> str | None:
        text = scrape()
        checks = [
            ("switchboard_webhooks_received_total", {"endpoint": "twilio-sms"}, 2),
            ("switchboard_webhooks_rejected_total",
             {"endpoint": "twilio-sms", "reason": "bad-signature"}, 1),
            ("switchboard_webhooks_enqueued_total", {"endpoint": "twilio-sms"}, 1),
            ("switchboard_webhooks_enqueued_total", {"endpoint": "api-messages"}, 1),
            ("switchboard_tasks_total",
             {"task": "switchboard.inbound.sms", "outcome": "succeeded"}, 1),
            ("switchboard_tasks_total",
             {"task": "switchboard.outbound.send", "outcome": "succeeded"}, 1),
            ("switchboard_sends_total", {"channel": "sms", "outcome": "sent"}, 1),
            ("switchboard_fhir_request_seconds_count", {"operation": "conditional-create"}, 1),
        ]
        for name, labels, delta in checks:
            if metric(text, name, **labels) - metric(before, name, **labels) < delta:
                return None
        return text

    text = eventually(moved, timeout=20, what="metrics to move")
    assert 'switchboard_queue_depth{queue="inbound"}' in text
    assert "switchboard_dead_letter_entries" in text
    assert "switchboard_messages_in_flight" in text


def test_gunicorn_workers_add_up_on_every_scrape(services: Services, log_dir: Path,
                                                tmp_path: Path) -> None:
    # A scrape reaches one of gunicorn's workers; in prometheus_client's multiprocess mode
    # (web/gunicorn_conf.py) each answers with the sum over all of them.
    svc = services.get(worker=False)
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"stale")  # a previous run's: wiped
    port = devstack.free_port()
    web = devstack.start_web({**svc.env, "PROMETHEUS_MULTIPROC_DIR": str(directory)}, log_dir,
                             port, workers=2, name="web-metrics")
    try:
        url = f"http://127.0.0.1:{port}"
        forged = sms_params("+15551234567", "not signed")

        def post(_: int) -> int:
            # A connection each, so that either worker may take it.
            return httpx.post(f"{url}/webhooks/twilio/sms", data=forged, timeout=30).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(post, range(40))) == {403}
        for _ in range(6):
            page = httpx.get(f"{url}/metrics", timeout=30).text
            assert metric(page, "switchboard_webhooks_received_total",
                          endpoint="twilio-sms") == 40
            assert metric(page, "switchboard_webhooks_rejected_total", endpoint="twilio-sms",
                          reason="bad-signature") == 40
            assert "switchboard_queue_depth" in page and "switchboard_redis_up 1.0" in page
        assert not (directory / "counter_999999.db").exists()
        assert list(directory.glob("counter_*.db"))
    finally:
        web.stop()


def test_a_prefork_worker_in_multiprocess_mode_serves_its_pool_s_counts(
        services: Services, sandbox: Sandbox, log_dir: Path, tmp_path: Path) -> None:
    # Not the shipped pool (threads: one process), but the documented way to run prefork:
    # the children count into PROMETHEUS_MULTIPROC_DIR and the main process's port adds up.
    svc = services.get(worker=False)
    sandbox.patient("+15551234567")
    worker = devstack.start_worker({**svc.env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
                                   log_dir, name="worker-prefork-metrics", pool="prefork",
                                   concurrency=2)
    try:
        for n in range(4):
            deliver(svc, sms_params("+15551234567", f"prefork {n}"))

        def counted() -> str | None:
            page = worker_metrics(worker.metrics_port)
            done = metric(page, "switchboard_tasks_total", task="switchboard.inbound.sms",
                          outcome="succeeded")
            return page if done == 4 else None

        eventually(counted, timeout=60, what="the pool's four tasks counted")
    finally:
        worker.stop()


def test_readiness_names_the_failed_dependency(services: Services, sandbox: Sandbox) -> None:
    svc = services.get(worker=False)
    assert svc.app().test_client().get("/readyz").get_json() == {"status": "ready"}
    from web.app import create_app
    from worker.settings import load_settings

    dead_redis = load_settings({**svc.env, "REDIS_URL": f"redis://127.0.0.1:"
                                                        f"{devstack.free_port()}/0"})
    resp = create_app(dead_redis).test_client().get("/readyz")
    assert resp.status_code == 503 and list(resp.get_json()["failed"]) == ["redis"]
    # Its /metrics still answers, with this process's counters (rejections pile up exactly
    # while Redis is down) and without the gauges it could not read.
    page = create_app(dead_redis).test_client().get("/metrics")
    assert page.status_code == 200
    assert b"switchboard_redis_up 0.0" in page.data
    assert b"# TYPE switchboard_webhooks_rejected_total counter" in page.data
    bad_secret = load_settings({**svc.env, "FHIR_CLIENT_SECRET": "wrong"})
    resp = create_app(bad_secret).test_client().get("/readyz")
    assert resp.status_code == 503 and list(resp.get_json()["failed"]) == ["fhir"]
    assert "401" in resp.get_json()["failed"]["fhir"]


def test_switchboard_check_reports_each_problem_with_its_fix(services: Services) -> None:
    svc = services.get(worker=False)
    base = {k: v for k, v in os.environ.items() if k not in svc.env}

    def check(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "worker.ops.cli", "check"],
                              env={**base, **env}, capture_output=True, text=True,
                              timeout=60, check=False)

    good = check(**svc.env)
    assert good.returncode == 0, good.stdout
    assert "ok   redis" in good.stdout and "ok   fhir" in good.stdout
    assert "warn sms-sending" in good.stdout  # valid, but a feature is off
    bad = check(**{**svc.env, "FHIR_CLIENT_SECRET": "wrong"})
    assert bad.returncode == 1
    assert "FAIL fhir" in bad.stdout and "FHIR_CLIENT_SECRET" in bad.stdout
    missing = check(**{k: v for k, v in make_env("redis://x", "https://f/").items()
                       if k != "FHIR_CLIENT_ID"})
    assert missing.returncode == 1 and "FAIL config: FHIR_CLIENT_ID: missing" in missing.stdout


def test_stuck_sends_are_reconciled_with_the_provider(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox) -> None:
    from worker.broker.celery_app import QUEUE_STATUS, TASK_RECONCILE, create_celery

    providers.reset()
    svc = services.get(**outbound_env(providers))
    comms = [message_in_thread(sandbox, patient(sandbox), "SMSWRIT") for _ in range(3)]
    sids = [state(svc, send(svc, {"communication": f"Communication/{c['id']}"}).get_json()["id"],
                  "sent")["provider_id"] for c in comms]
    for c in comms:  # reconciliation finds sends by the provider id written on them
        recorded(sandbox, c["id"], svc.settings.message_id_system)
    # The provider knows the outcome, but its callbacks never reached us.
    providers.set_status(sids[0], "delivered")
    providers.set_status(sids[1], "undelivered", error_code=30005)
    create_celery(svc.settings).send_task(TASK_RECONCILE, kwargs={"stuck_after": 0},
                                          queue=QUEUE_STATUS)

    def status_of(comm: dict[str, str]) -> str:
        return str(sandbox.fhir.read("Communication", comm["id"]).resource["status"])

    eventually(lambda: status_of(comms[0]) == "completed" and status_of(comms[1]) == "stopped",
               what="stuck sends reconciled")
    assert status_of(comms[2]) == "in-progress"  # still only "queued" at the provider
    def counted() -> str | None:
        assert svc.worker is not None
        text = worker_metrics(svc.worker.metrics_port)  # the worker that reconciled
        done = metric(text, "switchboard_reconciled_total", outcome="completed") >= 1
        return text if done else None

    text = eventually(counted, what="reconcile metrics")
    assert metric(text, "switchboard_reconciled_total", outcome="stopped") >= 1
    fetched = [r for r in providers.requests("twilio") if r["method"] == "GET"]
    assert len(fetched) == 3
