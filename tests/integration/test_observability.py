"""Metrics move after real flows; readiness and `switchboard check` name the broken dependency."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import Services, make_env, outbound_env
from tests.integration.test_outbound import message_in_thread, patient, recorded, send, state
from tests.support import ProviderSandbox, Sandbox, eventually, post_signed, sms_params
from worker.ops import devstack


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def test_metrics_move_after_an_inbound_and_an_outbound_flow(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox) -> None:
    providers.reset()
    svc = services.get(**outbound_env(providers))
    client = svc.app().test_client()

    def scrape() -> str:
        resp = client.get("/metrics")
        assert resp.status_code == 200
        return resp.get_data(as_text=True)

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


def test_readiness_names_the_failed_dependency(services: Services, sandbox: Sandbox) -> None:
    svc = services.get(worker=False)
    assert svc.app().test_client().get("/readyz").get_json() == {"status": "ready"}
    from web.app import create_app
    from worker.settings import load_settings

    dead_redis = load_settings({**svc.env, "REDIS_URL": f"redis://127.0.0.1:"
                                                        f"{devstack.free_port()}/0"})
    resp = create_app(dead_redis).test_client().get("/readyz")
    assert resp.status_code == 503 and list(resp.get_json()["failed"]) == ["redis"]
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
        text = svc.app().test_client().get("/metrics").get_data(as_text=True)
        done = metric(text, "switchboard_reconciled_total", outcome="completed") >= 1
        return text if done else None

    text = eventually(counted, what="reconcile metrics")
    assert metric(text, "switchboard_reconciled_total", outcome="stopped") >= 1
    fetched = [r for r in providers.requests("twilio") if r["method"] == "GET"]
    assert len(fetched) == 3
