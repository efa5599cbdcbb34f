"""The service as operators run it: gunicorn, the dlq commands, a killed worker, clean logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import Services, make_env
from tests.integration.test_inbound_sms import PATIENT, deliver, landed
from tests.support import Sandbox, eventually, post_signed, sms_params
from worker.ops import devstack
from worker.stores.dead_letters import DeadLetter

SWITCHBOARD = [sys.executable, "-m", "worker.ops.cli"]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `switchboard` command line with this configuration."""
    return subprocess.run([*SWITCHBOARD, *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60, check=False)


def test_dead_letter_commands_list_show_replay_purge(services: Services, sandbox: Sandbox
                                                     ) -> None:
    svc = services.get(SMS_THREAD_STRATEGY="conversation", UNKNOWN_SENDER_POLICY="reject")
    params = sms_params(PATIENT, "before I was registered")
    deliver(svc, params)
    entry = eventually(lambda: svc.dead_letters.list(), what="dead letter")[0]

    listed = cli(svc.env, "dlq", "list")
    assert listed.returncode == 0 and entry.id in listed.stdout and "unknown-sender" in \
        listed.stdout
    as_json = json.loads(cli(svc.env, "dlq", "list", "--json").stdout)
    assert as_json[0]["args"][0]["MessageSid"] == params["MessageSid"]
    filtered = json.loads(cli(svc.env, "dlq", "list", "--reason", "unknown-sender", "--json",
                              "--since", "10m").stdout)
    assert [e["id"] for e in filtered] == [entry.id]
    assert json.loads(cli(svc.env, "dlq", "list", "--reason", "fhir-422", "--json").stdout) == []
    shown = json.loads(cli(svc.env, "dlq", "show", entry.id).stdout)
    assert shown["reason"] == "unknown-sender" and shown["attempts"] == 1
    assert cli(svc.env, "dlq", "show", "nope").returncode == 1

    # The clinic registers the patient; the replay now succeeds and removes the entry.
    sandbox.patient(PATIENT)
    replayed = cli(svc.env, "dlq", "replay", entry.id)
    assert replayed.returncode == 0, replayed.stderr
    landed(sandbox, params["MessageSid"])
    eventually(lambda: svc.dead_letters.count() == 0, what="entry removed after replay")

    # A replay that fails again keeps one entry, with its history.
    other = sms_params("+15550000001", "still unknown")
    deliver(svc, other)
    first = eventually(lambda: svc.dead_letters.list(), what="dead letter")[0]
    assert cli(svc.env, "dlq", "replay", "--all").returncode == 0
    again = eventually(lambda: [e for e in svc.dead_letters.list() if e.failures == 2],
                       what="second failure recorded")[0]
    assert again.id == first.id and again.attempts == 2
    assert cli(svc.env, "dlq", "purge").returncode == 2  # needs --yes
    assert "purged 1" in cli(svc.env, "dlq", "purge", "--yes").stdout


def test_bad_configuration_fails_fast_with_every_problem(services: Services) -> None:
    bad = {k: v for k, v in make_env("redis://x", "https://f/fhir/R4/").items()
           if k != "TWILIO_AUTH_TOKEN"}
    bad["SMS_THREAD_STRATEGY"] = "nope"
    env = {k: v for k, v in os.environ.items() if k not in bad and k != "TWILIO_AUTH_TOKEN"}
    proc = subprocess.run([*SWITCHBOARD, "dlq", "list"], env={**env, **bad},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "TWILIO_AUTH_TOKEN: missing" in proc.stderr
    assert "SMS_THREAD_STRATEGY" in proc.stderr


def test_gunicorn_receiver_end_to_end(services: Services, sandbox: Sandbox, log_dir: Path
                                      ) -> None:
    svc = services.get(SMS_THREAD_STRATEGY="conversation")
    port = devstack.free_port()
    web = devstack.start_web(svc.env, log_dir, port)
    try:
        patient = sandbox.patient(PATIENT)
        params = sms_params(PATIENT, "through gunicorn")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            resp = post_signed(http, params)
            assert resp.status_code == 200 and "<Response>" in resp.text
            forged = http.post("/webhooks/twilio/sms", data=params)
            assert forged.status_code == 403
        msg = landed(sandbox, params["MessageSid"])
        assert msg["sender"]["reference"] == f"Patient/{patient['id']}"
    finally:
        web.stop()


def test_worker_killed_mid_message_loses_nothing(services: Services, sandbox: Sandbox,
                                                 log_dir: Path) -> None:
    svc = services.get(worker=False)
    env = {**svc.env, "BROKER_VISIBILITY_TIMEOUT_SECONDS": "5", "FHIR_TIMEOUT_SECONDS": "1"}
    sandbox.patient(PATIENT)
    # The worker's first write hangs long enough for us to kill it mid-task, and then fails,
    # so only a redelivery to another worker can write the message.
    sandbox.fault(delay_ms=4000, status=503, count=1, method="POST")
    worker = devstack.start_worker(env, log_dir, name="worker-doomed", concurrency=2)
    params = sms_params(PATIENT, "survives a crash")
    deliver(svc, params)
    eventually(lambda: svc.redis.hlen("unacked") == 1, what="message in flight")
    worker.kill()
    replacement = devstack.start_worker(env, log_dir, name="worker-replacement", concurrency=2)
    try:
        marker = f"inbound {params['MessageSid']}: created"
        eventually(lambda: marker in replacement.output(), timeout=60,
                   what="the replacement worker wrote the message")
        eventually(lambda: svc.redis.hlen("unacked") == 0, what="message acked")
        assert len(sandbox.messages(params["MessageSid"])) == 1
        assert svc.dead_letters.count() == 0
    finally:
        replacement.stop()


def test_logs_hold_no_phone_numbers_bodies_or_secrets(services: Services, sandbox: Sandbox,
                                                      log_dir: Path) -> None:
    svc = services.get(SMS_THREAD_STRATEGY="active-thread", UNKNOWN_SENDER_POLICY="reject")
    secret_body = "my rash is worse zq7x"
    sandbox.patient("+15553217654")
    ok = sms_params("+15553217654", secret_body)
    unknown = sms_params("+15553219999", secret_body + " unknown")
    sandbox.fault(status=503, count=1, method="POST")  # a retry path too
    deliver(svc, ok)
    deliver(svc, unknown)
    landed(sandbox, ok["MessageSid"])
    eventually(lambda: svc.dead_letters.list(), what="dead letter")

    def logs_with_the_written_message() -> str:
        text = "\n".join(p.read_text(errors="replace") for p in log_dir.glob("*.log")
                         if not p.name.startswith("fhir-sandbox"))
        return text if "inbound " + ok["MessageSid"] in text else ""

    # The worker logs the write after FHIR answered, so its line can trail the resource.
    text = eventually(logs_with_the_written_message, what="the worker's log line")
    for needle in ("5553217654", "555-321", secret_body, "zq7x", "test-twilio-auth-token",
                   "switchboard-test-secret"):
        assert needle not in text, needle
    # No E.164 number of any test in any worker or web log.
    assert not re.search(r"\+1555\d{7}|%2B1555\d{7}", text)
    # Worker lines are JSON objects carrying the task's context.
    ours = [json.loads(line) for line in text.splitlines()
            if line.startswith("{") and ok["MessageSid"] in line]
    written = [e for e in ours if e["event"].startswith(f"inbound {ok['MessageSid']}:")]
    assert written and written[0]["message_id"] == ok["MessageSid"]
    assert written[0]["queue"] == "inbound" and written[0]["task_id"]
    assert written[0]["task"] == "switchboard.inbound.sms" and written[0]["level"] == "info"


def test_dead_letter_filters_replay_purge_and_prune_a_filtered_set(services: Services,
                                                                    sandbox: Sandbox) -> None:
    svc = services.get(SMS_THREAD_STRATEGY="conversation", UNKNOWN_SENDER_POLICY="reject")
    stranger = sms_params("+15550000002", "who is this")
    deliver(svc, stranger)
    unknown = eventually(lambda: svc.dead_letters.query(reason="unknown-sender"),
                         what="unknown-sender dead letter")[0]
    sandbox.patient(PATIENT)

    def refused_once(body: str) -> tuple[dict[str, str], DeadLetter]:
        sandbox.fault(status=422, count=1, method="POST", path_contains="Communication")
        params = sms_params(PATIENT, body)
        deliver(svc, params)
        found = eventually(lambda: [e for e in svc.dead_letters.query(reason="fhir-422")
                                    if e.args[0]["MessageSid"] == params["MessageSid"]],
                           what="fhir-422 dead letter")
        return params, found[0]

    refused, rejected = refused_once("refused once zq8y")

    listed = json.loads(cli(svc.env, "dlq", "list", "--reason", "unknown-sender", "--json").stdout)
    assert [e["id"] for e in listed] == [unknown.id]
    assert listed[0]["args"][0]["MessageSid"] == stranger["MessageSid"]
    by_task = cli(svc.env, "dlq", "list", "--task", rejected.task, "--since", "10m").stdout
    assert unknown.id in by_task and rejected.id in by_task
    future = cli(svc.env, "dlq", "list", "--since", "2999-01-01T00:00:00+00:00")
    assert "no dead letters match" in future.stdout
    bad = cli(svc.env, "dlq", "list", "--since", "yesterday")
    assert bad.returncode == 2 and "argument --since" in bad.stderr
    assert cli(svc.env, "dlq", "replay").returncode == 2  # nothing selected
    assert cli(svc.env, "dlq", "replay", rejected.id, "--reason", "x").returncode == 2

    # A dry run lists the filtered set and sends nothing.
    dry = cli(svc.env, "dlq", "replay", "--reason", "fhir-422", "--dry-run")
    assert dry.returncode == 0 and f"would replay {rejected.id}" in dry.stdout
    assert unknown.id not in dry.stdout and svc.dead_letters.count() == 2

    # A filtered replay sends only that set, logs ids, tasks and reasons (no payload), and the
    # replay that succeeds removes its entry.
    replayed = cli(svc.env, "dlq", "replay", "--reason", "fhir-422")
    assert replayed.returncode == 0, replayed.stderr
    assert f"replaying {rejected.id}" in replayed.stdout and unknown.id not in replayed.stdout
    assert (f"replaying dead letter {rejected.id} (task {rejected.task}, reason fhir-422)"
            in replayed.stderr)
    for needle in ("5551234567", "zq8y", refused["MessageSid"]):
        assert needle not in replayed.stderr, needle
    landed(sandbox, refused["MessageSid"])
    eventually(lambda: [e.id for e in svc.dead_letters.list()] == [unknown.id],
               what="only the replayed entry removed")

    # A filtered purge deletes only that set.
    _, rejected_again = refused_once("refused again")
    assert svc.dead_letters.count() == 2
    purge = cli(svc.env, "dlq", "purge", "--yes", "--reason", "unknown-sender")
    assert purge.returncode == 0 and "purged 1 dead letters" in purge.stdout
    assert [e.id for e in svc.dead_letters.list()] == [rejected_again.id]
    assert "purged 0" in cli(svc.env, "dlq", "purge", "--yes", "--task", "nope").stdout

    # prune applies DEAD_LETTER_RETENTION_DAYS (30 by default) now.
    stale = svc.dead_letters.record("switchboard.test.stale", "inbound", [{"n": 1}], {},
                                    "fhir-400", "", 1, now=time.time() - 31 * 86400)
    pruned = cli(svc.env, "dlq", "prune")
    assert pruned.returncode == 0 and "pruned 1 dead letters older than 30 days" in pruned.stdout
    assert svc.dead_letters.get(stale.id) is None
    assert [e.id for e in svc.dead_letters.list()] == [rejected_again.id]
    shorter = cli({**svc.env, "DEAD_LETTER_RETENTION_DAYS": "1"}, "dlq", "prune")
    assert "pruned 0 dead letters older than 1 days" in shorter.stdout
