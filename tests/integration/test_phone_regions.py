"""Phone numbers of every country end to end, under PHONE_DEFAULT_REGION GB, AU and US: a
patient stored with a national spelling is found by an inbound E.164 number, and texts go to
the E.164 number the stored value means in that region, never to a guess.

Real receiver, Redis and worker; the FHIR sandbox; Twilio faked at HTTP by the provider
sandbox and reached with the real SDK. Numbers are from the ranges set aside for drama and
tests (Ofcom 07700 900xxx, ACMA 0491 570 xxx, NANP 555).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import API_TOKEN, Service, Services, outbound_env
from tests.integration.test_inbound_sms import deliver, landed
from tests.support import ProviderSandbox, Sandbox, eventually, sms_params

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture()
def providers_clean(providers: ProviderSandbox) -> ProviderSandbox:
    """The provider sandbox, emptied for this test."""
    providers.reset()
    return providers


def service(services: Services, providers: ProviderSandbox, region: str) -> Service:
    """One worker per region, for inbound and outbound alike. US is the default: that
    configuration sets nothing (and is shared with tests/integration/test_outbound.py)."""
    extra = {} if region == "US" else {"PHONE_DEFAULT_REGION": region}
    return services.get(**outbound_env(providers, **extra))


def patient(sandbox: Sandbox, stored: str) -> dict[str, Any]:
    """A Patient whose only contact is a mobile number stored as `stored`."""
    return sandbox.fhir.create({
        "resourceType": "Patient", "name": [{"family": "Test", "given": ["Pat"]}],
        "telecom": [{"system": "phone", "value": stored, "use": "mobile"}]}).resource


def send_text(svc: Service, pat: dict[str, Any]) -> Any:
    """POST /v1/messages for a text to `pat`, waiting for the verdict."""
    return svc.app().test_client().post("/v1/messages", headers={**AUTH, "Prefer": "wait=20"},
                                        json={"resourceType": "Communication",
                                              "status": "in-progress", "channel": "sms",
                                              "recipient": [{"reference":
                                                             f"Patient/{pat['id']}"}],
                                              "payload": [{"contentString": "Results ready"}]})


@pytest.mark.parametrize(("region", "stored", "sender"), [
    ("GB", "07700 900123", "+447700900123"),
    ("GB", "+44 (0)7700 900124", "+447700900124"),
    ("GB", "7700900125", "+447700900125"),
    ("GB", "07700 900126", "whatsapp:+447700900126"),
    ("AU", "0491 570 156", "+61491570156"),
    ("AU", "+61 491 570 157", "+61491570157"),
    ("AU", "0491570158", "whatsapp:+61491570158"),
    ("US", "(555) 123-4567", "+15551234567"),
    ("US", "555.123.4568", "+15551234568"),
])
def test_inbound_finds_the_patient_stored_with_a_national_spelling(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox, region: str,
        stored: str, sender: str) -> None:
    svc = service(services, providers, region)
    pat = patient(sandbox, stored)
    params = sms_params(sender, "hello from abroad")
    deliver(svc, params)
    msg = landed(sandbox, params["MessageSid"])
    assert msg["sender"]["reference"] == f"Patient/{pat['id']}"
    (header,) = sandbox.headers()
    assert header["subject"]["reference"] == f"Patient/{pat['id']}"
    assert svc.dead_letters.count() == 0


def test_a_national_spelling_of_another_region_does_not_match(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox) -> None:
    """Under US, a stored `7700900123` is the US number +1 770-090-0123, not the UK sender."""
    svc = service(services, providers, "US")
    patient(sandbox, "7700900123")
    params = sms_params("+447700900123", "not that patient")
    deliver(svc, params)
    entry = eventually(lambda: svc.dead_letters.list(), what="dead letter")[0]
    assert entry.reason == "unknown-sender"
    assert sandbox.messages(params["MessageSid"]) == []


@pytest.mark.parametrize("sender", ["+4412345", "12345"])
def test_an_invalid_inbound_from_is_a_dead_letter_with_its_reason(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox, sender: str) -> None:
    svc = service(services, providers, "GB")
    params = sms_params(sender, "from nowhere")
    deliver(svc, params)  # accepted: refused, Twilio would drop it
    entry = eventually(lambda: svc.dead_letters.list(), what="dead letter")[0]
    assert entry.reason == "invalid-sender"
    assert "not a valid phone number" in entry.detail and "12345" not in entry.detail
    assert sandbox.all("Communication") == []


@pytest.mark.parametrize(("region", "stored", "to"), [
    ("GB", "07700 900123", "+447700900123"),
    ("GB", "+44 (0)20 7946 0958", "+442079460958"),  # was sent to +4402079460958
    ("AU", "0491 570 156", "+61491570156"),
    ("AU", "0412 345 678", "+61412345678"),
    ("US", "(555) 123-4567", "+15551234567"),
    ("US", "+61 491 570 156", "+61491570156"),
])
def test_outbound_texts_the_number_the_stored_value_means_in_the_region(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox, region: str,
        stored: str, to: str) -> None:
    svc = service(services, providers_clean, region)
    resp = send_text(svc, patient(sandbox, stored))
    assert resp.status_code == 200, resp.get_json()
    (req,) = providers_clean.requests("twilio")
    assert req["form"]["To"] == to


@pytest.mark.parametrize(("region", "stored"), [
    ("US", "0412 345 678"),  # was sent to +10412345678
    ("US", "07700 900123"),
    ("GB", "12345"),  # must not become +4412345
    ("AU", "555-0100"),
])
def test_outbound_refuses_a_number_that_is_not_valid_in_the_region(
        services: Services, sandbox: Sandbox, providers_clean: ProviderSandbox, region: str,
        stored: str) -> None:
    svc = service(services, providers_clean, region)
    resp = send_text(svc, patient(sandbox, stored))
    assert resp.status_code == 422, resp.get_json()
    assert resp.get_json()["error"] == "invalid-recipient"
    assert providers_clean.requests("twilio") == []
    entry = eventually(lambda: svc.dead_letters.list(), what="dead letter")[0]
    assert entry.reason == "invalid-recipient"
    assert "not a valid phone number" in entry.detail
    digits = "".join(c for c in stored if c.isdigit())
    assert digits not in "".join(c for c in entry.detail if c.isdigit())


def test_the_optout_command_reads_the_number_in_the_region(
        services: Services, capsys: pytest.CaptureFixture[str]) -> None:
    """An operator types the number as the patient's record has it; the opt-out must be the
    one a send to that patient checks (keyed on E.164)."""
    from argparse import Namespace

    from worker.ops.cli import cmd_optout
    from worker.stores.optouts import OptOuts

    gb = services.get(worker=False, PHONE_DEFAULT_REGION="GB")
    args = Namespace(action="add", address="07700 900123", channel="sms")
    assert cmd_optout(gb.settings, args) == 0
    optouts = OptOuts(gb.redis, gb.settings.optout_key())
    assert optouts.has("sms", "+447700900123")
    optouts.remove("sms", "+447700900123")
    us = services.get(worker=False)
    assert cmd_optout(us.settings, args) == 2  # not a number in the US: refused, not guessed
    assert "not a phone number" in capsys.readouterr().err
