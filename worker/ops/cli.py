"""`switchboard` console script: dead-letter tooling and the local launcher (`make run`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from redis import Redis

from worker.broker.spool import Spool, spool_from_settings
from worker.channels.phones import InvalidPhoneNumber, to_e164
from worker.channels.whatsapp import WINDOW_SECONDS
from worker.crypto import Unsealable, generate_key
from worker.fhir.client import FhirClient
from worker.ops import demo, logs
from worker.settings import ConfigError, Settings, load_settings
from worker.stores.connection import redis_client
from worker.stores.dead_letters import (
    REPLAY_HEADER,
    DeadLetter,
    DeadLetterStore,
    parse_since,
    quarantined,
)
from worker.stores.optouts import OptOuts
from worker.stores.whatsapp import WhatsAppStore


def _ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _store(settings: Settings) -> DeadLetterStore:
    return DeadLetterStore(redis_client(settings, socket_timeout=5),
                           settings.sealer())


def _print_entry_line(e: DeadLetter) -> None:
    print(f"{e.id}  {_ts(e.last_failed_at)}  {e.task:<28} {e.reason:<22} attempts={e.attempts}")


def _since_arg(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _add_filters(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--reason", help=f"{what} entries with this reason (e.g. unknown-sender)")
    parser.add_argument("--task", help=f"{what} entries of this task name")
    parser.add_argument("--since", type=_since_arg, metavar="WHEN",
                        help=f"{what} entries that last failed since WHEN: a duration back from "
                             "now (90s, 30m, 2h, 7d) or an ISO-8601 time with a timezone")


def _filters(args: argparse.Namespace) -> dict[str, str | float]:
    """The --reason/--task/--since given."""
    return {k: getattr(args, k) for k in ("reason", "task", "since")
            if getattr(args, k) is not None}


def _describe(filters: dict[str, str | float]) -> str:
    return " ".join(f"{k}={_ts(float(v)) if k == 'since' else v}" for k, v in filters.items())


def _dlq_log(settings: Settings) -> logging.Logger:
    """The audit logger of dlq actions (ids, task names, reasons and counts; never payloads),
    on stderr in LOG_FORMAT unless logging was configured elsewhere."""
    logger = logging.getLogger("switchboard.dlq")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logs.formatter(settings.log_format))
        logs.protect(handler)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


def cmd_dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    """List dead letters (all, or those matching the filters), newest failure first."""
    filters = _filters(args)
    entries = _store(settings).query(args.reason, args.task, args.since, limit=args.limit)
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no dead letters match {_describe(filters)}" if filters
              else "dead-letter store is empty")
    for e in entries:
        _print_entry_line(e)
    return 0


def cmd_dlq_quarantined(settings: Settings, args: argparse.Namespace) -> int:
    """List the minimal records of messages dropped as neither processable nor storable."""
    client = redis_client(settings, socket_timeout=5)
    records = quarantined(client, args.limit)
    if not records:
        print("nothing quarantined")
    for r in records:
        print(f"{_ts(float(r['at']))}  {r['task']}[{r['task_id']}]  queue={r['queue']}  "
              f"reason={r['reason']}")
    return 0


def _optouts(settings: Settings, args: argparse.Namespace) -> tuple[OptOuts, str]:
    address = args.address.strip()
    if args.channel in ("sms", "whatsapp"):
        # Read as stored numbers are, so the digest matches what a send to it checks.
        address = to_e164(address, settings.phone_default_region)  # reported by cmd_optout
    else:
        address = address.lower()
    client = redis_client(settings, socket_timeout=5)
    return OptOuts(client, settings.optout_key()), address


def cmd_optout(settings: Settings, args: argparse.Namespace) -> int:
    """Check, add or remove one address on the local opt-out list (exit 1: not on it)."""
    try:
        optouts, address = _optouts(settings, args)
    except InvalidPhoneNumber:
        print("not a phone number", file=sys.stderr)
        return 2
    if args.action == "remove":
        removed = optouts.remove(args.channel, address)
        _dlq_log(settings).info("opt-out removed by an operator (%s)", args.channel)
        print("opt-out removed" if removed else "no opt-out was recorded for it")
        return 0 if removed else 1
    if args.action == "add":
        optouts.add(args.channel, address)
        print("opt-out recorded")
        return 0
    found = optouts.has(args.channel, address)
    print("opted out" if found else "not opted out")
    return 0 if found else 1


def _whatsapp_store(settings: Settings, client: Redis) -> WhatsAppStore:
    return WhatsAppStore(client, settings.sealer(), settings.optout_key(), WINDOW_SECONDS)


def cmd_whatsapp_held(settings: Settings, args: argparse.Namespace) -> int:
    """List the WhatsApp replies held for a closed 24-hour window, oldest first: their
    Communication, API request, since when and until when (no patient details)."""
    client = redis_client(settings, socket_timeout=5)
    held = _whatsapp_store(settings, client).all()
    hold = settings.whatsapp_hold_hours * 3600
    for reply in held:
        print(f"Communication/{reply.communication_id}  request={reply.request_id}  "
              f"held={_ts(reply.held_at)}  expires={_ts(reply.held_at + hold)}")
    print(f"{len(held)} held" + ("" if settings.whatsapp_template_content_sid else
                                 " (no WHATSAPP_TEMPLATE_CONTENT_SID: none can be held)"))
    return 0


def cmd_dlq_show(settings: Settings, args: argparse.Namespace) -> int:
    """Show one entry in full (payload included: this is an operator tool, not a log)."""
    entry = _store(settings).get(args.id)
    if entry is None:
        print(f"no dead letter {args.id}", file=sys.stderr)
        return 1
    data = entry.as_dict()
    data["first_failed_at"] = _ts(entry.first_failed_at)
    data["last_failed_at"] = _ts(entry.last_failed_at)
    print(json.dumps(data, indent=2))
    return 0


def cmd_dlq_replay(settings: Settings, args: argparse.Namespace) -> int:
    """Send entries (one, all, or those matching the filters) back to their queue; an entry is
    removed when its replay succeeds."""
    from worker.broker.celery_app import REDACTED_ARGS, create_celery

    filters = _filters(args)
    if (args.id or args.all) and filters:
        print("give an ID, --all, or filters (--reason/--task/--since), not several",
              file=sys.stderr)
        return 2
    if not (args.id or args.all or filters):
        print("give an ID, --all, or filters (--reason/--task/--since)", file=sys.stderr)
        return 2
    store = _store(settings)
    if args.id:
        found = store.get(args.id)
        if found is None:
            print(f"no dead letter {args.id}", file=sys.stderr)
            return 1
        entries = [found]
    else:
        entries = store.query(args.reason, args.task, args.since, limit=None)
    if args.dry_run:
        for e in entries:
            print(f"would replay {e.id} ({e.task}, {e.reason})")
        print(f"{len(entries)} would be replayed (dry run: nothing sent)")
        return 0
    if not entries:
        print(f"no dead letters match {_describe(filters)}" if filters
              else "dead-letter store is empty")
        return 0
    log = _dlq_log(settings)
    celery = create_celery(settings)
    sent = 0
    for e in entries:
        try:
            # An `undecryptable` message goes out as it was first sent, once its key is back.
            task_args, task_kwargs = store.replay_payload(e)
        except Unsealable as exc:
            log.warning("dead letter %s not replayed: still sealed with a key that is not "
                        "configured", e.id)
            print(f"not replaying {e.id} ({e.task}, {e.reason}): {exc}; configure that key "
                  "in DATA_ENCRYPTION_KEYS")
            continue
        celery.send_task(e.task, args=task_args, kwargs=task_kwargs, queue=e.queue or None,
                         headers={REPLAY_HEADER: e.id}, **REDACTED_ARGS)
        log.info("replaying dead letter %s (task %s, reason %s)", e.id, e.task, e.reason)
        print(f"replaying {e.id} ({e.task}, {e.reason})")
        sent += 1
    print(f"{sent} replayed; entries are removed as their replays succeed")
    return 0 if sent == len(entries) else 1


def cmd_dlq_purge(settings: Settings, args: argparse.Namespace) -> int:
    """Delete every entry, or only those matching the filters."""
    if not args.yes:
        print("refusing to purge without --yes", file=sys.stderr)
        return 2
    filters = _filters(args)
    n = _store(settings).purge(args.reason, args.task, args.since)
    scope = f" matching {_describe(filters)}" if filters else ""
    _dlq_log(settings).info("purged %d dead letters%s", n, scope)
    print(f"purged {n} dead letters{scope}")
    return 0


def cmd_dlq_prune(settings: Settings, args: argparse.Namespace) -> int:
    """Apply the retention now: delete entries that last failed over
    DEAD_LETTER_RETENTION_DAYS ago."""
    days = settings.dead_letter_retention_days
    n = _store(settings).prune(days * 86400)
    _dlq_log(settings).info("pruned %d dead letters older than %d days", n, days)
    print(f"pruned {n} dead letters older than {days} days")
    return 0


def cmd_check(_: Settings | None, args: argparse.Namespace) -> int:
    """Validate the configuration and reach every dependency; print each problem and its fix."""
    from worker.ops.health import configuration_warnings, readiness, redis_topology

    try:
        settings = load_settings()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"FAIL config: {problem}")
        return 1
    print("ok   config: all settings valid")
    sealer = settings.sealer()
    print(f"ok   keys: {len(sealer.key_ids)} configured, sealing with key id "
          f"{sealer.current_id}")
    failed = False
    for check in readiness(settings):
        if check.ok:
            print(f"ok   {check.name}")
        else:
            failed = True
            print(f"FAIL {check.name}: {check.detail} -> {check.fix}")
    spool = spool_from_settings(settings)
    if spool is not None:
        waiting = spool.status()
        print(f"ok   spool: {spool.directory} ({waiting.entries} entries waiting"
              f"{f', {waiting.kept} kept as unopenable' if waiting.kept else ''})")
    # The Redis topology as this host sees it (docs/redis-ha.md): a replica lagging or a
    # Sentinel down is a warning; REDIS_MIN_REPLICAS_ACK that cannot be met fails the check.
    for check in redis_topology(settings):
        hard = check.name in ("replica-acks", "redis-primary")
        failed = failed or (hard and not check.ok)
        status = "ok  " if check.ok else ("FAIL" if hard else "warn")
        print(f"{status} {check.name}: {check.detail}" + ("" if check.ok else f" -> {check.fix}"))
    for warning in configuration_warnings(settings):
        print(f"warn {warning.name}: {warning.detail} -> {warning.fix}")
    return 1 if failed else 0


# -- FHIR Subscription (automatic outbound) ----------------------------------------------------

def _fhir(settings: Settings) -> FhirClient:
    return FhirClient(settings.fhir_base_url, settings.fhir_token_url, settings.fhir_client_id,
                      settings.fhir_client_secret.get_secret_value(),
                      timeout=settings.fhir_timeout_seconds)


def _refused(what: str, exc: Exception) -> int:
    """Say why the FHIR server did not do it (exit 1)."""
    from worker.fhir.outcome import FhirPermanentError

    if isinstance(exc, FhirPermanentError):
        print(f"FAIL {what}: the FHIR server refused (HTTP {exc.status}): "
              f"{exc.outcome_text or 'no reason given'}", file=sys.stderr)
        if exc.status in (401, 403):
            print("  the client needs write access to Subscription and read access to "
                  "AuditEvent (docs/automatic-outbound.md)", file=sys.stderr)
    else:
        print(f"FAIL {what}: {exc}", file=sys.stderr)
    return 1


def cmd_subscription_install(settings: Settings, args: argparse.Namespace) -> int:
    """Create or update the Subscription that posts new replies to this service."""
    from worker.errors import SwitchboardError
    from worker.fhir import subscription as sub

    secret = settings.fhir_subscription_secret.get_secret_value()
    if not secret:
        print("FAIL install: FHIR_SUBSCRIPTION_SECRET is not set (a long random secret; the "
              "receiver checks every notification's signature with it)", file=sys.stderr)
        return 2
    fhir = _fhir(settings)
    try:
        done = sub.install(fhir, settings.public_base_url, secret)
    except SwitchboardError as exc:
        return _refused("install", exc)
    finally:
        fhir.close()
    r = done.resource
    print(f"{'created' if done.created else 'updated'} Subscription/{r.get('id')} "
          f"(tag {sub.TAG_SYSTEM}|{sub.TAG_CODE})")
    print(f"  criteria  {r.get('criteria')}  (on create only)")
    print(f"  endpoint  {(r.get('channel') or {}).get('endpoint')}  "
          f"(rest-hook, {(r.get('channel') or {}).get('payload')}, signed with "
          "FHIR_SUBSCRIPTION_SECRET)")
    print(f"  status    {r.get('status')}")
    return 0


def cmd_subscription_status(settings: Settings, args: argparse.Namespace) -> int:
    """Show the installed Subscription and the failed deliveries the server recorded."""
    import hmac as _hmac

    from worker.errors import SwitchboardError
    from worker.fhir import subscription as sub

    fhir = _fhir(settings)
    try:
        found = sub.installed(fhir)
        if not found:
            print("no Switchboard Subscription on the FHIR server: run "
                  "`switchboard subscription install`")
            return 1
        healthy = True
        for r in found:
            channel = r.get("channel") or {}
            secret = sub.extension_value(r, sub.SECRET_EXTENSION)
            ours = settings.fhir_subscription_secret.get_secret_value()
            same = isinstance(secret, str) and bool(ours) and _hmac.compare_digest(
                secret.encode(), ours.encode())
            expected = sub.endpoint(settings.public_base_url)
            print(f"Subscription/{r.get('id')}  status={r.get('status')}"
                  + (f"  error={r.get('error')}" if r.get("error") else ""))
            print(f"  criteria     {r.get('criteria')}")
            print(f"  interaction  "
                  f"{sub.extension_value(r, sub.INTERACTION_EXTENSION) or 'create, update'}")
            print(f"  endpoint     {channel.get('endpoint')}"
                  + ("" if channel.get("endpoint") == expected else f"  (expected {expected})"))
            print("  secret       " + ("matches FHIR_SUBSCRIPTION_SECRET" if same else
                                     "DIFFERS from FHIR_SUBSCRIPTION_SECRET (deliveries "
                                     "get 403)"))
            total, events = sub.failed_deliveries(fhir, str(r.get("id")))
            n = total if total is not None else len(events)
            print(f"  failed deliveries recorded (AuditEvent): {n}")
            for e in events:
                print(f"    {e.get('recorded', '?')}  {e.get('outcomeDesc', '')}")
            healthy = healthy and r.get("status") == "active" and same and \
                channel.get("endpoint") == expected
        if len(found) > 1:
            print(f"warning: {len(found)} Subscriptions carry Switchboard's tag; each "
                  "delivers (harmless: one send per message), delete the extra ones")
        return 0 if healthy else 1
    except SwitchboardError as exc:
        return _refused("status", exc)
    finally:
        fhir.close()


def cmd_keys_generate(_: Settings | None, args: argparse.Namespace) -> int:
    """Print a new random key for DATA_ENCRYPTION_KEYS."""
    print(generate_key())
    return 0


def cmd_keys_rotate(settings: Settings, args: argparse.Namespace) -> int:
    """Seal every stored dead letter, inbox entry, request state, send record and inbound email
    post with the first key of DATA_ENCRYPTION_KEYS, and say how many (exit 1 if some could not
    be opened)."""
    from worker.stores.email_posts import EmailPosts
    from worker.stores.inbox import Inbox
    from worker.stores.outbound_state import OutboundState
    from worker.stores.send_ledger import SendLedger

    client = redis_client(settings, socket_timeout=30)
    sealer = settings.sealer()
    passes = {"dead letters": DeadLetterStore(client, sealer).reseal,
              "inbox entries": Inbox(client, sealer).reseal,
              "request states": OutboundState(client, sealer).reseal,
              "send records": SendLedger(client, sealer).reseal,
              "inbound email posts": EmailPosts.from_settings(client, settings).reseal,
              "held WhatsApp replies": _whatsapp_store(settings, client).reseal}
    log = _dlq_log(settings)
    unopenable = 0
    for what, reseal in passes.items():
        done = reseal()
        unopenable += done.unopenable
        print(f"{what}: {done.resealed} re-sealed, {done.current} already sealed with the "
              f"first key, {done.unopenable} sealed with a key not configured (left as is)")
        log.info("keys rotate: %s: %d re-sealed, %d current, %d unopenable", what,
                 done.resealed, done.current, done.unopenable)
    print(f"sealing key id {sealer.current_id}")
    if unopenable:
        print(f"{unopenable} values are sealed with keys not in DATA_ENCRYPTION_KEYS: add the "
              "old key back (after the first) and run this again before retiring it",
              file=sys.stderr)
        return 1
    return 0


# -- the receiver's disk spool ---------------------------------------------------------------

def _spool(settings: Settings) -> Spool | None:
    spool = spool_from_settings(settings)
    if spool is None:
        print("the spool is off (SPOOL_DIR is empty)", file=sys.stderr)
    return spool


def cmd_spool_status(settings: Settings, args: argparse.Namespace) -> int:
    """Entries waiting in this host's spool, their bytes, the oldest one's age."""
    spool = _spool(settings)
    if spool is None:
        return 1
    status = spool.status()
    if args.json:
        print(json.dumps({"directory": str(spool.directory), "entries": status.entries,
                          "bytes": status.bytes, "segments": status.segments,
                          "oldest_age_seconds": round(status.oldest_age(time.time()), 3),
                          "kept": status.kept, "corrupt_bytes": status.corrupt_bytes}))
        return 0
    print(f"{spool.directory}: {status.entries} entries, {status.bytes} bytes in "
          f"{status.segments} segments; oldest waiting {status.oldest_age(time.time()):.1f} s")
    if status.kept:
        print(f"{status.kept} entries set aside as unopenable (sealed with a key that is not in "
              "DATA_ENCRYPTION_KEYS): put the key back, then `switchboard spool flush --kept`")
    if status.corrupt_bytes:
        print(f"{status.corrupt_bytes} damaged bytes kept in *.corrupt files (no entry in them "
              "could be read)")
    return 0


def cmd_spool_flush(settings: Settings, args: argparse.Namespace) -> int:
    """Publish every spooled entry now (the web processes' flushers do it on their own)."""
    # The entries go out through the receiver's own publish (its inbox step, the one-step
    # publish, the post store), the same path as the web processes' flushers.
    from web.enqueue import Enqueuer
    from web.spooling import SpoolingEnqueuer
    from web.webhooks.sendgrid import post_store
    from worker.ops.metrics import process_metrics

    spool = _spool(settings)
    if spool is None:
        return 1
    spooling = SpoolingEnqueuer(Enqueuer.from_settings(settings), spool, post_store(settings),
                                process_metrics())
    done = spool.flush(spooling.republish, kept=args.kept)
    spool.remove_orphans()
    print(f"published {done.published}; set aside as unopenable {done.kept}; "
          f"unfinished records dropped {done.torn}")
    if done.failed:
        print(f"stopped: Redis did not take an entry ({done.failed}); the rest waits",
              file=sys.stderr)
        return 1
    left = spool.status().entries
    if left:
        print(f"{left} entries left (a segment held by another flusher, or arriving now)")
    return 0


# -- make run ---------------------------------------------------------------------------------

DEV_DEFAULTS = {
    "FHIR_CLIENT_ID": "switchboard-dev",
    "FHIR_CLIENT_SECRET": "switchboard-dev-secret",
    "TWILIO_ACCOUNT_SID": "ACdev00000000000000000000000000000",
    "TWILIO_AUTH_TOKEN": "dev-twilio-auth-token",
    "SMS_THREAD_STRATEGY": "conversation",
    "UNKNOWN_SENDER_POLICY": "reject",
}
DEV_SENDGRID_KEY = "SG.dev-sandbox-key"
DEV_API_TOKEN = "dev-api-token"  # noqa: S105 (make run's local sandbox only)
DEMO_PATIENT_PHONE = "+15551234567"
DEMO_CLINIC_PHONE = "+15557654321"
DEMO_PATIENT_EMAIL = "demo.patient@example.org"
DEMO_CLINIC_EMAIL = "care@clinic.example"
DEMO_CONVERSATIONS_IDENTITY = "clinic-desk"
DEMO_WHATSAPP_TEMPLATE = "HX" + "d" * 32  # the provider sandbox takes any well-formed one


def _dev_key(log_dir: Path) -> str:
    """make run's data key: made once and kept beside its Redis data (owner-only), so what
    an earlier run sealed still opens."""
    path = log_dir / "data-encryption-key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(generate_key() + "\n")
    return path.read_text().strip()


def cmd_run(_: Settings | None, args: argparse.Namespace) -> int:
    """Run the whole service locally on embedded defaults until Ctrl-C."""
    from worker.fhir.resources import patient_with_phone
    from worker.ops import devstack

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # stop the stack in order, as for Ctrl-C

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    log_dir = Path(args.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**DEV_DEFAULTS, **{k: v for k, v in os.environ.items() if k in DEV_DEFAULTS}}
    env["DATA_ENCRYPTION_KEYS"] = os.environ.get("DATA_ENCRYPTION_KEYS") or _dev_key(log_dir)
    env["DATA_DIR"] = str(log_dir)  # the receiver's spool beside Redis's data
    stack = devstack.Stack()
    try:
        if "REDIS_URL" in os.environ:
            env["REDIS_URL"] = os.environ["REDIS_URL"]
        else:
            rs = devstack.start_redis(log_dir, port=args.redis_port,
                                      data_dir=log_dir / "redis-data")
            stack.children.append(rs)
            env["REDIS_URL"] = rs.url
        demo_id = "<patient id>"
        if "FHIR_BASE_URL" in os.environ:
            env["FHIR_BASE_URL"] = os.environ["FHIR_BASE_URL"]
            sandbox = None
        else:
            print("starting the FHIR sandbox (Medplum engine; indexing takes a few seconds)...")
            sandbox = devstack.start_fhir_sandbox(log_dir, port=args.fhir_port)
            stack.children.append(sandbox)
            env["FHIR_BASE_URL"] = sandbox.base_url
        env["PUBLIC_BASE_URL"] = os.environ.get("PUBLIC_BASE_URL",
                                                f"http://127.0.0.1:{args.port}")
        providers_origin = ""
        if not any(k in os.environ for k in ("TWILIO_FROM_NUMBER",
                                             "TWILIO_MESSAGING_SERVICE_SID",
                                             "SENDGRID_API_KEY")):
            # No provider credentials: sends go to the local provider sandbox instead. It posts
            # each email's delivery events, signed with a key made for this run, to our
            # Event Webhook.
            event_private, event_public = devstack.sendgrid_event_keys()
            child, providers_origin = devstack.start_provider_sandbox(log_dir, [
                "--twilio-account-sid", env["TWILIO_ACCOUNT_SID"],
                "--twilio-auth-token", env["TWILIO_AUTH_TOKEN"],
                "--sendgrid-api-key", DEV_SENDGRID_KEY, "--sendgrid-events-auto",
                "--sendgrid-event-url", f"http://127.0.0.1:{args.port}/webhooks/sendgrid/events"],
                env={"PROVIDER_SANDBOX_SENDGRID_EVENT_KEY": event_private})
            stack.children.append(child)
            if not any(k in os.environ for k in ("FCM_CREDENTIALS_FILE",
                                                 "GOOGLE_APPLICATION_CREDENTIALS")):
                # Push through the sandbox too: a service account of our own (fresh RSA key)
                # whose token_uri is the sandbox, so google-auth runs as against Google.
                account = devstack.write_sandbox_service_account(
                    log_dir / "sandbox-service-account.json", providers_origin)
                env.update({"FCM_CREDENTIALS_FILE": str(account),
                            "FCM_API_BASE_URL": providers_origin})
            env.update({"SENDGRID_EVENT_VERIFICATION_KEY": event_public,
                        "TWILIO_API_BASE_URL": providers_origin,
                        "TWILIO_FROM_NUMBER": DEMO_CLINIC_PHONE,
                        # WhatsApp from the same number, with a (sandbox) approved template
                        # that asks the patient to write when the 24-hour window is closed.
                        "TWILIO_WHATSAPP_FROM": "whatsapp:" + DEMO_CLINIC_PHONE,
                        "WHATSAPP_TEMPLATE_CONTENT_SID": DEMO_WHATSAPP_TEMPLATE,
                        "WHATSAPP_TEMPLATE_VARIABLES": '{"1": "the demo clinic"}',
                        "SENDGRID_API_BASE_URL": providers_origin,
                        "SENDGRID_API_KEY": DEV_SENDGRID_KEY,
                        "SENDGRID_FROM_EMAIL": DEMO_CLINIC_EMAIL,
                        "API_TOKENS": os.environ.get("API_TOKENS", DEV_API_TOKEN),
                        # Replies in a Conversation's thread go into it as this identity.
                        "TWILIO_CONVERSATIONS_IDENTITY": os.environ.get(
                            "TWILIO_CONVERSATIONS_IDENTITY", DEMO_CONVERSATIONS_IDENTITY),
                        # Inbound Parse posts come from the sandbox, signed with its key.
                        "SENDGRID_INBOUND_VERIFICATION_KEY": devstack.sandbox_inbound_key(
                            providers_origin)})
        for name in ("SENDGRID_INBOUND_VERIFICATION_KEY", "SENDGRID_INBOUND_BASIC_AUTH"):
            if name in os.environ:
                env[name] = os.environ[name]
        # Automatic outbound: the sandbox posts new replies to us, signed with this secret.
        env["FHIR_SUBSCRIPTION_SECRET"] = os.environ.get("FHIR_SUBSCRIPTION_SECRET",
                                                         secrets.token_urlsafe(24))
        settings = load_settings(env)
        thread: dict[str, str] = {}
        if sandbox is not None:
            fhir = _fhir(settings)
            patient = patient_with_phone(DEMO_PATIENT_PHONE)
            patient["telecom"].append({"system": "email", "value": DEMO_PATIENT_EMAIL})
            demo_id = fhir.create(patient, if_none_exist=[("phone", DEMO_PATIENT_PHONE)]
                                  ).resource["id"]
            thread = _demo_thread(fhir, settings, demo_id)
            fhir.close()
        child_env = settings.as_env()
        # Without a port of its own, the worker gets a free one on 127.0.0.1 (start_worker).
        worker = devstack.start_worker({k: v for k, v in child_env.items()
                                        if not k.startswith("WORKER_METRICS_")}, log_dir)
        stack.children.append(worker)
        # Beat runs the inbox sweep and the reconciliation of stuck sends, as in production.
        stack.children.append(devstack.start_beat(child_env, log_dir))
        stack.children.append(devstack.start_web(child_env, log_dir, args.port))
        flower_auth = os.environ.get("FLOWER_BASIC_AUTH") or f"admin:{secrets.token_urlsafe(9)}"
        stack.children.append(devstack.start_flower(child_env, log_dir, args.flower_port,
                                                    flower_auth))
        demo.write_state(log_dir, {
            "public_base_url": settings.public_base_url, "fhir_base_url": settings.fhir_base_url,
            "fhir_token_url": settings.fhir_token_url, "providers_origin": providers_origin,
            "twilio_account_sid": settings.twilio_account_sid,
            "message_id_system": settings.message_id_system,
            "clinic_phone": DEMO_CLINIC_PHONE, "clinic_email": DEMO_CLINIC_EMAIL,
            "patient_phone": DEMO_PATIENT_PHONE, "patient_email": DEMO_PATIENT_EMAIL,
            "patient_id": demo_id, **{k: thread.get(k, "") for k in ("thread_id",
                                                                     "practitioner_id")}})
        print(f"""
Switchboard is running (logs in {log_dir}; Ctrl-C stops everything).
  receiver  {settings.public_base_url}  (/healthz, /readyz, /metrics, /v1/messages)
  worker    http://127.0.0.1:{worker.metrics_port}/metrics  (its tasks and sends)
  FHIR      {settings.fhir_base_url}
  Flower    http://127.0.0.1:{args.flower_port}  (user:password {flower_auth})
  Redis     {settings.redis_url}""" + (f"""
  providers {providers_origin}  (what was "sent": {providers_origin}/__requests)"""
                                    if providers_origin else "") + f"""

Next, in another shell:  {_switchboard_command()} demo sms
  (the demo patient texts the clinic; then try: demo reply, email, inbound-email, push,
   conversations, whatsapp;
   docs/development.md says what each shows)
""", flush=True)
        while all(_alive(c) for c in stack.children):
            time.sleep(0.5)
        print("a component exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...")
        return 0
    finally:
        stack.stop()


def _switchboard_command() -> str:
    """How this console script was called (`.venv/bin/switchboard` under `make run`)."""
    called = sys.argv[0] if Path(sys.argv[0]).name == "switchboard" else "switchboard"
    return shlex.quote(os.path.relpath(called) if os.sep in called else called)


def cmd_demo(_: Settings | None, args: argparse.Namespace) -> int:
    """Send one demo through the stack `make run` started; print what happened."""
    env = {**DEV_DEFAULTS, **{k: v for k, v in os.environ.items() if k in DEV_DEFAULTS}}
    env["API_TOKEN"] = (os.environ.get("API_TOKENS") or DEV_API_TOKEN).split(",")[0].strip()
    try:
        print(demo.run_demo(args.flow, demo.load_stack(Path(args.log_dir), env), args.text))
    except demo.DemoFailed as exc:
        print(f"demo {args.flow}: {exc}", file=sys.stderr)
        return 1
    return 0


def _demo_thread(fhir: FhirClient, settings: Settings, patient_id: str) -> dict[str, str]:
    """`make run`'s demo SMS thread and clinician, and the Subscription installed."""
    from worker.fhir import subscription as sub
    from worker.fhir.resources import PARTICIPATION_MODE

    key = settings.thread_id_system
    doctor = fhir.create({"resourceType": "Practitioner",
                          "identifier": [{"system": key, "value": "demo-clinician"}],
                          "name": [{"family": "Demo", "prefix": ["Dr."]}]},
                         if_none_exist=[("identifier", f"{key}|demo-clinician")]).resource
    thread = fhir.create({
        "resourceType": "Communication", "status": "in-progress",
        "identifier": [{"system": key, "value": "demo-thread"}],
        "subject": {"reference": f"Patient/{patient_id}"}, "topic": {"text": "Demo thread"},
        "medium": [{"coding": [{"system": PARTICIPATION_MODE, "code": "SMSWRIT"}]}]},
        if_none_exist=[("identifier", f"{key}|demo-thread")]).resource
    sub.install(fhir, settings.public_base_url,
                settings.fhir_subscription_secret.get_secret_value())
    return {"thread_id": str(thread["id"]), "practitioner_id": str(doctor["id"])}


def _alive(c: object) -> bool:
    # Stack members are Child objects or wrappers holding one in `.child`.
    child = c if hasattr(c, "proc") else getattr(c, "child", None)
    proc = getattr(child, "proc", None)
    return proc is None or proc.poll() is None


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="switchboard", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole service locally (make run)")
    run.add_argument("--port", type=int, default=int(os.environ.get("WEB_PORT", "8000")))
    run.add_argument("--redis-port", type=int, default=None)
    run.add_argument("--flower-port", type=int, default=int(os.environ.get("FLOWER_PORT",
                                                                            "5555")))
    run.add_argument("--fhir-port", type=int, default=0)
    run.add_argument("--log-dir", default=".run")
    run.set_defaults(func=cmd_run, needs_settings=False)
    show = sub.add_parser("demo", help="with `make run` running: send one demo through it and "
                                       "say what happened")
    show.add_argument("flow", choices=demo.DEMOS, help="sms: the demo patient texts the clinic; "
                      "reply: a clinician writes a reply into FHIR; email: the clinic emails "
                      "the patient through /v1/messages; inbound-email: the patient emails the "
                      "clinic; push: a push to the patient's registered phone; conversations: "
                      "the patient writes into a Twilio Conversation and a clinician's reply "
                      "goes back into it; whatsapp: the clinic writes on WhatsApp, held for "
                      "the 24-hour window until the patient answers")
    show.add_argument("--text", help="the message text (else a demo text)")
    show.add_argument("--log-dir", default=".run", help="the log directory of `make run`")
    show.set_defaults(func=cmd_demo, needs_settings=False)
    check = sub.add_parser("check", help="validate the configuration and the dependencies")
    check.set_defaults(func=cmd_check, needs_settings=False)

    keys = sub.add_parser("keys", help="DATA_ENCRYPTION_KEYS: generate a key, re-seal stored "
                                       "data with the first key").add_subparsers(
        dest="keys", required=True)
    keys.add_parser("generate", help="print a new random key").set_defaults(
        func=cmd_keys_generate, needs_settings=False)
    keys.add_parser("rotate", help="re-seal dead letters, inbox entries, request states and "
                                   "send records with the first key; print how many"
                    ).set_defaults(func=cmd_keys_rotate)

    optout = sub.add_parser("optout", help="the local opt-out list (STOP / 21610)")
    optout.add_argument("action", choices=("check", "add", "remove"))
    optout.add_argument("address", help="phone number (any common format) or email address")
    optout.add_argument("--channel", choices=("sms", "whatsapp", "email"), default="sms")
    optout.set_defaults(func=cmd_optout)

    wa = sub.add_parser("whatsapp", help="WhatsApp replies held for the 24-hour window"
                        ).add_subparsers(dest="whatsapp", required=True)
    wa.add_parser("held", help="list the held replies, oldest first").set_defaults(
        func=cmd_whatsapp_held)

    subs = sub.add_parser("subscription", help="the FHIR Subscription of automatic outbound"
                          ).add_subparsers(dest="subscription", required=True)
    subs.add_parser("install", help="create or update it (idempotent)").set_defaults(
        func=cmd_subscription_install)
    subs.add_parser("status", help="what is installed, and failed deliveries").set_defaults(
        func=cmd_subscription_status)

    spool = sub.add_parser("spool", help="the receiver's disk spool (webhooks accepted while "
                                         "Redis was unreachable)").add_subparsers(
        dest="spool", required=True)
    sstatus = spool.add_parser("status", help="entries waiting, bytes, the oldest one's age")
    sstatus.add_argument("--json", action="store_true")
    sstatus.set_defaults(func=cmd_spool_status)
    sflush = spool.add_parser("flush", help="publish every spooled entry now")
    sflush.add_argument("--kept", action="store_true",
                        help="also retry entries set aside as unopenable (the key is back)")
    sflush.set_defaults(func=cmd_spool_flush)

    dlq = sub.add_parser("dlq", help="dead-letter store").add_subparsers(dest="dlq",
                                                                          required=True)
    ls = dlq.add_parser("list", help="list entries, newest first")
    _add_filters(ls, "only")
    ls.add_argument("--limit", type=_positive_int, default=100)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_dlq_list)
    show = dlq.add_parser("show", help="one entry in full")
    show.add_argument("id")
    show.set_defaults(func=cmd_dlq_show)
    replay = dlq.add_parser("replay", help="send entries back to their queue: ID, --all, or "
                                           "the entries matching --reason/--task/--since")
    group = replay.add_mutually_exclusive_group()
    group.add_argument("id", nargs="?")
    group.add_argument("--all", action="store_true")
    _add_filters(replay, "replay")
    replay.add_argument("--dry-run", action="store_true",
                        help="list what would be replayed; send nothing")
    replay.set_defaults(func=cmd_dlq_replay)
    purge = dlq.add_parser("purge", help="delete every entry, or those matching the filters")
    purge.add_argument("--yes", action="store_true")
    _add_filters(purge, "delete only")
    purge.set_defaults(func=cmd_dlq_purge)
    quar = dlq.add_parser("quarantined", help="messages dropped because they could be neither "
                                              "processed nor dead-lettered (no payload kept)")
    quar.add_argument("--limit", type=_positive_int, default=100)
    quar.set_defaults(func=cmd_dlq_quarantined)
    prune = dlq.add_parser("prune", help="delete entries older than DEAD_LETTER_RETENTION_DAYS")
    prune.set_defaults(func=cmd_dlq_prune)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `switchboard` console script."""
    args = build_parser().parse_args(argv)
    settings = None
    if getattr(args, "needs_settings", True):
        try:
            settings = load_settings()
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
    return int(args.func(settings, args))


if __name__ == "__main__":
    raise SystemExit(main())
