"""Settings are validated at start-up with one clear line per problem."""

from __future__ import annotations

import pytest

from worker.settings import ConfigError, load_settings

GOOD = {
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "FHIR_BASE_URL": "https://api.medplum.com/fhir/R4",
    "FHIR_CLIENT_ID": "id",
    "FHIR_CLIENT_SECRET": "s3cr3t-value",
    "TWILIO_ACCOUNT_SID": "AC1",
    "TWILIO_AUTH_TOKEN": "tw1l1o-auth-value",
    "PUBLIC_BASE_URL": "https://sb.example.org/",
    "DATA_ENCRYPTION_KEYS": "qbXeDm3GLpVtBUq1hLtqRo1mZpqrnV5Prg1NQXYBb5I=",
}


def test_defaults_and_normalisation() -> None:
    s = load_settings(GOOD)
    assert s.fhir_base_url == "https://api.medplum.com/fhir/R4/"
    assert s.fhir_token_url == "https://api.medplum.com/oauth2/token"
    assert s.public_base_url == "https://sb.example.org"
    assert s.sms_thread_strategy == "conversation"
    assert s.unknown_sender_policy == "reject"
    assert "s3cr3t-value" not in repr(s)  # secrets never print
    assert "tw1l1o-auth-value" not in repr(s)


def test_every_problem_is_listed_with_a_fix() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({"FHIR_BASE_URL": "not a url", "SMS_THREAD_STRATEGY": "round-robin"})
    text = str(exc.value)
    assert "REDIS_URL: missing (set it to the broker" in text
    assert "FHIR_BASE_URL: Value error, must be an absolute http(s) URL" in text
    assert "SMS_THREAD_STRATEGY" in text and "conversation, active-thread, new-thread" in text
    assert "TWILIO_AUTH_TOKEN: missing" in text


def test_environment_is_read_only_through_load_settings(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setenv("UNKNOWN_SENDER_POLICY", "create-patient")
    assert load_settings(GOOD).unknown_sender_policy == "reject"
    with pytest.raises(ConfigError):
        load_settings({**GOOD, "UNKNOWN_SENDER_POLICY": "ignore"})
    assert load_settings({**GOOD, "FHIR_TOKEN_URL": "https://auth/t"}).fhir_token_url == \
        "https://auth/t"


def test_visibility_timeout_must_outlast_retry_countdowns() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({**GOOD, "BROKER_VISIBILITY_TIMEOUT_SECONDS": "100",
                       "RETRY_BACKOFF_MAX_SECONDS": "600"})
    assert "BROKER_VISIBILITY_TIMEOUT_SECONDS must exceed" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_settings({**GOOD, "THREAD_LOCK_TIMEOUT_SECONDS": "5"})
    assert "THREAD_LOCK_TIMEOUT_SECONDS" in str(exc.value)


def test_empty_secrets_are_refused() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({**GOOD, "TWILIO_AUTH_TOKEN": " ", "FHIR_CLIENT_SECRET": ""})
    assert "TWILIO_AUTH_TOKEN: Value error, must not be empty" in str(exc.value)
    assert "FHIR_CLIENT_SECRET" in str(exc.value)


def test_automatic_outbound_clients_are_client_application_ids() -> None:
    s = load_settings({**GOOD, "AUTOMATIC_OUTBOUND_CLIENTS": " ehr-bot , 7f3a.b ,"})
    assert s.automatic_outbound_client_list() == ("ehr-bot", "7f3a.b")
    assert load_settings(GOOD).automatic_outbound_client_list() == ()
    assert load_settings(GOOD).max_deferrals == 50
    with pytest.raises(ConfigError):
        load_settings({**GOOD, "AUTOMATIC_OUTBOUND_CLIENTS": "ClientApplication/ehr-bot"})
    with pytest.raises(ConfigError):
        load_settings({**GOOD, "MAX_DEFERRALS": "0"})
