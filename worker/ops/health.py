"""Dependency checks shared by `/readyz` and `switchboard check` (one implementation)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import redis

from worker.fhir.client import TokenSource
from worker.httpclient import new_client
from worker.settings import Settings
from worker.stores.connection import redis_client


@dataclass(frozen=True)
class Check:
    """One dependency's state, and what to do about it when it is down."""

    name: str
    ok: bool
    detail: str = ""
    fix: str = ""


def check_redis(settings: Settings) -> Check:
    """Redis answers PING."""
    client = redis_client(settings, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
        return Check("redis", True)
    except redis.exceptions.RedisError as exc:
        return Check("redis", False, type(exc).__name__,
                     "start Redis or fix REDIS_URL (host, port, password, TLS)")
    finally:
        client.close()


def check_fhir_token(settings: Settings) -> Check:
    """A FHIR access token can be obtained with the configured client credentials."""
    http = new_client(settings.fhir_token_url, 1, settings.fhir_timeout_seconds)
    tokens = TokenSource(http, settings.fhir_token_url, settings.fhir_client_id,
                         settings.fhir_client_secret.get_secret_value(),
                         settings.fhir_timeout_seconds)
    try:
        tokens.get()
        return Check("fhir", True)
    except Exception as exc:  # FhirTransientError for every failure; text has no secret
        refused = getattr(exc, "status", None) == 401
        # The reason slug and status only (no URL, no secret): /readyz is unauthenticated.
        detail = f"{getattr(exc, 'reason', type(exc).__name__)}"
        if getattr(exc, "status", None):
            detail += f" ({exc.status})"  # type: ignore[attr-defined]
        return Check("fhir", False, detail,
                     "check FHIR_CLIENT_ID / FHIR_CLIENT_SECRET (the ClientApplication)"
                     if refused else "check FHIR_BASE_URL / FHIR_TOKEN_URL and the network")
    finally:
        http.close()


def _writable(directory: Path) -> bool:
    """Whether this process can create `directory` (or has) and write in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


def readiness(settings: Settings) -> list[Check]:
    """Every dependency the service needs to work."""
    return [check_redis(settings), check_fhir_token(settings)]


def configuration_warnings(settings: Settings) -> list[Check]:
    """Settings that are valid but leave a feature off."""
    out = []
    if not (settings.twilio_from_number or settings.twilio_messaging_service_sid):
        out.append(Check("sms-sending", False, "no SMS sender configured",
                         "set TWILIO_FROM_NUMBER or TWILIO_MESSAGING_SERVICE_SID"))
    if not (settings.sendgrid_api_key.get_secret_value() and settings.sendgrid_from_email):
        out.append(Check("email-sending", False, "no email sender configured",
                         "set SENDGRID_API_KEY and SENDGRID_FROM_EMAIL"))
    if not settings.sendgrid_event_verification_key:
        out.append(Check("sendgrid-events", False, "SENDGRID_EVENT_VERIFICATION_KEY unset: POST "
                         "/webhooks/sendgrid/events refuses every request (fail closed), so no "
                         "email delivery, bounce or unsubscribe is recorded",
                         "turn on the signed Event Webhook in SendGrid (Mail Settings) and set "
                         "SENDGRID_EVENT_VERIFICATION_KEY to its verification key"))
    if not (settings.sendgrid_inbound_verification_key
            or settings.sendgrid_inbound_basic_auth.get_secret_value()):
        out.append(Check("email-inbound", False, "neither SENDGRID_INBOUND_VERIFICATION_KEY "
                         "nor SENDGRID_INBOUND_BASIC_AUTH is set: POST /webhooks/sendgrid/"
                         "inbound refuses every request (fail closed)",
                         "set SENDGRID_INBOUND_VERIFICATION_KEY to the key of the Inbound Parse "
                         "security policy (or SENDGRID_INBOUND_BASIC_AUTH=user:password)"))
    if not settings.api_token_list():
        out.append(Check("api", False, "no API tokens: POST /v1/messages answers 401",
                         "set API_TOKENS to one or more comma-separated secrets"))
    if not settings.fhir_subscription_secret.get_secret_value():
        out.append(Check("fhir-subscription", False, "no FHIR_SUBSCRIPTION_SECRET: automatic "
                         "outbound is off (POST /webhooks/fhir/subscription answers 403)",
                         "set FHIR_SUBSCRIPTION_SECRET to a long random secret, then run "
                         "`switchboard subscription install`"))
    if not settings.optout_hash_key.get_secret_value():
        out.append(Check("optout-key", False, "OPTOUT_HASH_KEY unset: opt-outs are keyed by a "
                         "key derived from TWILIO_AUTH_TOKEN",
                         "set OPTOUT_HASH_KEY to a long random secret before rotating the "
                         "Twilio token (or opt-outs recorded so far are no longer found)"))
    spool = settings.spool_path
    if spool is None:
        out.append(Check("spool", False, "SPOOL_DIR is empty: while Redis is unreachable the "
                         "receiver answers webhooks 503 (Twilio retries only if configured to)",
                         "unset SPOOL_DIR (DATA_DIR/spool) or set it to a directory on a "
                         "persistent local disk (docs/spool.md)"))
    elif not _writable(spool):
        out.append(Check("spool", False, f"{spool} cannot be created or written: while Redis "
                         "is unreachable webhooks get 503",
                         "make DATA_DIR (or SPOOL_DIR) a directory this user may write"))
    if not settings.public_base_url.startswith("https://"):
        out.append(Check("public-url", False, "PUBLIC_BASE_URL is not https",
                         "Twilio only calls https URLs outside development"))
    return out
