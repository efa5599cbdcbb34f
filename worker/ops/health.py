"""Dependency checks shared by `/readyz` and `switchboard check` (one implementation)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.sentinel import SentinelConnectionPool

from worker.fhir.client import TokenSource
from worker.httpclient import new_client
from worker.settings import Settings
from worker.stores.connection import redis_client, sentinel_kwargs


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


# A replica more than this many seconds behind (INFO's `lag`: since its last acknowledgement)
# is not counted as able to acknowledge a write in time.
REPLICA_LAG_SECONDS = 1
# What `switchboard check` writes to prove WAIT can be met (expires by itself).
WAIT_PROBE_KEY = "switchboard:check:wait-probe"


def _replicas(info: dict[str, object]) -> list[dict[str, object]]:
    """INFO replication's `slaveN` entries (redis-py parses each into a dict)."""
    return [v for k, v in sorted(info.items()) if k.startswith("slave") and isinstance(v, dict)]


def _primary_address(client: redis.Redis) -> str:
    """host:port of the primary `client` talks to (asked of the Sentinels when behind them)."""
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        host, port = pool.get_master_address()  # type: ignore[no-untyped-call]
    else:
        host, port = pool.connection_kwargs.get("host"), pool.connection_kwargs.get("port")
    return f"{host}:{port}"


def redis_topology(settings: Settings) -> list[Check]:
    """What `switchboard check` shows of Redis: the Sentinels it reaches and the primary they
    name, the primary's replicas with their lag, and whether REDIS_MIN_REPLICAS_ACK can be met
    (a real write and WAIT). Addresses appear here, an operator's command, never in /readyz."""
    out: list[Check] = []
    if settings.redis_sentinels:
        named = set()
        reached = 0
        for host, port in settings.sentinel_addresses():
            s = redis.Redis(host=host, port=port, **sentinel_kwargs(settings))
            try:
                found = s.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", settings.redis_sentinel_master)
                reached += 1
                primary = f"{found[0].decode()}:{int(found[1])}" if found else ""
                if primary:
                    named.add(primary)
                out.append(Check(f"sentinel {host}:{port}", bool(found),
                                 f"names the primary {primary}" if found
                                 else f"does not monitor {settings.redis_sentinel_master!r}",
                                 "" if found else "check REDIS_SENTINEL_MASTER against "
                                 "`sentinel monitor` in sentinel.conf"))
            except redis.exceptions.RedisError as exc:
                out.append(Check(f"sentinel {host}:{port}", False, type(exc).__name__,
                                 "start it, or fix REDIS_SENTINELS / REDIS_SENTINEL_PASSWORD"))
            finally:
                s.close()
        quorum = len(settings.sentinel_addresses()) // 2 + 1
        out.append(Check("sentinels", reached >= quorum and len(named) == 1,
                         f"{reached} of {len(settings.sentinel_addresses())} reachable"
                         + (f", they disagree on the primary: {sorted(named)}"
                            if len(named) > 1 else ""),
                         "" if reached >= quorum else "a majority of Sentinels is needed to "
                         "fail over"))
    client = redis_client(settings, socket_timeout=3, socket_connect_timeout=3)
    try:
        info: dict[str, Any] = client.info("replication")  # type: ignore[assignment]
        address = _primary_address(client)
        replicas = _replicas(info)
        out.append(Check("redis-primary", info.get("role") == "master",
                         f"{address} role={info.get('role')}, "
                         f"{len(replicas)} replica(s)",
                         "" if info.get("role") == "master" else
                         "REDIS_URL names a replica: point it at the primary (or use Sentinel)"))
        for r in replicas:
            lag = int(str(r.get("lag", 0)))
            behind = int(str(info.get("master_repl_offset", 0))) - int(str(r.get("offset", 0)))
            healthy = r.get("state") == "online" and lag <= REPLICA_LAG_SECONDS
            out.append(Check(f"replica {r.get('ip')}:{r.get('port')}", healthy,
                             f"state={r.get('state')} lag={lag}s behind={behind} bytes",
                             "" if healthy else "a replica that is not online and current "
                             "cannot acknowledge writes (REDIS_MIN_REPLICAS_ACK)"))
        wanted = settings.redis_min_replicas_ack
        if wanted:
            pipe = client.pipeline(transaction=False)
            pipe.set(WAIT_PROBE_KEY, "1", ex=60)
            pipe.execute_command("WAIT", wanted, 500)  # type: ignore[no-untyped-call]
            acked = int(pipe.execute()[1])
            out.append(Check("replica-acks", acked >= wanted,
                             f"REDIS_MIN_REPLICAS_ACK={wanted}: {acked} replica(s) acknowledged "
                             "a write within 500 ms",
                             "" if acked >= wanted else "the receiver answers 503 to every "
                             "webhook until enough replicas are online: start them or lower "
                             "REDIS_MIN_REPLICAS_ACK"))
    except redis.exceptions.RedisError as exc:
        out.append(Check("redis-primary", False, type(exc).__name__,
                         "no primary reachable: check REDIS_URL / the Sentinels"))
    finally:
        client.close()
    return out
