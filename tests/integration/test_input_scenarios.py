"""Scenarios 6 and 7, run small: hostile input and forged webhooks never crash the receiver,
never pass authentication and never reach a queue (tests/reliability/input_scenarios.py)."""

from __future__ import annotations

from tests.conftest import Services
from tests.email_payloads import VERIFICATION_KEY
from tests.reliability.input_scenarios import QUEUES, run_bad_input, run_forgery
from tests.support import AUTH_TOKEN, PUBLIC_BASE_URL
from worker.ops import devstack


def test_bad_input_never_crashes_authenticates_or_enqueues(services: Services) -> None:
    # Verification keys and a subscription secret, so event batches, emails and FHIR
    # notifications meet the signature checks, not the fail-closed refusal (fuzzing a route
    # that refuses everything tests nothing past its first line).
    svc = services.get(worker=False, API_TOKENS="t0k", FHIR_SUBSCRIPTION_SECRET="sub-s3cret",
                       SENDGRID_EVENT_VERIFICATION_KEY=devstack.sendgrid_event_keys()[1],
                       SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    failures: list[str] = []
    counts = run_bad_input(svc.app(), svc.redis, examples=150, failures=failures)
    assert counts["requests"] >= 150
    assert counts["authorised"] > 0  # some bodies reached the parser past authentication
    bad = {k: counts[k] for k in ("status_5xx", "accepted_without_auth", "authorised_2xx",
                                  "enqueued", "exceptions")}
    assert bad == dict.fromkeys(bad, 0), "\n".join([str(counts), *failures[:20]])


def test_forged_webhooks_are_refused_and_signed_ones_accepted(services: Services) -> None:
    svc = services.get(worker=False)
    failures: list[str] = []
    try:
        counts = run_forgery(svc.app(), svc.redis, PUBLIC_BASE_URL, AUTH_TOKEN, n=20,
                             failures=failures)
    finally:
        # The controls' messages (and any inbox records of them): no worker consumes this db.
        svc.redis.delete(*QUEUES, *svc.redis.scan_iter("switchboard:inbox:*"))
    detail = "\n".join([str(counts), *failures[:20]])
    assert counts["attacks"] >= 20 * 25, detail
    assert counts["rejected"] == counts["attacks"], detail
    assert counts["accepted"] == 0, detail
    assert counts["enqueued"] == 0, detail
    assert counts["status_5xx"] == 0, detail
    # The control: a correctly signed request is accepted and enqueued (else all of the above
    # could pass because nothing is ever accepted).
    assert counts["controls"] == 20 * 3, detail
    assert counts["controls_accepted"] == counts["controls"], detail
    # At least one message per payload (the 3 controls of a payload share a MessageSid, which a
    # receiver may legitimately publish once).
    assert counts["controls_enqueued"] >= 20, detail
    # No timestamp in Twilio's signature: an identical replay passes it (MessageSid idempotency
    # in the worker makes it harmless).
    assert counts["replays_accepted"] == counts["replays"] > 0, detail
